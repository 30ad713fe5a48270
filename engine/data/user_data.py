"""The user's own data: `data.dataset: text` and `data.dataset: conversations`.

Both read token shards (engine/data/token_shards.py): a folder made by
`tools/prepare_data.py`, or the files of `data.path` tokenised on first use into
`<data.cache_dir>/prepared/<fingerprint>` (one process; fine for small sets).

- `text` packs documents as a stream, the way pretraining does: rows are consecutive
  windows of `seq_len` tokens (documents cut at row ends, each document's tokens kept;
  positions restart and attention is masked at every document start).
- `conversations` packs whole samples (never split) into rows, first-fit over a few open
  rows; a sample longer than `seq_len` is skipped and counted, or with `data.truncate`
  keeps its head. Targets are the tokens the chat template marks (engine/data/chat.py).
  Images, videos and clips in the messages (engine/data/conversation_media.py) are counted
  into the lengths from their headers when the data is tokenised and decoded when a row is
  built; a file that fails to decode then drops its sample from the row (counted by reason).
  A model with M-RoPE (`model.mrope_section`) gets [3, B, S] positions per sample.

Batches are a pure function of the step, the same for every layout: draw k of the
sample stream is a (source, item) pair, blended over `data.weights` by Megatron's greedy
rule (each source as close to its share as possible after every draw) and, within a
source, an item of a seeded per-epoch permutation (`Draws`); rows are built from draws in
order (`UserData`), step s takes global rows [s*G, (s+1)*G). Only the length index of the
samples is read to pack; resuming at step s re-packs the index up to there, never data.
"""

from __future__ import annotations

import json
import logging
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import torch

from engine.batch import IGNORE_INDEX, Batch
from engine.config import Config, ConfigError, expand_path
from engine.models.omni import text_vocab_size

from .cache import file_lock
from .errors import DataError
from .omni_packing import OmniSample, pack_rows
from .packing import PackedTextDataset
from .conversation_media import MediaPlan, encode_media_conversation, load_payloads, media_plan, model_ids
from .media import MediaError
from .records import expand_data_paths
from .token_shards import TokenShards, is_prepared
from .tokenize_corpus import EncodeSpec, Encoder, prepare_folder
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

_OPEN_ROWS = 8  # first-fit looks this many rows back before closing the oldest


# ---- tokenizer and shards ----------------------------------------------------------------
def resolve_tokenizer(cfg: Config) -> str:
    """`data.tokenizer` when it is a path, else model.init_from's folder when it holds a
    tokenizer; the trained kinds (sentencepiece, bpe) are for the built-in corpora."""
    d = cfg.data
    if d.tokenizer not in ("sentencepiece", "bpe"):
        return str(expand_path(d.tokenizer))
    if cfg.model.init_from:
        folder = expand_path(cfg.model.init_from)
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
            return str(folder)
    raise ConfigError(f"config key 'data.tokenizer'={d.tokenizer!r} trains a tokenizer on the built-in corpus; "
                      f"data.dataset={d.dataset} needs the tokenizer of your model: set data.tokenizer to a Hugging "
                      "Face tokenizer folder (or .json / sentencepiece .model), or model.init_from to a folder with one")


def encode_spec(cfg: Config, parts=None) -> EncodeSpec:
    """What decides the tokens of a row under `cfg` (`parts`: the model's PartLayout, which
    says how media parts are read; None for a model without parts)."""
    tokenizer = resolve_tokenizer(cfg)
    plan = None
    if cfg.data.dataset == "conversations" and parts is not None:
        folder = Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent
        plan = media_plan(cfg, parts, load_tokenizer(tokenizer), folder)
    return EncodeSpec(kind=cfg.data.dataset, tokenizer=tokenizer, text_field=cfg.data.text_field,
                      chat_template=str(expand_path(cfg.data.chat_template)) if cfg.data.chat_template else None,
                      train_on=cfg.data.train_on, media=plan)


