"""Released Qwen2.5-Omni checkpoints in and out: a tiny transformers-saved
Qwen2_5OmniThinkerForConditionalGeneration (and a whole Qwen2_5OmniForConditionalGeneration with a
tiny talker and token2wav, whose thinker is the same) loads into our omni model (the
`qwen2_5_vision` and `qwen2_5_omni_audio` parts + M-RoPE backbone) and gives transformers'
logits for text, an image, videos at several seconds per grid, audio clips across chunk edges,
audio with an image or a video, and a video with its own audio interleaved
(use_audio_in_video=True), with TMRoPE positions; `model.init_from` alone composes and trains;
exports are bitwise round trips of each layout (a whole model's talker and token2wav copied
through) and a trained checkpoint exports to folders transformers loads with our logits."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

import engine
from test_qwen2_vl import END, IMAGE, RUN_CONFIG, START, VIDEO

AUDIO, AUDIO_START, AUDIO_END = 304, 305, 306
THINKER, WHOLE = "Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniForConditionalGeneration"
PPS, SPC = 4, 2  # position ids per second; seconds per chunk -> chunks of 8 time ids
MELS, N_WINDOW = 8, 5  # the audio tower runs chunks of 2 * n_window = 10 frames


def thinker_config():
    from transformers import Qwen2_5OmniThinkerConfig

    return Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=3, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=8,
                           fullatt_block_indexes=[1]),
        audio_config=dict(num_mel_bins=MELS, d_model=16, encoder_layers=2, encoder_attention_heads=2,
                          encoder_ffn_dim=32, output_dim=32, max_source_positions=30, n_window=N_WINDOW),
        audio_token_index=AUDIO, image_token_index=IMAGE, video_token_index=VIDEO, audio_start_token_id=AUDIO_START,
        audio_end_token_id=AUDIO_END, vision_start_token_id=START, vision_end_token_id=END,
        position_id_per_seconds=PPS, seconds_per_chunk=SPC)


def tiny_thinker(folder, seed: int = 0):
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config()).eval()
    with torch.no_grad():  # larger than the default init, so that mistakes show in the logits
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


def tiny_whole(folder, thinker):
    """A whole Qwen2.5-Omni (tiny talker and token2wav) whose thinker is `thinker`; with the
    speakers file transformers' from_pretrained wants."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    talker = dict(vocab_size=64, embedding_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                  audio_token_index=AUDIO, image_token_index=IMAGE, video_token_index=VIDEO,
                  vision_start_token_id=START, vision_end_token_id=END, audio_start_token_id=AUDIO_START,
                  audio_end_token_id=AUDIO_END, tts_codec_start_token_id=60, tts_codec_end_token_id=61,
                  tts_codec_pad_token_id=62, tts_codec_mask_token_id=63)
    token2wav = dict(
        dit_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, emb_dim=16,
                        enc_emb_dim=8, enc_dim=8, enc_channels=[8, 8, 8, 8, 24], enc_attention_channels=8,
                        enc_se_channels=8, num_embeds=64, mel_dim=8, look_ahead_layers=[0], look_backward_layers=[0]),
        bigvgan_config=dict(mel_dim=8, upsample_initial_channel=16, resblock_kernel_sizes=[3],
                            resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[2], upsample_kernel_sizes=[4]))
    cfg = Qwen2_5OmniConfig(thinker_config=thinker_config().to_dict(), talker_config=talker,
                            token2wav_config=token2wav)
    torch.manual_seed(1)
    model = Qwen2_5OmniForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.thinker.load_state_dict(thinker.state_dict())
    model.save_pretrained(folder)
    torch.save({}, folder / "spk_dict.pt")
    return model


