"""Contracts of the named, computation-only parts an omni model is assembled from.

An *encoder* turns a payload (pixels, log-mel frames, video frames, ...) into a sequence of
embeddings that replace the payload's placeholder tokens in the text sequence. A *decoder*
turns a target (an image to generate) into discrete tokens the backbone predicts through
the decoder's own head, and turns predicted tokens back into an output.

Payloads are dicts of tensors; every part documents its keys. Parts never import
torch.distributed: under parallelism the same module runs unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from engine.config import MAX_LAYERS, ConfigError


class PartOptionError(ConfigError):
    """A part option with a bad value. `option` names it, so that the build can name the
    config key (`model.encoders[i].<option>`); the message says the fix."""

    def __init__(self, part: str, option: str, problem: str):
        super().__init__(f"{part}: {option} {problem}")
        self.option, self.problem = option, problem


def check_sizes(part: str, **sizes: int) -> None:
    """Raise PartOptionError for the first of `sizes` (option name -> value) below 1."""
    for option, value in sizes.items():
        if value < 1:
            raise PartOptionError(part, option, f"must be >= 1, got {value}")


def check_depths(part: str, **depths: int) -> None:
    """Raise PartOptionError for the first of `depths` (counts of layers or blocks) outside
    [1, MAX_LAYERS]: a typo such as 10**8 would otherwise exhaust memory building modules."""
    check_sizes(part, **depths)
    for option, value in depths.items():
        if value > MAX_LAYERS:
            raise PartOptionError(part, option, f"must be at most {MAX_LAYERS} (layers), got {value}")


class Encoder(nn.Module):
    """Base class of registered encoders. Subclasses set `out_dim` (width of lm_encode's
    rows, before the omni model's projector to the backbone width)."""

    out_dim: int
    media: tuple[str, ...] = ()
    """Media types of conversation content parts this encoder reads (engine/data/
    conversation_media.py): "image" / "video" for a Qwen2-VL-style patch encoder (it then has
    patch_size, spatial_merge_size, temporal_patch_size, in_channels and takes
    {"pixel_values", "grid_thw"}), "audio" for a Whisper-style one (num_mel_bins, min_frames,
    max_frames, tokens_per_clip; takes {"input_features", "feature_lens"})."""

    def forward(self, method: str, *args, **kwargs):
        """`part("lm_encode", payload)` == `part.lm_encode(payload)`, but through __call__."""
        return getattr(self, method)(*args, **kwargs)

    def lm_encode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """[num_tokens, out_dim] embeddings, in the order of the payload's placeholders."""
        raise NotImplementedError

    def num_tokens(self, payload: dict[str, torch.Tensor]) -> int:
        """How many placeholder tokens this payload fills (known before running)."""
        raise NotImplementedError

    def dummy_payload(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """A smallest valid payload, run with zero loss weight by ranks that have none, so
        that collectives of a sharded encoder stay aligned across ranks."""
        raise NotImplementedError

    def check_payload(self, payload: dict[str, torch.Tensor]) -> None:
        """Raise ValueError naming the key, the shape found and the shape expected."""

    @staticmethod
    def collate(payloads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Several payloads (in placeholder order) as one; default: concatenate each key."""
        return {k: torch.cat([p[k] for p in payloads]) for k in payloads[0]}

    def init_param_(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        """Deterministic init of the full tensor of parameter `name` (relative to this part)."""
        if tensor.ndim == 1:
            tensor.zero_() if name.endswith("bias") else tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)


class Decoder(nn.Module):
    """Base class of registered decoders (e.g. image generation through VQ codes)."""

    vocab_size: int  # number of discrete codes the backbone predicts
    embed_dim: int   # width of lm_encode's embeddings (before the projector)

    def forward(self, method: str, *args, **kwargs):
        """`part("lm_encode", payload)` == `part.lm_encode(payload)`, but through __call__."""
        return getattr(self, method)(*args, **kwargs)

    def lm_encode(self, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [num_tokens, embed_dim], token ids [num_tokens]) of a target."""
        raise NotImplementedError

    def lm_head(self, hidden: torch.Tensor, labels: torch.Tensor,
                fused_loss: str = "off") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(sum of cross-entropy over labels != -100, logits [N, vocab_size]) from
        backbone hidden states [N, hidden] at the positions that predict a code. With
        `fused_loss` other than off (model.fused_loss, engine/ops/fused_loss.py) the logits
        are never materialised and None is returned in their place."""
        raise NotImplementedError

    def lm_generate(self, token_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Turn predicted tokens into the output (for images: pixels in [-1, 1])."""
        raise NotImplementedError

    def num_tokens(self, target: dict[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def set_hidden_in(self, hidden: int) -> None:
        """The backbone's width, given before weights exist (for a head over its hidden states)."""

    def dummy_payload(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check_payload(self, target: dict[str, torch.Tensor]) -> None:
        """Raise ValueError naming the key, the shape found and the shape expected."""

    collate = Encoder.collate

    def init_param_(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        Encoder.init_param_(self, name, tensor, generator)



def call_part(part: nn.Module, method: str, *args, **kwargs):
    """Run a part's method through its __call__, so that wrappers on the part (FSDP's
    gather of its shards, hooks) see the call."""
    return part(method, *args, **kwargs)
