"""data.num_workers: BackgroundData builds the coming steps in spawned processes and gives
back exactly the in-process batches (payloads and media, skipped counts, after a jump),
re-raises a worker's error as the same exception, reports a killed worker instead of
hanging, and leaves no process behind; a short training run logs the same losses with and
without it."""

from __future__ import annotations

import functools
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine.batch import Batch
from engine.config import ConfigError, load_config
from engine.data.errors import DataError
from engine.data.workers import BackgroundData
from launch import ROOT, losses, train

CONFIG = str(ROOT / "examples" / "configs" / "sft_text.yaml")


# ---- a source defined here: spawned workers import this module by name (tests/ is on
# sys.path), so its imports stay light (engine.data.sources, which imports the models, is
# imported inside the tests that need it)
class _Unrebuildable(DataError):
    """A DataError subclass whose pickle does not rebuild (a required keyword argument)."""

    def __init__(self, message: str, *, where: str):
        super().__init__(message)
        self.where = where


class FakeSource:
    """Micro-batches of ids seeded by (step, rank), with a payload, an expanded position_ids
    and a view sharing the ids' storage; counts one skip at build and one per
    odd step it builds; `fail` maps a step to the error it raises."""

    def __init__(self, fail: dict | None = None, delay: float = 0.0, build_error: bool = False):
        if build_error:
            raise ConfigError("config key 'data.path' is missing: the fake source needs one")
        self.fail, self.delay = fail or {}, delay
        self.skipped = {"at_build": 1}

    def micro_batches(self, step, global_batch_size, dp_rank, dp_size, micro_batch_size):
        time.sleep(self.delay)
        kind = self.fail.get(step)
        if kind == "data":
            raise DataError(f"step {step}: data file x.jsonl line 7 is not JSON; fix it or set data.strict=false")
        if kind == "unrebuildable":
            raise _Unrebuildable(f"step {step}: an unreadable image", where="x.jsonl:3")
        if kind == "bug":
            raise KeyError(f"no field at step {step}")
        if step % 2:
            self.skipped["odd_step"] = self.skipped.get("odd_step", 0) + 1
        per_rank = global_batch_size // dp_size
        out = []
        for m in range(per_rank // micro_batch_size):
            g = torch.Generator().manual_seed(step * 1000 + dp_rank * 10 + m)
            ids = torch.randint(0, 500, (micro_batch_size, 16), generator=g)
            out.append(Batch(input_ids=ids, labels=ids.roll(-1, 1), token_mask=ids > 250,
                             payloads={"toy": {"readings": torch.randn(3, 5, generator=g, dtype=torch.float64),
                                               "lengths": ids[:, 0]}},  # a view of the ids
                             loss_group_names=("a", "b"), padding_tokens=step))
        return out

    def skipped_counts(self):
        return dict(self.skipped)


# ---- helpers -------------------------------------------------------------------------------
def assert_same(got, want, where="") -> None:
    """Equal tensors (torch.equal, dtype), dicts, lists and Batch fields."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), where
        assert got.stride() == want.stride(), where
    elif isinstance(want, Batch):
        assert isinstance(got, Batch), where
        for name in want.__dataclass_fields__:
            assert_same(getattr(got, name), getattr(want, name), f"{where}.{name}")
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for k in want:
            assert_same(got[k], want[k], f"{where}[{k}]")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert got == want, where


def alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by init, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def assert_gone(pids: list[int]) -> None:
    assert not any(alive(p) for p in pids), [p for p in pids if alive(p)]
    assert not set(pids) & {p.pid for p in multiprocessing.active_children()}


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    """A tiny transformers-saved Qwen2 with its tokenizer and chat template, and conversations."""
    from engine.data import ensure_corpus, load_documents
    from omni_datasets.sft_text import make as sft

    texts = list(load_documents(ensure_corpus(Path("~/.cache/omni-engine").expanduser())))[:300]
    return sft.make(tmp_path_factory.mktemp("sft"), texts, n_conversations=120)


def _conversations_config(sft_dir: Path, tmp: Path):
    keys = {"model.init_from": sft_dir / "qwen2_tiny", "data.cache_dir": tmp / "cache", "data.seq_len": 128,
            "data.path": f"[{sft_dir / 'conversations.jsonl'}, {sft_dir / 'conversations.parquet'}]",
            "data.weights": "[1, 2]", "data.eval_fraction": 0.0}  # a mixture: loss_groups too
    return load_config(CONFIG, [(k, str(v)) for k, v in keys.items()])


def _plugin_config(tmp: Path):
    """The sensor_parity dataset (data.plugins) feeding the toy_sensor part (model.plugins):
    payloads, and plugins the workers must import themselves."""
    model = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
             "num_kv_heads": 2, "plugins": [str(ROOT / "tests" / "plugins" / "toy_sensor.py")],
             "encoders": [{"name": "toy_sensor", "channels": 3, "width": 16}]}
    data = {"dataset": "sensor_parity", "plugins": [str(ROOT / "tests" / "plugins" / "sensor_parity_dataset.py")],
            "seq_len": 32, "global_batch_size": 8}
    (tmp / "sensor.yaml").write_text(yaml.safe_dump({"model": model, "data": data}))
    return load_config(str(tmp / "sensor.yaml"), [])


def _media_config(sft_dir: Path, tmp: Path):
    """Conversations with images and audio clips (decoded when rows are built); an image
    that changes after preparing makes each step that draws it skip and count it."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from engine.data.sources import build_train_data

    rng = np.random.default_rng(0)
    (tmp / "media").mkdir()
    for k, (h, w) in enumerate([(16, 16), (24, 16), (16, 32)]):
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(tmp / "media" / f"img{k}.png")
    for k, n in enumerate([8000, 12000]):
        sf.write(tmp / "media" / f"clip{k}.wav", (rng.standard_normal(n) * 3000).astype(np.int16), 16000)
    rows = []
    for k in range(24):
        media = {"type": "image", "image": f"media/img{k % 3}.png"} if k % 2 else \
            {"type": "audio", "audio": f"media/clip{k % 4 // 2}.wav"}
        rows.append({"messages": [{"role": "user", "content": [media, {"type": "text", "text": "Which digit?"}]},
                                  {"role": "assistant", "content": ("seven", "three five", "one")[k % 3]}]})
    (tmp / "media.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = {"vocab_size": 520, "hidden_size": 64, "intermediate_size": 128, "num_layers": 1, "num_heads": 4,
             "num_kv_heads": 2,
             "encoders": [{"name": "vision", "depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64,
                           "patch_size": 4, "in_channels": 1},
                          {"name": "audio", "num_mel_bins": 40, "d_model": 32, "encoder_layers": 1,
                           "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "max_source_positions": 100,
                           "pool_stride": 4}]}
    data = {"dataset": "conversations", "tokenizer": str(sft_dir / "qwen2_tiny"), "path": str(tmp / "media.jsonl"),
            "cache_dir": str(tmp / "cache"), "seq_len": 160, "global_batch_size": 8, "min_pixels": 64,
            "max_pixels": 512}
    (tmp / "media.yaml").write_text(yaml.safe_dump({"model": model, "data": data}))
    cfg = load_config(str(tmp / "media.yaml"), [])
    build_train_data(cfg)  # prepares the shards
    Image.fromarray(rng.integers(0, 256, (8, 24), dtype=np.uint8)).save(tmp / "media" / "img1.png")
    return cfg


# ---- batches -------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,workers", [("conversations", 1), ("media", 2), ("sensor_parity", 2)])
def test_batches_equal_the_in_process_source_and_after_a_jump(sft_dir, tmp_path, dataset, workers):
    """Text conversations (a mixture), conversations with images and audio (payloads; skips
    counted as steps are built), and a plugin dataset feeding a plugin part (the workers
    import both plugins)."""
    from engine.data.sources import build_train_data

    make = {"conversations": lambda: _conversations_config(sft_dir, tmp_path),
            "media": lambda: _media_config(sft_dir, tmp_path), "sensor_parity": lambda: _plugin_config(tmp_path)}
    cfg = make[dataset]()
    layout = (8, 1, 2, 2)  # global batch 8, this is dp rank 1 of 2, micro-batches of 2
    data = BackgroundData(functools.partial(build_train_data, cfg), workers, *layout)
    pids = data.pids
    ref = build_train_data(cfg)
    for step in [0, 1, 2, 3, 4, 5, 7, 8]:  # 7: a resume / jump re-targets the prefetch window
        got = data.micro_batches(step, *layout)
        assert_same(got, ref.micro_batches(step, *layout), f"step {step}")
        assert data.skipped_counts() == ref.skipped_counts()
    if dataset == "conversations":
        assert ref.skipped_counts()["too_long"] > 0 and got[0].loss_groups is not None
    elif dataset == "media":
        assert ref.skipped_counts()["changed"] > 1 and {"vision", "audio"} <= set(got[0].payloads)
    else:
        assert got[0].payloads["toy_sensor"]
    data.close()
    assert_gone(pids)
    data.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        data.micro_batches(9, *layout)


# ---- errors --------------------------------------------------------------------------------
def test_a_worker_error_is_raised_at_its_step_as_the_same_exception():
    fail = {3: "data", 5: "unrebuildable", 6: "bug"}
    data = BackgroundData(functools.partial(FakeSource, fail), 2, 4, 0, 1, 2, prefetch=3)
    ref = FakeSource(fail)
    for step in range(3):
        assert_same(data.micro_batches(step, 4, 0, 1, 2), ref.micro_batches(step, 4, 0, 1, 2), f"step {step}")
        assert data.skipped_counts() == ref.skipped_counts()
    with pytest.raises(DataError) as e:
        data.micro_batches(3, 4, 0, 1, 2)
    assert type(e.value) is DataError
    assert str(e.value) == "step 3: data file x.jsonl line 7 is not JSON; fix it or set data.strict=false"
    assert "in micro_batches" in str(e.value.__cause__)  # the worker's traceback
    with pytest.raises(DataError):
        ref.micro_batches(3, 4, 0, 1, 2)
    assert_same(data.micro_batches(4, 4, 0, 1, 2), ref.micro_batches(4, 4, 0, 1, 2))  # the source goes on
    with pytest.raises(DataError) as e:  # a subclass that does not pickle back: a DataError, same message
        data.micro_batches(5, 4, 0, 1, 2)
    assert str(e.value) == "step 5: an unreadable image"
    with pytest.raises(KeyError, match="no field at step 6"):
        data.micro_batches(6, 4, 0, 1, 2)
    # skipped: counted at build once (not once per worker), plus what each delivered step added
    # (step 1); odd steps the workers built ahead (7, 9) but nobody asked for are not counted
    for step in (5, 6):
        with pytest.raises((DataError, KeyError)):
            ref.micro_batches(step, 4, 0, 1, 2)
    assert data.skipped_counts() == {"at_build": 1, "odd_step": 1} == ref.skipped_counts()
    pids = data.pids
    del data, e  # collected without close() (the traceback held it too): the workers still go
    gc.collect()
    assert_gone(pids)


def test_a_build_error_is_raised_as_the_same_exception():
    data = BackgroundData(functools.partial(FakeSource, build_error=True), 1, 4, 0, 1, 2)
    with pytest.raises(ConfigError, match="^config key 'data.path' is missing: the fake source needs one$"):
        data.wait_ready()
    with pytest.raises(ConfigError):
        data.micro_batches(0, 4, 0, 1, 2)
    data.close()
    assert_gone(data.pids)


def test_a_killed_worker_is_a_data_error_not_a_hang():
    data = BackgroundData(functools.partial(FakeSource, delay=0.2), 2, 4, 0, 1, 2)
    data.micro_batches(0, 4, 0, 1, 2)
    os.kill(data.pids[1], signal.SIGKILL)
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"data worker 1 \(pid \d+\) died while building step \d+: killed by "
                                        r"signal SIGKILL \(exit code -9"):
        for step in range(1, 20):  # steps it had already sent may still arrive
            data.micro_batches(step, 4, 0, 1, 2)
    assert time.perf_counter() - t0 < 10
    assert_gone(data.pids)  # the failure closed the others
    with pytest.raises(DataError, match="data worker 1"):
        data.micro_batches(step + 1, 4, 0, 1, 2)