def load_shards(cfg: Config, entries: list[str], key: str, spec: EncodeSpec) -> TokenShards:
    """One source: the prepared folder named by `entries`, or their files tokenised into the cache."""
    if len(entries) == 1 and is_prepared(expand_path(entries[0])):
        shards = TokenShards(expand_path(entries[0]))
        made = shards.meta["tokenizer"].get("spec", {})
        if shards.meta["tokenizer"].get("fingerprint") != spec.tokenizer_fingerprint():
            raise DataError(f"config key '{key}' folder {entries[0]} was tokenised with another tokenizer or chat "
                            f"template ({shards.meta['tokenizer']['path']}) than {spec.tokenizer}; prepare it again "
                            "with tools/prepare_data.py and this config")
        plan = json.loads(json.dumps(asdict(spec.media) if spec.media else None))
        if shards.has_media and _with_defaults(made.get("media")) != plan:
            raise DataError(f"config key '{key}' folder {entries[0]} was prepared for another model's media parts "
                            "or other data.min_pixels / max_pixels / video_fps / max_frames / use_audio_in_video; "
                            "prepare it again with "
                            "tools/prepare_data.py and this config")
        if shards.kind != spec.kind or made.get("train_on", spec.train_on) != spec.train_on:
            raise DataError(f"config key '{key}' folder {entries[0]} was prepared as {shards.kind} "
                            f"(train_on={made.get('train_on')}), not {spec.kind} (train_on={spec.train_on}); "
                            "prepare it again with tools/prepare_data.py")
    else:
        files = expand_data_paths(entries, key)
        folder = expand_path(cfg.data.cache_dir) / "prepared" / spec.fingerprint(files)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(folder.parent / f".{folder.name}.lock"):  # every rank may get here: one tokenises
            if not is_prepared(folder):
                prepare_folder(files, folder, spec, processes=1, strict=cfg.data.strict)
        shards = TokenShards(folder)
        if cfg.data.strict and shards.skipped:  # cached by a lenient run: find the first bad row again
            prepare_folder(files, folder.with_name(folder.name + ".strict"), spec, processes=1, strict=True)
    if cfg.data.strict and shards.skipped:
        raise DataError(f"config key '{key}' folder {entries[0]} was prepared with bad rows left out {shards.skipped} "
                        "(data.strict=true); prepare it with --data.strict=true to see the first one")
    vocab = int(shards.meta["tokenizer"]["vocab_size"])
    n_text = text_vocab_size(cfg.model)
    if vocab > n_text:
        raise ConfigError(f"tokenizer {spec.tokenizer} has {vocab} ids but the model has {n_text} text ids "
                          f"(config key 'model.vocab_size'={cfg.model.vocab_size}); raise model.vocab_size to at "
                          "least the tokenizer's size")
    if len(shards) == 0:
        raise DataError(f"config key '{key}' {entries}: no usable rows (skipped: {shards.skipped}); check the files "
                        "and data.text_field / the messages")
    return shards


def _with_defaults(media):
    """A prepared folder's media plan with the defaults of MediaPlan fields added since it was
    prepared (they did not change its ids)."""
    if not isinstance(media, dict):
        return media
    defaults = {f.name: json.loads(json.dumps(f.default)) for f in fields(MediaPlan) if f.default is not MISSING}
    return {**defaults, **media}


# ---- sources: items of one data.path entry ---------------------------------------------
class TextWindows:
    """Windows of seq_len tokens over a source's document stream (items of equal length)."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int, keep: np.ndarray | None = None):
        try:
            self.windows = PackedTextDataset(shards.tokens, shards.doc_offsets[:-1], seq_len, seed)
        except ValueError as e:
            raise DataError(f"{shards.folder}: {e}") from None
        self.keep = np.arange(len(self.windows)) if keep is None else keep
        self.skipped = dict(shards.skipped)

    def __len__(self) -> int:
        return len(self.keep)

    def length(self, i: int) -> int:
        return self.windows.seq_len

    def sample(self, i: int) -> dict[str, np.ndarray]:
        return self.windows[int(self.keep[i])]


class Conversations:
    """Whole samples with their target masks and media; too-long ones are dropped (counted) or
    cut (a sample with media is never cut: its placeholders would not match its payloads)."""

    def __init__(self, shards: TokenShards, seq_len: int, truncate: bool, strict: bool,
                 keep: np.ndarray | None = None, plan: MediaPlan | None = None, mrope: bool = False):
        self.shards, self.seq_len, self.strict, self.plan, self.mrope = shards, seq_len, strict, plan, mrope
        lengths = shards.lengths()
        ids = np.arange(len(lengths)) if keep is None else keep
        long = lengths[ids] > seq_len
        uncut = long if not truncate else long & np.array([bool(shards.media(i)) for i in ids], dtype=bool)
        if uncut.any() and strict:
            raise DataError(f"{shards.folder}: sample {int(ids[uncut][0])} has {int(lengths[ids][uncut][0])} tokens, "
                            f"more than data.seq_len={seq_len} (data.strict=true); raise data.seq_len, set "
                            "data.truncate=true (text only), or data.strict=false to skip and count")
        self.keep = ids[~uncut]
        self.lengths = np.minimum(lengths[self.keep], seq_len)
        self.skipped = dict(shards.skipped)
        if uncut.any():
            self.skipped["too_long"] = int(uncut.sum())
        if (long & ~uncut).any():
            self.skipped["truncated"] = int((long & ~uncut).sum())

    def __len__(self) -> int:
        return len(self.keep)

    def length(self, i: int) -> int:
        return int(self.lengths[i])

    def sample(self, i: int) -> OmniSample | None:
        """The sample, its media decoded; None when a media file fails to decode (counted)."""
        doc = int(self.keep[i])
        ids, mask = self.shards.document(doc)
        ids, mask = ids[:self.seq_len], mask[:self.seq_len]
        refs = self.shards.media(doc)
        payloads = {}
        if refs:
            try:
                payloads = load_payloads(refs, self.plan)
            except MediaError as e:
                if self.strict:
                    raise DataError(f"{self.shards.folder}: document {doc}: {e} (data.strict=true)") from None
                self.skipped[e.reason] = self.skipped.get(e.reason, 0) + 1
                return None
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
        ids, positions = model_ids(ids, refs, self.plan, self.mrope)
        return OmniSample(ids.tolist(), labels.tolist(), payloads, positions)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) item ids: a seeded `fraction` of the n items, at least one."""
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    cut = max(1, round(n * fraction))
    if cut >= n:
        raise DataError(f"config key 'data.eval_fraction' holds out all {n} items; lower it or set data.eval_path")
    return np.sort(perm[cut:]), np.sort(perm[:cut])


