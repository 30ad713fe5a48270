"""Media files named in conversations -> payloads of the `vision` and `audio` parts.

Each kind of media has a header function, which reads only what a file's header says and
returns the size of the payload the file will give (so a sample's token count is known
without decoding), and a load function, which decodes the file into that payload. The two
always agree: the load function raises `MediaError` rather than return a payload of another
size. Every failure is a `MediaError` whose `reason` is one of

    missing       the path is not a readable file
    corrupt       the decoder knows the format (by the file's header, or because the suffix
                  names a format it reads) but the bytes cannot be read: a truncated PNG,
                  garbage in a .wav, a broken MP4, a header that disagrees with the data
    unsupported   the decoder does not recognise the file and its suffix is not one of the
                  decoder's formats (a .txt, a .heic without a plugin), or an image whose
                  aspect ratio exceeds 200 (transformers refuses those too)
    empty_audio   an audio file with zero samples
    no_frames     a video file without a video stream, or whose stream has no frames
    too_long      audio with more log-mel frames than AudioRule.max_frames
    too_short     audio with fewer than AudioRule.min_frames log-mel frames

and whose message is one line: ``<path>: <what> (<underlying error>); <fix>``. The header
functions raise the same reason as the load functions whenever the header tells.

Images (`image_grid`, `load_image`) follow transformers' Qwen2-VL image processor on a file
path (``Qwen2VLImageProcessorPil``, which loads a path with ``transformers.image_utils.
load_image``): the EXIF orientation is applied (``ImageOps.exif_transpose``; read from the
header, see `_image_orientation`); the image is converted to RGB as transformers converts a
file (`_convert`: ``convert("RGB")``, which drops an alpha channel, then a white composite of
a transparency colour key such as a palette PNG's tRNS entry); it is resized with PIL bicubic
to `smart_resize`'s size, scaled by 1/255 (in float64, then float32), normalised with the
per-channel mean / std in float32 and laid out as `engine.modalities.vision.patchify` lays it
out (the frame repeated `temporal_patch_size` times). ``VisionRule(in_channels=1)`` converts that RGB
image with ``convert("L")``, our own convention for 1-channel parts. Animated images give
their first frame, as in PIL and transformers.

Videos (`video_grid`, `load_video`) are decoded with PyAV. The header values are those that
transformers' ``read_video_pyav`` uses: the first video stream's ``frames`` and
``average_rate`` (``guessed_rate`` when the container gives no average) and its coded
``width`` / ``height`` (rotation metadata and non-square pixels are ignored, as transformers
ignores them). When ``frames`` is 0 (Matroska / WebM do not store it) the frame count is
estimated as ``floor(duration * rate + 0.5)`` from the stream's duration in seconds (its
``duration``, else its Matroska ``DURATION`` tag, else the container's: `_stream_seconds`);
`load_video` then decodes by that estimate: a sampled index past the stream's actual end takes
the stream's last decoded frame, and frames past the estimate are never reached. With a
stored count, a stream that ends before the last sampled index is "corrupt".

Frames are sampled as ``Qwen2VLVideoProcessor.sample_frames(metadata, fps=rule.video_fps)``
samples them (`_sample_indices`: the same arithmetic and the same ``torch.arange`` call):
``num = total / rate * video_fps``, clipped to ``[min_frames, min(max_frames, total)]`` and
floored to a multiple of `temporal_patch_size`; indices ``arange(0, total, total / num)``. One
departure: a video with fewer frames than `temporal_patch_size` (where transformers divides by
zero) gives all its frames, padded temporally by repeating the last. Each sampled frame is
converted to RGB with ``to_ndarray(format="rgb24")`` (as ``read_video_pyav`` does) and goes
through the image path above, at the video's `smart_resize` size within the video pixel bounds
(``video_min_pixels`` / ``video_max_pixels``: Qwen2VLVideoProcessor's ``size`` defaults; its
optional per-video pixel budget ``cap_pixels_per_frame``, off by default in transformers 5.24,
is not applied). Transformers' video processor resizes with torchvision (an antialiased
bicubic tensor resize), while frames here are resized with PIL, as its image processor resizes
images: pixel values can differ from the torchvision path by interpolation error, while grids,
frame sampling and patch layout are identical. FFmpeg's text demuxers (which would play a .txt
file as ANSI art) are refused as "unsupported".

Audio (`audio_frames`, `load_audio`) is read with soundfile (WAV, FLAC, OGG, MP3, ... whatever
libsndfile reads) as float32, mixed down to mono as the float32 mean of its channels,
resampled to 16 kHz with ``soxr.resample(x, rate, 16000, quality="HQ")`` (skipped at 16 kHz),
whose output has ``int(n * 16000 / rate + 0.5)`` samples (soxr rounds half up), and turned
into Whisper's log-mel features as the released processors compute them (Qwen2-Audio's and
``Qwen2_5OmniProcessor``: ``WhisperFeatureExtractor(padding="max_length",
return_attention_mask=True)``, the thinker keeping the frames of ``feature_attention_mask``):
``ceil(samples / 160)`` frames (the attention mask subsampled every 160 samples) of the features
of the waveform zero-padded to 30 s. `_whisper_features` gets them from
`engine.modalities.audio.log_mel` on the waveform zero-padded to ``ceil(samples / 160) * 160 +
400`` samples (at most 30 s): every frame whose window touches the signal is then computed as on
the 30 s waveform (the first frames' reflect padding reads the same samples, the last frames see
zeros), the frames past it sit at the log floor and leave the ``max - 8`` clamp alone, and the
first ``ceil(samples / 160)`` frames are kept. (``log_mel`` alone, on the unpadded waveform,
gives ``samples // 160`` frames whose last ones differ.) Any clip of at least one sample is
long enough; `AudioRule.min_frames` sets the floor. `audio_frames` predicts the count from
``soundfile.info``'s frame count and sample rate alone; `load_audio` checks the decoded sample
count against the header (a mismatch is "corrupt"), and non-finite samples are "corrupt".

Audio inside videos (`video_audio_frames`, `load_video_audio`; read under
``data.use_audio_in_video``, as Qwen2.5-Omni's processor reads a video's own track with
``use_audio_in_video=True``) is the container's first audio stream, decoded with PyAV and converted
to float32 as soundfile reads PCM (integers scaled by 1 / 2^(bits - 1), unsigned 8-bit centred),
then the audio path above from the mix-down on (mono mean, soxr "HQ" to 16 kHz, log-mel: the same
code as `load_audio`). Its length comes from the header: ``floor(seconds * rate + 0.5)`` samples,
``seconds`` the audio stream's own duration (MP4 / MOV: its edit list's, exact to the millisecond),
else its Matroska ``DURATION`` tag, else the container's (`_stream_seconds`), ``rate`` the stream's
sample rate; frames and the missing / too_short / too_long / empty_audio rules are then those of
`audio_frames`. The decoded track is fitted to that count: samples past it are dropped (encoder
padding, such as the rest of AAC's last 1024-sample frame), and a track that ends before it is
padded with silence, unless the count is the stream's own duration and the track ends more than
0.1 s early ("corrupt"). A video file without an audio stream gives None: the video is read alone,
as transformers' processor skips a silent video's audio. Transformers itself decodes the track with
torchcodec (FFmpeg's resampler and down-mix); the samples here follow the soundfile path instead.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from engine.data.errors import DataError
from engine.modalities.audio import HOP_LENGTH, N_FFT, SAMPLE_RATE, log_mel
from engine.modalities.vision import patchify

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "REASONS", "AudioRule", "MediaError", "VisionRule", "audio_frames",
           "image_grid", "load_audio", "load_image", "load_video", "load_video_audio", "smart_resize",
           "video_audio_frames", "video_grid", "video_timing"]

PathLike = Union[str, "os.PathLike[str]"]

REASONS = ("missing", "corrupt", "unsupported", "empty_audio", "no_frames", "too_long", "too_short", "changed")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # transformers.image_utils, Qwen2-VL's defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

WHISPER_SAMPLES = 30 * SAMPLE_RATE   # WhisperFeatureExtractor pads every clip with zeros to 30 s

# Suffixes of containers PyAV (FFmpeg) is meant to read as video: a file with one of these
# that FFmpeg cannot open is "corrupt", any other unreadable file "unsupported".
_VIDEO_SUFFIXES = frozenset((".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".flv", ".wmv", ".asf", ".mpg",
                             ".mpeg", ".m2v", ".ts", ".mts", ".m2ts", ".3gp", ".3g2", ".ogv", ".ogg", ".gif", ".vob",
                             ".mxf", ".y4m", ".h264", ".264", ".hevc", ".265", ".ivf", ".nut", ".dv"))
# FFmpeg demuxers that render text files (.txt, .nfo, ANSI art) as "video": refused as unsupported.
_TEXT_FORMATS = frozenset(("tty", "bin", "xbin", "adf", "idf"))
# Suffixes libsndfile reads besides its format names (soundfile.available_formats()).
_AUDIO_SUFFIX_ALIASES = frozenset(("AIF", "AIFC", "WAVE", "OGA", "OPUS", "SND", "MPEG", "MP2", "MP1"))

# EXIF orientation -> PIL transpose, as PIL.ImageOps.exif_transpose maps it (values of Image.Transpose).
_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSE_BY_ORIENTATION = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
                             6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}

_FIX = {
    "missing": "check the path named in the conversation, and that the file exists and is readable",
    "corrupt": "re-export or re-download the file, or remove the sample",
    "unsupported_image": "convert it to PNG or JPEG",
    "unsupported_audio": "convert it to WAV or FLAC",
    "unsupported_video": "re-encode it to MP4 (H.264), e.g. ffmpeg -i in -c:v libx264 out.mp4",
    "empty_audio": "remove the empty clip from the conversation",
    "no_frames": "re-encode the video (ffmpeg -i in -c:v libx264 out.mp4) or remove the sample",
}


class MediaError(DataError):
    """A media file that cannot become a part's payload. `reason` is a short key for skip
    counters: missing, corrupt, unsupported, empty_audio, no_frames, too_long or too_short;
    the message is one line naming the file and the fix."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keeps both arguments across pickling (data-loader workers)
        return type(self), (self.reason, str(self))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _error(reason: str, path: PathLike, what: str, fix: str, cause: BaseException | None = None) -> MediaError:
    detail = f" ({_one_line(cause)})" if cause is not None else ""
    message = " ".join(f"{os.fspath(path)}: {what}{detail}; {fix}".split())
    return MediaError(reason, message)