def test_a_build_callable_that_does_not_pickle_is_refused():
    with pytest.raises(TypeError, match="must pickle"):
        BackgroundData(lambda: FakeSource(), 1, 4, 0, 1, 2)


@pytest.mark.slow
def test_workers_exit_when_the_training_process_is_killed(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys\n"
        f"sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
        "if __name__ == '__main__':\n"
        "    from engine.data.workers import BackgroundData\n"
        "    from test_data_workers import FakeSource\n"
        "    data = BackgroundData(FakeSource, 2, 4, 0, 1, 2)\n"
        "    data.micro_batches(0, 4, 0, 1, 2)\n"
        "    print(*data.pids, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    pids = [int(p) for p in proc.stdout.split()]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(pids) == 2 and not any(alive(p) for p in pids)


# ---- training --------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_with_workers_logs_the_same_losses(sft_dir, tmp_path):
    keys = {"model.init_from": sft_dir / "qwen2_tiny", "data.path": sft_dir / "conversations.jsonl",
            "data.cache_dir": tmp_path / "cache", "data.seq_len": 128, "data.global_batch_size": 8,
            "data.micro_batch_size": 4, "data.eval_fraction": 0.1, "train.steps": 4, "train.eval_interval": 2,
            "train.tensorboard": False, "checkpoint.enabled": False}
    args = [f"--{k}={v}" for k, v in keys.items()]
    ref = train(tmp_path / "in_process", 1, *args, config=CONFIG)
    got = train(tmp_path / "workers", 1, *args, "--data.num_workers=2", config=CONFIG)
    assert losses(got) == losses(ref) and len(ref) == 4
    assert [r["data_skipped"] for r in got] == [r["data_skipped"] for r in ref]
    assert [r.get("eval_loss") for r in got] == [r.get("eval_loss") for r in ref]
