"""`qwen2_5_vision`: Qwen2.5-VL's vision tower (also the Qwen2.5-Omni thinker's), weight-compatible.

The payload, the patch layout and the 2-D rotary embedding are those of the Qwen2-VL tower
(`engine.modalities.vision`, whose functions this module reuses). What differs, as in
transformers' `Qwen2_5_VisionTransformerPretrainedModel`:

- RMSNorm (eps 1e-6, computed in fp32) instead of LayerNorm, in the blocks and the merger's `ln_q`;
- a gated MLP with biases, `down_proj(act(gate_proj(x)) * up_proj(x))`, of width `intermediate_size`;
- window attention: the merge units of `spatial_merge_size` x `spatial_merge_size` patches are
  reordered so that each window of `window_size` x `window_size` pixels
  (`window_size // (patch_size * spatial_merge_size)` merge units a side; windows at the right
  and bottom edges are partial) is contiguous, per temporal slice of each input. Blocks whose index
  is in `fullatt_block_indexes` attend over each whole temporal slice (Qwen2-VL's segments, which
  the reordering keeps contiguous), the others within each window. The merger runs on the
  reordered sequence and its tokens are put back in `patchify`'s order at the end;
- `out_hidden_size` is the merger's output width (`out_dim`); `hidden_size` is the tower's width.

Payload keys (identical to `vision`):
- `pixel_values`: [num_patches, in_channels * temporal_patch_size * patch_size**2] float;
- `grid_thw`: [num_inputs, 3] integer, (t, h, w) in patches per image or video.

Parameter names are those of transformers' `Qwen2_5_VisionTransformerPretrainedModel`, so a
Qwen2.5-VL checkpoint maps one to one after its `visual.` / `model.visual.` prefix is dropped.
Qwen2.5-Omni's tower is the same computation with separate `attn.q` / `attn.k` / `attn.v`
projections (prefixes `thinker.visual.` on disk, `thinker.model.visual.` in transformers 5's
memory); `load_hf_weights` concatenates them into `attn.qkv` (see `hf_tower_tensors`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.tensor_files import TensorFiles
from engine.tensor_match import check_tensors

from .base import Encoder, check_depths, check_sizes
from .registry import register_encoder
from .vision import (_ACTIVATIONS, PatchEmbed, PatchMerger, VisionAttention, VisionEncoder, VisionSegments,
                     patch_positions, vision_rope)

HF_PREFIXES = ("thinker.model.visual.", "thinker.visual.", "model.visual.", "visual.")
"""Prefixes of the tower's tensors: Qwen2.5-Omni in transformers 5's memory, Qwen2.5-Omni on
disk, Qwen2.5-VL in transformers 5's memory, Qwen2.5-VL on disk."""

_SPLIT_QKV = re.compile(r"(blocks\.\d+\.attn\.)(q|k|v)\.(weight|bias)")
_FUSED_QKV = re.compile(r"(blocks\.\d+\.attn\.)qkv\.(weight|bias)")


