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

from engine.checkpoint import CheckpointError, CheckpointManager
from engine.checkpoint.hf import load_weights_
from engine.comm import STATS, DistContext, all_reduce, init_distributed, shutdown
from engine.config import Config, expand_path, resolve_layout
from engine.data.sources import build_train_data
from engine.models import build_model
from engine.models.omni import OmniModel
from engine.parallel import ParallelDims, materialize, parallelize
from engine.parallel.init import load_full_state_
from engine.parallel.ulysses import shard_batch

from .metrics import MetricsLogger, device_peak_flops, gpu_utilization, memory_gb
from .optimizer import build_optimizer, build_scheduler, clip_grad_norm_

log = logging.getLogger(__name__)


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


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

        with torch.device("meta"):
            model = build_model(cfg.model)
        self.data, self.tokenizer = build_train_data(cfg, model)
        self.is_omni = isinstance(model, OmniModel)
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.is_moe = hasattr(model, "moe_layers") and bool(model.moe_layers())
        self.model = parallelize(model, cfg, self.dims, self.meshes, ctx.device.type)
        materialize(self.model, ctx.device, cfg.train.seed)
        skipped = getattr(self.data, "skipped", None)  # bad samples dropped while loading (data.strict=false)
        self.data_skipped = dict(skipped.counts) if skipped is not None else {}
        # Parts the data source pre-trains, e.g. omni-digits' VQ image tokenizer.
        for path, state in getattr(self.data, "pretrained_states", lambda _: {})(self.model).items():
            load_full_state_(self.model.get_submodule(path), state,
                             f"{path} (pre-trained by data.dataset={cfg.data.dataset}; delete its cache to redo it)")
        self.fsdp = self.meshes is not None and self.dims.fsdp_enabled
        # Without FSDP there is no MixedPrecisionPolicy: autocast gives the same bf16 compute.
        use_autocast = cfg.train.dtype == "bf16" and not self.fsdp
        self.autocast = (lambda: torch.autocast(ctx.device.type, dtype=torch.bfloat16)) if use_autocast else nullcontext

        self.optimizer = build_optimizer(self.model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.ckpt = CheckpointManager(self.output_dir, ctx, cfg.checkpoint.interval, cfg.checkpoint.enabled,
                                      expert_mesh=self.meshes.expert_global if self.meshes else None)
        self.step = 0
        resume_from = self.ckpt.resolve_resume(cfg.checkpoint.resume)
        if resume_from is None and cfg.model.init_from:  # pretrained weights, each rank keeps its shards
            load_weights_(self.model, expand_path(cfg.model.init_from), expect=cfg.model)
        if resume_from is None and self.is_omni:
            self.load_part_weights_()
        if resume_from is not None:
            state = self.ckpt.load(resume_from, self.model, self.optimizer, self.trainer_state())
            self.step = int(state["step"])
            self.scheduler.load_state_dict(state["scheduler"])
            log.info("resumed from %s at step %d", resume_from, self.step)
        self.peak_flops = device_peak_flops(ctx.device)
        if self.peak_flops is None and ctx.is_main:
            log.warning("peak FLOP/s of device %s is unknown: mfu is reported as null", ctx.device)

    def load_part_weights_(self) -> None:
        """`init_from` of each encoder / decoder spec: the part's own Hugging Face loader fills
        an unsharded CPU copy, then every rank keeps its shard of each tensor the loader set.
        Costs one full copy of the part per rank while it loads (parts are at most ~1B)."""
        for name, spec in self.model.specs.items():
            source = spec.get("init_from")
            if not source:
                continue
            path = expand_path(source)
            with torch.device("cpu"):
                full = self.model.build_unsharded_part(name)
            where = f"model part {name!r} init_from={path}"
            if not path.exists():
                raise CheckpointError(f"{where}: no such file or directory; point init_from at a Hugging Face "
                                      "folder (or state-dict file) of this part")
            try:
                loaded = full.load_hf_weights(path)  # a list when the loader fills only some tensors
                tensors = {**dict(full.named_parameters()), **dict(full.named_buffers())}
                if isinstance(loaded, list):
                    tensors = {k: tensors[k] for k in loaded}
                load_full_state_(self.model.part(name), {k: v.detach() for k, v in tensors.items()}, where,
                                 strict=not isinstance(loaded, list))
            except (ValueError, OSError) as e:
                raise CheckpointError(f"{where}: {e}") from None
            log.info("part %s: %d tensors from init_from=%s", name, len(tensors), path)

    def trainer_state(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "config": json.dumps(self.cfg.to_dict())}

    def prepare_batch(self, batch: dict) -> dict:
        """Move to the device; under SP keep this rank's sequence shard."""
        batch = _to_device(batch, self.ctx.device)
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

    def target_counts(self, batch: dict) -> dict[str, int]:
        if self.is_omni:
            return self.model.target_counts(batch)
        return {"lm": int((batch["labels"] != -100).sum())}

    def loss_sums(self, batch: dict) -> dict[str, torch.Tensor]:
        with self.autocast():
            if self.is_omni:
                return self.model(batch)
            logits = self.model(batch["input_ids"], batch["position_ids"], batch["doc_ids"],
                                attn_meta=batch.get("attn_meta"), token_mask=batch.get("token_mask"))
        return {"lm": token_loss_sum(logits, batch["labels"])}

    def forward_backward(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Gradients of this step's global batch.

        Each loss (text, and each decoder's) is a sum over its targets divided by the number
        of its targets in the whole global batch, counted before the forward pass; the
        returned sums are this rank's, the counts global.
        """
        cfg, dev = self.cfg, self.ctx.device
        batches = self.data.micro_batches(self.step, cfg.data.global_batch_size, self.dp_rank, self.dims.dp,
                                          self.layout["micro_batch"])
        # Every SP rank holds the same micro-batches: count their padding once per dp rank.
        padding = sum(int(b.pop("padding_tokens", 0)) for b in batches) / self.dims.sp
        for b in batches:
            b.pop("real_tokens", None)
        batches = [self.prepare_batch(b) for b in batches]
        local = [self.target_counts(b) for b in batches]
        keys = list(local[0])
        counts = torch.tensor([float(sum(c[k] for c in local)) for k in keys] + [padding], dtype=torch.float64,
                              device=dev)
        all_reduce(counts, axis="world")  # every target lives on exactly one rank (dp x sp)
        global_counts = dict(zip(keys, counts.tolist()))
        self.padding_tokens = round(counts[-1].item())
        weights = {"lm": 1.0, **getattr(self.model, "loss_weights", {})}
        sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in keys}
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i, batch in enumerate(batches):
            if self.fsdp:  # reduce-scatter gradients only after the last micro-batch
                self.model.set_requires_gradient_sync(i == len(batches) - 1)
            losses = self.loss_sums(batch)
            objective = sum(weights[k] * losses[k] / global_counts[k] for k in keys if global_counts[k] > 0)
            if self.is_moe:  # load balancing: this rank's share of the global-batch loss
                aux = self.model.aux_loss() / len(batches)
                objective = objective + aux
                self.aux_sum += aux.detach().double()
            objective.backward()
            for k in keys:
                sums[k] += losses[k].detach().double()
        return sums, global_counts

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
        per_loss = {k: (t / global_counts[k] if global_counts[k] else float("nan")) for k, t in zip(keys, totals.tolist())}
        extra = {f"loss_{k}": v for k, v in per_loss.items() if k != "lm"}
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
                "padding_frac": self.padding_tokens / tokens, "data_skipped": self.data_skipped,
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
