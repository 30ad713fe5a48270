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
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from engine.batch import Batch
from engine.checkpoint import CheckpointManager
from engine.checkpoint.weights import compose_from_init_from, initial_weights_
from engine.comm import STATS, DistContext, all_reduce, init_distributed, shutdown
from engine.config import Config, expand_path, resolve_layout
from engine.data.sources import build_eval_data, build_train_data, prepare_data
from engine.data.workers import BackgroundData
from engine.models import build_model
from engine.models.contract import check_contract
from engine.models.dense import token_loss_sum  # noqa: F401  (re-exported for tools and tests)
from engine.parallel import ParallelDims, parallelize
from engine.parallel.ulysses import shard_batch

from .metrics import MetricsLogger, device_peak_flops, gpu_utilization, memory_gb
from .optimizer import build_optimizer, build_scheduler, clip_grad_norm_

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext):
        self.ctx = ctx
        self.data = None
        try:
            self._build(cfg, ctx)
        except BaseException:
            self.close_data()  # a failed build leaves no data workers behind
            raise

    def _build(self, cfg: Config, ctx: DistContext) -> None:
        cfg = compose_from_init_from(cfg)  # a whole released model in model.init_from decides the model keys
        self.cfg = prepare_data(cfg)  # the dataset's files, and weights it makes for parts (as their init_from)
        self._build_layout()
        self.data = self._background_data()
        model = self._build_model_on_meta()
        self.model = parallelize(model, self.cfg, self.dims, self.meshes, ctx.device.type)
        self.ckpt = CheckpointManager(self.output_dir, ctx, self.cfg.checkpoint.interval, self.cfg.checkpoint.enabled,
                                      expert_mesh=self.meshes.expert_global if self.meshes else None)
        resume_from = self.ckpt.resolve_resume(self.cfg.checkpoint.resume)
        initial_weights_(self.model, self.cfg, ctx.device, resuming=resume_from is not None)
        if self.data is None:
            self.data = build_train_data(self.cfg)
        else:
            self.data.wait_ready()  # a data error stops the build here, as without workers
        self.eval_data = build_eval_data(self.cfg)
        self.eval_rows = self.eval_data.num_rows() if self.eval_data is not None else 0
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.train)
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
        use_autocast = cfg.train.dtype == "bf16" and not self.fsdp
        self.autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if use_autocast else nullcontext
        self.output_dir = expand_path(cfg.train.output_dir)
        seed_everything(cfg.train.seed, cfg.train.deterministic)

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
        return model

    def _resume(self, resume_from) -> None:
        self.step = 0
        if resume_from is not None:
            state = self.ckpt.load(resume_from, self.model, self.optimizer, self.trainer_state())
            self.step = int(state["step"])
            self.scheduler.load_state_dict(state["scheduler"])
            log.info("resumed from %s at step %d", resume_from, self.step)
        self.peak_flops = device_peak_flops(self.ctx.device)
        if self.peak_flops is None and self.ctx.is_main:
            log.warning("peak FLOP/s of device %s is unknown: mfu is reported as null", self.ctx.device)

    def trainer_state(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "config": json.dumps(self.cfg.to_dict())}

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
        cfg, dev = self.cfg, self.ctx.device
        t0 = time.perf_counter()
        sums, global_counts = self.forward_backward()
        grad_norm = clip_grad_norm_(self.model, cfg.train.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = list(sums)
        totals = torch.stack([sums[k] for k in keys])
        all_reduce(totals, axis="world")
        per_loss = {k: (t / global_counts[k] if global_counts[k] else float("nan")) if k in global_counts else t
                    for k, t in zip(keys, totals.tolist())}
        extra = {(f"loss_{k}" if k in global_counts else k): v for k, v in per_loss.items() if k != "lm"}
        moe = self.moe_metrics()
        self.step += 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        tokens = cfg.data.global_batch_size * cfg.data.seq_len
        tps = tokens / dt
        mfu = None if self.peak_flops is None else self.flops_per_token * tps / (self.peak_flops * self.ctx.world_size)
        return {"step": self.step, "loss": per_loss["lm"], "grad_norm": grad_norm, "lr": lr, **extra,
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
        try:
            while self.step < total:
                STATS.reset()
                record = self.train_step()
                record["comm_bytes"] = STATS.total()
                every = cfg.train.eval_interval
                if self.eval_data is not None and every and (self.step % every == 0 or self.step == total):
                    record.update(self.evaluate())
                records.append(record)
                if record["step"] % cfg.train.log_interval == 0 or record["step"] == total:
                    logger.log(record)
                if self.ckpt.should_save(self.step, total):
                    self.ckpt.save(self.step, self.model, self.optimizer, self.trainer_state())
        finally:
            logger.close()
        return records

    def close(self) -> None:
        self.close_data()
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
