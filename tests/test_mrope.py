"""engine/data/mrope.py against transformers' Qwen2-VL / Qwen2.5-VL `get_rope_index` (tiny models, CPU)."""

import numpy as np
import pytest
import torch

from engine.data.mrope import mrope_positions, packed_mrope_positions

I, V, VS, VE = 190, 191, 192, 193  # image, video, <|vision_start|>, <|vision_end|>
MERGE = 2
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 200, "bos_token_id": 0, "eos_token_id": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}
IDS = {"image_token_id": I, "video_token_id": V, "vision_start_token_id": VS, "vision_end_token_id": VE}


@pytest.fixture(scope="module")
def qwen2vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(text_config=TEXT, vision_config={
        "depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "patch_size": 2,
        "spatial_merge_size": MERGE, "temporal_patch_size": 2, "mlp_ratio": 2}, **IDS)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def n_tokens(grid):
    return int(np.prod(grid)) // MERGE**2


def media(tok, grid):
    """How the Qwen2-VL processor writes one image/video: <|vision_start|> pads <|vision_end|>."""
    return [VS] + [tok] * n_tokens(grid) + [VE]


def hf_rope_index(model, rows, images=(), videos=(), attention_mask=None, **kw):
    """`model.model.get_rope_index` (or a bare `*VLModel`'s) on a batch of rows."""
    ids = torch.tensor(rows)
    mm_types = (ids == I).int() + 2 * (ids == V).int()  # what the processor returns as mm_token_type_ids
    pos, delta = getattr(model, "model", model).get_rope_index(
        ids, mm_types, torch.tensor(images).reshape(-1, 3) if len(images) else None,
        torch.tensor(videos).reshape(-1, 3) if len(videos) else None, attention_mask=attention_mask, **kw)
    return pos.numpy(), delta.reshape(-1).tolist()


def ours(ids, images=(), videos=(), **kw):
    return mrope_positions(ids, images or None, videos or None, I, V, MERGE, **kw)


def check(model, ids, images=(), videos=()):
    want, want_delta = hf_rope_index(model, [ids], images, videos)
    pos, delta = ours(torch.tensor(ids), images, videos)
    assert pos.dtype == np.int64 and pos.shape == (3, len(ids))
    np.testing.assert_array_equal(pos, want[:, 0])
    assert delta == want_delta[0]


IMG_A, IMG_B = [1, 4, 6], [1, 8, 4]   # 6 and 8 tokens
VID_A, VID_LONG = [2, 6, 4], [4, 4, 4]  # t=2 (<= max(h, w)/merge) and t=4 (> 2)

CASES = {
    "text_only": ([5, 6, 7, 8, 9], [], []),
    "one_image": ([5, 6] + media(I, IMG_A) + [7, 8], [IMG_A], []),
    "two_images_sizes": ([5] + media(I, IMG_A) + [6, 7] + media(I, IMG_B) + [8], [IMG_A, IMG_B], []),
    "video": ([5, 6] + media(V, VID_A) + [7], [], [VID_A]),
    "video_t_gt_hw": ([5] + media(V, VID_LONG) + [6, 7, 8], [], [VID_LONG]),
    "video_then_image": ([5] + media(V, VID_A) + [6] + media(I, IMG_B) + [7, 8], [IMG_B], [VID_A]),
    "image_video_image": (media(I, IMG_A) + [5] + media(V, VID_A) + media(I, IMG_B), [IMG_A, IMG_B], [VID_A]),
    "bare_pads_at_ends": ([I] * 6 + [5, 6] + [V] * 12, [IMG_A], [VID_A]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_transformers(qwen2vl, name):
    check(qwen2vl, *CASES[name])


def test_matches_transformers_random(qwen2vl):
    rng = np.random.default_rng(0)
    for _ in range(25):
        ids, images, videos = [], [], []
        for _ in range(rng.integers(1, 5)):
            ids += rng.integers(2, 100, rng.integers(0, 4)).tolist()
            grid = [int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4)), 2 * int(rng.integers(1, 4))]
            if rng.random() < 0.5:
                grid[0] = 1
                images.append(grid)
                ids += media(I, grid)
            else:
                videos.append(grid)
                ids += media(V, grid)
        check(qwen2vl, ids + [3], images, videos)


def test_padded_batch_matches_packed_rows(qwen2vl):
    """transformers' attention_mask: positions of the real tokens only, padding 0, delta per row."""
    a = [5] + media(I, IMG_A) + [6]
    b = [7, 8] + media(V, VID_A) + media(I, IMG_B) + [9, 10]
    S = len(b) + 3
    rows = [a + [0] * (S - len(a)), b + [0] * (S - len(b))]
    mask = torch.tensor([[1] * len(a) + [0] * (S - len(a)), [1] * len(b) + [0] * (S - len(b))])
    want, want_delta = hf_rope_index(qwen2vl, rows, [IMG_A, IMG_B], [VID_A], attention_mask=mask)
    for r, (row, imgs, vids) in enumerate([(rows[0], [IMG_A], None), (rows[1], [IMG_B], [VID_A])]):
        pos, deltas = packed_mrope_positions(row, [int(mask[r].sum())], imgs, vids, I, V, MERGE)
        np.testing.assert_array_equal(pos, want[:, r])
        assert deltas == [want_delta[r]]