def _check_file(path: PathLike, kind: str) -> Path:
    p = Path(os.fspath(path))
    if not p.is_file():
        what = f"{kind} file {'is a directory' if p.is_dir() else 'not found'}"
        raise _error("missing", path, what, _FIX["missing"])
    if not os.access(p, os.R_OK):
        raise _error("missing", path, f"{kind} file is not readable (permission denied)", _FIX["missing"])
    return p


# ---------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class VisionRule:
    """How images and videos become `vision` payloads (Qwen2-VL's processors' settings).

    Defaults are transformers' ``Qwen2VLImageProcessor`` (patch 14, merge 2, temporal patch 2,
    56*56 to 28*28*1280 pixels, CLIP mean / std) and ``Qwen2VLVideoProcessor`` (4 to 768 frames,
    128*28*28 to 768*28*28 pixels per frame); ``video_fps`` 2 is qwen-vl-utils' sampling rate.
    ``in_channels`` 3 converts to RGB, 1 to grayscale (PIL "L"); mean / std have one value per channel.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    video_fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28

    def __post_init__(self):
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "video_min_pixels",
                     "min_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"VisionRule: {name}={getattr(self, name)} must be >= 1")
        if self.in_channels not in (1, 3):
            raise ValueError(f"VisionRule: in_channels={self.in_channels} must be 3 (RGB) or 1 (grayscale)")
        for name in ("image_mean", "image_std"):
            if len(getattr(self, name)) != self.in_channels:
                raise ValueError(f"VisionRule: {name}={getattr(self, name)} needs one value per channel "
                                 f"(in_channels={self.in_channels})")
        if min(self.image_std) <= 0:
            raise ValueError(f"VisionRule: image_std={self.image_std} must be positive")
        for lo, hi in (("min_pixels", "max_pixels"), ("video_min_pixels", "video_max_pixels")):
            if getattr(self, hi) < max(getattr(self, lo), self.factor ** 2):
                raise ValueError(f"VisionRule: {hi}={getattr(self, hi)} must be >= {lo}={getattr(self, lo)} and "
                                 f">= (patch_size * merge_size)^2 = {self.factor ** 2}")
        if not self.video_fps > 0:
            raise ValueError(f"VisionRule: video_fps={self.video_fps} must be > 0")
        if min(self.min_frames, self.max_frames) < self.temporal_patch_size:
            # (then a video of at least one temporal patch samples at least one; max_frames wins over min_frames)
            raise ValueError(f"VisionRule: min_frames={self.min_frames} and max_frames={self.max_frames} must be >= "
                             f"temporal_patch_size={self.temporal_patch_size}")

    @property
    def factor(self) -> int:
        """Resized heights and widths are multiples of this: patch_size * merge_size."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class AudioRule:
    """How audio becomes an `audio` payload: Whisper log-mel features at 16 kHz.

    ``max_frames`` 3000 is Whisper's 30 s window (the encoder's 2 * max_source_positions);
    ``min_frames``: the fewest frames a clip may have (the audio part's own minimum is
    2 * pool_stride - 1)."""

    sample_rate: int = SAMPLE_RATE
    num_mel_bins: int = 80
    min_frames: int = 1
    max_frames: int = 3000

    def __post_init__(self):
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError(f"AudioRule: sample_rate={self.sample_rate}, Whisper features are computed at "
                             f"{SAMPLE_RATE} Hz")
        if self.num_mel_bins < 1 or not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"AudioRule: need num_mel_bins >= 1 and 1 <= min_frames <= max_frames, got "
                             f"{self.num_mel_bins}, {self.min_frames}, {self.max_frames}")


