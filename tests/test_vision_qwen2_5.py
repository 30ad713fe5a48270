"""The `qwen2_5_vision` encoder against transformers' Qwen2.5-VL and Qwen2.5-Omni vision towers.

References are tiny random transformers models built from configs; nothing is downloaded.
Windows are 16 pixels = 2 x 2 merge units = 4 x 4 patches of 4 pixels, so the grids below
have whole, partial (right / bottom edge) and single windows.
"""

import pytest
import torch

from engine.modalities.base import call_part
from engine.modalities.registry import get_encoder
from engine.modalities.vision import block_diagonal_sdpa
from engine.modalities.vision_qwen2_5 import Qwen2_5VisionEncoder, window_order
from engine.models.part_specs import build_part

transformers = pytest.importorskip("transformers")
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniVisionEncoder  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel  # noqa: E402
from transformers.vision_utils import get_vision_window_index  # noqa: E402

OPTS = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, in_channels=3, patch_size=4,
            temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=40, window_size=16,
            fullatt_block_indexes=[1, 3])
PATCH_DIM = 3 * 2 * 4 * 4
TOL = 1e-4
FLAVOURS = {  # transformers config class, tower class, the tower's prefix in the model's checkpoint
    "qwen2_5_vl": (transformers.Qwen2_5_VLVisionConfig, Qwen2_5_VisionTransformerPretrainedModel, "visual."),
    "qwen2_5_omni": (transformers.Qwen2_5OmniVisionEncoderConfig, Qwen2_5OmniVisionEncoder, "thinker.visual."),
}
CASES = {
    "one_image": [(1, 12, 10)],                               # 3 x 3 windows, the right column partial
    "images": [(1, 4, 4), (1, 6, 10), (1, 2, 2), (1, 10, 4)],  # one window; partial both edges; < window; tall
    "video": [(3, 6, 8)],                                      # t = 3 temporal patches, bottom row partial
    "images_and_video": [(1, 8, 12), (3, 6, 6), (1, 2, 2)],
}


def hf_tower(flavour: str = "qwen2_5_vl", seed: int = 0, **overrides):
    config_cls, tower_cls, _ = FLAVOURS[flavour]
    torch.manual_seed(seed)
    model = tower_cls._from_config(config_cls(**{**OPTS, **overrides}), attn_implementation="eager").eval()
    with torch.no_grad():  # scaled-up random weights, norms and biases too (transformers: 1 and 0)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.2 * torch.randn_like(p))
    return model


def ours_from(ref, **overrides) -> Qwen2_5VisionEncoder:
    enc = Qwen2_5VisionEncoder(**{**OPTS, **overrides}).eval()
    enc.load_hf_weights(ref.state_dict())
    return enc


def payload(*grids, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    grid = torch.tensor(grids, dtype=torch.long)
    return {"pixel_values": torch.randn(int(grid.prod(-1).sum()), PATCH_DIM, generator=g), "grid_thw": grid}


def ref_out(ref, p) -> torch.Tensor:
    with torch.no_grad():
        return ref(p["pixel_values"], grid_thw=p["grid_thw"]).pooler_output


def max_diff(enc, ref, p) -> float:
    enc.check_payload(p)
    with torch.no_grad():
        out = enc.lm_encode(p)
    expected = ref_out(ref, p)
    assert out.shape == expected.shape == (enc.num_tokens(p), 40)
    return (out - expected).abs().max().item()


# ---- parity ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_matches_transformers(flavour, case):
    ref = hf_tower(flavour)
    assert max_diff(ours_from(ref), ref, payload(*CASES[case])) <= TOL


@pytest.mark.parametrize("full", [[0, 3], [0], [], [0, 1, 2, 3]], ids=["first_last", "first", "none", "all"])
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_full_attention_blocks(flavour, full):
    ref = hf_tower(flavour, fullatt_block_indexes=full)
    assert max_diff(ours_from(ref, fullatt_block_indexes=full), ref, payload(*CASES["images_and_video"])) <= TOL


def test_window_order_matches_transformers():
    for grids, window in [(CASES["images_and_video"], 16), (CASES["images"], 16), ([(2, 12, 20)], 24),
                          ([(1, 6, 8)], 8), ([(1, 28, 36), (1, 4, 2)], 112)]:
        grid = torch.tensor(grids)
        order, lengths = window_order(grids, 2, window, 4)
        index, cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=window, patch_size=4)
        assert torch.equal(order, index)
        assert [0, *torch.tensor(lengths).cumsum(0).tolist()] == cu.tolist()


