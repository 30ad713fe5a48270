"""The `audio` encoder: Whisper's encoder over log-mel frames, then an average pool over time.

Weights map one to one onto transformers' `WhisperEncoder` (same parameter names), and on
full-length inputs the per-frame output equals its `last_hidden_state`. Two departures, both
needed for omni training on short clips packed into one batch:

- clips shorter than Whisper's fixed 30 s window are accepted: they use the first rows of
  `embed_positions`, and padding frames are masked (zeroed before each convolution, hidden
  from attention), so a clip's tokens do not depend on how much padding follows it;
- an `AvgPool1d(pool_stride)` over time after the final layer norm (as Qwen2-Audio does)
  halves the number of tokens the language model sees.

Payload keys:
    input_features  [num_clips, num_mel_bins, frames] float: log-mel frames (see `log_mel`),
                    clips right-padded to a common length, frames <= 2 * max_source_positions.
    feature_lens    [num_clips] long: valid frames of each clip (the rest is padding).

A clip of L valid frames yields `((L - 1) // 2 + 1) // pool_stride` tokens (conv stride 2,
then the pool, which drops an odd last token); `lm_encode` returns the tokens of all clips
concatenated in clip order.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.tensor_files import TensorFiles, model_files
from engine.tensor_match import check_tensors

from .base import Encoder, check_depths, check_sizes
from .registry import register_encoder

SAMPLE_RATE = 16000
N_FFT = 400        # 25 ms window at 16 kHz
HOP_LENGTH = 160   # 10 ms hop


# ---------------------------------------------------------------------------- features

def _hz_to_mel_slaney(freq: np.ndarray) -> np.ndarray:
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    mels[log_region] = 15.0 + np.log(freq[log_region] / 1000.0) * (27.0 / np.log(6.4))
    return mels


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
    freq = 200.0 * mels / 3.0
    log_region = mels >= 15.0
    freq[log_region] = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels[log_region] - 15.0))
    return freq


def mel_filters(num_mel_bins: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                f_max: float = 8000.0) -> np.ndarray:
    """[n_fft // 2 + 1, num_mel_bins] Slaney-scale, Slaney-normalised triangular filters (librosa's
    and Whisper's filterbank)."""
    mel_edges = np.linspace(_hz_to_mel_slaney(np.array([0.0]))[0], _hz_to_mel_slaney(np.array([f_max]))[0],
                            num_mel_bins + 2)
    hz_edges = _mel_to_hz_slaney(mel_edges)
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    slopes = hz_edges[None, :] - fft_freqs[:, None]
    diff = np.diff(hz_edges)
    down, up = -slopes[:, :-2] / diff[:-1], slopes[:, 2:] / diff[1:]
    filters = np.maximum(0.0, np.minimum(down, up))
    return filters * (2.0 / (hz_edges[2:] - hz_edges[:-2]))[None, :]


def log_mel(waveform: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE,
            num_mel_bins: int = 80) -> torch.Tensor:
    """Whisper's log-mel features of a mono waveform, as float32 [num_mel_bins, len // 160].

    Periodic 25 ms Hann window, 10 ms hop (centered, reflect-padded STFT, last frame dropped),
    power spectrum through the mel filterbank, log10 (floored at 1e-10), clamped to
    `max - 8`, then `(x + 4) / 4`. Matches `transformers.WhisperFeatureExtractor` without its
    padding to 30 s.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"log_mel: sample_rate={sample_rate}, Whisper features need {SAMPLE_RATE} Hz audio; "
                         "resample the waveform first")
    wav = torch.as_tensor(np.asarray(waveform) if not isinstance(waveform, torch.Tensor) else waveform)
    if wav.ndim != 1:
        raise ValueError(f"log_mel: waveform has shape {tuple(wav.shape)}, expected a mono signal [samples]")
    if wav.numel() < N_FFT // 2 + 1:
        raise ValueError(f"log_mel: waveform has {wav.numel()} samples, need at least {N_FFT // 2 + 1}")
    wav = wav.detach().to("cpu", torch.float64)
    window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float64)
    stft = torch.stft(wav, N_FFT, HOP_LENGTH, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft[:, :-1].abs() ** 2                                   # [n_fft // 2 + 1, frames]
    mel = torch.from_numpy(mel_filters(num_mel_bins, sample_rate=sample_rate)).T @ power
    spec = mel.clamp(min=1e-10).log10()
    spec = torch.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).float()


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal position table [length, channels] (sin half, then cos half)."""
    if channels % 2:
        raise ValueError(f"d_model={channels} must be even for sinusoidal position embeddings")
    inv = torch.exp(-math.log(max_timescale) / (channels // 2 - 1) * torch.arange(channels // 2))
    t = torch.arange(length).view(-1, 1) * inv.view(1, -1)
    return torch.cat([t.sin(), t.cos()], dim=1)


# ---------------------------------------------------------------------------- modules

EncoderAttentionFn = Callable[..., torch.Tensor]


def sdpa_encoder_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: Optional[torch.Tensor],
                           dropout_p: float = 0.0) -> torch.Tensor:
    """Bidirectional attention of q/k/v [B, H, S, D] (q already scaled: softmax(q k^T) v);
    `key_valid` [B, S] bool hides padding keys (None: all keys valid)."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=1.0)


class WhisperAttention(nn.Module):
    """Whisper's self-attention: k_proj has no bias, queries are scaled before the product.
    `attention_fn` is the kernel hook (same signature as `sdpa_encoder_attention`)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = n_heads, d_model // n_heads, dropout
        self.scaling = self.head_dim ** -0.5
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.attention_fn: EncoderAttentionFn = sdpa_encoder_attention

    def forward(self, x: torch.Tensor, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        heads = lambda t: t.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q = heads(self.q_proj(x) * self.scaling)
        out = self.attention_fn(q, heads(self.k_proj(x)), heads(self.v_proj(x)), key_valid,
                                dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))


class WhisperEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float = 0.0,
                 attention_dropout: float = 0.0, activation_dropout: float = 0.0):
        super().__init__()
        self.self_attn = WhisperAttention(d_model, n_heads, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.final_layer_norm = nn.LayerNorm(d_model)
        self.dropout, self.activation_dropout = dropout, activation_dropout

    def forward(self, x: torch.Tensor, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.self_attn(self.self_attn_layer_norm(x), key_valid)
        x = x + F.dropout(h, self.dropout, self.training)
        h = F.dropout(F.gelu(self.fc1(self.final_layer_norm(x))), self.activation_dropout, self.training)
        return x + F.dropout(self.fc2(h), self.dropout, self.training)


@register_encoder("audio")
class AudioEncoder(Encoder):
    """Whisper encoder (+ time pooling) over log-mel frames; `out_dim` = d_model.

    Options are named as in `WhisperConfig`; `pool_stride` (default 2, 1 = no pooling) is
    the average pool over time applied after the encoder. Defaults are whisper-tiny's.
    """

    media = ("audio",)

    def __init__(self, num_mel_bins: int = 80, d_model: int = 384, encoder_layers: int = 4,
                 encoder_attention_heads: int = 6, encoder_ffn_dim: int = 1536, max_source_positions: int = 1500,
                 pool_stride: int = 2, dropout: float = 0.0, attention_dropout: float = 0.0,
                 activation_dropout: float = 0.0):
        super().__init__()
        check_depths("audio", encoder_layers=encoder_layers)
        check_sizes("audio", num_mel_bins=num_mel_bins, d_model=d_model,
                    encoder_attention_heads=encoder_attention_heads, encoder_ffn_dim=encoder_ffn_dim,
                    max_source_positions=max_source_positions, pool_stride=pool_stride)
        if d_model % encoder_attention_heads:
            raise ValueError(f"d_model={d_model} must be divisible by "
                             f"encoder_attention_heads={encoder_attention_heads}")
        self.num_mel_bins, self.d_model, self.out_dim = num_mel_bins, d_model, d_model
        self.max_source_positions, self.pool_stride, self.dropout = max_source_positions, pool_stride, dropout
        self.max_frames = 2 * max_source_positions
        self.min_frames = 2 * pool_stride - 1  # smallest clip that still yields one token

        self.conv1 = nn.Conv1d(num_mel_bins, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(max_source_positions, d_model)
        self.embed_positions.requires_grad_(False)  # frozen, as in Whisper
        with torch.no_grad():
            self.embed_positions.weight.copy_(sinusoids(max_source_positions, d_model))
        self.layers = nn.ModuleList(
            WhisperEncoderLayer(d_model, encoder_attention_heads, encoder_ffn_dim, dropout, attention_dropout,
                                activation_dropout) for _ in range(encoder_layers))
        self.layer_norm = nn.LayerNorm(d_model)

    @classmethod
    def from_hf_config(cls, config, pool_stride: int = 2) -> "AudioEncoder":
        """Build from a `WhisperConfig` (or its dict / config.json contents)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        if get("activation_function", "gelu") != "gelu":
            raise ValueError(f"activation_function={get('activation_function')!r}: "
                             "the audio encoder implements 'gelu' only")
        keys = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                "max_source_positions", "dropout", "attention_dropout", "activation_dropout")
        return cls(pool_stride=pool_stride, **{k: get(k) for k in keys if get(k) is not None})

    def init_param_(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        if name == "embed_positions.weight":
            tensor.copy_(sinusoids(*tensor.shape))
        else:
            super().init_param_(name, tensor, generator)

    def log_mel(self, waveform: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """[num_mel_bins, frames] Whisper features of a mono 16 kHz waveform (see module `log_mel`)."""
        return log_mel(waveform, sample_rate, self.num_mel_bins)

    # ------------------------------------------------------------------ payload

    def tokens_per_clip(self, feature_lens: torch.Tensor) -> torch.Tensor:
        """Tokens each clip yields: conv stride 2, then the pool (floor)."""
        return ((feature_lens - 1) // 2 + 1) // self.pool_stride

    def num_tokens(self, payload: dict[str, torch.Tensor]) -> int:
        self.check_payload(payload)
        return int(self.tokens_per_clip(payload["feature_lens"]).sum())

    @staticmethod
    def collate(payloads: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Several payloads as one: clips right-padded with zeros to the longest, lengths kept."""
        t = max(p["input_features"].shape[2] for p in payloads)
        feats = [F.pad(p["input_features"], (0, t - p["input_features"].shape[2])) for p in payloads]
        return {"input_features": torch.cat(feats), "feature_lens": torch.cat([p["feature_lens"] for p in payloads])}

    def dummy_payload(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {"input_features": torch.zeros(1, self.num_mel_bins, self.min_frames, device=device),
                "feature_lens": torch.full((1,), self.min_frames, dtype=torch.long, device=device)}

    def check_payload(self, payload: dict[str, torch.Tensor]) -> None:
        for key in ("input_features", "feature_lens"):
            if key not in payload:
                raise ValueError(f"audio payload lacks key {key!r} (has {sorted(payload)}); expected input_features "
                                 "[num_clips, num_mel_bins, frames] and feature_lens [num_clips]")
        x, lens = payload["input_features"], payload["feature_lens"]
        if x.ndim != 3 or x.shape[1] != self.num_mel_bins or not x.is_floating_point():
            raise ValueError(f"audio payload input_features has shape {tuple(x.shape)} ({x.dtype}), expected a float "
                             f"[num_clips, {self.num_mel_bins}, frames] (num_mel_bins={self.num_mel_bins})")
        if x.shape[2] > self.max_frames:
            raise ValueError(f"audio payload input_features has {x.shape[2]} frames (shape {tuple(x.shape)}), at most "
                             f"2 * max_source_positions = {self.max_frames} allowed; split the clip")
        if lens.ndim != 1 or lens.shape[0] != x.shape[0] or lens.dtype != torch.long:
            raise ValueError(f"audio payload feature_lens has shape {tuple(lens.shape)} ({lens.dtype}), expected long "
                             f"[{x.shape[0]}] (one length per clip of input_features {tuple(x.shape)})")
        if x.shape[0] == 0:
            raise ValueError("audio payload has no clips (input_features shape "
                             f"{tuple(x.shape)}); omit the payload or use dummy_payload()")
        lo, hi = int(lens.min()), int(lens.max())
        if lo < self.min_frames or hi > x.shape[2]:
            raise ValueError(f"audio payload feature_lens out of range: found values in [{lo}, {hi}], expected each in "
                             f"[{self.min_frames}, {x.shape[2]}] (at least 2 * pool_stride - 1 frames for one token, "
                             f"at most the {x.shape[2]} frames of input_features {tuple(x.shape)})")

    # ------------------------------------------------------------------ forward

    def forward_frames(self, input_features: torch.Tensor, feature_lens: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output before pooling: ([num_clips, S, d_model], valid positions [num_clips]),
        S = (frames - 1) // 2 + 1. Rows past a clip's valid positions are padding (garbage)."""
        b, _, t = input_features.shape
        if feature_lens is None:
            feature_lens = torch.full((b,), t, dtype=torch.long, device=input_features.device)
        frame_valid = torch.arange(t, device=input_features.device) < feature_lens[:, None]   # [B, T]
        full = bool(frame_valid.all())
        x = input_features if full else input_features * frame_valid[:, None, :].to(input_features.dtype)
        x = F.gelu(self.conv1(x))
        if not full:  # conv2 must see zeros past the clip, as its own zero padding would give
            x = x * frame_valid[:, None, :].to(x.dtype)
        x = F.gelu(self.conv2(x)).transpose(1, 2)                                            # [B, S, D]
        s = x.shape[1]
        lens = (feature_lens - 1) // 2 + 1
        key_valid = None if full else torch.arange(s, device=x.device) < lens[:, None]
        x = x + self.embed_positions.weight[:s].to(x.dtype)
        x = F.dropout(x, self.dropout, self.training)
        for layer in self.layers:
            x = layer(x, key_valid)
        return self.layer_norm(x), lens

    def lm_encode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """[num_tokens, out_dim], the valid tokens of every clip in clip order. (`forward` is the
        base class's method dispatch: under FSDP run `call_part(enc, "lm_encode", payload)`.)"""
        self.check_payload(payload)
        x, lens = payload["input_features"], payload["feature_lens"].to(payload["input_features"].device)
        x = x[:, :, : int(lens.max())]  # drop padding shared by all clips
        h, _ = self.forward_frames(x.to(self.conv1.weight.dtype), lens)
        if self.pool_stride > 1:
            h = F.avg_pool1d(h.transpose(1, 2), self.pool_stride, self.pool_stride).transpose(1, 2)
        valid = torch.arange(h.shape[1], device=h.device) < self.tokens_per_clip(lens)[:, None]
        return h[valid]

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def load_hf_weights(self, source: str | os.PathLike | dict[str, torch.Tensor],
                        prefix: Optional[str] = None) -> None:
        """Load a Whisper encoder's weights from a state dict or an HF folder (safetensors):
        `WhisperForConditionalGeneration` (`model.encoder.*`), `WhisperModel` (`encoder.*`) or a
        bare `WhisperEncoder` (no prefix); `prefix` overrides the detection. Strict."""
        state = _read_state_dict(source) if not isinstance(source, dict) else source
        if prefix is None:
            prefix = next((p for p in ("model.encoder.", "encoder.") if any(k.startswith(p) for k in state)), "")
        tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        own = self.state_dict()
        check_tensors(own, tensors, "audio encoder weights", prefix=prefix,
                      fix="; build the encoder with the checkpoint's config")
        for name, t in tensors.items():
            own[name].copy_(t)


def _read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder's `model.safetensors` (or its sharded index)."""
    files = model_files(folder)
    if not files:
        raise ValueError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
    return TensorFiles(files).read()