# ---- the stream of draws and the rows ----------------------------------------------------
class Draws:
    """Draw k -> (source, item), a pure function of k.

    Sources are blended by Megatron's greedy rule (each draw goes to the source furthest
    below its share) over a fixed pattern of `CHUNK` draws, repeated: draw k is pattern
    position k % CHUNK of chunk k // CHUNK, so nothing grows with the step. Within a source,
    its n-th draw is item perm_e[n % size] of the seeded permutation of epoch e = n // size.
    `sequential` (validation): draw k is simply the k-th item, sources one after another.
    """

    CHUNK = 1 << 16

    def __init__(self, sizes: list[int], weights: list[float] | None, seed: int, sequential: bool = False):
        self.sizes, self.seed, self.sequential = sizes, seed, sequential
        self.bases = np.cumsum([0, *sizes])
        w = np.asarray(weights if weights else [1.0] * len(sizes), dtype=np.float64)
        w = w / w.sum()
        self.pattern = np.zeros(self.CHUNK if len(sizes) > 1 and not sequential else 0, dtype=np.int32)
        self.within = np.zeros(len(self.pattern), dtype=np.int64)  # the source's draws before, in the chunk
        taken = np.zeros(len(sizes), dtype=np.int64)
        for k in range(len(self.pattern)):
            src = int(np.argmax(w * (k + 1) - taken))
            self.pattern[k], self.within[k] = src, taken[src]
            taken[src] += 1
        self.per_chunk = taken
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def total(self) -> int:
        return int(self.bases[-1])

    def __getitem__(self, k: int) -> tuple[int, int]:
        if self.sequential:
            src = int(np.searchsorted(self.bases, k, side="right")) - 1
            return src, k - int(self.bases[src])
        if len(self.sizes) == 1:
            src, n = 0, k
        else:
            chunk, j = divmod(k, self.CHUNK)
            src = int(self.pattern[j])
            n = chunk * int(self.per_chunk[src]) + int(self.within[j])
        size = self.sizes[src]
        epoch = n // size
        perm = self._perms.get((src, epoch))
        if perm is None:
            perm = np.random.default_rng([self.seed, src, epoch]).permutation(size)
            self._perms = {key: v for key, v in self._perms.items() if key[0] != src or key[1] >= epoch - 1}
            self._perms[(src, epoch)] = perm
        return src, int(perm[n % size])


