"""The omni-digits training stream: five tasks interleaved, packed into full rows.

Tasks (a sample is one short document; `<x>` stands for a part's placeholder tokens):
    image           "which digit is this? <vision>" -> " seven" EOS
    audio           "what number is spoken? <audio>" -> " 3 5 1" EOS
    video           "which digits are shown? <vision: t = 2..4 temporal patches>" -> " 3 5 1" EOS
    text_to_image   "draw a seven:" / "draw the digit 7:" -> <image_vq codes of a training image>
    text            a window of the Shakespeare token stream
Only the answers (and the image codes, through the decoder's head) are targets; a task
whose part the model lacks is left out. Answers follow their payload directly (no "it is"
in between): the last placeholder then predicts the answer, which a tiny model learns
several times faster than routing the payload through attention a few tokens later.

Like `SyntheticOmniData`, row r of step s is drawn from its own generator seeded by
(seed, s, r), so a global batch is the same whatever the parallel layout or resume point.
A row is filled by drawing samples until one no longer fits (a few more tries), then the
gap is closed with a Shakespeare window of exactly its length: a row wastes at most one
padding token. Each micro-batch carries its `padding_tokens`.

Video: each digit image is one temporal patch (its frame repeated temporal_patch_size
times), so a k-digit video has grid (k, h, w) and its pixel patches are the k images'
patches in a row (patchify's layout). With a fixed-resolution image encoder (`siglip`,
Janus's reader: payload [num_images, C, image_size, image_size]) an image is resized to its
image_size and a video is its k images in a row.

The image_vq tokenizer must be trained on the training images before the language model
learns its codes: the dataset's prepare step (`vq_tokenizer.prepare`) trains it once per
decoder config, caches it under the dataset's vq/ directory, and names it as the decoder's
`init_from`; this source never touches weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from engine.config import Config, expand_path
from engine.data import IGNORE_INDEX, OmniSample, micro_batches_of_rows, register_dataset, text_stream
from engine.models import PartLayout

from .build import (DIGIT_WORDS, IMAGE_SIDE, SAMPLE_RATE, Item, SkipCounter, ensure_omni_digits, image_to_unit,
                    read_meta, load_split)
from .vq_tokenizer import prepare

log = logging.getLogger(__name__)

TASKS = ("image", "audio", "video", "text_to_image", "text")
DEFAULT_WEIGHTS = {"image": 0.3, "audio": 0.2, "video": 0.15, "text_to_image": 0.3, "text": 0.05}
PROMPTS = {
    "image": "which digit is this?",
    "audio": "what number is spoken?",
    "video": "which digits are shown?",
}
DRAW_PROMPTS = ("draw a {word}:", "draw the digit {digit}:")
VIDEO_LENGTHS = (2, 3, 4)
MIN_FILL = 2          # shortest text filler (one target token)
MAX_MISSES = 8        # draws that did not fit before the row is closed
TEXT_LENGTHS = (8, 48)


def image_answer(digit: int) -> str:
    return f" {DIGIT_WORDS[digit]}"


def digits_answer(digits) -> str:
    return " " + " ".join(str(d) for d in digits)


def parse_digits(text: str) -> list[int]:
    """Digits named in a generated answer, in order ("seven" -> [7], "3 5 1" -> [3, 5, 1])."""
    out = []
    for word in text.replace(",", " ").replace(".", " ").split():
        w = word.lower()
        if w in DIGIT_WORDS:
            out.append(DIGIT_WORDS.index(w))
        elif w.isdigit():
            out += [int(c) for c in w]
    return out


@dataclass
class _Spec:
    """A drawn sample before its tensors are built (its length is known)."""

    kind: str
    items: tuple[int, ...]  # indices into the split's items
    length: int
    extra: int = 0          # text_to_image: prompt template; text: start offset


class OmniDigitsData:
    """`micro_batches(step, global_batch_size, dp_rank, dp_size, micro_batch_size)` over the
    omni-digits training (or held-out) split, for the parts of an omni model.

    `parts`: part name -> module (may be on the meta device: only shapes are used);
    `text_tokens`: the Shakespeare token stream (text task and row filler)."""

    def __init__(self, root: str | Path, tokenizer, text_tokens: np.ndarray, parts: dict, ph: dict[str, int],
                 decoders: list[str], seq_len: int, seed: int, split: str = "train", strict: bool = False,
                 weights: Optional[dict[str, float]] = None, fill_text: bool = True):
        self.root, self.tokenizer, self.text_tokens = Path(root), tokenizer, text_tokens
        self.parts, self.ph, self.decoders = parts, ph, decoders
        self.seq_len, self.seed, self.split, self.fill_text = seq_len, seed, split, fill_text
        self.pad_id, self.eos_id = tokenizer.pad_id, tokenizer.eos_id
        self.meta = read_meta(self.root)
        self.skipped = SkipCounter(strict=strict)
        items, _ = load_split(self.root, split, strict=strict, skipped=self.skipped)
        self.vision = self._part("vision") or self._part("siglip")
        self.audio = self._part("audio")
        self.image_vq = self._part("image_vq")
        others = sorted(set(parts) - {n for n in (self.vision, self.audio, self.image_vq) if n})
        if others:
            log.warning("omni_digits has no data for part(s) %s: they run their dummy payloads", others)
        self._enc = {kind: tokenizer.encode(text) for kind, text in PROMPTS.items()}
        self._image_answers = [tokenizer.encode(image_answer(d)) + [self.eos_id] for d in range(10)]
        self._draw = [[tokenizer.encode(t.format(word=DIGIT_WORDS[d], digit=d)) for d in range(10)]
                      for t in DRAW_PROMPTS]

        self.images = [it for it in items if it.kind == "image"]
        self.audio_items: list[Item] = []
        self._audio_feats: list[torch.Tensor] = []
        self._audio_tokens: list[int] = []
        if self.vision:
            self._prepare_vision()
        if self.audio:
            self._prepare_audio([it for it in items if it.kind == "audio"])
        if self.image_vq:
            self._prepare_image_vq()
        self.weights = self._task_weights(weights)
        if self.skipped.total:
            log.warning("omni_digits %s: skipped %d sample(s): %s; e.g. %s", split, self.skipped.total,
                        self.skipped.counts, self.skipped.examples[:2])

    # ------------------------------------------------------------------ setup

    def _part(self, registered: str) -> Optional[str]:
        names = [n for n, p in self.parts.items() if getattr(type(p), "registered_name", None) == registered]
        return names[0] if names else None

    def _prepare_vision(self) -> None:
        enc = self.parts[self.vision]
        if not hasattr(enc, "patchify"):  # a fixed-resolution encoder: whole images of its image_size
            self.vision_size = enc.image_size
            self._vision_pixels = [((image_to_unit(it.data, enc.image_size) - 0.5) / 0.5)[None, None]
                                   .expand(1, enc.num_channels, -1, -1).contiguous() for it in self.images]
            self._vision_grid = None
            self.vision_tokens = enc.tokens_per_image
            return
        unit = enc.patch_size * enc.spatial_merge_size
        self.vision_size = unit * math.ceil(IMAGE_SIDE / unit)
        self._vision_pixels = []
        for it in self.images:
            x = (image_to_unit(it.data, self.vision_size) - 0.5) / 0.5
            frame = x[None].expand(enc.in_channels, -1, -1)
            pix, grid = enc.patchify(frame)
            self._vision_pixels.append(pix)
        self._vision_grid = grid if self.images else None  # the same (1, h, w) for every image
        self.vision_tokens = enc.num_tokens({"pixel_values": self._vision_pixels[0], "grid_thw": grid[None]}) \
            if self.images else 0

    def _prepare_audio(self, items: list[Item]) -> None:
        from engine.modalities import log_mel

        enc = self.parts[self.audio]
        for it in items:
            wav = it.data.astype(np.float32) / 32768.0
            feats = log_mel(wav, SAMPLE_RATE, enc.num_mel_bins)
            frames = feats.shape[1]
            if frames > enc.max_frames:
                self.skipped.skip("audio longer than the audio encoder's window", it.where,
                                  f"{frames} frames > 2 * max_source_positions = {enc.max_frames}")
                continue
            if frames < enc.min_frames:
                self.skipped.skip("audio too short for the audio encoder", it.where, f"{frames} frames")
                continue
            n = int(enc.tokens_per_clip(torch.tensor([frames]))[0])
            length = len(self._enc["audio"]) + n + len(self.tokenizer.encode(digits_answer(it.digits)))  # + EOS - 1
            if length > self.seq_len:
                self.skipped.skip("sample longer than data.seq_len", it.where, f"{length} > {self.seq_len} tokens")
                continue
            self.audio_items.append(it)
            self._audio_feats.append(feats)
            self._audio_tokens.append(n)

    def _prepare_image_vq(self) -> None:
        dec = self.parts[self.image_vq]
        self.vq_size, self.vq_codes = dec.image_size, dec.codes_per_image
        longest = max(len(p) for t in self._draw for p in t) + self.vq_codes
        if longest > self.seq_len:
            for it in self.images:
                self.skipped.skip("text_to_image sample longer than data.seq_len", it.where,
                                  f"{longest} > {self.seq_len} tokens")
            self.image_vq = None

    def vq_pixels(self, item: Item) -> torch.Tensor:
        """[1, C, S, S] in [-1, 1]: an image as the image_vq decoder's target."""
        dec = self.parts[self.image_vq]
        x = (image_to_unit(item.data, self.vq_size) - 0.5) / 0.5
        return x[None, None].expand(1, dec.in_channels, -1, -1).contiguous()

    def _task_weights(self, weights: Optional[dict[str, float]]) -> dict[str, float]:
        weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        unknown = set(weights) - set(TASKS)
        if unknown:
            raise ValueError(f"omni_digits: unknown task(s) {sorted(unknown)} in weights; tasks are {TASKS}")
        available = {"image": bool(self.vision and self.images), "video": bool(self.vision and self.images),
                     "audio": bool(self.audio and self.audio_items),
                     "text_to_image": bool(self.image_vq and self.images), "text": len(self.text_tokens) > 200}
        out = {k: float(w) for k, w in weights.items() if w > 0 and available[k]}
        if not any(k != "text" for k in out):
            raise ValueError(f"omni_digits: no task can be drawn for parts {sorted(self.parts)} "
                             f"(usable samples: {len(self.images)} images, {len(self.audio_items)} clips); "
                             "the model needs a vision, audio or image_vq part")
        total = sum(out.values())
        return {k: v / total for k, v in out.items()}

    # ------------------------------------------------------------------ samples

    def _draw_spec(self, rng: np.random.Generator, kinds: list[str], probs: np.ndarray) -> _Spec:
        kind = kinds[int(rng.choice(len(kinds), p=probs))]
        if kind in ("image", "text_to_image"):
            i = int(rng.integers(len(self.images)))
            t = int(rng.integers(len(DRAW_PROMPTS))) if kind == "text_to_image" else 0
            return self.spec_for(kind, (i,), t)
        if kind == "audio":
            return self.spec_for(kind, (int(rng.integers(len(self.audio_items))),))
        if kind == "video":
            k = int(rng.choice(VIDEO_LENGTHS))
            return self.spec_for(kind, tuple(int(i) for i in rng.integers(len(self.images), size=k)))
        n = int(rng.integers(TEXT_LENGTHS[0], TEXT_LENGTHS[1] + 1))
        return _Spec("text", (), n, extra=int(rng.integers(0, len(self.text_tokens) - n - 1)))

    def spec_for(self, kind: str, items: tuple[int, ...], template: int = 0) -> _Spec:
        """The spec of a given sample: `items` index `self.images` (image, video, text_to_image)
        or `self.audio_items` (audio); `template` picks the drawing prompt."""
        if kind == "image":
            d = self.images[items[0]].digits[0]
            return _Spec(kind, tuple(items), len(self._enc["image"]) + self.vision_tokens + len(self._image_answers[d]) - 1)
        if kind == "audio":
            answer = len(self.tokenizer.encode(digits_answer(self.audio_items[items[0]].digits))) + 1
            return _Spec(kind, tuple(items), len(self._enc["audio"]) + self._audio_tokens[items[0]] + answer - 1)
        if kind == "video":
            answer = len(self.tokenizer.encode(digits_answer([self.images[i].digits[0] for i in items]))) + 1
            return _Spec(kind, tuple(items), len(self._enc["video"]) + len(items) * self.vision_tokens + answer - 1)
        if kind == "text_to_image":
            d = self.images[items[0]].digits[0]
            return _Spec(kind, tuple(items), len(self._draw[template][d]) + self.vq_codes, extra=template)
        raise ValueError(f"omni_digits: spec_for does not build {kind!r} samples; kinds: image, audio, video, "
                         "text_to_image")

    def _text(self, start: int, n: int) -> OmniSample:
        seq = [int(t) for t in self.text_tokens[start:start + n + 1]]
        return OmniSample(seq[:-1], seq[1:])

    @staticmethod
    def _qa(prompt: list[int], ph_id: int, n: int, answer: list[int], payloads: dict) -> OmniSample:
        """prompt, n placeholders, answer: only the answer (predicted from the last
        placeholder on) is a target."""
        full = prompt + [ph_id] * n + answer
        first = len(prompt) + n
        labels = [full[i + 1] if i + 1 >= first else IGNORE_INDEX for i in range(len(full) - 1)]
        return OmniSample(full[:-1], labels, payloads)

    def vision_payload(self, idx) -> dict[str, torch.Tensor]:
        """The vision payload of images `idx`: one image (t = 1) or a video (t = len(idx));
        for a fixed-resolution encoder, the images in a row."""
        if self._vision_grid is None:
            return {"pixel_values": torch.cat([self._vision_pixels[i] for i in idx])}
        _, h, w = self._vision_grid.tolist()
        pix = torch.cat([self._vision_pixels[i] for i in idx])
        return {"pixel_values": pix, "grid_thw": torch.tensor([[len(idx), h, w]], dtype=torch.long)}

    def audio_payload(self, i: int) -> dict[str, torch.Tensor]:
        f = self._audio_feats[i]
        return {"input_features": f[None], "feature_lens": torch.tensor([f.shape[1]], dtype=torch.long)}

    def build_sample(self, spec: _Spec, with_answer: bool = True) -> OmniSample:
        """The sample of a spec; without the answer (for generation) it ends after the
        placeholders (tokens only, no labels)."""
        k = spec.kind
        if k == "text":
            return self._text(spec.extra, spec.length)
        if k == "text_to_image":
            item = self.images[spec.items[0]]
            prompt = self._draw[spec.extra][item.digits[0]]
            n = self.vq_codes
            return OmniSample(prompt + [self.ph[self.image_vq]] * n, [IGNORE_INDEX] * (len(prompt) + n),
                              {self.image_vq: [{"pixel_values": self.vq_pixels(item)}]})
        if k == "audio":
            item = self.audio_items[spec.items[0]]
            payload, part, n = self.audio_payload(spec.items[0]), self.audio, self._audio_tokens[spec.items[0]]
            answer = self.tokenizer.encode(digits_answer(item.digits)) + [self.eos_id]
        else:
            payload, part = self.vision_payload(spec.items), self.vision
            n = self.vision_tokens * len(spec.items)
            digits = [self.images[i].digits[0] for i in spec.items]
            answer = self._image_answers[digits[0]] if k == "image" else \
                self.tokenizer.encode(digits_answer(digits)) + [self.eos_id]
        prompt = self._enc[k]
        if not with_answer:
            tokens = prompt + [self.ph[part]] * n
            return OmniSample(tokens, [IGNORE_INDEX] * len(tokens), {part: [payload]})
        return self._qa(prompt, self.ph[part], n, answer, {part: [payload]})

    def row(self, step: int, row: int) -> list[OmniSample]:
        """The samples of row `row` of step `step`, filling seq_len up to at most one token."""
        rng = np.random.default_rng([self.seed, step, row])
        kinds = list(self.weights)
        probs = np.array([self.weights[k] for k in kinds])
        specs, left, misses = [], self.seq_len, 0
        while misses < MAX_MISSES and left >= MIN_FILL:
            spec = self._draw_spec(rng, kinds, probs)
            if spec.kind == "text":
                spec.length = min(spec.length, left)
            if spec.length <= left:
                specs.append(spec)
                left -= spec.length
            else:
                misses += 1
        if self.fill_text and left >= MIN_FILL and len(self.text_tokens) > left + 1:
            specs.append(_Spec("text", (), left, extra=int(rng.integers(0, len(self.text_tokens) - left - 1))))
        samples = [self.build_sample(s) for s in specs]
        assert all(len(x) == s.length for x, s in zip(samples, specs)), "spec lengths must match the samples"
        return samples

    def micro_batches(self, step: int, global_batch_size: int, dp_rank: int, dp_size: int,
                      micro_batch_size: int) -> list[dict]:
        return micro_batches_of_rows(self.row, step, global_batch_size, dp_rank, dp_size, micro_batch_size,
                                     self.seq_len, self.pad_id, self.ph, self.decoders, self.parts)

    def skipped_counts(self) -> dict[str, int]:
        return dict(self.skipped.counts)

    def stats(self) -> dict:
        return {"split": self.split, "images": len(self.images), "audio_clips": len(self.audio_items),
                "weights": self.weights, "skipped": dict(self.skipped.counts),
                "vision_tokens_per_image": getattr(self, "vision_tokens", None),
                "audio_tokens_mean": float(np.mean(self._audio_tokens)) if self._audio_tokens else None,
                "image_vq_codes": getattr(self, "vq_codes", None)}


# ---------------------------------------------------------------------- registration

@register_dataset("omni_digits", modalities=True, prepare=prepare)
def build_omni_digits(cfg: Config, parts: PartLayout, split: str = "train") -> OmniDigitsData:
    """The source for `cfg` (data.cache_dir, data.seq_len, data.strict, train.seed)."""
    text, tokenizer = text_stream(cfg)
    root = ensure_omni_digits(expand_path(cfg.data.cache_dir))
    data = OmniDigitsData(root, tokenizer, text.tokens, parts.parts, parts.placeholders, parts.decoders,
                          cfg.data.seq_len, cfg.train.seed, split=split, strict=cfg.data.strict)
    ids = [t for p in data._enc.values() for t in p] + [t for a in data._image_answers for t in a] + \
        [t for tpl in data._draw for p in tpl for t in p] + tokenizer.encode(digits_answer(range(10)))
    if max(ids) >= parts.text_vocab_size:
        raise ValueError(f"omni_digits: the tokenizer gives id {max(ids)} >= text_vocab_size = "
                         f"{parts.text_vocab_size} (ids from there on are the parts' placeholders); use the "
                         "project's tokenizer for this model")
    return data
