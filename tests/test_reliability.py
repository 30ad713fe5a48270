"""Reliability: exact resume (also of an extended run), metrics.jsonl cut back on resume,
non-finite steps skipped and a diverged run stopped, SIGTERM = checkpoint and exit 0, worker
crashes under torchrun restarts, and checkpoints resharded across world sizes.

Faults come from outside the engine: a killed run is an exception raised in place of a step
(in process), or the test-only data plugin tests/plugins/fault_injection.py, driven by
environment variables, under pretrain_omni.py and torchrun.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import pretrain_omni
from engine.comm import DistContext
from engine.config import ConfigError, load_config
from engine.training.metrics import truncate_metrics
from engine.training.trainer import Trainer
from launch import ROOT, TINY, assert_close, losses

CPU = DistContext(0, 1, 0, torch.device("cpu"), "none")
FAULTS = str(ROOT / "tests" / "plugins" / "fault_injection.py")
FAULTY = (("data.plugins", f"[{FAULTS}]"), ("data.dataset", "shakespeare_faults"))  # shakespeare when no env is set
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))


def _trainer(out, steps, *overrides):
    cfg = load_config(TINY, [("train.steps", str(steps)), ("train.progress_bar", "false"),
                               ("train.tensorboard", "false"), ("train.output_dir", str(out)), *overrides])
    return Trainer(cfg, CPU)


def _fit(out, steps, *overrides):
    trainer = _trainer(out, steps, *overrides)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _checkpoints(out):
    root = out / "checkpoints"
    return sorted(int(p.name.split("_")[1]) for p in root.glob("step_*") if (p / "COMPLETE").is_file()) \
        if root.is_dir() else []


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 3 and 6): its records."""
    return _fit(tmp_path_factory.mktemp("straight"), 6, ("checkpoint.interval", "3"))


# ---- 1. exact resume ---------------------------------------------------------------------
def test_extended_run_follows_the_longer_schedule(straight, tmp_path):
    """3 steps, then the same output_dir resumed with train.steps=6: steps 4-6 equal the
    straight 6-step run's exactly, learning rate included (not the 3-step schedule's end)."""
    first = _fit(tmp_path, 3)
    assert _checkpoints(tmp_path) == [3]
    resumed = _fit(tmp_path, 6)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight[3:]]
    cfg = load_config(TINY)
    assert resumed[0]["lr"] > cfg.train.lr * cfg.train.min_lr_ratio  # where the 3-step schedule ended
    assert losses(first) == losses(straight[:3]) and losses(resumed) == losses(straight[3:])
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


class Killed(Exception):
    pass


def test_killed_run_resumes_exactly_and_metrics_are_cut_back(straight, tmp_path):
    """A 6-step run killed during step 5 (checkpoint at 3, metrics up to 4) resumes at 3:
    metrics.jsonl then holds every step once and the losses equal the uninterrupted run's."""
    trainer = _trainer(tmp_path, 6, ("checkpoint.interval", "3"))
    step = trainer.train_step

    def step_or_die():
        if trainer.step == 4:
            raise Killed
        return step()

    trainer.train_step = step_or_die
    with pytest.raises(Killed):
        trainer.fit()
    trainer.close()
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4] and _checkpoints(tmp_path) == [3]
    saved_rng = torch.load(tmp_path / "checkpoints" / "step_00000003" / "rng_rank0.pt", weights_only=True)
    torch.manual_seed(1234)  # what the resume must undo
    trainer = _trainer(tmp_path, 6, ("checkpoint.interval", "3"))
    assert trainer.step == 3 and torch.equal(torch.get_rng_state(), saved_rng["torch"])
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {3.0}  # AdamW state restored (its step count included)
    try:
        resumed = trainer.fit()
    finally:
        trainer.close()
    assert [r["step"] for r in resumed] == [4, 5, 6]
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert losses(records) == losses(straight) and [r["lr"] for r in records] == [r["lr"] for r in straight]


