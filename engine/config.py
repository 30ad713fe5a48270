"""Typed configuration: nested dataclasses, loaded from YAML, overridden from the CLI.

Every user mistake (unknown key, wrong type, impossible layout) raises `ConfigError`
with one line that names the key, the value and the fix. Entry points turn it into
exit code 2; nothing here ever lets a bad value travel into torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


__all__ = ["CheckpointConfig", "Config", "ConfigError", "DataConfig", "ModelConfig", "ParallelConfig", "TrainConfig",
           "expand_path", "load_config", "parse_overrides", "resolve_layout"]


class ConfigError(ValueError):
    """A user-facing configuration mistake. The message is one line and says the fix."""


@dataclass
class ModelConfig:
    """The language backbone. Names follow Hugging Face's Llama/Qwen configs."""

    backbone: str = "dense"
    """Registered backbone name."""
    vocab_size: int = 2048
    """Embedding rows; also the size the project's sentencepiece tokenizer is trained to."""
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    """Fewer KV heads than query heads = grouped-query attention."""
    head_dim: Optional[int] = None
    """Per-head width; None = hidden_size // num_heads (Qwen3 sets it explicitly)."""
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    """None, {type: linear, factor: F} or Llama 3's {type: llama3, factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings}."""
    mrope_section: Optional[list[int]] = None
    """Multimodal RoPE (Qwen2-VL): rotary bands per position axis (temporal, height, width),
    summing to head_dim / 2; batches then carry [3, B, S] positions."""
    seconds_per_chunk: Optional[float] = None
    """Qwen2.5-Omni's time-aligned M-RoPE (TMRoPE): the data gives audio and video positions on
    one clock (the vision part's tokens_per_second per second) in chunks of this many seconds;
    None: Qwen2-VL's M-RoPE. Set from the checkpoint by model.init_from."""
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False
    """RMSNorm on each head's queries and keys (Qwen3)."""
    attention_bias: bool = False
    """Bias on the Q/K/V projections (Qwen2)."""
    tie_embeddings: bool = False
    init_std: float = 0.02
    num_experts: int = 0
    """Routed experts per MoE layer (backbone: moe); 0 = every MLP is dense."""
    num_experts_per_tok: int = 2
    """Top-k experts per token."""
    moe_intermediate_size: int = 128
    norm_topk_prob: bool = True
    """Renormalise the top-k router probabilities to sum to 1 (Qwen3-MoE)."""
    decoder_sparse_step: int = 1
    """Every N-th layer is MoE (Hugging Face's decoder_sparse_step)."""
    mlp_only_layers: list[int] = field(default_factory=list)
    """Layer indices that keep a dense MLP (Hugging Face's mlp_only_layers)."""
    router_aux_loss_coef: float = 0.001
    """Coefficient of the Switch-style load-balancing loss (over the global batch)."""
    router_z_loss_coef: float = 0.0
    """Coefficient of the router z-loss (ST-MoE); 0 disables it."""
    shared_expert_intermediate_size: int = 0
    """Width of a sigmoid-gated shared expert (Qwen2-MoE); 0 = none."""
    attention_backend: str = "auto"
    """auto (CUDA bf16: the flash-attn package where installed, else torch's varlen flash kernel;
    CUDA fp32: sdpa; CPU: sdpa below 2048 tokens per row, sdpa_doc from there), sdpa (one call
    with a document mask), sdpa_doc (one causal call per document, no S x S mask), varlen
    (torch.nn.attention.varlen, CUDA + bf16), flash_attn (the flash-attn package, CUDA + bf16),
    eager (reference). The vision towers take the same varlen kernel as the backbone."""
    fused_loss: str = "auto"
    """The LM heads' cross-entropy (text and decoders) without [tokens, vocab] logits
    (engine/ops/fused_loss.py): auto (Liger-Kernel on CUDA where liger-kernel is installed,
    else the chunked PyTorch path), liger (CUDA + liger-kernel), chunked, or off (plain logits)."""
    encoders: list[dict] = field(default_factory=list)
    """Omni parts that read a modality, by registered name, e.g. [{name: vision, depth: 2,
    freeze: false, init_from: null, recipe: fsdp}]; other keys are the part's options."""
    decoders: list[dict] = field(default_factory=list)
    """Omni parts that generate a modality (e.g. image_vq), same form as encoders, plus
    `loss_weight` (default 1)."""
    plugins: list[str] = field(default_factory=list)
    """Python files or modules imported before the model is built, so that parts they
    register with @register_encoder / @register_decoder can be named above."""
    init_from: Optional[str] = None
    """Start training from these weights: a Hugging Face folder (config.json + safetensors) or one written by
    tools/convert_hf_checkpoint.py import. Loaded shard by shard after materialisation; ignored when resuming."""


