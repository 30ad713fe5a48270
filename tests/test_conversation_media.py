"""Media inside conversations (engine/data/conversation_media.py): ids expanded as Qwen2-VL's
processor expands them, the sentinel path for tokenizers without media tokens, lengths from
headers, bad media skipped by reason or a strict one-line error, and training on images, clips
and videos alike on 1 process, FSDP 2 and SP 2.

Reference for the expanded ids (transformers 5.24 without torchvision, where `Qwen2VLProcessor`
cannot be built: its constructor looks the video processor class up): the tokenizer's own
`apply_chat_template`, grids from `Qwen2VLImageProcessorPil`, each media token replaced in order
by `Qwen2VLProcessor.replace_image_token` / `replace_video_token` (the processor's own expansion
rule), then the tokenizer. Video grids themselves are checked against transformers' sampling in
tests/test_media.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import engine

from launch import assert_close, losses, train

av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")
pytest.importorskip("transformers")
from PIL import Image

from engine.config import ConfigError, load_config, parse_overrides
from engine.data import build_train_data
from engine.data.chat import ChatTemplate, load_chat_template, special_tokens
from engine.data.errors import DataError
from engine.data.conversation_media import MediaPlan, encode_media_conversation
from engine.data.media import AudioRule, VisionRule
from engine.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _write_video(path: Path, frames: int, side: int = 16, fps: int = 2) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for k in range(frames):
            frame = np.repeat(_picture(side, side, 50 + k)[:, :, None], 3, axis=2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tokenizer with Qwen2-VL's template and media tokens, media files, and conversations."""
    from omni_datasets.omni_digits.conversations import make_backbone

    root = tmp_path_factory.mktemp("media_conversations")
    texts = ["which digit is this what number is spoken which digits are shown " * 4,
             "seven three five one two nine zero yes no"] * 40
    ids = make_backbone(root / "backbone", texts, seed=0)
    media = root / "media"
    media.mkdir()
    for k, (h, w) in enumerate([(16, 16), (24, 16), (16, 32), (8, 8)]):
        Image.fromarray(_picture(h, w, k)).save(media / f"img{k}.png")
    rng = np.random.default_rng(0)
    for k, n in enumerate([8000, 12000, 4000]):
        sf.write(media / f"clip{k}.wav", (rng.standard_normal(n) * 3000).astype(np.int16), 16000)
    sf.write(media / "clip3.flac", (rng.standard_normal(9000) * 3000).astype(np.int16), 16000)
    for k, n in enumerate([4, 6]):
        _write_video(media / f"vid{k}.mp4", n)
    rows = []
    for k in range(48):
        kind = ("image", "audio", "video", "image+audio")[k % 4]
        if kind == "image":
            content = [{"type": "image", "image": f"media/img{k % 4}.png"}, {"type": "text", "text": "Which digit is this?"}]
        elif kind == "audio":
            clip = f"media/clip{k % 4}.{'flac' if k % 4 == 3 else 'wav'}"
            content = [{"type": "audio", "audio": clip}, {"type": "text", "text": "What number is spoken?"}]
        elif kind == "video":
            content = [{"type": "text", "text": "Which digits are shown?"}, {"type": "video", "video": f"media/vid{k % 2}.mp4"}]
        else:
            content = [{"type": "image", "image": f"media/img{k % 3}.png"}, {"type": "audio", "audio": "media/clip0.wav"},
                       {"type": "text", "text": "Is it the digit shown?"}]
        rows.append({"messages": [{"role": "user", "content": content},
                                  {"role": "assistant", "content": ("seven", "three five", "one two", "yes")[k % 4]}]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, ids


def _config(root: Path, ids: dict, *extra: str) -> Path:
    text = f"""
model:
  vocab_size: 512
  hidden_size: 64
  intermediate_size: 128
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  encoders:
    - {{name: vision, depth: 1, embed_dim: 32, num_heads: 2, hidden_size: 64, patch_size: 4, in_channels: 1,
       placeholder: {ids['<|image_pad|>']}}}
    - {{name: audio, num_mel_bins: 40, d_model: 32, encoder_layers: 1, encoder_attention_heads: 2,
       encoder_ffn_dim: 64, max_source_positions: 100, pool_stride: 4, placeholder: {ids['<|audio_pad|>']}}}
data:
  dataset: conversations
  tokenizer: {root / 'backbone'}
  path: {root / 'train.jsonl'}
  cache_dir: {root / 'cache'}
  seq_len: 192
  global_batch_size: 4
  min_pixels: 64
  max_pixels: 512
train:
  steps: 4
  lr: 2.0e-3
  warmup_steps: 1
  tensorboard: false
checkpoint:
  interval: 0
"""
    path = root / "run.yaml"
    path.write_text(text)
    return path


def _load(path: Path, *overrides: str):
    return load_config(str(path), parse_overrides(list(overrides))[1])


def _plan(ids: dict, rule: VisionRule) -> MediaPlan:
    return MediaPlan(parts=(("image", "vision"), ("video", "vision")), placeholders=(("vision", 500),),
                     native=(("image", ids["<|image_pad|>"]), ("video", ids["<|video_pad|>"])), vision=rule)


def test_expanded_ids_equal_the_qwen2_vl_processors(folder):
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    root, ids = folder
    rule = VisionRule(patch_size=4, merge_size=2, in_channels=1, image_mean=(0.5,), image_std=(0.5,),
                      min_pixels=64, max_pixels=512, video_min_pixels=64, video_max_pixels=512)
    hf_tok = AutoTokenizer.from_pretrained(root / "backbone")
    images = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,  # grids only: RGB is fine
                                      size={"shortest_edge": 64, "longest_edge": 512})
    processor = types.SimpleNamespace(image_processor=images, video_processor=types.SimpleNamespace(merge_size=2),
                                      image_token="<|image_pad|>", video_token="<|video_pad|>")
    ours_tok = load_tokenizer(str(root / "backbone"))
    template = ChatTemplate(load_chat_template(root / "backbone"), special_tokens(root / "backbone"))
    messages = [
        {"role": "system", "content": "You read digits."},
        {"role": "user", "content": [{"type": "image", "image": "media/img1.png"}, {"type": "text", "text": "and"},
                                     {"type": "video", "video": "media/vid1.mp4"},
                                     {"type": "image", "image": "media/img2.png"}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": "one two"},
        {"role": "user", "content": [{"type": "image", "image": "media/img3.png"}]},
        {"role": "assistant", "content": "nine"},
    ]
    ours, mask, refs = encode_media_conversation(ours_tok, template, messages, _plan(ids, rule), root)

    text = hf_tok.apply_chat_template(messages, tokenize=False)
    image_grids = images([str(root / "media" / f"img{k}.png") for k in (1, 2, 3)])["image_grid_thw"]
    video_grid = [r["grid"] for r in refs if r["type"] == "video"]
    expanded, k_img, k_vid = "", 0, 0
    for piece in text.split("<|vision_start|>"):  # each media token, in order, by the processor's own rule
        if piece.startswith("<|image_pad|>"):
            piece = Qwen2VLProcessor.replace_image_token(processor, {"image_grid_thw": image_grids}, k_img) + piece[13:]
            k_img += 1
        elif piece.startswith("<|video_pad|>"):
            piece = Qwen2VLProcessor.replace_video_token(processor, {"video_grid_thw": torch.tensor(video_grid)},
                                                         k_vid) + piece[13:]
            k_vid += 1
        expanded += ("<|vision_start|>" if expanded or text.startswith("<|vision_start|>") else "") + piece
    reference = hf_tok(expanded, add_special_tokens=False)["input_ids"]
    assert (k_img, k_vid) == (3, 1)
    assert ours == reference
    assert [r["grid"] for r in refs if r["type"] == "image"] == image_grids.tolist()
    media_ids = {ids["<|image_pad|>"], ids["<|video_pad|>"]}
    assert not any(m for t, m in zip(ours, mask) if t in media_ids), "placeholders are never targets"
    answers = [t for t, m in zip(ours, mask) if m]
    assert hf_tok.decode(answers) == "one two<|im_end|>nine<|im_end|>"


def test_tokenizers_without_media_tokens_get_the_parts_placeholders(folder, tmp_path):
    from omni_datasets.sft_text import make as sft

    root, _ = folder
    sft.make_tokenizer(tmp_path, ["which digit is this seven three"] * 50, vocab_size=300)
    tok = load_tokenizer(str(tmp_path))
    template = ChatTemplate(load_chat_template(tmp_path), special_tokens(tmp_path))
    rule = VisionRule(patch_size=4, merge_size=2, in_channels=1, image_mean=(0.5,), image_std=(0.5,),
                      min_pixels=64, max_pixels=512)
    plan = MediaPlan(parts=(("image", "vision"),), placeholders=(("vision", 511),), native=(), vision=rule)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which digit"},
                                             {"type": "image", "image": "media/img0.png"},
                                             {"type": "text", "text": " is this?"}]},
                {"role": "assistant", "content": "seven"}]
    ids, mask, refs = encode_media_conversation(tok, template, messages, plan, root)
    at = ids.index(511)
    n = refs[0]["tokens"]
    assert n == 4 and ids[at:at + n] == [511] * n and ids.count(511) == n
    text_only = [{"role": "user", "content": "Which digit is this?"}, {"role": "assistant", "content": "seven"}]
    plain, plain_mask = encode_conversation_ids(tok, template, text_only)
    assert ids[:at] == plain[:at], "the text before the image tokenises as it would alone"
    assert [t for t, m in zip(ids, mask) if m] == [t for t, m in zip(plain, plain_mask) if m]


