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
