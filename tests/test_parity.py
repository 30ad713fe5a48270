"""One process vs FSDP vs HSDP on gloo: the same config and seed give the same losses."""

import pytest

from launch import assert_close, losses, train


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """5 fp32 steps on one process with no process group at all."""
    return train(tmp_path_factory.mktemp("ref"), 1, "--checkpoint.enabled=false")


def test_reference_learns(reference):
    trace = losses(reference)
    assert len(trace) == 5 and trace[-1] < trace[0] - 0.1


@pytest.mark.parametrize("nproc,overrides", [
    (2, ["--parallel.dp_shard=2"]),
    (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),
    # gradient accumulation and activation checkpointing must not change the numbers either
    (2, ["--data.micro_batch_size=2", "--parallel.activation_checkpointing=true"]),
], ids=["fsdp2", "hsdp2x2", "fsdp2-accum-ac"])
def test_fp32_loss_trace_matches_one_process(reference, tmp_path, nproc, overrides):
    records = train(tmp_path, nproc, "--checkpoint.enabled=false", *overrides)
    assert_close(losses(records), losses(reference), rel=1e-5)
    assert all(r["comm_bytes_excl_fsdp"] > 0 for r in records)  # the loss/token all-reduces went through engine.comm


def test_bf16_fsdp_matches_bf16_one_process(tmp_path):
    one = train(tmp_path / "one", 1, "--train.dtype=bf16", "--checkpoint.enabled=false")
    two = train(tmp_path / "two", 2, "--train.dtype=bf16", "--checkpoint.enabled=false")
    assert_close(losses(two), losses(one), rel=5e-3)