def _nest(folder):
    """The thinker folder with transformers 5's in-memory tensor names (model.language_model.*,
    model.visual.*, model.audio_tower.*) instead of the released ones save_pretrained writes."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    assert any(k.startswith("model.layers.") for k in tensors) and any(k.startswith("audio_tower.") for k in tensors)
    renamed = {("model." + k) if k.startswith(("visual.", "audio_tower.")) else
               ("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v
               for k, v in tensors.items()}
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})


# ---- prompts as Qwen2_5OmniProcessor lays them out ------------------------------------------
def n_audio(frames: int) -> int:
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    return int(_get_feat_extract_output_lengths(torch.tensor(frames)))


def video_with_audio(grid, frames: int, secs: float) -> list[int]:
    """`<vision_bos><audio_bos>`, the video's and its audio's chunks alternating (the processor's
    own `get_chunked_index`), `<audio_eos><vision_eos>`."""
    from transformers import Qwen2_5OmniProcessor

    chunked = functools.partial(Qwen2_5OmniProcessor.get_chunked_index, None)
    t, h, w = grid
    times = np.broadcast_to(np.arange(t).reshape(-1, 1, 1), (t, h // 2, w // 2)).reshape(-1) * secs * PPS
    vc, ac = chunked(times, PPS * SPC), chunked(np.arange(n_audio(frames)), PPS * SPC)
    out = [START, AUDIO_START]
    for j in range(max(len(vc), len(ac))):
        out += [VIDEO] * (vc[j][1] - vc[j][0]) if j < len(vc) else []
        out += [AUDIO] * (ac[j][1] - ac[j][0]) if j < len(ac) else []
    return out + [AUDIO_END, END]


def row(parts, seed):
    """(ids, images, videos, seconds, audio frames) of one prompt: text lengths and media
    ("image", grid), ("video", grid, seconds per grid), ("audio", frames),
    ("video+audio", grid, frames, seconds per grid)."""
    ids, media = [], {"image": [], "video": [], "secs": [], "audio": []}
    g = torch.Generator().manual_seed(seed)
    for part in parts:
        if isinstance(part, int):
            ids += torch.randint(2, 290, (part,), generator=g).tolist()
            continue
        kind, *spec = part
        if kind == "image":
            ids += [START] + [IMAGE] * (np.prod(spec[0]) // 4) + [END]
            media["image"].append(spec[0])
        elif kind == "video":
            ids += [START] + [VIDEO] * (np.prod(spec[0]) // 4) + [END]
            media["video"].append(spec[0])
            media["secs"].append(spec[1])
        elif kind == "audio":
            ids += [AUDIO_START] + [AUDIO] * n_audio(spec[0]) + [AUDIO_END]
            media["audio"].append(spec[0])
        else:
            ids += video_with_audio(*spec)
            media["video"].append(spec[0])
            media["audio"].append(spec[1])
            media["secs"].append(spec[2])
    return ids, media


# rows of parts; True: use_audio_in_video
CASES = {
    "text": ([[7]], False),
    "image": ([[3, ("image", (1, 4, 6)), 5]], False),
    "videos_at_two_rates": ([[3, ("video", (4, 4, 4), 0.75), 2, ("video", (2, 4, 6), 2.0), 2]], False),
    "audio": ([[3, ("audio", 37), 4]], False),
    "two_audios": ([[2, ("audio", 23), 3, ("audio", 41), 2]], False),
    "audio_and_image": ([[2, ("audio", 23), 2, ("image", (1, 4, 4)), 3, ("audio", 12), 1]], False),
    "audio_and_video": ([[2, ("video", (2, 4, 4), 1.5), 2, ("audio", 30), 3]], False),
    "video_with_its_audio": ([[2, ("image", (1, 4, 4)), 2, ("video+audio", (4, 4, 4), 60, 2.0), 3]], True),
    "two_rows": ([[2, ("audio", 23), 2, ("image", (1, 4, 4)), 3],
                  [3, ("video+audio", (2, 4, 6), 50, 2.5), 2, ("image", (1, 2, 2)), 4]], True),
}


def hf_inputs(case):
    """Transformers' keyword arguments of a case: right-padded rows, loud garbage in the audio
    clips' padding frames (both models must ignore them)."""
    rows, in_video = CASES[case]
    built = [row(parts, seed=i + len(case)) for i, parts in enumerate(rows)]
    width = max(len(ids) for ids, _ in built)
    ids = torch.tensor([r + [0] * (width - len(r)) for r, _ in built])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in built])
    media = {k: [x for _, m in built for x in m[k]] for k in ("image", "video", "secs", "audio")}
    g = torch.Generator().manual_seed(7)
    kw = {"input_ids": ids, "attention_mask": mask}
    if media["image"]:
        n = sum(int(np.prod(x)) for x in media["image"])
        kw.update(pixel_values=torch.randn(n, 24, generator=g), image_grid_thw=torch.tensor(media["image"]))
    if media["video"]:
        n = sum(int(np.prod(x)) for x in media["video"])
        kw.update(pixel_values_videos=torch.randn(n, 24, generator=g), video_grid_thw=torch.tensor(media["video"]),
                  video_second_per_grid=torch.tensor(media["secs"]))
    if media["audio"]:
        lens = torch.tensor(media["audio"])
        frames = torch.arange(int(lens.max())) < lens[:, None]
        features = torch.randn(len(lens), MELS, int(lens.max()), generator=g)
        kw.update(input_features=torch.where(frames[:, None], features, 100.0),
                  feature_attention_mask=frames.long())
    if in_video:
        kw["use_audio_in_video"] = True
    return kw


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    thinker, nested, whole = (tmp_path_factory.mktemp(n) for n in ("thinker", "nested", "whole"))
    hf = tiny_thinker(thinker)
    tiny_thinker(nested)
    _nest(nested)
    tiny_whole(whole, hf)
    return hf, {"thinker": thinker, "nested": nested, "whole": whole}


