"""Hugging Face interop (Llama, Qwen2, Qwen3 and Qwen3-MoE): configs, names, weights.

Our parameter names are Hugging Face's without the `model.` prefix (and `blocks.` for
`model.layers.`), so the mapping is a rename. Weights are only ever read from safetensors,
one tensor at a time (`safe_open`), never with pickle or remote code:

- `load_pretrained(path)` builds a one-process model (dense or MoE backbone) from a folder,
- `load_weights_(model, path)` fills an already built, possibly FSDP-sharded and
  expert-parallel model in place: each rank reads one full tensor at a time (under EP only
  its experts' rows) and keeps only its own shard (the peak is the largest tensor, never
  the model), like `engine.parallel.materialize`.

Qwen3-MoE experts: our `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj`
[E, H, I] are transformers 5's in-memory layout, but its `save_pretrained` writes one
tensor per expert (`mlp.experts.{e}.gate_proj.weight` [I, H], `up_proj`, `down_proj`
[H, I]), as the hub checkpoints do. Both forms are read: per-expert tensors are stacked
into the fused layout (gate rows first) one expert at a time, straight into the output;
export writes the per-expert form.

A folder is either a Hugging Face one (`config.json`, `model.safetensors` or
`model-0000i-of-0000n.safetensors` + index) or one written by
`tools/convert_hf_checkpoint.py import` (`config.yaml`, `weights*.safetensors` with our
names). Every problem is a one-line `HFCheckpointError` (a `ValueError`) saying the fix.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from engine.config import ModelConfig
from engine.models import build_backbone
from engine.models.moe import Experts

from .adapters import TEXT, TextAdapter
from .qwen2_vl import FAMILIES
from .manager import CheckpointError
from engine.tensor_files import MissingShardError as MissingTensorShard
from engine.tensor_files import TensorFileError, model_files

from .safetensors_io import TensorSpec, read_header

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = TextAdapter.architectures
# Whole multimodal checkpoints (Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni's thinker and whole model):
# load_pretrained, init_from and export through qwen2_vl.py; Janus through janus.py.
MULTIMODAL_ARCHITECTURES = tuple(FAMILIES) + ("JanusForConditionalGeneration",)
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                "Qwen3MoeForCausalLM": "qwen3_moe"}
_ROPE_TYPES = ("default", "linear", "llama3")
# Keys some Hugging Face checkpoints carry that are not parameters (recomputed buffers).
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# One expert's tensor as save_pretrained writes it: (prefix ending in .experts, expert, projection).
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = ("gate_up_proj", "down_proj")


class HFCheckpointError(CheckpointError):
    """A Hugging Face folder or imported checkpoint that cannot be used; one line with the fix."""


class UnsupportedArchitectureError(HFCheckpointError):
    pass


class MissingShardError(HFCheckpointError):
    pass


class ShapeMismatchError(HFCheckpointError):
    pass


class KeyMismatchError(HFCheckpointError):
    pass


# ---- names (the text families' adapter: engine/checkpoint/adapters.py) -------------------
def hf_to_ours(name: str) -> str:
    return TEXT.from_hf(name)


def ours_to_hf(name: str) -> str:
    return TEXT.to_hf(name)


def is_fused_expert(name: str) -> bool:
    """Our fused expert tensors ([experts, ...]): exported one tensor per expert."""
    return name.rsplit(".", 1)[-1] in _FUSED and name.rsplit(".", 2)[-2] == "experts"


def per_expert_names(name: str, num_experts: int) -> list[str]:
    """Hugging Face names of one fused tensor's pieces, in the order they stack (gate before up)."""
    prefix, fused = ours_to_hf(name).rsplit(".", 1)
    projs = ("gate_proj", "up_proj") if fused == "gate_up_proj" else ("down_proj",)
    return [f"{prefix}.{e}.{p}.weight" for e in range(num_experts) for p in projs]


