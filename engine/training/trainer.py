"""The trainer: the build, in one direction, then the loop.

Build stages (`Trainer.__init__`): prepare data files -> layout -> model on meta ->
parallelise -> weights (seeded init, init_from) -> data -> optimizer -> checkpoint manager
(and resume); with `data.num_workers`, the data's worker processes start right after the
layout, so that they start up while the model is built. Nothing flows backwards: the data
is built from the config, not the model, and weights reach the model only through
engine/checkpoint/weights.py and the manager.

The model contract (engine/models/contract.py) is the same for dense, MoE and omni models,
so the loop has no branch on the model kind. The loss is token-weighted: every rank sums
each loss over its targets and divides by the number of that loss's targets in the whole
global batch (all micro-batches, all ranks). FSDP then sums gradients (divide factor 1),
so the gradient equals the one-process gradient whatever the layout or the accumulation.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from engine.batch import Batch
from engine.checkpoint import CheckpointManager
from engine.checkpoint.weights import compose_from_init_from, initial_weights_
from engine.comm import STATS, DistContext, all_reduce, init_distributed, shutdown
from engine.config import Config, ConfigError, expand_path, resolve_layout
from engine.config_validation import ensure_dir
from engine.data.sources import build_eval_data, build_train_data, prepare_data
from engine.data.workers import BackgroundData
from engine.models import build_model
from engine.models.contract import check_contract
from engine.models.dense import token_loss_sum  # noqa: F401  (re-exported for tools and tests)
from engine.models.part_specs import check_part_names
from engine.ops.attention import get_attention_fn
from engine.ops.moe import grouped_gemm_warnings
from engine.parallel import ParallelDims, parallelize
from engine.parallel.float8 import high_precision
from engine.parallel.ulysses import shard_batch

from .metrics import MetricsLogger, compute_precision, device_peak_flops, gpu_utilization, memory_gb
from .optimizer import build_optimizer, build_scheduler, clip_grad_norm_

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """train.max_bad_steps consecutive steps had a non-finite loss or gradient norm."""


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS is deterministic only with a fixed workspace, read when its first handle is
        # made (the first matmul, after this): without it use_deterministic_algorithms raises
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def set_matmul_precision(tf32: bool) -> None:
    """fp32 matmuls and convolutions on CUDA through TF32 tensor cores (train.tf32), or in full
    fp32 (about 7x slower on an H100). No effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def check_machine(cfg: Config, ctx: DistContext) -> None:
    """What the config asks of this machine and process, checked before any data or weights are
    built (a ConfigError naming the key otherwise): the parts' names are registered (plugins
    imported), the attention kernel runs on this device, and the output and cache folders
    exist or can be made."""
    check_part_names(cfg.model)
    get_attention_fn(cfg.model.attention_backend, ctx.device.type, high_precision(cfg.train.dtype, ctx.device.type))
    ensure_dir("train.output_dir", cfg.train.output_dir)
    ensure_dir("data.cache_dir", cfg.data.cache_dir)


