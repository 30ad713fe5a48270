"""Validation of a loaded config: every check that needs no world size, each a one-line
`ConfigError` naming the key, the value and the fix (choices, model shapes, layout degrees,
the machine's devices and packages, number ranges, folders, the omni parts' specs).
`engine.config.load_config` runs `validate` after the YAML and the CLI overrides are applied.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from engine.config import (_CHOICES, _SECTIONS, MAX_LAYERS, PART_RECIPES, Config, ConfigError, ModelConfig,
                           _section_class, checkpointing_mode, expand_path)

def validate(cfg: Config) -> None:
    """Checks that need no knowledge of the world size."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}")
    _check_numbers(cfg)
    m, d, t, c, p = cfg.model, cfg.data, cfg.train, cfg.checkpoint, cfg.parallel
    positive = {
        "model.vocab_size": m.vocab_size, "model.hidden_size": m.hidden_size,
        "model.intermediate_size": m.intermediate_size, "model.num_layers": m.num_layers,
        "model.num_heads": m.num_heads, "model.num_kv_heads": m.num_kv_heads,
        "data.seq_len": d.seq_len, "data.global_batch_size": d.global_batch_size,
        "train.steps": t.steps, "parallel.dp_replicate": p.dp_replicate,
        "parallel.sp_size": p.sp_size, "parallel.ep_size": p.ep_size,
        "parallel.fake_world_size": p.fake_world_size, "parallel.ep_chunks": p.ep_chunks, "train.log_interval": t.log_interval,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {value}")
    if m.vocab_size < 64:
        raise ConfigError(f"config key 'model.vocab_size' must be >= 64 for the tokenizer, got {m.vocab_size}")
    if p.dp_shard == 0 or p.dp_shard < -1:
        raise ConfigError(f"config key 'parallel.dp_shard' must be >= 1 or -1 (fill), got {p.dp_shard}")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"config key 'model.num_kv_heads'={m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    if m.head_dim is None and m.hidden_size % m.num_heads:
        raise ConfigError(f"config key 'model.hidden_size'={m.hidden_size} is not divisible by model.num_heads="
                          f"{m.num_heads}: change one of them or set model.head_dim")
    if (m.head_dim or m.hidden_size // m.num_heads) % 2:
        raise ConfigError("config key 'model.head_dim' must be even for rotary embeddings")
    if m.mrope_section is not None:
        head_dim = m.head_dim or m.hidden_size // m.num_heads
        if sum(m.mrope_section) != head_dim // 2 or min(m.mrope_section) < 0 or len(m.mrope_section) != 3:
            raise ConfigError(f"config key 'model.mrope_section'={m.mrope_section} must be 3 bands summing to "
                              f"head_dim / 2 = {head_dim // 2}")
    if m.rope_scaling is not None:
        kind = m.rope_scaling.get("type", m.rope_scaling.get("rope_type"))
        if kind not in ("linear", "llama3", "default"):
            raise ConfigError(f"config key 'model.rope_scaling' has unsupported type {kind!r}: use linear or llama3")
        if "factor" not in m.rope_scaling and kind != "default":
            raise ConfigError("config key 'model.rope_scaling' needs a 'factor'")
    if t.lr <= 0:
        raise ConfigError(f"config key 'train.lr' must be > 0, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"config key 'train.min_lr_ratio' must be in [0, 1], got {t.min_lr_ratio}")
    if t.warmup_steps < 0 or t.grad_clip < 0 or t.weight_decay < 0:
        raise ConfigError("config keys 'train.warmup_steps', 'train.grad_clip', 'train.weight_decay' must be >= 0")
    if d.tokenizer not in ("sentencepiece", "bpe") and not expand_path(d.tokenizer).exists():
        raise ConfigError(f"config key 'data.tokenizer'={d.tokenizer!r} is neither sentencepiece, bpe nor an existing "
                          "path: pass a Hugging Face tokenizer folder, a tokenizer.json or a sentencepiece .model")
    if d.weights is not None:
        paths = d.path if isinstance(d.path, list) else [d.path]
        if len(d.weights) != len(paths) or not all(isinstance(w, (int, float)) and w > 0 for w in d.weights):
            raise ConfigError(f"config key 'data.weights'={d.weights} needs one positive number per data.path entry "
                              f"({len(paths)})")
    if not 0 <= d.eval_fraction < 1:
        raise ConfigError(f"config key 'data.eval_fraction' must be in [0, 1), got {d.eval_fraction}")
    for key in ("min_pixels", "max_pixels"):
        if getattr(d, key) is not None and getattr(d, key) < 1:
            raise ConfigError(f"config key 'data.{key}' must be >= 1 (pixels), got {getattr(d, key)}")
    if d.min_pixels and d.max_pixels and d.min_pixels > d.max_pixels:
        raise ConfigError(f"config keys 'data.min_pixels'={d.min_pixels} > 'data.max_pixels'={d.max_pixels}: the "
                          "smallest image size must not exceed the largest")
    if not d.video_fps > 0 or d.max_frames < 1:
        raise ConfigError(f"config keys 'data.video_fps'={d.video_fps} and 'data.max_frames'={d.max_frames} must be "
                          "> 0 and >= 1")
    if d.num_workers < 0:
        raise ConfigError(f"config key 'data.num_workers' must be >= 0 (0: build batches in the training process), "
                          f"got {d.num_workers}")
    if t.eval_interval < 0 or t.eval_batches < 0:
        raise ConfigError("config keys 'train.eval_interval' and 'train.eval_batches' must be >= 0")
    if t.max_bad_steps < 1:
        raise ConfigError(f"config key 'train.max_bad_steps' must be >= 1 (consecutive non-finite steps skipped "
                          f"before the run stops), got {t.max_bad_steps}: set it to 1 or more (default 5)")
    if d.micro_batch_size < 0:
        raise ConfigError(f"config key 'data.micro_batch_size' must be >= 0, got {d.micro_batch_size}")
    if c.interval < 0:
        raise ConfigError(f"config key 'checkpoint.interval' must be >= 0, got {c.interval}")
    if c.keep_last is not None and c.keep_last < 0:
        raise ConfigError(f"config key 'checkpoint.keep_last' must be >= 0, got {c.keep_last}: use N >= 1 to keep "
                          "the newest N checkpoints, or 0 / null to keep all")
    if c.resume not in ("auto", "none") and not Path(c.resume).is_dir():
        raise ConfigError(f"config key 'checkpoint.resume' is {c.resume!r}: use auto, none, or an existing checkpoint directory")
    if m.num_heads % p.sp_size:
        raise ConfigError(f"config key 'parallel.sp_size'={p.sp_size} must divide model.num_heads={m.num_heads} "
                          "(Ulysses splits attention heads over the SP group); pick a divisor")
    if m.num_kv_heads % p.sp_size and p.sp_size % m.num_kv_heads:
        raise ConfigError(f"config key 'parallel.sp_size'={p.sp_size} and model.num_kv_heads={m.num_kv_heads}: one "
                          "must divide the other (KV heads are split, or replicated when fewer than sp_size)")
    if m.backbone == "moe":
        if m.num_experts < 1:
            raise ConfigError("config key 'model.num_experts' must be >= 1 with model.backbone=moe")
        if not 1 <= m.num_experts_per_tok <= m.num_experts:
            raise ConfigError(f"config key 'model.num_experts_per_tok'={m.num_experts_per_tok} must be in "
                              f"[1, model.num_experts={m.num_experts}]")
        if m.moe_intermediate_size < 1 or m.decoder_sparse_step < 1:
            raise ConfigError("config keys 'model.moe_intermediate_size' and 'model.decoder_sparse_step' must be >= 1")
        if m.num_experts % p.ep_size:
            raise ConfigError(f"config key 'parallel.ep_size'={p.ep_size} must divide model.num_experts="
                              f"{m.num_experts} (each EP rank owns num_experts / ep_size experts)")
    elif p.ep_size > 1:
        raise ConfigError(f"config key 'parallel.ep_size'={p.ep_size} needs a mixture-of-experts backbone: "
                          "set model.backbone=moe (and model.num_experts) or parallel.ep_size=1")
    elif m.num_experts:
        raise ConfigError(f"config key 'model.num_experts'={m.num_experts} needs model.backbone=moe")
    checkpointing_mode(p.activation_checkpointing, "parallel.activation_checkpointing")
    _check_device_choices(cfg)
    _check_ranges(cfg)
    _check_dirs(cfg)
    _check_part_specs(cfg.model)


def _check_device_choices(cfg: Config) -> None:
    """Choices that need CUDA, or a package, that this machine lacks are one-line errors here
    rather than import errors or kernel failures mid-run."""
    import importlib.util

    import torch

    m, t = cfg.model, cfg.train
    cuda = t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available())
    if m.fused_loss == "liger" and not (cuda and importlib.util.find_spec("liger_kernel")):
        raise ConfigError("config key 'model.fused_loss' is liger, which needs CUDA and the liger-kernel package "
                          f"({'missing' if cuda else 'no CUDA device here'}); use --model.fused_loss=auto (or chunked)")
    if t.dtype == "fp8" and t.fp8_backend == "te" and not cuda:
        raise ConfigError("config key 'train.fp8_backend' is te (Transformer Engine), which needs CUDA; on this "
                          "machine use --train.fp8_backend=torchao")
    if t.dtype == "fp8" and t.fp8_backend == "torchao" and t.fp8_recipe not in ("tensorwise", "rowwise"):
        raise ConfigError(f"config key 'train.fp8_recipe' is {t.fp8_recipe}, which train.fp8_backend=torchao does not "
                          "have; use tensorwise or rowwise")
    if t.dtype == "fp8" and t.fp8_backend == "te" and t.fp8_recipe == "rowwise":
        raise ConfigError("config key 'train.fp8_recipe' is rowwise, which train.fp8_backend=te does not have; use "
                          "tensorwise (TE's current scaling) or delayed")
    if t.dtype == "fp8" and t.fp8_backend == "te" and not importlib.util.find_spec("transformer_engine"):
        raise ConfigError("config key 'train.fp8_backend' is te, which needs Transformer Engine: pip install "
                          "'transformer-engine[pytorch]' on the CUDA machine (the [te] extra) or use "
                          "--train.fp8_backend=torchao")
    if t.dtype == "fp8" and t.fp8_backend == "torchao" and not importlib.util.find_spec("torchao"):
        raise ConfigError("config key 'train.dtype' is fp8 with train.fp8_backend=torchao, which needs the torchao "
                          "package: pip install -e '.[fp8]' (or use --train.dtype=bf16)")


def _check_numbers(cfg: Config) -> None:
    """Every float key is finite (NaN slips through `<` checks; inf poisons the run) and every
    int key fits in 64 bits (torch and numpy take no more)."""
    for section in _SECTIONS:
        for f in dataclasses.fields(_section_class(section)):
            key, value = f"{section}.{f.name}", getattr(getattr(cfg, section), f.name)
            items = [(f"{key}[{i}]", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
            for name, v in items:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"config key '{name}' must be a finite number, got {v}")
                if isinstance(v, int) and not isinstance(v, bool) and not -2 ** 63 <= v < 2 ** 63:
                    raise ConfigError(f"config key '{name}'={v} does not fit in a 64-bit integer: use a realistic "
                                      "value")


# Parameters a backbone may have before the config is taken for a typo (the largest released
# models have ~2e12); a bigger one would hang building on the meta device or fail to allocate.
_MAX_BACKBONE_PARAMS = 10 ** 13
_MAX_WORKERS = 256
_MAX_FAKE_WORLD = 2 ** 20
_MAX_STEP_TOKENS = 2 ** 40  # ~1e12 tokens per optimizer step; the largest runs use ~1e8


def _check_ranges(cfg: Config) -> None:
    """Bounds torch, numpy or the model would otherwise enforce with a traceback (or not at all)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    for key, value in (("train.beta1", t.beta1), ("train.beta2", t.beta2)):
        if not 0 <= value < 1:
            raise ConfigError(f"config key '{key}' must be in [0, 1) (an AdamW moment decay), got {value}")
    if not 0 <= t.seed < 2 ** 32:
        raise ConfigError(f"config key 'train.seed' must be in [0, 2**32) (numpy's seed range), got {t.seed}")
    for key, value in (("model.rope_theta", m.rope_theta),
                       ("model.max_position_embeddings", m.max_position_embeddings)):
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    for key, value in (("model.init_std", m.init_std), ("model.rms_norm_eps", m.rms_norm_eps),
                       ("model.router_aux_loss_coef", m.router_aux_loss_coef),
                       ("model.router_z_loss_coef", m.router_z_loss_coef), ("model.num_experts", m.num_experts),
                       ("model.shared_expert_intermediate_size", m.shared_expert_intermediate_size)):
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if m.head_dim is not None and m.head_dim < 1:
        raise ConfigError(f"config key 'model.head_dim' must be >= 1 or null (hidden_size / num_heads), "
                          f"got {m.head_dim}")
    if m.seconds_per_chunk is not None and m.seconds_per_chunk <= 0:
        raise ConfigError(f"config key 'model.seconds_per_chunk' must be > 0 or null, got {m.seconds_per_chunk}")
    if any(not 0 <= i < m.num_layers for i in m.mlp_only_layers):
        raise ConfigError(f"config key 'model.mlp_only_layers'={m.mlp_only_layers} must hold layer indices in "
                          f"[0, model.num_layers={m.num_layers})")
    if m.rope_scaling is not None and "factor" in m.rope_scaling:
        factor = m.rope_scaling["factor"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise ConfigError(f"config key 'model.rope_scaling' needs a finite 'factor' > 0, got {factor!r}")
    if m.num_layers > MAX_LAYERS:
        raise ConfigError(f"config key 'model.num_layers' must be at most {MAX_LAYERS}, got {m.num_layers}")
    if d.global_batch_size * d.seq_len > _MAX_STEP_TOKENS:
        raise ConfigError(f"config keys data.global_batch_size={d.global_batch_size} x data.seq_len={d.seq_len} make "
                          f"{d.global_batch_size * d.seq_len:.3g} tokens per step (> 2**40): one of them has a typo")
    if cfg.parallel.fake_world_size > _MAX_FAKE_WORLD:
        raise ConfigError(f"config key 'parallel.fake_world_size' must be at most {_MAX_FAKE_WORLD} ranks, got "
                          f"{cfg.parallel.fake_world_size}")
    if d.num_workers > _MAX_WORKERS:
        raise ConfigError(f"config key 'data.num_workers'={d.num_workers} is more than {_MAX_WORKERS} processes per "
                          "rank: use a few (about the CPU cores per rank)")
    head_dim = m.head_dim or m.hidden_size // m.num_heads
    mlp = 3 * m.hidden_size * m.intermediate_size
    if m.backbone == "moe":
        mlp = max(mlp, m.hidden_size * (m.num_experts * (3 * m.moe_intermediate_size + 1)
                                        + 3 * m.shared_expert_intermediate_size))
    params = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2) + \
        m.num_layers * (m.hidden_size * head_dim * 2 * (m.num_heads + m.num_kv_heads) + mlp)
    if params > _MAX_BACKBONE_PARAMS:
        raise ConfigError(f"config keys model.vocab_size={m.vocab_size}, model.hidden_size={m.hidden_size}, "
                          f"model.intermediate_size={m.intermediate_size}, model.num_layers={m.num_layers} (and the "
                          f"MoE sizes) make a backbone of {params:.2g} parameters (> {_MAX_BACKBONE_PARAMS:.0e}): "
                          "one of them has a typo")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # no permission to look: ensure_dir tells at the start of the run
        return False


def _check_dirs(cfg: Config) -> None:
    """Folder keys name a folder (or a path one can be made at), not a file and not ''."""
    for key, value in (("train.output_dir", cfg.train.output_dir), ("data.cache_dir", cfg.data.cache_dir)):
        if not value.strip():
            raise ConfigError(f"config key '{key}' is empty: name a folder")
        path = expand_path(value)
        blocker = next((q for q in (path, *path.parents) if _exists(q)), None)
        if blocker is not None and not blocker.is_dir():
            what = "is" if blocker == path else f"is below {str(blocker)!r}, which is"
            raise ConfigError(f"config key '{key}'={value!r} {what} a file, not a directory: name a folder")


def ensure_dir(key: str, value: str) -> Path:
    """The folder of config key `key`, created if missing; a ConfigError if it cannot be
    (no permission, read-only or full file system)."""
    path = expand_path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(f"config key '{key}'={value!r}: cannot create the folder ({reason}): name a "
                          "writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"config key '{key}'={value!r} is not writable: name a writable folder")
    return path


# Keys of a part spec (model.encoders / model.decoders entries) that are not the part's own options.
_PART_BOOL_KEYS = ("freeze", "project")


def _check_part_specs(m: ModelConfig) -> None:
    """The engine's own keys of each part spec; the part's options are checked where it is built."""
    seen: dict[str, str] = {}
    for kind in ("encoders", "decoders"):
        for i, spec in enumerate(getattr(m, kind)):
            where = f"model.{kind}[{i}]"
            name = spec.get("name") if isinstance(spec, dict) else None
            if not isinstance(name, str) or not name:
                raise ConfigError(f"config key '{where}' needs a 'name' (a registered {kind[:-1]}), e.g. "
                                  f"{{name: {'vision' if kind == 'encoders' else 'image_vq'}, ...}}, got {spec!r}")
            if name in seen:
                raise ConfigError(f"config key '{where}': part {name!r} is already {seen[name]}; list each part once")
            seen[name] = where
            for key in _PART_BOOL_KEYS:
                if key in spec and not isinstance(spec[key], bool):
                    raise ConfigError(f"config key '{where}.{key}' expects bool (true or false), got {spec[key]!r}")
            if "activation_checkpointing" in spec:
                checkpointing_mode(spec["activation_checkpointing"], f"{where}.activation_checkpointing")
            if spec.get("init_from") is not None and not isinstance(spec["init_from"], str):
                raise ConfigError(f"config key '{where}.init_from' expects a path, got {spec['init_from']!r}")
            recipe = spec.get("recipe", "fsdp")
            if recipe not in PART_RECIPES or (kind == "decoders" and recipe != "fsdp"):
                allowed = PART_RECIPES if kind == "encoders" else ("fsdp",)
                raise ConfigError(f"config key '{where}.recipe' must be one of {', '.join(allowed)} "
                                  f"({kind} support those), got {recipe!r}")
            if "loss_weight" in spec:
                w = spec["loss_weight"]
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                    raise ConfigError(f"config key '{where}.loss_weight' must be a finite number >= 0, got {w!r}")
            ph = spec.get("placeholder")
            if ph is not None and (isinstance(ph, bool) or not isinstance(ph, int) or not 0 <= ph < m.vocab_size):
                raise ConfigError(f"config key '{where}.placeholder' must be a token id in [0, model.vocab_size="
                                  f"{m.vocab_size}), got {ph!r}")