class RMSNorm(nn.Module):
    """transformers' Qwen2.5-VL RMSNorm: normalised in fp32, cast back, then scaled."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Qwen2_5VisionBlock(nn.Module):
    """Pre-norm block; `attn` is `vision.VisionAttention` (its `attention_fn` kernel hook is
    called with the window segments or the whole-slice segments, per block)."""

    def __init__(self, dim: int, num_heads: int, intermediate_size: int, act: str):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.norm2 = RMSNorm(dim)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = GatedMlp(dim, intermediate_size, act)

    def forward(self, x, cos, sin, segments: VisionSegments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class RMSPatchMerger(PatchMerger):
    """`vision.PatchMerger` with an RMSNorm `ln_q` (no bias)."""

    def __init__(self, embed_dim: int, out_dim: int, merge_size: int):
        super().__init__(embed_dim, out_dim, merge_size)
        self.ln_q = RMSNorm(embed_dim)


# ----------------------------------------------------------------------------- windows

def window_order(grid_thw: list[list[int]], merge_size: int, window_size: int,
                 patch_size: int) -> tuple[torch.Tensor, list[int]]:
    """(window_index [num_merge_units] long, window lengths in patches) of Qwen2.5-VL.

    `window_index[i]` is the merge unit (a group of merge_size**2 consecutive patches in
    `patchify`'s order) that goes to place i when the units are grouped by window: per input,
    per temporal slice, windows row-major, units row-major within a window. Windows are
    `window_size // (patch_size * merge_size)` units a side; those at the bottom and right
    edges are cut to the grid. Built on the CPU (its lengths are needed as Python ints).
    """
    side = window_size // (patch_size * merge_size)
    unit = merge_size * merge_size
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw:
        lh, lw = h // merge_size, w // merge_size
        idx = torch.arange(offset, offset + t * lh * lw).view(t, lh, lw)
        pad_h, pad_w = -lh % side, -lw % side
        idx = F.pad(idx, (0, pad_w, 0, pad_h), value=-1)
        nh, nw = (lh + pad_h) // side, (lw + pad_w) // side
        idx = idx.view(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, side * side)
        valid = idx >= 0
        order.append(idx[valid])
        lengths += (valid.sum(1) * unit).tolist()
        offset += t * lh * lw
    return torch.cat(order), lengths


def segments_of(lengths: Sequence[int], device: torch.device) -> VisionSegments:
    cu = torch.tensor([0, *lengths], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
    return VisionSegments(cu_seqlens=cu, max_seqlen=max(lengths))


# ----------------------------------------------------------------------------- encoder

_HF_OPTIONS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
               "temporal_patch_size", "spatial_merge_size", "hidden_act", "out_hidden_size", "window_size",
               "fullatt_block_indexes")


@register_encoder("qwen2_5_vision")
class Qwen2_5VisionEncoder(Encoder):
    """Qwen2.5-VL / Qwen2.5-Omni vision tower. Options are named as in transformers'
    `Qwen2_5_VLVisionConfig` (note: `hidden_size` is the tower's width and `out_hidden_size`
    the output width, where `vision` calls them embed_dim and hidden_size); the defaults are a
    CPU-test size (Qwen2.5-VL-7B: depth=32, hidden_size=1280, num_heads=16,
    intermediate_size=3420, out_hidden_size=3584, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2).

    `tokens_per_second` does not enter the computation: it is the checkpoint's step of a
    video's temporal M-RoPE position per second (Qwen2.5-VL's vision_config.tokens_per_second,
    Qwen2.5-Omni's thinker position_id_per_seconds), kept here for the data layer
    (`engine.data.mrope`); None: not set.
    """

    media = ("image", "video")

    def __init__(self, *, depth: int = 2, hidden_size: int = 64, intermediate_size: int = 128, num_heads: int = 4,
                 in_channels: int = 3, patch_size: int = 14, temporal_patch_size: int = 2,
                 spatial_merge_size: int = 2, hidden_act: str = "silu", out_hidden_size: int = 64,
                 window_size: int = 112, fullatt_block_indexes: Sequence[int] = (1,), rope_theta: float = 10000.0,
                 tokens_per_second: Optional[float] = None):
        super().__init__()
        name = "qwen2_5_vision"
        check_depths(name, depth=depth)
        check_sizes(name, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size,
                    temporal_patch_size=temporal_patch_size, spatial_merge_size=spatial_merge_size,
                    in_channels=in_channels, intermediate_size=intermediate_size, out_hidden_size=out_hidden_size)
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ValueError(f"{name}: hidden_size={hidden_size} must be num_heads={num_heads} x a head_dim divisible "
                             "by 4 (the 2-D rotary embedding splits each head in four)")
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"{name}: hidden_act={hidden_act!r} is not one of {', '.join(_ACTIVATIONS)}")
        if window_size < patch_size * spatial_merge_size:
            raise ValueError(f"{name}: window_size={window_size} (pixels) must be at least patch_size x "
                             f"spatial_merge_size = {patch_size * spatial_merge_size}")
        full = [int(i) for i in fullatt_block_indexes]
        if any(not 0 <= i < depth for i in full):
            raise ValueError(f"{name}: fullatt_block_indexes={full} must be block indexes in [0, depth={depth})")
        self.depth, self.hidden_size, self.intermediate_size, self.num_heads = depth, hidden_size, intermediate_size, \
            num_heads
        self.in_channels, self.patch_size, self.temporal_patch_size = in_channels, patch_size, temporal_patch_size
        self.spatial_merge_size, self.hidden_act, self.out_hidden_size = spatial_merge_size, hidden_act, out_hidden_size
        self.window_size, self.fullatt_block_indexes, self.rope_theta = window_size, full, rope_theta
        self.tokens_per_second = tokens_per_second
        self.out_dim = out_hidden_size
        self.patch_dim = in_channels * temporal_patch_size * patch_size * patch_size

        self.patch_embed = PatchEmbed(in_channels, temporal_patch_size, patch_size, hidden_size)
        self.blocks = nn.ModuleList(Qwen2_5VisionBlock(hidden_size, num_heads, intermediate_size, hidden_act)
                                    for _ in range(depth))
        self.merger = RMSPatchMerger(hidden_size, out_hidden_size, spatial_merge_size)

    # -- payloads: the Qwen2-VL layout, so `vision`'s methods (they read only the patch sizes)

    patchify = VisionEncoder.patchify
    num_tokens = VisionEncoder.num_tokens
    dummy_payload = VisionEncoder.dummy_payload
    check_payload = VisionEncoder.check_payload

    # -- computation

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged tokens [sum(t*h*w) / merge^2, out_hidden_size] of packed patches, in
        `patchify`'s order. (`forward` is the base class's method dispatch: run
        `call_part(enc, "lm_encode", payload)`.)"""
        grid = grid_thw.tolist()
        m2 = self.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values)
        s, device = x.shape[0], x.device
        order, lengths = window_order(grid, self.spatial_merge_size, self.window_size, self.patch_size)
        order = order.to(device)

        def by_window(t: torch.Tensor) -> torch.Tensor:
            return t.view(s // m2, m2, *t.shape[1:])[order].view(s, *t.shape[1:])

        x = by_window(x)
        positions = by_window(patch_positions(grid, self.spatial_merge_size, device))
        cos, sin = vision_rope(positions, self.hidden_size // self.num_heads, self.rope_theta)
        windows, full = segments_of(lengths, device), VisionSegments.from_grid(grid, device)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in self.fullatt_block_indexes else windows)
        merged = self.merger(x)
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=device)
        return merged[back]

    def lm_encode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """[num_tokens, out_hidden_size]: the merged tokens of each input, in payload order."""
        return self.encode(payload["pixel_values"], payload["grid_thw"])

    # -- Hugging Face interop

    @classmethod
    def options_from_hf_config(cls, config: Union[Mapping, str, Path]) -> dict:
        """Constructor options from a `config.json` (path, folder, dict or config object):
        Qwen2.5-VL's (the full model's, or its `vision_config`) or Qwen2.5-Omni's (the full
        model's, whose tower is `thinker_config.vision_config`, or the thinker's)."""
        if isinstance(config, (str, Path)):
            path = Path(config)
            config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        elif not isinstance(config, Mapping):
            config = config.to_dict()
        outer = dict(config.get("thinker_config", config))
        vision = dict(outer.get("vision_config", outer))
        if "in_chans" in vision:  # original Qwen configs
            vision.setdefault("in_channels", vision["in_chans"])
        opts = {k: vision[k] for k in _HF_OPTIONS if k in vision}
        if "fullatt_block_indexes" in opts:
            opts["fullatt_block_indexes"] = [int(i) for i in opts["fullatt_block_indexes"]]
        rope = vision.get("rope_parameters") or {}
        if "rope_theta" in rope:
            opts["rope_theta"] = rope["rope_theta"]
        omni = "thinker_config" in config or str(outer.get("model_type", "")).startswith("qwen2_5_omni") \
            or str(vision.get("model_type", "")).startswith("qwen2_5_omni")
        if omni:  # transformers' Qwen2.5-Omni reads the thinker's position_id_per_seconds, not the tower's key
            if "position_id_per_seconds" in outer:
                opts["tokens_per_second"] = outer["position_id_per_seconds"]
        elif "tokens_per_second" in vision:
            opts["tokens_per_second"] = vision["tokens_per_second"]
        return opts

    def load_hf_weights(self, source: Union[Mapping[str, torch.Tensor], str, Path]) -> None:
        """Copy a Qwen2.5-VL or Qwen2.5-Omni vision tower into this module, strictly.

        `source`: a state dict (of the full model, keys under one of `HF_PREFIXES`, or of the
        tower alone) or a Hugging Face folder of safetensors files, whose `config.json` must
        then agree with this encoder's options. Errors name the checkpoint's tensors.
        """
        if isinstance(source, (str, Path)):
            folder = Path(source)
            if (folder / "config.json").exists():
                theirs = self.options_from_hf_config(folder)
                diff = {k: (theirs[k], getattr(self, k)) for k in theirs if theirs[k] != getattr(self, k)}
                if diff:
                    raise ValueError(f"qwen2_5_vision: {folder}/config.json disagrees with this encoder's options "
                                     f"(name: (checkpoint, ours)): {diff}")
            source = TensorFiles.of(folder).read(HF_PREFIXES)
            if not source:
                raise ValueError(f"qwen2_5_vision: no {' / '.join(p + '*' for p in HF_PREFIXES)} tensors in {folder}")
        params = dict(self.named_parameters())
        tensors = hf_tower_tensors(source, params)
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)


