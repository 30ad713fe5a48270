"""Packed pretraining sequences with document boundaries, and deterministic batches.

The corpus is tokenized once into one flat ``int32`` stream, every document followed by
EOS. Sequence ``i`` is simply the window ``tokens[i*L : i*L + L + 1]`` (``L`` = seq_len):
no padding, no tokens thrown away. Because a window spans several documents, each one
carries what the model needs to keep them apart:

- ``labels``: the next token, or -100 (ignored by the loss) where the next token
  belongs to another document, so the model is never asked to predict across a
  document boundary;
- ``position_ids``: restart at 0 at every document start (and at the window start);
- ``doc_ids``: 0 for the first document piece of the window, +1 at each document start,
  for block-diagonal causal masks (and ``cu_seqlens_from_doc_ids`` for varlen kernels).

Batches are a pure function of (seed, step, global_batch_size, seq_len): the global
batch of a step is drawn from a per-epoch permutation, and a data-parallel rank only
takes its contiguous slice of it. The number of ranks therefore changes who computes
which sequence, never which sequences are trained on, so every parallel layout sees
identical data and resuming at step k replays exactly what an uninterrupted run would.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.ops.attention import cu_seqlens_from_doc_ids  # noqa: F401  (re-exported)

from engine.data.cache import build_once
from engine.data.corpus import load_documents
from engine.batch import IGNORE_INDEX, Batch
from engine.config import ConfigError
from engine.data.token_shards import ConcatArray
from engine.data.tokenizer import Tokenizer



# ------------------------------------------------------------------ token cache


def load_or_tokenize(cache_dir: str | Path, tokenizer: Tokenizer, corpus_path: str | Path) -> np.ndarray:
    """The whole corpus as one flat ``int32`` token array (each document + EOS).

    Cached as ``<cache_dir>/tokens_<tokenizer.cache_tag>.npy`` (lock + atomic write, so every
    rank may call this at once) and memory-mapped on load. Document starts are not
    stored: they are recomputed from the EOS positions (``doc_starts_from_eos``).
    """
    path = Path(cache_dir) / f"tokens_{tokenizer.cache_tag}.npy"

    def build(tmp: Path) -> None:
        docs = tokenizer.encode_batch(load_documents(corpus_path))
        eos = [tokenizer.eos_id]
        flat = np.concatenate([np.asarray(doc + eos, dtype=np.int32) for doc in docs])
        with open(tmp, "wb") as f:
            np.save(f, flat)

    build_once(path, build)
    fix = "delete it so that it is rebuilt"
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"token cache {path} is unreadable ({e}); {fix}") from None
    if tokens.dtype != np.int32 or tokens.ndim != 1 or len(tokens) == 0:
        raise ValueError(f"token cache {path} is not a 1-D int32 array; {fix}")
    if tokens[-1] != tokenizer.eos_id:
        raise ValueError(f"token cache {path} does not end with EOS (a different tokenizer?); {fix}")
    return tokens


def doc_starts_from_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Start offsets of the documents: 0, then one past every EOS (except the last)."""
    after_eos = np.flatnonzero(np.asarray(tokens) == eos_id) + 1
    after_eos = after_eos[after_eos < len(tokens)]
    return np.concatenate([[0], after_eos]).astype(np.int64)


# ---------------------------------------------------------------------- dataset


