"""omni-digits: a small real omni dataset built offline (images, speech, video, text).

Material:
- scikit-learn's bundled handwritten digits (1797 images of 8x8, values 0..16), split
  per class into train / held-out by a seeded permutation (20% held out);
- spoken digit words ("zero".."nine") and short digit sequences ("three five one")
  synthesised with Debian's `espeak-ng` in several voices, voice variants, speeds and
  pitches, trimmed of silence and resampled to 16 kHz. The held-out split is a seeded
  20% of the (voice, variant, speed, pitch) combinations: none of its combinations is
  heard in training (each voice is, at other speeds / pitches / variants).

Videos (2-4 digit images in a row) and text -> image prompts are composed from the
images at batch time (see `source.py`), so they need no files of their own.

On disk, under `<data.cache_dir>/omni_digits_v1/`:
    meta.json                       build options, statistics, build time
    train.jsonl, heldout.jsonl      one JSON object per sample (streamed line by line)
    images/NNNN.npy                 uint8 [8, 8], values 0..16 (scikit-learn's scale)
    audio/CCC_JJ.npy                int16 [samples] mono waveform at 16 kHz
    vq/image_vq_<hash>.safetensors  VQ tokenizers pre-trained on the training images (vq_tokenizer.py)

A manifest line is {"id", "kind": "image"|"audio", "file", "digits": [d, ...]} plus
provenance (scikit-learn index; voice, variant, speed, pitch, text, seconds). A line that
is not such an object is an error naming the file and the line; a payload file that is
missing, truncated or unreadable is skipped and counted (an error under `strict`).

The build is deterministic given the options (scikit-learn's data and the installed
espeak-ng version fixed), runs under a file lock (every rank may call it) and moves the
finished directory into place atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from engine.data import DataError, file_lock

log = logging.getLogger(__name__)

DATASET_DIR = "omni_digits_v1"
FORMAT_VERSION = 1
SPLITS = ("train", "heldout")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGE_SIDE = 8
IMAGE_MAX = 16  # scikit-learn's digits are integers in [0, 16]
SAMPLE_RATE = 16000
MIN_AUDIO_SAMPLES = 401  # log_mel needs n_fft // 2 + 1 samples

# English voices of espeak-ng's own (gmw) set; mbrola voices need extra packages.
DEFAULT_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-029", "en-us-nyc")
INSTALL_HINT = ("install it with `apt-get update && apt-get install -y espeak-ng` (Debian/Ubuntu, as root) "
                "or your system's package manager, then rerun")


class ManifestError(DataError):
    """A manifest line that cannot be read; the message names the file and the line."""


class MissingToolError(DataError):
    """A program the dataset builder needs (espeak-ng) is absent and cannot be installed."""


class SampleError(DataError):
    """A sample that cannot be used (raised instead of skipping it in strict mode)."""


@dataclass(frozen=True)
class BuildOptions:
    """What the dataset is built from; recorded in meta.json (a rebuild with other options
    into the same directory is refused)."""

    seed: int = 0
    heldout_fraction: float = 0.2
    """Share of each digit's images, and of the voice combinations, held out."""
    images_per_class: Optional[int] = None
    """Use only this many images of each digit (tests); None = all 1797."""
    voices: tuple[str, ...] = DEFAULT_VOICES
    """espeak-ng voices; those not installed are left out (and listed in meta.json)."""
    variants: tuple[str, ...] = ("", "+f3", "+m3")
    """espeak-ng voice variants ('' = the voice's own)."""
    speeds: tuple[int, ...] = (130, 165, 200)
    """Words per minute."""
    pitches: tuple[int, ...] = (30, 50, 70)
    """0..99."""
    sequences_per_combo: int = 4
    """Digit sequences spoken per voice combination (besides the ten single words)."""
    sequence_lengths: tuple[int, ...] = (2, 3)
    workers: int = 4
    """espeak-ng processes run at once."""

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "BuildOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------- espeak-ng

def ensure_espeak(install: bool = True) -> str:
    """Path of `espeak-ng`; installs it with apt-get when missing and running as root."""
    path = shutil.which("espeak-ng")
    if path:
        return path
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        log.info("espeak-ng not found: installing it with apt-get (running as root)")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "espeak-ng"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                raise MissingToolError(f"omni_digits: `{' '.join(cmd)}` failed ({tail[0]}); {INSTALL_HINT}")
        path = shutil.which("espeak-ng")
        if path:
            return path
    raise MissingToolError(f"omni_digits: the speech synthesiser espeak-ng is not installed (needed to build the "
                       f"spoken digits); {INSTALL_HINT}")


