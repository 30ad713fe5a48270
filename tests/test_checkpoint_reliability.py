"""Checkpoints that are damaged, bounded (keep_last) and written asynchronously (async_save).

Damaged checkpoints (truncated, corrupt, unreadable) are skipped by checkpoint.resume=auto for
the previous intact one; a checkpoint that does not fit the config is always an error. Runs
train the tiny dense model in this process (a run of 6 steps takes about a second).
"""

import json
import logging
import shutil

import pytest
import torch

from launch import assert_close, losses, train

from engine.checkpoint import CheckpointError
from engine.config import ConfigError, load_config
from engine.training.trainer import run_training

TINY = "examples/configs/tiny_dense.yaml"


def run(out, *overrides: str, steps: int = 6, interval: int = 2) -> list[dict]:
    pairs = [("train.output_dir", str(out)), ("train.steps", str(steps)), ("checkpoint.interval", str(interval)),
             ("train.progress_bar", "false")] + [tuple(o.split("=", 1)) for o in overrides]
    return run_training(load_config(TINY, pairs))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("full")
    return out, run(out)


def _stopped_at_4(src, dst):
    """A run that stopped after step 4: its checkpoints of steps 2 and 4."""
    for step in (2, 4):
        shutil.copytree(src / "checkpoints" / f"step_{step:08d}", dst / "checkpoints" / f"step_{step:08d}")
    return dst / "checkpoints" / "step_00000004"


def _shard(ckpt):
    return next(ckpt.glob("*.distcp"))


def _steps(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _skipped_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]


@pytest.mark.parametrize("damage", ["truncated_shard", "truncated_shard_no_manifest", "bad_rng_no_manifest"])
def test_damaged_latest_falls_back_to_previous(full, tmp_path, caplog, damage):
    """Without MANIFEST.json (a checkpoint of an older version) DCP's index or loading itself
    tells: after a model already half loaded from the damaged one (bad_rng), which the
    fallback's load overwrites."""
    src, ref = full
    latest = _stopped_at_4(src, tmp_path)
    broken = _shard(latest) if damage.startswith("truncated") else latest / "rng_rank0.pt"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    if damage.endswith("no_manifest"):
        (latest / "MANIFEST.json").unlink()
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint.manager"):
        resumed = run(tmp_path)
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert_close(losses(resumed), losses(ref)[2:], rel=1e-6)
    (warning,) = _skipped_warnings(caplog)
    assert "step_00000004" in warning and broken.name in warning


def test_flipped_bytes_are_caught_by_the_manifest(full, tmp_path, caplog):
    """Same size, other contents: only the checksum sees it (DCP would load the garbage)."""
    src, ref = full
    shard = _shard(_stopped_at_4(src, tmp_path))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint.manager"):
        resumed = run(tmp_path)
    assert_close(losses(resumed), losses(ref)[2:], rel=1e-6)
    (warning,) = _skipped_warnings(caplog)
    assert "step_00000004" in warning and "sha256" in warning


