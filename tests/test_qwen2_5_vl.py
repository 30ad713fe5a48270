"""Released Qwen2.5-VL checkpoints in and out, as Qwen2-VL's (tests/test_qwen2_vl.py, whose
prompts, pixels and run config are reused): a tiny transformers-saved
Qwen2_5_VLForConditionalGeneration loads whole into our omni model (the `qwen2_5_vision` part +
M-RoPE backbone) and gives transformers' logits for text, images of several sizes (window
attention over partial windows, a full-attention block), videos whose temporal positions are
spaced by tokens_per_second * second_per_grid_ts, and images with a video; `model.init_from`
alone composes and trains; a trained checkpoint exports to a folder transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

import engine
from test_qwen2_vl import END, IMAGE, RUN_CONFIG, START, VIDEO, _flatten, pixels, prompt

ARCH = "Qwen2_5_VLForConditionalGeneration"
TOKENS_PER_SECOND = 3  # 0.5 s per grid -> temporal steps of 1.5 (truncated: 0, 1, 3, ...); 2.0 s -> 6


def tiny_qwen2_5_vl(folder, flat: bool = False, seed: int = 0):
    """Windows of 8 pixels = 2 x 2 merge units: the test grids (up to 3 x 4 units) have several,
    partial ones at the edges; block 1 of 3 attends over whole images."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=0, eos_token_id=1),
        vision_config=dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=8,
                           fullatt_block_indexes=[1], tokens_per_second=TOKENS_PER_SECOND),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger than the default init, so that mistakes show in the logits
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    if flat:  # the config layout of the released Qwen2.5-VL folders, with the in-memory tensor names
        _flatten(folder)
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = config["vision_config"]["model_type"] = "qwen2_5_vl"  # as the hub's configs have it
        (folder / "config.json").write_text(json.dumps(config))
    return model


# parts: text lengths and (kind, grid); seconds: second_per_grid_ts of the videos (None: not passed)
CASES = {
    "text": ([7], None),
    "one_image": ([3, ("image", (1, 4, 6)), 5], None),
    "images_of_two_sizes": ([2, ("image", (1, 4, 4)), 3, ("image", (1, 6, 8)), 4], None),
    "video": ([3, ("video", (3, 4, 4)), 2], None),
    "videos_at_two_rates": ([3, ("video", (4, 4, 4)), 2, ("video", (3, 4, 6)), 2], [0.5, 2.0]),
    "images_and_a_video": ([2, ("image", (1, 4, 6)), 2, ("video", (2, 4, 4)), 1, ("image", (1, 2, 2)), 3], [1.5]),
}


def hf_inputs(case):
    parts, seconds = CASES[case]
    ids = prompt(*parts)
    grids = {kind: [p[1] for p in parts if not isinstance(p, int) and p[0] == kind] for kind in ("image", "video")}
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids),  # text 0, image 1, video 2 (the processor's)
          "mm_token_type_ids": (ids == IMAGE).long() + 2 * (ids == VIDEO).long()}
    if grids["image"]:
        kw.update(pixel_values=pixels(grids["image"], 1), image_grid_thw=torch.tensor(grids["image"]))
    if grids["video"]:
        kw.update(pixel_values_videos=pixels(grids["video"], 2), video_grid_thw=torch.tensor(grids["video"]))
    if seconds is not None:
        kw["second_per_grid_ts"] = torch.tensor(seconds)
    return kw


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    nested, flat = tmp_path_factory.mktemp("nested"), tmp_path_factory.mktemp("flat")
    hf = tiny_qwen2_5_vl(nested)
    tiny_qwen2_5_vl(flat, flat=True)
    return hf, nested, flat


@pytest.fixture(scope="module")
def loaded(checkpoints):
    _, nested, flat = checkpoints
    return {folder: engine.load_pretrained(folder) for folder in (nested, flat)}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(checkpoints, loaded, case):
    hf, _, _ = checkpoints
    kw = hf_inputs(case)
    hf.model.rope_deltas = None  # transformers keeps the last call's position offsets for generation
    with torch.no_grad():
        want = hf(**kw).logits
        for folder, ours in loaded.items():
            got = ours(**kw)
            assert got.shape == want.shape
            assert (got - want).abs().max() < 1e-4, (folder.name, (got - want).abs().max())


def test_the_test_inputs_reach_windows_and_the_temporal_rule(checkpoints, loaded):
    """Guards the parity above against passing vacuously: the spacing of video positions and the
    windowed blocks change the logits."""
    _, nested, _ = checkpoints
    ours = loaded[nested]
    spec = ours.config.encoders[0]
    assert spec["name"] == "qwen2_5_vision" and spec["tokens_per_second"] == TOKENS_PER_SECOND
    assert ours.media.tokens_per_second == TOKENS_PER_SECOND and ours.media.part == "qwen2_5_vision"
    kw = hf_inputs("videos_at_two_rates")
    part = ours.omni.part("qwen2_5_vision")
    with torch.no_grad():
        base = ours(**kw)
        assert (ours(**{**kw, "second_per_grid_ts": torch.tensor([1.0, 1.0])}) - base).abs().max() > 1e-3
        part.window_size = 64  # one window per input: every block attends over the whole frame
        try:
            wide = ours(**kw)
        finally:
            part.window_size = 8
        assert (wide - base).abs().max() > 1e-3


