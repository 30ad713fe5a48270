"""Released Qwen2-VL checkpoints in: a tiny transformers-saved Qwen2VLForConditionalGeneration
loads whole into our omni model (vision part + M-RoPE backbone) and gives transformers'
logits for text, images of several sizes, a video, and images with a video."""

from __future__ import annotations

import json

import pytest
import torch

import engine

IMAGE, VIDEO, START, END = 300, 301, 302, 303  # above a byte-level BPE's 259 minimum


def tiny_qwen2_vl(folder, flat: bool = False, seed: int = 0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=0, eos_token_id=1),
        vision_config=dict(depth=2, embed_dim=16, num_heads=2, hidden_size=32, patch_size=2, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than the default init, so that mistakes show in the logits
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    if flat:  # the config layout before transformers 5, with the in-memory tensor names
        _flatten(folder)
    return model


def _flatten(folder):
    from safetensors.torch import load_file, save_file

    config = json.loads((folder / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    config.update(text, rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
                  rope_theta=rope["rope_theta"], model_type="qwen2_vl")
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    # save_pretrained writes the released names (model.layers.*, visual.*): give this folder
    # transformers 5's in-memory names instead, so that both namings are read
    renamed = {("model.visual." + k[len("visual."):]) if k.startswith("visual.") else
               ("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v
               for k, v in tensors.items()}
    assert any(k.startswith("model.layers.") for k in tensors)
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})


def media(grid):
    t, h, w = grid
    return [START] + [IMAGE] * (t * h * w // 4) + [END]


def prompt(*parts):
    """Token ids as the processor writes them: text ids, and media spans per (kind, grid)."""
    ids = []
    g = torch.Generator().manual_seed(len(parts))
    for part in parts:
        if isinstance(part, int):
            ids += torch.randint(2, 290, (part,), generator=g).tolist()
        else:
            kind, grid = part
            span = media(grid)
            ids += [VIDEO if (kind == "video" and t == IMAGE) else t for t in span]
    return torch.tensor([ids])


def pixels(grids, seed):
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * 2 * 2, generator=torch.Generator().manual_seed(seed))


CASES = {
    "text": [7],
    "one_image": [3, ("image", (1, 4, 6)), 5],
    "images_of_two_sizes": [2, ("image", (1, 4, 4)), 3, ("image", (1, 6, 8)), 4],
    "video": [3, ("video", (3, 4, 4)), 2],
    "images_and_a_video": [2, ("image", (1, 4, 6)), 2, ("video", (2, 4, 4)), 1, ("image", (1, 2, 2)), 3],
}


def hf_inputs(case):
    parts = CASES[case]
    ids = prompt(*parts)
    images = [g for p in parts if not isinstance(p, int) and p[0] == "image" for g in [p[1]]]
    videos = [g for p in parts if not isinstance(p, int) and p[0] == "video" for g in [p[1]]]
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids),  # text 0, image 1, video 2 (the processor's)
          "mm_token_type_ids": (ids == IMAGE).long() + 2 * (ids == VIDEO).long()}
    if images:
        kw.update(pixel_values=pixels(images, 1), image_grid_thw=torch.tensor(images))
    if videos:
        kw.update(pixel_values_videos=pixels(videos, 2), video_grid_thw=torch.tensor(videos))
    return kw


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    nested, flat = tmp_path_factory.mktemp("nested"), tmp_path_factory.mktemp("flat")
    hf = tiny_qwen2_vl(nested)
    tiny_qwen2_vl(flat, flat=True)
    return hf, nested, flat


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(checkpoints, case):
    hf, nested, flat = checkpoints
    kw = hf_inputs(case)
    hf.model.rope_deltas = None  # transformers keeps the last call's position offsets for generation
    with torch.no_grad():
        want = hf(**kw).logits
        for folder in (nested, flat):
            got = engine.load_pretrained(folder)(**kw)
            assert got.shape == want.shape
            assert (got - want).abs().max() < 1e-4, (folder.name, (got - want).abs().max())


