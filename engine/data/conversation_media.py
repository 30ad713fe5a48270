"""Images, videos and speech inside chat messages: which part reads them, how many placeholder
tokens each one fills, and where those tokens go in the conversation's ids.

Messages carry media as transformers' chat templates take them: content parts
``{"type": "image", "image": PATH}``, ``{"type": "video", "video": PATH}``,
``{"type": "audio", "audio": PATH}`` (``"path"`` is accepted for the file too), PATH relative
to the data file. Each goes to the model's first part whose class lists its type in
`Encoder.media` (the built-in ``vision`` part reads images and videos, ``audio`` clips).

How a payload's tokens enter the ids, as the checkpoint's processor does it:

- **Native media tokens.** When the tokenizer has the checkpoint's own media token for every
  media type of a conversation (``<|image_pad|>``, ``<|video_pad|>``, ``<|audio_pad|>``, or
  Qwen2.5-Omni's ``<|IMAGE|>``, ``<|VIDEO|>``, ``<|AUDIO|>``), the chat template renders the
  media parts itself (Qwen2-VL's writes ``<|vision_start|><|image_pad|><|vision_end|>``) and
  each media token is repeated as many times as its part returns embeddings, which is what
  ``Qwen2VLProcessor`` does to the text before tokenising. The ids keep the native token
  (image and video pads differ, as M-RoPE needs); the data layer maps them to the part's
  placeholder when it builds a batch (one part may own several tokens).
- **Otherwise** each media part is rendered as a private sentinel inside the message's text,
  the rendering is tokenised around the sentinels, and each sentinel becomes that many of the
  part's placeholder id (the last vocabulary ids, `engine.models.omni.placeholder_ids`).

**Audio inside videos** (``data.use_audio_in_video: true``, for a model with a part that reads
videos and one that reads audio; no effect otherwise): a video whose file has an audio stream
also gives that track as an audio payload (`engine.data.media.load_video_audio`), counted from
the container's header like a clip. For a Qwen2.5-Omni checkpoint (``model.seconds_per_chunk``
set, native tokens) its ``<|VIDEO|>`` becomes what ``Qwen2_5OmniProcessor(use_audio_in_video=True)``
writes: ``<|audio_bos|>``, the video's and its audio's tokens alternating chunk by chunk
(``seconds_per_chunk`` of time ids at ``position_id_per_seconds``: `_video_with_audio`),
``<|audio_eos|>``, inside the template's ``<|vision_bos|> ... <|vision_eos|>``, and TMRoPE
interleaves their positions (`engine.data.mrope.tmrope_positions`). Other models get the video's
tokens followed by its audio's (native tokens or the parts' placeholders). The audio part
receives the track in order of appearance among the clips (where the video stands), as the
processor orders it and the thinker consumes it. A video without an audio stream is read alone,
as the processor skips a silent video's audio (transformers' thinker takes one
``use_audio_in_video`` for all videos; here each video has its own).

Token counts come from file headers (image size, audio length, video frame count and rate):
`media_refs_for` never decodes pixels or samples, so the length index of a data set is cheap.
Placeholder tokens are never targets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.config import ConfigError

from .chat import ConversationError, MEDIA_TYPES, encode_conversation
from .media import AudioRule, MediaError, VisionRule, audio_frames, image_grid, load_audio, load_image, load_video, \
    load_video_audio, video_audio_frames, video_timing

__all__ = ["MEDIA_TYPES", "MediaPlan", "conversation_media", "encode_media_conversation", "load_payloads",
           "media_plan", "model_ids"]

NATIVE_TOKENS = {"image": ("<|image_pad|>", "<|IMAGE|>"), "video": ("<|video_pad|>", "<|VIDEO|>"),
                 "audio": ("<|audio_pad|>", "<|AUDIO|>")}
_SENTINEL = re.compile("\ue000(\\d+)\ue001")  # private-use characters: never in real text


@dataclass(frozen=True)
class MediaPlan:
    """How a model reads media: everything here decides the ids, so it is part of the data
    fingerprint. Plain data (pickled into tokenising processes)."""

    parts: tuple[tuple[str, str], ...]            # (media type, part name) the model can read
    placeholders: tuple[tuple[str, int], ...]     # (part name, the model's placeholder id)
    native: tuple[tuple[str, int], ...]           # (media type, the tokenizer's own media token id)
    vision: Optional[VisionRule] = None
    audio: Optional[AudioRule] = None
    audio_tokens: tuple[int, ...] = ()            # tokens of a clip of f log-mel frames, f = 0..max_frames
    tokens_per_second: Optional[float] = None     # Qwen2.5-VL: video positions advance this much per second
    seconds_per_chunk: Optional[float] = None     # Qwen2.5-Omni: TMRoPE (audio and video on one clock)
    starts: tuple[tuple[str, int], ...] = ()      # ("vision" | "audio", the tokenizer's start token id)
    ends: tuple[tuple[str, int], ...] = ()        # ("vision" | "audio", end token id), with audio_in_video
    audio_in_video: bool = False                  # data.use_audio_in_video with a video and an audio part

    def part(self, kind: str) -> Optional[str]:
        return dict(self.parts).get(kind)

    def placeholder(self, kind: str) -> int:
        return dict(self.placeholders)[self.part(kind)]

    def native_id(self, kind: str) -> Optional[int]:
        return dict(self.native).get(kind)

    def tokens(self, ref: dict) -> int:
        if ref["type"] == "audio":
            return self.audio_tokens[ref["frames"]]
        t, h, w = ref["grid"]
        return t * h * w // self.vision.merge_size ** 2

    def track_tokens(self, ref: dict) -> int:
        """Audio tokens of a video's own track (0 for anything else)."""
        return self.audio_tokens[ref["audio_frames"]] if ref.get("audio_frames") is not None else 0

    def id_to_placeholder(self) -> dict[int, int]:
        """Native media token id -> the placeholder id of the part that reads it."""
        return {i: self.placeholder(kind) for kind, i in self.native if self.part(kind)}