def clean_name(name: str) -> str:
    """Drop the prefixes that wrappers (activation checkpointing, compile) add to parameter names."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


# ---- configs ---------------------------------------------------------------------------
def _rope_from_hf(hf: dict, source: str) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or 4.x's top-level keys."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", legacy.get("rope_theta", 10000.0))))
    scaling = {k: v for k, v in ({**legacy, **params}).items() if k not in ("rope_theta", "type", "rope_type")}
    kind = params.get("rope_type", params.get("type", legacy.get("rope_type", legacy.get("type", "default"))))
    if kind not in _ROPE_TYPES:
        raise UnsupportedArchitectureError(f"{source}: rope type {kind!r} is not supported: supported rope types are "
                                           f"{', '.join(_ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    keep = ("factor",) if kind == "linear" else ("factor", "low_freq_factor", "high_freq_factor",
                                                 "original_max_position_embeddings")
    return theta, {"rope_type": kind, **{k: scaling[k] for k in keep if k in scaling}}


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a Hugging Face `config.json` dict."""
    archs = hf.get("architectures") or [None]
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{source}: architecture {arch!r} is not supported: supported architectures are "
            f"{', '.join(SUPPORTED_ARCHITECTURES + MULTIMODAL_ARCHITECTURES)}")

    def need(key: str):
        if hf.get(key) is None:
            raise HFCheckpointError(f"{source} lacks '{key}', which a {arch} config must have: add it to config.json")
        return hf[key]

    def unsupported(what: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(f"{source}: {arch} with {what} is not supported: "
                                            "use a checkpoint without it")

    if hf.get("hidden_act", "silu") != "silu":
        raise unsupported(f"hidden_act={hf['hidden_act']!r} (only silu)")
    if hf.get("mlp_bias"):
        raise unsupported("mlp_bias=true")
    if arch == "Qwen2ForCausalLM":
        bias, qk_norm = True, False  # Qwen2 always has Q/K/V biases and no O bias
        if hf.get("use_sliding_window"):
            raise unsupported("use_sliding_window=true")
    else:  # Llama and Qwen3(-MoE) put `attention_bias` on o_proj as well, which our blocks lack
        if hf.get("attention_bias"):
            raise unsupported("attention_bias=true (a bias on o_proj too)")
        bias, qk_norm = False, arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
        if arch == "Qwen3MoeForCausalLM" and hf.get("use_sliding_window"):
            raise unsupported("use_sliding_window=true")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise HFCheckpointError(f"{source}: num_key_value_heads={kv_heads} does not divide "
                                f"num_attention_heads={heads}: fix config.json")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) == hidden // heads and hidden % heads == 0:
        head_dim = None  # the default; keeps configs comparable
    theta, scaling = _rope_from_hf(hf, source)
    moe = _moe_from_hf(hf, source) if arch == "Qwen3MoeForCausalLM" else {}
    return ModelConfig(
        vocab_size=int(need("vocab_size")), hidden_size=hidden, intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")), num_heads=heads, num_kv_heads=kv_heads,
        head_dim=None if head_dim is None else int(head_dim), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qk_norm=qk_norm, attention_bias=bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **moe)


def _moe_from_hf(hf: dict, source: str) -> dict:
    """The MoE fields of ModelConfig from a Qwen3-MoE config (transformers' defaults where a key is absent).

    transformers 5 writes `num_local_experts` (its attribute map), the hub configs `num_experts`."""
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if experts is None:
        raise HFCheckpointError(f"{source} lacks 'num_experts' (or 'num_local_experts'), which a Qwen3MoeForCausalLM "
                                "config must have: add it to config.json")
    experts = int(experts)
    if experts == 0:  # every MLP dense: transformers builds a plain Qwen3 then
        return {}
    top_k = int(hf.get("num_experts_per_tok", 8))
    if not 1 <= top_k <= experts:
        raise HFCheckpointError(f"{source}: num_experts_per_tok={top_k} must be in [1, num_experts={experts}]: "
                                "fix config.json")
    if hf.get("moe_intermediate_size") is None:
        raise HFCheckpointError(f"{source} lacks 'moe_intermediate_size', which a Qwen3MoeForCausalLM config must "
                                "have: add it to config.json")
    return dict(backbone="moe", num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=int(hf["moe_intermediate_size"]),
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                decoder_sparse_step=int(hf.get("decoder_sparse_step", 1) or 1),
                mlp_only_layers=[int(i) for i in hf.get("mlp_only_layers") or []],
                router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)), router_z_loss_coef=0.0)