def hf_tower_tensors(source: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's vision-tower tensors under this module's parameter names, checked
    strictly against `params` (name -> tensor of the expected shape).

    The tower's prefix (one of `HF_PREFIXES`, else none) is dropped; Qwen2.5-Omni's separate
    `blocks.N.attn.{q,k,v}.{weight,bias}` are concatenated (q, k, v) into `blocks.N.attn.qkv.*`,
    the fused layout of Qwen2.5-VL. A missing, unexpected or wrongly-shaped tensor is a
    ValueError naming the checkpoint's tensor (and both shapes)."""
    prefix = next((p for p in HF_PREFIXES if any(k.startswith(p) for k in source)), "")
    tensors = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    split = any(_SPLIT_QKV.fullmatch(k) for k in tensors)
    expected = {}  # names and shapes in the checkpoint's layout
    for name, p in params.items():
        fused = _FUSED_QKV.fullmatch(name)
        if split and fused:
            shape = (p.shape[0] // 3, *p.shape[1:])
            expected.update({f"{fused[1]}{x}.{fused[2]}": torch.empty(shape, device="meta") for x in "qkv"})
        else:
            expected[name] = p
    layout = "Qwen2.5-Omni (separate q, k, v)" if split else "Qwen2.5-VL (fused qkv)"
    check_tensors(expected, tensors, f"qwen2_5_vision: {layout} checkpoint", prefix=prefix)
    if split:
        for name in [n for n in params if _FUSED_QKV.fullmatch(n)]:
            head, kind = _FUSED_QKV.fullmatch(name).groups()
            tensors[name] = torch.cat([tensors.pop(f"{head}{x}.{kind}") for x in "qkv"])
    return tensors
