"""engine.data.media against transformers' Qwen2-VL processors and Whisper feature extractor.

References (transformers 5.24, installed without torchvision):
- `smart_resize` and `Qwen2VLImageProcessorPil` (image_processing_pil_qwen2_vl.py), fed the file
  path, which it loads with `transformers.image_utils.load_image`;
- `Qwen2VLVideoProcessor.sample_frames` / `.patchify` (video_processing_qwen2_vl.py, imported
  with stub torchvision modules, which only its resize path uses), `transformers.video_utils.
  read_video_pyav` and `VideoMetadata`; each sampled frame resized / rescaled / normalised with
  the PIL image processor's own methods at the video pixel bounds;
- `WhisperFeatureExtractor(feature_size=mel)` called as the released processors call it
  (Qwen2-Audio's, Qwen2_5OmniProcessor: padding="max_length", return_attention_mask=True, the
  frames its attention mask marks), on the mono waveform resampled by the same
  `soxr.resample(..., quality="HQ")` call (soxr itself is the reference for the resampling).
Media files are generated into tmp_path with numpy, Pillow, soundfile and PyAV.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from engine.data import media
from engine.data.media import AudioRule, MediaError, VisionRule
from engine.modalities.vision import patchify

pytest.importorskip("transformers")
av = pytest.importorskip("av")
sf = pytest.importorskip("soundfile")
soxr = pytest.importorskip("soxr")
from PIL import Image
from transformers import WhisperFeatureExtractor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.video_utils import VideoMetadata, read_video_pyav

av.logging.set_level(None)  # decoding deliberately broken files logs FFmpeg errors


_TORCHVISION_STUBS = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
                      "torchvision.transforms.v2.functional")
_VIDEO_MODULE = "transformers.models.qwen2_vl.video_processing_qwen2_vl"


@pytest.fixture(scope="module")
def hf_video():
    """(video_processing_qwen2_vl module, a Qwen2VLVideoProcessor): imported with stub torchvision
    modules, only to reach sample_frames / patchify (pure torch); sys.modules is restored after."""
    saved = {name: sys.modules.get(name) for name in (*_TORCHVISION_STUBS, _VIDEO_MODULE)}
    try:
        for name in _TORCHVISION_STUBS:
            sys.modules[name] = types.ModuleType(name)
        for parent, child in itertools.pairwise(_TORCHVISION_STUBS):
            setattr(sys.modules[parent], child.rsplit(".", 1)[1], sys.modules[child])
        sys.modules.pop(_VIDEO_MODULE, None)
        module = importlib.import_module(_VIDEO_MODULE)
        processor = module.Qwen2VLVideoProcessor()
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod
        package = sys.modules.get("transformers.models.qwen2_vl")
        if package is not None and saved[_VIDEO_MODULE] is None and "video_processing_qwen2_vl" in vars(package):
            delattr(package, "video_processing_qwen2_vl")
    return module, processor


# ------------------------------------------------------------------------------------ helpers


def _picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """[h, w, 3] uint8: gradients, a disc and noise (so resampling matters)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    disc = ((y - h / 2) ** 2 + (x - w / 3) ** 2 < (min(h, w) / 3) ** 2) * 90.0
    base = np.stack([255 * x / max(w - 1, 1), 255 * y / max(h - 1, 1), disc + 60], -1)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _hf_image_processor(rule: VisionRule) -> Qwen2VLImageProcessorPil:
    return Qwen2VLImageProcessorPil(patch_size=rule.patch_size, merge_size=rule.merge_size,
                                    temporal_patch_size=rule.temporal_patch_size,
                                    size={"shortest_edge": rule.min_pixels, "longest_edge": rule.max_pixels})