@pytest.fixture(scope="module")
def loaded(checkpoints):
    _, folders = checkpoints
    return {name: engine.load_pretrained(folder) for name, folder in folders.items()}


def _valid(logits, kw):
    return logits[kw["attention_mask"].bool()]  # padded positions are compared nowhere


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(checkpoints, loaded, case):
    hf, _ = checkpoints
    kw = hf_inputs(case)
    hf.model.rope_deltas = None  # transformers keeps the last call's position offsets for generation
    with torch.no_grad():
        want = hf(**kw).logits
        for name, ours in loaded.items():
            got = ours(**kw)
            assert got.shape == want.shape
            assert (_valid(got, kw) - _valid(want, kw)).abs().max() < 1e-4, (name, (got - want).abs().max())


def test_the_test_inputs_reach_chunks_interleaving_and_time(checkpoints, loaded):
    """Guards the parity above against passing vacuously: clips run over several chunks of the
    audio tower, the video and its audio alternate chunk by chunk, and the seconds per grid and
    the time-aligned positions change the logits."""
    ours = loaded["thinker"]
    assert [e["name"] for e in ours.config.encoders] == ["qwen2_5_vision", "qwen2_5_omni_audio"]
    assert ours.media.tokens_per_second == PPS and ours.media.seconds_per_chunk == SPC
    kw = hf_inputs("video_with_its_audio")
    ids = kw["input_ids"][0].tolist()
    runs = [t for i, t in enumerate(ids) if t in (VIDEO, AUDIO) and (i == 0 or ids[i - 1] != t)]
    assert runs[:4] == [VIDEO, AUDIO, VIDEO, AUDIO]
    assert int(kw["feature_attention_mask"].sum(-1).max()) > 2 * N_WINDOW
    with torch.no_grad():
        base = ours(**kw)
        later = {**kw, "video_second_per_grid": torch.tensor([2.2])}  # frames at time ids 0, 8, 17, 26: same chunks
        assert (ours(**later) - base).abs().max() > 1e-3
        two = hf_inputs("videos_at_two_rates")
        assert (ours(**two) - ours(**{**two, "video_second_per_grid": torch.tensor([1.0, 1.0])})).abs().max() > 1e-3


