"""Checkpoint resume parity and checkpoint error handling."""

import shutil

import pytest

from launch import assert_close, losses, train


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return out, train(out, 1, "--train.steps=6", "--checkpoint.interval=3")


def _copy_step3(src, dst):
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(src / "checkpoints" / "step_00000003", dst / "checkpoints" / "step_00000003")


def test_resume_continues_exactly(uninterrupted, tmp_path):
    """Stop after 3 steps (only the step-3 checkpoint survives), resume with auto to step 6."""
    src, full = uninterrupted
    _copy_step3(src, tmp_path)
    resumed = train(tmp_path, 1, "--train.steps=6", "--checkpoint.interval=3", "--checkpoint.resume=auto")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert_close(losses(resumed), losses(full)[3:], rel=1e-6)
    assert [r["lr"] for r in resumed] == [r["lr"] for r in full[3:]]  # LR schedule restored


def test_resume_reshards_onto_two_ranks(uninterrupted, tmp_path):
    """A one-process checkpoint resumes under FSDP on 2 ranks (DCP reshards on load)."""
    src, full = uninterrupted
    _copy_step3(src, tmp_path)
    resumed = train(tmp_path, 2, "--train.steps=6", "--checkpoint.interval=3")
    assert_close(losses(resumed), losses(full)[3:], rel=1e-5)


def test_incomplete_checkpoint_is_skipped_by_auto(uninterrupted, tmp_path):
    src, full = uninterrupted
    _copy_step3(src, tmp_path)
    broken = tmp_path / "checkpoints" / "step_00000005"
    shutil.copytree(src / "checkpoints" / "step_00000006", broken)
    (broken / "COMPLETE").unlink()  # a crash while saving step 5
    resumed = train(tmp_path, 1, "--train.steps=6", "--checkpoint.interval=3")
    assert [r["step"] for r in resumed] == [4, 5, 6]


def test_corrupt_checkpoint_is_a_clear_error(uninterrupted, tmp_path):
    src, _ = uninterrupted
    _copy_step3(src, tmp_path)
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    for shard in ckpt.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    out = train(tmp_path, 1, "--train.steps=6", expect_rc=2)[0]["stderr"]
    assert "Traceback" not in out
    assert "step_00000003" in out and "could not be loaded" in out and "checkpoint.resume" in out


def test_resume_from_checkpoint_of_another_model_is_a_clear_error(uninterrupted, tmp_path):
    src, _ = uninterrupted
    _copy_step3(src, tmp_path)
    out = train(tmp_path, 1, "--train.steps=6", "--model.hidden_size=128", expect_rc=2)[0]["stderr"]
    assert "step_00000003" in out and "could not be loaded" in out


def test_explicit_incomplete_checkpoint_dir_is_refused(uninterrupted, tmp_path):
    src, _ = uninterrupted
    target = tmp_path / "partial"
    shutil.copytree(src / "checkpoints" / "step_00000003", target)
    (target / "COMPLETE").unlink()
    out = train(tmp_path, 1, f"--checkpoint.resume={target}", expect_rc=2)[0]["stderr"]
    assert "not a complete checkpoint" in out and str(target) in out