def hf_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face class that computes exactly what `cfg` does."""
    if cfg.qk_norm and cfg.attention_bias:
        raise UnsupportedArchitectureError("model.qk_norm=true together with model.attention_bias=true matches none of "
                                           f"{', '.join(SUPPORTED_ARCHITECTURES)}: export needs one of them off")
    if cfg.backbone == "moe":
        if not cfg.qk_norm or cfg.attention_bias or cfg.shared_expert_intermediate_size:
            raise UnsupportedArchitectureError(
                "a model.backbone=moe model exports as Qwen3MoeForCausalLM, which needs model.qk_norm=true, "
                "model.attention_bias=false and model.shared_expert_intermediate_size=0: train with those settings")
        return "Qwen3MoeForCausalLM"
    return "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.attention_bias else "LlamaForCausalLM"


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype, template: Optional[dict] = None,
                         token_ids: Optional[dict] = None) -> dict:
    """A `config.json` dict for `cfg`; other keys (token ids, ...) are kept from `template`."""
    arch = hf_architecture(cfg)
    out = dict(template or {})
    if out.get("architectures", [arch])[0] != arch:  # another family: its extra keys would not apply
        out = {k: out[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in out}
    for key in ("rope_theta", "rope_scaling", "torch_dtype", "transformers_version"):
        out.pop(key, None)
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling:
        kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type", "default"))
        rope.update({k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}, rope_type=kind)
    out.update(
        architectures=[arch], model_type=_MODEL_TYPES[arch], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings, dtype=str(dtype).removeprefix("torch."))
    if arch == "LlamaForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    elif arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        out.update(attention_bias=False)
    if arch == "Qwen3MoeForCausalLM":
        # the name the template used (transformers writes num_local_experts, hub configs num_experts)
        experts_key = "num_local_experts" if "num_local_experts" in out else "num_experts"
        out.pop("num_local_experts" if experts_key == "num_experts" else "num_experts", None)
        out.update({experts_key: cfg.num_experts}, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                   decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers),
                   router_aux_loss_coef=cfg.router_aux_loss_coef)
    if arch != "LlamaForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None)
        out.pop("layer_types", None)
    out.update(token_ids or {})
    return dict(sorted(out.items()))


_COMPARED = ("backbone", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
             "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps", "qk_norm", "attention_bias", "tie_embeddings")
# What a MoE backbone computes besides (router_aux_loss_coef and the z-loss only shape training).
_COMPARED_MOE = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                 "decoder_sparse_step", "mlp_only_layers", "shared_expert_intermediate_size")


def _normalised(cfg: ModelConfig, key: str):
    if key == "head_dim":
        return cfg.head_dim or cfg.hidden_size // cfg.num_heads
    if key == "rope_scaling":
        s = cfg.rope_scaling or {}
        kind = s.get("rope_type", s.get("type", "default"))
        return None if kind == "default" else {"rope_type": kind, **{k: v for k, v in s.items()
                                                                     if k not in ("type", "rope_type")}}
    if key == "mlp_only_layers":
        return sorted(int(i) for i in cfg.mlp_only_layers or [])
    return getattr(cfg, key)


def check_config_matches(saved: ModelConfig, run: ModelConfig, what: str, run_name: str = "the run config") -> None:
    """The run's model config must compute what the checkpoint holds (shape-free keys such as rope_theta included).

    `what` starts the message, e.g. "model.init_from=DIR holds a model with"."""
    keys = _COMPARED + (_COMPARED_MOE if saved.backbone == "moe" and run.backbone == "moe" else ())
    for key in keys:
        a, b = _normalised(saved, key), _normalised(run, key)
        same = math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            value = json.dumps(a) if isinstance(a, (dict, list)) else a
            raise HFCheckpointError(f"{what} model.{key}={value} but {run_name} has {b}: set --model.{key}={value} "
                                    "(or use the config that came with the weights)")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_backbone(cfg)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


# ---- folders ---------------------------------------------------------------------------
@dataclasses.dataclass
class Entry:
    name: str
    """Our parameter name."""
    source: str
    """The tensor's name in its file (for a stacked entry, a pattern naming its pieces)."""
    file: Path
    spec: TensorSpec
    """Our tensor's dtype and shape."""
    parts: tuple = ()
    """Stacked from per-expert tensors: for each expert, the ((source, file), ...) pieces that are
    concatenated along dim 0 (gate then up for gate_up_proj) to form row `expert` of the tensor."""


