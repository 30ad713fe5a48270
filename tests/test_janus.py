"""Janus checkpoints in and out: a tiny transformers-saved JanusForConditionalGeneration loads
whole into our omni model (siglip encoder + LLaMA backbone + image_vq decoder); its understanding
logits, image-generation logits and both training losses equal transformers'; `model.init_from`
composes and fills the same model through the trainer's chain; export writes a folder
transformers loads with our logits, and an import -> export round trip is bitwise."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import engine

IMAGE = 90  # image_token_id (<image_placeholder>)
CODES = 16  # VQ codes per generated image: 8 x 8 pixels, one downsampling -> a 4 x 4 grid
PATCHES = 16  # SigLIP patches per understood image: 16 x 16 pixels, patch 4


def tiny_janus(folder, tied: bool = True, seed: int = 0):
    from transformers import JanusConfig, JanusForConditionalGeneration

    cfg = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=4,
                           mlp_ratio=2.0, projection_dim=32, depth=2),
        vq_config=dict(embed_dim=8, num_embeddings=40, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
                       num_res_blocks=1, projection_dim=32, image_token_embed_dim=32),
        image_token_id=IMAGE, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than the default init, so that mistakes show in the logits
        for name, p in model.named_parameters():
            if "vqmodel" not in name:  # (the VQ-VAE keeps its init: its codes stay spread over the codebook)
                p.normal_(0, 0.2)
    assert (model.lm_head.weight is model.model.language_model.embed_tokens.weight) == tied
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tied, untied = tmp_path_factory.mktemp("tied"), tmp_path_factory.mktemp("untied")
    return {"tied": (tiny_janus(tied, True), tied), "untied": (tiny_janus(untied, False, seed=1), untied)}


def understanding_inputs(seed: int = 0):
    """Two rows, each with one image's placeholders; the second padded on the right."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 80, (2, 30), generator=g)
    ids[0, 3:3 + PATCHES] = IMAGE
    ids[1, 5:5 + PATCHES] = IMAGE
    mask = torch.ones_like(ids)
    mask[1, 26:] = 0
    return ids, mask, torch.randn(2, 3, 16, 16, generator=g)


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_understanding_logits_equal_transformers(checkpoints, kind):
    hf, folder = checkpoints[kind]
    ours = engine.load_pretrained(folder)
    assert ours.omni.backbone.lm_head is None if kind == "tied" else ours.omni.backbone.lm_head is not None
    ids, mask, px = understanding_inputs()
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got = ours(ids, pixel_values=px, attention_mask=mask)
        other = ours(ids, pixel_values=px.flip(0), attention_mask=mask)
    valid = mask.bool()
    assert (got - want)[valid].abs().max() < 1e-4
    assert (other - want)[valid].abs().max() > 1e-2  # the images are read


@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_image_generation_logits_equal_transformers(checkpoints, kind):
    """What transformers' generate(generation_mode="image") scores: the prompt's text embeddings,
    then each code's generation embedding + aligner, through the language model, into the
    generation head; fed the same codes (teacher forcing), both give the same logits."""
    hf, folder = checkpoints[kind]
    ours = engine.load_pretrained(folder)
    g = torch.Generator().manual_seed(2)
    prompt, codes = torch.randint(0, 80, (2, 7), generator=g), torch.randint(0, 40, (2, CODES), generator=g)
    with torch.no_grad():
        emb = torch.cat([hf.get_input_embeddings()(prompt), hf.prepare_embeddings_for_image_generation(codes)], 1)
        hidden = hf.model.language_model(inputs_embeds=emb).last_hidden_state
        want = hf.model.generation_head(hidden[:, prompt.shape[1] - 1:-1])
        got = ours.generation_logits(prompt, codes)
    assert got.shape == (2, CODES, 40) and (got - want).abs().max() < 1e-4


