"""engine/data/mrope.py TMRoPE against transformers' Qwen2.5-Omni thinker `get_rope_index` (tiny model, CPU).

Sequences are laid out like `Qwen2_5OmniProcessor` lays them out: `<vision_bos> pads <vision_eos>`,
`<audio_bos> pads <audio_eos>`, and with audio in video `<vision_bos><audio_bos>` + the chunks
interleaved by the processor's own `get_chunked_index` + `<audio_eos><vision_eos>`.
"""

import functools

import numpy as np
import pytest
import torch

from engine.data.mrope import (
    _chunk_bounds,
    audio_feature_tokens,
    packed_tmrope_positions,
    tmrope_positions,
)

A, I, V, AS, AE, VS, VE = 180, 181, 182, 183, 184, 185, 186  # audio/image/video pads, audio/vision bos/eos
MERGE = 2


@functools.cache
def thinker(pps: int = 25, spc: int = 2):
    from transformers import (
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )
    torch.manual_seed(0)
    cfg = Qwen2_5OmniThinkerConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "vocab_size": 200,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "out_hidden_size": 32,
                       "num_heads": 2, "patch_size": 2, "spatial_merge_size": MERGE, "temporal_patch_size": 2,
                       "window_size": 4, "fullatt_block_indexes": [0]},
        audio_config={"num_mel_bins": 8, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 16,
                      "d_model": 8, "output_dim": 32, "max_source_positions": 64, "n_window": 4},
        audio_token_index=A, image_token_index=I, video_token_index=V, audio_start_token_id=AS,
        audio_end_token_id=AE, vision_start_token_id=VS, vision_end_token_id=VE,
        position_id_per_seconds=pps, seconds_per_chunk=spc)
    return Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()


# ------------------------------------------------------------------ the processor's layout

def n_tokens(grid):
    return int(np.prod(grid)) // MERGE**2


def n_audio(raw_len):
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import (
        _get_feat_extract_output_lengths,
    )
    return int(_get_feat_extract_output_lengths(torch.tensor(raw_len)))


def image(grid):
    return [VS] + [I] * n_tokens(grid) + [VE]


def video(grid):
    return [VS] + [V] * n_tokens(grid) + [VE]


def audio(raw_len):
    return [AS] + [A] * n_audio(raw_len) + [AE]


