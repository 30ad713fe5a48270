"""The Batch: one typed definition of what a training micro-batch carries.

A data source yields Batches; the parallel layer slices them along the sequence (Ulysses
SP) knowing only these declarations, never a dataset's keys; models read them. Every
per-position tensor is declared here once, with the value that pads it and its sequence
dimension (the last one, so `[B, S]` ids and `[3, B, S]` multimodal positions slice alike).

The ignore label (a position that is no target) is `IGNORE_INDEX`, defined here only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["IGNORE_INDEX", "NEW_DOCUMENT", "Batch"]

IGNORE_INDEX = -100
NEW_DOCUMENT = object()  # pad value of doc_ids: padding is a document of its own


def _per_position(pad):
    return field(default=None, metadata={"pad": pad})


@dataclass
class Batch:
    """A packed micro-batch: rows of `seq_len` positions, several documents per row.

    Per-position fields are `[..., B, S]` tensors (sequence last). `payloads` maps a model
    part's name to its collated payload (whole, never sliced: under SP every rank of the
    group holds the same payloads). `padding_tokens` counts positions that hold no sample.
    The parallel layer sets `attn_meta` (the whole sequence's document layout) and
    `true_seq_len` when it keeps only a shard of each row.
    """

    input_ids: torch.Tensor = _per_position(0)  # token ids [B, S]
    labels: torch.Tensor = _per_position(IGNORE_INDEX)  # next-token targets, IGNORE_INDEX where none
    position_ids: torch.Tensor = _per_position(0)  # rotary positions [B, S], or [3, B, S] for multimodal RoPE
    doc_ids: torch.Tensor = _per_position(NEW_DOCUMENT)  # document index within the row
    token_mask: Optional[torch.Tensor] = _per_position(False)  # False where the parallel layer padded
    ph_index: Optional[torch.Tensor] = _per_position(-1)  # a placeholder's index in its part's payload order
    dec_next_index: Optional[torch.Tensor] = _per_position(-1)  # which code of a decoder the next position holds
    dec_next_part: Optional[torch.Tensor] = _per_position(-1)  # which decoder that code belongs to
    loss_groups: Optional[torch.Tensor] = _per_position(-1)  # the data source of each target (a mixture)
    payloads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    loss_group_names: tuple = ()  # names of the loss_groups values: models also sum the loss per group
    padding_tokens: int = 0
    attn_meta: Any = None
    true_seq_len: Optional[int] = None

    def __post_init__(self) -> None:
        assert self.input_ids is not None, "a Batch needs input_ids"
        if self.labels is None:
            self.labels = torch.full_like(self.input_ids, IGNORE_INDEX)
        if self.position_ids is None:
            rows, seq = self.input_ids.shape
            self.position_ids = torch.arange(seq, device=self.input_ids.device)[None].expand(rows, seq)
        if self.doc_ids is None:
            self.doc_ids = torch.zeros_like(self.input_ids)

    @classmethod
    def sequence_fields(cls) -> list[dataclasses.Field]:
        """The declared per-position fields (with `metadata["pad"]`)."""
        return [f for f in dataclasses.fields(cls) if "pad" in f.metadata]

    def replace(self, **changes) -> "Batch":
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device) -> "Batch":
        device = torch.device(device)

        def move(v: torch.Tensor) -> torch.Tensor:
            # host -> GPU copies are asynchronous only from pinned (page-locked) memory
            if device.type == "cuda" and v.device.type == "cpu":
                v = v.pin_memory()
            return v.to(device, non_blocking=True)

        moved = {k: move(v) for k, v in self.items()}
        payloads = {name: {k: move(v) for k, v in p.items()} for name, p in self.payloads.items()}
        return self.replace(**moved, payloads=payloads)

    # Read access as a mapping, as for the dicts batches used to be: `batch["labels"]` for
    # any field; iteration, keys(), values() and items() over the per-position tensors set.
    def __getitem__(self, name: str):
        if name not in _FIELD_NAMES:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default=None):
        value = getattr(self, name) if name in _FIELD_NAMES else None
        return default if value is None else value

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def keys(self) -> list[str]:
        return [f.name for f in self.sequence_fields() if getattr(self, f.name) is not None]

    def __iter__(self):
        return iter(self.keys())

    def values(self) -> list[torch.Tensor]:
        return [getattr(self, k) for k in self.keys()]

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return [(k, getattr(self, k)) for k in self.keys()]


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Batch))