def encode_conversation_ids(tok, template, messages):
    from engine.data.chat import encode_conversation

    return encode_conversation(tok, template, messages)


def test_lengths_come_from_headers_and_equal_the_decoded_samples(folder):
    root, ids = folder
    cfg = _load(_config(root, ids))
    data = build_train_data(cfg)
    source = data.sources[0]
    assert len(source) == 48 and not data.skipped_counts()
    for i in range(12):
        sample = source.sample(i)
        assert len(sample) == source.length(i)
        found = {ph: sum(t == ph for t in sample.tokens) for ph in (ids["<|image_pad|>"], ids["<|audio_pad|>"])}
        need = {ids["<|image_pad|>"]: sum(int(p["grid_thw"].prod()) // 4 for p in sample.payloads.get("vision", [])),
                ids["<|audio_pad|>"]: sum(int(((p["feature_lens"] - 1) // 2 + 1) // 4) for p in
                                          sample.payloads.get("audio", []))}
        assert found == need and sum(need.values()) > 0
    assert ids["<|video_pad|>"] not in {t for i in range(12) for t in source.sample(i).tokens}, \
        "video pads reach the model as the vision part's placeholder"


BAD_ROWS = [
    ("missing", {"type": "image", "image": "media/nope.png"}),
    ("corrupt", {"type": "image", "image": "bad/garbage.png"}),
    ("unsupported", {"type": "image", "image": "bad/notes.txt"}),
    ("empty_audio", {"type": "audio", "audio": "bad/empty.wav"}),
    ("no_frames", {"type": "video", "video": "bad/noframes.mp4"}),
    ("too_long", {"type": "audio", "audio": "bad/long.wav"}),
]


def _bad_media(root: Path) -> None:
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (bad / "notes.txt").write_text("not an image")
    sf.write(bad / "empty.wav", np.zeros(0, np.int16), 16000)
    sf.write(bad / "long.wav", np.zeros(16000 * 3, np.int16), 16000)  # 300 frames > the part's 200
    with av.open(str(bad / "noframes.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=2)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # a header and no frame


def test_bad_media_is_skipped_by_reason_or_a_strict_one_line_error(folder, tmp_path):
    root, ids = folder
    _bad_media(root)
    good = json.loads((root / "train.jsonl").read_text().splitlines()[0])
    rows = [good] + [{"messages": [{"role": "user", "content": [part, {"type": "text", "text": "?"}]},
                                   {"role": "assistant", "content": "seven"}]} for _, part in BAD_ROWS]
    data_file = root / "bad.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _load(_config(root, ids), f"--data.path={data_file}", f"--data.cache_dir={tmp_path / 'c'}")
    data = build_train_data(cfg)
    assert data.skipped_counts() == {reason: 1 for reason, _ in BAD_ROWS}
    assert len(data.sources[0]) == 1

    for line, (reason, part) in enumerate(BAD_ROWS, start=2):
        one = root / f"strict_{reason}.jsonl"
        one.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[line - 1]) + "\n")
        strict = _load(root / "run.yaml", f"--data.path={one}", f"--data.cache_dir={tmp_path / reason}",
                       "--data.strict=true")
        with pytest.raises(DataError) as error:
            build_train_data(strict)
        message = str(error.value)
        assert "\n" not in message and f"{one}:2" in message and Path(part[part["type"]]).name in message, message

    # the entry point: exit code 2 and the one line, no traceback
    run = subprocess.run([sys.executable, str(ROOT / "pretrain_omni.py"), "--config", str(root / "run.yaml"),
                          f"--data.path={one}", f"--data.cache_dir={tmp_path / 's'}", "--data.strict=true",
                          f"--train.output_dir={tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert [ln for ln in run.stderr.splitlines() if ln.startswith("error:")] == [f"error: {message}"]


def test_a_file_that_changes_after_preparing_drops_its_sample(folder, tmp_path):
    root, ids = folder
    copy = tmp_path / "media"
    copy.mkdir()
    Image.fromarray(_picture(16, 16, 0)).save(copy / "img.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "media/img.png"}]},
                        {"role": "assistant", "content": "seven"}]}
    text = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "seven"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(text) + "\n")
    cfg = _load(_config(root, ids), f"--data.path={tmp_path / 'd.jsonl'}", f"--data.cache_dir={tmp_path / 'c'}")
    data = build_train_data(cfg)
    Image.fromarray(_picture(8, 24, 0)).save(copy / "img.png")  # another size: other placeholder count
    batch = data.micro_batches(0, 4, 0, 1, 4)[0]
    assert set(data.skipped_counts()) == {"changed"} and data.skipped_counts()["changed"] >= 1
    assert (batch.labels != -100).any(), "the text sample still trains"
    assert "vision" not in batch.payloads


@pytest.mark.slow
def test_media_conversations_train_alike_on_one_process_fsdp2_and_sp2(folder, tmp_path):
    root, ids = folder
    config = str(_config(root, ids))
    base = ("--train.steps=4", f"--data.cache_dir={root / 'cache'}")
    one = losses(train(tmp_path / "one", 1, *base, config=config))
    fsdp = losses(train(tmp_path / "fsdp", 2, *base, config=config))
    sp = losses(train(tmp_path / "sp", 2, *base, "--parallel.sp_size=2", config=config))
    assert_close(fsdp, one, rel=1e-5)
    assert_close(sp, one, rel=1e-5)
    assert one[-1] < one[0]


def test_resuming_mid_epoch_gives_the_uninterrupted_batches(folder):
    root, ids = folder
    cfg = _load(_config(root, ids))
    straight = build_train_data(cfg)
    wanted = [straight.micro_batches(step, 4, 0, 1, 4)[0] for step in range(14)]  # 48 samples: past one epoch
    resumed = build_train_data(cfg)
    for step in (9, 13):
        got = resumed.micro_batches(step, 4, 0, 1, 4)[0]
        assert torch.equal(got.input_ids, wanted[step].input_ids) and torch.equal(got.labels, wanted[step].labels)
        for name, payload in wanted[step].payloads.items():
            for key, value in payload.items():
                assert torch.equal(got.payloads[name][key], value)


QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_released_qwen2_vl_reads_media_conversations_with_transformers_logits(folder, tmp_path):
    """The whole data path (template, expansion, decoding, M-RoPE, placeholders) into the model
    loaded from a Qwen2-VL folder gives the logits transformers gives for the same conversation,
    fed by its own image processor and its own expansion rule."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from engine.checkpoint.weights import compose_from_init_from
    from engine.data import PromptEncoder, pack_rows
    from test_qwen2_vl import IMAGE, VIDEO, tiny_qwen2_vl

    root, _ = folder
    qwen = tmp_path / "qwen2_vl"
    hf = tiny_qwen2_vl(qwen)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    words = [" ".join(f"word{(i * 7 + j) % 97}" for j in range(30)) for i in range(200)]  # enough merges for 300 ids
    tok.train_from_iterator(words, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert tok.add_special_tokens(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]) == 4
    assert tok.token_to_id("<|image_pad|>") == IMAGE and tok.token_to_id("<|video_pad|>") == VIDEO
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=QWEN2_VL_TEMPLATE).save_pretrained(qwen)
    color = tmp_path / "color.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(color)
    messages = [{"role": "user", "content": [{"type": "text", "text": "which digit"}, {"type": "image", "image": str(color)},
                                             {"type": "video", "video": str(root / "media" / "vid1.mp4")},
                                             {"type": "image", "image": "media/img1.png"}]},
                {"role": "assistant", "content": "this picture"}]

    cfg = _load(_config(root, {"<|image_pad|>": 0, "<|audio_pad|>": 0}), f"--model.init_from={qwen}",
                "--data.tokenizer=" + str(qwen), "--data.min_pixels=16", "--data.max_pixels=256")
    cfg.model.encoders, cfg.model.decoders = [], []
    cfg = compose_from_init_from(cfg)
    sample = PromptEncoder(cfg).sample(messages, root, add_generation_prompt=False)
    omni = engine.load_pretrained(str(qwen)).omni
    batch = pack_rows([[sample]], len(sample), 0, omni.ph, [], dict(omni.encoders))
    with torch.no_grad():
        ours = omni.text_logits(batch)

    hf_tok = AutoTokenizer.from_pretrained(qwen)
    images = Qwen2VLImageProcessorPil(patch_size=2, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 16, "longest_edge": 256})
    image_inputs = images([str(color), str(root / "media" / "img1.png")])
    video = sample.payloads["vision"][1]  # decoded by engine.data.media (parity in tests/test_media.py)
    text = hf_tok.apply_chat_template(messages, tokenize=False)
    for grid, token in [(image_inputs["image_grid_thw"][0], "<|image_pad|>"), (video["grid_thw"][0], "<|video_pad|>"),
                        (image_inputs["image_grid_thw"][1], "<|image_pad|>")]:
        text = text.replace(token, "\0" * (int(grid.prod()) // 4), 1)  # the processor's rule, one media at a time
    for token in ("<|image_pad|>", "<|video_pad|>"):
        assert token not in text
    kinds = iter(["<|image_pad|>"] * int(image_inputs["image_grid_thw"][0].prod() // 4)
                 + ["<|video_pad|>"] * int(video["grid_thw"][0].prod() // 4)
                 + ["<|image_pad|>"] * int(image_inputs["image_grid_thw"][1].prod() // 4))
    text = "".join(next(kinds) if ch == "\0" else ch for ch in text)
    ids = torch.tensor([hf_tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids),
                    mm_token_type_ids=(ids == IMAGE).long() + 2 * (ids == VIDEO).long(),
                    pixel_values=torch.as_tensor(image_inputs["pixel_values"]),
                    image_grid_thw=torch.as_tensor(image_inputs["image_grid_thw"]),
                    pixel_values_videos=video["pixel_values"], video_grid_thw=video["grid_thw"]).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4


# Qwen2.5-Omni's own chat template (its processor's chat_template, as transformers' tests carry it)
QWEN2_5_OMNI_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}{% set video_count = "
    "namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}{% for content in "
    "message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>{% elif content['type'] == 'audio' or 'audio' in content or "
    "'audio_url' in content %}{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio "
    "{{ audio_count.value }}: {% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>{% elif content['type'] == 'video' or "
    "'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
OMNI_SPECIALS = {"image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
                 "vision_eos_token": "<|vision_eos|>", "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
                 "audio_eos_token": "<|audio_eos|>"}


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    """(transformers' tiny Qwen2.5-Omni thinker (tests/test_qwen2_5_omni.py: 4 time ids per second,
    chunks of 2 s), its folder with a tokenizer of the media tokens and Qwen2.5-Omni's template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from test_qwen2_5_omni import AUDIO, AUDIO_START, tiny_thinker
    from test_qwen2_vl import IMAGE, START, VIDEO

    thinker = tmp_path_factory.mktemp("thinker")
    hf = tiny_thinker(thinker)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    words = [" ".join(f"word{(i * 7 + j) % 97}" for j in range(30)) for i in range(200)]
    tok.train_from_iterator(words, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    specials = list(OMNI_SPECIALS.values())
    tok.add_special_tokens(specials)
    assert [tok.token_to_id(t) for t in specials] == [IMAGE, VIDEO, START, START + 1, AUDIO, AUDIO_START,
                                                      AUDIO_START + 1]
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=QWEN2_5_OMNI_TEMPLATE, extra_special_tokens=OMNI_SPECIALS
                            ).save_pretrained(thinker)
    return hf, thinker


def _omni_prompts(root: Path, thinker: Path, *overrides: str):
    """The data path of a config whose model comes from the thinker folder alone."""
    from engine.checkpoint.weights import compose_from_init_from
    from engine.data import PromptEncoder

    cfg = _load(_config(root, {"<|image_pad|>": 0, "<|audio_pad|>": 0}), f"--model.init_from={thinker}",
                f"--data.tokenizer={thinker}", "--data.min_pixels=16", "--data.max_pixels=256", *overrides)
    cfg.model.encoders, cfg.model.decoders = [], []
    cfg = compose_from_init_from(cfg)
    assert cfg.model.seconds_per_chunk == 2
    return PromptEncoder(cfg)


def _omni_logits(thinker: Path, sample):
    """Our model loaded from the thinker folder on one packed sample."""
    from engine.data import pack_rows

    omni = engine.load_pretrained(str(thinker)).omni
    batch = pack_rows([[sample]], len(sample), 0, omni.ph, [], dict(omni.encoders))
    with torch.no_grad():
        return omni.text_logits(batch)


def _payloads(sample, kind: str) -> list:
    return sample.payloads.get(next((n for n in sample.payloads if kind in n), ""), [])


def _clip_features(clips: list) -> dict:
    """The thinker's audio keywords for our clips: right-padded features and their frame masks."""
    lens = torch.tensor([int(c["feature_lens"][0]) for c in clips])
    features = torch.zeros(len(clips), clips[0]["input_features"].shape[1], int(lens.max()))
    for k, c in enumerate(clips):
        features[k, :, :lens[k]] = c["input_features"][0]
    return {"input_features": features, "feature_attention_mask": (torch.arange(int(lens.max())) < lens[:, None]).long()}


def _assert_processor_features(clips: list, waves: list, features=None, mask=None) -> float:
    """Our clips' payloads are the Whisper features the processors give the thinker for `waves`
    (16 kHz): ceil(n / 160) frames of WhisperFeatureExtractor(padding="max_length",
    return_attention_mask=True), or the given processor output's `features` [clips, mel, 3000]
    and `mask` [clips, 3000]; returns the largest difference."""
    from transformers import WhisperFeatureExtractor

    from test_media import whisper_reference
    from test_qwen2_5_omni import MELS

    diff = 0.0
    for k, (clip, wave) in enumerate(zip(clips, waves, strict=True)):
        if features is None:
            ref = whisper_reference(WhisperFeatureExtractor(feature_size=MELS), wave)
        else:
            ref = features[k][:, mask[k].bool()].numpy()
        assert ref.shape[1] == -(-len(wave) // 160) == int(clip["feature_lens"][0]) == clip["input_features"].shape[2]
        diff = max(diff, float(np.abs(clip["input_features"][0].numpy() - ref).max()))
    assert diff < 5e-5, diff
    return diff


def test_a_released_qwen2_5_omni_thinker_reads_media_conversations_with_transformers_logits(folder, omni, tmp_path):
    """Image, clip and video (sampled at 1 fps: 1.5 s per temporal patch) through the data path into
    a model loaded from a Qwen2.5-Omni thinker folder: the data's TMRoPE positions, payloads and
    placeholders give the logits transformers' thinker gives for the same ids and media."""
    from test_qwen2_5_omni import AUDIO

    root, _ = folder
    hf, thinker = omni
    color = tmp_path / "color.png"
    Image.fromarray(np.random.default_rng(4).integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(color)
    clip = tmp_path / "clip.wav"
    # 4300 samples: 27 frames (not whole hops: ceil(4300 / 160), the processor's count), 7 tokens
    sf.write(clip, (np.random.default_rng(5).standard_normal(4300) * 3000).astype(np.int16), 16000)
    messages = [{"role": "user", "content": [{"type": "text", "text": "word1"}, {"type": "image", "image": str(color)},
                                             {"type": "audio", "audio": str(clip)},
                                             {"type": "video", "video": str(root / "media" / "vid1.mp4")}]},
                {"role": "assistant", "content": "word2 word3"}]

    prompts = _omni_prompts(root, thinker, "--data.video_fps=1")
    sample = prompts.sample(messages, root, add_generation_prompt=False)
    native, _, refs = encode_media_conversation(prompts.encoder.tokenizer, prompts.encoder.template, messages,
                                                prompts.spec.media, root, "all")
    video = next(r for r in refs if r["type"] == "video")
    assert video["seconds_per_grid"] == 1.5 and video["grid"][0] == 2
    _assert_processor_features(_payloads(sample, "audio"), [sf.read(clip, dtype="float32")[0]])
    assert native.count(AUDIO) == 7
    ours = _omni_logits(thinker, sample)

    ids = torch.tensor([native])
    vision = _payloads(sample, "vision")
    hf.model.rope_deltas = None
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids),
                    pixel_values=vision[0]["pixel_values"], image_grid_thw=vision[0]["grid_thw"],
                    pixel_values_videos=vision[1]["pixel_values"], video_grid_thw=vision[1]["grid_thw"],
                    video_second_per_grid=torch.tensor([video["seconds_per_grid"]]),
                    **_clip_features(_payloads(sample, "audio"))).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4


def _omni_processor(thinker: Path, videos: list):
    """transformers' Qwen2_5OmniProcessor of the thinker folder's tokenizer, Qwen2-VL's PIL image
    processor at the data's pixel bounds and a Whisper extractor. Its video processor needs
    torchvision, absent here: a stand-in returns `videos` (our decoded videos' payloads, frames
    sampled as tests/test_media.py checks against transformers' sampling)."""
    from transformers import AutoTokenizer, Qwen2_5OmniProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.video_processing_utils import BaseVideoProcessor

    from test_qwen2_5_omni import MELS

    class Videos(BaseVideoProcessor):
        temporal_patch_size, merge_size = 2, 2

        def __call__(self, given, **kwargs):
            assert len(given) == len(videos)
            return {"pixel_values_videos": torch.cat([v["pixel_values"] for v in videos]),
                    "video_grid_thw": torch.cat([v["grid_thw"] for v in videos])}

    class Processor(Qwen2_5OmniProcessor):
        def check_argument_for_proper_class(self, name, argument):  # the stand-in is no registered class
            return type(argument) if name == "video_processor" else super().check_argument_for_proper_class(
                name, argument)

    images = Qwen2VLImageProcessorPil(patch_size=2, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": 16, "longest_edge": 256})
    return Processor(image_processor=images, video_processor=Videos(), feature_extractor=WhisperFeatureExtractor(
        feature_size=MELS), tokenizer=AutoTokenizer.from_pretrained(thinker))


def _track(path: Path) -> np.ndarray:
    """The 16 kHz mono waveform `load_video_audio` computes its features from."""
    from engine.data import media

    samples, rate, _ = media._video_audio_samples(path, AudioRule())
    return media._mono_16k(path, samples, rate)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 on the processor's tensors
def test_a_video_with_its_audio_reads_as_qwen2_5_omnis_processor_and_thinker(folder, omni, tmp_path):
    """data.use_audio_in_video: an MP4 with frames and an AAC stereo track at 44.1 kHz, between a
    clip before it and one after it, next to an image, through the data path: the ids equal
    Qwen2_5OmniProcessor's with use_audio_in_video=True (5.24 names it load_audio_from_video: the
    video and its audio alternating every 2 s of time ids), the TMRoPE positions equal the
    thinker's get_rope_index, the audio part receives the clips and the track in the processor's
    order, and the logits equal the thinker's. A silent video is read alone, as the processor
    reads it (transformers' thinker: use_audio_in_video=False)."""
    from test_media import write_video_with_audio
    from test_qwen2_5_omni import AUDIO, SPC, PPS
    from test_qwen2_vl import VIDEO

    root, _ = folder
    hf, thinker = omni
    rng = np.random.default_rng(6)
    color = tmp_path / "color.png"
    Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(color)
    clips = [tmp_path / "before.wav", tmp_path / "after.wav"]
    # 3200 samples: 20 frames, whole hops; 4870: ceil(4870 / 160) = 31 frames, 8 tokens (30 frames: 7)
    for path, n in zip(clips, (3200, 4870)):
        sf.write(path, (rng.standard_normal(n) * 3000).astype(np.int16), 16000)
    talk = tmp_path / "talk.mp4"  # 8 frames at 2 fps, 4.0 s of audio: 400 frames, 100 tokens
    t = np.arange(176400) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.2 * np.sin(2 * np.pi * 660 * t)], -1)
    write_video_with_audio(talk, 8, 2, stereo + 0.02 * rng.standard_normal(stereo.shape), 44100, "aac")
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "word1"}, {"type": "audio", "audio": str(clips[0])},
        {"type": "image", "image": str(color)}, {"type": "video", "video": str(talk)},
        {"type": "text", "text": "word4"}, {"type": "audio", "audio": str(clips[1])}]},
        {"role": "assistant", "content": "word2 word3"}]

    with pytest.raises(ConfigError, match="data.use_audio_in_video"):
        _omni_prompts(root, thinker, "--data.use_audio_in_video=maybe")
    prompts = _omni_prompts(root, thinker, "--data.use_audio_in_video=true")
    assert prompts.spec.media.audio_in_video
    native, _, refs = encode_media_conversation(prompts.encoder.tokenizer, prompts.encoder.template, messages,
                                                prompts.spec.media, root, "all")
    sample = prompts.sample(messages, root, add_generation_prompt=False)
    video = next(r for r in refs if r["type"] == "video")
    assert video["grid"][0] == 4 and video["seconds_per_grid"] == 1.0 and video["audio_frames"] == 400

    processor = _omni_processor(thinker, [_payloads(sample, "vision")[1]])
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False)
    waves = [sf.read(clips[0], dtype="float32")[0], _track(talk), sf.read(clips[1], dtype="float32")[0]]
    hf_in = processor(text=[text], images=[str(color)], videos=[np.zeros((8, 16, 16, 3), np.uint8)], audio=waves,
                      audio_from_video_indices=[None, 0, None], load_audio_from_video=True, position_id_per_seconds=PPS,
                      seconds_per_chunk=float(SPC), videos_kwargs={"fps": 2.0}, return_tensors="pt")
    ids = hf_in["input_ids"]
    assert native == ids[0].tolist()
    runs = [tok for k, tok in enumerate(native) if tok in (VIDEO, AUDIO) and native[k - 1] != tok]
    assert runs == [AUDIO, VIDEO, AUDIO, VIDEO, AUDIO, AUDIO], "clip, then the video and its audio in 2 s chunks"

    clip_lens = [int(c["feature_lens"][0]) for c in _payloads(sample, "audio")]
    assert clip_lens == hf_in["feature_attention_mask"].sum(-1).tolist() == [20, 400, 31]
    feature_diff = _assert_processor_features(_payloads(sample, "audio"), waves, hf_in["input_features"],
                                              hf_in["feature_attention_mask"])
    assert hf_in["video_second_per_grid"].tolist() == [video["seconds_per_grid"]]
    hf.model.rope_deltas = None
    want, _ = hf.model.get_rope_index(ids, hf_in["image_grid_thw"], hf_in["video_grid_thw"], torch.ones_like(ids),
                                      True, hf_in["feature_attention_mask"].sum(-1), hf_in["video_second_per_grid"])
    np.testing.assert_array_equal(sample.positions, want[:, 0].numpy())

    ours = _omni_logits(thinker, sample)
    vision = _payloads(sample, "vision")
    hf.model.rope_deltas = None
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_audio_in_video=True,
                    pixel_values=vision[0]["pixel_values"], image_grid_thw=vision[0]["grid_thw"],
                    pixel_values_videos=vision[1]["pixel_values"], video_grid_thw=vision[1]["grid_thw"],
                    video_second_per_grid=hf_in["video_second_per_grid"],
                    **_clip_features(_payloads(sample, "audio"))).logits
    diff = float((ours - theirs).abs().max())
    print(f"video with its audio: ids equal the processor's ({len(native)} tokens), max |feature diff| = "
          f"{feature_diff:.3g}, max |logit diff| = {diff:.3g}")
    assert ours.shape == theirs.shape and diff < 1e-4

    silent = [{"role": "user", "content": [{"type": "video", "video": str(root / "media" / "vid1.mp4")},
                                           {"type": "audio", "audio": str(clips[0])}]}]
    native, _, refs = encode_media_conversation(prompts.encoder.tokenizer, prompts.encoder.template, silent,
                                                prompts.spec.media, root, "all")
    sample = prompts.sample(silent, root, add_generation_prompt=False)
    assert "audio_frames" not in refs[0] and len(_payloads(sample, "audio")) == 1
    processor = _omni_processor(thinker, [_payloads(sample, "vision")[0]])
    hf_in = processor(text=[processor.tokenizer.apply_chat_template(silent, tokenize=False)],
                      videos=[np.zeros((6, 16, 16, 3), np.uint8)], audio=waves[:1], audio_from_video_indices=[None],
                      load_audio_from_video=True, position_id_per_seconds=PPS, seconds_per_chunk=float(SPC),
                      videos_kwargs={"fps": 2.0}, return_tensors="pt")
    assert native == hf_in["input_ids"][0].tolist()
    want, _ = hf.model.get_rope_index(hf_in["input_ids"], None, torch.tensor([refs[0]["grid"]]),
                                      torch.ones_like(hf_in["input_ids"]), False, torch.tensor([20]),
                                      torch.tensor([refs[0]["seconds_per_grid"]]))
    np.testing.assert_array_equal(sample.positions, want[:, 0].numpy())