def _preprocessor_config(folder: Optional[Path]) -> dict:
    """The checkpoint's image processor settings (preprocessor_config.json), when there is one."""
    f = folder / "preprocessor_config.json" if folder else None
    if f is None or not f.is_file():
        return {}
    try:
        raw = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    size = raw.get("size") or {}
    out = {"min_pixels": raw.get("min_pixels", size.get("shortest_edge")),
           "max_pixels": raw.get("max_pixels", size.get("longest_edge")),
           "image_mean": raw.get("image_mean"), "image_std": raw.get("image_std")}
    return {k: v for k, v in out.items() if v is not None}


def media_plan(cfg, parts, tokenizer, folder: Optional[Path]) -> Optional[MediaPlan]:
    """The plan of a config whose model has parts that read media (None without).
    `parts`: the model's PartLayout; `tokenizer`: the data tokenizer (for its native media
    tokens); `folder`: the tokenizer's folder (its preprocessor_config.json gives the image
    size bounds and normalisation the checkpoint was trained with; data.* keys win)."""
    if parts is None:
        return None
    reader = {}  # media type -> the first part (config order) whose class reads it
    for name, module in parts.parts.items():
        for kind in getattr(type(module), "media", ()):
            reader.setdefault(kind, name)
    kinds = tuple((kind, reader[kind]) for kind in MEDIA_TYPES if kind in reader)
    if not kinds:
        return None
    d, vision, audio, audio_tokens, tokens_per_second = cfg.data, None, None, (), None
    if "image" in reader or "video" in reader:
        v = parts.parts[reader.get("image", reader.get("video"))]
        pre = _preprocessor_config(folder)
        one = v.in_channels == 1
        mean = tuple(pre.get("image_mean", (0.5,) if one else VisionRule.image_mean))
        std = tuple(pre.get("image_std", (0.5,) if one else VisionRule.image_std))
        # data.min_pixels / max_pixels bound images and video frames alike; unset, each takes the
        # checkpoint's (or Qwen2-VL's) own bounds: the video processor's are not the image processor's
        videos = {"video_min_pixels": d.min_pixels, "video_max_pixels": d.max_pixels}
        vision = VisionRule(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                            temporal_patch_size=v.temporal_patch_size, in_channels=v.in_channels,
                            min_pixels=int(d.min_pixels or pre.get("min_pixels", VisionRule.min_pixels)),
                            max_pixels=int(d.max_pixels or pre.get("max_pixels", VisionRule.max_pixels)),
                            image_mean=mean, image_std=std, video_fps=float(d.video_fps), max_frames=int(d.max_frames),
                            **{key: int(px) for key, px in videos.items() if px})
        tokens_per_second = getattr(v, "tokens_per_second", None)
        probe = {"grid_thw": torch.tensor([[2, 2 * v.spatial_merge_size, 3 * v.spatial_merge_size]])}
        assert v.num_tokens(probe) == 12, "the vision part's token count is t*h*w / merge**2 (Qwen2-VL)"
    if "audio" in reader:
        a = parts.parts[reader["audio"]]
        audio = AudioRule(num_mel_bins=a.num_mel_bins, min_frames=a.min_frames, max_frames=a.max_frames)
        audio_tokens = tuple(int(n) for n in a.tokens_per_clip(torch.arange(a.max_frames + 1)))
    vocab = getattr(tokenizer, "_tok", None)
    native = []
    for kind in MEDIA_TYPES:
        for token in NATIVE_TOKENS[kind]:
            i = vocab.token_to_id(token) if vocab is not None else None
            if i is not None:
                native.append((kind, int(i)))
                break
    placeholders = tuple((name, parts.placeholders[name]) for name in sorted({n for _, n in kinds}))
    starts, ends = [], []
    for kind, names, out in (("vision", ("<|vision_bos|>", "<|vision_start|>"), starts),
                             ("audio", ("<|audio_bos|>", "<|audio_start|>"), starts),
                             ("vision", ("<|vision_eos|>", "<|vision_end|>"), ends),
                             ("audio", ("<|audio_eos|>", "<|audio_end|>"), ends)):
        found = [vocab.token_to_id(t) for t in names if vocab is not None and vocab.token_to_id(t) is not None]
        if found:
            out.append((kind, int(found[0])))
    in_video = bool(d.use_audio_in_video) and "video" in reader and "audio" in reader
    ends = ends if in_video else []  # only read with audio in videos (and then part of the fingerprint)
    native_ids = dict(native)
    if in_video and cfg.model.seconds_per_chunk is not None and "video" in native_ids and "audio" in native_ids:
        missing = [what for what, ok in (("the vision part's tokens_per_second", tokens_per_second is not None),
                                         ("an audio start token", "audio" in dict(starts)),
                                         ("an audio end token", "audio" in dict(ends))) if not ok]
        if missing:
            raise ConfigError(f"config key 'data.use_audio_in_video'=true with model.seconds_per_chunk interleaves "
                              f"each video with its audio as Qwen2.5-Omni's processor does, which needs "
                              f"{', '.join(missing)}: use a Qwen2.5-Omni checkpoint (model.init_from) and its "
                              "tokenizer, or set data.use_audio_in_video=false")
    return MediaPlan(kinds, placeholders, tuple(native), vision, audio, audio_tokens, tokens_per_second,
                     cfg.model.seconds_per_chunk, tuple(starts), tuple(ends), in_video)


