"""The `siglip` encoder part: transformers' SiglipVisionModel (with its pooling head) and
JanusVisionModel (+ Janus's aligner, with and without QK-norm) give the same outputs as ours
after a strict load; missing or unexpected tensors are named; the part runs inside a composed
omni model (dummy payload on a batch without images)."""

from __future__ import annotations

import pytest
import torch

from engine.modalities.siglip import SiglipEncoder

SIZE = dict(hidden_size=32, num_hidden_layers=2, image_size=16, patch_size=4)


def _bigger(*modules, seed: int = 0):
    """Weights larger than the default init, so that a mistake shows in the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.normal_(0, 0.2)


def _pixels(n: int, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, channels, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(SiglipVisionConfig(**SIZE, intermediate_size=48, num_attention_heads=2)).eval()
    _bigger(model)
    folder = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(folder)
    return model, folder


def janus_tower(qk_norm: bool, heads: int, seed: int = 0):
    from transformers.models.janus.configuration_janus import JanusVisionConfig
    from transformers.models.janus.modeling_janus import JanusVisionAlignerMLP, JanusVisionModel

    config = JanusVisionConfig(**SIZE, num_attention_heads=heads, mlp_ratio=2.0, use_qk_norm=qk_norm,
                               projection_dim=24, depth=2)
    tower, aligner = JanusVisionModel(config).eval(), JanusVisionAlignerMLP(config).eval()
    _bigger(tower, aligner, seed=seed)
    return config, tower, aligner


def test_siglip_vision_model_outputs_and_pooled_output_equal_transformers(siglip_folder):
    hf, folder = siglip_folder
    enc = SiglipEncoder(**SiglipEncoder.options_from_hf_config(folder))
    assert enc.vision_use_head and enc.hidden_act == "gelu_pytorch_tanh" and enc.intermediate_size == 48
    enc.load_hf_weights(folder)
    x = _pixels(3)
    with torch.no_grad():
        want = hf(pixel_values=x)
        rows = enc.lm_encode({"pixel_values": x})
        assert rows.shape == (3 * 16, 32) and enc.num_tokens({"pixel_values": x}) == 48
        assert (rows - want.last_hidden_state.reshape(-1, 32)).abs().max() < 1e-4
        assert (enc.pooled(x) - want.pooler_output).abs().max() < 1e-4


@pytest.mark.parametrize("qk_norm,heads", [(False, 2), (True, 1)])
def test_janus_vision_model_with_its_aligner_equals_transformers(qk_norm, heads):
    """transformers' QK-norm (LayerNorm of the full width on per-head slices) only runs with one
    head; there both agree."""
    config, tower, aligner = janus_tower(qk_norm, heads)
    state = {**{f"model.vision_model.{k}": v for k, v in tower.state_dict().items()},
             **{f"model.aligner.{k}": v for k, v in aligner.state_dict().items()}}
    enc = SiglipEncoder(**SiglipEncoder.options_from_hf_config(config))
    assert (enc.projection_dim, enc.out_dim, enc.use_qk_norm, enc.hidden_act) == (24, 24, qk_norm, "gelu")
    enc.load_hf_weights(state)
    x = _pixels(2)
    with torch.no_grad():
        want = aligner(tower(pixel_values=x).last_hidden_state).reshape(-1, 24)
        got = enc.lm_encode({"pixel_values": x})
    assert got.shape == want.shape and (got - want).abs().max() < 1e-4


def test_a_bare_janus_tower_folder_loads_into_an_encoder_without_aligner(tmp_path):
    config, tower, _ = janus_tower(False, 2, seed=3)
    tower.save_pretrained(tmp_path)
    opts = {**SiglipEncoder.options_from_hf_config(tmp_path), "projection_dim": None}
    enc = SiglipEncoder(**opts)
    enc.load_hf_weights(tmp_path)
    x = _pixels(1)
    with torch.no_grad():
        assert (enc.lm_encode({"pixel_values": x}) - tower(pixel_values=x).last_hidden_state[0]).abs().max() < 1e-4


def test_missing_unexpected_and_misshapen_tensors_are_named(siglip_folder):
    from safetensors.torch import load_file

    _, folder = siglip_folder
    state = load_file(folder / "model.safetensors")
    enc = SiglipEncoder(**SiglipEncoder.options_from_hf_config(folder))
    lost = dict(state)
    del lost["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing \['encoder\.layers\.1\.mlp\.fc2\.bias'\], unexpected none"):
        enc.load_hf_weights(lost)
    with pytest.raises(ValueError, match=r"missing none, unexpected \['encoder\.layers\.2\.mlp\.fc1\.bias'\]"):
        enc.load_hf_weights({**state, "encoder.layers.2.mlp.fc1.bias": torch.zeros(48)})
    with pytest.raises(ValueError, match=r"post_layernorm\.weight has shape \(31,\) in the checkpoint, \(32,\)"):
        enc.load_hf_weights({**state, "post_layernorm.weight": torch.zeros(31)})
    with pytest.raises(ValueError, match=r"no vision tower in the checkpoint"):
        enc.load_hf_weights({"model.layers.0.mlp.up_proj.weight": torch.zeros(2, 2)})
    small = SiglipEncoder(**{**SiglipEncoder.options_from_hf_config(folder), "num_hidden_layers": 1})
    with pytest.raises(ValueError, match=r"config\.json disagrees .*'num_hidden_layers': \(2, 1\)"):
        small.load_hf_weights(folder)


def test_bad_options_and_payloads_are_one_line_errors():
    from engine.config import ConfigError
    from engine.models.part_specs import build_part

    with pytest.raises(ConfigError, match=r"model\.encoders\[0\]\.image_size' \(siglip\): must be a multiple of "
                                          r"patch_size = 4, got 10"):
        build_part("encoders", 0, {"name": "siglip", "image_size": 10})
    with pytest.raises(ConfigError, match=r"model\.encoders\[0\]\.num_attention_heads' \(siglip\): must divide "
                                          r"hidden_size = 30, got 4"):
        build_part("encoders", 0, {"name": "siglip", "hidden_size": 30, "num_attention_heads": 4})
    enc = SiglipEncoder()
    with pytest.raises(ValueError, match=r"pixel_values has shape \(1, 3, 8, 8\) .* expected float \[num_images, 3, "
                                         r"16, 16\]"):
        enc.check_payload({"pixel_values": torch.zeros(1, 3, 8, 8)})


def _omni(seed: int = 0):
    from engine.config import ModelConfig
    from engine.models import build_model

    cfg = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      encoders=[{"name": "siglip", **SIZE, "num_attention_heads": 2, "projection_dim": 32,
                                 "project": False}])
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def test_in_a_composed_model_images_fill_their_placeholders_and_a_batch_without_runs_the_dummy():
    """The omni model's hidden states equal the backbone's on embeddings built by hand (the
    encoder's rows scattered into the placeholders); without a payload the part still takes
    part in the graph (zero gradient, not None) and the text alone is computed."""
    from engine.batch import Batch

    model = _omni()
    ph = model.ph["siglip"]
    ids = torch.randint(0, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    ids[0, 5:21] = ph
    ids[0, 22:38] = ph
    x = _pixels(2)
    batch = Batch(input_ids=ids, labels=torch.roll(ids, -1, 1), payloads={"siglip": {"pixel_values": x}})
    with torch.no_grad():
        got = model.text_logits(batch)
        emb = model.backbone.embed(ids)
        emb[ids == ph] = model.encoders["siglip"].lm_encode({"pixel_values": x})
        want = model.backbone(inputs_embeds=emb)
    assert (got - want).abs().max() < 1e-5

    text = Batch(input_ids=ids.masked_fill(ids == ph, 7), labels=torch.roll(ids, -1, 1))
    loss = model(text)["lm"]
    loss.backward()
    grads = [p.grad for p in model.encoders["siglip"].parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    with torch.no_grad():
        assert torch.equal(model.text_logits(text), model.backbone(text.input_ids))