def test_a_config_as_the_hub_writes_it(checkpoints, tmp_path):
    """The hub's Qwen2.5-Omni config.json: architecture `Qwen2_5OmniModel`, the text model's rope
    as `rope_scaling`, and a vision `tokens_per_second` that transformers ignores for the
    thinker's `position_id_per_seconds`."""
    import shutil

    hf, folders = checkpoints
    shutil.copytree(folders["whole"], tmp_path / "hub")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    text = config["thinker_config"]["text_config"]
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope["rope_theta"],
                rope_scaling={"mrope_section": rope["mrope_section"], "rope_type": "default", "type": "default"})
    config["thinker_config"]["vision_config"]["tokens_per_second"] = 2
    config["architectures"] = ["Qwen2_5OmniModel"]
    (tmp_path / "hub" / "config.json").write_text(json.dumps(config))
    ours = engine.load_pretrained(tmp_path / "hub")
    assert ours.media.tokens_per_second == PPS
    kw = hf_inputs("video_with_its_audio")
    hf.model.rope_deltas = None
    with torch.no_grad():
        assert (ours(**kw) - hf(**kw).logits).abs().max() < 1e-4


def test_a_clip_count_that_disagrees_with_the_tokens_is_one_line_error(loaded):
    kw = hf_inputs("audio")
    kw["input_features"] = torch.cat([kw["input_features"]] * 2)
    kw["feature_attention_mask"] = torch.cat([kw["feature_attention_mask"]] * 2)
    with pytest.raises(ValueError, match=r"2 audio\(s\) given but the rows' audio placeholder tokens \(id 304\) "
                                         r"hold 1"):
        loaded["thinker"](**kw)


def test_an_audio_width_other_than_the_text_width_is_one_line_error(checkpoints, tmp_path):
    import shutil

    from engine.checkpoint.hf import HFCheckpointError

    _, folders = checkpoints
    shutil.copytree(folders["whole"], tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["thinker_config"]["audio_config"]["output_dim"] = 48
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match=r"audio_config\.output_dim=48 differs from the text model's "
                                                r"hidden_size=32: fix config.json") as e:
        engine.load_pretrained(tmp_path / "bad")
    assert "\n" not in str(e.value)


def test_the_adapter_maps_every_parameter_both_ways(checkpoints, loaded):
    from engine.checkpoint.adapters import ADAPTERS, Qwen2VLAdapter, adapter_for
    from engine.checkpoint.hf import MULTIMODAL_ARCHITECTURES, SUPPORTED_ARCHITECTURES
    from engine.tensor_files import TensorFiles

    assert {THINKER, WHOLE, "Qwen2_5OmniModel"} <= set(MULTIMODAL_ARCHITECTURES)
    assert set(ADAPTERS) == set(SUPPORTED_ARCHITECTURES + MULTIMODAL_ARCHITECTURES)
    _, folders = checkpoints
    ours = {n for n, _ in loaded["thinker"].omni.named_parameters()}
    assert all(n.startswith(("backbone.", "encoders.qwen2_5_vision.", "encoders.qwen2_5_omni_audio.")) for n in ours)
    for name, arch, layout in (("thinker", THINKER, "released"), ("nested", THINKER, "nested"),
                               ("whole", WHOLE, "released")):
        names = set(TensorFiles.of(folders[name]).keys())
        adapter = Qwen2VLAdapter(layout, architecture=arch)
        mine = {k for k in names if adapter.from_hf(k) is not None}
        assert {adapter.from_hf(k) for k in mine} == ours
        assert {h for n in ours for h in adapter.hf_names(n)} == mine
        others = names - mine
        assert (others == set()) if name != "whole" else (
            others and all(k.startswith(("talker.", "token2wav.")) for k in others))
    qkv = "encoders.qwen2_5_vision.blocks.2.attn.qkv.bias"
    assert adapter_for(WHOLE).hf_names(qkv) == tuple(f"thinker.visual.blocks.2.attn.{x}.bias" for x in "qkv")
    assert adapter_for(THINKER).from_hf("visual.blocks.2.attn.k.bias") == qkv
    with pytest.raises(ValueError, match="stored as 3 tensors"):
        adapter_for(THINKER).to_hf(qkv)
    assert adapter_for(THINKER).to_hf("encoders.qwen2_5_omni_audio.layers.1.fc2.weight") == \
        "audio_tower.layers.1.fc2.weight"
    assert adapter_for(WHOLE).from_hf("talker.model.norm.weight") is None


