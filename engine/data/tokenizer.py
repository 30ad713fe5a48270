"""A sentencepiece BPE tokenizer, trained once on the corpus and cached by vocab size.

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

import sentencepiece as spm

from engine.data.cache import build_once
from engine.data.corpus import load_documents

logger = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
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
        if vocab_size < 260:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: the tokenizer needs 256 byte pieces "
                f"plus 4 special ids plus the corpus characters; use 512 or more"
            )
        path = Path(cache_dir) / f"tokenizer_{vocab_size}.model"
        build_once(path, lambda tmp: _train(Path(corpus_path), vocab_size, tmp))
        return cls.from_file(path)

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
        raise ValueError(
            f"training a {vocab_size}-piece tokenizer on {corpus_path} failed ({e}); "
            f"pick a data.vocab_size that fits the corpus (the reason above says if it is "
            f"too small for the corpus characters or too large for the text)"
        ) from None
    out_path.write_bytes(model.getvalue())
    logger.info("trained tokenizer_%d.model on %d documents in %.1f s",
                vocab_size, len(documents), time.perf_counter() - start)