def test_packed_row_equals_documents_alone():
    d0 = [5] + media(I, IMG_A) + [6] + media(V, VID_LONG) + [7]
    d1 = [8, 9] + media(I, IMG_B) + media(V, VID_A)
    d2 = [10, 11, 12]
    row = np.array(d0 + d1 + d2 + [0] * 4)
    pos, deltas = packed_mrope_positions(torch.tensor(row), [len(d0), len(d1), len(d2)], [IMG_A, IMG_B],
                                         [VID_LONG, VID_A], I, V, MERGE)
    p0, e0 = ours(d0, [IMG_A], [VID_LONG])
    p1, e1 = ours(d1, [IMG_B], [VID_A])
    p2, e2 = ours(d2)
    np.testing.assert_array_equal(pos, np.concatenate([p0, p1, p2, np.zeros((3, 4), np.int64)], axis=1))
    assert deltas == [e0, e1, e2] and e2 == 0


def test_adjacent_runs_split_by_grid():
    """Two images with no token between them: one run, split by the grid sizes in order."""
    pos, delta = ours([5] + [I] * 14 + [6], [IMG_A, IMG_B])
    first, second = ours([I] * 6, [IMG_A])[0] + 1, ours([I] * 8, [IMG_B])[0] + 1 + 3  # after 1 text; +max(2,3)
    np.testing.assert_array_equal(pos[:, 1:15], np.concatenate([first, second], axis=1))
    assert pos[:, 15].tolist() == [1 + 3 + 4] * 3 and delta == 9 - 16


def test_media_advance_max_is_reference_behaviour(qwen2vl):
    ids = [5] + media(V, VID_LONG) + [6]
    pos, delta = ours(ids, videos=[VID_LONG], media_advance="max")
    video = pos[:, 2:2 + n_tokens(VID_LONG)]
    assert pos[:, -2].tolist() == [video.max() + 1] * 3  # <|vision_end|> right after the video's max
    # identical to transformers 5 whenever t <= max(h, w) / merge
    check_ids = [5] + media(V, VID_A) + media(I, IMG_B) + [6]
    want, want_delta = hf_rope_index(qwen2vl, [check_ids], [IMG_B], [VID_A])
    pos, delta = ours(check_ids, [IMG_B], [VID_A], media_advance="max")
    np.testing.assert_array_equal(pos, want[:, 0])
    assert delta == want_delta[0]


def test_qwen2_5_temporal_hook():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    cfg = Qwen2_5_VLConfig(text_config={**TEXT, "num_hidden_layers": 1}, vision_config={
        "depth": 1, "hidden_size": 16, "intermediate_size": 32, "out_hidden_size": 32, "num_heads": 2,
        "patch_size": 2, "spatial_merge_size": MERGE, "temporal_patch_size": 2, "window_size": 4,
        "fullatt_block_indexes": [0], "tokens_per_second": 2}, **IDS)
    model = Qwen2_5_VLModel(cfg).eval()
    ids = [5] + media(V, VID_LONG) + [6] + media(I, IMG_A) + media(V, [3, 2, 4]) + [7]
    for secs in ([1.5, 0.5], [0.25, 4.0], None):
        kw = {} if secs is None else {"second_per_grid_ts": torch.tensor(secs)}
        want, want_delta = hf_rope_index(model, [ids], [IMG_A], [VID_LONG, [3, 2, 4]], **kw)
        pos, delta = ours(ids, [IMG_A], [VID_LONG, [3, 2, 4]], tokens_per_second=2, **kw)
        np.testing.assert_array_equal(pos, want[:, 0])
        assert delta == want_delta[0]


def test_errors_name_counts():
    with pytest.raises(ValueError, match=r"^7 image placeholder tokens \(id 190\) but image_grid_thw "
                                         r"\[\[1, 4, 6\]\] needs 6"):
        ours([5] + [I] * 7, [IMG_A])
    with pytest.raises(ValueError, match="0 video placeholder tokens .* needs 12"):
        ours([5, 6], videos=[VID_A])
    with pytest.raises(ValueError, match=r"run \[1, 5\) does not split"):  # 14 tokens, runs of 4 and 10
        ours([5] + [I] * 4 + [6] + [I] * 10, [IMG_A, IMG_B])
    with pytest.raises(ValueError, match="document 1: 8 image placeholder tokens do not match"):
        packed_mrope_positions([I] * 6 + [I] * 8, [6, 8], [IMG_A, [1, 4, 4], IMG_B], None, I, V, MERGE)
    with pytest.raises(ValueError, match="2 image grids given but the documents' placeholders use 1"):
        packed_mrope_positions([I] * 6 + [5], [7], [IMG_A, IMG_B], None, I, V, MERGE)
    with pytest.raises(ValueError, match="divisible by spatial_merge_size=2"):
        ours([I] * 3, [[1, 3, 4]])
    with pytest.raises(ValueError, match="needs tokens_per_second"):
        ours([V] * 12, videos=[VID_A], second_per_grid_ts=[1.0])
    with pytest.raises(ValueError, match=r"doc_lens \[3\] \(sum 3\) do not fit a row of 2 tokens"):
        packed_mrope_positions([5, 6], [3], None, None, I, V, MERGE)