class PackedTextDataset:
    """Fixed-length windows over a flat token stream, with document boundaries."""

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, seq_len: int, seed: int):
        tokens = tokens if isinstance(tokens, (np.ndarray, ConcatArray)) else np.asarray(tokens)  # keep memmaps
        doc_starts = np.asarray(doc_starts, dtype=np.int64)
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be positive")
        if len(tokens) < seq_len + 1:
            raise ConfigError(
                f"config key 'data.seq_len'={seq_len}: the corpus has {len(tokens)} tokens, fewer than one sequence of "
                f"seq_len + 1 = {seq_len + 1}; lower data.seq_len"
            )
        if seed < 0:
            raise ValueError(f"seed={seed} must be non-negative")
        assert tokens.ndim == 1, "tokens must be a flat array"
        assert len(doc_starts) > 0 and doc_starts[0] == 0, "the first document starts at 0"
        assert np.all(np.diff(doc_starts) > 0) and doc_starts[-1] < len(tokens), "bad doc_starts"
        self.tokens = tokens
        self.doc_starts = doc_starts
        self.seq_len = seq_len
        self.seed = seed
        self.num_sequences = (len(tokens) - 1) // seq_len
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Sequence ``i``: ``input_ids``, ``labels``, ``position_ids``, ``doc_ids`` (int64)."""
        if not 0 <= i < self.num_sequences:
            raise IndexError(f"sequence {i} out of range [0, {self.num_sequences})")
        L, start = self.seq_len, i * self.seq_len
        window = np.asarray(self.tokens[start : start + L + 1], dtype=np.int64)
        pos = np.arange(start, start + L + 1)
        doc = np.searchsorted(self.doc_starts, pos, side="right") - 1  # document of each token
        labels = np.where(doc[1:] == doc[:-1], window[1:], IGNORE_INDEX)
        doc_in = doc[:-1]
        # Position within the document, counting from the window start for the piece of
        # a document that began before this window.
        position_ids = pos[:-1] - np.maximum(self.doc_starts[doc_in], start)
        return {
            "input_ids": window[:-1],
            "labels": labels,
            "position_ids": position_ids,
            "doc_ids": doc_in - doc_in[0],
        }

    def _permutation(self, epoch: int) -> np.ndarray:
        """Order of the sequences in ``epoch``, a pure function of (seed, epoch)."""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            if len(self._perm_cache) >= 2:  # steps walk forward: keep current + next epoch
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = perm
        return perm

    def global_batch_indices(self, step: int, global_batch_size: int) -> list[int]:
        """Sequence indices of the global batch of optimizer step ``step`` (0-based).

        The stream of samples is epoch 0's permutation, then epoch 1's, and so on; step
        ``s`` takes samples ``[s*G, (s+1)*G)`` of it, so a batch may straddle two epochs.
        """
        assert step >= 0 and global_batch_size > 0
        first = step * global_batch_size
        n = self.num_sequences
        out: list[int] = []
        for sample in range(first, first + global_batch_size):
            out.append(int(self._permutation(sample // n)[sample % n]))
        return out

    def epoch_of_step(self, step: int, global_batch_size: int) -> float:
        """Fractional epoch reached after ``step`` steps (for logging)."""
        return step * global_batch_size / self.num_sequences


def micro_batches(
    dataset: PackedTextDataset,
    step: int,
    global_batch_size: int,
    dp_rank: int,
    dp_size: int,
    micro_batch_size: int,
) -> list[Batch]:
    """This data-parallel rank's micro-batches for optimizer step ``step``.

    The rank takes the contiguous slice ``[dp_rank*n, (dp_rank+1)*n)`` of the global
    batch (``n = global_batch_size // dp_size``) and cuts it into micro-batches of
    ``micro_batch_size``; each a `Batch` of ``torch.long`` tensors ``[micro, seq_len]``.
    Concatenating all ranks' micro-batches in rank order gives the global batch.
    """
    assert global_batch_size % dp_size == 0, "global batch must split evenly over dp ranks"
    per_rank = global_batch_size // dp_size
    assert per_rank % micro_batch_size == 0, "per-rank batch must split into whole micro-batches"
    assert 0 <= dp_rank < dp_size
    indices = dataset.global_batch_indices(step, global_batch_size)
    mine = indices[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    batches = []
    for lo in range(0, per_rank, micro_batch_size):
        samples = [dataset[i] for i in mine[lo : lo + micro_batch_size]]
        batches.append(Batch(**{key: torch.from_numpy(np.stack([s[key] for s in samples])).long()
                                for key in samples[0]}))
    return batches
