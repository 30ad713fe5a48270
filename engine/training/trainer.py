"""The training loop: build on meta, parallelise, materialise shards, train, log, checkpoint.

The loss is token-weighted: every rank sums its cross-entropy over its target tokens and
divides by the number of target tokens in the whole global batch (all micro-batches, all
ranks). FSDP then sums gradients (divide factor 1), so the gradient equals the one-process
gradient whatever the layout or the accumulation.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.checkpoint import CheckpointManager
from engine.checkpoint.hf import load_weights_
from engine.comm import STATS, DistContext, all_reduce, init_distributed, shutdown
from engine.config import Config, expand_path, resolve_layout
from engine.data import build_text_dataset
from engine.data.packing import micro_batches
from engine.models import build_backbone
from engine.parallel import ParallelDims, materialize, parallelize
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


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of cross-entropy over target tokens, computed in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


class Trainer:
    def __init__(self, cfg: Config, ctx: DistContext):
        self.cfg, self.ctx = cfg, ctx
        layout = resolve_layout(cfg, ctx.world_size)
        self.layout = layout
        self.dims = ParallelDims.from_layout(layout, ctx.world_size)
        self.meshes = self.dims.build_meshes(ctx.device.type) if ctx.is_distributed else None
        self.dp_rank = self.meshes.dp_rank if self.meshes else 0
        self.output_dir = expand_path(cfg.train.output_dir)
        seed_everything(cfg.train.seed, cfg.train.deterministic)

        self.dataset, self.tokenizer = build_text_dataset(
            expand_path(cfg.data.cache_dir), cfg.model.vocab_size, cfg.data.seq_len, cfg.train.seed)

        with torch.device("meta"):
            model = build_backbone(cfg.model)
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.is_moe = hasattr(model, "moe_layers") and bool(model.moe_layers())
        self.model = parallelize(model, cfg, self.dims, self.meshes, ctx.device.type)
        materialize(self.model, ctx.device, cfg.train.seed)
        self.fsdp = self.meshes is not None and self.dims.fsdp_enabled
        # Without FSDP there is no MixedPrecisionPolicy: autocast gives the same bf16 compute.
        use_autocast = cfg.train.dtype == "bf16" and not self.fsdp
        self.autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if use_autocast else nullcontext

        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.ckpt = CheckpointManager(self.output_dir, ctx, cfg.checkpoint.interval, cfg.checkpoint.enabled)
        self.step = 0
        resume_from = self.ckpt.resolve_resume(cfg.checkpoint.resume)
        if resume_from is None and cfg.model.init_from:  # pretrained weights, each rank keeps its shards
            load_weights_(self.model, expand_path(cfg.model.init_from), expect=cfg.model)
        if resume_from is not None:
            state = self.ckpt.load(resume_from, self.model, self.optimizer, self.trainer_state())
            self.step = int(state["step"])
            self.scheduler.load_state_dict(state["scheduler"])
            log.info("resumed from %s at step %d", resume_from, self.step)
        self.peak_flops = device_peak_flops(ctx.device)
        if self.peak_flops is None and ctx.is_main:
            log.warning("peak FLOP/s of device %s is unknown: mfu is reported as null", ctx.device)

    def trainer_state(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "config": json.dumps(self.cfg.to_dict())}

    def prepare_batch(self, batch: dict) -> dict:
        """Move to the device; under SP keep this rank's sequence shard."""
        batch = {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}
        if self.dims.sp > 1:
            batch = shard_batch(batch, self.meshes.sp.get_local_rank(), self.dims.sp)
        return batch

    def moe_metrics(self) -> dict:
        """Load-balancing loss and, per MoE layer, tokens per expert (global batch) and
        the imbalance max / mean."""
        if not self.is_moe:
            return {}
        all_reduce(self.aux_sum, axis="world")
        counts = {name.replace("_checkpoint_wrapped_module.", "").replace(".mlp", ""): m.tokens_per_expert
                  for name, m in self.model.moe_layers().items()}
        return {"aux_loss": self.aux_sum.item(),
                "moe_tokens_per_expert": {k: [int(x) for x in v.tolist()] for k, v in counts.items()},
                "moe_imbalance": {k: float(v.max() / v.mean()) for k, v in counts.items()}}

    def forward_backward(self) -> tuple[torch.Tensor, float]:
        """Gradients of this step's global batch; returns (this rank's loss sum, global targets)."""
        cfg = self.cfg
        batches = micro_batches(self.dataset, self.step, cfg.data.global_batch_size, self.dp_rank,
                                self.dims.dp, self.layout["micro_batch"])
        dev = self.ctx.device
        batches = [self.prepare_batch(b) for b in batches]
        local_targets = sum(int((b["labels"] != -100).sum()) for b in batches)
        counts = torch.tensor([float(local_targets)], dtype=torch.float64, device=dev)
        all_reduce(counts, axis="world")  # every target token lives on exactly one rank (dp x sp)
        global_targets = counts.item()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i, batch in enumerate(batches):
            if self.fsdp:  # reduce-scatter gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(batches) - 1)
            with self.autocast():
                logits = self.model(batch["input_ids"], batch["position_ids"], batch["doc_ids"],
                                    attn_meta=batch.get("attn_meta"))
            loss = token_loss_sum(logits, batch["labels"])
            objective = loss / global_targets
            if self.is_moe:  # load balancing: this rank's share of the global-batch loss
                aux = self.model.aux_loss() / len(batches)
                objective = objective + aux
                self.aux_sum += aux.detach().double()
            objective.backward()
            loss_sum += loss.detach().double()
        return loss_sum, global_targets

    def train_step(self) -> dict:
        cfg, dev = self.cfg, self.ctx.device
        t0 = time.perf_counter()
        loss_sum, global_targets = self.forward_backward()
        grad_norm = clip_grad_norm_(self.model, cfg.train.grad_clip, self.dims.dp_replicate)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        all_reduce(loss_sum, axis="world")
        moe = self.moe_metrics()
        self.step += 1
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        tokens = cfg.data.global_batch_size * cfg.data.seq_len
        tps = tokens / dt
        mfu = None if self.peak_flops is None else self.flops_per_token * tps / (self.peak_flops * self.ctx.world_size)
        return {"step": self.step, "loss": loss_sum.item() / global_targets, "grad_norm": grad_norm, "lr": lr,
                "tokens": tokens, "target_tokens": int(global_targets), "tokens_per_s": tps, "mfu": mfu,
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
                records.append(record)
                if record["step"] % cfg.train.log_interval == 0 or record["step"] == total:
                    logger.log(record)
                if self.ckpt.should_save(self.step, total):
                    self.ckpt.save(self.step, self.model, self.optimizer, self.trainer_state())
        finally:
            logger.close()
        return records

    def close(self) -> None:
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