def test_a_video_with_its_audio_follows_it_without_an_omni_checkpoint(folder, tmp_path):
    """data.use_audio_in_video with the data's own vision and audio parts (native Qwen2-VL pads, no
    seconds_per_chunk): the video's tokens, then its audio's, and the audio part gets the track."""
    from engine.data import PromptEncoder, pack_rows
    from test_media import write_video_with_audio

    root, ids = folder
    talk = tmp_path / "talk.mp4"  # 1 s at 16 kHz: 100 frames, 12 tokens of the audio part
    write_video_with_audio(talk, 4, 2, np.sin(np.arange(16000) / 7.0) * 0.3, 16000, "pcm_s16le")
    messages = [{"role": "user", "content": [{"type": "video", "video": str(talk)}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "seven"}]
    prompts = PromptEncoder(_load(_config(root, ids), "--data.use_audio_in_video=true"))
    native, mask, refs = encode_media_conversation(prompts.encoder.tokenizer, prompts.encoder.template, messages,
                                                   prompts.spec.media, root)
    n_video, n_audio = refs[0]["tokens"], prompts.spec.media.track_tokens(refs[0])
    assert refs[0]["audio_frames"] == 100 and n_audio == 12
    at = native.index(ids["<|video_pad|>"])
    assert native[at:at + n_video + n_audio + 1] == [ids["<|video_pad|>"]] * n_video + [ids["<|audio_pad|>"]] * n_audio \
        + [native[at + n_video + n_audio]] and native.count(ids["<|audio_pad|>"]) == n_audio
    assert not any(mask[at:at + n_video + n_audio])
    sample = prompts.sample(messages, root, add_generation_prompt=False)
    assert [int(p["feature_lens"][0]) for p in sample.payloads["audio"]] == [100]
    pack_rows([[sample]], len(sample), 0, dict(prompts.parts.placeholders), [], dict(prompts.parts.parts))  # counts
    plain = PromptEncoder(_load(_config(root, ids)))
    assert plain.spec.media.audio_in_video is False
    assert len(plain.sample(messages, root, add_generation_prompt=False).payloads.get("audio", [])) == 0
    from dataclasses import asdict

    from engine.data.user_data import _with_defaults
    made = json.loads(json.dumps(asdict(plain.spec.media)))  # a folder prepared before these plan fields existed
    assert _with_defaults({k: v for k, v in made.items() if k not in ("ends", "audio_in_video")}) == made
