"""Qwen2-VL multimodal rotary positions (M-RoPE), computed in the data layer (numpy, no model).

Every token gets three position ids (temporal, height, width):

- text: the same id on all three axes, counting up by one from where the previous span ended;
- an image/video (a run of placeholder ids, t*h*w / merge**2 tokens for a grid (t, h, w)):
  ``start + (t_index, h_index, w_index)`` over the merged grid (h and w divided by
  ``spatial_merge_size``), where ``start`` is the position the next text token would have had.

``delta = max(position) + 1 - len`` is what transformers returns as ``mrope_position_deltas``:
generation continues a prompt at ``len + delta``.

Matches ``Qwen2VLModel.get_rope_index`` of transformers 5.x (checked in tests/test_mrope.py),
which takes the media spans from ``mm_token_type_ids`` (0 text, 1 image, 2 video; the
processor marks exactly the placeholder ids) and skips padding via ``attention_mask``.
Differences, both deliberate: adjacent placeholder runs are split by the grid sizes
(transformers would take a whole run for one grid), and packed rows restart per document.

Where text resumes after a media span (``media_advance``):

- ``"hw"`` (default, transformers 5.x): ``start + max(h, w) / merge``;
- ``"max"`` (the Qwen reference code and transformers 4.x): the span's max position + 1.

They differ only when a video's temporal extent exceeds ``max(h, w) / merge``.

Qwen2.5-VL hook: pass ``tokens_per_second`` (its ``vision_config.tokens_per_second``) and
optionally ``second_per_grid_ts`` (one per video, default 1.0); video temporal ids then step
by ``tokens_per_second * second_per_grid_t`` (truncated to int, float32 like transformers).
Qwen2-VL (``tokens_per_second=None``) steps by 1. Images always step by 1.

Qwen2.5-Omni time-aligned M-RoPE (TMRoPE): ``tmrope_positions`` (one document) and
``packed_tmrope_positions`` (a packed row), equal to
``Qwen2_5OmniThinkerForConditionalGeneration.get_rope_index`` of transformers 5.x on the
processor's layout (checked in tests/test_tmrope.py). Token ids and time scales are the
thinker config's: ``audio_token_id`` (``audio_token_index``), ``image_token_id``,
``video_token_id``, ``vision_start_token_id``, ``audio_start_token_id``,
``position_id_per_seconds``, ``seconds_per_chunk``, and ``vision_config.spatial_merge_size``.

- text: one id on all three axes, counting up by one;
- audio (a run of ``audio_token_id``): consecutive ids, like text. ``audio_lengths`` are the RAW
  feature lengths (mel frames, ``feature_attention_mask.sum(-1)``, what transformers takes as
  ``audio_seqlens`` / ``audio_feature_lengths``); each becomes
  ``audio_feature_tokens(L) = ((L - 1) // 2 + 1 - 2) // 2 + 1`` placeholder tokens;
- an image: ``start + (t * position_id_per_seconds, h, w)`` over the merged grid (t is 0 for
  the processor's single-frame images), text resuming at the image's max id + 1;
- a video: the same with temporal ids ``int(t * second_per_grid_t * position_id_per_seconds)``
  (float32, like transformers; ``second_per_grid_ts`` one per video, default 1.0 each);
- ``use_audio_in_video=True``: every video is ``<vision_start><audio_start>``, then its frames and
  the NEXT audio (in order of appearance) interleaved chunk by chunk (video chunk j, then audio
  chunk j; a chunk holds the tokens whose time id falls in the next
  ``int(position_id_per_seconds * seconds_per_chunk)`` ids, split exactly like transformers'
  ``get_chunked_index``), then two end tokens. Both start tokens share one id p; the video and
  the audio both start at p + 1 (time-aligned); both end tokens get the max id of the LAST chunk
  placed + 1 (transformers' rule, not the span's max), and text resumes one after that.
  ``use_audio_in_video`` may also be one flag per video (in order of appearance): a False video is
  laid out alone (its file had no audio track). Transformers' thinker takes one flag for all the
  videos of a batch, so a mix has no transformers counterpart; each video alone equals it.

``delta = max(position) + 1 - len`` as for M-RoPE. Differences from transformers, deliberate:
spans come from the placeholder ids (transformers assumes exactly one start/end token around each
item and never checks), adjacent items of one kind are split by their sizes, a ValueError names
the counts when placeholders and grids / audio lengths / the interleaving disagree (also for an
audio of 0 tokens, where transformers crashes), padding gets 0 (transformers: 1), and packed
rows restart per document.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_ADVANCES = ("hw", "max")


def _ids(x) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
    if a.ndim != 1:
        raise ValueError(f"input_ids must be 1-D (one document), got shape {tuple(a.shape)}")
    return a.astype(np.int64, copy=False)


def _grids(g, name: str, merge: int) -> np.ndarray:
    if g is None:
        return np.zeros((0, 3), dtype=np.int64)
    a = np.asarray(g.detach().cpu() if hasattr(g, "detach") else g, dtype=np.int64).reshape(-1, 3)
    if (a <= 0).any() or (a[:, 1:] % merge).any():
        raise ValueError(f"{name} {a.tolist()}: sizes must be positive and h, w divisible by "
                         f"spatial_merge_size={merge}")
    return a


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each contiguous run of True."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _split_runs(ids, token_id, grids, steps, merge, kind) -> list[tuple[int, int, np.ndarray, float]]:
    """(start, end, grid, t_step) per media item of one kind, in order of appearance."""
    sizes = grids.prod(axis=1) // merge**2
    found = int((ids == token_id).sum())
    if found != int(sizes.sum()):
        raise ValueError(f"{found} {kind} placeholder tokens (id {token_id}) but {kind}_grid_thw "
                         f"{grids.tolist()} needs {int(sizes.sum())} (t*h*w/{merge}^2 each)")
    items, k = [], 0
    for start, end in _runs(ids == token_id):
        at = start
        while at < end:
            if at + sizes[k] > end:
                raise ValueError(f"{kind} placeholder run [{start}, {end}) does not split into whole "
                                 f"{kind}s: {kind} {k} {grids[k].tolist()} needs {int(sizes[k])} "
                                 f"tokens, {end - at} left in the run")
            items.append((at, at + int(sizes[k]), grids[k], steps[k]))
            at += int(sizes[k])
            k += 1
    return items


def _video_steps(n_videos, second_per_grid_ts, tokens_per_second) -> list[float]:
    if tokens_per_second is None:  # Qwen2-VL: temporal index steps by 1
        if second_per_grid_ts is not None:
            raise ValueError("second_per_grid_ts needs tokens_per_second (Qwen2.5-VL)")
        return [1.0] * n_videos
    secs = np.ones(n_videos) if second_per_grid_ts is None else np.asarray(
        second_per_grid_ts.detach().cpu() if hasattr(second_per_grid_ts, "detach") else second_per_grid_ts,
        dtype=np.float64).reshape(-1)
    if len(secs) != n_videos:
        raise ValueError(f"{len(secs)} second_per_grid_ts values but video_grid_thw has {n_videos} videos")
    return [float(tokens_per_second) * float(s) for s in secs]


def mrope_positions(input_ids, image_grid_thw=None, video_grid_thw=None, image_token_id: int = -1,
                    video_token_id: int = -1, spatial_merge_size: int = 2, second_per_grid_ts=None,
                    tokens_per_second: float | None = None, *,
                    media_advance: str = "hw") -> tuple[np.ndarray, int]:
    """M-RoPE positions of ONE document: ``(positions int64 [3, len], delta)``.

    ``image_grid_thw`` / ``video_grid_thw``: ``[n, 3]`` (t, h, w) patch grids, in order of
    appearance, as the Qwen2-VL image/video processor returns them. Raises ValueError when the
    placeholder tokens do not match the grids.
    """
    if media_advance not in _ADVANCES:
        raise ValueError(f"media_advance must be one of {_ADVANCES}, got {media_advance!r}")
    ids, merge = _ids(input_ids), int(spatial_merge_size)
    images = _grids(image_grid_thw, "image_grid_thw", merge)
    videos = _grids(video_grid_thw, "video_grid_thw", merge)
    steps = _video_steps(len(videos), second_per_grid_ts, tokens_per_second)
    media = sorted(_split_runs(ids, image_token_id, images, [1.0] * len(images), merge, "image")
                   + _split_runs(ids, video_token_id, videos, steps, merge, "video"), key=lambda m: m[0])

    pos = np.zeros((3, len(ids)), dtype=np.int64)
    cur, at = 0, 0  # next text position, next token index
    for start, end, (t, h, w), step in media + [(len(ids), len(ids), (0, 0, 0), 1.0)]:
        pos[:, at:start] = cur + np.arange(start - at)  # text before this item
        cur += start - at
        if start == end:
            continue
        gh, gw = int(h) // merge, int(w) // merge
        k = np.arange(end - start)
        t_ids = (np.arange(int(t), dtype=np.float32) * np.float32(step)).astype(np.int64)
        pos[0, start:end] = cur + t_ids[k // (gh * gw)]
        pos[1, start:end] = cur + (k // gw) % gh
        pos[2, start:end] = cur + k % gw
        cur = int(pos[:, start:end].max()) + 1 if media_advance == "max" else cur + max(gh, gw)
        at = end
    delta = int(pos.max()) + 1 - len(ids) if len(ids) else 0
    return pos, delta


def packed_mrope_positions(input_ids, doc_lens: Sequence[int], image_grid_thw=None, video_grid_thw=None,
                           image_token_id: int = -1, video_token_id: int = -1, spatial_merge_size: int = 2,
                           second_per_grid_ts=None, tokens_per_second: float | None = None, *,
                           media_advance: str = "hw") -> tuple[np.ndarray, list[int]]:
    """M-RoPE positions of a packed row: ``(positions int64 [3, S], delta per document)``.

    The row holds documents back to back (``doc_lens`` tokens each, from index 0); tokens after
    ``sum(doc_lens)`` are padding and get position 0. Grids (and ``second_per_grid_ts``) are the
    row's, in order of appearance: each document takes the next grids its placeholders need, and
    its positions restart at 0 exactly as if it were computed alone.
    """
    ids, merge = _ids(input_ids), int(spatial_merge_size)
    lens = [int(n) for n in doc_lens]
    if any(n < 0 for n in lens) or sum(lens) > len(ids):
        raise ValueError(f"doc_lens {lens} (sum {sum(lens)}) do not fit a row of {len(ids)} tokens")
    grids = {"image": _grids(image_grid_thw, "image_grid_thw", merge),
             "video": _grids(video_grid_thw, "video_grid_thw", merge)}
    token = {"image": image_token_id, "video": video_token_id}
    secs = None if second_per_grid_ts is None else np.asarray(
        second_per_grid_ts.detach().cpu() if hasattr(second_per_grid_ts, "detach") else second_per_grid_ts,
        dtype=np.float64).reshape(-1)
    if secs is not None and len(secs) != len(grids["video"]):
        raise ValueError(f"{len(secs)} second_per_grid_ts values but video_grid_thw has {len(grids['video'])} videos")
    taken = {"image": 0, "video": 0}
    pos, deltas, at = np.zeros((3, len(ids)), dtype=np.int64), [], 0
    for d, n in enumerate(lens):
        doc = ids[at:at + n]
        mine = {}
        for kind, g in grids.items():
            need = int((doc == token[kind]).sum())
            cum = np.cumsum(g[taken[kind]:].prod(axis=1) // merge**2)
            k = 0 if need == 0 else int(np.searchsorted(cum, need)) + 1
            if need and (k > len(cum) or cum[k - 1] != need):
                raise ValueError(f"document {d}: {need} {kind} placeholder tokens do not match the next "
                                 f"{kind} grids {g[taken[kind]:].tolist()} (cumulative tokens {cum.tolist()})")
            mine[kind] = g[taken[kind]:taken[kind] + k]
            taken[kind] += k
        doc_secs = None if secs is None else secs[taken["video"] - len(mine["video"]):taken["video"]]
        pos[:, at:at + n], delta = mrope_positions(
            doc, mine["image"], mine["video"], image_token_id, video_token_id, merge, doc_secs,
            tokens_per_second, media_advance=media_advance)
        deltas.append(delta)
        at += n
    for kind, g in grids.items():
        if taken[kind] != len(g):
            raise ValueError(f"{len(g)} {kind} grids given but the documents' placeholders use {taken[kind]}")
    return pos, deltas


# ---------------------------------------------------------------- Qwen2.5-Omni TMRoPE


def audio_feature_tokens(feature_lengths) -> np.ndarray:
    """Audio placeholder tokens per audio from its raw feature length (mel frames): the
    Qwen2.5-Omni audio encoder's output length (conv stride 2, then pooling stride 2)."""
    a = np.asarray(feature_lengths.detach().cpu() if hasattr(feature_lengths, "detach") else feature_lengths,
                   dtype=np.int64).reshape(-1)
    if (a < 0).any():
        raise ValueError(f"audio feature lengths must be >= 0, got {a.tolist()}")
    return ((a - 1) // 2 + 1 - 2) // 2 + 1


def _chunk_bounds(values: np.ndarray, per_chunk: int) -> list[tuple[int, int]]:
    """transformers' ``get_chunked_index`` on non-decreasing ``values`` (time ids from 0), by runs
    of equal values: at most one chunk closes per token, so a jump of several chunks lags one
    token per extra chunk (reproduced, not fixed)."""
    n = len(values)
    if n == 0:
        return [(0, 0)]
    change = np.flatnonzero(np.diff(values)) + 1
    starts, ends = np.concatenate(([0], change)), np.concatenate((change, [n]))
    out, begin, chunk = [], 0, 1
    for a, b in zip(starts.tolist(), ends.tolist()):
        v = int(values[a])
        if v >= chunk * per_chunk:
            closes = min(b - a, v // per_chunk - chunk + 1)
            for i in range(a, a + closes):
                out.append((begin, i))
                begin = i
            chunk += closes
    out.append((begin, n))
    return out


def chunked_index(values, tokens_per_chunk: int) -> list[tuple[int, int]]:
    """``Qwen2_5OmniProcessor.get_chunked_index``: [start, end) slices of non-decreasing time ids
    ``values`` (ints or floats from 0), a chunk closing at each multiple of ``tokens_per_chunk``."""
    return _chunk_bounds(np.asarray(values), int(tokens_per_chunk))


def _vision(start: int, t_ids: np.ndarray, gh: int, gw: int) -> np.ndarray:
    k = np.arange(len(t_ids) * gh * gw)
    return start + np.stack([t_ids[k // (gh * gw)], (k // gw) % gh, k % gw])


def _image_t(t: int, pps) -> np.ndarray:
    if isinstance(pps, (int, np.integer)):  # torch: int64 arange * int stays int64
        return np.arange(t, dtype=np.int64) * int(pps)
    return (np.arange(t, dtype=np.float32) * np.float32(pps)).astype(np.int64)


def _video_t(t: int, secs: float, pps) -> np.ndarray:
    return (np.arange(t, dtype=np.float32) * np.float32(secs) * np.float32(pps)).astype(np.int64)


def _floats(x, n: int, name: str, what: str) -> np.ndarray:
    if x is None:
        return np.ones(n, dtype=np.float64)
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64).reshape(-1)
    if len(a) != n:
        raise ValueError(f"{len(a)} {name} values but {n} {what}")
    return a


def _flags(use_audio_in_video, n_videos: int) -> list[bool]:
    """One use_audio_in_video flag per video from one flag or a sequence of them."""
    if isinstance(use_audio_in_video, (bool, np.bool_, int)):
        return [bool(use_audio_in_video)] * n_videos
    flags = [bool(f) for f in use_audio_in_video]
    if len(flags) != n_videos:
        raise ValueError(f"{len(flags)} use_audio_in_video flags but {n_videos} videos in video_grid_thw")
    return flags


def _audio_tokens(audio_lengths) -> tuple[np.ndarray, np.ndarray]:
    if audio_lengths is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    raw = np.asarray(audio_lengths.detach().cpu() if hasattr(audio_lengths, "detach") else audio_lengths,
                     dtype=np.int64).reshape(-1)
    toks = audio_feature_tokens(raw)
    if (toks <= 0).any():
        k = int(np.flatnonzero(toks <= 0)[0])
        raise ValueError(f"audio {k}: feature length {int(raw[k])} gives {int(toks[k])} tokens; an audio "
                         f"needs >= 1 token (feature length >= 3)")
    return raw, toks


def tmrope_positions(input_ids, image_grid_thw=None, video_grid_thw=None, audio_lengths=None, *,
                     image_token_id: int, video_token_id: int, audio_token_id: int,
                     vision_start_token_id: int, audio_start_token_id: int, spatial_merge_size: int = 2,
                     position_id_per_seconds: float = 25, seconds_per_chunk: float = 2,
                     second_per_grid_ts=None, use_audio_in_video: bool | Sequence[bool] = False
                     ) -> tuple[np.ndarray, int]:
    """Qwen2.5-Omni TMRoPE positions of ONE document: ``(positions int64 [3, len], delta)``.

    ``image_grid_thw`` / ``video_grid_thw``: ``[n, 3]`` patch grids in order of appearance;
    ``audio_lengths``: RAW feature lengths (``feature_attention_mask.sum(-1)``), one per audio in
    order of appearance, a video's own audio included when ``use_audio_in_video``;
    ``second_per_grid_ts``: the processor's ``video_second_per_grid`` (default 1.0 per video);
    ``use_audio_in_video``: one flag for all videos, or one per video.
    Raises ValueError naming the counts when placeholders and grids / lengths disagree.
    """
    ids, merge = _ids(input_ids), int(spatial_merge_size)
    images = _grids(image_grid_thw, "image_grid_thw", merge)
    videos = _grids(video_grid_thw, "video_grid_thw", merge)
    secs = _floats(second_per_grid_ts, len(videos), "second_per_grid_ts", "videos in video_grid_thw")
    raw, audio_toks = _audio_tokens(audio_lengths)
    pps = position_id_per_seconds
    per_chunk = int(pps * seconds_per_chunk)
    in_video = _flags(use_audio_in_video, len(videos))
    if any(in_video) and per_chunk < 1:
        raise ValueError(f"int(position_id_per_seconds * seconds_per_chunk) = {per_chunk} must be >= 1")
    token = {"image": image_token_id, "video": video_token_id, "audio": audio_token_id}
    sizes = {"image": images.prod(axis=1) // merge**2, "video": videos.prod(axis=1) // merge**2,
             "audio": audio_toks}
    given = {"image": f"image_grid_thw {images.tolist()} needs", "video": f"video_grid_thw {videos.tolist()} needs",
             "audio": f"audio_lengths {raw.tolist()} give"}
    for kind, tok in token.items():
        found = int((ids == tok).sum())
        if found != int(sizes[kind].sum()):
            raise ValueError(f"{found} {kind} placeholder tokens (id {tok}) but {given[kind]} "
                             f"{int(sizes[kind].sum())} (tokens each: {sizes[kind].tolist()})")
    if sum(in_video) > len(audio_toks):
        raise ValueError(f"use_audio_in_video: {sum(in_video)} videos need an audio each, but only "
                         f"{len(audio_toks)} audio_lengths given")

    n = len(ids)
    pos = np.zeros((3, n), dtype=np.int64)
    media = np.flatnonzero((ids == image_token_id) | (ids == video_token_id) | (ids == audio_token_id))
    taken = {"image": 0, "video": 0, "audio": 0}
    cur, i = 0, 0  # next text position, next token index

    def take(kind: str, j: int) -> tuple[int, int]:
        k = taken[kind]
        if k >= len(sizes[kind]):  # unreachable when the totals match; kept as a guard
            raise ValueError(f"{kind} placeholder at index {j} but all {len(sizes[kind])} {kind}s are used")
        taken[kind] += 1
        return k, int(sizes[kind][k])

    def need_run(kind: str, k: int, j: int, m: int) -> None:
        run = ids[j:j + m] == token[kind]
        if len(run) < m or not run.all():
            got = int(np.argmin(run)) if not run.all() else len(run)
            raise ValueError(f"{kind} {k} needs {m} consecutive placeholder tokens from index {j}, found {got}")

    while True:
        p = int(np.searchsorted(media, i))
        j = int(media[p]) if p < len(media) else n
        pos[:, i:j] = cur + np.arange(j - i)  # text (and start / end tokens)
        cur += j - i
        if j == n:
            break
        tok = int(ids[j])
        if tok == audio_token_id:
            k, m = take("audio", j)
            need_run("audio", k, j, m)
            pos[:, j:j + m] = cur + np.arange(m)
            cur, i = cur + m, j + m
            continue
        kind = "image" if tok == image_token_id else "video"
        k, m = take(kind, j)
        t, h, w = (int(x) for x in (images if kind == "image" else videos)[k])
        gh, gw = h // merge, w // merge
        t_ids = _image_t(t, pps) if kind == "image" else _video_t(t, secs[k], pps)
        if kind == "image" or not in_video[k]:
            need_run(kind, k, j, m)
            pos[:, j:j + m] = _vision(cur, t_ids, gh, gw)
            cur, i = int(pos[:, j:j + m].max()) + 1, j + m
            continue
        # video with its audio, interleaved chunk by chunk
        if j - 2 < i or ids[j - 2] != vision_start_token_id or ids[j - 1] != audio_start_token_id:
            raise ValueError(f"use_audio_in_video: video {k} at index {j} must follow <vision_start> "
                             f"<audio_start> (ids {vision_start_token_id}, {audio_start_token_id}), found "
                             f"{ids[max(j - 2, 0):j].tolist()}")
        a, na = take("audio", j)
        start = int(pos[0, j - 2]) + 1
        pos[:, j - 1] = start - 1  # both start tokens share one id
        video = _vision(start, t_ids, gh, gw)
        audio = start + np.broadcast_to(np.arange(na), (3, na))
        pieces, want = [], []
        vc = _chunk_bounds(np.repeat(t_ids, gh * gw), per_chunk)
        ac = _chunk_bounds(np.arange(na), per_chunk)
        for c in range(max(len(vc), len(ac))):
            for chunks, src, tid in ((vc, video, video_token_id), (ac, audio, audio_token_id)):
                if c < len(chunks):
                    pieces.append(src[:, chunks[c][0]:chunks[c][1]])
                    want.append(np.full(chunks[c][1] - chunks[c][0], tid))
        want = np.concatenate(want)
        end = j + len(want)
        if end + 2 > n or not np.array_equal(ids[j:end], want) or np.isin(
                ids[end:end + 2], list(token.values())).any():
            raise ValueError(
                f"use_audio_in_video: video {k} {[t, h, w]} ({m} tokens) with audio {a} ({na} tokens) "
                f"must be video/audio chunks of {[b - s for s, b in vc]} / {[b - s for s, b in ac]} tokens "
                f"alternating from index {j}, then two end tokens; the document's tokens there differ")
        pos[:, j:end] = np.concatenate(pieces, axis=1)
        pos[:, end:end + 2] = int(pieces[-1].max()) + 1  # transformers: the last chunk's max, not the span's
        cur, i = int(pieces[-1].max()) + 2, end + 2
    delta = int(pos.max()) + 1 - n if n else 0
    return pos, delta


def _take_next(sizes: np.ndarray, taken: int, need: int, d: int, kind: str, what: str) -> int:
    """How many of the items from ``taken`` on hold exactly ``need`` placeholder tokens."""
    if need == 0:
        return 0
    cum = np.cumsum(sizes[taken:])
    k = int(np.searchsorted(cum, need)) + 1
    if k > len(cum) or cum[k - 1] != need:
        raise ValueError(f"document {d}: {need} {kind} placeholder tokens do not match the next {what} "
                         f"(cumulative tokens {cum.tolist()})")
    return k


def packed_tmrope_positions(input_ids, doc_lens: Sequence[int], image_grid_thw=None, video_grid_thw=None,
                            audio_lengths=None, *, image_token_id: int, video_token_id: int,
                            audio_token_id: int, vision_start_token_id: int, audio_start_token_id: int,
                            spatial_merge_size: int = 2, position_id_per_seconds: float = 25,
                            seconds_per_chunk: float = 2, second_per_grid_ts=None,
                            use_audio_in_video: bool = False) -> tuple[np.ndarray, list[int]]:
    """TMRoPE positions of a packed row: ``(positions int64 [3, S], delta per document)``.

    Documents lie back to back from index 0 (``doc_lens`` tokens each); tokens after
    ``sum(doc_lens)`` are padding and get 0. Grids, ``second_per_grid_ts`` and ``audio_lengths``
    are the row's, in order of appearance: each document takes the next ones its placeholders
    need and gets exactly the positions ``tmrope_positions`` gives it alone.
    """
    ids, merge = _ids(input_ids), int(spatial_merge_size)
    lens = [int(n) for n in doc_lens]
    if any(n < 0 for n in lens) or sum(lens) > len(ids):
        raise ValueError(f"doc_lens {lens} (sum {sum(lens)}) do not fit a row of {len(ids)} tokens")
    grids = {"image": _grids(image_grid_thw, "image_grid_thw", merge),
             "video": _grids(video_grid_thw, "video_grid_thw", merge)}
    secs = _floats(second_per_grid_ts, len(grids["video"]), "second_per_grid_ts", "videos in video_grid_thw")
    raw, audio_toks = _audio_tokens(audio_lengths)
    items = {"image": grids["image"], "video": grids["video"], "audio": raw}
    sizes = {"image": grids["image"].prod(axis=1) // merge**2, "video": grids["video"].prod(axis=1) // merge**2,
             "audio": audio_toks}
    token = {"image": image_token_id, "video": video_token_id, "audio": audio_token_id}
    what = {"image": "image grids", "video": "video grids", "audio": "audio_lengths"}
    kw = {"image_token_id": image_token_id, "video_token_id": video_token_id, "audio_token_id": audio_token_id,
          "vision_start_token_id": vision_start_token_id, "audio_start_token_id": audio_start_token_id,
          "spatial_merge_size": merge, "position_id_per_seconds": position_id_per_seconds,
          "seconds_per_chunk": seconds_per_chunk, "use_audio_in_video": use_audio_in_video}
    taken = {"image": 0, "video": 0, "audio": 0}
    pos, deltas, at = np.zeros((3, len(ids)), dtype=np.int64), [], 0
    for d, n in enumerate(lens):
        doc = ids[at:at + n]
        mine = {}
        for kind, tok in token.items():
            k = _take_next(sizes[kind], taken[kind], int((doc == tok).sum()), d, kind,
                           f"{what[kind]} {items[kind][taken[kind]:].tolist()}")
            mine[kind] = (taken[kind], taken[kind] + k)
            taken[kind] += k
        (i0, i1), (v0, v1), (a0, a1) = mine["image"], mine["video"], mine["audio"]
        pos[:, at:at + n], delta = tmrope_positions(
            doc, grids["image"][i0:i1], grids["video"][v0:v1], raw[a0:a1],
            second_per_grid_ts=secs[v0:v1], **kw)
        deltas.append(delta)
        at += n
    for kind in token:
        if taken[kind] != len(items[kind]):
            raise ValueError(f"{len(items[kind])} {what[kind]} given but the documents' placeholders use "
                             f"{taken[kind]}")
    return pos, deltas
