"""`siglip`: a SigLIP-family vision transformer over fixed-resolution images, weight-compatible with
transformers' `SiglipVisionModel` and `JanusVisionModel` (Janus's image reader), optionally followed
by Janus's aligner MLP (`projection_dim`).

An image of `image_size` x `image_size` pixels is cut into (image_size / patch_size)**2 patches (a
strided conv), given learned absolute position embeddings, run through pre-norm blocks with
bidirectional attention, and normalised (`post_layernorm`). Every patch is one output row, as
Janus reads images (transformers' `JanusModel.get_image_features`: the aligner over the whole
`last_hidden_state`; there is no layer selection or CLS token). SigLIP's attention-pooling head
(`vision_use_head`) is kept for loading and for `pooled()`, but is no part of `lm_encode`.

What the two released classes differ in, and how it is read:
- the attention output projection: SigLIP's `self_attn.out_proj`, Janus's `self_attn.projection_layer`
  (ours is `out_proj`; `hf_name` / `from_hf_name` translate);
- the MLP width: SigLIP's `intermediate_size`, Janus's `mlp_ratio` (hidden * ratio);
- Janus's `attention_bias` (q/k/v biases) and `use_qk_norm`: a LayerNorm of width hidden_size (eps
  1e-5, as transformers builds it) on the queries and keys. transformers applies it to per-head
  slices and so only runs with num_attention_heads = 1; here it normalises the whole projection
  before the heads are split, which is the same computation there and defined for any head count;
- activations: SigLIP `gelu_pytorch_tanh`, Janus `gelu` (option `hidden_act`).

Payload: {"pixel_values": [num_images, num_channels, image_size, image_size]} (Janus's processor:
pixels / 255, mean 0.5, std 0.5, i.e. in [-1, 1]); each image fills (image_size / patch_size)**2
placeholders, in payload order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.tensor_files import TensorFiles
from engine.tensor_match import check_tensors

from .base import Encoder, PartOptionError, check_depths, check_sizes
from .image_vq import _ACTIVATIONS, AlignerMLP
from .registry import register_encoder

# Where the tower and the aligner sit in each kind of checkpoint (the first prefix found wins):
# a whole Janus model, a whole SiglipModel, a bare SiglipVisionModel / JanusVisionModel.
TOWER_PREFIXES = ("model.vision_model.", "vision_model.", "")
ALIGNER_PREFIXES = {"model.vision_model.": "model.aligner.", "vision_model.": "aligner.", "": "aligner."}
_JANUS_OUT, _OURS_OUT = ".self_attn.projection_layer.", ".self_attn.out_proj."


def hf_name(ours: str, janus: bool) -> str:
    """The released name (without the tower's prefix) of one of our tower parameters."""
    return ours.replace(_OURS_OUT, _JANUS_OUT) if janus else ours


def from_hf_name(theirs: str) -> str:
    """Our tower parameter name of a released one (either class's naming)."""
    return theirs.replace(_JANUS_OUT, _OURS_OUT)


class SiglipAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, bias: bool, qk_norm: bool):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden, hidden, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(hidden, hidden)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_norm, self.k_norm = nn.LayerNorm(hidden), nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, n, self.heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, -1))


class SiglipMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, eps: float, bias: bool, qk_norm: bool):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = SiglipAttention(hidden, heads, bias, qk_norm)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = SiglipMLP(hidden, intermediate, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, channels: int, hidden: int, patch: int, num_patches: int):
        super().__init__()
        self.patch_embedding = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Embedding(num_patches, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_embedding.weight[None]


class PoolingHead(nn.Module):
    """SigLIP's multihead attention pooling (a learned probe attends over the patches)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, hidden))
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = SiglipMLP(hidden, intermediate, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.probe.expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]
        return (h + self.mlp(self.layernorm(h)))[:, 0]


# transformers' config defaults, for a config.json that leaves a key out
SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6, vision_use_head=True)
JANUS_DEFAULTS = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_channels=3, image_size=384,
                      patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, mlp_ratio=4.0, attention_bias=True,
                      use_qk_norm=False, projection_dim=2048, depth=2)
_TOWER_OPTIONS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels",
                  "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_bias", "use_qk_norm",
                  "vision_use_head")


@register_encoder("siglip")
class SiglipEncoder(Encoder):
    """SigLIP / Janus vision tower (+ Janus's aligner when `projection_dim` is set). Options are
    named as in transformers' `SiglipVisionConfig` / `JanusVisionConfig` (`depth`: the aligner's
    layers); the defaults are a CPU-test size (Janus-Pro-1B: hidden_size=1024, num_hidden_layers=24,
    num_attention_heads=16, image_size=384, patch_size=16, projection_dim=2048, hidden_act=gelu)."""

    def __init__(self, *, hidden_size: int = 64, num_hidden_layers: int = 2, num_attention_heads: int = 4,
                 intermediate_size: Optional[int] = None, mlp_ratio: float = 4.0, num_channels: int = 3,
                 image_size: int = 16, patch_size: int = 4, hidden_act: str = "gelu_pytorch_tanh",
                 layer_norm_eps: float = 1e-6, attention_bias: bool = True, use_qk_norm: bool = False,
                 vision_use_head: bool = False, projection_dim: Optional[int] = None, depth: int = 2):
        super().__init__()
        check_depths("siglip", num_hidden_layers=num_hidden_layers, depth=depth)
        check_sizes("siglip", hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                    num_channels=num_channels, image_size=image_size, patch_size=patch_size)
        if not mlp_ratio > 0:
            raise PartOptionError("siglip", "mlp_ratio", f"must be > 0, got {mlp_ratio}")
        if not layer_norm_eps > 0:
            raise PartOptionError("siglip", "layer_norm_eps", f"must be > 0, got {layer_norm_eps}")
        intermediate = int(hidden_size * mlp_ratio) if intermediate_size is None else intermediate_size
        check_sizes("siglip", intermediate_size=intermediate, **({} if projection_dim is None else
                                                                 {"projection_dim": projection_dim}))
        if hidden_size % num_attention_heads:
            raise PartOptionError("siglip", "num_attention_heads", f"must divide hidden_size = {hidden_size}, got "
                                  f"{num_attention_heads}")
        if image_size % patch_size:
            raise PartOptionError("siglip", "image_size", f"must be a multiple of patch_size = {patch_size}, got "
                                  f"{image_size}")
        if hidden_act not in _ACTIVATIONS:
            raise PartOptionError("siglip", "hidden_act", f"must be one of {sorted(_ACTIVATIONS)}, got {hidden_act!r}")
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = hidden_size, num_hidden_layers, \
            num_attention_heads
        self.intermediate_size, self.num_channels, self.image_size = intermediate, num_channels, image_size
        self.patch_size, self.hidden_act, self.layer_norm_eps = patch_size, hidden_act, layer_norm_eps
        self.attention_bias, self.use_qk_norm, self.vision_use_head = attention_bias, use_qk_norm, vision_use_head
        self.projection_dim, self.depth = projection_dim, depth
        self.tokens_per_image = (image_size // patch_size) ** 2
        self.out_dim = hidden_size if projection_dim is None else projection_dim

        self.embeddings = SiglipEmbeddings(num_channels, hidden_size, patch_size, self.tokens_per_image)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            SiglipLayer(hidden_size, num_attention_heads, intermediate, hidden_act, layer_norm_eps, attention_bias,
                        use_qk_norm) for _ in range(num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        if vision_use_head:
            self.head = PoolingHead(hidden_size, num_attention_heads, intermediate, hidden_act, layer_norm_eps)
        if projection_dim is not None:
            self.aligner = AlignerMLP(hidden_size, projection_dim, depth, hidden_act)

    # -- payloads

    def check_payload(self, payload: dict[str, torch.Tensor]) -> None:
        want = f"[num_images, {self.num_channels}, {self.image_size}, {self.image_size}]"
        if not isinstance(payload, Mapping) or "pixel_values" not in payload:
            keys = sorted(payload) if isinstance(payload, Mapping) else type(payload).__name__
            raise ValueError(f"siglip payload: needs key 'pixel_values' {want}; got {keys}")
        px = payload["pixel_values"]
        if not isinstance(px, torch.Tensor) or not px.is_floating_point() or px.ndim != 4 or \
                tuple(px.shape[1:]) != (self.num_channels, self.image_size, self.image_size):
            raise ValueError(f"siglip payload: pixel_values has shape {tuple(getattr(px, 'shape', ()))} and dtype "
                             f"{getattr(px, 'dtype', type(px).__name__)}; expected float {want} (resize images to "
                             f"{self.image_size}x{self.image_size})")

    def num_tokens(self, payload: dict[str, torch.Tensor]) -> int:
        return payload["pixel_values"].shape[0] * self.tokens_per_image

    def dummy_payload(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.zeros(1, self.num_channels, self.image_size, self.image_size, device=device)}

    # -- computation

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower's normalised last hidden state [num_images, patches, hidden_size]
        (transformers' `last_hidden_state`)."""
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP's pooled output [num_images, hidden_size] (needs vision_use_head)."""
        if not self.vision_use_head:
            raise ValueError("siglip: pooled() needs the attention-pooling head; build with vision_use_head=true")
        return self.head(self.features(pixel_values))

    def lm_encode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """[num_images * patches, out_dim]: every patch of each image (through the aligner when
        there is one), in payload order."""
        x = self.features(payload["pixel_values"])
        if self.projection_dim is not None:
            x = self.aligner(x)
        return x.reshape(-1, x.shape[-1])

    # -- Hugging Face interop

    @classmethod
    def options_from_hf_config(cls, config: Union[Mapping, str, Path, Any]) -> dict:
        """Constructor options from a `SiglipVisionConfig`, `JanusVisionConfig` or a whole model's
        config holding one as `vision_config` (a dict, a config object, a config.json or its folder).
        A Janus config gives the aligner too (projection_dim, depth)."""
        if isinstance(config, (str, Path)):
            path = Path(config)
            config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        elif not isinstance(config, Mapping):
            config = config.to_dict()
        c = dict(config.get("vision_config") or config)
        janus = c.get("model_type") == "janus_vision_model" or "mlp_ratio" in c
        c = {**(JANUS_DEFAULTS if janus else SIGLIP_DEFAULTS), **{k: v for k, v in c.items() if v is not None}}
        opts = {k: c[k] for k in _TOWER_OPTIONS if k in c}
        if janus:
            opts.update(intermediate_size=int(c["hidden_size"] * float(c["mlp_ratio"])), vision_use_head=False,
                        projection_dim=int(c["projection_dim"]), depth=int(c["depth"]))
        else:
            opts.update(attention_bias=True, use_qk_norm=False)
        return opts

    def load_hf_weights(self, source: Union[Mapping[str, torch.Tensor], str, Path]) -> None:
        """Copy a released tower (and Janus's aligner, when this encoder has one) into this module,
        strictly: a missing or unexpected tensor under the tower's prefix, or a shape mismatch, is a
        ValueError naming it. `source`: a state dict, a safetensors file or a Hugging Face folder
        of a `SiglipVisionModel`, `JanusVisionModel`, `SiglipModel` or whole Janus model (whose
        config.json, when there is one, must agree with this encoder's options)."""
        if isinstance(source, (str, Path)):
            path = Path(source)
            if not path.exists():
                raise ValueError(f"siglip: {path} is neither a state dict, a .safetensors file nor a folder")
            if path.is_dir() and (path / "config.json").is_file():
                self._check_hf_options(path)
            files = TensorFiles.of(path)
            keys, get = files.keys(), files.get
        else:
            keys, get = list(source), source.__getitem__
        prefix = next((p for p in TOWER_PREFIXES if any(k.startswith(p + "embeddings.") for k in keys)), None)
        if prefix is None:
            raise ValueError(f"siglip: no vision tower in the checkpoint (looked for "
                             f"{', '.join(repr(p + 'embeddings.*') for p in TOWER_PREFIXES)}); first keys: {keys[:5]}")
        aligner = ALIGNER_PREFIXES[prefix]
        mapping = {}  # our name -> checkpoint name; other tensors (a language model, a text tower) are not ours
        for k in keys:
            if k.startswith(aligner):
                mapping["aligner." + k[len(aligner):]] = k
            elif k.startswith(prefix):
                mapping[from_hf_name(k[len(prefix):])] = k
        own = dict(self.named_parameters())
        shape = (lambda k: tuple(source[k].shape)) if isinstance(source, Mapping) else files.shape
        offered = {o: torch.empty(shape(k), device="meta") for o, k in mapping.items()}
        check_tensors(own, offered, "siglip: checkpoint", prefix=prefix,
                      fix="; build the encoder with SiglipEncoder.options_from_hf_config(config)")
        with torch.no_grad():
            for ours, theirs in mapping.items():
                own[ours].copy_(get(theirs).to(own[ours].dtype))

    def _check_hf_options(self, folder: Path) -> None:
        theirs = self.options_from_hf_config(folder)
        tower = {k: v for k, v in theirs.items() if k in _TOWER_OPTIONS}
        diff = {k: (v, getattr(self, k)) for k, v in tower.items() if v != getattr(self, k)}
        if diff:
            raise ValueError(f"siglip: {folder}/config.json disagrees with this encoder's options "
                             f"(name: (checkpoint, ours)): {diff}")

