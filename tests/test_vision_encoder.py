"""The `vision` encoder against transformers' Qwen2-VL vision tower and image processor.

References are tiny random transformers models built from configs; nothing is downloaded.
"""

import numpy as np
import pytest
import torch

from engine.modalities.base import call_part
from engine.modalities.registry import get_encoder
from engine.modalities.vision import VisionEncoder, patchify

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel  # noqa: E402

OPTS = dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, in_channels=3, patch_size=4, temporal_patch_size=2,
            spatial_merge_size=2, hidden_size=48)
TOL = 1e-4


def hf_tower(hidden_act: str = "quick_gelu", seed: int = 0):
    cfg = transformers.Qwen2VLVisionConfig(**OPTS, hidden_act=hidden_act)
    torch.manual_seed(seed)
    model = Qwen2VisionTransformerPretrainedModel._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # random norms and biases too (transformers initialises them to 1 and 0)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.2 * torch.randn_like(p))
    return model


def ours_from(ref, hidden_act: str = "quick_gelu") -> VisionEncoder:
    enc = VisionEncoder(**OPTS, hidden_act=hidden_act).eval()
    enc.load_hf_weights(ref.state_dict())
    return enc


def payload(*grids, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids, dtype=torch.long)
    n = int(grid.prod(-1).sum())
    return {"pixel_values": torch.randn(n, 3 * 2 * 4 * 4, generator=g), "grid_thw": grid}


def ref_out(ref, p) -> torch.Tensor:
    with torch.no_grad():
        return ref(p["pixel_values"], grid_thw=p["grid_thw"]).pooler_output


CASES = {
    "two_images": [(1, 4, 6), (1, 6, 2)],       # different resolutions in one payload
    "video": [(3, 4, 4)],                        # t = 3 temporal patches
    "image_and_video": [(1, 2, 2), (2, 4, 2)],
}


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(case, hidden_act):
    ref = hf_tower(hidden_act)
    enc = ours_from(ref, hidden_act)
    p = payload(*CASES[case])
    enc.check_payload(p)
    with torch.no_grad():
        out = enc.lm_encode(p)
    expected = ref_out(ref, p)
    assert out.shape == expected.shape == (enc.num_tokens(p), 48)
    assert (out - expected).abs().max().item() <= TOL


def test_inputs_attend_separately():
    """Packing two images into one payload gives each the result it gets alone."""
    enc = ours_from(hf_tower())
    a, b = payload((1, 4, 6), seed=2), payload((2, 2, 4), seed=3)
    both = {k: torch.cat([a[k], b[k]]) for k in a}
    assert torch.equal(enc.collate([a, b])["grid_thw"], both["grid_thw"])
    with torch.no_grad():
        packed, alone = enc.lm_encode(both), torch.cat([enc.lm_encode(a), enc.lm_encode(b)])
        called = call_part(enc, "lm_encode", both)  # through __call__, as the omni model runs it
    assert (packed - alone).abs().max().item() <= 1e-5
    assert torch.equal(called, packed)


def test_backward_and_dummy_payload():
    enc = VisionEncoder(**OPTS)
    p = enc.dummy_payload()
    enc.check_payload(p)
    assert enc.num_tokens(p) == 1
    out = enc.lm_encode(p)
    assert out.shape == (1, enc.out_dim)
    out.sum().backward()
    assert all(prm.grad is not None for prm in enc.parameters())