def installed_voices(espeak: str) -> set[str]:
    """Language names of the installed English voices (`espeak-ng --voices=en`)."""
    out = subprocess.run([espeak, "--voices=en"], capture_output=True, text=True, check=True).stdout
    voices = set()
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5 and not cols[4].startswith("mb/"):  # mbrola voices need extra data
            voices.add(cols[1])
    return voices


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """(int16 mono samples, sample rate) of a PCM wav; tolerates the bogus sizes that
    `espeak-ng --stdout` writes (it streams, so the header cannot know the length)."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE stream")
    pos, rate, channels, bits = 12, None, None, None
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        body = pos + 8
        if tag == b"fmt ":
            channels = int.from_bytes(data[body + 2:body + 4], "little")
            rate = int.from_bytes(data[body + 4:body + 8], "little")
            bits = int.from_bytes(data[body + 14:body + 16], "little")
        elif tag == b"data":
            if rate is None or bits != 16 or channels != 1:
                raise ValueError(f"expected 16-bit mono PCM, got {bits}-bit x {channels} channels")
            end = min(len(data), body + size) if 0 < size < 0x7FFF0000 else len(data)
            end -= (end - body) % 2
            return np.frombuffer(data[body:end], dtype="<i2").astype(np.int16), rate
        pos = body + size + (size % 2)
    raise ValueError("no data chunk")


def trim_and_resample(x: np.ndarray, rate: int, threshold: float = 0.02, margin_s: float = 0.02) -> np.ndarray:
    """Cut leading / trailing silence (below `threshold` of the peak, keeping `margin_s`),
    resample to 16 kHz (polyphase), return int16."""
    from scipy.signal import resample_poly

    xf = x.astype(np.float32) / 32768.0
    loud = np.flatnonzero(np.abs(xf) > threshold * max(float(np.abs(xf).max()), 1e-6))
    if loud.size:
        m = int(margin_s * rate)
        xf = xf[max(0, loud[0] - m):loud[-1] + m + 1]
    if rate != SAMPLE_RATE:
        g = np.gcd(rate, SAMPLE_RATE)
        xf = resample_poly(xf, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return np.clip(np.round(xf * 32767.0), -32768, 32767).astype(np.int16)


def synthesize(espeak: str, text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """int16 waveform at 16 kHz of `text` spoken by espeak-ng."""
    cmd = [espeak, "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0 or not proc.stdout:
        raise DataError(f"omni_digits: `{' '.join(cmd)}` failed: {proc.stderr.decode(errors='replace').strip()}")
    samples, rate = parse_wav(proc.stdout)
    return trim_and_resample(samples, rate)


# ---------------------------------------------------------------------------- build

def dataset_root(cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / DATASET_DIR


def ensure_omni_digits(cache_dir: str | Path, options: Optional[BuildOptions] = None) -> Path:
    """The dataset directory, built first if missing (default options unless given).

    With `options` given and a dataset already there, its recorded options must match.
    """
    root = dataset_root(cache_dir)
    if not (root / "meta.json").is_file():
        with file_lock(root.parent / f".{DATASET_DIR}.lock"):
            if not (root / "meta.json").is_file():
                _build_into(root, options or BuildOptions())
    if options is not None:
        found = BuildOptions.from_json(read_meta(root)["options"])
        diff = {k: (getattr(found, k), getattr(options, k)) for k in options.to_json()
                if k != "workers" and getattr(found, k) != getattr(options, k)}
        if diff:
            raise ValueError(f"omni_digits: {root} was built with other options (name: (built, asked)) {diff}; "
                             f"delete the directory to rebuild it, or use another data.cache_dir")
    return root


def read_meta(root: Path) -> dict:
    path = Path(root) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"omni_digits: {path} is unreadable ({e}); delete {root} to rebuild it") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"omni_digits: {path} has format {meta.get('format')!r}, this code reads format "
                         f"{FORMAT_VERSION}; delete {root} to rebuild it")
    return meta


def _build_into(root: Path, opts: BuildOptions) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{DATASET_DIR}.building."))
    log.info("building the omni-digits dataset in %s (first use only; about half a minute on 2 cores)", root)
    t0 = time.perf_counter()
    try:
        build(tmp, opts)
        log.info("built omni-digits in %.1f s", time.perf_counter() - t0)
        if root.exists():  # a directory without meta.json: a crashed build
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _split_images(targets: np.ndarray, opts: BuildOptions) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng([opts.seed, 1])
    train, held = [], []
    for d in range(10):
        idx = np.flatnonzero(targets == d)
        idx = idx[rng.permutation(len(idx))]
        if opts.images_per_class is not None:
            idx = idx[:opts.images_per_class]
        n_held = max(1, int(round(opts.heldout_fraction * len(idx))))
        held += sorted(int(i) for i in idx[:n_held])
        train += sorted(int(i) for i in idx[n_held:])
    return sorted(train), sorted(held)


def audio_plan(opts: BuildOptions, voices: list[str]) -> list[dict]:
    """Every clip to synthesise: combination, text, digits, split (deterministic)."""
    combos = list(itertools.product(voices, opts.variants, opts.speeds, opts.pitches))
    rng = np.random.default_rng([opts.seed, 2])
    order = rng.permutation(len(combos))
    n_held = max(1, int(round(opts.heldout_fraction * len(combos)))) if len(combos) > 1 else 0
    held = set(int(i) for i in order[:n_held])
    clips = []
    for c, (voice, variant, speed, pitch) in enumerate(combos):
        split = "heldout" if c in held else "train"
        crng = np.random.default_rng([opts.seed, 3, c])
        texts = [[d] for d in range(10)]
        for _ in range(opts.sequences_per_combo):
            n = int(crng.choice(opts.sequence_lengths))
            texts.append([int(d) for d in crng.integers(0, 10, n)])
        for j, digits in enumerate(texts):
            clips.append({"id": f"aud{c:03d}_{j:02d}", "kind": "audio", "file": f"audio/{c:03d}_{j:02d}.npy",
                          "digits": digits, "text": " ".join(DIGIT_WORDS[d] for d in digits),
                          "voice": voice, "variant": variant, "speed": speed, "pitch": pitch, "split": split})
    return clips


def build(out: Path, opts: BuildOptions = BuildOptions()) -> dict:
    """Write the dataset into the (empty) directory `out`; returns meta.json's contents."""
    from sklearn.datasets import load_digits

    t0 = time.perf_counter()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "audio").mkdir(exist_ok=True)
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}

    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float64)
    targets = np.asarray(digits.target, dtype=np.int64)
    train_idx, held_idx = _split_images(targets, opts)
    for split, idx in (("train", train_idx), ("heldout", held_idx)):
        for i in idx:
            name = f"images/{i:04d}.npy"
            np.save(out / name, np.rint(images[i]).astype(np.uint8))
            records[split].append({"id": f"img{i:04d}", "kind": "image", "file": name,
                                   "digits": [int(targets[i])], "sklearn_index": i})
    t_images = time.perf_counter() - t0

    voices, missing, version, plan, espeak = [], [], None, [], ""
    if opts.voices:  # no voices: an image-only dataset (no espeak-ng needed)
        espeak = ensure_espeak()
        have = installed_voices(espeak)
        voices = [v for v in opts.voices if v in have]
        missing = [v for v in opts.voices if v not in have]
        if not voices:
            raise DataError(f"omni_digits: none of the voices {list(opts.voices)} is installed in espeak-ng "
                               f"(installed: {sorted(have)}); pick installed ones in BuildOptions.voices")
        version = subprocess.run([espeak, "--version"], capture_output=True, text=True).stdout.strip()
        plan = audio_plan(opts, voices)
    t1 = time.perf_counter()

    def one(clip: dict) -> float:
        wav = synthesize(espeak, clip["text"], clip["voice"] + clip["variant"], clip["speed"], clip["pitch"])
        np.save(out / clip["file"], wav)
        return wav.shape[0] / SAMPLE_RATE

    with ThreadPoolExecutor(max(1, opts.workers)) as pool:
        seconds = list(pool.map(one, plan))
    t_audio = time.perf_counter() - t1
    for clip, s in zip(plan, seconds):
        rec = {k: v for k, v in clip.items() if k != "split"}
        rec["seconds"] = round(s, 4)
        records[clip["split"]].append(rec)

    for split in SPLITS:
        with open(out / f"{split}.jsonl", "w") as f:
            for rec in records[split]:
                f.write(json.dumps(rec) + "\n")

    def count(split, kind, single=None):
        return sum(1 for r in records[split] if r["kind"] == kind and
                   (single is None or (len(r["digits"]) == 1) == single))

    secs = np.array(seconds) if seconds else np.zeros(1)
    meta = {
        "format": FORMAT_VERSION, "options": opts.to_json(), "espeak_ng": version,
        "voices_used": voices, "voices_missing": missing,
        "heldout_combos": sorted({(c["voice"] + c["variant"], c["speed"], c["pitch"]) for c in plan
                                  if c["split"] == "heldout"}),
        "stats": {split: {"images": count(split, "image"), "audio_words": count(split, "audio", True),
                          "audio_sequences": count(split, "audio", False)} for split in SPLITS},
        "audio_seconds": {"mean": float(secs.mean()), "min": float(secs.min()), "max": float(secs.max()),
                          "total": float(secs.sum())},
        "build_seconds": {"images": round(t_images, 2), "audio": round(t_audio, 2),
                          "total": round(time.perf_counter() - t0, 2)},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# ---------------------------------------------------------------------------- read

@dataclass
class Item:
    """One usable sample of a split: where it came from, its digits and its payload."""

    kind: str
    digits: tuple[int, ...]
    data: np.ndarray  # image: uint8 [8, 8]; audio: int16 [samples]
    where: str        # "<manifest>:<line>" for messages
    record: dict = field(repr=False, default_factory=dict)


@dataclass
class SkipCounter:
    """Samples left out and why (reason -> count), with the first few places."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    strict: bool = False

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        msg = f"{where}: {reason}" + (f" ({detail})" if detail else "")
        if self.strict:
            raise SampleError(f"omni_digits: {msg}; fix or delete the sample, or turn strict mode off to skip it")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 5:
            self.examples.append(msg)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def read_manifest(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a bad line raises ManifestError."""
    path = Path(path)
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise ManifestError(f"omni_digits: cannot open manifest {path} ({e.strerror}); rebuild the dataset with "
                            "python -m omni_datasets.omni_digits.make") from None
    with f:
        line_no = 0
        while True:
            line_no += 1
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise ManifestError(f"omni_digits: {path}:{line_no}: not UTF-8 text ({e.reason}); "
                                    "fix the line or rebuild the dataset") from None
            if not line:
                return
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"omni_digits: {path}:{line_no}: not a JSON object ({e.msg} at column {e.colno}); "
                                    "fix the line or rebuild the dataset") from None
            problem = _check_record(rec)
            if problem:
                raise ManifestError(f"omni_digits: {path}:{line_no}: {problem}; fix the line or rebuild the dataset")
            yield line_no, rec