@dataclass
class ParallelConfig:
    """Degrees of each parallelism; their product must equal the world size."""

    dp_replicate: int = 1
    """HSDP replica groups (gradients all-reduced between them)."""
    dp_shard: int = -1
    """FSDP shard degree; -1 = whatever is left of the world size."""
    sp_size: int = 1
    """Ulysses sequence-parallel degree."""
    sp_async: bool = False
    """Overlap the Ulysses all-to-alls with the Q/K/V projections."""
    ep_size: int = 1
    """Expert-parallel degree, carved out of dp_shard x sp."""
    ep_overlap: bool = False
    """Overlapped EP dispatcher: chunk i's experts compute while chunk i+1's tokens travel."""
    ep_chunks: int = 2
    """Chunks of the overlapped dispatcher."""
    activation_checkpointing: str = "none"
    """Recompute in backward instead of keeping activations, per backbone block: none, full (the
    whole block; only its input stays), selective (keep matmul, attention and collective outputs,
    recompute norms, activations, elementwise ops). true = full, false = none. Parts have their
    own key (model.encoders[i].activation_checkpointing). See engine/parallel/activation_memory.py."""
    activation_offload: bool = False
    """Keep the tensors saved for backward in host memory (pinned, copied on a side CUDA stream)
    between forward and backward; no effect when they already live on the host (CPU runs)."""
    backend: str = "auto"
    """Process-group backend: auto (nccl on CUDA, else gloo), nccl, gloo or fake."""
    fake_world_size: int = 1
    """World size the `fake` backend pretends to have (one process, no real traffic)."""
    fake_rank: int = 0


@dataclass
class DataConfig:
    dataset: str = "shakespeare"
    seq_len: int = 256
    global_batch_size: int = 16
    """Sequences per optimizer step, identical whatever the parallel layout."""
    micro_batch_size: int = 0
    """Sequences per forward pass on one rank; 0 = the whole local batch (no accumulation)."""
    cache_dir: str = "~/.cache/omni-engine"
    """Where the corpus, tokenizer and token arrays are cached."""
    tokenizer: str = "sentencepiece"
    """A tokenizer trained on the corpus with exactly the model's text ids (model.vocab_size
    less one placeholder id per omni part): sentencepiece (small vocabularies; at most ~74k
    on Shakespeare) or bpe (byte-level BPE with Hugging Face tokenizers, any size up to
    ~1M: 151,933 ids train in about 20 s); or a path: a Hugging Face tokenizer folder
    (tokenizer.json), a tokenizer.json or a sentencepiece .model. With the text and
    conversations datasets, the tokenizer in model.init_from's folder wins over a trained one."""
    path: Optional[list[str]] = None
    """text / conversations datasets: a file, a folder, a glob, or a list of them (JSONL,
    Parquet, or a folder written by tools/prepare_data.py)."""
    weights: Optional[list[float]] = None
    """One weight per data.path entry: each source is drawn in proportion (a mixture)."""
    text_field: str = "text"
    """The column / JSON key holding a document's text (data.dataset=text)."""
    chat_template: Optional[str] = None
    """A Jinja chat template file overriding the tokenizer's own (data.dataset=conversations)."""
    train_on: str = "assistant"
    """conversations: assistant (targets are the assistant turns) or all (every token)."""
    truncate: bool = False
    """A sample longer than data.seq_len keeps its head (true) or is skipped and counted (false)."""
    eval_path: Optional[list[str]] = None
    """Validation data, same forms as data.path; its loss is logged every train.eval_interval."""
    eval_fraction: float = 0.0
    """Without eval_path: hold out this fraction of the documents (seeded) for validation."""
    strict: bool = False
    """Bad samples (unreadable payloads, samples longer than seq_len) raise an error naming
    the file and line instead of being skipped and counted in metrics.jsonl."""
    plugins: list[str] = field(default_factory=list)
    """Modules (dotted names or .py paths) imported before the data is built, so that the
    datasets they define with `register_dataset` can be named in data.dataset."""
    min_pixels: Optional[int] = None
    """conversations with images and videos: fewest pixels an image or a video frame is resized to
    (Qwen2-VL's smart_resize); None: the tokenizer folder's preprocessor_config.json, else
    Qwen2-VL's own (56 * 56 for images, 128 * 28 * 28 for video frames)."""
    max_pixels: Optional[int] = None
    """conversations with images and videos: most pixels an image or a video frame is resized to;
    None: the folder's preprocessor_config.json, else Qwen2-VL's own (28 * 28 * 1280 for images,
    768 * 28 * 28 for video frames)."""
    video_fps: float = 2.0
    """conversations with videos: frames sampled per second of video (Qwen2-VL's default)."""
    max_frames: int = 768
    """conversations with videos: at most this many frames sampled from one video."""
    use_audio_in_video: bool = False
    """conversations with videos, for a model with a vision and an audio part: each video file's
    own audio track (if it has one) is read too, as Qwen2.5-Omni's processor does with
    use_audio_in_video=True: an audio payload whose tokens interleave with the video's every
    model.seconds_per_chunk (a Qwen2.5-Omni checkpoint and its media tokens) or else follow them.
    A video without an audio stream is read alone. No effect without both parts."""
    num_workers: int = 0
    """Background processes that build (and decode the media of) the coming steps' batches;
    0 builds them in the training process."""