def test_windows_change_the_result():
    """The parity cases are sensitive to the windows: all-window and all-full towers differ."""
    ref = hf_tower()
    p = payload((1, 12, 10))
    with torch.no_grad():
        windowed = ours_from(ref, fullatt_block_indexes=[]).lm_encode(p)
        full = ours_from(ref, fullatt_block_indexes=[0, 1, 2, 3]).lm_encode(p)
    assert (windowed - full).abs().max().item() > 1e-2


def test_attention_hook_sees_windows_and_slices():
    """Each block's `attention_fn` (the hook a sequence-parallel / varlen wrapper replaces) gets
    transformers' cu_window_seqlens in windowed blocks and per-slice cu_seqlens in full ones."""
    enc = Qwen2_5VisionEncoder(**OPTS).eval()
    seen = []

    def recording(q, k, v, segments):
        seen.append(segments.cu_seqlens.tolist())
        return block_diagonal_sdpa(q, k, v, segments)

    p = payload(*CASES["images_and_video"])
    with torch.no_grad():
        plain = enc.lm_encode(p)
        for block in enc.blocks:
            block.attn.attention_fn = recording
        hooked = enc.lm_encode(p)
    assert torch.equal(hooked, plain)
    _, cu_window = get_vision_window_index(p["grid_thw"], spatial_merge_size=2, window_size=16, patch_size=4)
    slices = [0, 96, 132, 168, 204, 208]  # 8*12; then 3 slices of 6*6; then 2*2
    assert seen == [cu_window.tolist(), slices, cu_window.tolist(), slices]


def test_inputs_attend_separately():
    enc = ours_from(hf_tower())
    a, b = payload((1, 6, 10), seed=2), payload((2, 4, 8), seed=3)
    both = enc.collate([a, b])
    with torch.no_grad():
        packed, alone = enc.lm_encode(both), torch.cat([enc.lm_encode(a), enc.lm_encode(b)])
        called = call_part(enc, "lm_encode", both)
    assert (packed - alone).abs().max().item() <= 1e-5
    assert torch.equal(called, packed)


def test_bf16_runs_close_to_fp32():
    enc = ours_from(hf_tower())
    p = payload(*CASES["images_and_video"])
    with torch.no_grad():
        ref = enc.lm_encode(p)
        out = enc.to(torch.bfloat16).lm_encode(p)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 5e-2


# ---- the engine's side -----------------------------------------------------------------
def test_built_through_the_engine():
    enc = build_part("encoders", 0, {"name": "qwen2_5_vision", **OPTS, "project": False, "placeholder": 7})
    assert type(enc) is Qwen2_5VisionEncoder is get_encoder("qwen2_5_vision")
    assert enc.media == ("image", "video")
    assert (enc.patch_size, enc.spatial_merge_size, enc.temporal_patch_size, enc.in_channels) == (4, 2, 2, 3)
    assert enc.out_dim == 40
    assert enc.num_tokens({"grid_thw": torch.tensor([[2, 4, 6]])}) == 12  # t*h*w / merge**2
    assert enc.num_tokens(payload(*CASES["images_and_video"])) == 52  # (96 + 3*36 + 4) / 4
    dummy = enc.dummy_payload()
    enc.check_payload(dummy)
    assert call_part(enc, "lm_encode", dummy).shape == (enc.num_tokens(dummy), 40) == (1, 40)
    pix, grid = enc.patchify(torch.randn(5, 3, 16, 24))
    assert grid.tolist() == [3, 4, 6] and pix.shape == (72, PATCH_DIM)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['embed_dim'\]"):
        build_part("encoders", 0, {"name": "qwen2_5_vision", "embed_dim": 32})


def test_gradients_reach_the_patch_embedding():
    enc = Qwen2_5VisionEncoder(**OPTS)
    call_part(enc, "lm_encode", payload(*CASES["images_and_video"])).sum().backward()
    assert enc.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())
    enc.zero_grad()
    enc.lm_encode(enc.dummy_payload()).sum().backward()
    assert enc.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.pop("pixel_values"), "missing key 'pixel_values'"),
    (lambda p: p.update(pixel_values=p["pixel_values"][:, :-1]),
     r"pixel_values has shape \(52, 95\).*\[num_patches, 96\]"),
    (lambda p: p.update(pixel_values=p["pixel_values"][:-4]), r"pixel_values has 48 patches.*sum\(t\*h\*w\) = 52"),
    (lambda p: p.update(grid_thw=torch.tensor([[1, 4, 6], [1, 2, 3], [1, 2, 2]])),
     r"grid_thw\[1\] = \[1, 2, 3\].*divisible"),
    (lambda p: p.update(grid_thw=torch.tensor([1, 4, 13])), r"grid_thw has shape \(3,\).*\[num_inputs >= 1, 3\]"),
])
def test_check_payload_errors(mutate, message):
    enc = Qwen2_5VisionEncoder(**OPTS)
    p = payload((1, 4, 6), (1, 6, 4), (1, 2, 2))
    enc.check_payload(p)
    mutate(p)
    with pytest.raises(ValueError, match=message):
        enc.check_payload(p)


