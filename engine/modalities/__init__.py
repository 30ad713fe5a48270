"""Computation-only modality parts, registered by name (no torch.distributed here)."""

from .base import Decoder, Encoder, call_part
from . import audio, image_vq, vision  # noqa: F401  (built-in parts register themselves)
from . import vision_qwen2_5  # noqa: F401
from . import audio_qwen2_5_omni  # noqa: F401
from . import siglip  # noqa: F401
from .audio import log_mel
from .image_vq import ImageVQDecoder, reconstruction_error, train_vqvae
from .registry import DECODERS, ENCODERS, get_decoder, get_encoder, register_decoder, register_encoder

__all__ = ["DECODERS", "ENCODERS", "Decoder", "Encoder", "ImageVQDecoder", "call_part", "get_decoder", "get_encoder",
           "log_mel", "reconstruction_error", "register_decoder", "register_encoder", "train_vqvae"]