class UserData:
    """The DataSource of the text and conversations datasets.

    Text: row r is draw r (a window fills a row). Conversations: draws are packed in blocks
    of `BLOCK` draws, first-fit over a few open rows, all rows closed at the block's end;
    only each block's row count is kept (and the rows of the last few blocks), so memory
    does not grow with the step and a resumed run re-packs only the index, not the data.
    `evaluation`: one sequential pass over the items; rows past it are empty (no targets).
    """

    BLOCK = 1024

    def __init__(self, sources: list, names: list[str], weights: list[float] | None, seq_len: int, seed: int,
                 pad_id: int, packed: bool, evaluation: bool = False, parts=None):
        self.sources, self.names, self.seq_len, self.pad_id, self.packed = sources, names, seq_len, pad_id, packed
        self.parts = parts  # the model's PartLayout (placeholders and payload collation), or None
        self.evaluation = evaluation
        self.draws = Draws([len(s) for s in sources], weights, seed, sequential=evaluation)
        self._block_starts = [0]  # first global row of each packed block
        self._blocks: dict[int, list[list[tuple[int, int]]]] = {}

    def skipped_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.sources:
            for k, v in s.skipped.items():
                out[k] = out.get(k, 0) + v
        return out

    def num_rows(self) -> int:
        """Rows of the validation pass."""
        assert self.evaluation
        if not self.packed:
            return self.draws.total
        blocks = -(-self.draws.total // self.BLOCK)
        self._locate(float("inf"), blocks)
        return self._block_starts[min(blocks, len(self._block_starts) - 1)]

    def _pack_block(self, b: int) -> list[list[tuple[int, int]]]:
        rows, open_rows = [], []  # open: [tokens used, draws]
        last = self.draws.total if self.evaluation else None
        for k in range(b * self.BLOCK, (b + 1) * self.BLOCK):
            if last is not None and k >= last:
                break
            s, i = self.draws[k]
            n = self.sources[s].length(i)
            for slot in open_rows:
                if slot[0] + n <= self.seq_len:
                    slot[0] += n
                    slot[1].append((s, i))
                    break
            else:
                open_rows.append([n, [(s, i)]])
                if len(open_rows) > _OPEN_ROWS:
                    rows.append(open_rows.pop(0)[1])
        return rows + [slot[1] for slot in open_rows]

    def _block(self, b: int) -> list[list[tuple[int, int]]]:
        if b not in self._blocks:
            if len(self._blocks) >= 4:
                self._blocks.pop(min(self._blocks))
            self._blocks[b] = self._pack_block(b)
        return self._blocks[b]

    def _locate(self, r: float, max_blocks: int | None = None) -> tuple[int, int] | None:
        """(block, row within it) of global row r, packing blocks' index as far as needed."""
        while self._block_starts[-1] <= r:
            b = len(self._block_starts) - 1
            if max_blocks is not None and b >= max_blocks:
                return None
            self._block_starts.append(self._block_starts[-1] + len(self._block(b)))
        b = int(np.searchsorted(self._block_starts, r, side="right")) - 1
        return b, int(r - self._block_starts[b])

    def _row(self, r: int) -> list[tuple[int, int]]:
        if not self.packed:
            return [self.draws[r]] if not self.evaluation or r < self.draws.total else []
        if self.evaluation:
            where = self._locate(r, -(-self.draws.total // self.BLOCK))
            if where is None:
                return []
        else:
            where = self._locate(r)
        return self._block(where[0])[where[1]]

    def batch(self, rows: list[int]) -> Batch:
        if self.packed:
            drawn = [[(s, self.sources[s].sample(i)) for s, i in self._row(r)] for r in rows]
            drawn = [[(s, x) for s, x in row if x is not None] for row in drawn]
            parts = self.parts
            batch = pack_rows([[x for _, x in row] for row in drawn], self.seq_len, self.pad_id,
                              parts.placeholders if parts else {}, parts.decoders if parts else [],
                              parts.parts if parts else {})
            if len(self.sources) > 1:
                sizes = [[(s, len(x)) for s, x in row] for row in drawn]
                batch = batch.replace(loss_groups=self._loss_groups(sizes, batch),
                                      loss_group_names=tuple(self.names))
            return batch
        else:
            picked = [(self._row(r) or [(0, 0)])[0] for r in rows]  # an empty row: any window, no targets
            samples = [self.sources[s].sample(i) for s, i in picked]
            batch = Batch(**{k: torch.from_numpy(np.stack([x[k] for x in samples])).long() for k in samples[0]})
            empty = torch.tensor([not self._row(r) for r in rows])
            if empty.any():
                batch = batch.replace(labels=batch.labels.masked_fill(empty[:, None], IGNORE_INDEX))
        if len(self.sources) > 1:  # a mixture: the source of each target, for the per-source losses
            sizes = [[(s, self.seq_len) for s, _ in self._row(r)] for r in rows]
            batch = batch.replace(loss_groups=self._loss_groups(sizes, batch), loss_group_names=tuple(self.names))
        return batch

    @staticmethod
    def _loss_groups(sizes: list[list[tuple[int, int]]], batch: Batch) -> torch.Tensor:
        """The source of each target token; `sizes`: per row, (source, tokens) of its samples."""
        groups = torch.full_like(batch.input_ids, -1)
        for j, row in enumerate(sizes):
            g = np.repeat([s for s, _ in row], [n for _, n in row]).astype(np.int64)
            groups[j, :len(g)] = torch.from_numpy(g)
        return groups.masked_fill(batch.labels == IGNORE_INDEX, -1)

    def micro_batches(self, step, global_batch_size, dp_rank, dp_size, micro_batch_size) -> list[Batch]:
        per_rank = global_batch_size // dp_size
        first = step * global_batch_size + dp_rank * per_rank
        return [self.batch(list(range(lo, lo + micro_batch_size)))
                for lo in range(first, first + per_rank, micro_batch_size)]



def _names(entries: list[str]) -> list[str]:
    names = [Path(str(e).rstrip("/*")).stem or f"source{i}" for i, e in enumerate(entries)]
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


def build_user_data(cfg: Config, evaluation: bool = False, parts=None) -> UserData | None:
    """The training data, or (evaluation) the validation data (None when there is none);
    `parts`: the model's PartLayout when it has parts (they read the conversations' media)."""
    d = cfg.data
    if not d.path:
        raise ConfigError(f"data.dataset={d.dataset} needs config key 'data.path': a file, folder, glob or list of them")
    if evaluation and not d.eval_path and not d.eval_fraction:
        return None
    packed = d.dataset == "conversations"
    groups = [[e] for e in d.path] if d.weights else [list(d.path)]
    names = _names(d.path) if d.weights else ["data"]
    if evaluation and d.eval_path:
        groups, names = [list(d.eval_path)], ["eval"]
    sources = []
    spec = encode_spec(cfg, parts)
    mrope = bool(cfg.model.mrope_section)
    for entries in groups:
        shards = load_shards(cfg, entries, "data.eval_path" if evaluation and d.eval_path else "data.path", spec)
        make = (lambda keep, s=shards: TextWindows(s, d.seq_len, cfg.train.seed, keep)) if not packed else \
            (lambda keep, s=shards: Conversations(s, d.seq_len, d.truncate, d.strict, keep, spec.media, mrope))
        if d.eval_fraction and not d.eval_path:
            n = len(shards) if packed else len(make(None))
            train, held = split_holdout(n, d.eval_fraction, cfg.train.seed)
            sources.append(make(held if evaluation else train))
        else:
            sources.append(make(None))
    for s, name in zip(sources, names):
        if len(s) == 0:
            raise DataError(f"source {name!r} has no sample that fits data.seq_len={d.seq_len} (skipped: {s.skipped}); "
                            "raise data.seq_len or set data.truncate=true")
    pad_id = 0
    return UserData(sources, names, None if evaluation else d.weights, d.seq_len, cfg.train.seed, pad_id, packed,
                    evaluation=evaluation, parts=parts)


class PromptEncoder:
    """Conversations -> samples the model reads, as training builds them (media decoded,
    placeholders and positions for the model): for generation and evaluation.

        prompts = PromptEncoder(cfg)   # the training config: tokenizer, chat template, parts
        sample = prompts.sample(messages[:-1], base_dir)  # ends with the assistant's header
    """

    def __init__(self, cfg: Config):
        from .sources import dataset_parts

        if cfg.data.dataset != "conversations":
            raise ConfigError(f"config key 'data.dataset'={cfg.data.dataset!r}: prompts are built from a "
                              "conversations config (its tokenizer, chat template and model parts)")
        self.parts = dataset_parts(cfg)
        self.spec = encode_spec(cfg, self.parts)
        self.encoder = Encoder(self.spec)
        self.mrope = bool(cfg.model.mrope_section)

    def sample(self, messages, base_dir: str | Path = ".", add_generation_prompt: bool = True) -> OmniSample:
        ids, _, refs = encode_media_conversation(self.encoder.tokenizer, self.encoder.template, messages,
                                                 self.spec.media, Path(base_dir), "all",
                                                 add_generation_prompt=add_generation_prompt)
        payloads = load_payloads(refs, self.spec.media) if refs else {}
        ids, positions = model_ids(np.asarray(ids, dtype=np.int64), refs, self.spec.media, self.mrope)
        return OmniSample(ids.tolist(), [IGNORE_INDEX] * len(ids), payloads, positions)