# ---------------------------------------------------------------------------------------- resize


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's target size (transformers' ``smart_resize``): height and width multiples of
    `factor`, close to the input's aspect ratio, with min_pixels <= h*w <= max_pixels where
    possible. Raises MediaError("unsupported") for an aspect ratio over 200, as transformers
    raises ValueError, and MediaError("corrupt") for an empty size."""
    if height < 1 or width < 1:
        raise MediaError("corrupt", f"{height} x {width} pixels: an image or frame without pixels; "
                                    "re-export the file")
    if max(height, width) / min(height, width) > 200:
        raise MediaError("unsupported", f"{height} x {width} pixels: aspect ratio "
                                        f"{max(height, width) / min(height, width):.1f} is over 200, which Qwen2-VL "
                                        "refuses; crop or pad the image")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _resized(path: PathLike, height: int, width: int, factor: int, lo: int, hi: int) -> tuple[int, int]:
    try:
        return smart_resize(height, width, factor, lo, hi)
    except MediaError as e:
        raise MediaError(e.reason, f"{os.fspath(path)}: {e}") from None


# ---------------------------------------------------------------------------------------- images


def _open_image(path: PathLike):
    """(PIL image opened lazily: header parsed, pixels not decoded; its EXIF transpose or None)."""
    p = _check_file(path, "image")
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(p)
    except UnidentifiedImageError as e:
        Image.init()
        if p.suffix.lower() in Image.registered_extensions():
            raise _error("corrupt", path, "image header unreadable", _FIX["corrupt"], e) from None
        raise _error("unsupported", path, "not an image format Pillow reads", _FIX["unsupported_image"], e) from None
    except Image.DecompressionBombError as e:
        raise _error("unsupported", path, "image too large for Pillow's decompression-bomb limit",
                     "downscale the image", e) from None
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise _error("missing", path, "image file cannot be opened", _FIX["missing"], e) from None
    except Exception as e:  # noqa: BLE001  (plugins raise OSError, SyntaxError, ValueError, struct.error, ...)
        raise _error("corrupt", path, "image header unreadable", _FIX["corrupt"], e) from None
    return img, _image_orientation(img)


def _image_orientation(img):
    """The PIL transpose of the image's EXIF orientation (None: upright), read from what
    ``Image.open`` parsed: the EXIF block (or XMP orientation) of JPEG / WebP / TIFF headers and
    of PNG chunks before the pixel data. PIL's ``exif_transpose`` loads the pixels first, so it
    would also see a PNG eXIf chunk stored after the pixel data (rare); this does not, so that
    `image_grid` needs no decode. An unreadable EXIF block counts as upright."""
    from PIL import Image

    try:
        orientation = Image.Image.getexif(img).get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # noqa: BLE001
        return None
    name = _TRANSPOSE_BY_ORIENTATION.get(orientation)
    return None if name is None else Image.Transpose[name]


def _upright_size(img, transpose) -> tuple[int, int]:
    """(height, width) after the EXIF transpose."""
    from PIL import Image

    width, height = img.size
    if transpose in (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90,
                     Image.Transpose.ROTATE_270):
        width, height = height, width
    return height, width


def _normalise(pil_image, rule: VisionRule, height: int, width: int) -> np.ndarray:
    """[C, height, width] float32: a PIL image (already RGB / L) resized bicubic to height x width,
    then x / 255 and (x - mean) / std, in the dtypes of transformers' PIL backend (rescale in
    float64 then float32, normalise in float32), computed once per byte value (`_byte_table`)."""
    from PIL import Image

    resized = np.asarray(pil_image.resize((width, height), resample=Image.Resampling.BICUBIC))
    planes = resized[None] if resized.ndim == 2 else resized.transpose(2, 0, 1)
    table = _byte_table(rule.image_mean, rule.image_std)
    out = np.empty(planes.shape, np.float32)
    for c in range(planes.shape[0]):
        np.take(table[c], planes[c], out=out[c])
    return out


@functools.lru_cache(maxsize=16)
def _byte_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[C, 256] float32: the normalised value of each byte value per channel, computed as
    transformers computes it pixel by pixel, so a lookup gives the same bits."""
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (scaled[None] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]