def check_memory(n_params: int, shards: int, device: torch.device, cfg: Config) -> None:
    """A model whose fp32 weights alone (one rank's shard of them) exceed the memory of this
    rank's device is a config mistake, told before materialising it fails or the OOM killer
    ends the process."""
    need = 4 * n_params / shards
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, f"GPU {device}"
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # no sysconf here: nothing to compare with
            return
        have //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        where = "this rank's share of the machine's RAM"
    if need > have:
        m = cfg.model
        raise ConfigError(f"config keys model.hidden_size={m.hidden_size}, model.num_layers={m.num_layers}, "
                          f"model.vocab_size={m.vocab_size}, model.intermediate_size={m.intermediate_size} (and the "
                          f"parts' sizes) make a model of {n_params:.3g} parameters whose fp32 weights alone need "
                          f"{need / 2**30:.3g} GiB on each of {shards} shard(s), more than the {have / 2**30:.3g} GiB "
                          f"of {where}: shrink the model or shard it over more ranks")


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext):
        self.ctx = ctx
        self.data = self.ckpt = None  # set by the build; close() runs after a failed build too
        try:
            self._build(cfg, ctx)
        except BaseException:
            self.close_data()  # a failed build leaves no data workers behind
            raise

    def _build(self, cfg: Config, ctx: DistContext) -> None:
        cfg = compose_from_init_from(cfg)  # a whole released model in model.init_from decides the model keys
        check_machine(cfg, ctx)
        self.cfg = prepare_data(cfg)  # the dataset's files, and weights it makes for parts (as their init_from)
        self._build_layout()
        self.data = self._background_data()
        model = self._build_model_on_meta()
        check_memory(self.n_params, self.dims.dp_shard * self.dims.sp if self.fsdp else 1, ctx.device, self.cfg)
        self.model = parallelize(model, self.cfg, self.dims, self.meshes, ctx.device.type)
        self.ckpt = CheckpointManager(self.output_dir, ctx, self.cfg.checkpoint.interval, self.cfg.checkpoint.enabled,
                                      expert_mesh=self.meshes.expert_global if self.meshes else None,
                                      keep_last=self.cfg.checkpoint.keep_last, async_save=self.cfg.checkpoint.async_save)
        resume_from = self.ckpt.resolve_resume(self.cfg.checkpoint.resume)
        initial_weights_(self.model, self.cfg, ctx.device, resuming=resume_from is not None)
        if self.data is None:
            self.data = build_train_data(self.cfg)
        else:
            self.data.wait_ready()  # a data error stops the build here, as without workers
        self.eval_data = build_eval_data(self.cfg)
        self.eval_rows = self.eval_data.num_rows() if self.eval_data is not None else 0
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self._resume(resume_from)

    # ---- build stages ------------------------------------------------------------------
    def _build_layout(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        self.layout = resolve_layout(cfg, ctx.world_size)
        self.dims = ParallelDims.from_layout(self.layout, ctx.world_size)
        self.meshes = self.dims.build_meshes(ctx.device.type) if ctx.is_distributed else None
        self.dp_rank = self.meshes.dp_rank if self.meshes else 0
        self.fsdp = self.meshes is not None and self.dims.fsdp_enabled
        # Without FSDP there is no MixedPrecisionPolicy: autocast gives the same bf16 compute.
        use_autocast = high_precision(cfg.train.dtype, ctx.device.type) == "bf16" and not self.fsdp
        self.autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if use_autocast else nullcontext
        self.output_dir = expand_path(cfg.train.output_dir)
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        set_matmul_precision(cfg.train.tf32)

    def _background_data(self) -> BackgroundData | None:
        """With data.num_workers: the training data built, and each step's batches computed, in
        that many background processes of this rank, started now (the evaluation data stays here)."""
        d = self.cfg.data
        if d.num_workers <= 0:
            return None
        return BackgroundData(functools.partial(build_train_data, self.cfg), d.num_workers, d.global_batch_size,
                              self.dp_rank, self.dims.dp, self.layout["micro_batch"])

    def close_data(self) -> None:
        """Stop the data workers (data.num_workers), if any."""
        if isinstance(self.data, BackgroundData):
            self.data.close()

    def _build_model_on_meta(self):
        with torch.device("meta"):
            model = build_model(self.cfg.model)
        check_contract(model)
        self.flops_per_token = model.flops_per_token(self.cfg.data.seq_len)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.is_moe = bool(model.moe_layers())
        if self.is_moe and self.ctx.device.type == "cuda" and self.ctx.is_main:
            m = self.cfg.model
            for note in grouped_gemm_warnings(m.hidden_size, m.moe_intermediate_size, self.cfg.train.dtype):
                log.warning("MoE experts: %s", note)
        return model

    def _resume(self, resume_from) -> None:
        """Model, optimizer (AdamW moments and step counts), step and each rank's RNG come from
        the checkpoint; the data position is the step (batches are a function of it); the LR
        schedule is rebuilt from the current config at that step, so a run resumed with more
        train.steps follows the longer schedule (the saved scheduler state is not loaded)."""
        self.step = 0
        self.bad_steps = 0  # consecutive skipped (non-finite) steps
        self.sigterm = False  # set by the SIGTERM handler of fit()
        self.stop_requested = False  # some rank got SIGTERM: all save and leave at this step boundary
        if resume_from is not None:
            state = self.ckpt.load(resume_from, self.model, self.optimizer, self.trainer_state())
            self.step = int(state["step"])
            log.info("resumed from %s at step %d", resume_from, self.step)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train, start_step=self.step)
        self.peak_flops = device_peak_flops(self.ctx.device, compute_precision(self.cfg.train.dtype, self.cfg.train.tf32))
        if self.peak_flops is None and self.ctx.is_main:
            log.warning("peak FLOP/s of device %s is unknown: mfu is reported as null", self.ctx.device)

    def trainer_state(self) -> dict:
        return {"step": self.step, "config": json.dumps(self.cfg.to_dict())}

    def prepare_batch(self, batch: Batch) -> Batch:
        """Move to the device; under SP keep this rank's sequence shard."""
        batch = batch.to(self.ctx.device)
        if self.dims.sp > 1:
            batch = shard_batch(batch, self.meshes.sp.get_local_rank(), self.dims.sp)
        return batch

    def moe_metrics(self) -> dict:
        """Load-balancing loss and, per MoE layer, tokens per expert (global batch) and
        the imbalance max / mean."""
        if not self.is_moe:
            return {}
        counts = {name.replace("_checkpoint_wrapped_module.", "").replace(".mlp", ""): m.tokens_per_expert
                  for name, m in self.model.moe_layers().items()}
        return {"moe_tokens_per_expert": {k: [int(x) for x in v.tolist()] for k, v in counts.items()},
                "moe_imbalance": {k: float(v.max() / v.mean()) for k, v in counts.items()}}

    def forward_backward(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Gradients of this step's global batch.

        Each counted loss (text, each decoder's) is a sum over its targets divided by the
        number of its targets in the whole global batch, counted before the forward pass.
        A term without count (a MoE load-balancing loss: already this rank's share of its
        micro-batch's global loss) is averaged over the micro-batches. Returns this rank's
        sums of every term and the global counts of the counted ones.
        """
        cfg, dev = self.cfg, self.ctx.device
        batches = self.data.micro_batches(self.step, cfg.data.global_batch_size, self.dp_rank, self.dims.dp,
                                          self.layout["micro_batch"])
        # Every SP rank holds the same micro-batches: count their padding once per dp rank.
        padding = sum(b.padding_tokens for b in batches) / self.dims.sp
        batches = [self.prepare_batch(b) for b in batches]
        local = [self.model.target_counts(b) for b in batches]
        keys = list(local[0])
        counts = torch.tensor([float(sum(c[k] for c in local)) for k in keys] + [padding], dtype=torch.float64,
                              device=dev)
        all_reduce(counts, axis="world")  # every target lives on exactly one rank (dp x sp)
        global_counts = dict(zip(keys, counts.tolist()))
        self.padding_tokens = round(counts[-1].item())
        weights = self.model.loss_weights
        sums: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            if self.fsdp:  # reduce-scatter gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(batches) - 1)
            with self.autocast():
                losses = self.model.loss_sums(batch)
            terms = {k: v if k in global_counts else v / len(batches) for k, v in losses.items()}
            # A counted term the model does not weight (the loss of one data source) is a metric.
            counted = [weights[k] * terms[k] / global_counts[k] for k in keys if global_counts[k] > 0 and k in weights]
            objective = sum(counted) + sum(v for k, v in terms.items() if k not in global_counts)
            objective.backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=dev)) + v.detach().double()
        return sums, global_counts

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss of every counted term over the validation set (or train.eval_batches of it),
        token-weighted over all ranks like the training loss."""
        cfg = self.cfg
        g = cfg.data.global_batch_size
        steps = -(-self.eval_rows // g)
        if cfg.train.eval_batches:
            steps = min(steps, cfg.train.eval_batches)
        self.model.eval()
        sums: dict[str, float] = {}
        try:
            for step in range(steps):
                for batch in self.eval_data.micro_batches(step, g, self.dp_rank, self.dims.dp, self.layout["micro_batch"]):
                    batch = self.prepare_batch(batch)
                    counts = self.model.target_counts(batch)
                    with self.autocast():
                        losses = self.model.loss_sums(batch)
                    for k in counts:
                        sums[f"{k}/n"] = sums.get(f"{k}/n", 0.0) + counts[k]
                        sums[k] = sums.get(k, 0.0) + float(losses[k].detach())
        finally:
            self.model.train()
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.ctx.device)
        all_reduce(totals, axis="world")
        total = dict(zip(keys, totals.tolist()))
        return {("eval_loss" if k == "lm" else f"eval_loss_{k}"): total[k] / total[f"{k}/n"]
                for k in keys if not k.endswith("/n") and total[f"{k}/n"] > 0}

    def train_step(self) -> dict:
        """One optimizer step. A step whose loss or gradient norm is not finite on any rank is
        skipped by every rank: no optimizer update (weights and AdamW state, its step count
        included, stay as they were), while the LR schedule and the data position advance."""
        cfg, dev = self.cfg, self.ctx.device
        t0 = time.perf_counter()
        sums, global_counts = self.forward_backward()
        grad_norm = clip_grad_norm_(self.model, cfg.train.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        keys = list(sums)
        # One all-reduce carries the loss sums and two flags all ranks must agree on: this rank's
        # gradient norm is not finite, and this rank got SIGTERM (the step-boundary stop request).
        flags = torch.tensor([float(not math.isfinite(grad_norm)), float(self.sigterm)], dtype=torch.float64,
                             device=dev)
        totals = torch.cat([torch.stack([sums[k] for k in keys]), flags])
        all_reduce(totals, axis="world")
        *totals, bad_norm, stop = totals.tolist()
        skipped = bad_norm > 0 or not all(math.isfinite(t) for t in totals)
        self.stop_requested = stop > 0
        if skipped:
            self.bad_steps += 1
        else:
            self.bad_steps = 0
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped first step: the scheduler steps before the optimizer
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        per_loss = {k: (t / global_counts[k] if global_counts[k] else float("nan")) if k in global_counts else t
                    for k, t in zip(keys, totals)}
        extra = {(f"loss_{k}" if k in global_counts else k): v for k, v in per_loss.items() if k != "lm"}
        moe = self.moe_metrics()
        self.step += 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        tokens = cfg.data.global_batch_size * cfg.data.seq_len
        tps = tokens / dt
        mfu = None if self.peak_flops is None else self.flops_per_token * tps / (self.peak_flops * self.ctx.world_size)
        return {"step": self.step, "loss": per_loss["lm"], "grad_norm": grad_norm, "lr": lr,
                "skipped": skipped, "bad_steps": self.bad_steps, **extra,
                "tokens": tokens, "target_tokens": int(global_counts["lm"]), "padding_tokens": self.padding_tokens,
                "padding_frac": self.padding_tokens / tokens, "data_skipped": self.data.skipped_counts(),
                "tokens_per_s": tps, "mfu": mfu,
                "mem_gb": memory_gb(dev), "gpu_util": gpu_utilization(dev), "step_time_s": dt, **moe}

    def fit(self) -> list[dict]:
        cfg = self.cfg
        total = cfg.train.steps
        if self.ctx.is_main:
            log.info("model: %.2fM parameters, layout %s, world %d, device %s", self.n_params / 1e6,
                     self.layout, self.ctx.world_size, self.ctx.device)
        logger = MetricsLogger(self.output_dir, self.ctx.is_main, cfg.train.tensorboard, total, self.step,
                               cfg.train.progress_bar)
        records = []
        previous_handler = self._catch_sigterm()
        try:
            while self.step < total:
                STATS.reset()
                record = self.train_step()
                # engine.comm's collectives only (Ulysses / EP all-to-alls, loss and router all-reduces):
                # FSDP's all-gathers and reduce-scatters bypass engine.comm (tools/plan.py estimates them)
                record["comm_bytes_excl_fsdp"] = STATS.total()
                every = cfg.train.eval_interval
                if self.eval_data is not None and every and (self.step % every == 0 or self.step == total):
                    record.update(self.evaluate())
                records.append(record)
                if self.ckpt.should_save(self.step, total) or (self.stop_requested and self.ckpt.enabled):
                    t_save = time.perf_counter()
                    self.save_checkpoint()
                    record["save_s"] = time.perf_counter() - t_save  # the step's checkpoint stall
                if record["step"] % cfg.train.log_interval == 0 or record["step"] == total or record["skipped"]:
                    logger.log(record)
                if self.bad_steps >= cfg.train.max_bad_steps:
                    raise TrainingDivergedError(
                        f"training diverged: steps {self.step - self.bad_steps + 1}-{self.step} (the last "
                        f"train.max_bad_steps={cfg.train.max_bad_steps}) had a non-finite loss or gradient norm and "
                        "were skipped; no checkpoint was written from them: resume from the last checkpoint with a "
                        "lower train.lr, more train.warmup_steps or train.grad_clip > 0")
                if self.stop_requested:
                    if self.ctx.is_main:
                        log.warning("SIGTERM: stopped at step %d of %d%s; run again to resume", self.step, total,
                                    " after a checkpoint" if self.ckpt.enabled else " (checkpoint.enabled=false)")
                    break
            self.ckpt.finish()  # an asynchronous save still in flight is complete before fit returns
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            logger.close()
        return records

    def save_checkpoint(self) -> None:
        """Save at this step unless its state is not one to resume from: a skipped (non-finite)
        step, or weights that are not finite on some rank; the previous checkpoint stays the latest."""
        if self.bad_steps or not self.weights_finite():
            if self.ctx.is_main:
                log.warning("step %d: no checkpoint written (non-finite loss, gradients or weights)", self.step)
            return
        self.ckpt.save(self.step, self.model, self.optimizer, self.trainer_state())

    @torch.no_grad()
    def weights_finite(self) -> bool:
        """Whether every rank's parameters (its shards) are all finite."""
        local = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters()]
        bad = torch.stack([~torch.isfinite(t).all() for t in local]).any().double().reshape(1)
        all_reduce(bad, axis="world")
        return bad.item() == 0

    def _catch_sigterm(self):
        """From here until fit() returns, SIGTERM (what Slurm and Kubernetes send before they
        kill; torchrun forwards it to its workers) sets a flag; at the next step boundary all
        ranks learn of it (train_step's all-reduce), save a checkpoint and leave fit() cleanly.
        Returns the previous handler (None off the main thread, where none can be installed)."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum, frame):
            self.sigterm = True

        previous = signal.signal(signal.SIGTERM, request_stop)
        return previous if previous is not None else signal.SIG_DFL

    def close(self) -> None:
        self.close_data()
        if self.ckpt is not None:
            self.ckpt.finish(raise_errors=False)  # after an error in fit: no save left running
        # Dropping model and optimizer before tearing down the group avoids gloo aborts at exit.
        self.model = self.optimizer = self.scheduler = None
        gc.collect()


def run_training(cfg: Config) -> list[dict]:
    ctx = init_distributed(cfg.parallel.backend, cfg.train.device, cfg.parallel.fake_world_size,
                           cfg.parallel.fake_rank)
    trainer = None
    try:
        trainer = Trainer(cfg, ctx)
        records = trainer.fit()
        if ctx.is_main and records:
            log.info("done: %d steps, first loss %.4f, last loss %.4f, output in %s", len(records),
                     records[0]["loss"], records[-1]["loss"], Path(trainer.output_dir))
        return records
    finally:
        if trainer is not None:
            trainer.close()
        gc.collect()
        shutdown()