def _write_video(path, n: int, fps: int, w: int = 64, h: int = 48, codec: str = "libx264",
                 audio_seconds: float = 0.0) -> None:
    """n frames at fps (a moving block over a noisy picture); with audio_seconds, also a silent
    AAC stream of that length (so the container lasts longer than the video)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        audio = container.add_stream("aac", rate=16000) if audio_seconds else None
        for i in range(n):
            frame = _picture(h, w, seed=100 + i)
            frame[: 4 + (i * 3) % (h - 4), : 4 + (i * 5) % (w - 4), 1] = 255 - 7 * i % 256  # moving block
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        for k in range(int(audio_seconds * 16000) // 1024 if audio else 0):
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, k * 1024
            for packet in audio.encode(chunk):
                container.mux(packet)
        for packet in audio.encode() if audio else []:
            container.mux(packet)


def _assert_media_error(reason: str, path, fn, *args):
    with pytest.raises(MediaError) as info:
        fn(path, *args)
    err = info.value
    assert err.reason == reason, (fn.__name__, str(err))
    message = str(err)
    assert str(path) in message and "\n" not in message and "; " in message, message
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is MediaError and again.reason == reason and str(again) == message
    return message


# ------------------------------------------------------------------------------------ defaults and smart_resize


def test_rule_defaults_match_transformers(hf_video):
    _, video = hf_video
    image = Qwen2VLImageProcessorPil()
    rule = VisionRule()
    assert media.OPENAI_CLIP_MEAN == tuple(OPENAI_CLIP_MEAN) and media.OPENAI_CLIP_STD == tuple(OPENAI_CLIP_STD)
    assert (rule.patch_size, rule.merge_size, rule.temporal_patch_size) == (
        image.patch_size, image.merge_size, image.temporal_patch_size)
    assert (rule.min_pixels, rule.max_pixels) == (image.size.shortest_edge, image.size.longest_edge)
    assert rule.image_mean == tuple(image.image_mean) and rule.image_std == tuple(image.image_std)
    assert (rule.min_frames, rule.max_frames) == (video.min_frames, video.max_frames)
    assert (rule.video_min_pixels, rule.video_max_pixels) == (video.size.shortest_edge, video.size.longest_edge)
    assert rule.temporal_patch_size == video.temporal_patch_size
    with pytest.raises(ValueError, match="one value per channel"):
        VisionRule(in_channels=1)
    with pytest.raises(ValueError, match="temporal_patch_size"):
        VisionRule(max_frames=1)
    with pytest.raises(ValueError, match="16000"):
        AudioRule(sample_rate=8000)


def test_smart_resize_matches_transformers():
    sizes = [1, 2, 13, 27, 28, 29, 55, 56, 57, 100, 223, 224, 225, 333, 479, 512, 640, 1000, 1080, 1920, 4000, 5000]
    bounds = [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (4, 10_000), (64 * 64, 64 * 64 * 16)]
    checked = 0
    for factor in (28, 8, 32):
        for lo, hi in bounds:
            if hi < factor * factor:
                continue
            for h in sizes:
                for w in sizes:
                    if max(h, w) / min(h, w) > 200:
                        with pytest.raises(ValueError):
                            hf_smart_resize(h, w, factor, lo, hi)
                        with pytest.raises(MediaError) as info:
                            media.smart_resize(h, w, factor, lo, hi)
                        assert info.value.reason == "unsupported"
                        continue
                    assert media.smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), \
                        (h, w, factor, lo, hi)
                    checked += 1
    assert checked > 1000


# ------------------------------------------------------------------------------------ images


def _image_files(tmp_path) -> list:
    files = []

    def save(name, img, **kw):
        path = tmp_path / name
        img.save(path, **kw)
        files.append(path)

    save("rgb_tiny.png", Image.fromarray(_picture(20, 30, 1)))              # below min_pixels: upscaled
    save("rgb_large.png", Image.fromarray(_picture(1200, 1000, 2)))         # above max_pixels: downscaled
    save("rgb_odd.png", Image.fromarray(_picture(333, 517, 3)))
    save("rgb_wide.png", Image.fromarray(_picture(30, 1500, 4)))            # aspect 50
    rgba = np.concatenate([_picture(101, 77, 5), np.random.default_rng(5).integers(0, 256, (101, 77, 1),
                                                                                      dtype=np.uint8)], -1)
    save("rgba.png", Image.fromarray(rgba, "RGBA"))
    save("gray.png", Image.fromarray(_picture(90, 140, 6)[..., 0], "L"))
    save("palette.png", Image.fromarray(_picture(64, 96, 7)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    save("palette_transparent.png", Image.fromarray(_picture(64, 96, 8)).convert("P", palette=Image.Palette.ADAPTIVE),
         transparency=3)
    keyed = _picture(70, 90, 12)
    keyed[10:40, 20:60] = (10, 20, 30)
    save("rgb_colour_key.png", Image.fromarray(keyed), transparency=(10, 20, 30))  # tRNS: composited on white
    save("palette.gif", Image.fromarray(_picture(60, 80, 13)).convert("P", palette=Image.Palette.ADAPTIVE),
         transparency=5)
    save("gray16.png", Image.fromarray(_picture(50, 70, 9)[..., 0].astype(np.uint16) * 257))
    save("photo.jpg", Image.fromarray(_picture(800, 1000, 10)), quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: width and height swap
    save("rotated.jpg", Image.fromarray(_picture(120, 300, 11)), exif=exif.tobytes())
    return files


@pytest.mark.parametrize("rule", [VisionRule(), VisionRule(patch_size=8, merge_size=2, temporal_patch_size=1,
                                                           min_pixels=32 * 32, max_pixels=256 * 256)],
                         ids=["default", "patch8_t1"])
def test_images_match_transformers(tmp_path, rule):
    processor = _hf_image_processor(rule)
    max_diff = 0.0
    for path in _image_files(tmp_path):
        ours = media.load_image(path, rule)
        ref = processor(images=str(path), return_tensors="np")
        grid = tuple(ref["image_grid_thw"][0].tolist())
        assert tuple(ours["grid_thw"][0].tolist()) == grid == media.image_grid(path, rule), path.name
        assert ours["grid_thw"].dtype == torch.long and ours["grid_thw"].shape == (1, 3)
        assert ours["pixel_values"].dtype == torch.float32
        assert ours["pixel_values"].shape == ref["pixel_values"].shape, path.name
        max_diff = max(max_diff, float(np.abs(ours["pixel_values"].numpy() - ref["pixel_values"]).max()))
        if path.name == "rotated.jpg":
            assert grid[1] > grid[2]  # upright: taller than wide
    assert max_diff <= 1e-5, max_diff
    print(f"images ({rule.patch_size=}): max |ours - transformers| = {max_diff:.3g}")


def test_grayscale_small_patches(tmp_path):
    """A 1-channel rule (our own convention: PIL convert("L")), patch 4, mean / std 0.5."""
    rule = VisionRule(patch_size=4, merge_size=2, temporal_patch_size=2, in_channels=1, min_pixels=8 * 8,
                      max_pixels=64 * 64, image_mean=(0.5,), image_std=(0.5,))
    for i, (h, w, mode) in enumerate([(37, 53, "RGB"), (200, 150, "RGBA"), (5, 9, "L")]):
        path = tmp_path / f"g{i}.png"
        pixels = _picture(h, w, 20 + i)
        img = Image.fromarray(pixels) if mode == "RGB" else Image.fromarray(pixels[..., 0]) if mode == "L" else \
            Image.fromarray(np.concatenate([pixels, pixels[..., :1]], -1), "RGBA")
        img.save(path)
        ours = media.load_image(path, rule)
        rh, rw = hf_smart_resize(h, w, 8, rule.min_pixels, rule.max_pixels)
        gray = np.asarray(Image.open(path).convert("L").resize((rw, rh), Image.Resampling.BICUBIC), np.float64)
        frame = torch.from_numpy(((gray / 255 - 0.5) / 0.5).astype(np.float32))[None]
        ref, grid = patchify(frame, 4, 2, 2)
        assert tuple(ours["grid_thw"][0].tolist()) == tuple(grid.tolist()) == (1, rh // 4, rw // 4)
        assert media.image_grid(path, rule) == (1, rh // 4, rw // 4)
        assert ours["pixel_values"].shape == (rh * rw // 16, 1 * 2 * 4 * 4)
        assert torch.allclose(ours["pixel_values"], ref, atol=1e-6, rtol=0)  # reference in float64


def test_image_patch_layout_is_patchify():
    frame = torch.randn(3, 48, 96)
    for p, m, t in ((4, 2, 2), (8, 1, 1), (6, 2, 3), (12, 2, 2)):
        rule = VisionRule(patch_size=p, merge_size=m, temporal_patch_size=t, min_frames=max(4, t),
                          max_pixels=max(28 * 28 * 1280, (p * m) ** 2))
        assert torch.equal(media._image_patches(frame.numpy(), rule), patchify(frame, p, t, m)[0])


# ------------------------------------------------------------------------------------ video


def _sample_kwargs(rule: VisionRule) -> dict:
    return {"fps": rule.video_fps, "temporal_patch_size": rule.temporal_patch_size, "min_frames": rule.min_frames,
            "max_frames": rule.max_frames}


def test_sample_indices_match_transformers(hf_video):
    _, video = hf_video
    checked = 0
    for rule in (VisionRule(), VisionRule(video_fps=5.0, max_frames=8), VisionRule(video_fps=3.0, min_frames=2),
                 VisionRule(video_fps=0.5, min_frames=6, max_frames=4),   # max_frames wins, as in transformers
                 VisionRule(temporal_patch_size=3, min_frames=3, max_frames=30, video_fps=1.5)):
        for total in list(range(rule.temporal_patch_size, 70)) + [97, 241, 1000, 1799, 30000]:
            for fps in (1.0, 2.5, 3.0, 10.0, 23.976, 25.0, 29.97, 30.0, 60.0):
                ref = video.sample_frames(VideoMetadata(total_num_frames=total, fps=fps), **_sample_kwargs(rule))
                ours = media._sample_indices(total, fps, rule)
                assert torch.equal(ours, ref), (total, fps, rule)
                checked += 1
    assert checked > 2000
    assert media._sample_indices(1, 10.0, VisionRule()).tolist() == [0]   # transformers divides by zero here


def _video_reference(path, rule: VisionRule, hf_video, total=None):
    """(pixel_values, grid) by transformers' pieces: sample_frames, read_video_pyav (or a PyAV
    decode where the header has no frame count), the PIL image processor's resize / rescale /
    normalize at the video pixel bounds, the video processor's patchify."""
    module, video = hf_video
    sample = functools.partial(video.sample_frames, **_sample_kwargs(rule))
    if total is None:
        frames, _ = read_video_pyav(str(path), sample_indices_fn=sample)
    else:  # no frame count in the header: metadata with the true count, frames decoded here
        with av.open(str(path)) as container:
            rate = float(container.streams.video[0].average_rate)
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(decoded) == total
        indices = sample(VideoMetadata(total_num_frames=total, fps=rate)) if total >= rule.temporal_patch_size \
            else torch.arange(total)
        frames = np.stack([decoded[i] for i in indices.tolist()])
    image = _hf_image_processor(rule)
    size = SizeDict(shortest_edge=rule.video_min_pixels, longest_edge=rule.video_max_pixels)
    out = []
    for frame in frames:
        x = image.resize(np.moveaxis(frame, -1, 0), size=size, resample=PILImageResampling.BICUBIC, factor=rule.factor)
        out.append(image.normalize(image.rescale(x, 1 / 255), list(rule.image_mean), list(rule.image_std)))
    videos = torch.from_numpy(np.stack(out))[None]
    patches, t, h, w = video.patchify(videos, patch_size=rule.patch_size, merge_size=rule.merge_size,
                                      temporal_patch_size=rule.temporal_patch_size)
    hh, ww = module.smart_resize(frames.shape[1], frames.shape[2], rule.factor, rule.video_min_pixels,
                                 rule.video_max_pixels)
    assert (h, w) == (hh // rule.patch_size, ww // rule.patch_size)
    return patches[0], (t, h, w)


def test_videos_match_transformers(tmp_path, hf_video):
    small = {"video_min_pixels": 28 * 28 * 4, "video_max_pixels": 28 * 28 * 16}
    cases = [  # (name, frames, fps, codec, size, rule, frame count missing from the header)
        ("h264.mp4", 20, 10, "libx264", (64, 48), VisionRule(), False),
        ("odd_mpeg4.mp4", 21, 10, "mpeg4", (80, 48), VisionRule(**small), False),
        ("long.mp4", 60, 10, "libx264", (64, 48), VisionRule(video_fps=5.0, max_frames=8, **small), False),
        ("seven.mp4", 7, 3, "mpeg4", (48, 64), VisionRule(video_fps=3.0, **small), False),
        ("no_count.mkv", 21, 10, "libx264", (64, 48), VisionRule(**small), True),
        ("one_frame.mp4", 1, 10, "libx264", (64, 48), VisionRule(**small), False),
    ]
    max_diff = 0.0
    for name, n, fps, codec, (w, h), rule, no_count in cases:
        path = tmp_path / name
        _write_video(path, n, fps, w, h, codec)
        with av.open(str(path)) as container:
            assert container.streams.video[0].frames == (0 if no_count else n)
        ours = media.load_video(path, rule)
        ref, grid = _video_reference(path, rule, hf_video, total=n if (no_count or n == 1) else None)
        assert tuple(ours["grid_thw"][0].tolist()) == grid == media.video_grid(path, rule), name
        assert ours["grid_thw"].dtype == torch.long and ours["pixel_values"].dtype == torch.float32
        assert ours["pixel_values"].shape == ref.shape, name
        max_diff = max(max_diff, float((ours["pixel_values"] - ref).abs().max()))
        if name == "long.mp4":
            assert grid[0] == 8 // 2
    assert max_diff <= 1e-5, max_diff
    print(f"videos: max |ours - transformers pieces| = {max_diff:.3g}")


def test_video_estimated_frame_count(tmp_path, monkeypatch):
    """No frame count in the header: the stream's own duration (Matroska DURATION tag), not the
    container's; an estimate past the stream's end repeats its last frame; a stored count the
    stream does not reach is "corrupt"."""
    path = tmp_path / "with_audio.mkv"
    _write_video(path, 10, 10, audio_seconds=2.2)  # 1 s of video, 2.2 s of audio
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0 and container.duration / 1e6 > 2
    rule = VisionRule(video_fps=10.0, video_min_pixels=28 * 28 * 4, video_max_pixels=28 * 28 * 4)
    exact = media.load_video(path, rule)
    assert media.video_grid(path, rule) == tuple(exact["grid_thw"][0].tolist()) == (5, 4, 4)

    real = media._video_header
    for estimated in (True, False):  # as if the header said 14 frames
        def header_of_14(p, container, estimated=estimated):
            stream, header = real(p, container)
            return stream, dataclasses.replace(header, total=14, estimated=estimated)

        monkeypatch.setattr(media, "_video_header", header_of_14)
        assert media.video_grid(path, rule) == (7, 4, 4)
        if not estimated:
            _assert_media_error("corrupt", path, media.load_video, rule)
            continue
        padded = media.load_video(path, rule)
        assert tuple(padded["grid_thw"][0].tolist()) == (7, 4, 4)
        n = 4 * 4
        assert torch.equal(padded["pixel_values"][: 5 * n], exact["pixel_values"])
        last = exact["pixel_values"][4 * n:].reshape(n, 3, 2, -1)[:, :, 1]  # frame 9
        tail = padded["pixel_values"][5 * n:].reshape(2, n, 3, 2, -1)
        assert all(torch.equal(tail[k, :, :, j], last) for k in range(2) for j in range(2))


# ------------------------------------------------------------------------------------ audio


def _tone(n: int, rate: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / rate
    rng = np.random.default_rng(seed)
    chirp = 0.4 * np.sin(2 * np.pi * (120 * t + 0.5 * (min(3000, rate / 2.5) - 120) * t ** 2 / max(t[-1], 1e-3)))
    out = [chirp + 0.05 * rng.standard_normal(n) + 0.1 * c * np.sin(2 * np.pi * 440 * t) for c in range(channels)]
    return np.stack(out, -1) if channels > 1 else out[0]


def test_soxr_length_rule():
    for rate in (8000, 11025, 22050, 32000, 44100, 48000, 12345, 96000):
        for n in list(range(1, 300)) + [4410, 44101, 99999]:
            y = soxr.resample(np.zeros(n, np.float32), rate, 16000, quality="HQ")
            assert len(y) == media._resampled_length(n, rate), (rate, n)


def whisper_reference(extractor, mono: np.ndarray) -> np.ndarray:
    """[mel, frames] as the released processors give a 16 kHz clip to the thinker: features of
    the clip zero-padded to 30 s, the frames of the attention mask (ceil(n / 160) of them)."""
    out = extractor(mono, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                    return_tensors="np")
    assert out["attention_mask"].shape == (1, 3000) and out["attention_mask"].sum() == -(-len(mono) // 160)
    return out["input_features"][0][:, out["attention_mask"][0].astype(bool)]


@pytest.mark.parametrize("mel", [80, 128])
def test_whisper_features_at_the_edges(mel):
    """`_whisper_features` on lengths around the 160-sample hop, the 400-sample window and 30 s:
    the processor's frame count, and its values (first frames' reflect padding, last frames'
    zeros, the `max - 8` clamp over the 30 s)."""
    extractor = WhisperFeatureExtractor(feature_size=mel)
    rng = np.random.default_rng(mel)
    max_diff = 0.0
    for n in (1, 7, 159, 160, 161, 200, 201, 399, 401, 4870, 19744, 479_799, 479_959, 479_999, 480_000):
        wave = (0.3 * rng.standard_normal(n)).astype(np.float32)
        if n == 4870:
            wave[:] *= 1e-4  # quiet: the clamp floor sits under the zero frames' log floor
        ref = whisper_reference(extractor, wave)
        ours = media._whisper_features(wave, mel)
        assert ours.shape == ref.shape == (mel, -(-n // 160)) and ours.dtype == torch.float32, n
        max_diff = max(max_diff, float(np.abs(ours.numpy() - ref).max()))
    # Both sides compute in float32 (log-mel values of order 1); the rounding differs with the
    # CPU's vector paths: 3.7e-5 and 7.4e-5 on two machines of this project (6e-8 in float64).
    assert max_diff <= 1.5e-4, max_diff
    print(f"whisper features at the edges (mel={mel}): max |ours - WhisperFeatureExtractor| = {max_diff:.3g}")


@pytest.mark.parametrize("mel", [80, 128])
def test_audio_matches_whisper(tmp_path, mel):
    files = [  # (name, rate, channels, subtype)
        ("int16_16k.wav", 16000, 1, "PCM_16"),
        ("int16_44k.wav", 44100, 1, "PCM_16"),
        ("int16_8k.wav", 8000, 1, "PCM_16"),
        ("stereo_22k.wav", 22050, 2, "PCM_16"),
        ("float_48k.wav", 48000, 1, "FLOAT"),
        ("mono_16k.flac", 16000, 1, "PCM_16"),
        ("stereo_44k.flac", 44100, 2, "PCM_24"),
    ]
    extractor = WhisperFeatureExtractor(feature_size=mel)
    rule = AudioRule(num_mel_bins=mel)
    max_diff = 0.0
    for i, (name, rate, channels, subtype) in enumerate(files):
        path = tmp_path / name
        sf.write(path, _tone(int(rate * (1.234 + 0.137 * i)), rate, channels, seed=i), rate, subtype=subtype)
        ours = media.load_audio(path, rule)
        data, read_rate = sf.read(path, dtype="float32", always_2d=True)
        mono = data.mean(axis=1)
        if read_rate != 16000:
            mono = soxr.resample(mono, read_rate, 16000, quality="HQ")
        assert len(mono) % 160, name  # not whole hops: the processor counts ceil(n / 160) frames
        ref = whisper_reference(extractor, mono)
        frames = media.audio_frames(path, rule)
        assert ref.shape == (mel, -(-len(mono) // 160)) and frames == ref.shape[1], name
        assert ours["input_features"].shape == (1, mel, frames) and ours["input_features"].dtype == torch.float32
        assert ours["feature_lens"].tolist() == [frames] and ours["feature_lens"].dtype == torch.long
        max_diff = max(max_diff, float(np.abs(ours["input_features"][0].numpy() - ref).max()))
    assert max_diff <= 5e-5, max_diff
    print(f"audio (mel={mel}): max |ours - WhisperFeatureExtractor| = {max_diff:.3g}")


# ------------------------------------------------------------------------------------ audio inside videos


def write_video_with_audio(path, frames: int, fps: int, audio: np.ndarray, rate: int, codec: str = "aac",
                           side: int = 16, seed: int = 0) -> None:
    """`frames` noisy pictures at `fps` (H.264) and the track `audio` (float [samples] or [samples,
    channels] in [-1, 1]) encoded with `codec` at `rate`, fed in 1024-sample frames of the codec's
    own sample format."""
    audio = audio.reshape(len(audio), -1)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.width = video.height = side
        video.pix_fmt = "yuv420p"
        track = container.add_stream(codec, rate=rate)
        track.layout = "mono" if audio.shape[1] == 1 else "stereo"
        for k in range(frames):
            frame = np.random.default_rng(seed + k).integers(0, 256, (side, side, 3), dtype=np.uint8)
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        fmt = track.codec_context.codec.audio_formats[0]
        for at in range(0, len(audio), 1024):
            chunk = audio[at:at + 1024]
            chunk = (chunk * 32767).astype(np.int16) if fmt.name.startswith("s16") else chunk.astype(np.float32)
            chunk = np.ascontiguousarray(chunk.T if fmt.is_planar else chunk.reshape(1, -1))
            frame = av.AudioFrame.from_ndarray(chunk, format=fmt.name, layout=track.layout.name)
            frame.sample_rate, frame.pts = rate, at
            for packet in track.encode(frame):
                container.mux(packet)
        for packet in track.encode():
            container.mux(packet)


def _decoded_track(path) -> tuple[np.ndarray, int]:
    """All samples of the first audio stream as PyAV decodes them (float32 [n, channels]), its rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        chunks = []
        for frame in container.decode(stream):
            x = frame.to_ndarray()
            x = x.T if frame.format.is_planar else x.reshape(-1, frame.layout.nb_channels)
            chunks.append(x / np.float32(32768) if x.dtype == np.int16 else x)
        return np.concatenate(chunks).astype(np.float32), stream.sample_rate


def _header_samples(path) -> tuple[int, bool]:
    """(samples of the track by its header: the stream's own duration, else its DURATION tag; the
    stream's own)."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        if stream.duration:
            return int(stream.duration * stream.time_base * stream.sample_rate + 0.5), True
        h, m, sec = stream.metadata["DURATION"].split(":")
        return int((int(h) * 3600 + int(m) * 60 + float(sec)) * stream.sample_rate + 0.5), False


# (file, codec, rate, channels, samples written)
AUDIO_TRACKS = [("aac_44k_stereo.mp4", "aac", 44100, 2, 30100), ("aac_16k.mp4", "aac", 16000, 1, 23456),
                ("pcm_16k.mov", "pcm_s16le", 16000, 1, 23456), ("pcm_48k_stereo.mp4", "pcm_s16le", 48000, 2, 40000),
                ("aac_22k.mkv", "aac", 22050, 1, 30000), ("opus_48k.mkv", "libopus", 48000, 1, 30000)]


def test_audio_inside_videos_matches_whisper(tmp_path):
    """A video's own track: the header's count (stream duration x rate, or the Matroska DURATION
    tag's) equals what `load_video_audio` decodes, and its features are Whisper's of that many
    PyAV-decoded samples (encoder padding cut, a short estimate padded with silence), mixed to mono
    and resampled as `load_audio` does."""
    extractor, rule = WhisperFeatureExtractor(feature_size=80), AudioRule()
    max_diff = 0.0
    for i, (name, codec, rate, channels, n) in enumerate(AUDIO_TRACKS):
        path = tmp_path / name
        write_video_with_audio(path, 3, 2, _tone(n, rate, channels, seed=i) * 0.8, rate, codec)
        decoded, read_rate = _decoded_track(path)
        count, own = _header_samples(path)
        assert read_rate == rate
        if codec.startswith("pcm"):
            assert count == n == len(decoded), name  # PCM: the header is the decode, exactly
        elif own:  # MP4: the edit list's duration (to the ms); the decode adds the last AAC frame's padding
            assert abs(count - n) <= rate // 1000 and count <= len(decoded) < count + 1024 + rate // 1000, name
        fitted = np.concatenate([decoded[:count], np.zeros((max(0, count - len(decoded)), channels), np.float32)])
        mono = fitted.mean(axis=1) if channels > 1 else fitted[:, 0]
        if rate != 16000:
            mono = soxr.resample(mono, rate, 16000, quality="HQ")
        assert len(mono) % 160, name  # not whole hops: the processor counts ceil(n / 160) frames
        ref = whisper_reference(extractor, mono)
        frames = media.video_audio_frames(path, rule)
        ours = media.load_video_audio(path, rule)
        assert frames == -(-media._resampled_length(count, rate) // 160) == ref.shape[1], name
        assert ours["input_features"].shape == (1, 80, frames) and ours["feature_lens"].tolist() == [frames], name
        samples, _, _ = media._video_audio_samples(path, rule)
        assert np.array_equal(samples, fitted), name
        max_diff = max(max_diff, float(np.abs(ours["input_features"][0].numpy() - ref).max()))
    assert max_diff <= 5e-5, max_diff
    print(f"audio in videos: max |ours - WhisperFeatureExtractor| = {max_diff:.3g}")


def test_audio_inside_videos_silent_and_bad(tmp_path):
    silent = tmp_path / "silent.mp4"
    _write_video(silent, 4, 2)
    assert media.video_audio_frames(silent) is None and media.load_video_audio(silent) is None
    one_second = tmp_path / "one_second.mp4"
    write_video_with_audio(one_second, 2, 2, _tone(16000, 16000), 16000, "pcm_s16le")
    assert media.video_audio_frames(one_second) == 100
    tiny = tmp_path / "tiny.mp4"
    write_video_with_audio(tiny, 2, 2, _tone(150, 16000), 16000, "pcm_s16le")
    assert media.video_audio_frames(tiny) == 1 and media.load_video_audio(tiny)["input_features"].shape == (1, 80, 1)
    for fn in (media.video_audio_frames, media.load_video_audio):
        _assert_media_error("missing", tmp_path / "nope.mp4", fn)
        _assert_media_error("too_long", one_second, fn, AudioRule(max_frames=50))
        _assert_media_error("too_short", tiny, fn, AudioRule(min_frames=3))  # the audio parts' least


# ------------------------------------------------------------------------------------ bad media


def test_bad_images(tmp_path):
    missing = tmp_path / "nope.png"
    for fn in (media.image_grid, media.load_image):
        _assert_media_error("missing", missing, fn)
        _assert_media_error("missing", tmp_path, fn)  # a directory
    good = tmp_path / "good.png"
    Image.fromarray(_picture(200, 300)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:2000])
    assert media.image_grid(truncated) == media.image_grid(good)  # the header is intact
    _assert_media_error("corrupt", truncated, media.load_image)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("not an image\n" * 20)
    sliver = tmp_path / "sliver.png"
    Image.fromarray(_picture(2, 600)).save(sliver)  # aspect ratio 300
    for fn in (media.image_grid, media.load_image):
        _assert_media_error("corrupt", garbage, fn)
        _assert_media_error("unsupported", text, fn)
        _assert_media_error("unsupported", sliver, fn)


def test_bad_audio(tmp_path):
    for fn in (media.audio_frames, media.load_audio):
        _assert_media_error("missing", tmp_path / "nope.wav", fn)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("not audio\n" * 50)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.int16), 16000)
    short = tmp_path / "short.wav"
    sf.write(short, _tone(320, 16000).astype(np.float32), 16000)  # 2 frames
    shorter = tmp_path / "shorter.wav"
    sf.write(shorter, _tone(100, 8000).astype(np.float32), 8000)  # 200 samples at 16 kHz: 2 frames
    just = tmp_path / "just.wav"
    sf.write(just, _tone(321, 16000).astype(np.float32), 16000)  # 3 frames, the last one of a single sample
    vanishing = tmp_path / "vanishing.wav"
    sf.write(vanishing, np.full(1, 0.1, np.float32), 48000)  # 0 samples at 16 kHz
    assert [media.audio_frames(p) for p in (short, shorter, just)] == [2, 2, 3]
    assert media.load_audio(shorter)["input_features"].shape == (1, 80, 2)
    assert media.audio_frames(just, AudioRule(min_frames=3)) == 3
    one_second = tmp_path / "one_second.wav"
    sf.write(one_second, _tone(44100, 44100).astype(np.float32), 44100)
    for fn in (media.audio_frames, media.load_audio):
        _assert_media_error("corrupt", garbage, fn)
        _assert_media_error("unsupported", text, fn)
        _assert_media_error("empty_audio", empty, fn)
        _assert_media_error("too_short", short, fn, AudioRule(min_frames=3))
        _assert_media_error("too_short", shorter, fn, AudioRule(min_frames=3))
        _assert_media_error("too_short", vanishing, fn)
        _assert_media_error("too_long", one_second, fn, AudioRule(max_frames=50))
        _assert_media_error("too_short", one_second, fn, AudioRule(min_frames=101))
    assert media.audio_frames(one_second, AudioRule(min_frames=100, max_frames=100)) == 100
    flac = tmp_path / "cut.flac"
    sf.write(flac, _tone(48000, 16000).astype(np.float32), 16000)
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 2])
    assert media.audio_frames(flac) == 300  # the header still says 3 s
    _assert_media_error("corrupt", flac, media.load_audio)
    nan = tmp_path / "nan.wav"
    wave = _tone(8000, 16000).astype(np.float32)
    wave[100] = np.nan
    sf.write(nan, wave, 16000, subtype="FLOAT")
    _assert_media_error("corrupt", nan, media.load_audio)


def test_bad_video(tmp_path):
    for fn in (media.video_grid, media.load_video):
        _assert_media_error("missing", tmp_path / "nope.mp4", fn)
    good = tmp_path / "good.mp4"
    _write_video(good, 10, 10)
    data = good.read_bytes()
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("not a video\n" * 50)
    truncated = tmp_path / "truncated.mp4"  # PyAV writes the index (moov) last: cut, it is gone
    truncated.write_bytes(data[: len(data) // 2])
    audio_only = tmp_path / "audio_only.mp4"
    with av.open(str(audio_only), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    no_frames = tmp_path / "no_frames.mp4"
    with av.open(str(no_frames), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    for fn in (media.video_grid, media.load_video):
        _assert_media_error("corrupt", garbage, fn)
        _assert_media_error("unsupported", text, fn)
        _assert_media_error("corrupt", truncated, fn)
        _assert_media_error("no_frames", audio_only, fn)
        _assert_media_error("no_frames", no_frames, fn)
    zeroed = bytearray(data)  # the header intact, the coded frames zeroed
    at = zeroed.find(b"mdat")
    size = int.from_bytes(zeroed[at - 4: at], "big")
    zeroed[at + 4: at - 4 + size] = bytes(size - 8)
    broken = tmp_path / "zeroed.mp4"
    broken.write_bytes(bytes(zeroed))
    assert media.video_grid(broken) == media.video_grid(good)
    _assert_media_error("corrupt", broken, media.load_video)


def test_media_error_pickles():
    err = MediaError("too_long", "a.wav: audio is 40 s; split it")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, MediaError) and again.reason == "too_long" and str(again) == str(err)
    from engine.data.errors import DataError
    assert isinstance(again, DataError)
    assert set(media.REASONS) == {"missing", "corrupt", "unsupported", "empty_audio", "no_frames", "too_long",
                                  "too_short", "changed"}