# ---- the media of a conversation -------------------------------------------------------------
def _media_parts(messages) -> list[tuple[int, str, object]]:
    """(message index, type, the part's file) of every media part, in order."""
    out = []
    for i, message in enumerate(messages if isinstance(messages, (list, tuple)) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") in MEDIA_TYPES:
                out.append((i, part["type"], part.get(part["type"], part.get("path"))))
    return out


def conversation_media(messages, plan: Optional[MediaPlan], base_dir: Path) -> list[dict]:
    """The media refs of a conversation from file headers: ``{"type", "path", "grid" | "frames",
    "tokens"}`` in order of appearance (a video also ``"seconds_per_grid"``, and ``"audio_frames"``
    when the plan reads audio in videos and its file has an audio stream). Raises
    ConversationError (a media part no part of the model reads, a part without a file name) or
    MediaError (missing, unreadable, unsupported)."""
    refs = []
    for i, kind, file in _media_parts(messages):
        if plan is None or plan.part(kind) is None:
            raise ConversationError("no_part_for_" + kind, f"message {i} has a {kind} but the model has no "
                                    f"part that reads {kind}s (e.g. {'audio' if kind == 'audio' else 'vision'}): add one to model.encoders, or drop the "
                                    f"{kind}s from the data")
        if not isinstance(file, str) or not file:
            raise ConversationError("bad_content", f"message {i}: a {kind} part needs its file as "
                                                   f"{{'type': '{kind}', '{kind}': PATH}}, got {file!r}")
        if re.match(r"^[a-z][a-z0-9+.-]*://", file):
            raise MediaError("unsupported", f"{file}: remote {kind}s are not fetched; download the file and give its "
                                            "path relative to the data file")
        path = Path(file) if Path(file).is_absolute() else Path(base_dir) / file
        ref = {"type": kind, "path": str(path)}
        if kind == "audio":
            ref["frames"] = audio_frames(path, plan.audio)
        elif kind == "image":
            ref["grid"] = list(image_grid(path, plan.vision))
        else:
            grid, seconds = video_timing(path, plan.vision)
            ref["grid"], ref["seconds_per_grid"] = list(grid), seconds
            if plan.audio_in_video:
                track = video_audio_frames(path, plan.audio)
                if track is not None:
                    ref["audio_frames"] = track
        ref["tokens"] = plan.tokens(ref)
        refs.append(ref)
    return refs


def _sentinel_messages(messages) -> list:
    """Messages whose media parts are sentinels inside their (now string) text."""
    out, k = [], 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in MEDIA_TYPES for p in content):
            text = []
            for part in content:
                if isinstance(part, dict) and part.get("type") in MEDIA_TYPES:
                    text.append(f"\ue000{k}\ue001")
                    k += 1
                elif isinstance(part, dict) and part.get("type") == "text":
                    text.append(part.get("text", ""))
            message = {**message, "content": "".join(text)}
        out.append(message)
    return out