def test_option_errors():
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        Qwen2_5VisionEncoder(hidden_size=24, num_heads=4)
    with pytest.raises(ValueError, match=r"fullatt_block_indexes=\[1, 4\] must be block indexes in \[0, depth=4\)"):
        Qwen2_5VisionEncoder(**{**OPTS, "fullatt_block_indexes": [1, 4]})
    with pytest.raises(ValueError, match="window_size=4 .* at least patch_size x spatial_merge_size = 8"):
        Qwen2_5VisionEncoder(**{**OPTS, "window_size": 4})
    with pytest.raises(ValueError, match="hidden_act='relu6'"):
        Qwen2_5VisionEncoder(hidden_act="relu6")


# ---- loading ---------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", ["", "visual.", "model.visual.", "thinker.visual.", "thinker.model.visual."])
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_load_state_dict_with_prefix(flavour, prefix):
    ref = hf_tower(flavour)
    sd = {f"{prefix}{k}": v for k, v in ref.state_dict().items()}
    if prefix:  # the rest of a full model is ignored (without a prefix, the tower alone is strict)
        sd["lm_head.weight"] = torch.zeros(3, 3)
    enc = Qwen2_5VisionEncoder(**OPTS)
    enc.load_hf_weights(sd)
    ours, theirs = enc.state_dict(), ref.state_dict()
    for i in range(4):
        for kind in ("weight", "bias"):
            fused = theirs.get(f"blocks.{i}.attn.qkv.{kind}")
            if fused is None:  # Qwen2.5-Omni: separate q, k, v
                fused = torch.cat([theirs[f"blocks.{i}.attn.{x}.{kind}"] for x in "qkv"])
            assert torch.equal(ours.pop(f"blocks.{i}.attn.qkv.{kind}"), fused)
    assert ours.keys() <= theirs.keys() and all(torch.equal(v, theirs[k]) for k, v in ours.items())


def test_load_errors_name_the_tensor():
    enc = Qwen2_5VisionEncoder(**OPTS)
    sd = {f"model.visual.{k}": v for k, v in hf_tower().state_dict().items()}
    with pytest.raises(ValueError, match=r"model.visual.blocks.0.attn.qkv.weight has shape \(96, 31\) in the "
                                         r"checkpoint, \(96, 32\) in the module"):
        enc.load_hf_weights({**sd, "model.visual.blocks.0.attn.qkv.weight": torch.zeros(96, 31)})
    with pytest.raises(ValueError, match=r"model.visual.blocks.2.mlp.gate_proj.bias has shape \(47,\).*\(48,\)"):
        enc.load_hf_weights({**sd, "model.visual.blocks.2.mlp.gate_proj.bias": torch.zeros(47)})
    with pytest.raises(ValueError, match=r"missing \['merger.ln_q.weight'\], unexpected none"):
        enc.load_hf_weights({k: v for k, v in sd.items() if k != "model.visual.merger.ln_q.weight"})
    with pytest.raises(ValueError, match=r"missing none, unexpected \['blocks.4.norm1.weight'\]"):
        enc.load_hf_weights({**sd, "model.visual.blocks.4.norm1.weight": torch.ones(32)})
    with pytest.raises(ValueError, match=r"unexpected \['merger.ln_q.bias'\]"):  # a Qwen2-VL LayerNorm
        enc.load_hf_weights({**sd, "model.visual.merger.ln_q.bias": torch.zeros(32)})

    omni = {f"thinker.visual.{k}": v for k, v in hf_tower("qwen2_5_omni").state_dict().items()}
    with pytest.raises(ValueError, match=r"Qwen2.5-Omni .*thinker.visual.blocks.1.attn.k.weight has shape \(32, 31\) "
                                         r"in the checkpoint, \(32, 32\) in the module"):
        enc.load_hf_weights({**omni, "thinker.visual.blocks.1.attn.k.weight": torch.zeros(32, 31)})
    with pytest.raises(ValueError, match=r"missing \['blocks.3.attn.v.bias'\], unexpected none"):
        enc.load_hf_weights({k: v for k, v in omni.items() if k != "thinker.visual.blocks.3.attn.v.bias"})
    mixed = {k: v for k, v in omni.items() if not k.startswith("thinker.visual.blocks.0.attn.")}
    mixed.update({f"thinker.visual.{k}": v for k, v in enc.state_dict().items() if k.startswith("blocks.0.attn.")})
    with pytest.raises(ValueError, match=r"missing \['blocks.0.attn.k.bias', .*unexpected \['blocks.0.attn.qkv.bias'"):
        enc.load_hf_weights(mixed)


TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
            vocab_size=128, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def test_load_from_qwen2_5_vl_folder(tmp_path):
    cfg = transformers.Qwen2_5_VLConfig(text_config={**TEXT, "bos_token_id": 0, "eos_token_id": 1},
                                        vision_config={**OPTS, "tokens_per_second": 2})
    torch.manual_seed(0)
    full = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    full.save_pretrained(tmp_path)
    opts = Qwen2_5VisionEncoder.options_from_hf_config(tmp_path)
    assert opts == {**OPTS, "hidden_act": "silu", "rope_theta": 10000.0, "tokens_per_second": 2}
    assert Qwen2_5VisionEncoder.options_from_hf_config(cfg) == opts  # a config object too
    enc = Qwen2_5VisionEncoder(**opts).eval()
    enc.load_hf_weights(tmp_path)
    p = payload(*CASES["images_and_video"])
    assert max_diff(enc, full.model.visual, p) <= TOL
    enc.load_hf_weights(full.state_dict())  # transformers 5 in-memory names: model.visual.*
    with pytest.raises(ValueError, match=r"config.json disagrees.*'window_size': \(16, 32\)"):
        Qwen2_5VisionEncoder(**{**opts, "window_size": 32}).load_hf_weights(tmp_path)


def test_load_from_qwen2_5_omni_folder(tmp_path):
    audio = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, output_dim=32,
                 num_mel_bins=16)
    vision = {**OPTS, "fullatt_block_indexes": [0, 3]}
    thinker = transformers.Qwen2_5OmniThinkerConfig(text_config=TEXT, vision_config=vision, audio_config=audio,
                                                    position_id_per_seconds=13)
    cfg = transformers.Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), enable_audio_output=False)
    torch.manual_seed(0)
    full = transformers.Qwen2_5OmniForConditionalGeneration(cfg).eval()
    full.save_pretrained(tmp_path)  # the tower is thinker.visual.* on disk, with separate q, k, v
    opts = Qwen2_5VisionEncoder.options_from_hf_config(tmp_path)
    assert opts == {**OPTS, "fullatt_block_indexes": [0, 3], "hidden_act": "silu", "rope_theta": 10000.0,
                    "tokens_per_second": 13}
    assert Qwen2_5VisionEncoder.options_from_hf_config(thinker) == opts  # the thinker's config alone
    enc = Qwen2_5VisionEncoder(**opts).eval()
    enc.load_hf_weights(tmp_path)
    assert max_diff(enc, full.thinker.model.visual, payload(*CASES["images_and_video"])) <= TOL
    enc.load_hf_weights(full.state_dict())  # transformers 5 in-memory names: thinker.model.visual.*


def test_options_from_released_style_configs():
    """Configs as the hub's Qwen2.5-VL-7B-Instruct and Qwen2.5-Omni-7B write them (original key
    names such as in_chans; no rope_parameters)."""
    tower = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
             "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
             "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
             "temporal_patch_size": 2}
    expected = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
                "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "hidden_act": "silu",
                "out_hidden_size": 3584, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}
    vl = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "vision_config": {**tower, "tokens_per_second": 2}}
    assert Qwen2_5VisionEncoder.options_from_hf_config(vl) == {**expected, "tokens_per_second": 2}
    omni = {"model_type": "qwen2_5_omni", "thinker_config": {
        "model_type": "qwen2_5_omni_thinker", "position_id_per_seconds": 25,
        "vision_config": {**tower, "model_type": "qwen2_5_omni_vision_encoder", "tokens_per_second": 2}}}
    assert Qwen2_5VisionEncoder.options_from_hf_config(omni) == {**expected, "tokens_per_second": 25}
    small = {**tower, "depth": 1, "hidden_size": 32, "num_heads": 4, "intermediate_size": 8, "out_hidden_size": 8,
             "fullatt_block_indexes": [0]}
    enc = Qwen2_5VisionEncoder(**Qwen2_5VisionEncoder.options_from_hf_config(small))
    assert enc.patch_dim == 3 * 2 * 14 * 14 and enc.tokens_per_second is None
