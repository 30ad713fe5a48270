"""The omni fine-tuning example's files (python -m omni_datasets.omni_digits.conversations), made
from a tiny omni-digits build: media files decode to what they should, held-out rows use
held-out media only, a rerun writes the same bytes, and transformers renders the media parts
with the backbone's chat template."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from omni_datasets.omni_digits import conversations as conv
from omni_datasets.omni_digits.build import DIGIT_WORDS, SAMPLE_RATE, BuildOptions, ensure_omni_digits, load_split

HAVE_ESPEAK = shutil.which("espeak-ng") is not None
TINY = BuildOptions(images_per_class=4, voices=("en-us",) if HAVE_ESPEAK else (), variants=("",), speeds=(150, 220),
                    pitches=(50,), sequences_per_combo=1, workers=2)
CORPUS = Path("~/.cache/omni-engine/corpus.jsonl").expanduser()
ARGS = ["--limit", "20", "--videos", "6", "--two-media", "4", "--multi-turn", "4", "--heldout-per-task", "6",
        "--text-docs", "20" if CORPUS.is_file() else "0"]


def folder_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def media(rows: list[dict]) -> list[tuple[str, str, str]]:
    """(type, path, the answer of its turn) of every media part."""
    out = []
    for row in rows:
        msgs = row["messages"]
        for m, nxt in itertools.pairwise(msgs):
            if isinstance(m["content"], list):
                out += [(p["type"], p[p["type"]], nxt["content"]) for p in m["content"] if p["type"] != "text"]
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    root = ensure_omni_digits(cache, TINY)
    if CORPUS.is_file():
        (cache / "corpus.jsonl").symlink_to(CORPUS)
    out = tmp_path_factory.mktemp("sft") / "sft_omni"
    assert conv.main(["--out", str(out), "--cache-dir", str(cache), *ARGS]) == 0
    rows = {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()] for s in ("train", "heldout")}
    return cache, root, out, rows


def test_media_files_decode_to_their_sources(made):
    import soundfile as sf
    from PIL import Image

    _, root, out, rows = made
    for split in ("train", "heldout"):
        items, _ = load_split(root, split)
        source = {Path(it.record["file"]).stem: it for it in items}
        shown = [(conv.image_pixels(it.data), it.digits[0]) for it in items if it.kind == "image"]
        kinds = set()
        for kind, path, answer in media(rows[split]):
            f = out / path
            assert f.is_file(), path
            kinds.add(kind if kind != "audio" else f.suffix)
            if kind == "image":
                with Image.open(f) as im:
                    assert im.mode == "L" and im.size == (16, 16)
                    pixels = np.asarray(im)
                it = source[f.stem]
                assert np.array_equal(pixels, np.kron(np.rint(it.data * 255.0 / 16), np.ones((2, 2))))  # 2x upscaled
                assert answer == DIGIT_WORDS[it.digits[0]] or answer.split(",")[0] == DIGIT_WORDS[it.digits[0]] or \
                    answer in ("yes", "no")
            elif kind == "audio":
                samples, rate = sf.read(f, dtype="int16")
                it = source[f.stem]
                assert rate == SAMPLE_RATE and np.array_equal(samples, it.data)
                if answer not in ("yes", "no"):
                    assert answer.split("then ")[-1] == " ".join(map(str, it.digits))
            else:
                frames, fps = conv.read_mp4(f)
                digits = [int(d) for d in answer.split()]
                # Qwen2-VL's sampling at data.video_fps = 2 keeps every frame: one temporal patch per digit
                n = max(4, min(768, int(len(frames) / fps * 2))) // 2 * 2
                assert fps == 2 and frames.shape == (2 * len(digits), 16, 16) and n == len(frames)
                for t, d in enumerate(digits):
                    errors = [np.abs(frames[2 * t:2 * t + 2].astype(int) - img).max() for img, label in shown
                              if label == d]
                    assert min(errors) <= 1, (path, t)  # an image of the digit, both frames
        assert {"image", "video"} <= kinds and ({".wav", ".flac"} <= kinds or not HAVE_ESPEAK), kinds
    meta = json.loads((out / "meta.json").read_text())
    assert all(meta["counts"][s]["video_max_abs_error"] <= 1 for s in ("train", "heldout"))
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        return
    assert smart_resize(16, 16, factor=8, min_pixels=256, max_pixels=256) == (16, 16)


def test_heldout_uses_heldout_media_only(made):
    _, root, _, rows = made
    train = {p for _, p, _ in media(rows["train"])}
    held = {p for _, p, _ in media(rows["heldout"])}
    assert held and not train & held
    held_sources = {Path(it.record["file"]).stem for it in load_split(root, "heldout")[0]}
    assert all(Path(p).stem in held_sources for p in held if not p.startswith("videos/"))
    assert all(Path(p).name.startswith("heldout_") for p in held if p.startswith("videos/"))
    tasks = {tuple(p["type"] for p in r["messages"][0]["content"]) for r in rows["heldout"]}
    assert {("image", "text"), ("video", "text")} <= tasks
    assert any(len(r["messages"]) > 2 for r in rows["heldout"])


def test_rerun_is_byte_identical(made):
    cache, _, out, _ = made
    before = folder_hash(out)
    assert conv.main(["--out", str(out), "--cache-dir", str(cache), *ARGS]) == 0
    assert folder_hash(out) == before


def test_backbone_renders_media_parts(made):
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoTokenizer

    _, _, out, rows = made
    tok = AutoTokenizer.from_pretrained(out / "backbone")
    ids = {t: tok.convert_tokens_to_ids(t) for t in conv.SPECIALS}
    assert len(set(ids.values())) == len(conv.SPECIALS) and tok.eos_token == "<|im_end|>"
    assert json.loads((out / "meta.json").read_text())["media_token_ids"] == {t: ids[t] for t in conv.MEDIA_TOKENS}
    config = AutoConfig.from_pretrained(out / "backbone")
    assert config.model_type == "qwen2" and config.vocab_size == 512 and len(tok) <= 512
    image = [{"role": "user", "content": [{"type": "image", "image": "images/0000.png"},
                                          {"type": "text", "text": "Which digit is this?"}]},
             {"role": "assistant", "content": "seven"}]
    text = tok.apply_chat_template(image, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Which digit is this?<|im_end|>\n"
                    "<|im_start|>assistant\nseven<|im_end|>\n")
    assert tok(text)["input_ids"].count(ids["<|image_pad|>"]) == 1
    both = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "audio", "audio": "b.wav"},
                                         {"type": "video", "video": "c.mp4"}, {"type": "text", "text": "Hi"}]}]
    text = tok.apply_chat_template(both, tokenize=False, add_generation_prompt=True, add_vision_id=True,
                                   add_audio_id=True)
    assert text.endswith("<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Audio 1: "
                         "<|audio_start|><|audio_pad|><|audio_end|>Video 1: <|vision_start|><|video_pad|>"
                         "<|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")
    raw = Tokenizer.from_file(str(out / "backbone" / "tokenizer.json"))  # what the engine reads
    for row in rows["train"]:  # every media part becomes its pad token, in order
        got = tok.apply_chat_template(row["messages"], tokenize=True)["input_ids"]
        assert got == raw.encode(tok.apply_chat_template(row["messages"], tokenize=False), add_special_tokens=False).ids
        pads = [t for t in got if t in (ids["<|image_pad|>"], ids["<|video_pad|>"], ids["<|audio_pad|>"])]
        assert pads == [ids[f"<|{k}_pad|>"] for k, _, _ in media([row])]
    for word in DIGIT_WORDS:  # answers are short token runs
        assert len(tok.tokenize(word)) <= 3


def test_mistakes_exit_2(made, tmp_path, capsys):
    cache, _, _, _ = made
    assert conv.main(["--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "nothing")]) == 2
    assert "no omni-digits dataset" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert conv.main(["--out", str(tmp_path / "file"), "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_example_config_loads_the_backbone_into_the_omni_model(made):
    """model.init_from names a text-only folder while the model has parts: the folder's weights
    fill the omni model's backbone (not its parts), and the parts keep their seeded init."""
    from safetensors.torch import load_file

    from engine.checkpoint.weights import initial_weights_
    from engine.config import load_config
    from engine.models import build_model

    _, _, out, _ = made
    cfg = load_config("examples/configs/sft_omni.yaml", [("model.init_from", str(out / "backbone"))])
    with torch.device("meta"):
        model = build_model(cfg.model)
    initial_weights_(model, cfg, torch.device("cpu"), resuming=False)
    released = load_file(out / "backbone" / "model.safetensors")
    ours = dict(model.named_parameters())
    assert released["model.layers.1.mlp.down_proj.weight"].equal(ours["backbone.blocks.1.mlp.down_proj.weight"])
    assert released["model.embed_tokens.weight"].equal(ours["backbone.embed_tokens.weight"])
    assert released["lm_head.weight"].equal(ours["backbone.lm_head.weight"])
    seeded = [n for n in ours if not n.startswith("backbone.")]
    assert seeded and all(ours[n].isfinite().all() and ours[n].device.type == "cpu" for n in seeded)