def _check_record(rec) -> Optional[str]:
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if rec.get("kind") not in ("image", "audio"):
        return f"'kind' must be 'image' or 'audio', got {rec.get('kind')!r}"
    if not isinstance(rec.get("file"), str) or not rec["file"] or rec["file"].startswith("/") or ".." in rec["file"]:
        return f"'file' must be a relative path inside the dataset, got {rec.get('file')!r}"
    digits = rec.get("digits")
    if not isinstance(digits, list) or not digits or \
            not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 9 for d in digits):
        return f"'digits' must be a non-empty list of integers 0..9, got {digits!r}"
    if rec["kind"] == "image" and len(digits) != 1:
        return f"an image has exactly one digit, got {digits!r}"
    return None


def load_split(root: str | Path, split: str, strict: bool = False,
               skipped: Optional[SkipCounter] = None) -> tuple[list[Item], SkipCounter]:
    """Every usable sample of `split` ("train" or "heldout"), payloads read into memory.

    Unreadable payloads (missing, truncated, wrong shape or dtype) are skipped and counted
    in the returned SkipCounter, or raise SampleError when `strict`.
    """
    if split not in SPLITS:
        raise ValueError(f"omni_digits: split {split!r} is not one of {SPLITS}")
    root = Path(root)
    skipped = skipped if skipped is not None else SkipCounter(strict=strict)
    manifest = root / f"{split}.jsonl"
    items = []
    for line_no, rec in read_manifest(manifest):
        where = f"{manifest}:{line_no}"
        path = root / rec["file"]
        kind = rec["kind"]
        try:
            data = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            skipped.skip(f"{kind} file missing", where, str(path))
            continue
        except (ValueError, OSError, EOFError) as e:
            skipped.skip(f"unreadable {kind} file", where, f"{path}: {e}")
            continue
        if kind == "image":
            if data.shape != (IMAGE_SIDE, IMAGE_SIDE) or data.dtype != np.uint8 or int(data.max(initial=0)) > IMAGE_MAX:
                skipped.skip("bad image", where, f"{path}: shape {data.shape} {data.dtype}, expected uint8 "
                                                 f"[{IMAGE_SIDE}, {IMAGE_SIDE}] in 0..{IMAGE_MAX}")
                continue
        else:
            if data.ndim != 1 or data.dtype != np.int16:
                skipped.skip("bad audio", where, f"{path}: shape {data.shape} {data.dtype}, expected int16 [samples]")
                continue
            if data.shape[0] < MIN_AUDIO_SAMPLES:
                skipped.skip("audio too short", where, f"{path}: {data.shape[0]} samples < {MIN_AUDIO_SAMPLES}")
                continue
        items.append(Item(kind, tuple(rec["digits"]), data, where, rec))
    return items, skipped


def content_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def wav_bytes(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    """A standard wav file of int16 samples (to listen to a clip)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype=np.int16).tobytes())
    return buf.getvalue()


def image_to_unit(data: np.ndarray, size: int):
    """uint8 [8, 8] in 0..16 -> float tensor [size, size] in [0, 1] (bilinear resize)."""
    import torch
    import torch.nn.functional as F

    x = torch.as_tensor(data.astype(np.float32) / IMAGE_MAX)
    if size != data.shape[0]:
        x = F.interpolate(x[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    return x