# ---- training from the folder alone ------------------------------------------------------------
@pytest.fixture(scope="module")
def trainable(tmp_path_factory, checkpoints):
    """The whole tiny Qwen2.5-Omni folder with a ChatML tokenizer of its text ids, and conversations."""
    from omni_datasets.sft_text import make as sft

    _, folders = checkpoints
    texts = [" ".join(f"word{(i * 7 + j) % 97}" for j in range(30)) for i in range(200)]
    for name in ("thinker", "whole"):
        sft.make_tokenizer(folders[name], texts, vocab_size=296)
    root = tmp_path_factory.mktemp("qwen2_5_omni_run")
    sft.write_rows(sft.conversations(texts, 120), root / "conversations.jsonl")
    (root / "run.yaml").write_text(RUN_CONFIG)
    return folders, root


@pytest.fixture(scope="module")
def trained(trainable, tmp_path_factory):
    """3 steps from model.init_from = the whole model's folder alone (no model keys), with a
    checkpoint at the end."""
    from launch import train

    folders, root = trainable
    out = tmp_path_factory.mktemp("trained")
    records = train(out / "run", 1, f"--model.init_from={folders['whole']}",
                    f"--data.path={root / 'conversations.jsonl'}", f"--data.cache_dir={out / 'cache'}",
                    "--checkpoint.interval=0", config=str(root / "run.yaml"))
    return records, next((out / "run" / "checkpoints").glob("step_*"))


def test_init_from_alone_composes_the_model_and_trains(trained):
    from engine.checkpoint import DCPSource

    records, checkpoint = trained
    assert len(records) == 3 and records[-1]["loss"] < records[0]["loss"]
    model = DCPSource(checkpoint).saved_config().model
    assert [e["name"] for e in model.encoders] == ["qwen2_5_vision", "qwen2_5_omni_audio"]
    assert [e["placeholder"] for e in model.encoders] == [IMAGE, AUDIO] and model.mrope_section == [1, 1, 2]


