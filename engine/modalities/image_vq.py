"""`image_vq`: images as discrete VQ codes the backbone predicts (Janus-style generation).

The VQ-VAE is weight-compatible with transformers' `JanusVQVAE` (same module tree and
parameter names, same numerics): encoder -> quant_conv -> nearest codebook entry -> code ids,
and code ids -> L2-normalised codebook entry -> post_quant_conv -> decoder -> pixels. It is a
frozen tokenizer by default. Around it sit the parts the language model sees, as in Janus:
`generation_embeddings` + `generation_aligner` (code ids -> embeddings, lm_encode) and
`generation_head` (backbone hidden -> code logits, lm_head).

Payload: {"pixel_values": [num_images, in_channels, image_size, image_size] in [-1, 1]}.

`train_vqvae(decoder, images, ...)` pre-trains the tokenizer itself on a small image set (CPU,
minutes at most), for users who train tiny models from scratch.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.ops.fused_loss import linear_cross_entropy
from engine.tensor_files import TensorFiles

from .base import Decoder, PartOptionError, check_depths, check_sizes
from .registry import register_decoder

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
}


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)  # written out (not F.silu) to keep Janus's exact numerics


# ---------------------------------------------------------------- VQ-VAE (Janus layout)

class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(32, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (self.nin_shortcut(x) if self.in_channels != self.out_channels else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map (1x1 conv projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)
        k = self.k(h).reshape(b, c, hh * ww)
        v = self.v(h).reshape(b, c, hh * ww)
        w = F.softmax(torch.bmm(q, k) * (int(c) ** (-0.5)), dim=2)
        out = torch.bmm(v, w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as Janus


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(blocks: list[nn.Module], attns: list[nn.Module], resample: Optional[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        setattr(level, "downsample" if isinstance(resample, Downsample) else "upsample", resample)
    return level


class VQEncoder(nn.Module):
    def __init__(self, in_channels: int, base: int, mult: Sequence[int], num_res_blocks: int,
                 latent_channels: int, dropout: float):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = base
        for i, m in enumerate(mult):
            last = i == len(mult) - 1
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, base * m, dropout))
                block_in = base * m
                if last:
                    attns.append(AttnBlock(block_in))
            self.down.append(_level(blocks, attns, None if last else Downsample(block_in)))
        self.mid = MidBlock(block_in, dropout)
        self.norm_out = nn.GroupNorm(32, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h, "downsample")
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


def _run_level(level: nn.Module, h: torch.Tensor, resample: str) -> torch.Tensor:
    """One resolution level of the VQ encoder / decoder: its resnet blocks (each followed by
    its attention block where the level has them), then its down- or upsampling if any."""
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return getattr(level, resample)(h) if hasattr(level, resample) else h


class VQDecoder(nn.Module):
    def __init__(self, out_channels: int, base: int, mult: Sequence[int], num_res_blocks: int,
                 latent_channels: int, dropout: float):
        super().__init__()
        block_in = base * mult[-1]
        self.conv_in = nn.Conv2d(latent_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in, dropout)
        self.up = nn.ModuleList()
        for i in reversed(range(len(mult))):
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, base * mult[i], dropout))
                block_in = base * mult[i]
                if i == len(mult) - 1:
                    attns.append(AttnBlock(block_in))
            self.up.append(_level(blocks, attns, Upsample(block_in) if i != 0 else None))
        self.norm_out = nn.GroupNorm(32, block_in, eps=1e-6)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = _run_level(level, h, "upsample")
        return self.conv_out(_swish(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dim)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook entry (squared L2, raw codebook, as Janus's encode) of each
        position of z [B, D, h, w] -> ids [B, h*w]."""
        b = z.shape[0]
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = self.embedding.weight.to(flat.dtype)
        dist = (torch.sum(flat ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
                - 2 * torch.einsum("bd,dn->bn", flat, e.transpose(0, 1)))
        return torch.argmin(dist, dim=1).view(b, z.shape[2] * z.shape[3])

    def latent(self, ids: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """ids [B, h*w] -> L2-normalised codebook entries [B, D, h, w] (as Janus's decode)."""
        q = F.normalize(self.embedding(ids), p=2, dim=-1)
        return q.view(ids.shape[0], *grid, q.shape[-1]).permute(0, 3, 1, 2).contiguous()


class JanusVQModel(nn.Module):
    """Parameter names equal `JanusVQVAE`'s state dict."""

    def __init__(self, *, embed_dim: int, num_embeddings: int, latent_channels: int, in_channels: int,
                 out_channels: int, base_channels: int, channel_multiplier: Sequence[int], num_res_blocks: int,
                 dropout: float, grid: tuple[int, int]):
        super().__init__()
        self.grid = grid
        self.encoder = VQEncoder(in_channels, base_channels, channel_multiplier, num_res_blocks, latent_channels, dropout)
        self.quantize = Quantizer(num_embeddings, embed_dim)
        self.quant_conv = nn.Conv2d(latent_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        self.decoder = VQDecoder(out_channels, base_channels, channel_multiplier, num_res_blocks, latent_channels, dropout)

    def pre_quant(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(pixel_values.to(self.quant_conv.weight.dtype)))

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.quantize.codes(self.pre_quant(pixel_values))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        z = self.quantize.latent(ids, self.grid).to(self.post_quant_conv.weight.dtype)
        return self.decoder(self.post_quant_conv(z))


# ---------------------------------------------------------------- LM-facing parts (Janus layout)

class AlignerMLP(nn.Module):
    def __init__(self, in_dim: int, projection_dim: int, num_hidden_layers: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, projection_dim)
        self.hidden_layers = nn.ModuleList(nn.Linear(projection_dim, projection_dim)
                                           for _ in range(1, num_hidden_layers))
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for layer in self.hidden_layers:
            x = layer(self.act(x))
        return x


class GenerationHead(nn.Module):
    def __init__(self, hidden_in: int, projection_dim: int, num_embeddings: int, act: str):
        super().__init__()
        self.proj_out = nn.Linear(hidden_in, projection_dim)
        self.vision_head = nn.Linear(projection_dim, num_embeddings)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vision_head(self.act(self.proj_out(x)))


# ---------------------------------------------------------------- the registered decoder

_GEN_PREFIXES = ("generation_embeddings.", "generation_aligner.", "generation_head.")


@register_decoder("image_vq")
class ImageVQDecoder(Decoder):
    """Janus-compatible VQ image tokenizer/decoder.

    Options are named as in `JanusVQVAEConfig`, except:
      - `embed_dim` is the *codebook vector* width (as Janus); the `embed_dim` attribute of
        this object is, per the Decoder contract, the width of lm_encode's rows
        (= `projection_dim`). The codebook width is `self.codebook_dim`.
      - `image_size` replaces `num_patches`: codes form a grid of
        image_size / 2**(len(channel_multiplier) - 1) per side.
      - `hidden_in` is the head's input width (Janus: `image_token_embed_dim`).
      - `train_vqvae`: leave the VQ-VAE trainable (default: frozen tokenizer).
    """

    def __init__(self, *, embed_dim: int = 8, num_embeddings: int = 256, latent_channels: int = 32,
                 in_channels: int = 3, out_channels: Optional[int] = None, base_channels: int = 32,
                 channel_multiplier: Sequence[int] = (1, 1, 2), num_res_blocks: int = 1, dropout: float = 0.0,
                 image_size: int = 16, projection_dim: int = 64, num_hidden_layers: int = 2,
                 hidden_act: str = "gelu", hidden_in: int = 64, train_vqvae: bool = False):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        check_depths("image_vq", num_res_blocks=num_res_blocks, num_hidden_layers=num_hidden_layers)
        check_sizes("image_vq", embed_dim=embed_dim, num_embeddings=num_embeddings, latent_channels=latent_channels,
                    in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                    image_size=image_size, projection_dim=projection_dim, hidden_in=hidden_in)
        if not 0 <= dropout < 1:
            raise PartOptionError("image_vq", "dropout", f"must be in [0, 1), got {dropout}")
        mult = tuple(channel_multiplier)
        if not all(isinstance(m, numbers.Integral) and not isinstance(m, bool) and m >= 1 for m in mult):
            raise PartOptionError("image_vq", "channel_multiplier", f"must be positive integers, got {list(mult)}")
        mult = tuple(int(m) for m in mult)
        if not 1 <= len(mult) <= 16:
            raise PartOptionError("image_vq", "channel_multiplier", f"must name 1 to 16 levels, e.g. [1, 1, 2], got "
                                  f"{list(mult)}")
        factor = 2 ** (len(mult) - 1)
        for name, ch in [("base_channels", base_channels)] + [(f"base_channels*channel_multiplier[{i}]",
                                                              base_channels * m) for i, m in enumerate(mult)]:
            if ch <= 0 or ch % 32:
                raise ValueError(f"image_vq: {name} = {ch} must be a positive multiple of 32 (GroupNorm uses 32 "
                                 "groups, as in Janus)")
        if image_size <= 0 or image_size % factor:
            raise ValueError(f"image_vq: image_size = {image_size} must be a positive multiple of "
                             f"2**(len(channel_multiplier)-1) = {factor}")
        if hidden_act not in _ACTIVATIONS:
            raise ValueError(f"image_vq: hidden_act {hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")

        self.in_channels, self.out_channels, self.image_size = in_channels, out_channels, image_size
        self.grid = (image_size // factor, image_size // factor)
        self.codes_per_image = self.grid[0] * self.grid[1]
        self.vocab_size = num_embeddings
        self.codebook_dim = embed_dim
        self.embed_dim = projection_dim  # Decoder contract: width of lm_encode's rows
        self.hidden_in = hidden_in

        self.vqmodel = JanusVQModel(embed_dim=embed_dim, num_embeddings=num_embeddings, latent_channels=latent_channels,
                                    in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                                    channel_multiplier=mult, num_res_blocks=num_res_blocks, dropout=dropout,
                                    grid=self.grid)
        self.generation_embeddings = nn.Embedding(num_embeddings, embed_dim)
        self.generation_aligner = AlignerMLP(embed_dim, projection_dim, num_hidden_layers, hidden_act)
        self.generation_head = GenerationHead(hidden_in, projection_dim, num_embeddings, hidden_act)
        if not train_vqvae:
            self.vqmodel.requires_grad_(False)

    @classmethod
    def from_hf_config(cls, config: Any, **overrides) -> "ImageVQDecoder":
        """Build from a `JanusVQVAEConfig`, a `JanusConfig` (its vq_config) or their dicts.
        `overrides` (e.g. train_vqvae) win over the config."""
        return cls(**{**cls.options_from_hf_config(config), **overrides})

    @staticmethod
    def options_from_hf_config(config: Any) -> dict:
        """Constructor options from a `JanusVQVAEConfig`, a `JanusConfig` (its vq_config) or their dicts."""
        if isinstance(config, Mapping):
            c = dict(config.get("vq_config", config))
        else:
            c = getattr(config, "vq_config", config)
            c = c.to_dict() if hasattr(c, "to_dict") else dict(vars(c))
        if c.get("double_latent", False):
            raise ValueError("image_vq: double_latent=True is not supported (Janus's quant_conv expects "
                             "latent_channels inputs); use double_latent=False")
        mult = list(c.get("channel_multiplier", (1, 1, 2, 2, 4)))
        return dict(embed_dim=c.get("embed_dim", 8), num_embeddings=c.get("num_embeddings", 16384),
                    latent_channels=c.get("latent_channels", 256), in_channels=c.get("in_channels", 3),
                    out_channels=c.get("out_channels", 3), base_channels=c.get("base_channels", 128),
                    channel_multiplier=mult, num_res_blocks=c.get("num_res_blocks", 2), dropout=c.get("dropout", 0.0),
                    image_size=c.get("num_patches", 32) * 2 ** (len(mult) - 1),
                    projection_dim=c.get("projection_dim", 2048), num_hidden_layers=c.get("num_hidden_layers", 2),
                    hidden_act=c.get("hidden_act", "gelu"), hidden_in=c.get("image_token_embed_dim", 2048))

    def set_hidden_in(self, hidden: int) -> None:
        """Make the head read hidden states of width `hidden` (the omni model calls this with
        the backbone width); re-creates the head's input projection when the width changes."""
        if hidden != self.hidden_in:
            old = self.generation_head.proj_out
            self.generation_head.proj_out = nn.Linear(hidden, old.out_features, device=old.weight.device,
                                                      dtype=old.weight.dtype)
            self.hidden_in = hidden

    # -- payloads

    def check_payload(self, target: dict[str, torch.Tensor]) -> None:
        want = f"[num_images, {self.in_channels}, {self.image_size}, {self.image_size}]"
        if not isinstance(target, Mapping) or "pixel_values" not in target:
            keys = sorted(target) if isinstance(target, Mapping) else type(target).__name__
            raise ValueError(f"image_vq: target needs key 'pixel_values' {want}; got {keys}")
        px = target["pixel_values"]
        if not isinstance(px, torch.Tensor) or not px.is_floating_point():
            raise ValueError(f"image_vq: 'pixel_values' must be a floating tensor {want} in [-1, 1]; got "
                             f"{getattr(px, 'dtype', type(px).__name__)}")
        shape = tuple(px.shape)
        if px.ndim != 4:
            raise ValueError(f"image_vq: 'pixel_values' has shape {shape}; expected 4-D {want}")
        if shape[1] != self.in_channels:
            raise ValueError(f"image_vq: 'pixel_values' has shape {shape} with {shape[1]} channels; expected {want}")
        if shape[2:] != (self.image_size, self.image_size):
            raise ValueError(f"image_vq: 'pixel_values' has shape {shape} with resolution {shape[2]}x{shape[3]}; "
                             f"expected {want} (resize images to {self.image_size}x{self.image_size})")

    def num_tokens(self, target: dict[str, torch.Tensor]) -> int:
        self.check_payload(target)
        return target["pixel_values"].shape[0] * self.codes_per_image

    def dummy_payload(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.zeros(1, self.in_channels, self.image_size, self.image_size, device=device)}

    # -- tokenizer

    @torch.no_grad()
    def encode_codes(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Code ids [num_images, codes_per_image] of images (frozen tokenizer: no gradient)."""
        self.check_payload({"pixel_values": pixel_values})
        return self.vqmodel.encode(pixel_values)

    def decode_codes(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Pixels [num_images, out_channels, H, W] of code ids, exactly as JanusVQVAE.decode (unclamped)."""
        ids = token_ids.reshape(token_ids.numel() // self.codes_per_image, self.codes_per_image) \
            if token_ids.ndim == 1 and token_ids.numel() % self.codes_per_image == 0 else token_ids
        if ids.ndim != 2 or ids.shape[1] != self.codes_per_image:
            raise ValueError(f"image_vq: token_ids has shape {tuple(token_ids.shape)}; expected "
                             f"[num_images, {self.codes_per_image}] (a {self.grid[0]}x{self.grid[1]} code grid)")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"image_vq: token_ids must be integer code ids; got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(f"image_vq: token_ids must lie in [0, {self.vocab_size}); got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return self.vqmodel.decode(ids.long())

    # -- Decoder contract

    def lm_encode(self, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_payload(target)
        ids = self.encode_codes(target["pixel_values"]).flatten()
        return self.generation_aligner(self.generation_embeddings(ids)), ids

    def lm_head(self, hidden: torch.Tensor, labels: torch.Tensor,
                fused_loss: str = "off") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if hidden.ndim != 2 or hidden.shape[-1] != self.hidden_in:
            raise ValueError(f"image_vq: lm_head hidden has shape {tuple(hidden.shape)}; expected "
                             f"[N, hidden_in={self.hidden_in}] (set hidden_in to the backbone width)")
        if labels.shape != hidden.shape[:1]:
            raise ValueError(f"image_vq: lm_head labels have shape {tuple(labels.shape)}; expected "
                             f"[{hidden.shape[0]}] (one label per hidden row, -100 to ignore)")
        if fused_loss != "off":  # the head's last projection and the loss, without the logits
            head = self.generation_head
            features = head.act(head.proj_out(hidden))
            return linear_cross_entropy(features, head.vision_head.weight, labels, head.vision_head.bias,
                                        setting=fused_loss)[0], None
        logits = self.generation_head(hidden)
        loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=-100, reduction="sum")
        return loss, logits

    def lm_generate(self, token_ids: torch.Tensor, clamp: bool = True, **kwargs) -> torch.Tensor:
        """Code ids [num_images, codes_per_image] (or flat) -> pixels [num_images, C, H, W],
        clamped to [-1, 1] unless clamp=False."""
        if kwargs:
            raise ValueError(f"image_vq: lm_generate got unknown options {sorted(kwargs)}; it accepts clamp")
        px = self.decode_codes(token_ids)
        return px.clamp(-1.0, 1.0) if clamp else px

    # -- Hugging Face weights

    def load_hf_weights(self, source: str | os.PathLike | Mapping[str, torch.Tensor]) -> list[str]:
        """Load a Janus checkpoint (VQ-VAE under `model.vqmodel.` or `vqmodel.`; generation
        embeddings/aligner/head under `model.` or no prefix when present) or a bare JanusVQVAE
        (keys `encoder.`, `quantize.`, ...). `source`: a state dict, a safetensors file or an HF
        folder. The VQ-VAE must match exactly (missing / unexpected keys and shape mismatches are
        errors); the generation parts load when all of them are present. Returns the names loaded."""
        keys, get = _open_source(source)
        key_set = set(keys)
        own = dict(self.named_parameters())
        own.update(dict(self.named_buffers()))
        vq_names = [n for n in own if n.startswith("vqmodel.")]

        vq_prefix = next((p for p in ("model.vqmodel.", "vqmodel.") if any(k.startswith(p) for k in keys)), None)
        if vq_prefix is None:
            vq_prefix = ""
            if not any(k.startswith(("encoder.", "quantize.", "decoder.")) for k in keys):
                raise ValueError("image_vq: source has no VQ-VAE weights (looked for keys under 'model.vqmodel.', "
                                 f"'vqmodel.' or a bare JanusVQVAE's 'encoder.'/'quantize.'); first keys: {keys[:5]}")
            unexpected = sorted(k for k in keys if "vqmodel." + k not in own and not k.startswith(_GEN_PREFIXES))
        else:
            unexpected = sorted(k for k in keys if k.startswith(vq_prefix) and
                                "vqmodel." + k[len(vq_prefix):] not in own)
        mapping = {n: vq_prefix + n[len("vqmodel."):] for n in vq_names}
        missing = sorted(src for src in mapping.values() if src not in key_set)
        if missing or unexpected:
            raise ValueError(f"image_vq: VQ-VAE weights do not match this config; missing {missing[:10]}"
                             f"{' ...' if len(missing) > 10 else ''} ({len(missing)}), unexpected {unexpected[:10]}"
                             f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)}); build the decoder "
                             "with ImageVQDecoder.from_hf_config(config)")

        gen_prefix = vq_prefix[: -len("vqmodel.")] if vq_prefix else ""
        gen = {n: gen_prefix + n for n in own if n.startswith(_GEN_PREFIXES)}
        present = [n for n, src in gen.items() if src in key_set]
        if present and len(present) != len(gen):
            raise ValueError(f"image_vq: source has some generation weights but misses "
                             f"{sorted(src for src in gen.values() if src not in key_set)}")
        if present:
            mapping.update(gen)

        tensors = {}
        for name, src in mapping.items():
            t = get(src)
            if tuple(t.shape) != tuple(own[name].shape):
                raise ValueError(f"image_vq: shape mismatch for {src} -> {name}: checkpoint {tuple(t.shape)}, "
                                 f"model {tuple(own[name].shape)}")
            tensors[name] = t
        with torch.no_grad():
            for name, t in tensors.items():
                own[name].copy_(t.to(own[name].dtype))
        return sorted(mapping)


def _open_source(source) -> tuple[list[str], Callable[[str], torch.Tensor]]:
    """(keys, getter) of a state dict, a safetensors file or a folder of them (read lazily)."""
    if isinstance(source, Mapping):
        return list(source), lambda k: source[k]
    path = Path(source)
    if not path.exists():
        raise ValueError(f"image_vq: {path} is neither a state dict, a .safetensors file nor a folder holding some")
    files = TensorFiles.of(path)
    return files.keys(), files.get


# ---------------------------------------------------------------- pre-training the tokenizer

@torch.no_grad()
def reconstruction_error(decoder: ImageVQDecoder, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean squared error of images vs decode(encode(images)) through the discrete codes."""
    total = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size]
        total += F.mse_loss(decoder.decode_codes(decoder.encode_codes(x)).float(), x.float(), reduction="sum").item()
    return total / images.numel()


def train_vqvae(decoder: ImageVQDecoder, images: torch.Tensor, steps: int = 300, lr: float = 2e-3,
                batch_size: int = 64, beta: float = 0.25, restart_every: int = 25, seed: int = 0,
                log: Optional[Callable[[int, dict], None]] = None) -> list[float]:
    """Train the VQ-VAE of `decoder` on images [N, C, H, W] in [-1, 1]: MSE reconstruction +
    codebook + beta * commitment loss, straight-through gradients.

    Quantisation is done on L2-normalised vectors and the codebook is kept at unit norm
    after every step, so that Janus's encode (nearest raw entry) and decode (normalised entry)
    agree with what was trained. Codes unused for `restart_every` steps are restarted on
    random encoder outputs of the current batch (this also initialises the codebook from
    data at step 0). Restores the VQ-VAE's requires_grad flags and leaves it in eval mode.
    Returns the reconstruction loss of every step."""
    decoder.check_payload({"pixel_values": images})
    if steps < 1 or batch_size < 1:
        raise ValueError(f"train_vqvae: steps ({steps}) and batch_size ({batch_size}) must be >= 1")
    vq = decoder.vqmodel
    flags = {p: p.requires_grad for p in vq.parameters()}
    vq.requires_grad_(True)
    vq.train()
    codebook = vq.quantize.embedding.weight
    opt = torch.optim.Adam(vq.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    usage = torch.zeros(codebook.shape[0], dtype=torch.long, device=codebook.device)
    history = []
    try:
        for step in range(steps):
            x = images[torch.randint(0, images.shape[0], (batch_size,), generator=gen)].to(codebook.device)
            z = vq.pre_quant(x)
            b, d, h, w = z.shape
            zn = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
            if step % restart_every == 0:
                with torch.no_grad():
                    dead = (usage == 0).nonzero().flatten()
                    pick = torch.randint(0, zn.shape[0], (dead.numel(),), generator=gen).to(zn.device)
                    codebook[dead] = zn[pick].detach() + 1e-3 * torch.randn(dead.numel(), d, generator=gen).to(zn)
                    codebook.copy_(F.normalize(codebook, dim=-1))
                    usage.zero_()
            en = F.normalize(codebook, dim=-1)
            ids = torch.argmax(zn.detach() @ en.detach().t(), dim=1)
            usage += torch.bincount(ids, minlength=usage.numel())
            q = en[ids]
            vq_loss = F.mse_loss(q, zn.detach()) + beta * F.mse_loss(zn, q.detach())
            zq = (zn + (q - zn).detach()).view(b, h, w, d).permute(0, 3, 1, 2)
            recon = vq.decoder(vq.post_quant_conv(zq))
            rec_loss = F.mse_loss(recon, x)
            opt.zero_grad(set_to_none=True)
            (rec_loss + vq_loss).backward()
            opt.step()
            with torch.no_grad():
                codebook.copy_(F.normalize(codebook, dim=-1))
            history.append(rec_loss.item())
            if log is not None:
                log(step, {"recon": history[-1], "vq": vq_loss.item(), "codes_used": int((usage > 0).sum())})
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        vq.eval()
    return history