def encode_media_conversation(tokenizer, template, messages, plan: Optional[MediaPlan], base_dir: Path,
                              train_on: str = "assistant", tools=None, add_generation_prompt: bool = False
                              ) -> tuple[list[int], list[bool], list[dict]]:
    """(ids, target mask, media refs) of a conversation whose messages may hold media parts
    (rules in the module docstring). Raises ConversationError or MediaError."""
    refs = conversation_media(messages, plan, base_dir)
    if not refs:
        ids, mask = encode_conversation(tokenizer, template, messages, train_on, tools,
                                        add_generation_prompt=add_generation_prompt)
        return ids, mask, []
    kinds = [r["type"] for r in refs]
    tracks = any(r.get("audio_frames") is not None for r in refs)  # videos with their audio
    if all(plan.native_id(k) is not None for k in kinds + (["audio"] if tracks else [])):
        ids, mask = encode_conversation(tokenizer, template, messages, train_on, tools, media=True,
                                        add_generation_prompt=add_generation_prompt)
        kind_of = {plan.native_id(k): k for k in MEDIA_TYPES if plan.native_id(k) is not None}
        found = [kind_of[t] for t in ids if t in kind_of]
        if found != kinds:
            raise ConversationError("template", f"the chat template writes media tokens for {found or 'no media'} but "
                                                f"the messages hold {kinds}: use a template that renders each media "
                                                "part as the checkpoint's media token")
        out_ids, out_mask, k = [], [], 0
        for t, m in zip(ids, mask):
            if t in kind_of and refs[k].get("audio_frames") is not None and plan.seconds_per_chunk is not None:
                run = _video_with_audio(refs[k], plan)  # the bounds are text tokens, as the template's
                out_ids += run
                out_mask += [m] + [False] * (len(run) - 2) + [m]
                k += 1
            elif t in kind_of and refs[k].get("audio_frames") is not None:  # the video's tokens, then its audio's
                out_ids += [t] * refs[k]["tokens"] + [plan.native_id("audio")] * plan.track_tokens(refs[k])
                out_mask += [False] * (refs[k]["tokens"] + plan.track_tokens(refs[k]))
                k += 1
            elif t in kind_of:
                out_ids += [t] * refs[k]["tokens"]
                out_mask += [False] * refs[k]["tokens"]
                k += 1
            else:
                out_ids.append(t)
                out_mask.append(m)
        return out_ids, out_mask, refs

    def encode(text: str):
        ids, offsets, at = [], [], 0
        for match in list(_SENTINEL.finditer(text)) + [None]:
            end = match.start() if match else len(text)
            seg_ids, seg_offsets = tokenizer.encode_with_offsets(text[at:end])
            ids += seg_ids
            offsets += [(at + s, at + e) for s, e in seg_offsets]
            if match:
                ref = refs[int(match.group(1))]
                run = [plan.placeholder(ref["type"])] * ref["tokens"]
                if plan.track_tokens(ref):  # a video's own audio after it
                    run += [plan.placeholder("audio")] * plan.track_tokens(ref)
                ids += run
                offsets += [(match.start(), match.start())] * len(run)
                at = match.end()
        return ids, offsets

    ids, mask = encode_conversation(tokenizer, template, _sentinel_messages(messages), train_on, tools,
                                    encode=encode, add_generation_prompt=add_generation_prompt)
    placeholders = {plan.placeholder(k) for k in kinds + (["audio"] if tracks else [])}
    if sum(t in placeholders for t in ids) != sum(r["tokens"] + plan.track_tokens(r) for r in refs):
        raise ConversationError("template", "the chat template drops some of the messages' media parts: use a "
                                            "template that renders every message's content")
    return ids, [m and t not in placeholders for t, m in zip(ids, mask)], refs