def test_flat_folder_is_what_transformers_reads(checkpoints, loaded):
    """The flat config and in-memory names: transformers' own reading of the folder agrees too."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, _, flat = checkpoints
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(flat).eval()
    kw = hf_inputs("images_and_a_video")
    with torch.no_grad():
        assert (loaded[flat](**kw) - hf(**kw).logits).abs().max() < 1e-4


def test_an_out_hidden_size_other_than_the_text_width_is_one_line_error(checkpoints, tmp_path):
    import shutil

    from engine.checkpoint.hf import HFCheckpointError

    _, nested, _ = checkpoints
    shutil.copytree(nested, tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["vision_config"]["out_hidden_size"] = 48
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match=r"vision_config\.out_hidden_size=48 differs from the text model's "
                                                r"hidden_size=32: fix config.json") as e:
        engine.load_pretrained(tmp_path / "bad")
    assert "\n" not in str(e.value)


def test_a_media_count_that_disagrees_with_the_tokens_names_both(loaded, checkpoints):
    _, nested, _ = checkpoints
    kw = hf_inputs("videos_at_two_rates")
    kw["second_per_grid_ts"] = torch.tensor([0.5])  # one value for two videos
    with pytest.raises(ValueError, match=r"1 second_per_grid_ts values but video_grid_thw has 2 videos"):
        loaded[nested](**kw)


# ---- training from the folder alone ------------------------------------------------------------
@pytest.fixture(scope="module")
def trainable(tmp_path_factory, checkpoints):
    """The nested tiny Qwen2.5-VL folder with a ChatML tokenizer of its text ids, and conversations."""
    from omni_datasets.sft_text import make as sft

    _, nested, _ = checkpoints
    texts = [" ".join(f"word{(i * 7 + j) % 97}" for j in range(30)) for i in range(200)]
    sft.make_tokenizer(nested, texts, vocab_size=296)
    root = tmp_path_factory.mktemp("qwen2_5_vl_run")
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
    from engine.checkpoint import DCPSource

    records, checkpoint = trained
    assert len(records) == 3 and records[-1]["loss"] < records[0]["loss"]
    model = DCPSource(checkpoint).saved_config().model
    assert [e["name"] for e in model.encoders] == ["qwen2_5_vision"] and model.mrope_section == [1, 1, 2]


@pytest.mark.slow
def test_one_process_equals_dp2_sp2_sync_and_async(trainable, tmp_path):
    from launch import assert_close, losses, train

    folder, root = trainable
    args = [f"--model.init_from={folder}", f"--data.path={root / 'conversations.jsonl'}",
            f"--data.cache_dir={tmp_path / 'cache'}"]
    ref = train(tmp_path / "one", 1, *args, config=str(root / "run.yaml"))
    for name, sp_async in (("dp2sp2", "false"), ("dp2sp2_async", "true")):
        got = train(tmp_path / name, 4, *args, "--parallel.sp_size=2", "--parallel.dp_shard=2",
                    f"--parallel.sp_async={sp_async}", config=str(root / "run.yaml"))
        assert_close(losses(ref), losses(got), rel=1e-5)


def test_each_fsdp_rank_reads_only_its_rows(trainable, tmp_path):
    """One process pretending to be rank 0 of 2 (fake backend): it reads about half the bytes."""
    import re
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
    read = float(re.search(r"this rank read ([0-9.]+) MB", proc.stderr).group(1))
    assert 0.4 * full < read < 0.6 * full, (read, full)


# ---- export ---------------------------------------------------------------------------------
def test_release_to_release_round_trip_is_bitwise(checkpoints, tmp_path):
    from safetensors.torch import load_file

    from engine.checkpoint.convert import export_hf

    _, nested, flat = checkpoints
    for folder in (nested, flat):  # each written in its own naming
        out = export_hf(folder, tmp_path / folder.name, max_shard_size=20_000)
        assert (out / "model.safetensors.index.json").is_file()  # several shards
        theirs = load_file(folder / "model.safetensors")
        ours = {}
        for f in out.glob("model-*.safetensors"):
            ours.update(load_file(f))
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
        assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())


def test_trained_checkpoint_exports_to_a_folder_transformers_loads_with_our_logits(trainable, trained, loaded,
                                                                                   tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from engine.checkpoint.convert import export_hf

    folder, _ = trainable
    out = export_hf(trained[1], tmp_path / "exported")
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    ours = engine.load_pretrained(out)
    for case in ("images_and_a_video", "videos_at_two_rates"):
        kw = hf_inputs(case)
        hf.model.rope_deltas = None
        with torch.no_grad():
            want, got = hf(**kw).logits, ours(**kw)
            assert (got - want).abs().max() < 1e-4, (case, (got - want).abs().max())
            assert (got - loaded[folder](**kw)).abs().max() > 1e-4  # the exported weights are the trained ones


def test_the_adapter_maps_every_parameter_both_ways(checkpoints, loaded):
    from engine.checkpoint.adapters import ADAPTERS, Qwen2VLAdapter, adapter_for
    from engine.checkpoint.hf import MULTIMODAL_ARCHITECTURES, SUPPORTED_ARCHITECTURES
    from engine.tensor_files import TensorFiles

    assert ARCH in MULTIMODAL_ARCHITECTURES and set(ADAPTERS) == set(SUPPORTED_ARCHITECTURES + MULTIMODAL_ARCHITECTURES)
    assert adapter_for(ARCH).architectures == (ARCH,)
    _, nested, flat = checkpoints
    ours = {n for n, _ in loaded[nested].omni.named_parameters()}
    assert all(n.startswith(("backbone.", "encoders.qwen2_5_vision.")) for n in ours)
    for folder, layout in ((nested, "released"), (flat, "nested")):
        names = TensorFiles.of(folder).keys()
        adapter = Qwen2VLAdapter(layout, architecture=ARCH)
        assert {adapter.from_hf(k) for k in names} == ours
        assert {adapter.to_hf(n) for n in ours} == set(names)
    assert adapter_for(ARCH).to_hf("encoders.qwen2_5_vision.blocks.0.mlp.gate_proj.weight") == \
        "visual.blocks.0.mlp.gate_proj.weight"