def test_a_media_count_that_disagrees_with_the_tokens_names_both(checkpoints):
    _, nested, _ = checkpoints
    kw = hf_inputs("one_image")  # 3 text, start, 6 image tokens (grid 1x4x6), end, 5 text
    keep = torch.ones(kw["input_ids"].shape[1], dtype=torch.bool)
    keep[5:7] = False  # lose two of the image's tokens
    kw = {k: (v[:, keep] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v) for k, v in kw.items()}
    with pytest.raises(ValueError, match=r"4 image placeholder tokens .* needs 6"):
        engine.load_pretrained(nested)(**kw)


def test_weights_that_disagree_with_the_config_name_the_tensor_and_both_shapes(checkpoints, tmp_path):
    import shutil

    from engine.checkpoint.hf import ShapeMismatchError

    _, nested, _ = checkpoints
    shutil.copytree(nested, tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 96
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError, match=r"tensor 'model\.layers\.0\.mlp\..*' .* shape \((64, 32|32, 64)\) but "
                                                  r"the model expects \((96, 32|32, 96)\)"):
        engine.load_pretrained(tmp_path / "bad")


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"]}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="Qwen2VLForConditionalGeneration"):
        engine.load_pretrained(tmp_path)


# ---- training from the folder alone ------------------------------------------------------------
RUN_CONFIG = """\
data:
  dataset: conversations
  seq_len: 256
  global_batch_size: 4
train:
  steps: 3
  lr: 1.0e-3
  warmup_steps: 1
  tensorboard: false
checkpoint:
  interval: 0
"""


@pytest.fixture(scope="module")
def trainable(tmp_path_factory, checkpoints):
    """The nested tiny Qwen2-VL folder with a ChatML tokenizer of its text ids, and conversations."""
    from omni_datasets.sft_text import make as sft

    _, nested, _ = checkpoints
    texts = [" ".join(f"word{(i * 7 + j) % 97}" for j in range(30)) for i in range(200)]
    sft.make_tokenizer(nested, texts, vocab_size=296)
    root = tmp_path_factory.mktemp("qwen2_vl_run")
    sft.write_rows(sft.conversations(texts, 120), root / "conversations.jsonl")
    (root / "run.yaml").write_text(RUN_CONFIG)
    return nested, root


@pytest.fixture(scope="module")
def trained(trainable, tmp_path_factory):
    """3 steps from model.init_from alone (no model keys), with a checkpoint at the end."""
    from launch import train

    folder, root = trainable
    out = tmp_path_factory.mktemp("trained")
    records = train(out / "run", 1, f"--model.init_from={folder}", f"--data.path={root / 'conversations.jsonl'}",
                    f"--data.cache_dir={out / 'cache'}", "--checkpoint.interval=0", config=str(root / "run.yaml"))
    return records, next((out / "run" / "checkpoints").glob("step_*"))


def test_init_from_alone_composes_the_model_and_trains(trained):
    records, _ = trained
    assert len(records) == 3 and records[-1]["loss"] < records[0]["loss"]