def load_payloads(refs: list[dict], plan: MediaPlan) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Decode the media of a sample: part name -> payloads in placeholder order (a video's own
    audio right after it among the clips). Raises MediaError, also when a file no longer gives
    the tokens counted when the data was prepared."""
    out: dict[str, list] = {}
    for ref in refs:
        kind, path = ref["type"], ref["path"]
        if kind == "audio":
            payload = load_audio(path, plan.audio)
            found = {"frames": int(payload["feature_lens"][0])}
        else:
            payload = (load_image if kind == "image" else load_video)(path, plan.vision)
            found = {"grid": payload["grid_thw"][0].tolist()}
        track = None
        if ref.get("audio_frames") is not None:
            track = load_video_audio(path, plan.audio)
            found["audio_frames"] = None if track is None else int(track["feature_lens"][0])
        expected = {k: ref[k] for k in found}
        if found != expected:
            raise MediaError("changed", f"{path}: the {kind} gives {found} but the prepared data counted {expected}; "
                                        "the file changed since: prepare the data again")
        out.setdefault(plan.part(kind), []).append(payload)
        if track is not None:
            out.setdefault(plan.part("audio"), []).append(track)
    return out


def model_ids(ids: np.ndarray, refs: list[dict], plan: Optional[MediaPlan], mrope: bool
              ) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(ids with native media tokens replaced by their part's placeholder, M-RoPE positions
    [3, len] from the native tokens when `mrope`, else None) of one sample."""
    positions = None
    if mrope and plan is not None and plan.seconds_per_chunk is not None:
        positions = _tmrope(ids, refs, plan)
    elif mrope:
        from .mrope import mrope_positions

        grids = {kind: [r["grid"] for r in refs if r["type"] == kind] or None for kind in ("image", "video")}
        token = {kind: (plan.native_id(kind) if plan and plan.native_id(kind) is not None else -1)
                 for kind in ("image", "video")}
        timed = plan is not None and plan.tokens_per_second is not None and grids["video"] is not None
        positions, _ = mrope_positions(
            ids, grids["image"], grids["video"], token["image"], token["video"],
            plan.vision.merge_size if plan and plan.vision else 2,
            [r["seconds_per_grid"] for r in refs if r["type"] == "video"] if timed else None,
            plan.tokens_per_second if timed else None)
    to_placeholder = plan.id_to_placeholder() if plan else {}
    if to_placeholder:
        ids = np.array([to_placeholder.get(t, t) for t in ids.tolist()], dtype=np.int64)
    return ids, positions