def _image_patches(frame: np.ndarray, rule: VisionRule) -> torch.Tensor:
    """`patchify` of one [C, H, W] frame (repeated `temporal_patch_size` times), written with one
    broadcast copy instead of a concatenation and a permuted copy: the same values, in a few ms
    for a megapixel image."""
    c, height, width = frame.shape
    p, m, t = rule.patch_size, rule.merge_size, rule.temporal_patch_size
    h, w = height // p, width // p
    windows = frame.reshape(c, h // m, m, p, w // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # (h/m, w/m, m, m, C, P, P)
    out = np.empty((h // m, w // m, m, m, c, t, p, p), np.float32)
    out[...] = windows[:, :, :, :, :, None]
    return torch.from_numpy(out.reshape(h * w, c * t * p * p))


def _convert(img, rule: VisionRule):
    """The image as transformers' Qwen2-VL image processor sees a file: ``load_image``'s
    ``convert("RGB")`` (alpha channels dropped), then the processor's ``convert_to_rgb``, which
    composites onto white what still carries a transparency key (the tRNS colour of palette, RGB
    or gray PNGs, GIF transparency: PIL keeps it in ``info`` through the conversion). For
    ``in_channels=1``, that RGB image converted to "L"."""
    from PIL import Image

    rgb = img.convert("RGB")
    if rgb.info.get("transparency") is not None:
        rgba = rgb.convert("RGBA")
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return rgb if rule.in_channels == 3 else rgb.convert("L")


def image_grid(path: PathLike, rule: VisionRule | None = None) -> tuple[int, int, int]:
    """(t=1, h, w) in patches of `load_image(path, rule)`, from the file's header only (its size
    and EXIF orientation; no pixel decode)."""
    rule = rule or VisionRule()
    img, transpose = _open_image(path)
    with img:
        height, width = _upright_size(img, transpose)
    h, w = _resized(path, height, width, rule.factor, rule.min_pixels, rule.max_pixels)
    return 1, h // rule.patch_size, w // rule.patch_size


def load_image(path: PathLike, rule: VisionRule | None = None) -> dict[str, torch.Tensor]:
    """{"pixel_values": float32 [h*w, C*T*P*P], "grid_thw": long [1, 3]}: Qwen2-VL's image
    processor on the file (see the module docstring)."""
    rule = rule or VisionRule()
    img, transpose = _open_image(path)
    with img:
        height, width = _upright_size(img, transpose)
        h, w = _resized(path, height, width, rule.factor, rule.min_pixels, rule.max_pixels)
        try:
            img.load()
            converted = _convert(img if transpose is None else img.transpose(transpose), rule)
        except Exception as e:  # noqa: BLE001  (truncated data: OSError; broken chunks: SyntaxError, zlib.error, ...)
            raise _error("corrupt", path, "image data unreadable", _FIX["corrupt"], e) from None
    pixel_values = _image_patches(_normalise(converted, rule, h, w), rule)
    grid = torch.tensor([[1, h // rule.patch_size, w // rule.patch_size]], dtype=torch.long)
    return {"pixel_values": pixel_values, "grid_thw": grid}


# ---------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class _VideoHeader:
    total: int          # frames in the stream (stored, or estimated from the duration)
    fps: float          # average frame rate
    height: int
    width: int
    estimated: bool     # total was estimated from duration * fps


def _open_video(path: PathLike):
    p = _check_file(path, "video")
    import av

    try:
        container = av.open(os.fspath(p), mode="r")
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:
        raise _error("missing", path, "video file cannot be opened", _FIX["missing"], e) from None
    except Exception as e:  # noqa: BLE001  (av.error.InvalidDataError, EOFError, ...)
        if p.suffix.lower() in _VIDEO_SUFFIXES:
            raise _error("corrupt", path, "video container unreadable", _FIX["corrupt"], e) from None
        raise _error("unsupported", path, "not a video format FFmpeg reads", _FIX["unsupported_video"], e) from None
    if set(container.format.name.split(",")) & _TEXT_FORMATS:
        container.close()
        raise _error("unsupported", path, f"FFmpeg reads it as text ({container.format.name} demuxer), not a video",
                     _FIX["unsupported_video"])
    return container


def _video_header(path: PathLike, container) -> tuple[object, _VideoHeader]:
    """(the first video stream, what its header says)."""
    if not container.streams.video:
        raise _error("no_frames", path, "no video stream in the file", _FIX["no_frames"])
    stream = container.streams.video[0]
    try:
        rate = stream.average_rate or stream.guessed_rate
        total, estimated = int(stream.frames or 0), False
        if total <= 0 and rate:
            seconds = _stream_seconds(stream, container)
            if seconds is not None:
                total, estimated = math.floor(seconds * float(rate) + 0.5), True
            else:
                total = -1
        height, width = int(stream.height or 0), int(stream.width or 0)
    except Exception as e:  # noqa: BLE001
        raise _error("corrupt", path, "video stream header unreadable", _FIX["corrupt"], e) from None
    if not rate or float(rate) <= 0:
        raise _error("unsupported", path, "no frame rate in the video stream's header",
                     _FIX["unsupported_video"])
    if total < 0:
        raise _error("unsupported", path, "neither a frame count nor a duration in the video header",
                     "remux it so the header records them, e.g. ffmpeg -i in -c copy out.mp4")
    if total == 0:
        raise _error("no_frames", path, "the video stream has no frames", _FIX["no_frames"])
    if height < 1 or width < 1:
        raise _error("corrupt", path, f"video frame size {width} x {height} in the header", _FIX["corrupt"])
    return stream, _VideoHeader(total, float(rate), height, width, estimated)


def _stream_seconds(stream, container) -> float | None:
    """A stream's duration in seconds: its own (``duration * time_base``), else the
    ``DURATION`` tag FFmpeg's Matroska / WebM muxer writes per stream ("HH:MM:SS.fffffffff"),
    else the container's (which spans all its streams); None when none is known."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = (stream.metadata or {}).get("DURATION")
    if tag:
        try:
            hours, minutes, secs = tag.split(":")
            return int(hours) * 3600 + int(minutes) * 60 + float(secs)
        except ValueError:
            pass
    if container.duration:
        return container.duration / 1_000_000   # av.time_base: microseconds
    return None


def _sample_indices(total: int, fps: float, rule: VisionRule) -> torch.Tensor:
    """Frame indices (int32) of `Qwen2VLVideoProcessor.sample_frames(metadata, fps=rule.video_fps)`
    for a video of `total` frames at `fps`: the same arithmetic, in the same order. A video
    shorter than one temporal patch gives all its frames (transformers divides by zero there)."""
    t = rule.temporal_patch_size
    max_frames = math.floor(min(rule.max_frames, total) / t) * t
    num_frames = total / fps * rule.video_fps
    num_frames = min(max(num_frames, rule.min_frames), max_frames, total)
    num_frames = math.floor(num_frames / t) * t
    if num_frames == 0:
        return torch.arange(0, total).int()
    return torch.arange(0, total, total / num_frames).int()


def _video_grid(path: PathLike, header: _VideoHeader, rule: VisionRule, n_frames: int) -> tuple[int, int, int]:
    h, w = _resized(path, header.height, header.width, rule.factor, rule.video_min_pixels, rule.video_max_pixels)
    return -(-n_frames // rule.temporal_patch_size), h // rule.patch_size, w // rule.patch_size


def video_grid(path: PathLike, rule: VisionRule | None = None) -> tuple[int, int, int]:
    """(t, h, w) in patches of `load_video(path, rule)`, from the container's and the first video
    stream's headers only (frame count or duration, average rate, width, height; no decode)."""
    return video_timing(path, rule)[0]


def video_timing(path: PathLike, rule: VisionRule | None = None) -> tuple[tuple[int, int, int], float]:
    """(`video_grid`, seconds one temporal patch spans) from the headers: Qwen2.5-VL's processor's
    ``second_per_grid_ts`` = temporal_patch_size / the sampled fps (sampled frames / all frames x
    the stream's rate, transformers' ``VideoMetadata.sampled_fps``)."""
    rule = rule or VisionRule()
    container = _open_video(path)
    with container:
        _, header = _video_header(path, container)
    n = len(_sample_indices(header.total, header.fps, rule))
    return _video_grid(path, header, rule, n), rule.temporal_patch_size / (n / header.total * header.fps)


def load_video(path: PathLike, rule: VisionRule | None = None) -> dict[str, torch.Tensor]:
    """{"pixel_values": float32 [t*h*w, C*T*P*P], "grid_thw": long [1, 3]}: frames sampled at
    `rule.video_fps`, resized and normalised like images, patchified with temporal patches
    (see the module docstring). The grid is `video_grid(path, rule)`."""
    from PIL import Image

    rule = rule or VisionRule()
    container = _open_video(path)
    with container:
        stream, header = _video_header(path, container)
        indices = _sample_indices(header.total, header.fps, rule).tolist()
        grid = _video_grid(path, header, rule, len(indices))
        height, width = grid[1] * rule.patch_size, grid[2] * rule.patch_size
        wanted, last_index = set(indices), indices[-1]

        def prepare(frame) -> np.ndarray:   # [C, height, width], normalised as soon as decoded
            return _normalise(_convert(Image.fromarray(frame.to_ndarray(format="rgb24")), rule), rule, height, width)

        picked: dict[int, np.ndarray] = {}
        last_frame, decoded = None, 0
        try:
            stream.codec_context.thread_type = "AUTO"   # frame threads: the same frames, faster
            for i, frame in enumerate(container.decode(stream)):
                if i > last_index:
                    break
                last_frame, decoded = frame, i + 1
                if i in wanted:
                    picked[i] = prepare(frame)
            if decoded == 0:
                raise _error("no_frames", path, "no frame of the video stream decodes", _FIX["no_frames"])
            if len(picked) < len(indices):
                if not header.estimated:
                    raise _error("corrupt", path, f"the header lists {header.total} frames but the stream ends "
                                                  f"after {decoded}", _FIX["corrupt"])
                tail = prepare(last_frame)   # the frame count was an estimate and the stream ended early
                for i in indices:
                    picked.setdefault(i, tail)
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001  (av.error.InvalidDataError, ...)
            raise _error("corrupt", path, f"video frame {decoded} cannot be decoded", _FIX["corrupt"], e) from None
    frames = torch.from_numpy(np.stack([picked[i] for i in indices]))
    del picked
    pixel_values, grid_row = patchify(frames, rule.patch_size, rule.temporal_patch_size,
                                      rule.merge_size)
    assert tuple(grid_row.tolist()) == grid, (grid_row, grid)
    return {"pixel_values": pixel_values, "grid_thw": grid_row[None]}


# ---------------------------------------------------------------------------------------- audio


def _audio_info(path: PathLike):
    p = _check_file(path, "audio")
    import soundfile

    try:
        return soundfile.info(os.fspath(p))
    except Exception as e:  # noqa: BLE001  (soundfile.LibsndfileError, ...)
        raise _audio_open_error(path, p, e) from None


def _audio_open_error(path: PathLike, p: Path, e: BaseException) -> MediaError:
    import soundfile

    suffix = p.suffix[1:].upper()
    if suffix in soundfile.available_formats() or suffix in _AUDIO_SUFFIX_ALIASES:
        return _error("corrupt", path, "audio file unreadable", _FIX["corrupt"], e)
    return _error("unsupported", path, "not an audio format libsndfile reads", _FIX["unsupported_audio"], e)


def _resampled_length(samples: int, rate: int) -> int:
    """Samples after `soxr.resample(x, rate, 16000)`: it rounds n * 16000 / rate half up."""
    return samples if rate == SAMPLE_RATE else int(samples * SAMPLE_RATE / rate + 0.5)


def _check_audio(path: PathLike, samples: int, rate: int, rule: AudioRule) -> int:
    """Log-mel frames of a clip of `samples` samples at `rate` Hz, or the MediaError it earns."""
    if samples <= 0:
        raise _error("empty_audio", path, "the audio has no samples", _FIX["empty_audio"])
    if rate <= 0:
        raise _error("corrupt", path, f"sample rate {rate} Hz in the audio header", _FIX["corrupt"])
    n = _resampled_length(samples, rate)
    frames = -(-n // HOP_LENGTH)   # ceil: the processors' attention mask, every 160th sample of the clip
    if frames < rule.min_frames:
        need = (rule.min_frames - 1) * HOP_LENGTH + 1
        raise _error("too_short", path, f"audio is {samples} samples at {rate} Hz = {n} at 16 kHz, {frames} log-mel "
                                        f"frames", f"clips need at least {need} samples at 16 kHz "
                                                   f"({rule.min_frames} frames); lengthen or remove it")
    if frames > rule.max_frames:
        raise _error("too_long", path, f"audio is {n / SAMPLE_RATE:.2f} s = {frames} log-mel frames, over "
                                       f"max_frames={rule.max_frames}",
                     f"split it into clips of at most {rule.max_frames * HOP_LENGTH / SAMPLE_RATE:g} s")
    return frames


def audio_frames(path: PathLike, rule: AudioRule | None = None) -> int:
    """Log-mel frames `load_audio(path, rule)` gives, from `soundfile.info` (frame count and sample
    rate) only: ``ceil(int(n * 16000 / rate + 0.5) / 160)``."""
    rule = rule or AudioRule()
    info = _audio_info(path)
    return _check_audio(path, int(info.frames), int(info.samplerate), rule)


def load_audio(path: PathLike, rule: AudioRule | None = None) -> dict[str, torch.Tensor]:
    """{"input_features": float32 [1, num_mel_bins, frames], "feature_lens": long [1]}: the file
    mixed to mono, resampled to 16 kHz (soxr "HQ"), Whisper's log-mel features; frames ==
    `audio_frames(path, rule)`."""
    rule = rule or AudioRule()
    info = _audio_info(path)
    frames = _check_audio(path, int(info.frames), int(info.samplerate), rule)
    import soundfile

    try:
        data, rate = soundfile.read(os.fspath(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001
        raise _error("corrupt", path, "audio data unreadable", _FIX["corrupt"], e) from None
    if data.shape[0] != info.frames or rate != info.samplerate:
        raise _error("corrupt", path, f"the header lists {info.frames} samples at {info.samplerate} Hz but "
                                      f"{data.shape[0]} at {rate} Hz decode", _FIX["corrupt"])
    return _log_mel_payload(path, data, rate, frames, rule)


def _mono_16k(path: PathLike, data: np.ndarray, rate: int) -> np.ndarray:
    """float32 [n'] at 16 kHz of float32 samples [n, channels] at `rate`: the channels' mean, then
    ``soxr.resample(x, rate, 16000, quality="HQ")`` (n' = `_resampled_length(n, rate)`)."""
    import soxr

    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1)
    if not np.isfinite(mono).all():
        raise _error("corrupt", path, "audio has non-finite (NaN or infinite) samples", _FIX["corrupt"])
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    if len(mono) != _resampled_length(data.shape[0], rate):   # soxr's length rule, relied on by the header counts
        raise RuntimeError(f"{os.fspath(path)}: soxr gave {len(mono)} samples, expected "
                           f"{_resampled_length(data.shape[0], rate)}")
    return mono


def _log_mel_payload(path: PathLike, data: np.ndarray, rate: int, frames: int,
                     rule: AudioRule) -> dict[str, torch.Tensor]:
    """The `audio` payload of float32 samples [n, channels] at `rate` whose header promised
    `frames` log-mel frames: `_mono_16k`, then `_whisper_features` (shared by files and videos)."""
    features = _whisper_features(_mono_16k(path, data, rate), rule.num_mel_bins)
    assert features.shape[1] == frames, (features.shape, frames)
    return {"input_features": features[None], "feature_lens": torch.tensor([frames], dtype=torch.long)}


def _whisper_features(wave: np.ndarray, num_mel_bins: int) -> torch.Tensor:
    """float32 [num_mel_bins, ceil(n / 160)]: the frames of a 16 kHz waveform [n] that
    ``WhisperFeatureExtractor(padding="max_length", return_attention_mask=True)`` marks valid, as
    it computes them on the waveform zero-padded to 30 s. `log_mel` runs on the waveform padded
    with zeros to ``ceil(n / 160) * 160 + 400`` samples (capped at 30 s for n <= 30 s, where the
    30 s waveform is then the same): every frame whose 400-sample window touches the signal is
    computed, reflect padding included, from the same samples as on the 30 s waveform, and the
    frames beyond, all zeros, sit at the log floor and do not move the ``max - 8`` clamp. (A clip
    over 30 s, allowed only by ``AudioRule.max_frames > 3000``, keeps all its frames, where the
    processors would cut it at 30 s.)"""
    frames = -(-len(wave) // HOP_LENGTH)
    size = frames * HOP_LENGTH + N_FFT
    if len(wave) <= WHISPER_SAMPLES:
        size = min(size, WHISPER_SAMPLES)
    padded = np.zeros(size, np.float32)
    padded[:len(wave)] = wave
    return log_mel(padded, SAMPLE_RATE, num_mel_bins)[:, :frames].contiguous()


# ---------------------------------------------------------------------------------------- audio inside videos

_SHORT_TRACK_SECONDS = 0.1   # a track may end this much before its stream's own duration (padded with silence)


@dataclass(frozen=True)
class _AudioTrack:
    samples: int        # samples the track gives: floor(seconds * rate + 0.5)
    rate: int           # the stream's sample rate
    estimated: bool     # seconds from a DURATION tag or the container, not the stream's own duration


def _audio_track(path: PathLike, container) -> Optional[tuple[object, _AudioTrack]]:
    """(the first audio stream, what its header says), or None when the file has no audio stream."""
    if not container.streams.audio:
        return None
    stream = container.streams.audio[0]
    try:
        rate = int(stream.sample_rate or stream.rate or 0)
        if stream.duration and stream.time_base:   # exact: Fraction time base (MP4: 1 / sample rate)
            samples, estimated = math.floor(Fraction(stream.duration) * stream.time_base * rate + Fraction(1, 2)), False
        else:
            seconds, estimated = _stream_seconds(stream, container), True
            samples = None if seconds is None else math.floor(seconds * rate + 0.5)
    except Exception as e:  # noqa: BLE001
        raise _error("corrupt", path, "audio stream header unreadable", _FIX["corrupt"], e) from None
    if rate <= 0:
        raise _error("corrupt", path, f"sample rate {rate} Hz in the audio stream's header", _FIX["corrupt"])
    if samples is None:
        raise _error("unsupported", path, "neither a duration in the audio stream's header nor the container's",
                     "remux it so the header records them, e.g. ffmpeg -i in -c copy out.mp4")
    return stream, _AudioTrack(samples, rate, estimated)


def _frame_samples(frame) -> np.ndarray:
    """float32 [samples, channels] of one decoded PyAV audio frame, scaled as soundfile reads
    PCM into float32: signed integers / 2^(bits - 1), unsigned 8-bit (x - 128) / 128."""
    x = frame.to_ndarray()
    x = x.T if frame.format.is_planar else x.reshape(-1, frame.layout.nb_channels)
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128) / 128
    if x.dtype.kind == "i":
        return (x / float(2 ** (8 * x.dtype.itemsize - 1))).astype(np.float32)
    return x.astype(np.float32, copy=False)


def _video_audio_samples(path: PathLike, rule: AudioRule) -> Optional[tuple[np.ndarray, int, int]]:
    """(float32 samples [header count, channels], rate, log-mel frames) of the video file's first
    audio stream, fitted to the header's count (module docstring); None without an audio stream."""
    container = _open_video(path)
    with container:
        found = _audio_track(path, container)
        if found is None:
            return None
        stream, track = found
        frames = _check_audio(path, track.samples, track.rate, rule)
        chunks, decoded = [], 0
        try:
            for frame in container.decode(stream):
                if frame.sample_rate != track.rate:
                    raise _error("corrupt", path, f"an audio frame at {frame.sample_rate} Hz in a {track.rate} Hz "
                                                  "stream", _FIX["corrupt"])
                chunks.append(_frame_samples(frame)[: track.samples - decoded])
                decoded += chunks[-1].shape[0]
                if decoded >= track.samples:
                    break
            data = np.concatenate(chunks) if chunks else np.zeros((0, stream.layout.nb_channels or 1), np.float32)
        except MediaError:
            raise
        except Exception as e:  # noqa: BLE001  (av.error.InvalidDataError, channel counts that change, ...)
            raise _error("corrupt", path, f"audio sample {decoded} cannot be decoded", _FIX["corrupt"], e) from None
    short = track.samples - data.shape[0]
    if short > 0:
        if not track.estimated and short > _SHORT_TRACK_SECONDS * track.rate:
            raise _error("corrupt", path, f"the audio stream's header lists {track.samples} samples but the track "
                                          f"ends after {data.shape[0]}", _FIX["corrupt"])
        data = np.concatenate([data, np.zeros((short, data.shape[1]), np.float32)])
    return data, track.rate, frames


def video_audio_frames(path: PathLike, rule: AudioRule | None = None) -> Optional[int]:
    """Log-mel frames `load_video_audio(path, rule)` gives (None: the file has no audio stream),
    from the container's and the audio stream's headers only (duration, sample rate; no decode):
    ``ceil(int(n * 16000 / rate + 0.5) / 160)`` for ``n = floor(seconds * rate + 0.5)`` samples."""
    rule = rule or AudioRule()
    container = _open_video(path)
    with container:
        found = _audio_track(path, container)
    return None if found is None else _check_audio(path, found[1].samples, found[1].rate, rule)


def load_video_audio(path: PathLike, rule: AudioRule | None = None) -> Optional[dict[str, torch.Tensor]]:
    """The `audio` payload of a video file's own audio track ({"input_features": float32 [1,
    num_mel_bins, frames], "feature_lens": long [1]}, as `load_audio` gives a clip), or None when
    the file has no audio stream; frames == `video_audio_frames(path, rule)`."""
    rule = rule or AudioRule()
    found = _video_audio_samples(path, rule)
    return None if found is None else _log_mel_payload(path, *found, rule)