def test_both_training_losses_equal_transformers(checkpoints):
    """The omni model's training forward (an image read through its placeholders, a target
    image's codes from the VQ tokenizer, text labels) sums the same cross-entropies as
    transformers' modules composed by hand."""
    from engine.batch import IGNORE_INDEX, Batch

    hf, folder = checkpoints["untied"]
    omni = engine.load_pretrained(folder).omni
    vq_ph = omni.ph["image_vq"]
    assert vq_ph == 95 and omni.ph["siglip"] == IMAGE
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 80, (1, 50), generator=g)
    ids[0, 2:2 + PATCHES] = IMAGE
    ids[0, 30:30 + CODES] = vq_ph
    labels = torch.roll(ids, -1, 1)
    labels[(labels == IMAGE) | (labels == vq_ph)] = IGNORE_INDEX
    labels[0, -1] = IGNORE_INDEX
    read, target = torch.randn(1, 3, 16, 16, generator=g), torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    batch = Batch(input_ids=ids, labels=labels, payloads={"siglip": {"pixel_values": read},
                                                          "image_vq": {"pixel_values": target}})
    with torch.no_grad():
        sums = omni(batch)
        codes = hf.model.vqmodel.encode(target).image_tokens.reshape(-1)
        emb = hf.get_input_embeddings()(ids.masked_fill(ids >= 90, 0))
        emb[ids == IMAGE] = hf.model.get_image_features(read).pooler_output.reshape(-1, 32)
        emb[ids == vq_ph] = hf.prepare_embeddings_for_image_generation(codes)
        hidden = hf.model.language_model(inputs_embeds=emb).last_hidden_state
        lm = F.cross_entropy(hf.lm_head(hidden)[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX],
                             reduction="sum")
        gen = F.cross_entropy(hf.model.generation_head(hidden[0, 29:29 + CODES]), codes, reduction="sum")
    assert abs(sums["lm"] - lm) / lm < 1e-5 and abs(sums["image_vq"] - gen) / gen < 1e-5


def test_init_from_composes_the_model_and_fills_it_through_the_trainers_chain(checkpoints, tmp_path):
    from engine.checkpoint.weights import compose_from_init_from, initial_weights_
    from engine.config import load_config
    from engine.models import build_model

    hf, folder = checkpoints["tied"]
    (tmp_path / "run.yaml").write_text(f"model:\n  init_from: {folder}\n  decoders: [{{name: image_vq, loss_weight: "
                                       "0.5}]\ndata:\n  dataset: synthetic_omni\n")
    cfg = compose_from_init_from(load_config(str(tmp_path / "run.yaml")))
    enc, dec = cfg.model.encoders[0], cfg.model.decoders[0]
    assert (enc["name"], enc["placeholder"], enc["project"], enc["projection_dim"]) == ("siglip", IMAGE, False, 32)
    assert (dec["name"], dec["project"], dec["loss_weight"], dec["image_size"]) == ("image_vq", False, 0.5, 8)
    assert cfg.model.tie_embeddings and cfg.model.vocab_size == 96
    with torch.device("meta"):
        model = build_model(cfg.model)
    initial_weights_(model, cfg, torch.device("cpu"), resuming=False)
    ids, mask, px = understanding_inputs(5)
    ours = engine.load_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(ours.omni.eval().state_dict()["backbone.norm.weight"], model.state_dict()["backbone.norm.weight"])
        from engine.checkpoint.janus import JanusModel

        got = JanusModel(model.eval(), IMAGE)(ids, pixel_values=px, attention_mask=mask)
        want = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max() < 1e-4


def test_a_part_init_from_a_janus_folder_loads_the_tower_and_aligner(checkpoints):
    """The siglip part's own loader (what a part's `init_from` runs) reads a whole Janus folder."""
    from engine.modalities.siglip import SiglipEncoder

    hf, folder = checkpoints["untied"]
    enc = SiglipEncoder(**SiglipEncoder.options_from_hf_config(folder))
    enc.load_hf_weights(folder)
    px = understanding_inputs(8)[2]
    with torch.no_grad():
        want = hf.model.get_image_features(px).pooler_output.reshape(-1, 32)
        assert (enc.lm_encode({"pixel_values": px}) - want).abs().max() < 1e-4


# ---- export ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tied", "untied"])
def test_release_to_release_round_trip_is_bitwise(checkpoints, tmp_path, kind):
    from safetensors.torch import load_file

    from engine.checkpoint.convert import export_hf

    _, folder = checkpoints[kind]
    out = export_hf(folder, tmp_path / "out", max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").is_file()  # several shards
    theirs = load_file(folder / "model.safetensors")
    ours = {}
    for f in out.glob("model-*.safetensors"):
        ours.update(load_file(f))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())