@dataclass
class TrainConfig:
    steps: int = 250
    seed: int = 0
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Max global gradient norm over the whole mesh; 0 disables clipping."""
    dtype: str = "fp32"
    """fp32, bf16 (bf16 compute with fp32 master weights and fp32 gradient reduction), or fp8
    (bf16, plus float8 matmuls in the linear layers: train.fp8_backend, engine/parallel/float8.py)."""
    fp8_backend: str = "torchao"
    """With train.dtype=fp8: torchao (float8 training of torchao, CPU and CUDA) or te (Transformer Engine, CUDA)."""
    fp8_recipe: str = "tensorwise"
    """Float8 scaling: tensorwise (one scale per tensor, from its current values), rowwise (torchao:
    one per row, power-of-two scales) or delayed (te: scales from an amax history)."""
    output_dir: str = "outputs/default"
    deterministic: bool = False
    """torch.use_deterministic_algorithms and fixed thread count, for bit-stable reruns."""
    log_interval: int = 1
    tensorboard: bool = True
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda."""
    progress_bar: bool = True
    compile: bool = False
    """torch.compile each transformer block (after activation checkpointing, before FSDP)."""
    tf32: bool = True
    """On CUDA, fp32 matmuls use TF32 tensor cores (about 7x faster on an H100, 10-bit mantissa
    products); false keeps full fp32. MFU is measured against the matching peak."""
    eval_interval: int = 0
    """Every N steps (and at the end), the validation loss (data.eval_path / eval_fraction); 0 = never."""
    eval_batches: int = 0
    """Global batches per validation; 0 = the whole validation set."""
    max_bad_steps: int = 5
    """A step whose loss or gradient norm is not finite is skipped (no optimizer update, no
    checkpoint); this many consecutive skipped steps stop the run with an error (exit code 3)."""


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Save every N optimizer steps (and always at the end); 0 = only at the end."""
    resume: str = "auto"
    """auto = latest complete checkpoint in output_dir, none, or a checkpoint directory."""
    enabled: bool = True
    keep_last: Optional[int] = None
    """Keep only the newest N complete checkpoints (older ones are removed once a new one is
    complete); 0 or null = keep all."""
    async_save: bool = False
    """Write checkpoints in a background thread (DCP async_save): the step only waits for the
    copy to CPU memory; COMPLETE is written once the files are on disk."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_CHOICES = {
    "model.backbone": ("dense", "moe"),
    "model.attention_backend": ("auto", "sdpa", "sdpa_doc", "varlen", "flash_attn", "eager"),
    "model.fused_loss": ("auto", "liger", "chunked", "off"),
    "parallel.backend": ("auto", "nccl", "gloo", "fake"),
    "train.dtype": ("fp32", "bf16", "fp8"),
    "train.fp8_backend": ("torchao", "te"),
    "train.fp8_recipe": ("tensorwise", "rowwise", "delayed"),
    "data.train_on": ("assistant", "all"),
    "train.device": ("auto", "cpu", "cuda"),
}


def _section_class(name: str) -> type:
    return {"model": ModelConfig, "parallel": ParallelConfig, "data": DataConfig,
            "train": TrainConfig, "checkpoint": CheckpointConfig}[name]


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s in _SECTIONS for f in dataclasses.fields(_section_class(s))]


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else " (see engine/config.py for the valid keys)"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert `value` to the field's type, or raise a ConfigError naming key and value."""
    hints = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    if hints:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        annotation = next(h for h in hints if h is not type(None))
    expected = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    bad = ConfigError(f"config key '{key}' expects {expected}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad
    if annotation is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise bad from None
        raise bad
    if annotation is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise bad
        return str(value)
    if typing.get_origin(annotation) is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str) and item is not dict:
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    raise AssertionError(f"unhandled config type {annotation} for {key}")


