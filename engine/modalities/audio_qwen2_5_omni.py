"""The `qwen2_5_omni_audio` encoder: the Qwen2.5-Omni thinker's audio tower over log-mel frames.

Same computation as transformers' `Qwen2_5OmniAudioEncoder` (the thinker's `audio_tower`), with
the same parameter names, so a checkpoint's `thinker.audio_tower.*` tensors load one to one:

- each clip's frames are cut into chunks of `2 * n_window` frames (the last one shorter), and
  every chunk runs on its own through `conv1` (k3, gelu; zero past the chunk's frames), `conv2`
  (k3, stride 2, gelu) and the sinusoidal positions 0, 1, ... (restarting in each chunk);
- the Whisper-style pre-LN layers attend within each chunk only (transformers' `cu_seqlens`
  blocks; here a batch of chunks with their padding keys hidden);
- per clip, the chunks' valid rows in order are averaged in pairs (`avg_pooler`: stride 2,
  an odd last row dropped), then `ln_post` and `proj` to `output_dim`.

Transformers' encoder applies no dropout whatever its config's dropout fields say, and keeps an
unused `audio_bos_eos_token` embedding: it is kept here too (frozen) so that state dicts match.

Payload keys (as the Whisper-style `audio` part's, see engine/modalities/audio.py):
    input_features  [num_clips, num_mel_bins, frames] float: log-mel frames (`log_mel`, 128 bins
                    for the released models), clips right-padded to a common length.
    feature_lens    [num_clips] long: valid frames of each clip (the rest is padding, ignored).

A clip of L valid frames yields `((L - 1) // 2 + 1) // 2` tokens, which is transformers'
`_get_feat_extract_output_lengths` and the count of audio tokens `Qwen2_5OmniProcessor` puts in
the text for a clip of L frames (its `feature_attention_mask.sum()`: its feature extractor
counts `ceil(samples / 160)` frames, as media conversations' clips do, engine/data/media.py;
`log_mel` alone gives `samples // 160`). `lm_encode` returns
the tokens of all clips concatenated in clip order, as the thinker's `get_audio_features`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.tensor_files import TensorFiles
from engine.tensor_match import check_tensors

from .audio import SAMPLE_RATE, AudioEncoder, WhisperEncoderLayer, log_mel, sinusoids
from .base import Encoder, check_depths, check_sizes
from .registry import register_encoder

_HF_OPTIONS = ("num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
               "max_source_positions", "n_window", "output_dim")
# where the audio tower's tensors sit: original checkpoints (Qwen2.5-Omni: thinker.audio_tower.*,
# a saved thinker: audio_tower.*) and transformers 5's module names (thinker.model.audio_tower.*)
HF_PREFIXES = ("thinker.model.audio_tower.", "thinker.audio_tower.", "model.audio_tower.", "audio_tower.")


@register_encoder("qwen2_5_omni_audio")
class Qwen2_5OmniAudioEncoder(Encoder):
    """Qwen2.5-Omni's audio encoder (chunked Whisper-style encoder, pool, LN, projection);
    `out_dim` = output_dim.

    Options are named as in `Qwen2_5OmniAudioEncoderConfig` (defaults: Qwen2.5-Omni-7B's), plus
    `max_frames`, the longest clip accepted: 3000 = the 30 s the thinker's processor keeps
    (its feature extractor truncates there); the chunked encoder itself has no limit.
    """

    media = ("audio",)

    def __init__(self, num_mel_bins: int = 128, d_model: int = 1280, encoder_layers: int = 32,
                 encoder_attention_heads: int = 20, encoder_ffn_dim: int = 5120, max_source_positions: int = 1500,
                 n_window: int = 100, output_dim: int = 3584, max_frames: int = 3000):
        super().__init__()
        check_depths("qwen2_5_omni_audio", encoder_layers=encoder_layers)
        check_sizes("qwen2_5_omni_audio", num_mel_bins=num_mel_bins, d_model=d_model,
                    encoder_attention_heads=encoder_attention_heads, encoder_ffn_dim=encoder_ffn_dim,
                    max_source_positions=max_source_positions, n_window=n_window, output_dim=output_dim)
        if d_model % encoder_attention_heads or d_model % 2:
            raise ValueError(f"qwen2_5_omni_audio: d_model={d_model} must be even and divisible by "
                             f"encoder_attention_heads={encoder_attention_heads}")
        if n_window > max_source_positions:
            raise ValueError(f"qwen2_5_omni_audio: n_window={n_window} > max_source_positions="
                             f"{max_source_positions}: a chunk of 2 * n_window frames has n_window positions")
        self.min_frames = 3  # the fewest frames that give one token (2 rows after conv2, pooled)
        if max_frames < self.min_frames:
            raise ValueError(f"qwen2_5_omni_audio: max_frames={max_frames} must be >= {self.min_frames}")
        self.num_mel_bins, self.d_model, self.n_window = num_mel_bins, d_model, n_window
        self.max_source_positions, self.output_dim, self.out_dim = max_source_positions, output_dim, output_dim
        self.encoder_layers, self.encoder_attention_heads = encoder_layers, encoder_attention_heads
        self.encoder_ffn_dim, self.max_frames = encoder_ffn_dim, max_frames

        self.conv1 = nn.Conv1d(num_mel_bins, d_model, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d_model, d_model, kernel_size=3, stride=2, padding=1)
        self.audio_bos_eos_token = nn.Embedding(2, output_dim)  # unused by transformers too; kept for the names
        self.audio_bos_eos_token.requires_grad_(False)
        self.layers = nn.ModuleList(WhisperEncoderLayer(d_model, encoder_attention_heads, encoder_ffn_dim)
                                    for _ in range(encoder_layers))
        self.ln_post = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, output_dim)
        self._positions: dict[tuple, torch.Tensor] = {}  # sinusoids by (rows, device, dtype): not a buffer

    # ------------------------------------------------------------------ config

    @staticmethod
    def options_from_hf_config(config: Mapping | str | os.PathLike | object) -> dict:
        """Constructor options from a Qwen2.5-Omni config (a config object, its dict, or a
        config.json path / folder): the full model's (`thinker_config.audio_config`), the
        thinker's (`audio_config`) or the audio encoder's own."""
        if isinstance(config, (str, os.PathLike)):
            path = Path(config)
            config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        elif not isinstance(config, Mapping):
            config = config.to_dict()
        config = dict(config)
        if isinstance(config.get("thinker_config"), Mapping):
            config = dict(config["thinker_config"])
        if isinstance(config.get("audio_config"), Mapping):
            config = dict(config["audio_config"])
        if config.get("activation_function", "gelu") != "gelu":
            raise ValueError(f"qwen2_5_omni_audio: activation_function={config['activation_function']!r}, "
                             "the encoder implements 'gelu' only")
        if "d_model" not in config:
            raise ValueError(f"qwen2_5_omni_audio: no audio encoder config (d_model) in {sorted(config)}; pass a "
                             "Qwen2.5-Omni config.json, its thinker_config or its audio_config")
        return {k: config[k] for k in _HF_OPTIONS if k in config}

    @classmethod
    def from_hf_config(cls, config, **overrides) -> "Qwen2_5OmniAudioEncoder":
        """Build from a Qwen2.5-Omni config (see `options_from_hf_config`); `overrides` win."""
        return cls(**{**cls.options_from_hf_config(config), **overrides})

    def log_mel(self, waveform: np.ndarray | torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
        """[num_mel_bins, frames] Whisper features of a mono 16 kHz waveform (the thinker's
        feature extractor is Whisper's; see engine.modalities.audio.log_mel)."""
        return log_mel(waveform, sample_rate, self.num_mel_bins)

    # ------------------------------------------------------------------ payload

    def tokens_per_clip(self, feature_lens: torch.Tensor) -> torch.Tensor:
        """Tokens each clip yields: conv2's stride 2, then the pool (floor); 0 for under 3 frames."""
        return ((feature_lens - 1) // 2 + 1) // 2

    def num_tokens(self, payload: dict[str, torch.Tensor]) -> int:
        self.check_payload(payload)
        return int(self.tokens_per_clip(payload["feature_lens"]).sum())

    collate = staticmethod(AudioEncoder.collate)  # clips right-padded with zeros to the longest, lengths kept

    def dummy_payload(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return {"input_features": torch.zeros(1, self.num_mel_bins, self.min_frames, device=device),
                "feature_lens": torch.full((1,), self.min_frames, dtype=torch.long, device=device)}

    def check_payload(self, payload: dict[str, torch.Tensor]) -> None:
        where = "qwen2_5_omni_audio payload"
        for key in ("input_features", "feature_lens"):
            if key not in payload:
                raise ValueError(f"{where} lacks key {key!r} (has {sorted(payload)}); expected input_features "
                                 "[num_clips, num_mel_bins, frames] and feature_lens [num_clips]")
        x, lens = payload["input_features"], payload["feature_lens"]
        if x.ndim != 3 or x.shape[1] != self.num_mel_bins or not x.is_floating_point():
            raise ValueError(f"{where} input_features has shape {tuple(x.shape)} ({x.dtype}), expected a float "
                             f"[num_clips, {self.num_mel_bins}, frames] (num_mel_bins={self.num_mel_bins})")
        if lens.ndim != 1 or lens.shape[0] != x.shape[0] or lens.dtype != torch.long:
            raise ValueError(f"{where} feature_lens has shape {tuple(lens.shape)} ({lens.dtype}), expected long "
                             f"[{x.shape[0]}] (one length per clip of input_features {tuple(x.shape)})")
        if x.shape[0] == 0:
            raise ValueError(f"{where} has no clips (input_features shape {tuple(x.shape)}); omit the payload or "
                             "use dummy_payload()")
        lo, hi = int(lens.min()), int(lens.max())
        top = min(x.shape[2], self.max_frames)
        if lo < self.min_frames or hi > top:
            raise ValueError(f"{where} feature_lens out of range: found values in [{lo}, {hi}], expected each in "
                             f"[{self.min_frames}, {top}] (at least {self.min_frames} frames for one token, at most "
                             f"the {x.shape[2]} frames of input_features {tuple(x.shape)} and max_frames="
                             f"{self.max_frames}; split longer clips)")

    # ------------------------------------------------------------------ forward

    def lm_encode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        """[num_tokens, out_dim], the tokens of every clip in clip order. (`forward` is the base
        class's method dispatch: under FSDP run `call_part(enc, "lm_encode", payload)`.)"""
        self.check_payload(payload)
        x = payload["input_features"]
        lens = payload["feature_lens"].to(x.device)
        w = 2 * self.n_window
        # chunks: clip-major, each clip's 2 * n_window-frame windows in order; empty ones dropped
        t = int(lens.max())
        c = -(-t // w)
        cw = w if c > 1 else t  # chunk width: all clips within one chunk need no more than the longest
        x = F.pad(x[:, :, :t], (0, c * cw - t)).to(self.conv1.weight.dtype)
        b, m = x.shape[:2]
        chunk_lens = (lens[:, None] - w * torch.arange(c, device=x.device)).clamp(0, w)      # [B, C]
        keep = chunk_lens > 0
        x = x.view(b, m, c, cw).transpose(1, 2)[keep]                                        # [N, M, CW]
        chunk_lens = chunk_lens[keep]                                                       # [N]
        frame_valid = torch.arange(cw, device=x.device) < chunk_lens[:, None]                # [N, CW]
        full = bool(frame_valid.all())
        if not full:  # frames past a chunk are zeros for conv1, as transformers' chunk padding
            x = x * frame_valid[:, None, :].to(x.dtype)
        h = F.gelu(self.conv1(x))
        if not full:  # and conv1's output there is zeroed before conv2 (its padded_mask)
            h = h * frame_valid[:, None, :].to(h.dtype)
        h = F.gelu(self.conv2(h)).transpose(1, 2)                                           # [N, S, D]
        s = h.shape[1]
        h = h + self._position_table(s, h.device, h.dtype)
        rows = (chunk_lens - 1) // 2 + 1                                                    # valid rows per chunk
        row_valid = torch.arange(s, device=h.device) < rows[:, None]                         # [N, S]
        key_valid = None if bool(row_valid.all()) else row_valid
        for layer in self.layers:
            h = layer(h, key_valid)
        h = h[row_valid]                                                                    # [sum rows, D]
        # per clip: rows averaged in pairs (an odd last row dropped), then ln_post and proj
        clip_rows = (lens - 1) // 2 + 1
        pooled = clip_rows // 2
        first_row = F.pad(clip_rows.cumsum(0)[:-1], (1, 0))
        first_out = F.pad(pooled.cumsum(0)[:-1], (1, 0))
        k = torch.arange(int(pooled.sum()), device=h.device)
        start = torch.repeat_interleave(first_row - 2 * first_out, pooled) + 2 * k
        h = (h[start] + h[start + 1]) / 2
        return self.proj(self.ln_post(h))

    def _position_table(self, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Rows 0..rows-1 of transformers' `SinusoidsPositionEmbedding` (computed in float32,
        then cast), made once per device and dtype."""
        key = (rows, device, dtype)
        if key not in self._positions:
            self._positions[key] = sinusoids(rows, self.d_model).to(device, dtype)
        return self._positions[key]

    # ------------------------------------------------------------------ weights

    @torch.no_grad()
    def load_hf_weights(self, source: Mapping[str, torch.Tensor] | str | os.PathLike,
                        prefix: str | None = None) -> None:
        """Copy a Qwen2.5-Omni audio tower into this module, strictly.

        `source`: a state dict or a Hugging Face folder of safetensors files (whose config.json,
        if any, must agree with this encoder's options). Its tensors are those under the first of
        `HF_PREFIXES` found (full model `thinker.audio_tower.*`, thinker `audio_tower.*`, and
        transformers 5's in-memory `thinker.model.audio_tower.*` / `model.audio_tower.*`), else
        all of them (a bare `Qwen2_5OmniAudioEncoder`); `prefix` overrides the detection.
        """
        files = None
        if isinstance(source, (str, os.PathLike)):
            folder = Path(source)
            if (folder / "config.json").is_file():
                theirs = self.options_from_hf_config(folder)
                diff = {k: (v, getattr(self, k)) for k, v in theirs.items() if v != getattr(self, k)}
                if diff:
                    raise ValueError(f"qwen2_5_omni_audio: {folder}/config.json disagrees with this encoder's "
                                     f"options (name: (checkpoint, ours)): {diff}; build it with from_hf_config")
            files = TensorFiles.of(folder)
            names = files.keys()
        else:
            names = list(source)
        if prefix is None:
            prefix = next((p for p in HF_PREFIXES if any(k.startswith(p) for k in names)), "")
        picked = [k for k in names if k.startswith(prefix)]
        tensors = {k[len(prefix):]: (files.get(k) if files is not None else source[k]) for k in picked}
        own = self.state_dict()
        check_tensors(own, tensors, "qwen2_5_omni_audio weights", prefix=prefix,
                      fix="; build the encoder with the checkpoint's config (from_hf_config)")
        for name, t in tensors.items():
            own[name].copy_(t)