# ---- 2. metrics.jsonl cut back -----------------------------------------------------------
def test_truncate_metrics_keeps_steps_up_to_the_resumed_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # a line cut short by a kill
    assert truncate_metrics(path, 3) == 3
    assert path.read_text() == "\n".join(lines[:3]) + "\n"
    assert truncate_metrics(path, 3) == 0 and truncate_metrics(tmp_path / "absent.jsonl", 3) == 0
    assert truncate_metrics(path, 0) == 3 and path.read_text() == ""  # a fresh run in an old output_dir
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


# ---- 3. non-finite steps -----------------------------------------------------------------
def test_max_bad_steps_is_validated():
    with pytest.raises(ConfigError, match=r"train\.max_bad_steps.* got 0.*set it to 1 or more") as e:
        load_config(TINY, [("train.max_bad_steps", "0")])
    assert "\n" not in str(e.value)


def _params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_a_nan_step_is_skipped_and_training_continues(tmp_path):
    """Step 2's loss is NaN: no update (weights and AdamW state as after step 1), no checkpoint
    at step 2; the LR schedule and the data move on, and steps 3-4 train normally."""
    trainer = _trainer(tmp_path, 4, ("checkpoint.interval", "2"))
    loss_sums, micro_batches = trainer.model.loss_sums, trainer.data.micro_batches
    seen_steps, snapshots = [], {}

    def poisoned(batch):
        sums = loss_sums(batch)
        return {k: v * float("nan") for k, v in sums.items()} if trainer.step == 1 else sums

    def recorded(step, *args):
        seen_steps.append(step)
        snapshots[step] = (_params(trainer), {float(s["step"]) for s in trainer.optimizer.state.values()})
        return micro_batches(step, *args)

    trainer.model.loss_sums, trainer.data.micro_batches = poisoned, recorded
    try:
        records = trainer.fit()
    finally:
        trainer.close()
    assert [r["skipped"] for r in records] == [False, True, False, False]
    assert [r["bad_steps"] for r in records] == [0, 1, 0, 0]
    assert seen_steps == [0, 1, 2, 3]  # the data position advanced past the bad step
    (after1, adam1), (after2, adam2) = snapshots[1], snapshots[2]
    assert all(torch.equal(after1[n], after2[n]) for n in after1) and adam1 == adam2 == {1.0}
    assert all(torch.isfinite(p).all() for p in snapshots[3][0].values()) and snapshots[3][1] == {2.0}
    straight = _fit(tmp_path / "ref", 4, ("checkpoint.enabled", "false"))
    assert [r["lr"] for r in records] == [r["lr"] for r in straight]  # the schedule advanced
    assert records[0]["loss"] == straight[0]["loss"] and all(r["loss"] < 6.5 for r in records[2:])
    assert _checkpoints(tmp_path) == [4]  # none from the skipped step 2
    assert [r["skipped"] for r in _metrics(tmp_path)] == [False, True, False, False]