def video_with_audio(grid, raw_len, secs, pps=25, spc=2):
    """`Qwen2_5OmniProcessor.replace_video_with_audio_token` inside `<vision_bos> ... <vision_eos>`."""
    from transformers import Qwen2_5OmniProcessor
    chunked = functools.partial(Qwen2_5OmniProcessor.get_chunked_index, None)
    t, h, w = grid
    v_idx = np.broadcast_to(np.arange(t).reshape(-1, 1, 1), (t, h // MERGE, w // MERGE)).reshape(-1) * secs * pps
    per_chunk = int(pps * spc)
    vc, ac = chunked(v_idx, per_chunk), chunked(np.arange(n_audio(raw_len)), per_chunk)
    out = [VS, AS]
    for j in range(max(len(vc), len(ac))):
        if j < len(vc):
            out += [V] * (vc[j][1] - vc[j][0])
        if j < len(ac):
            out += [A] * (ac[j][1] - ac[j][0])
    return out + [AE, VE]


def hf_rope_index(model, rows, images=(), videos=(), audios=(), secs=(), use_audio_in_video=False,
                  attention_mask=None):
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask  # the no-grid branch needs it
    pos, delta = model.get_rope_index(
        ids, torch.tensor(images).reshape(-1, 3) if len(images) else None,
        torch.tensor(videos).reshape(-1, 3) if len(videos) else None, mask, use_audio_in_video,
        torch.tensor(audios) if len(audios) else None, torch.tensor(secs) if len(secs) else None)
    return pos.numpy(), delta.reshape(-1).tolist()


def kw(model, use_audio_in_video=False):
    c = model.config
    return dict(image_token_id=c.image_token_id, video_token_id=c.video_token_id, audio_token_id=c.audio_token_id,
                vision_start_token_id=c.vision_start_token_id, audio_start_token_id=c.audio_start_token_id,
                spatial_merge_size=model.spatial_merge_size, position_id_per_seconds=c.position_id_per_seconds,
                seconds_per_chunk=c.seconds_per_chunk, use_audio_in_video=use_audio_in_video)


def ours(model, ids, images=(), videos=(), audios=(), secs=(), use_audio_in_video=False):
    return tmrope_positions(torch.tensor(ids), images or None, videos or None, audios or None,
                            second_per_grid_ts=secs or None, **kw(model, use_audio_in_video))


def check(model, ids, images=(), videos=(), audios=(), secs=(), use_audio_in_video=False):
    secs = list(secs) or [1.0] * len(videos)  # transformers indexes second_per_grids for every video
    want, want_delta = hf_rope_index(model, [ids], images, videos, audios, secs, use_audio_in_video)
    pos, delta = ours(model, ids, images, videos, audios, secs, use_audio_in_video)
    assert pos.dtype == np.int64 and pos.shape == (3, len(ids))
    np.testing.assert_array_equal(pos, want[:, 0])
    assert delta == want_delta[0]
    return pos, delta


# ------------------------------------------------------------------ fixed cases

IMG, VID, VID_LONG = [1, 4, 6], [2, 6, 4], [4, 4, 4]  # 6, 12, 16 tokens

CASES = {
    "text_only": dict(ids=[5, 6, 7, 8, 9]),
    "audio_only": dict(ids=[5, 6] + audio(37) + [7], audios=[37]),
    "two_audios": dict(ids=audio(8) + [5] + audio(100) + [6, 7], audios=[8, 100]),
    "image": dict(ids=[5, 6] + image(IMG) + [7, 8], images=[IMG]),
    "image_t2": dict(ids=[5] + image([2, 4, 4]) + [6], images=[[2, 4, 4]]),  # t * position_id_per_seconds
    "video": dict(ids=[5] + video(VID_LONG) + [6], videos=[VID_LONG]),
    "video_secs": dict(ids=[5] + video(VID_LONG) + [6] + video(VID) + [7], videos=[VID_LONG, VID],
                       secs=[0.5, 2 / 3]),
    "audio_image_video": dict(ids=[5] + audio(40) + [6] + image(IMG) + video(VID) + [7] + audio(9) + [8],
                              images=[IMG], videos=[VID], audios=[40, 9], secs=[1.5]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(name):
    check(thinker(), **CASES[name])


@pytest.mark.parametrize("grid,raw,secs", [
    ([4, 4, 4], 290, 1.0),    # 72 audio tokens: chunks of 50 + 22 (ends mid-chunk); 2 video chunks
    ([3, 2, 4], 130, 1.0),    # audio (32 tokens) shorter: video's chunk is placed last
    ([6, 4, 2], 90, 3.0),     # time ids jump 75 a frame: transformers' lagging chunk split
    ([2, 2, 2], 1000, 0.5),   # long audio, 5 audio chunks vs 1 video chunk
])
def test_audio_in_video_matches_transformers(grid, raw, secs):
    ids = [5, 6] + video_with_audio(grid, raw, secs) + [7, 8]
    pos, _ = check(thinker(), ids, videos=[grid], audios=[raw], secs=[secs], use_audio_in_video=True)
    j, end = ids.index(V), len(ids) - 4  # first video token, <audio_eos>
    assert pos[:, j - 2].tolist() == pos[:, j - 1].tolist() == [2] * 3 and pos[:, j].tolist() == [3] * 3
    assert pos[:, end].tolist() == pos[:, end + 1].tolist() and pos[0, end + 2] == pos[0, end] + 1
    if grid == [4, 4, 4]:  # last chunk placed is audio (ids 3 + 50..71): the end tokens follow it, not the
        assert pos[0, end] == 3 + 72 < pos[:, j:end].max() + 1 == 3 + 75 + 1  # video's last frame (t = 75)


def test_audio_in_video_small_chunks_with_images_and_audio():
    m = thinker(4, 2)  # 8 ids a chunk
    ids = ([5] + audio(30) + video_with_audio([3, 2, 4], 61, 1.5, 4, 2) + [6] + image(IMG)
           + video_with_audio([2, 4, 2], 20, 1.0, 4, 2) + [7])
    check(m, ids, images=[IMG], videos=[[3, 2, 4], [2, 4, 2]], audios=[30, 61, 20], secs=[1.5, 1.0],
          use_audio_in_video=True)


def test_one_flag_per_video():
    """use_audio_in_video per video (a silent video next to one with its audio): each part of the
    document equals transformers on that part alone, shifted to where it starts."""
    m = thinker(4, 2)
    first = [5] + video_with_audio([4, 4, 4], 40, 1.0, 4, 2) + [6]
    second = [7] + video([2, 4, 2]) + [8] + audio(30)
    pos, delta = ours(m, first + second, videos=[[4, 4, 4], [2, 4, 2]], audios=[40, 30], secs=[1.0, 1.5],
                      use_audio_in_video=[True, False])
    want_first, _ = hf_rope_index(m, [first], videos=[[4, 4, 4]], audios=[40], secs=[1.0], use_audio_in_video=True)
    want_second, _ = hf_rope_index(m, [second], videos=[[2, 4, 2]], audios=[30], secs=[1.5])
    np.testing.assert_array_equal(pos[:, :len(first)], want_first[:, 0])
    np.testing.assert_array_equal(pos[:, len(first):], want_second[:, 0] + want_first[0, 0, -1] + 1)  # after [6]
    assert delta == int(pos.max()) + 1 - len(pos[0])
    same, _ = ours(m, first, videos=[[4, 4, 4]], audios=[40], secs=[1.0], use_audio_in_video=[True])
    np.testing.assert_array_equal(same, want_first[:, 0])
    with pytest.raises(ValueError, match="1 use_audio_in_video flags but 2 videos"):
        ours(m, first + second, videos=[[4, 4, 4], [2, 4, 2]], audios=[40, 30], secs=[1.0, 1.5],
             use_audio_in_video=[True])


def test_matches_transformers_random():
    rng = np.random.default_rng(0)
    for doc in range(20):
        pps, spc = [(25, 2), (4, 2), (3, 1)][doc % 3]
        m, av = thinker(pps, spc), doc % 2 == 1
        ids, images, videos, audios, secs = [], [], [], [], []
        for _ in range(rng.integers(1, 6)):
            ids += rng.integers(2, 100, rng.integers(0, 4)).tolist()
            grid = [int(rng.integers(1, 5)), 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))]
            r = rng.random()
            if r < 0.3:
                grid[0] = 1 if rng.random() < 0.8 else 2
                images.append(grid)
                ids += image(grid)
            elif r < 0.6:
                audios.append(int(rng.integers(3, 300)))
                ids += audio(audios[-1])
            else:
                videos.append(grid)
                secs.append(float(rng.choice([0.5, 1.0, 2 / 3, 1.5, 3.0])))
                if av:
                    audios.append(int(rng.integers(3, 300)))
                    ids += video_with_audio(grid, audios[-1], secs[-1], pps, spc)
                else:
                    ids += video(grid)
        check(m, ids + [3], images, videos, audios, secs, use_audio_in_video=av)


def test_padded_batch():
    """transformers' attention_mask, left or right padding: the real tokens' positions and deltas."""
    m = thinker(4, 2)
    docs = [([5] + audio(40) + image(IMG) + [6], [IMG], [], [40], []),
            ([7] + video_with_audio(VID, 50, 1.0, 4, 2) + [8, 9], [], [VID], [50], [1.0]),
            ([10, 11] + image([1, 2, 2]) + [12], [[1, 2, 2]], [], [], [])]
    S = max(len(d[0]) for d in docs) + 2
    for left in (True, False):
        rows = [[0] * (S - len(d[0])) + d[0] if left else d[0] + [0] * (S - len(d[0])) for d in docs]
        mask = torch.tensor([[int(t != 0) for t in r] for r in rows])
        cat = lambda i: [x for d in docs for x in d[i]]
        want, want_delta = hf_rope_index(m, rows, cat(1), cat(2), cat(3), cat(4), True, mask)
        for r, (ids, imgs, vids, auds, secs) in enumerate(docs):
            real = mask[r].bool().numpy()
            pos, delta = ours(m, ids, imgs, vids, auds, secs, use_audio_in_video=True)
            np.testing.assert_array_equal(pos, want[:, r][:, real])
            assert delta == want_delta[r]
            assert (want[:, r][:, ~real] == 1).all()  # transformers pads with 1; ours pads with 0 (below)
            if not left:
                packed, deltas = packed_tmrope_positions(rows[r], [len(ids)], imgs or None, vids or None,
                                                         auds or None, second_per_grid_ts=secs or None,
                                                         **kw(m, True))
                np.testing.assert_array_equal(packed, np.pad(pos, ((0, 0), (0, S - len(ids)))))
                assert deltas == [delta]


# ------------------------------------------------------------------ packed rows

@pytest.mark.parametrize("av", [False, True])
def test_packed_row_equals_documents_alone(av):
    m = thinker(4, 2)
    vid = (lambda g, a, s: video_with_audio(g, a, s, 4, 2)) if av else (lambda g, a, s: video(g))
    docs = [([5] + audio(40) + image(IMG) + vid(VID_LONG, 70, 0.5) + [6], [IMG], [VID_LONG], [40, 70], [0.5]),
            ([7, 8] + vid(VID, 30, 1.5) + image([1, 2, 4]) + [9], [[1, 2, 4]], [VID], [30], [1.5]),
            ([10, 11, 12], [], [], [], []),
            (audio(12) + [13], [], [], [12], [])]
    if not av:  # the videos' audios are not in the row
        docs = [(d[0], d[1], d[2], [a for a in d[3] if a not in (70, 30)], d[4]) for d in docs]
    row = [x for d in docs for x in d[0]] + [0] * 5
    cat = lambda i: [x for d in docs for x in d[i]]
    pos, deltas = packed_tmrope_positions(torch.tensor(row), [len(d[0]) for d in docs], cat(1), cat(2), cat(3),
                                          second_per_grid_ts=cat(4), **kw(m, av))
    alone = [ours(m, *d, use_audio_in_video=av) for d in docs]
    np.testing.assert_array_equal(pos, np.concatenate([p for p, _ in alone] + [np.zeros((3, 5), np.int64)], 1))
    assert deltas == [e for _, e in alone]
    for d, (p, e) in zip(docs, alone):  # and each equals transformers
        want, want_delta = hf_rope_index(m, [d[0]], d[1], d[2], d[3], d[4] or [1.0] * len(d[2]), av)
        np.testing.assert_array_equal(p, want[:, 0])
        assert e == want_delta[0]


# ------------------------------------------------------------------ helpers and errors

def test_audio_feature_tokens_and_chunking_match_transformers():
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
        Qwen2_5OmniPreTrainedModelForConditionalGeneration as P,
    )
    raw = torch.arange(0, 3001)
    np.testing.assert_array_equal(audio_feature_tokens(raw), thinker().model.audio_tower
                                  ._get_feat_extract_output_lengths(raw)[1].numpy())
    rng = np.random.default_rng(1)
    for _ in range(200):
        frame = int(rng.integers(1, 5))
        vals = np.repeat((np.arange(rng.integers(0, 12)) * rng.uniform(0, 40)).astype(np.int64), frame)
        per_chunk = int(rng.integers(1, 30))
        assert _chunk_bounds(vals, per_chunk) == P.get_chunked_index(None, torch.tensor(vals), per_chunk, 0)


def test_errors_name_counts():
    m = thinker(4, 2)
    k = kw(m)
    with pytest.raises(ValueError, match=r"^7 image placeholder tokens \(id 181\) but image_grid_thw "
                                         r"\[\[1, 4, 6\]\] needs 6"):
        tmrope_positions([5] + [I] * 7, [IMG], **k)
    with pytest.raises(ValueError, match=r"^0 video placeholder tokens \(id 182\) .* needs 12"):
        tmrope_positions([5, 6], None, [VID], **k)
    with pytest.raises(ValueError, match=r"^9 audio placeholder tokens \(id 180\) but audio_lengths \[40\] give 10"):
        tmrope_positions([AS] + [A] * 9 + [AE], audio_lengths=[40], **k)
    with pytest.raises(ValueError, match="audio 1: feature length 2 gives 0 tokens"):
        tmrope_positions([5], audio_lengths=[40, 2], **k)
    with pytest.raises(ValueError, match="audio 0 needs 10 consecutive placeholder tokens from index 1, found 4"):
        tmrope_positions([AS] + [A] * 4 + [AE, AS] + [A] * 6 + [AE], audio_lengths=[40], **k)
    with pytest.raises(ValueError, match="1 second_per_grid_ts values but 2 videos in video_grid_thw"):
        tmrope_positions(video(VID) + video(VID), None, [VID, VID], second_per_grid_ts=[1.0], **k)
    av = kw(m, True)
    with pytest.raises(ValueError, match="use_audio_in_video: 1 videos need an audio each, but only 0"):
        tmrope_positions(video(VID), None, [VID], **av)
    with pytest.raises(ValueError, match=r"video 0 at index 1 must follow <vision_start> <audio_start>"):
        tmrope_positions([VS] + [V] * 12 + [A] * 10 + [VE], None, [VID], [40], **av)
    good = video_with_audio(VID_LONG, 40, 1.0, 4, 2)  # chunks: video 8, audio 8, video 8, audio 2
    assert good == [VS, AS] + [V] * 8 + [A] * 8 + [V] * 8 + [A] * 2 + [AE, VE]
    tmrope_positions(good, None, [VID_LONG], [40], **av)
    with pytest.raises(ValueError, match=r"video 0 \[4, 4, 4\] \(16 tokens\) with audio 0 \(10 tokens\) must be "
                                         r"video/audio chunks of \[8, 8\] / \[8, 2\] tokens alternating from index 2"):
        tmrope_positions(good[:2] + [V] * 16 + [A] * 10 + good[-2:], None, [VID_LONG], [40], **av)
    with pytest.raises(ValueError, match="then two end tokens"):
        tmrope_positions(good[:-1], None, [VID_LONG], [40], **av)
    pk = dict(image_token_id=I, video_token_id=V, audio_token_id=A, vision_start_token_id=VS,
              audio_start_token_id=AS, spatial_merge_size=MERGE)
    with pytest.raises(ValueError, match=r"document 1: 8 image placeholder tokens do not match the next image "
                                         r"grids \[\[1, 4, 4\], \[1, 8, 4\]\] \(cumulative tokens \[4, 12\]\)"):
        packed_tmrope_positions([I] * 6 + [I] * 8, [6, 8], [IMG, [1, 4, 4], [1, 8, 4]], **pk)
    with pytest.raises(ValueError, match="document 0: 10 audio placeholder tokens do not match the next "
                                         r"audio_lengths \[37, 40\]"):
        packed_tmrope_positions([A] * 10, [10], None, None, [37, 40], **pk)
    with pytest.raises(ValueError, match="2 audio_lengths given but the documents' placeholders use 1"):
        packed_tmrope_positions([A] * 10 + [5], [11], None, None, [40, 40], **pk)
    with pytest.raises(ValueError, match=r"doc_lens \[3\] \(sum 3\) do not fit a row of 2 tokens"):
        packed_tmrope_positions([5, 6], [3], **pk)