def test_a_trained_checkpoint_exports_to_a_folder_transformers_loads_with_our_logits(checkpoints, tmp_path):
    """A DCP checkpoint as training writes it (model.* keys, the run config naming init_from) ->
    tools/convert_hf_checkpoint.py export -> JanusForConditionalGeneration.from_pretrained."""
    import torch.distributed.checkpoint as dcp
    from transformers import JanusForConditionalGeneration

    from launch import tool

    hf, folder = checkpoints["untied"]
    ours = engine.load_pretrained(folder)
    torch.manual_seed(4)
    with torch.no_grad():  # stands in for training: every trainable tensor moves
        for p in ours.omni.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ckpt = tmp_path / "step_00000001"
    dcp.save({"model": ours.omni.state_dict()}, checkpoint_id=str(ckpt), no_dist=True)
    (tmp_path / "run.yaml").write_text(f"model:\n  init_from: {folder}\ndata:\n  dataset: synthetic_omni\n")
    out = tmp_path / "exported"
    assert tool("convert_hf_checkpoint").main(["export", str(ckpt), str(out), "--config",
                                               str(tmp_path / "run.yaml")]) == 0
    exported = JanusForConditionalGeneration.from_pretrained(out).eval()
    ids, mask, px = understanding_inputs(6)
    g = torch.Generator().manual_seed(7)
    prompt, codes = torch.randint(0, 80, (1, 5), generator=g), torch.randint(0, 40, (1, CODES), generator=g)
    with torch.no_grad():
        want = exported(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        got = ours(ids, pixel_values=px, attention_mask=mask)
        before = hf(input_ids=ids, pixel_values=px, attention_mask=mask).logits
        assert (got - want)[mask.bool()].abs().max() < 1e-4
        assert (before - want)[mask.bool()].abs().max() > 1e-3  # the exported weights are the trained ones
        emb = torch.cat([exported.get_input_embeddings()(prompt), exported.prepare_embeddings_for_image_generation(codes)], 1)
        hidden = exported.model.language_model(inputs_embeds=emb).last_hidden_state
        assert (exported.model.generation_head(hidden[:, 4:-1]) - ours.generation_logits(prompt, codes)).abs().max() < 1e-4


def test_the_adapter_maps_every_parameter_both_ways(checkpoints):
    from engine.checkpoint.adapters import ADAPTERS, adapter_for
    from engine.checkpoint.hf import MULTIMODAL_ARCHITECTURES, SUPPORTED_ARCHITECTURES
    from engine.checkpoint.janus import JanusFamily
    from engine.tensor_files import TensorFiles

    assert set(ADAPTERS) == set(SUPPORTED_ARCHITECTURES + MULTIMODAL_ARCHITECTURES)
    assert "JanusForConditionalGeneration" in MULTIMODAL_ARCHITECTURES
    for kind in ("tied", "untied"):
        _, folder = checkpoints[kind]
        ours = {n for n, _ in engine.load_pretrained(folder).omni.named_parameters()}
        names = TensorFiles.of(folder).keys()
        adapter = JanusFamily(tied=kind == "tied")
        assert {adapter.from_hf(k) for k in names} == ours
        assert {adapter.to_hf(n) for n in ours} == set(names)
    janus = adapter_for("JanusForConditionalGeneration")
    assert janus.to_hf("encoders.siglip.encoder.layers.1.self_attn.out_proj.weight") == \
        "model.vision_model.encoder.layers.1.self_attn.projection_layer.weight"


# ---- bad input ------------------------------------------------------------------------------
def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_a_missing_tensor_is_named_in_one_line(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    from engine.checkpoint.hf import HFCheckpointError

    _, folder = checkpoints["tied"]
    shutil.copytree(folder, tmp_path / "bad")
    tensors = load_file(tmp_path / "bad" / "model.safetensors")
    del tensors["model.aligner.fc1.bias"]
    save_file(tensors, tmp_path / "bad" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match=r"lacks 1 tensor\(s\) the model needs \(e\.g\. 'model\.aligner\.fc1"
                                                r"\.bias'\)") as e:
        engine.load_pretrained(tmp_path / "bad")
    _one_line(e)


def test_unsupported_architecture_and_incomplete_configs_are_one_line_errors(checkpoints, tmp_path):
    from engine.checkpoint.hf import HFCheckpointError

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    (tmp_path / "other" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="JanusForConditionalGeneration") as e:
        engine.load_pretrained(tmp_path / "other")
    _one_line(e)

    _, folder = checkpoints["tied"]
    for name, change in {"no_vq": lambda c: c.pop("vq_config"),
                         "mistral": lambda c: c["text_config"].update(model_type="mistral"),
                         "narrow": lambda c: c["vision_config"].update(projection_dim=16)}.items():
        shutil.copytree(folder, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        change(config)
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        with pytest.raises(HFCheckpointError) as e:
            engine.load_pretrained(tmp_path / name)
        assert {"no_vq": "needs its vq_config", "mistral": "'mistral' is not supported",
                "narrow": "vision_config.projection_dim=16 differs"}[name] in _one_line(e)


# ---- the example's data ---------------------------------------------------------------------
class _CharTokenizer:
    """Stands in for the sentencepiece tokenizer (no corpus needed): one id per character."""

    pad_id, eos_id = 0, 3

    def encode(self, text):
        return [4 + min(ord(c), 127) for c in text]


def test_omni_digits_feeds_the_siglip_part_whole_images(tmp_path):
    """janus_tiny.yaml's parts on an image-only omni-digits build: an image is one payload row
    [1, 1, 8, 8] (the digit resized, in [-1, 1]) behind 4 placeholders; a video is its images."""
    import numpy as np

    from engine.config import load_config
    from engine.models import part_layout
    from launch import ROOT
    from omni_datasets.omni_digits.build import BuildOptions, ensure_omni_digits, image_to_unit
    from omni_datasets.omni_digits.source import OmniDigitsData

    cfg = load_config(str(ROOT / "examples" / "configs" / "janus_tiny.yaml"))
    layout = part_layout(cfg.model)
    root = ensure_omni_digits(tmp_path, BuildOptions(images_per_class=2, voices=()))
    data = OmniDigitsData(root, _CharTokenizer(), (np.arange(3000) % 100 + 4).astype(np.int32), layout.parts,
                          layout.placeholders, layout.decoders, seq_len=256, seed=0)
    assert (data.vision, data.image_vq, data.vision_tokens) == ("siglip", "image_vq", 4)
    ph = layout.placeholders["siglip"]
    image = data.build_sample(data.spec_for("image", (1,)))
    px = image.payloads["siglip"][0]["pixel_values"]
    assert image.tokens.count(ph) == 4 and px.shape == (1, 1, 8, 8)
    assert torch.equal(px[0, 0], (image_to_unit(data.images[1].data, 8) - 0.5) / 0.5)
    video = data.build_sample(data.spec_for("video", (0, 2, 3)))
    frames = video.payloads["siglip"][0]["pixel_values"]
    assert video.tokens.count(ph) == 12 and frames.shape == (3, 1, 8, 8)
    assert torch.equal(frames[1], data.vision_payload((2,))["pixel_values"][0])
    batch = data.micro_batches(0, 2, 0, 1, 2)[0]
    assert batch.payloads["siglip"]["pixel_values"].shape[1:] == (1, 8, 8)
    assert int((batch.input_ids == ph).sum()) == 4 * batch.payloads["siglip"]["pixel_values"].shape[0]


# ---- parallel layouts -----------------------------------------------------------------------
@pytest.mark.slow
def test_the_example_trains_alike_on_one_process_and_dp2_sp2(tmp_path):
    """examples/configs/janus_tiny.yaml (siglip + LLaMA + image_vq, both parts unprojected) on the
    synthetic omni stream: the same losses on one process and on dp_shard=2 x sp_size=2."""
    from launch import ROOT, assert_close, train

    args = ["--data.dataset=synthetic_omni", "--data.plugins=[]", "--data.seq_len=64", "--data.global_batch_size=4",
            "--train.steps=3", "--checkpoint.enabled=false"]
    config = str(ROOT / "examples" / "configs" / "janus_tiny.yaml")
    ref = train(tmp_path / "one", 1, *args, config=config)
    got = train(tmp_path / "dp2sp2", 4, *args, "--parallel.sp_size=2", "--parallel.dp_shard=2", config=config)
    for key in ("loss", "loss_image_vq"):
        assert_close([r[key] for r in ref], [r[key] for r in got], rel=1e-5)