def _video_with_audio(ref: dict, plan: MediaPlan) -> list[int]:
    """The native ids ``Qwen2_5OmniProcessor.replace_video_with_audio_token`` puts in place of a
    video's ``<|VIDEO|>`` with ``use_audio_in_video=True``: the audio start token, then chunk by
    chunk the video's tokens whose time id ``t * seconds_per_grid * position_id_per_seconds``
    (float64, as the processor computes it) falls in the chunk and the audio's tokens whose index
    does, chunks of ``int(position_id_per_seconds * seconds_per_chunk)`` ids, then the audio end."""
    from .mrope import chunked_index

    t, h, w = ref["grid"]
    merge, pps = plan.vision.merge_size, plan.tokens_per_second
    times = np.repeat(np.arange(t) * ref["seconds_per_grid"] * pps, (h // merge) * (w // merge))
    per_chunk = int(pps * plan.seconds_per_chunk)
    video_chunks = chunked_index(times, per_chunk)
    audio_chunks = chunked_index(np.arange(plan.track_tokens(ref)), per_chunk)
    run = [dict(plan.starts)["audio"]]
    for j in range(max(len(video_chunks), len(audio_chunks))):
        for chunks, kind in ((video_chunks, "video"), (audio_chunks, "audio")):
            if j < len(chunks):
                run += [plan.native_id(kind)] * (chunks[j][1] - chunks[j][0])
    return run + [dict(plan.ends)["audio"]]


def _tmrope(ids: np.ndarray, refs: list[dict], plan: MediaPlan) -> np.ndarray:
    """Qwen2.5-Omni's TMRoPE positions [3, len] of one sample: each clip its own item; a video
    with its own audio (``audio_frames``) interleaved with it, the others alone."""
    from .mrope import tmrope_positions

    native = {kind: plan.native_id(kind) if plan.native_id(kind) is not None else -1 for kind in MEDIA_TYPES}
    of = {kind: [r for r in refs if r["type"] == kind] for kind in MEDIA_TYPES}
    audio = [r["frames"] if r["type"] == "audio" else r["audio_frames"] for r in refs
             if r["type"] == "audio" or r.get("audio_frames") is not None]   # in order of appearance
    starts = dict(plan.starts)
    positions, _ = tmrope_positions(
        ids, [r["grid"] for r in of["image"]] or None, [r["grid"] for r in of["video"]] or None,
        audio or None, image_token_id=native["image"], video_token_id=native["video"],
        audio_token_id=native["audio"], vision_start_token_id=starts.get("vision", -1),
        audio_start_token_id=starts.get("audio", -1),
        spatial_merge_size=plan.vision.merge_size if plan.vision else 2,
        position_id_per_seconds=plan.tokens_per_second or 25, seconds_per_chunk=plan.seconds_per_chunk,
        second_per_grid_ts=[r["seconds_per_grid"] for r in of["video"]] or None,
        use_audio_in_video=[r.get("audio_frames") is not None for r in of["video"]])
    return positions