def test_diverging_run_stops_with_one_line_and_no_bad_checkpoint(tmp_path, capsys):
    """train.lr=1e30: the steps after the first have non-finite gradients; after max_bad_steps
    of them the run stops (exit code 3, one line naming the steps), and every checkpoint on
    disk holds finite weights."""
    rc = pretrain_omni.main(["--config", TINY, f"--train.output_dir={tmp_path}", "--train.progress_bar=false",
                             "--train.steps=20", "--train.lr=1e30", "--train.max_bad_steps=3",
                             "--checkpoint.interval=1"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 3 and len(err) == 1, err
    records = _metrics(tmp_path)
    last = records[-1]["step"]
    assert last <= 3 + 3 and [r["bad_steps"] for r in records[-3:]] == [1, 2, 3]
    assert f"-{last}" in err[0] and "train.max_bad_steps=3" in err[0] and "train.lr" in err[0]
    saved = _checkpoints(tmp_path)
    assert saved and max(saved) < last - 2  # nothing saved from a skipped step
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    for step in saved:
        whole = tmp_path / f"whole_{step}.pt"
        dcp_to_torch_save(tmp_path / "checkpoints" / f"step_{step:08d}", whole)
        model = torch.load(whole, weights_only=False)["model"]
        assert all(torch.isfinite(t).all() for t in model.values()), step


# ---- 4. preemption -----------------------------------------------------------------------
def _wait_for_lines(path, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {n} steps:\n{_stderr(path.parent)[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {n} lines in {path} within {timeout} s")


def _stderr(out):
    return (out / "stderr.txt").read_text()


def _launch(out, nproc, steps, *args, env=ENV):
    """pretrain_omni.py on tiny_dense through the fault plugin, in the background; its stderr
    goes to out/stderr.txt (a pipe nobody reads could fill and block it)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}", *args]
    cmd = [*launcher, str(ROOT / "pretrain_omni.py"), "--config", TINY, f"--train.output_dir={out}",
           "--train.progress_bar=false", "--train.tensorboard=false", f"--train.steps={steps}",
           "--checkpoint.interval=0", *(f"--{k}={v}" for k, v in FAULTY)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stderr.txt", "w") as stderr:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
    """SIGTERM after 2 logged steps: the run saves at the step it reached and exits 0; the next
    launch (resume=auto) finishes with the uninterrupted run's losses."""
    steps = 16  # 0.2 s each after the 2nd: time for the signal to land before the end
    proc = _launch(tmp_path, 1, steps, env=dict(ENV, OMNI_FAULT_SLEEP_S="0.2"))
    _wait_for_lines(tmp_path / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = _stderr(tmp_path)
    assert proc.returncode == 0, err[-3000:]
    reached = len(_metrics(tmp_path))
    assert 2 <= reached < steps and _checkpoints(tmp_path) == [reached], (reached, _checkpoints(tmp_path))
    assert f"SIGTERM: stopped at step {reached} of {steps}" in err
    resumed = _fit(tmp_path, steps, *FAULTY)
    assert resumed[0]["step"] == reached + 1
    straight = _fit(tmp_path / "straight", steps, *FAULTY, ("checkpoint.enabled", "false"))
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert losses(records) == losses(straight)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigterm_under_torchrun_saves_on_every_rank(tmp_path):
    """torchrun forwards SIGTERM to its 2 workers: they agree on the step, save and exit 0
    (torchrun itself reports the signal); the checkpoint resumes on 1 process."""
    steps = 12
    proc = _launch(tmp_path, 2, steps, env=dict(ENV, OMNI_FAULT_SLEEP_S="0.3"))
    _wait_for_lines(tmp_path / "metrics.jsonl", 2, proc, timeout=180)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    err = _stderr(tmp_path)
    reached = len(_metrics(tmp_path))
    assert 2 <= reached < steps and _checkpoints(tmp_path) == [reached], (reached, err[-3000:])
    assert f"SIGTERM: stopped at step {reached} of {steps}" in err and "forcefully exiting" not in err
    assert proc.returncode != 0 and "SignalException" in err  # torchrun itself reports the signal it got
    resumed = _fit(tmp_path, steps, *FAULTY)
    straight = _fit(tmp_path / "straight", steps, *FAULTY, ("checkpoint.enabled", "false"))
    assert resumed[0]["step"] == reached + 1
    assert_close(losses(_metrics(tmp_path)), losses(straight), rel=1e-5)


# ---- 2b. a worker killed under torchrun --------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkilled_worker_restarts_from_the_checkpoint(tmp_path):
    """Rank 1 is SIGKILLed during step 6 of 8 (checkpoints every 2 steps) under
    torchrun --max-restarts=1: the restarted workers resume at step 4 and finish with the
    uninterrupted run's losses, every step once in metrics.jsonl."""
    steps, marker = 8, tmp_path / "killed"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(ROOT / "pretrain_omni.py"), "--config", TINY, f"--train.output_dir={out}",
           "--train.progress_bar=false", "--train.tensorboard=false", f"--train.steps={steps}",
           "--checkpoint.interval=2", *(f"--{k}={v}" for k, v in FAULTY)]
    # torch 2.13's torchrun shares its rendezvous TCPStore with the workers, and a restarted
    # round then reads the previous round's process-group addresses (pytorch/pytorch#135712):
    # restarts need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (see README, "Resuming").
    env = dict(ENV, OMNI_FAULT_KILL=f"5:1:{marker}", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert marker.read_text() == "killed at step 5\n"
    records = _metrics(out)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert _checkpoints(out) == [2, 4, 6, 8]
    straight = _fit(tmp_path / "straight", steps, *FAULTY, ("checkpoint.enabled", "false"))
    assert_close(losses(records), losses(straight), rel=1e-5)


# ---- 5. resharding -----------------------------------------------------------------------
RESHARD = {  # model: (config, {world size: layout keys})
    "dense": ("tiny_dense.yaml", {4: [], 2: [], 1: []}),
    "moe": ("tiny_moe.yaml", {4: [("parallel.ep_size", "4")], 2: [("parallel.ep_size", "2")], 1: []}),
    "omni": ("tiny_omni.yaml", {4: [], 2: [], 1: []}),
}


def _step2(root, model):
    return root / model / "checkpoints" / "step_00000002"


def _cases(root, world, resume_from=None):
    """Each model trained to step 3 in root/<model> (checkpoints at 2 and 3), from scratch or
    resumed from resume_from/<model>'s step-2 checkpoint."""
    cases = []
    for model, (config, layouts) in RESHARD.items():
        resume = str(_step2(resume_from, model)) if resume_from else "none"
        cases.append({"name": model, "config": str(ROOT / "examples" / "configs" / config), "fit": True,
                      "overrides": [("train.steps", "3"), ("checkpoint.interval", "2"), ("checkpoint.resume", resume),
                                    ("train.progress_bar", "false"), ("train.tensorboard", "false"),
                                    ("train.output_dir", str(root / model)), *layouts[world]]})
    return cases


def _run_cases(cases, world, tmp, name) -> dict:
    """{model: losses}: in this process (world 1), or in one torchrun launch for all models."""
    if world == 1:
        out = {}
        for case in cases:
            trainer = Trainer(load_config(case["config"], case["overrides"]), CPU)
            out[case["name"]] = losses(trainer.fit())
            trainer.close()
        return out
    (tmp / f"{name}.json").write_text(json.dumps(cases))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(ROOT / "tests" / "combo_worker.py"), str(tmp / f"{name}.json"), str(tmp / f"{name}_out.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT, env=ENV)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {k: v["loss"] for k, v in json.loads((tmp / f"{name}_out.json").read_text()).items()}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """Step 3 of each model: from scratch on 1 process and on 4 ranks; resumed from the 4-rank
    step-2 checkpoint on 2 ranks and on 1 process, and from the 1-process one on 4 ranks.
    Two launches (4 ranks, 2 ranks); the 1-process runs train here."""
    tmp = tmp_path_factory.mktemp("reshard")
    ref1 = _run_cases(_cases(tmp / "ref1", 1), 1, tmp, "ref1")
    on4 = _run_cases(_cases(tmp / "ref4", 4) + [dict(c, name=f"{c['name']}/from1")
                                                 for c in _cases(tmp / "from1", 4, tmp / "ref1")], 4, tmp, "on4")
    on2 = _run_cases(_cases(tmp / "from4_on2", 2, tmp / "ref4"), 2, tmp, "on2")
    on1 = _run_cases(_cases(tmp / "from4_on1", 1, tmp / "ref4"), 1, tmp, "on1")
    return ref1, on4, on2, on1


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("model", list(RESHARD))
def test_checkpoint_reshards_4_to_2_and_1_and_1_to_4(resharded, model):
    """The step after a resharded resume has the loss of the run that did not reshard (1e-6)."""
    ref1, on4, on2, on1 = resharded
    ref4 = on4[model]
    assert len(ref4) == len(ref1[model]) == 3 and len(on2[model]) == len(on1[model]) == len(on4[f"{model}/from1"]) == 1
    assert_close(on2[model], ref4[2:], rel=1e-6)  # 4 -> 2
    assert_close(on1[model], ref4[2:], rel=1e-6)  # 4 -> 1
    assert_close(on4[f"{model}/from1"], ref1[model][2:], rel=1e-6)  # 1 -> 4