CHECKPOINTING_MODES = ("none", "full", "selective")
"""Values of parallel.activation_checkpointing and of a part's activation_checkpointing."""


def checkpointing_mode(value: Any, key: str) -> str:
    """An activation_checkpointing value as one of CHECKPOINTING_MODES (true = full, false = none)."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in CHECKPOINTING_MODES:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(CHECKPOINTING_MODES)} (or true = full, "
                          f"false = none), got {value!r}")
    return value


def _set(cfg: Config, key: str, value: Any) -> None:
    if key == "parallel.activation_checkpointing":  # the bool it used to be keeps its meaning
        value = checkpointing_mode(value, key)
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in _SECTIONS:
        raise _unknown(key)
    section = getattr(cfg, parts[0])
    types_by_name = typing.get_type_hints(type(section))
    if parts[1] not in types_by_name:
        raise _unknown(key)
    setattr(section, parts[1], _coerce(key, value, types_by_name[parts[1]]))


def _flatten(tree: dict, source: str) -> dict[str, Any]:
    flat = {}
    for section, values in tree.items():
        if section not in _SECTIONS:
            raise _unknown(str(section))
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{section}' in {source} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def parse_overrides(argv: list[str]) -> tuple[Optional[str], list[tuple[str, str]]]:
    """Split `--config PATH` and `--section.key=value` / `--section.key value` arguments."""
    config_path, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}': use --section.key=value or --config PATH")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"argument '{arg}' needs a value: write {arg}=VALUE")
            key, value = body, argv[i + 1]
            i += 1
        if key == "config":
            config_path = value
        else:
            overrides.append((key, value))
        i += 1
    return config_path, overrides


def load_config(path: Optional[str] = None, overrides: Optional[list[tuple[str, str]]] = None) -> Config:
    """Defaults, then the YAML file, then CLI overrides (values parsed as YAML scalars)."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist: pass an existing YAML file to --config")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(f"config file '{path}' is not valid YAML{where}: fix its syntax") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{path}' must be a mapping of sections (model, parallel, data, train, checkpoint)")
        for key, value in _flatten(tree, path).items():
            _set(cfg, key, value)
    for key, raw in overrides or []:
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set(cfg, key, value)
    from engine.config_validation import validate  # the checks import this module's classes

    validate(cfg)
    return cfg


MAX_LAYERS = 4096
"""Most layers a backbone or a part's stack may have (30x the deepest trained transformers):
more is a typo, and would exhaust memory with module objects while building on the meta device."""

PART_RECIPES = ("fsdp", "replicate")
"""A part's `recipe` (engine/parallel/part_recipes.py): its own FSDP unit, or replicated."""


def resolve_layout(cfg: Config, world_size: int) -> dict[str, int]:
    """Fill dp_shard=-1 and check that the degrees multiply to the world size."""
    p, d = cfg.parallel, cfg.data
    fixed = p.dp_replicate * p.sp_size
    if p.dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(f"parallel layout impossible: world size {world_size} is not divisible by "
                              f"parallel.dp_replicate*parallel.sp_size = {fixed}; change the degrees or the number of processes")
        dp_shard = world_size // fixed
    else:
        dp_shard = p.dp_shard
    if fixed * dp_shard != world_size:
        raise ConfigError(f"parallel layout impossible: dp_replicate({p.dp_replicate}) x dp_shard({dp_shard}) x "
                          f"sp_size({p.sp_size}) = {fixed * dp_shard} but the world size is {world_size}; "
                          "set parallel.dp_shard=-1 to fill, or launch that many processes")
    if (dp_shard * p.sp_size) % p.ep_size:
        raise ConfigError(f"parallel layout impossible: parallel.ep_size={p.ep_size} must divide dp_shard x sp_size = "
                          f"{dp_shard * p.sp_size} (experts are sharded over ranks carved out of those)")
    dp = p.dp_replicate * dp_shard
    if d.global_batch_size % dp:
        raise ConfigError(f"config key 'data.global_batch_size'={d.global_batch_size} is not divisible by the "
                          f"data-parallel degree {dp} (dp_replicate x dp_shard); pick a multiple of {dp}")
    local = d.global_batch_size // dp
    micro = d.micro_batch_size or local
    if local % micro:
        raise ConfigError(f"config key 'data.micro_batch_size'={micro} does not divide the per-rank batch {local} "
                          f"(data.global_batch_size / {dp} ranks); pick a divisor of {local}")
    return {"dp_replicate": p.dp_replicate, "dp_shard": dp_shard, "sp": p.sp_size, "ep": p.ep_size,
            "dp": dp, "local_batch": local, "micro_batch": micro, "grad_accum": local // micro}


def expand_path(path: str) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(path)))