@pytest.mark.slow
def test_one_process_equals_dp2_sp2_async_and_hsdp(trainable, tmp_path):
    from launch import assert_close, losses, train

    folder, root = trainable
    args = [f"--model.init_from={folder}", f"--data.path={root / 'conversations.jsonl'}",
            f"--data.cache_dir={tmp_path / 'cache'}"]
    ref = train(tmp_path / "one", 1, *args, config=str(root / "run.yaml"))
    layouts = {"dp2sp2_async": ["--parallel.sp_size=2", "--parallel.dp_shard=2", "--parallel.sp_async=true"],
               "hsdp2x2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]}  # sync SP: the images test
    for name, layout in layouts.items():
        got = train(tmp_path / name, 4, *args, *layout, config=str(root / "run.yaml"))
        assert_close(losses(ref), losses(got), rel=1e-5)


# ---- export ---------------------------------------------------------------------------------
def test_release_to_release_round_trip_is_bitwise(checkpoints, tmp_path):
    from safetensors.torch import load_file

    from engine.checkpoint.convert import export_hf

    _, nested, _ = checkpoints
    out = export_hf(nested, tmp_path / "out", max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").is_file()  # several shards
    theirs = load_file(nested / "model.safetensors")
    ours = {}
    for f in out.glob("model-*.safetensors"):
        ours.update(load_file(f))
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_trained_checkpoint_exports_to_a_folder_transformers_loads_with_our_logits(trainable, trained, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from engine.checkpoint.convert import export_hf

    folder, _ = trainable
    out = export_hf(trained[1], tmp_path / "exported")
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    hf = Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    ours = engine.load_pretrained(out)
    before = engine.load_pretrained(folder)
    kw = hf_inputs("images_and_a_video")
    with torch.no_grad():
        want, got = hf(**kw).logits, ours(**kw)
        assert (got - want).abs().max() < 1e-4
        assert (got - before(**kw)).abs().max() > 1e-4  # the exported weights are the trained ones


@pytest.mark.slow
def test_images_with_mrope_train_alike_on_one_process_and_dp2_sp2(checkpoints, tmp_path):
    """Vision payloads and [3, B, S] positions (sliced along the sequence under Ulysses SP, sync)."""
    from launch import ROOT, assert_close, losses, train

    _, nested, _ = checkpoints
    (tmp_path / "run.yaml").write_text(RUN_CONFIG.replace("conversations", "qwen2_vl_images"))
    args = [f"--model.init_from={nested}", f"--data.plugins=[{ROOT / 'tests' / 'plugins' / 'qwen2_vl_images.py'}]",
            "--data.seq_len=64", "--train.steps=4"]
    ref = train(tmp_path / "one", 1, *args, config=str(tmp_path / "run.yaml"))
    got = train(tmp_path / "dp2sp2", 4, *args, "--parallel.sp_size=2", "--parallel.dp_shard=2",
                config=str(tmp_path / "run.yaml"))
    assert_close(losses(ref), losses(got), rel=1e-5)
    assert ref[-1]["loss"] < ref[0]["loss"]


def test_each_family_adapter_maps_every_parameter_both_ways(checkpoints):
    from engine.checkpoint.adapters import ADAPTERS, Qwen2VLAdapter, adapter_for
    from engine.checkpoint.hf import MULTIMODAL_ARCHITECTURES, SUPPORTED_ARCHITECTURES
    from engine.tensor_files import TensorFiles

    assert set(ADAPTERS) == set(SUPPORTED_ARCHITECTURES + MULTIMODAL_ARCHITECTURES)
    _, nested, flat = checkpoints
    ours = {n for n, _ in engine.load_pretrained(nested).omni.named_parameters()}
    for folder, layout in ((nested, "released"), (flat, "nested")):
        names = TensorFiles.of(folder).keys()
        adapter = Qwen2VLAdapter(layout)
        assert {adapter.from_hf(k) for k in names} == ours
        assert {adapter.to_hf(n) for n in ours} == set(names)
    text = adapter_for("Qwen2ForCausalLM")
    assert text.to_hf("blocks.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert text.from_hf(text.to_hf("norm.weight")) == "norm.weight" and text.from_hf("model.rotary_emb.inv_freq") is None


def test_each_fsdp_rank_reads_only_its_rows(trainable, tmp_path):
    """One process pretending to be rank 0 of 2 (fake backend): it reads about half the bytes."""
    import subprocess
    import sys

    from launch import ROOT

    folder, root = trainable
    full = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
    cmd = [sys.executable, str(ROOT / "pretrain_omni.py"), "--config", str(root / "run.yaml"),
           f"--model.init_from={folder}", f"--data.path={root / 'conversations.jsonl'}",
           f"--data.cache_dir={tmp_path / 'cache'}", f"--train.output_dir={tmp_path / 'run'}", "--train.steps=1",
           "--parallel.backend=fake", "--parallel.fake_world_size=2", "--train.progress_bar=false",
           "--checkpoint.enabled=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import re

    read = float(re.search(r"this rank read ([0-9.]+) MB", proc.stderr).group(1))
    assert 0.4 * full < read < 0.6 * full, (read, full)


def test_mrope_sections_that_do_not_fit_the_head_are_one_line_error(checkpoints, tmp_path):
    import shutil

    from engine.checkpoint.hf import HFCheckpointError

    _, nested, _ = checkpoints
    shutil.copytree(nested, tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match=r"mrope_section=\[2, 2, 2\] must be 3 bands summing to head_dim / 2 = 4"):
        engine.load_pretrained(tmp_path / "bad")