def test_each_fsdp_rank_reads_only_its_rows(trainable, tmp_path):
    """One process pretending to be rank 0 of 2 (fake backend) reads about half the bytes: the
    vision tower's q, k, v too (only their rows in its shard of our attn.qkv)."""
    import re
    import subprocess
    import sys

    from launch import ROOT

    folders, root = trainable
    full = sum(f.stat().st_size for f in folders["thinker"].glob("*.safetensors")) / 1e6
    cmd = [sys.executable, str(ROOT / "pretrain_omni.py"), "--config", str(root / "run.yaml"),
           f"--model.init_from={folders['thinker']}", f"--data.path={root / 'conversations.jsonl'}",
           f"--data.cache_dir={tmp_path / 'cache'}", f"--train.output_dir={tmp_path / 'run'}", "--train.steps=1",
           "--parallel.backend=fake", "--parallel.fake_world_size=2", "--train.progress_bar=false",
           "--checkpoint.enabled=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = float(re.search(r"this rank read ([0-9.]+) MB", proc.stderr).group(1))
    assert 0.4 * full < read < 0.6 * full, (read, full)


def test_stacked_rows_are_read_piece_by_piece(checkpoints):
    """Rows of our attn.qkv across the q / k / v boundaries equal those of the whole tensor."""
    from engine.checkpoint.qwen2_vl import _read
    from engine.tensor_files import TensorFiles

    _, folders = checkpoints
    files = TensorFiles.of(folders["whole"])
    keys = [f"thinker.visual.blocks.0.attn.{x}.weight" for x in "qkv"]
    whole = _read(files, keys)
    assert whole.shape == (48, 16)
    for rows in ((0, 16), (5, 37), (16, 48), (30, 31), (48, 48), (0, 48)):
        assert torch.equal(_read(files, keys, rows), whole[rows[0]:rows[1]]), rows


@pytest.mark.slow
def test_one_process_equals_dp2_sp2(trainable, tmp_path):
    from launch import assert_close, losses, train

    folders, root = trainable
    args = [f"--model.init_from={folders['thinker']}", f"--data.path={root / 'conversations.jsonl'}",
            f"--data.cache_dir={tmp_path / 'cache'}"]
    ref = train(tmp_path / "one", 1, *args, config=str(root / "run.yaml"))
    got = train(tmp_path / "dp2sp2", 4, *args, "--parallel.sp_size=2", "--parallel.dp_shard=2",
                config=str(root / "run.yaml"))
    assert_close(losses(ref), losses(got), rel=1e-5)


# ---- export ---------------------------------------------------------------------------------
def test_release_to_release_round_trip_is_bitwise(checkpoints, tmp_path):
    """Each layout written in its own naming; a whole model's talker and token2wav copied through,
    so that transformers loads the whole model back (with the speakers file)."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5OmniForConditionalGeneration

    from engine.checkpoint.convert import export_hf

    hf, folders = checkpoints
    for name, folder in folders.items():
        out = export_hf(folder, tmp_path / name, max_shard_size=40_000)
        assert (out / "model.safetensors.index.json").is_file()  # several shards
        theirs = load_file(folder / "model.safetensors")
        ours = {}
        for f in out.glob("model-*.safetensors"):
            ours.update(load_file(f))
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs), name
        assert json.loads((out / "config.json").read_text()) == json.loads((folder / "config.json").read_text())
    assert (tmp_path / "whole" / "spk_dict.pt").is_file()
    whole = Qwen2_5OmniForConditionalGeneration.from_pretrained(tmp_path / "whole").eval()
    kw = hf_inputs("audio_and_image")
    with torch.no_grad():
        assert torch.equal(whole.thinker(**kw).logits, hf(**kw).logits)


def test_trained_checkpoint_exports_to_folders_transformers_loads_with_our_logits(trainable, trained, loaded,
                                                                                  tmp_path):
    """The run started from the whole model: exported as it (transformers' whole model loads it,
    talker and token2wav as released), and in the thinker's layout."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    from engine.checkpoint import qwen2_vl
    from engine.checkpoint.convert import export_hf

    folders, _ = trainable
    whole = export_hf(trained[1], tmp_path / "whole")
    assert (whole / "tokenizer.json").is_file() and (whole / "spk_dict.pt").is_file()
    released = load_file(folders["whole"] / "model.safetensors")
    exported = load_file(whole / "model.safetensors")
    assert exported.keys() == released.keys()
    assert all(torch.equal(exported[k], released[k]) for k in released if not k.startswith("thinker."))
    thinker = qwen2_vl.export(trained[1], tmp_path / "thinker", release=folders["thinker"])
    models = {"whole": Qwen2_5OmniForConditionalGeneration.from_pretrained(whole).thinker.eval(),
              "thinker": Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(thinker).eval()}
    ours = {"whole": engine.load_pretrained(whole), "thinker": engine.load_pretrained(thinker)}
    for case in ("audio_and_image", "video_with_its_audio"):
        kw = hf_inputs(case)
        with torch.no_grad():
            before = loaded["thinker"](**kw)
            for name, hf in models.items():
                hf.model.rope_deltas = None
                want, got = hf(**kw).logits, ours[name](**kw)
                assert (got - want).abs().max() < 1e-4, (case, name, (got - want).abs().max())
                assert (got - before).abs().max() > 1e-4  # the exported weights are the trained ones
