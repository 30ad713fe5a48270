"""Qwen2.5-Omni's thinker behind transformers' keyword arguments.

The checkpoint side (config, names, loading with the tower's q/k/v stacked into our attn.qkv,
export, a whole model's `thinker.` prefix) is the generic one of engine/checkpoint/qwen2_vl.py,
whose `FAMILIES` has the rows `Qwen2_5OmniThinkerForConditionalGeneration`,
`Qwen2_5OmniForConditionalGeneration` (and its hub name `Qwen2_5OmniModel`). What is the thinker's
own is here: its inputs (audio clips as log-mel frames with `feature_attention_mask`, videos'
`video_second_per_grid`, `use_audio_in_video`) and its time-aligned positions (TMRoPE,
`engine.data.mrope.tmrope_positions`, equal to the thinker's `get_rope_index`).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from engine.data.mrope import audio_feature_tokens, tmrope_positions

from .qwen2_vl import VisionLanguageModel, _split_by_grid


class ThinkerModel(VisionLanguageModel):
    """Our omni model (the `qwen2_5_vision` and `qwen2_5_omni_audio` parts around an M-RoPE
    backbone) behind `Qwen2_5OmniThinkerForConditionalGeneration`'s keyword arguments:
    `model(input_ids, attention_mask, input_features, feature_attention_mask, pixel_values,
    image_grid_thw, pixel_values_videos, video_grid_thw, video_second_per_grid,
    use_audio_in_video)` -> logits [B, S, V].

    - audio: `input_features` [clips, mel bins, frames] (right-padded) with
      `feature_attention_mask` [clips, frames] (1 for each clip's frames, then 0), or
      `audio_feature_lengths` [clips]; one clip per run of audio placeholders, in order of
      appearance (a video's own audio, with `use_audio_in_video`, where its first chunk is);
    - images and videos as for Qwen2.5-VL (one vision part, in order of appearance);
      `video_second_per_grid` (`second_per_grid_ts` too) one per video, default 1.0;
    - positions: TMRoPE per row (`tmrope_positions`); padded positions (attention_mask 0, right
      padding) form a document of their own.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                input_features: Optional[torch.Tensor] = None, feature_attention_mask: Optional[torch.Tensor] = None,
                audio_feature_lengths: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None, pixel_values_videos: Optional[torch.Tensor] = None,
                video_grid_thw: Optional[torch.Tensor] = None, use_audio_in_video: Optional[bool] = None,
                video_second_per_grid=None, second_per_grid_ts=None, **unused) -> torch.Tensor:
        m = self.media
        images = _split_by_grid(pixel_values, image_grid_thw)
        videos = _split_by_grid(pixel_values_videos, video_grid_thw)
        secs = video_second_per_grid if video_second_per_grid is not None else second_per_grid_ts
        secs = None if secs is None else torch.as_tensor(secs, dtype=torch.float64).reshape(-1).tolist()
        lens = clip_lengths(input_features, feature_attention_mask, audio_feature_lengths)
        ids_of = dict(image_token_id=m.image, video_token_id=m.video, audio_token_id=m.audio,
                      vision_start_token_id=m.vision_start, audio_start_token_id=m.audio_start,
                      spatial_merge_size=m.merge, position_id_per_seconds=m.tokens_per_second,
                      seconds_per_chunk=m.seconds_per_chunk, use_audio_in_video=bool(use_audio_in_video))

        def positions(ids: torch.Tensor, span: dict) -> np.ndarray:
            (i0, i1), (v0, v1), (a0, a1) = span["image"], span["video"], span["audio"]
            return tmrope_positions(ids, [g for _, g in images[i0:i1]] or None, [g for _, g in videos[v0:v1]] or None,
                                    lens[a0:a1] or None, second_per_grid_ts=None if secs is None else secs[v0:v1],
                                    **ids_of)[0]

        payloads = {}
        if lens:
            feature_lens = torch.tensor(lens, dtype=torch.long, device=input_features.device)
            payloads[m.audio_part] = {"input_features": input_features, "feature_lens": feature_lens}
        return self._logits(input_ids, attention_mask, images, videos, positions,
                            audio_feature_tokens(lens).tolist(), payloads)


def clip_lengths(features: Optional[torch.Tensor], mask: Optional[torch.Tensor],
                 lengths: Optional[torch.Tensor]) -> list[int]:
    """Each clip's frames: `feature_attention_mask`'s ones (which must lead each row: right
    padding, as the processor writes it), else `audio_feature_lengths`; [] without clips."""
    if features is None:
        return []
    if mask is not None:
        lens = mask.long().sum(-1)
        if not torch.equal(mask.bool(), torch.arange(mask.shape[-1], device=mask.device) < lens[:, None]):
            raise ValueError("feature_attention_mask: each clip's row must be ones then zeros (frames right-padded, "
                             "as Qwen2_5OmniProcessor writes them)")
        return lens.tolist()
    if lengths is None:
        raise ValueError(f"input_features {tuple(features.shape)} need feature_attention_mask (or "
                         "audio_feature_lengths): the frames of each clip")
    return torch.as_tensor(lengths).reshape(-1).long().tolist()
