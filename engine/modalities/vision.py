"""`vision`: a NaViT-style vision transformer, weight-compatible with Qwen2-VL's vision tower.

Images and videos of any resolution are cut into patches of `temporal_patch_size` frames x
`patch_size` x `patch_size` pixels (an image is its frame repeated `temporal_patch_size`
times). Each input keeps its own grid (t, h, w) in patches; all patches of a payload run
as one packed sequence, with a 2-D rotary embedding over (h, w) patch coordinates and
attention restricted to each temporal slice of each input (Qwen2-VL's `cu_seqlens`: a
video's t temporal patches attend separately, as in transformers). The merger then
concatenates each `spatial_merge_size` x `spatial_merge_size` window of patches (adjacent
rows of the packed sequence, by the layout `patchify` produces) into one output token.

Payload keys:
- `pixel_values`: [num_patches, in_channels * temporal_patch_size * patch_size**2] float,
  the flattened-patch layout of Qwen2-VL's image / video processors (see `patchify`);
- `grid_thw`: [num_inputs, 3] integer, (t, h, w) in patches per image or video.

Parameter names are those of transformers' `Qwen2VisionTransformerPretrainedModel`, so
a checkpoint maps one to one after its `visual.` / `model.visual.` prefix is dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.tensor_files import TensorFiles

from engine.tensor_match import check_tensors

from .base import Encoder, PartOptionError, check_depths, check_sizes
from .registry import register_encoder

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


# ----------------------------------------------------------------------------- patches

def patchify(frames: torch.Tensor, patch_size: int = 14, temporal_patch_size: int = 2,
             merge_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's flattened-patch layout of an image or a video.

    `frames`: [T_frames, C, H, W] (or [C, H, W] for one image), already resized so that H and
    W are multiples of `patch_size * merge_size` and normalised (Qwen2-VL: x / 255, then
    CLIP mean / std). Frames are padded to a multiple of `temporal_patch_size` by repeating
    the last one, so an image is its frame repeated. Returns (pixel_values
    [t*h*w, C*T*P*P], grid_thw row [3] long), patches ordered by merge window:
    (t, h // m, w // m, m, m), each patch flattened as (C, T, P, P).
    """
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4:
        raise ValueError(f"patchify: frames must be [T, C, H, W] or [C, H, W], got shape {tuple(frames.shape)}")
    n, c, height, width = frames.shape
    unit = patch_size * merge_size
    if height % unit or width % unit:
        raise ValueError(f"patchify: H x W = {height} x {width} must be multiples of patch_size * merge_size = {unit}; "
                         "resize the frames first (Qwen2-VL's smart_resize)")
    if pad := -n % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    t, h, w = frames.shape[0] // temporal_patch_size, height // patch_size, width // patch_size
    x = frames.reshape(t, temporal_patch_size, c, h // merge_size, merge_size, patch_size,
                       w // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (t, h/m, w/m, m, m, C, T, P, P)
    pixel_values = x.reshape(t * h * w, c * temporal_patch_size * patch_size * patch_size)
    return pixel_values, torch.tensor([t, h, w], dtype=torch.long)


def patch_positions(grid_thw: list[list[int]], merge_size: int, device: torch.device) -> torch.Tensor:
    """[num_patches, 2] (row, column) of every patch, in `patchify`'s merge-window order."""
    out = []
    for t, h, w in grid_thw:
        hpos = torch.arange(h, device=device)[:, None].expand(h, w)
        wpos = torch.arange(w, device=device)[None, :].expand(h, w)
        pos = torch.stack([hpos, wpos], dim=-1).reshape(h // merge_size, merge_size, w // merge_size, merge_size, 2)
        out.append(pos.transpose(1, 2).reshape(h * w, 2).repeat(t, 1))
    return torch.cat(out)


# ----------------------------------------------------------------------------- attention

@dataclass
class VisionSegments:
    """Which rows of the packed patch sequence attend to each other: one segment per
    temporal slice of each image / video. The block mask is built once per forward."""

    cu_seqlens: torch.Tensor  # [num_segments + 1] int32
    max_seqlen: int
    _mask: Optional[torch.Tensor] = field(default=None, repr=False)

    @classmethod
    def from_grid(cls, grid_thw: list[list[int]], device: torch.device) -> "VisionSegments":
        lengths = [h * w for t, h, w in grid_thw for _ in range(t)]
        cu = torch.tensor([0] + lengths, dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
        return cls(cu_seqlens=cu, max_seqlen=max(lengths))

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    def block_mask(self) -> torch.Tensor:
        """[1, 1, S, S] boolean: True where two patches are in the same segment."""
        if self._mask is None:
            lengths = self.cu_seqlens[1:] - self.cu_seqlens[:-1]
            seg = torch.repeat_interleave(torch.arange(self.num_segments, device=lengths.device), lengths)
            self._mask = (seg[:, None] == seg[None, :])[None, None]
        return self._mask


VisionAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, VisionSegments], torch.Tensor]


def block_diagonal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: VisionSegments) -> torch.Tensor:
    """Bidirectional attention within segments: q, k, v and the result are [1, H, S, D]."""
    mask = None if segments.num_segments == 1 else segments.block_mask()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def vision_rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, 1, head_dim] (fp32) of the 2-D RoPE: the first half of each rotary half
    turns with the patch row, the second with the column (Qwen2-VL's axial layout)."""
    quarter = torch.arange(0, head_dim // 2, 2, dtype=torch.float, device=positions.device)
    inv_freq = 1.0 / (theta ** (quarter / (head_dim // 2)))
    freqs = (positions[..., None].float() * inv_freq).flatten(1)  # [S, (h freqs, w freqs)]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


class VisionAttention(nn.Module):
    """Fused-qkv self-attention; `attention_fn` is the kernel hook (SDPA with a block mask
    by default, a varlen kernel on GPU, a sequence-parallel wrapper under a recipe)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)
        self.attention_fn: VisionAttentionFn = block_diagonal_sdpa

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: VisionSegments) -> torch.Tensor:
        s = x.shape[0]
        q, k, v = self.qkv(x).view(s, 3, self.num_heads, self.head_dim).unbind(1)  # [S, H, D] each
        q, k = ((t.float() * cos + _rotate_half(t.float()) * sin).to(v.dtype) for t in (q, k))
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # [1, H, S, D]
        out = self.attention_fn(q, k, v, segments)
        return self.proj(out[0].transpose(0, 1).reshape(s, -1))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, act: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = VisionMlp(dim, mlp_hidden, act)

    def forward(self, x, cos, sin, segments: VisionSegments) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Conv3d with stride = kernel over one flattened patch, i.e. a linear map; the weight
    keeps the Conv3d shape [embed_dim, C, T, P, P] of the checkpoints."""

    def __init__(self, in_channels: int, temporal_patch_size: int, patch_size: int, embed_dim: int):
        super().__init__()
        kernel = (temporal_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.flatten(1))


class PatchMerger(nn.Module):
    """LayerNorm, then each merge window of m*m consecutive patches -> one token (MLP)."""

    def __init__(self, embed_dim: int, out_dim: int, merge_size: int):
        super().__init__()
        self.merged_dim = embed_dim * merge_size ** 2
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.merged_dim, self.merged_dim), nn.GELU(),
                                 nn.Linear(self.merged_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


# ----------------------------------------------------------------------------- encoder

_HF_OPTIONS = ("depth", "embed_dim", "num_heads", "mlp_ratio", "in_channels", "patch_size", "temporal_patch_size",
               "spatial_merge_size", "hidden_act", "hidden_size")


@register_encoder("vision")
class VisionEncoder(Encoder):
    """Qwen2-VL vision tower. Options are named as in transformers' `Qwen2VLVisionConfig`;
    the defaults are a CPU-test size (Qwen2-VL-7B: depth=32, embed_dim=1280, num_heads=16,
    patch_size=14, hidden_size=3584)."""

    media = ("image", "video")

    def __init__(self, *, depth: int = 2, embed_dim: int = 64, num_heads: int = 4, mlp_ratio: float = 4.0,
                 in_channels: int = 3, patch_size: int = 14, temporal_patch_size: int = 2,
                 spatial_merge_size: int = 2, hidden_act: str = "quick_gelu", hidden_size: int = 64,
                 rope_theta: float = 10000.0):
        super().__init__()
        check_depths("vision", depth=depth)
        check_sizes("vision", embed_dim=embed_dim, num_heads=num_heads, hidden_size=hidden_size,
                    patch_size=patch_size, temporal_patch_size=temporal_patch_size,
                    spatial_merge_size=spatial_merge_size, in_channels=in_channels)
        for option, value in (("mlp_ratio", mlp_ratio), ("rope_theta", rope_theta)):
            if not value > 0:
                raise PartOptionError("vision", option, f"must be > 0, got {value}")
        if embed_dim % num_heads or (embed_dim // num_heads) % 4:
            raise ValueError(f"vision: embed_dim={embed_dim} must be num_heads={num_heads} x a head_dim divisible "
                             "by 4 (the 2-D rotary embedding splits each head in four)")
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision: hidden_act={hidden_act!r} is not one of {', '.join(_ACTIVATIONS)}")
        self.depth, self.embed_dim, self.num_heads, self.mlp_ratio = depth, embed_dim, num_heads, mlp_ratio
        self.in_channels, self.patch_size, self.temporal_patch_size = in_channels, patch_size, temporal_patch_size
        self.spatial_merge_size, self.hidden_act, self.hidden_size = spatial_merge_size, hidden_act, hidden_size
        self.rope_theta = rope_theta
        self.out_dim = hidden_size
        self.patch_dim = in_channels * temporal_patch_size * patch_size * patch_size

        self.patch_embed = PatchEmbed(in_channels, temporal_patch_size, patch_size, embed_dim)
        self.blocks = nn.ModuleList(VisionBlock(embed_dim, num_heads, int(embed_dim * mlp_ratio), hidden_act)
                                    for _ in range(depth))
        self.merger = PatchMerger(embed_dim, hidden_size, spatial_merge_size)

    # -- payloads

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`patchify` with this encoder's patch sizes."""
        return patchify(frames, self.patch_size, self.temporal_patch_size, self.spatial_merge_size)

    def num_tokens(self, payload: dict[str, torch.Tensor]) -> int:
        return int(payload["grid_thw"].prod(-1).sum()) // self.spatial_merge_size ** 2

    def dummy_payload(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        m = self.spatial_merge_size
        return {"pixel_values": torch.zeros(m * m, self.patch_dim, device=device),
                "grid_thw": torch.tensor([[1, m, m]], dtype=torch.long, device=device)}

    def check_payload(self, payload: dict[str, torch.Tensor]) -> None:
        where = f"{self.registered_name} payload"  # "vision", or a part that reuses this method
        for key in ("pixel_values", "grid_thw"):
            if key not in payload:
                raise ValueError(f"{where}: missing key {key!r} (found keys {sorted(payload)})")
        pix, grid = payload["pixel_values"], payload["grid_thw"]
        if pix.ndim != 2 or pix.shape[1] != self.patch_dim or not pix.is_floating_point():
            raise ValueError(f"{where}: pixel_values has shape {tuple(pix.shape)} and dtype {pix.dtype}, "
                             f"expected [num_patches, {self.patch_dim}] float (in_channels {self.in_channels} x "
                             f"temporal_patch_size {self.temporal_patch_size} x patch_size {self.patch_size}^2)")
        if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0 or grid.is_floating_point():
            raise ValueError(f"{where}: grid_thw has shape {tuple(grid.shape)} and dtype {grid.dtype}, "
                             "expected [num_inputs >= 1, 3] integer (t, h, w)")
        m = self.spatial_merge_size
        for i, (t, h, w) in enumerate(grid.tolist()):
            if t < 1 or h < 1 or w < 1 or h % m or w % m:
                raise ValueError(f"{where}: grid_thw[{i}] = {[t, h, w]}: t, h, w must be >= 1 and h, w "
                                 f"divisible by spatial_merge_size={m}")
        n = int(grid.prod(-1).sum())
        if n != pix.shape[0]:
            raise ValueError(f"{where}: pixel_values has {pix.shape[0]} patches (shape {tuple(pix.shape)}) but "
                             f"grid_thw {grid.tolist()} describes sum(t*h*w) = {n}")

    # -- computation

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged tokens [sum(t*h*w) / merge^2, hidden_size] of packed patches. (`forward` is
        the base class's method dispatch: run `call_part(enc, "lm_encode", payload)`.)"""
        grid = grid_thw.tolist()
        x = self.patch_embed(pixel_values)
        cos, sin = vision_rope(patch_positions(grid, self.spatial_merge_size, x.device),
                               self.embed_dim // self.num_heads, self.rope_theta)
        segments = VisionSegments.from_grid(grid, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x)

    def lm_encode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """[num_tokens, hidden_size]: the merged tokens of each input, in payload order."""
        return self.encode(payload["pixel_values"], payload["grid_thw"])

    # -- Hugging Face interop

    @classmethod
    def options_from_hf_config(cls, config: Union[Mapping, str, Path]) -> dict:
        """Constructor options from a Qwen2-VL `config.json` (path, folder or dict; the full
        model's config or its `vision_config`)."""
        if isinstance(config, (str, Path)):
            path = Path(config)
            config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        elif not isinstance(config, Mapping):
            config = config.to_dict()
        config = dict(config.get("vision_config", config))
        if "in_chans" in config:  # original Qwen2-VL configs
            config.setdefault("in_channels", config["in_chans"])
        opts = {k: config[k] for k in _HF_OPTIONS if k in config}
        rope = config.get("rope_parameters") or {}
        if "rope_theta" in rope:
            opts["rope_theta"] = rope["rope_theta"]
        return opts

    def load_hf_weights(self, source: Union[Mapping[str, torch.Tensor], str, Path]) -> None:
        """Copy a Qwen2-VL vision tower into this module, strictly.

        `source`: a state dict (of the full model, keys `model.visual.*` or `visual.*`, or of
        the tower alone) or a Hugging Face folder of safetensors files, whose `config.json`
        must then agree with this encoder's options.
        """
        if isinstance(source, (str, Path)):
            folder = Path(source)
            if (folder / "config.json").exists():
                theirs = self.options_from_hf_config(folder)
                diff = {k: (theirs[k], getattr(self, k)) for k in theirs if theirs[k] != getattr(self, k)}
                if diff:
                    raise ValueError(f"vision: {folder}/config.json disagrees with this encoder's options "
                                     f"(name: (checkpoint, ours)): {diff}")
            source = _read_visual_safetensors(folder)
        prefix = next((p for p in ("model.visual.", "visual.") if any(k.startswith(p) for k in source)), "")
        tensors = {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
        params = dict(self.named_parameters())
        check_tensors(params, tensors, "vision: checkpoint", prefix=prefix)
        with torch.no_grad():
            for name, tensor in tensors.items():
                params[name].copy_(tensor)


def _read_visual_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    out = TensorFiles.of(folder).read(("visual.", "model.visual."))
    if not out:
        raise ValueError(f"vision: no visual.* or model.visual.* tensors in {folder}")
    return out
