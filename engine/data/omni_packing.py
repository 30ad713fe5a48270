"""Omni samples -> packed rows -> micro-batches the omni model consumes.

A sample is text token ids (with placeholder ids where a part's embeddings go), aligned
next-token labels, and per part the list of payloads in placeholder order. Samples are
packed whole into rows of `seq_len` (a sample is never split across rows; one that does
not fit on its own is rejected by the caller), each sample its own document (positions
restart, attention is masked at the boundary), and the rest of the row is padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from engine.batch import IGNORE_INDEX, Batch
from engine.models.omni import placeholder_layout


@dataclass
class OmniSample:
    tokens: list[int]
    labels: list[int]
    payloads: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    positions: Optional[np.ndarray] = None  # [3, len] multimodal rotary positions (M-RoPE models); None: 0..len-1

    def __len__(self) -> int:
        return len(self.tokens)


def pack_rows(samples: list[list[OmniSample]], seq_len: int, pad_id: int, ph: dict[str, int],
              decoders: list[str], parts: dict) -> Batch:
    """One micro-batch from rows of samples: tensors [rows, seq_len] + collated payloads.

    `parts` maps a part name to its class (for `collate`). Raises ValueError when a
    sample's placeholder count disagrees with its payloads (names the part and counts).
    """
    rows = len(samples)
    ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((rows, seq_len), dtype=torch.long)
    doc = torch.zeros((rows, seq_len), dtype=torch.long)
    payloads: dict[str, list] = {}
    real_tokens = 0
    mrope = any(s.positions is not None for row in samples for s in row)
    pos3 = torch.zeros((3, rows, seq_len), dtype=torch.long) if mrope else None
    for r, row in enumerate(samples):
        at = 0
        for d, sample in enumerate(row):
            n = len(sample)
            assert at + n <= seq_len, "rows are filled by the caller within seq_len"
            ids[r, at:at + n] = torch.tensor(sample.tokens)
            labels[r, at:at + n] = torch.tensor(sample.labels)
            pos[r, at:at + n] = torch.arange(n)
            if mrope:
                assert sample.positions is not None, "a row mixes samples with and without M-RoPE positions"
                pos3[:, r, at:at + n] = torch.from_numpy(np.asarray(sample.positions, dtype=np.int64))
            doc[r, at:at + n] = d
            for name, items in sample.payloads.items():
                payloads.setdefault(name, []).extend(items)
            at += n
            real_tokens += n
        doc[r, at:] = len(row)  # padding: a document of its own
    for name, pid in ph.items():
        found = int((ids == pid).sum())
        part = parts[name]
        expected = sum(part.num_tokens(p) for p in payloads.get(name, []))
        if found != expected:
            raise ValueError(f"part {name!r}: {found} placeholder tokens but its payloads need {expected}")
    return Batch(input_ids=ids, labels=labels, position_ids=pos3 if mrope else pos, doc_ids=doc,
                 **placeholder_layout(ids, doc, ph, decoders),
                 payloads={name: type(parts[name]).collate(items) for name, items in payloads.items() if items},
                 padding_tokens=rows * seq_len - real_tokens)


def micro_batches_of_rows(row: Callable[[int, int], list[OmniSample]], step: int, global_batch_size: int,
                          dp_rank: int, dp_size: int, micro_batch_size: int, seq_len: int, pad_id: int,
                          ph: dict[str, int], decoders: list[str], parts: dict) -> list[Batch]:
    """This dp rank's packed micro-batches of `step`, where `row(step, r)` gives the samples
    of global row r: the global batch depends only on (step, row), never on the layout."""
    per_rank = global_batch_size // dp_size
    first = dp_rank * per_rank
    return [pack_rows([row(step, r) for r in range(lo, lo + micro_batch_size)], seq_len, pad_id, ph, decoders, parts)
            for lo in range(first, first + per_rank, micro_batch_size)]


def fill_rows(stream, num_rows: int, seq_len: int) -> tuple[list[list[OmniSample]], int]:
    """Greedy first-fit packing of samples from an iterator into `num_rows` rows.
    Returns the rows and how many samples were skipped for being longer than seq_len."""
    rows: list[list[OmniSample]] = [[] for _ in range(num_rows)]
    used = [0] * num_rows
    skipped = 0
    for r in range(num_rows):
        while True:
            sample = next(stream)
            if len(sample) > seq_len:
                skipped += 1
                continue
            if used[r] + len(sample) > seq_len:
                stream.push_back(sample)
                break
            rows[r].append(sample)
            used[r] += len(sample)
    return rows, skipped


class PushBackIterator:
    def __init__(self, it):
        self.it, self.buffer = iter(it), []

    def __iter__(self):
        return self

    def __next__(self):
        return self.buffer.pop() if self.buffer else next(self.it)

    def push_back(self, item) -> None:
        self.buffer.append(item)