# ---- patchify --------------------------------------------------------------------------
def test_patchify_image_matches_qwen2vl_image_processor():
    proc = transformers.Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2)
    rng = np.random.default_rng(0)
    for h, w in ((16, 24), (8, 8)):
        image = rng.integers(0, 256, size=(3, h, w)).astype(np.uint8)
        got = proc(images=[image], do_resize=False, return_tensors="pt")
        frames = torch.from_numpy(image).float() / 255
        mean, std = torch.tensor(proc.image_mean)[:, None, None], torch.tensor(proc.image_std)[:, None, None]
        pix, grid = patchify((frames - mean) / std, patch_size=4, temporal_patch_size=2, merge_size=2)
        assert grid.tolist() == got["image_grid_thw"][0].tolist() == [1, h // 4, w // 4]
        assert pix.shape == got["pixel_values"].shape
        assert (pix - got["pixel_values"]).abs().max().item() <= 1e-5


def reference_patches(frames: torch.Tensor, p: int, tp: int, m: int) -> torch.Tensor:
    """Patch by patch, in loops: temporal patch, merge window (row-major), patch in window."""
    if len(frames) % tp:
        frames = torch.cat([frames, frames[-1:].repeat(tp - len(frames) % tp, 1, 1, 1)])
    _, _, height, width = frames.shape
    rows = []
    for t in range(len(frames) // tp):
        for bh in range(height // (p * m)):
            for bw in range(width // (p * m)):
                for ih in range(m):
                    for iw in range(m):
                        y, x = (bh * m + ih) * p, (bw * m + iw) * p
                        patch = frames[t * tp:(t + 1) * tp, :, y:y + p, x:x + p]  # [T, C, P, P]
                        rows.append(patch.transpose(0, 1).flatten())      # (C, T, P, P)
    return torch.stack(rows)


@pytest.mark.parametrize("num_frames", [1, 4, 5])
def test_patchify_video_matches_reference(num_frames):
    """Qwen2VLVideoProcessor needs torchvision (not installed), so the video layout is checked
    against a loop-by-patch reference (the image case ties the two to the HF processor)."""
    frames = torch.randn(num_frames, 3, 16, 8)
    pix, grid = patchify(frames, patch_size=4, temporal_patch_size=2, merge_size=2)
    assert grid.tolist() == [(num_frames + 1) // 2, 4, 2]
    assert torch.equal(pix, reference_patches(frames, 4, 2, 2))
    enc = VisionEncoder(**OPTS)
    pix2, grid2 = enc.patchify(frames)
    assert torch.equal(pix2, pix) and torch.equal(grid2, grid)
    enc.check_payload({"pixel_values": pix, "grid_thw": grid[None]})


def test_patchify_rejects_unaligned_frames():
    with pytest.raises(ValueError, match="multiples of patch_size"):
        patchify(torch.randn(1, 3, 12, 16), patch_size=4, merge_size=2)


# ---- payload checks --------------------------------------------------------------------
@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.pop("grid_thw"), "missing key 'grid_thw'"),
    (lambda p: p.update(pixel_values=p["pixel_values"][:, :-1]),
     r"pixel_values has shape \(28, 95\).*\[num_patches, 96\]"),
    (lambda p: p.update(pixel_values=p["pixel_values"][:-4]), r"pixel_values has 24 patches.*sum\(t\*h\*w\) = 28"),
    (lambda p: p.update(grid_thw=torch.tensor([[1, 4, 6], [1, 3, 2]])), r"grid_thw\[1\] = \[1, 3, 2\].*divisible"),
    (lambda p: p.update(grid_thw=torch.tensor([1, 4, 7])), r"grid_thw has shape \(3,\).*\[num_inputs >= 1, 3\]"),
    (lambda p: p.update(grid_thw=p["grid_thw"].float()), r"grid_thw .*dtype torch.float32.*integer"),
])
def test_check_payload_errors(mutate, message):
    enc = VisionEncoder(**OPTS)
    p = payload((1, 4, 6), (1, 2, 2))
    enc.check_payload(p)
    mutate(p)
    with pytest.raises(ValueError, match=message):
        enc.check_payload(p)


# ---- loading ---------------------------------------------------------------------------
def test_load_errors_name_the_tensor():
    ref = hf_tower()
    enc = VisionEncoder(**OPTS)
    sd = {f"model.visual.{k}": v for k, v in ref.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.visual.blocks.0.attn.qkv.weight has shape \(96, 31\).*\(96, 32\)"):
        enc.load_hf_weights({**sd, "model.visual.blocks.0.attn.qkv.weight": torch.zeros(96, 31)})
    with pytest.raises(ValueError, match=r"missing \['merger.ln_q.bias'\], unexpected none"):
        enc.load_hf_weights({k: v for k, v in sd.items() if k != "model.visual.merger.ln_q.bias"})
    with pytest.raises(ValueError, match=r"missing none, unexpected \['blocks.2.norm1.weight'\]"):
        enc.load_hf_weights({**sd, "model.visual.blocks.2.norm1.weight": torch.ones(32)})


def test_load_from_hf_folder(tmp_path):
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, vocab_size=128, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=dict(**OPTS, hidden_act="gelu"))
    torch.manual_seed(0)
    full = transformers.Qwen2VLForConditionalGeneration(cfg).eval()
    full.save_pretrained(tmp_path)
    opts = VisionEncoder.options_from_hf_config(tmp_path)
    assert opts == {**OPTS, "hidden_act": "gelu", "rope_theta": 10000.0}
    enc = VisionEncoder(**opts).eval()
    enc.load_hf_weights(tmp_path)
    p = payload((1, 4, 4), (2, 2, 2))
    with torch.no_grad():
        assert (enc.lm_encode(p) - ref_out(full.model.visual, p)).abs().max().item() <= TOL
    enc.load_hf_weights(full.state_dict())  # transformers 5 in-memory names: model.visual.*
    with pytest.raises(ValueError, match=r"config.json disagrees.*'hidden_act': \('gelu', 'quick_gelu'\)"):
        VisionEncoder(**OPTS).load_hf_weights(tmp_path)


def test_registry_and_options():
    assert get_encoder("vision") is VisionEncoder
    enc = get_encoder("vision")(**OPTS)
    assert enc.out_dim == 48
    with pytest.raises(ValueError, match="hidden_act='relu6'"):
        VisionEncoder(hidden_act="relu6")
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        VisionEncoder(embed_dim=24, num_heads=4)