class TensorReader:
    """Reads entries from their safetensors files, opened on first use: a whole tensor, or a block
    of its rows (an EP rank's experts) without reading the others."""

    def __init__(self) -> None:
        self._open: dict[Path, object] = {}

    def _handle(self, file: Path):
        from safetensors import safe_open

        if file not in self._open:
            self._open[file] = safe_open(str(file), framework="pt")
        return self._open[file]

    def close(self) -> None:
        self._open.clear()

    def read(self, e: Entry, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        if not e.parts:
            if rows is None:
                return self._handle(e.file).get_tensor(e.source)
            return self._handle(e.file).get_slice(e.source)[rows[0]:rows[1]]
        lo, hi = rows or (0, e.spec.shape[0])
        out = torch.empty((hi - lo, *e.spec.shape[1:]), dtype=e.spec.dtype)
        for row, pieces in enumerate(e.parts[lo:hi]):  # one expert's pieces at a time, into place
            at = 0
            for source, file in pieces:
                t = self._handle(file).get_tensor(source)
                out[row, at:at + t.shape[0]] = t
                at += t.shape[0]
        return out


def _stack_experts(entries: list[Entry], where: Path) -> list[Entry]:
    """Replace the per-expert tensors of each MoE layer (`...experts.{e}.gate_proj.weight`, ...)
    by two stacked entries in our fused layout, checking that every expert is complete."""
    groups: dict[str, dict[int, dict[str, Entry]]] = {}
    out: list = []
    for e in entries:
        m = _PER_EXPERT.match(e.source)
        if m is None:
            out.append(e)
            continue
        prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
        if prefix not in groups:
            groups[prefix] = {}
            out.append(prefix)  # the stacked entries take the place of the first piece
        groups[prefix].setdefault(expert, {})[proj] = e
    result = []
    for item in out:
        if isinstance(item, Entry):
            result.append(item)
            continue
        experts = groups[item]
        n = max(experts) + 1
        for fused, projs in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            pieces = []
            for ex in range(n):
                for proj in projs:
                    if proj not in experts.get(ex, {}):
                        raise KeyMismatchError(f"{where} lacks '{item}.{ex}.{proj}.weight' but has other experts of "
                                               f"{item} (up to {n - 1}): the checkpoint is incomplete; re-save it")
                first = experts[0][projs[0]]
                for proj in projs:
                    piece = experts[ex][proj]
                    if piece.spec.shape != first.spec.shape or piece.spec.dtype != first.spec.dtype:
                        raise ShapeMismatchError(
                            f"tensor '{piece.source}' in {piece.file.name} is {piece.spec.dtype} {piece.spec.shape} "
                            f"but '{first.source}' is {first.spec.dtype} {first.spec.shape}: every expert must have "
                            "the same shape and dtype; re-save the checkpoint")
                pieces.append(tuple((experts[ex][proj].source, experts[ex][proj].file) for proj in projs))
            rows, cols = first.spec.shape
            name = hf_to_ours(f"{item}.{fused}")
            spec = TensorSpec(name, first.spec.dtype, (n, rows * len(projs), cols))
            source = f"{item}.{{0..{n - 1}}}.{'/'.join(projs)}.weight"
            result.append(Entry(name, source, first.file, spec, tuple(pieces)))
    return result


class WeightFolder:
    """The safetensors files of a Hugging Face folder or of an imported one, read header-only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise HFCheckpointError(f"{path} is not a directory: pass a folder with config.json and model.safetensors "
                                    "(or one written by tools/convert_hf_checkpoint.py import)")
        for prefix, fmt in (("weights", "omni"), ("model", "hf")):
            files = self._find(prefix)
            if files:
                self.format, self.files = fmt, files
                break
        else:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
            if pickles:
                raise HFCheckpointError(f"{self.path} holds only PyTorch pickle weights ({pickles[0]}): only safetensors "
                                        "are read; re-save them with save_pretrained(dir, safe_serialization=True)")
            raise HFCheckpointError(f"{self.path} has no model.safetensors or model.safetensors.index.json: pass a "
                                    "Hugging Face model folder saved with safetensors")
        self.entries: list[Entry] = []
        for f in self.files:
            specs, _ = read_header(f)
            for s in specs:
                if not _IGNORED.search(s.name):
                    name = hf_to_ours(s.name) if self.format == "hf" else s.name
                    self.entries.append(Entry(name, s.name, f, s))
        if self.format == "hf":
            self.entries = _stack_experts(self.entries, self.path)
        self._config: Optional[ModelConfig] = None

    def _find(self, prefix: str) -> list[Path]:
        try:
            return model_files(self.path, prefix)
        except TensorFileError as e:
            raise (MissingShardError if isinstance(e, MissingTensorShard) else HFCheckpointError)(str(e)) from None

    def model_config(self) -> ModelConfig:
        if self._config is None:
            if self.format == "hf":
                path = self.path / "config.json"
                if not path.is_file():
                    raise HFCheckpointError(f"{self.path} has no config.json: a Hugging Face folder needs the config "
                                            "that save_pretrained writes")
                self._config = config_from_hf(json.loads(path.read_text()), str(path))
            else:
                from engine.config import load_config
                path = self.path / "config.yaml"
                if not path.is_file():
                    raise HFCheckpointError(f"{self.path} has no config.yaml: re-run tools/convert_hf_checkpoint.py "
                                            "import to rebuild the folder")
                self._config = load_config(str(path)).model
        return self._config

    def plan(self, expected: dict[str, tuple[int, ...]], tied: bool) -> list[Entry]:
        """The entries to load into a model with parameters `expected`; checks keys and shapes first."""
        entries = [e for e in self.entries if not (tied and e.name == "lm_head.weight")]
        present = {e.name for e in entries}
        unexpected = sorted(present - set(expected))
        if unexpected:
            shown = ", ".join(_display(n, self.format) for n in unexpected[:4])
            raise KeyMismatchError(f"{self.path} has {len(unexpected)} unexpected tensor(s) ({shown}) that the model "
                                   "does not have: its config (layers, qk_norm, attention_bias, tie_word_embeddings) "
                                   "does not match the weights; fix the config or the checkpoint")
        missing = [n for n in expected if n not in present]
        if missing:
            shown = ", ".join(_display(n, self.format) for n in missing[:4])
            raise KeyMismatchError(f"{self.path} lacks {len(missing)} tensor(s) the model needs ({shown}): the "
                                   "checkpoint is incomplete or saved for another config; re-save it or fix the config")
        by_name = {e.name: e for e in entries}
        for e in (by_name[n] for n in expected):  # model order: the first layer's first mismatch is reported
            if e.spec.shape != tuple(expected[e.name]):
                raise ShapeMismatchError(
                    f"tensor '{e.source}' in {e.file.name} has shape {tuple(e.spec.shape)} but the model expects "
                    f"{tuple(expected[e.name])}: the weights do not match the config (hidden_size, intermediate_size, "
                    "heads, head_dim, vocab_size); fix the config or use matching weights")
        return entries


def _display(name: str, fmt: str) -> str:
    return f"'{ours_to_hf(name) if fmt == 'hf' else name}'"


def as_folder(source: str | Path | WeightFolder) -> WeightFolder:
    return source if isinstance(source, WeightFolder) else WeightFolder(source)


# ---- loading ---------------------------------------------------------------------------
@torch.no_grad()
def load_weights_(model: nn.Module, source: str | Path | WeightFolder,
                  expect: Optional[ModelConfig] = None) -> int:
    """Copy the weights of `source` into `model` in place, streaming one tensor at a time.

    Parameters may be FSDP DTensors: a rank reads only the rows of its shard (safetensors
    slices), or, for other placements, the full tensor and keeps its shard (no communication). Under expert
    parallelism a module's `global_rows` ({param: (global shape, first row)}) says which rows
    of the checkpoint's tensor this rank holds: only those are read, then sharded the same way.
    With `expect`, the run's model config is first checked against the checkpoint's. Returns
    bytes read.
    """
    from engine.parallel.init import copy_full_, local_rows

    if expect is not None and not isinstance(source, WeightFolder) and not Path(source).is_dir():
        raise HFCheckpointError(f"model.init_from={source} is not a directory: pass a Hugging Face folder "
                                "(config.json + safetensors) or one written by tools/convert_hf_checkpoint.py import")
    folder = as_folder(source)
    if expect is not None:
        check_config_matches(folder.model_config(), expect, f"model.init_from={folder.path} holds a model with")
    params: dict[str, nn.Parameter] = {}
    rows_of: dict[str, tuple[tuple[int, ...], int]] = {}
    for mod_name, module in model.named_modules():
        global_rows = module.global_rows if isinstance(module, Experts) else {}
        for pname, p in module.named_parameters(recurse=False):
            name = clean_name(f"{mod_name}.{pname}" if mod_name else pname)
            params[name] = p
            if pname in global_rows:
                rows_of[name] = global_rows[pname]
    expected = {n: tuple(rows_of[n][0]) if n in rows_of else tuple(p.shape) for n, p in params.items()}
    entries = folder.plan(expected, tied="lm_head.weight" not in params)
    total, reader = 0, TensorReader()
    for file in folder.files:
        for e in (e for e in entries if e.file == file):
            param = params[e.name]
            rows = None
            if e.name in rows_of:  # EP: this rank's experts only
                first = rows_of[e.name][1]
                rows = (first, first + param.shape[0])
            elif param.dim() > 0 and (mine := local_rows(param)) is not None:  # FSDP: this rank's rows only
                part = reader.read(e, mine)
                total += part.numel() * part.element_size()
                param.to_local().copy_(part.to(param.dtype))
                continue
            full = reader.read(e, rows)
            total += full.numel() * full.element_size()
            copy_full_(param, full)
            del full
        reader.close()  # one file open at a time (stacked experts may touch a few)
    log.info("loaded %d tensors (%.1f MB) from %s", len(entries), total / 1e6, folder.path)
    return total


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> nn.Module:
    """A one-process model (`DenseTransformer`, or `MoETransformer` for Qwen3-MoE) with the weights
    of a Hugging Face (or imported) folder; `model(input_ids)` -> logits. A Qwen2-VL folder gives
    our omni model behind transformers' keyword arguments (engine/checkpoint/qwen2_vl.py);
    so does a Qwen2.5-VL folder, and a Qwen2.5-Omni thinker's or whole model's (its thinker:
    engine/checkpoint/qwen2_5_omni.py)."""
    config = Path(path) / "config.json"
    if config.is_file():
        try:
            arch = (json.loads(config.read_text()).get("architectures") or [None])[0]
        except json.JSONDecodeError:
            raise HFCheckpointError(f"{config} is not valid JSON: re-save the model") from None
        if arch == "JanusForConditionalGeneration":
            from . import janus

            return janus.load_pretrained(Path(path), dtype, device)
        if arch in MULTIMODAL_ARCHITECTURES:
            from . import qwen2_vl

            return qwen2_vl.load_pretrained(Path(path), dtype, device)
        if arch is not None and arch not in SUPPORTED_ARCHITECTURES:
            config_from_hf({"architectures": [arch]}, str(config))  # names the supported ones
    folder = WeightFolder(path)
    cfg = folder.model_config()
    with torch.device("meta"):
        model = build_backbone(cfg)
    model.to(dtype)
    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "reset_buffers") and module is not model:
            module.reset_buffers()
    load_weights_(model, folder)
    return model.eval()