def test_explicit_damaged_checkpoint_is_a_one_line_error(full, tmp_path):
    src, _ = full
    latest = _stopped_at_4(src, tmp_path)
    (latest / "rng_rank0.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError) as e:
        run(tmp_path / "other", f"checkpoint.resume={latest}")
    msg = str(e.value)
    assert "\n" not in msg and str(latest) in msg and "damaged" in msg and "checkpoint.resume" in msg


def test_all_damaged_is_an_error_not_a_fresh_start(full, tmp_path):
    src, _ = full
    latest = _stopped_at_4(src, tmp_path)
    for ckpt in (latest, latest.parent / "step_00000002"):
        (ckpt / ".metadata").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        run(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "step_00000004" in msg and "step_00000002" in msg and "checkpoint.resume=none" in msg


def test_checkpoint_of_another_config_is_an_error_not_a_fallback(full, tmp_path, caplog):
    src, _ = full
    _stopped_at_4(src, tmp_path)
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint.manager"), pytest.raises(CheckpointError) as e:
        run(tmp_path, "model.hidden_size=128")
    msg = str(e.value)
    assert "\n" not in msg and "step_00000004" in msg and "does not fit" in msg and "shape" in msg
    assert not _skipped_warnings(caplog)  # the older checkpoint was not tried instead
    with pytest.raises(CheckpointError, match="step_00000004.*does not fit.*model.blocks.1"):
        run(tmp_path, "model.num_layers=1")  # a checkpoint with more layers: not a partial load


def test_incomplete_checkpoint_is_ignored_and_removed(full, tmp_path):
    src, ref = full
    latest = _stopped_at_4(src, tmp_path)
    (latest / "COMPLETE").unlink()  # a crash while saving step 4
    resumed = run(tmp_path, "checkpoint.interval=3")
    assert [r["step"] for r in resumed] == [3, 4, 5, 6]
    assert_close(losses(resumed), losses(ref)[2:], rel=1e-6)
    # the stale step 4 (older than the new complete step 6) is gone; 3 was saved anew
    assert _steps(tmp_path) == ["step_00000002", "step_00000003", "step_00000006"]


def test_keep_last_keeps_the_newest(tmp_path):
    run(tmp_path, "checkpoint.keep_last=2", interval=1)
    assert _steps(tmp_path) == ["step_00000005", "step_00000006"]
    assert all((tmp_path / "checkpoints" / s / "COMPLETE").is_file() for s in _steps(tmp_path))
    with pytest.raises(ConfigError, match="checkpoint.keep_last.*-1") as e:
        load_config(TINY, [("checkpoint.keep_last", "-1")])
    assert "\n" not in str(e.value)


def test_keep_last_after_a_fallback_keeps_the_new_checkpoint(full, tmp_path):
    """Resumed from step 2 past a damaged step 4: with keep_last=1 the new step 3 replaces step 2;
    the newer (damaged) step 4 does not count and is left alone."""
    src, _ = full
    latest = _stopped_at_4(src, tmp_path)
    (latest / ".metadata").write_bytes(b"")
    run(tmp_path, "checkpoint.keep_last=1", steps=3, interval=1)
    assert _steps(tmp_path) == ["step_00000003", "step_00000004"]


def _contents(ckpt, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt, tmp_path / f"{ckpt.name}.pt")
    state = torch.load(tmp_path / f"{ckpt.name}.pt", weights_only=False)
    state["trainer"].pop("config")  # differs in checkpoint.async_save itself
    return state


def test_async_save_equals_sync(full, tmp_path):
    src, ref = full
    out = tmp_path / "async"
    records = run(out, "checkpoint.async_save=true")
    assert losses(records) == losses(ref)
    assert all("save_s" in r for r in records if r["step"] % 2 == 0)
    for step in ("step_00000004", "step_00000006"):  # the last one is complete when training returns
        ckpt = out / "checkpoints" / step
        assert (ckpt / "COMPLETE").is_file() and json.loads((ckpt / "MANIFEST.json").read_text())["files"]
        got, want = _contents(ckpt, tmp_path), _contents(src / "checkpoints" / step, tmp_path)
        flat_got, flat_want = _flat(got), _flat(want)
        assert flat_got.keys() == flat_want.keys()
        for key, value in flat_want.items():
            assert torch.equal(flat_got[key], value) if isinstance(value, torch.Tensor) else flat_got[key] == value, key
    (out / "checkpoints" / "step_00000006" / "COMPLETE").unlink()
    resumed = run(out, steps=6)  # from the asynchronous step 4
    assert_close(losses(resumed), losses(ref)[4:], rel=1e-6)


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix: tree}


@pytest.mark.slow
def test_two_ranks_async_save_keep_last_and_fallback(full, tmp_path):
    """gloo, 2 ranks: async saves with keep_last; each rank hashes a share of the files on resume
    and both agree to skip a checkpoint whose rank-1 shard is truncated."""
    _, ref = full
    records = train(tmp_path, 2, "--train.steps=4", "--checkpoint.interval=1", "--checkpoint.async_save=true",
                    "--checkpoint.keep_last=2")
    assert_close(losses(records), losses(ref)[:4], rel=1e-5)
    assert _steps(tmp_path) == ["step_00000003", "step_00000004"]
    shard = tmp_path / "checkpoints" / "step_00000004" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    (tmp_path / "metrics.jsonl").unlink()  # only the resumed run's records: none if it took step 4
    resumed = train(tmp_path, 2, "--train.steps=4", "--checkpoint.interval=2")
    assert [r["step"] for r in resumed] == [4]
    assert_close(losses(resumed), losses(ref)[3:4], rel=1e-5)
