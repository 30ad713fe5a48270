"""The Batch contract: per-position fields declared once, sliced by the parallel layer
without knowing any dataset's keys, whatever their leading dimensions."""

import dataclasses

import pytest
import torch

from engine.batch import IGNORE_INDEX, NEW_DOCUMENT, Batch
from engine.parallel.ulysses import shard_batch


def _batch(rows=2, seq=7, mrope=False) -> Batch:
    ids = torch.arange(rows * seq).reshape(rows, seq) + 10
    doc = torch.tensor([[0] * 3 + [1] * (seq - 3)] * rows)
    pos = torch.stack([torch.arange(seq)] * rows)
    if mrope:  # Qwen2-VL-style multimodal positions: (temporal, height, width) per token
        pos = torch.stack([pos, pos * 2, pos * 3])
    return Batch(input_ids=ids, labels=ids + 1, position_ids=pos, doc_ids=doc,
                 ph_index=torch.full_like(ids, -1), payloads={"vision": {"pixel_values": torch.ones(4, 3)}},
                 padding_tokens=3)


def test_every_per_position_field_declares_its_padding():
    fields = {f.name: f.metadata["pad"] for f in Batch.sequence_fields()}
    assert fields == {"input_ids": 0, "labels": IGNORE_INDEX, "position_ids": 0, "doc_ids": NEW_DOCUMENT,
                      "token_mask": False, "ph_index": -1, "dec_next_index": -1, "dec_next_part": -1, "loss_groups": -1}
    assert IGNORE_INDEX == -100 and {f.name for f in dataclasses.fields(Batch)} - set(fields) == {
        "payloads", "padding_tokens", "attn_meta", "true_seq_len", "loss_group_names"}


@pytest.mark.parametrize("mrope", [False, True], ids=["positions[B,S]", "positions[3,B,S]"])
def test_shards_concatenate_to_the_padded_batch(mrope):
    """seq 7 over sp 4: padded to 8 with each field's declared value, then 2 positions per
    rank; [3, B, S] positions are sliced on their last dimension like everything else."""
    batch, sp = _batch(mrope=mrope), 4
    shards = [shard_batch(batch, r, sp) for r in range(sp)]
    for name in ("input_ids", "labels", "position_ids", "doc_ids", "ph_index", "token_mask"):
        joined = torch.cat([getattr(s, name) for s in shards], dim=-1)
        assert joined.shape[:-1] == (batch[name].shape[:-1] if name != "token_mask" else (2,))
        assert joined.shape[-1] == 8
        if name != "token_mask":
            assert torch.equal(joined[..., :7], batch[name]), name
    last = {name: torch.cat([getattr(s, name) for s in shards], dim=-1)[..., 7] for name in
            ("input_ids", "labels", "position_ids", "ph_index", "token_mask", "doc_ids")}
    assert (last["input_ids"] == 0).all() and (last["labels"] == IGNORE_INDEX).all()
    assert (last["position_ids"] == 0).all() and (last["ph_index"] == -1).all() and not last["token_mask"].any()
    assert (last["doc_ids"] == 2).all()  # padding is a document of its own
    assert all(s.payloads is batch.payloads and s.true_seq_len == 7 and s.padding_tokens == 3 for s in shards)
    assert shards[0].attn_meta.doc_ids.shape == (2, 8)


def test_unset_optional_fields_stay_unset_and_defaults_fill_in():
    ids = torch.tensor([[5, 6, 7]])
    b = Batch(input_ids=ids)
    assert torch.equal(b.labels, torch.full_like(ids, IGNORE_INDEX))
    assert torch.equal(b.position_ids, torch.tensor([[0, 1, 2]])) and torch.equal(b.doc_ids, torch.zeros_like(ids))
    assert b.ph_index is None and "ph_index" not in b and set(b) == {"input_ids", "labels", "position_ids", "doc_ids"}
    shard = shard_batch(b, 1, 3)
    assert shard.ph_index is None and torch.equal(shard.input_ids, torch.tensor([[6]]))
    with pytest.raises(KeyError):
        b["not_a_field"]
