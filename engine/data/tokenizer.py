"""Tokenizers trained once on the corpus and cached by kind and vocab size, and the
`tokenizer.json` reader.

Two kinds (`data.tokenizer`):
- ``sentencepiece`` (default): a sentencepiece BPE, best for the small vocabularies of
  the tiny models; on the ~5 MB Shakespeare corpus it reaches at most ~74k pieces,
  because its merges stay inside whitespace-separated words.
- ``bpe``: a byte-level BPE trained with Hugging Face ``tokenizers`` (GPT-2 / Qwen byte
  alphabet, saved as ``tokenizer.json``) whose merges may cross word boundaries, so it
  can be trained to exactly the size a production config names (151,933 text ids for a
  Qwen-sized 151,936 vocabulary in about 20 s on 2 cores).

Why train our own: no tokenizer may be downloaded from a model hub at run time, and a
small model wants a small vocabulary (1-4k pieces) fitted to its corpus. Training a BPE
model on the ~5 MB Shakespeare corpus takes about a second, so it is simply done on
first use and cached as ``<cache_dir>/tokenizer_<vocab_size>.model``.

Choices that matter downstream:
- ``normalization_rule_name="identity"`` and ``remove_extra_whitespaces=False`` make
  ``decode(encode(s)) == s`` hold exactly (no NFKC folding, no collapsed spaces), and
  ``byte_fallback=True`` means an unseen character becomes its UTF-8 bytes, never UNK.
- Training sentences are whole documents, so newlines (verse line breaks) become part
  of ordinary pieces such as ``".\\n"`` instead of costly byte pieces.
- Fixed special ids: pad=0, unk=1, bos=2, eos=3. The packer appends EOS to every
  document and finds document boundaries from it, so EOS must never come out of
  ``encode`` (sentencepiece control symbols never do).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import json

import sentencepiece as spm

from engine.data.cache import build_once
from engine.data.corpus import load_documents
from engine.data.errors import DataError

logger = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
TOKENIZER_KINDS = ("sentencepiece", "bpe")
_BPE_SPECIALS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}  # ids 0..3 in this order


class VocabularyUnreachableError(ValueError):
    """Training cannot produce the asked number of pieces from this corpus."""
_TRAIN_SEED = 1234
# Training reads at most this many documents (a random, seeded sample when the corpus
# is larger), which bounds training time on 2 cores for any corpus size.
_MAX_TRAIN_DOCUMENTS = 100_000


class Tokenizer:
    """Thin wrapper around a ``SentencePieceProcessor`` with the ids the engine needs."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: Path | None = None):
        self._sp = processor
        self.path = path
        self.vocab_size: int = processor.get_piece_size()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        self.pad_id: int = processor.pad_id()
        self.unk_id: int = processor.unk_id()
        if min(self.bos_id, self.eos_id, self.pad_id) < 0:
            raise ValueError(
                f"tokenizer {path} lacks a bos, eos or pad id (bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id}); retrain it with Tokenizer.load_or_train"
            )

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load an existing sentencepiece ``.model`` file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"tokenizer model {path} does not exist; pass the path of a sentencepiece "
                f".model file, or build one with Tokenizer.load_or_train(cache_dir, vocab_size, corpus)"
            )
        processor = spm.SentencePieceProcessor()
        try:
            processor.load(str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(
                f"tokenizer model {path} is not a valid sentencepiece model ({e}); "
                f"delete it so that it is retrained, or point to a good .model file"
            ) from None
        return cls(processor, path)

    @classmethod
    def load_or_train(cls, cache_dir: str | Path, vocab_size: int, corpus_path: str | Path) -> Tokenizer:
        """Load ``<cache_dir>/tokenizer_<vocab_size>.model``, training it on the corpus first
        if it is not there. Safe to call from every rank at once (lock + atomic write)."""
        _check_min_size(vocab_size)
        path = cached_tokenizer_path(cache_dir, "sentencepiece", vocab_size)
        build_once(path, lambda tmp: _train(Path(corpus_path), vocab_size, tmp))
        return cls.from_file(path)

    @property
    def cache_tag(self) -> str:
        """Names this tokenizer's token cache (``tokens_<tag>.npy``)."""
        return str(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS (the packer adds EOS per document)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        """``encode`` for many texts at once, in sentencepiece's C++ thread pool."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; control ids (pad, bos, eos) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path})"


def _train(corpus_path: Path, vocab_size: int, out_path: Path) -> None:
    """Train a BPE model on the corpus documents and write the model bytes to ``out_path``."""
    documents = load_documents(corpus_path)
    start = time.perf_counter()
    model = io.BytesIO()
    spm.set_random_generator_seed(_TRAIN_SEED)  # the document sample/shuffle is seeded
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(documents),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=1.0,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            max_sentence_length=1 << 16,
            input_sentence_size=_MAX_TRAIN_DOCUMENTS,
            shuffle_input_sentence=True,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            num_threads=2,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise VocabularyUnreachableError(
            f"sentencepiece on {corpus_path}: {str(e).splitlines()[0].rsplit('] ', 1)[-1]}"
        ) from None
    out_path.write_bytes(model.getvalue())
    logger.info("trained tokenizer_%d.model on %d documents in %.1f s",
                vocab_size, len(documents), time.perf_counter() - start)


def _check_min_size(vocab_size: int) -> None:
    if vocab_size < 260:
        raise VocabularyUnreachableError(f"{vocab_size} ids are too few: a tokenizer needs 256 byte pieces plus 4 "
                                         "special ids plus the corpus characters (512 or more)")


def cached_tokenizer_path(cache_dir: str | Path, kind: str, vocab_size: int) -> Path:
    """Where `load_or_train_tokenizer` caches a tokenizer of this kind and size."""
    assert kind in TOKENIZER_KINDS, kind
    name = f"tokenizer_{vocab_size}.model" if kind == "sentencepiece" else f"tokenizer_bpe_{vocab_size}.json"
    return Path(cache_dir) / name


def load_or_train_tokenizer(cache_dir: str | Path, kind: str, vocab_size: int, corpus_path: str | Path):
    """The cached tokenizer of `kind` with exactly `vocab_size` ids, trained on the corpus
    first if needed (every rank may call this at once). Raises
    `VocabularyUnreachableError` when the corpus cannot give that many pieces."""
    if kind == "sentencepiece":
        return Tokenizer.load_or_train(cache_dir, vocab_size, corpus_path)
    _check_min_size(vocab_size)
    path = cached_tokenizer_path(cache_dir, kind, vocab_size)
    build_once(path, lambda tmp: _train_bpe(Path(corpus_path), vocab_size, tmp))
    return JsonTokenizer(path, roles=_BPE_SPECIALS, literal_specials=True, cache_tag=f"bpe_{vocab_size}")


def _train_bpe(corpus_path: Path, vocab_size: int, out_path: Path) -> None:
    """Byte-level BPE to exactly `vocab_size` ids (4 special tokens first, then the 256
    bytes, then merges). No pre-tokenisation regex: merges may span spaces and newlines,
    which is what lets a small corpus fill a large vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    documents = load_documents(corpus_path)
    start = time.perf_counter()
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(_BPE_SPECIALS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=0,
                                  show_progress=False)
    tok.train_from_iterator(documents, trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise VocabularyUnreachableError(f"a byte-level BPE on {corpus_path} stops at {got} pieces, "
                                         f"fewer than {vocab_size}")
    out_path.write_text(tok.to_str())
    logger.info("trained %s (byte-level BPE, %d ids) on %d documents in %.1f s",
                out_path.name, vocab_size, len(documents), time.perf_counter() - start)


class JsonTokenizer:
    """A `tokenizer.json` (Hugging Face `tokenizers`) with the interface of `Tokenizer`.

    Special-token roles come from `roles` ({"bos": "<s>", ...}) or else from the
    `tokenizer_config.json` beside the file. `literal_specials`: text that spells a special
    token (say "</s>") is encoded as plain text, never as the special id (the packer finds
    document ends from EOS, so EOS must never come out of `encode`).
    """

    def __init__(self, path: Path, roles: dict[str, str] | None = None, literal_specials: bool = False,
                 cache_tag: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        self._tok = HFTokenizer.from_file(str(self.path))
        self._tok.encode_special_tokens = literal_specials
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.cache_tag = cache_tag or f"{self.path.stem}_{self.vocab_size}"
        if roles is None:
            config = self.path.parent / "tokenizer_config.json"
            special = json.loads(config.read_text()) if config.is_file() else {}
            roles = {}
            for role in ("bos", "eos", "pad", "unk"):
                token = special.get(f"{role}_token")
                roles[role] = token.get("content") if isinstance(token, dict) else token
        ids = {role: self._tok.token_to_id(roles[role]) if roles.get(role) else None
               for role in ("bos", "eos", "pad", "unk")}
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = ids["bos"], ids["eos"], ids["pad"], ids["unk"]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` (no BOS/EOS added) and each token's ``(start, end)`` character
        offsets in ``text``, as transformers' fast tokenizers report them."""
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(offset) for offset in encoding.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"JsonTokenizer(vocab_size={self.vocab_size}, path={self.path})"


class TokenizerError(DataError):
    """A tokenizer file that cannot be used; one line with the fix."""


class SentencePieceTokenizer:
    """A sentencepiece `.model` that lacks some special ids (e.g. Llama 2's, no pad)."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.path, self._sp = path, spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size: int = self._sp.get_piece_size()
        ids = (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id(), self._sp.unk_id())
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = (i if i >= 0 else None for i in ids)

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts, num_threads: int = 2) -> list[list[int]]:
        return self._sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str | Path):
    """A tokenizer from `tokenizer.json`, a sentencepiece `.model`, or a folder holding either.

    Returns an object with `encode`, `decode`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`
    (engine.data's `Tokenizer` for our own sentencepiece models).
    """
    path = Path(path)
    if path.is_dir():
        models = sorted(path.glob("*.model"))
        choice = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else \
            path / "tokenizer.model" if (path / "tokenizer.model").is_file() else models[0] if models else None
        if choice is None:
            raise TokenizerError(f"{path} has no tokenizer.json or sentencepiece .model file: pass the tokenizer "
                                    "file itself, or a folder that holds one")
        path = choice
    if not path.is_file():
        raise TokenizerError(f"tokenizer {path} does not exist: pass a tokenizer.json, a sentencepiece .model, "
                                "or a folder holding one")
    if path.suffix == ".json":
        try:
            return JsonTokenizer(path)
        except Exception as e:  # tokenizers raises its own Exception type for bad files
            raise TokenizerError(f"{path} is not a valid tokenizer.json ({str(e).splitlines()[0][:120]}): pass "
                                    "the tokenizer.json that transformers or tokenizers saved") from None
    if path.suffix != ".model":
        raise TokenizerError(f"tokenizer {path} is neither tokenizer.json nor a sentencepiece .model: pass one of them")
    try:
        return Tokenizer.from_file(path)
    except ValueError as e:
        if "lacks a bos, eos or pad id" not in str(e):
            raise TokenizerError(str(e)) from None
        return SentencePieceTokenizer(path)
