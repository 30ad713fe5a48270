"""Qwen2-VL and Qwen2.5-VL checkpoints in and out: each family's state-dict adapter, the config
that composes our omni model from registered parts, and a module that takes transformers'
keyword arguments.

Composition: a vision part around a dense backbone with multimodal rotary positions
(`model.mrope_section`). The tower's merger already outputs the language model's width, so the
encoder has no projection (`project: false`), and its placeholder is the checkpoint's own
`<|image_pad|>` id; `<|video_pad|>` positions are the same part's (one vision part serves images
and videos, fed in order of appearance). What differs between the architectures is a row of
`FAMILIES`:

- the registered vision part (`vision`: Qwen2-VL's tower; `qwen2_5_vision`: Qwen2.5-VL's, with
  window attention); our parameters are `encoders.<part>.*`, the tower's own names after it;
- how its options are read (the part's `options_from_hf_config`) and which of them is the
  output width that must equal the text model's `hidden_size`;
- the temporal rule of video positions: Qwen2-VL steps by 1 per temporal patch, Qwen2.5-VL by
  `vision_config.tokens_per_second * second_per_grid_ts` (per video; kept as the part's
  `tokens_per_second` option, `engine.data.mrope`).

Both config layouts are read: transformers 5's (`text_config` nested) and the older flat one
(text keys at the top); and both tensor namings: the released one (`model.layers.*`,
`visual.*`: the hub's files, and what transformers' save_pretrained still writes) and
transformers 5's in-memory one (`model.language_model.*`, `model.visual.*`). Export writes the
naming of the release the run started from. Safetensors only, one tensor at a time.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from engine.batch import Batch
from engine.config import ModelConfig
from engine.data.mrope import mrope_positions
from engine.models import build_model
from engine.tensor_files import TensorFiles, model_files

LAYOUTS = {"released": ("model.", "visual."), "nested": ("model.language_model.", "model.visual.")}
# transformers' Qwen2_5_VLVisionConfig default, for a config.json that does not name it
DEFAULT_TOKENS_PER_SECOND = 4


@dataclass(frozen=True)
class Family:
    """What one architecture of the Qwen2-VL family changes (see the module docstring)."""

    architecture: str
    part: str  # the registered vision part
    width: str  # the part's option (and vision_config key) that is its output width
    timed: bool  # video temporal positions spaced by tokens_per_second * second_per_grid_ts

    def vision_options(self, hf: dict) -> dict:
        from engine.modalities import get_encoder

        opts = get_encoder(self.part).options_from_hf_config(hf)
        if self.timed:
            opts.setdefault("tokens_per_second", DEFAULT_TOKENS_PER_SECOND)
        return opts

    # ---- the state-dict adapter
    def from_hf(self, name: str) -> Optional[str]:
        """Our parameter name for a checkpoint tensor name (None: not a parameter)."""
        if name.endswith("rotary_emb.inv_freq"):
            return None
        for prefix in ("model.visual.", "visual."):
            if name.startswith(prefix):
                return f"encoders.{self.part}." + name[len(prefix):]
        for prefix in ("model.language_model.", "model."):
            if name.startswith(prefix):
                rest = name[len(prefix):]
                return "backbone." + ("blocks." + rest[len("layers."):] if rest.startswith("layers.") else rest)
        if name == "lm_head.weight":
            return "backbone.lm_head.weight"
        return name

    def to_hf(self, name: str, layout: str = "released") -> str:
        """The checkpoint's tensor name for one of our parameters: the released layout (what the
        hub's files and transformers' save_pretrained write: `model.layers.*`, `visual.*`) or
        transformers 5's in-memory one (`model.language_model.*`, `model.visual.*`)."""
        text, visual = LAYOUTS[layout]
        ours = f"encoders.{self.part}."
        if name.startswith(ours):
            return visual + name[len(ours):]
        if name == "backbone.lm_head.weight":
            return "lm_head.weight"
        rest = name[len("backbone."):]
        return text + ("layers." + rest[len("blocks."):] if rest.startswith("blocks.") else rest)


FAMILIES = {f.architecture: f for f in (
    Family("Qwen2VLForConditionalGeneration", part="vision", width="hidden_size", timed=False),
    Family("Qwen2_5_VLForConditionalGeneration", part="qwen2_5_vision", width="out_hidden_size", timed=True),
)}
ARCHITECTURE = "Qwen2VLForConditionalGeneration"  # the first family (kept for callers that name it)


@dataclass(frozen=True)
class MediaTokens:
    image: int
    video: int
    merge: int
    part: str = "vision"
    tokens_per_second: Optional[float] = None  # None: video temporal positions step by 1 (Qwen2-VL)


def family(hf: dict, source: str = "config.json") -> Family:
    from .hf import HFCheckpointError

    arch = (hf.get("architectures") or [None])[0]
    if arch not in FAMILIES:
        raise HFCheckpointError(f"{source}: architecture {arch!r} is not one of {', '.join(FAMILIES)}")
    return FAMILIES[arch]


def family_of(folder: Path) -> Optional[Family]:
    """The family of a folder's config.json (None: not a folder of one)."""
    config = Path(folder) / "config.json"
    try:
        arch = (json.loads(config.read_text()).get("architectures") or [None])[0] if config.is_file() else None
    except json.JSONDecodeError:
        return None
    return FAMILIES.get(arch)


def _read_config(folder: Path) -> tuple[dict, str]:
    return json.loads((Path(folder) / "config.json").read_text()), str(Path(folder) / "config.json")


def _text_config(hf: dict) -> dict:
    text = dict(hf.get("text_config") or {})
    if not text:  # the older flat layout: the text model's keys are at the top
        text = {k: v for k, v in hf.items() if k != "vision_config"}
    return text


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[ModelConfig, MediaTokens]:
    """Our ModelConfig (omni: the family's vision part + dense M-RoPE backbone) and the media tokens."""
    from .hf import HFCheckpointError, config_from_hf as text_config_from_hf

    fam = family(hf, source)
    text = _text_config(hf)
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {})
    section = rope.get("mrope_section")
    if not section:
        raise HFCheckpointError(f"{source}: a {fam.architecture} config needs rope mrope_section: add it to "
                                "config.json")
    plain = {**text, "architectures": ["Qwen2ForCausalLM"], "rope_parameters": {
        "rope_type": "default", "rope_theta": rope.get("rope_theta", text.get("rope_theta", 1000000.0))}}
    plain.pop("rope_scaling", None)
    plain.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    cfg = text_config_from_hf(plain, source)
    vision = fam.vision_options(hf)
    if vision.setdefault(fam.width, cfg.hidden_size) != cfg.hidden_size:
        raise HFCheckpointError(f"{source}: vision_config.{fam.width}={vision[fam.width]} differs from the text "
                                f"model's hidden_size={cfg.hidden_size}: fix config.json")
    ids = {k: hf.get(k, text.get(k)) for k in ("image_token_id", "video_token_id")}
    if ids["image_token_id"] is None or ids["video_token_id"] is None:
        raise HFCheckpointError(f"{source}: a {fam.architecture} config needs image_token_id and video_token_id")
    cfg.encoders = [{"name": fam.part, **vision, "project": False, "placeholder": int(ids["image_token_id"])}]
    cfg.mrope_section = [int(s) for s in section]
    half = (cfg.head_dim or cfg.hidden_size // cfg.num_heads) // 2
    if len(cfg.mrope_section) != 3 or sum(cfg.mrope_section) != half:
        raise HFCheckpointError(f"{source}: mrope_section={cfg.mrope_section} must be 3 bands summing to head_dim / 2 "
                                f"= {half}: fix config.json")
    media = MediaTokens(int(ids["image_token_id"]), int(ids["video_token_id"]), int(vision.get("spatial_merge_size", 2)),
                        fam.part, vision.get("tokens_per_second") if fam.timed else None)
    return cfg, media


def layout_of(folder: Path) -> str:
    """Which naming the folder's tensors use."""
    if any(k.startswith("model.language_model.") for k in TensorFiles(_safetensors_files(folder)).keys()):
        return "nested"
    return "released"


def _safetensors_files(folder: Path) -> list[Path]:
    from .hf import HFCheckpointError

    files = model_files(folder)
    if not files:
        raise HFCheckpointError(f"{folder} has no model.safetensors or model.safetensors.index.json: pass a Hugging "
                                "Face model folder saved with safetensors")
    return files


# What the checkpoint's config.json decides; the run config keeps every other model key.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "rope_theta", "rope_scaling", "max_position_embeddings", "rms_norm_eps", "qk_norm",
                     "attention_bias", "tie_embeddings", "encoders", "decoders", "mrope_section", "backbone")


def compose_model_config(run: ModelConfig) -> ModelConfig:
    """`model.init_from: FOLDER` alone: the model the folder's config.json describes (the run's
    other model keys kept, e.g. attention_backend)."""
    made, _ = config_from_hf(*_read_config(Path(run.init_from).expanduser()))
    out = copy.deepcopy(run)
    for key in ARCHITECTURE_KEYS:
        setattr(out, key, copy.deepcopy(getattr(made, key)))
    return out


@torch.no_grad()
def load_weights_(model: nn.Module, folder: Path) -> int:
    """Stream the checkpoint's tensors into `model`, strictly: every parameter filled once,
    shapes checked by name. An FSDP (DTensor) parameter sharded along dim 0 reads only its own
    rows; others read the full tensor and keep their shard. Returns the bytes read."""
    from engine.parallel.init import copy_full_, local_rows

    from .hf import KeyMismatchError, ShapeMismatchError, clean_name

    fam = family(*_read_config(folder))
    params = {clean_name(n): p for n, p in model.named_parameters()}
    seen, total = set(), 0
    files = TensorFiles(_safetensors_files(folder))
    for key in files.keys():
        ours = fam.from_hf(key)
        if ours is None:
            continue
        where = files.where[key].name
        if ours not in params:
            raise KeyMismatchError(f"{folder}: tensor '{key}' in {where} has no place in the model composed from "
                                   "config.json: the config does not match the weights")
        if files.shape(key) != tuple(params[ours].shape):
            raise ShapeMismatchError(f"tensor '{key}' in {where} has shape {files.shape(key)} but the model "
                                     f"expects {tuple(params[ours].shape)}: the weights do not match config.json; "
                                     "fix the config or use matching weights")
        param, rows = params[ours], local_rows(params[ours])
        if rows is not None and param.dim() > 0:  # FSDP: read only this rank's rows
            tensor = files.rows(key, *rows)
            param.to_local().copy_(tensor.to(param.dtype))
        else:
            tensor = files.get(key)
            copy_full_(param, tensor)
        seen.add(ours)
        total += tensor.numel() * tensor.element_size()
    missing = sorted(set(params) - seen)
    if missing:
        raise KeyMismatchError(f"{folder} lacks {len(missing)} tensor(s) the model needs (e.g. "
                               f"'{fam.to_hf(missing[0])}'): the checkpoint is incomplete or saved for another config")
    return total


# ---- transformers' calling convention ----------------------------------------------------
class VisionLanguageModel(nn.Module):
    """Our omni model behind `Qwen2VLForConditionalGeneration`'s /
    `Qwen2_5_VLForConditionalGeneration`'s keyword arguments: `model(input_ids, attention_mask,
    pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts)` ->
    logits [B, S, V]. Positions are the M-RoPE positions of each row (transformers'
    `get_rope_index`; `second_per_grid_ts`, one per video of the batch in order, only for a
    family with the temporal rule, Qwen2.5-VL); padded positions (attention_mask 0, right
    padding) form a document of their own."""

    def __init__(self, omni: nn.Module, media: MediaTokens):
        super().__init__()
        self.omni, self.media = omni, media

    @property
    def config(self) -> ModelConfig:
        return self.omni.cfg

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                pixel_values_videos: Optional[torch.Tensor] = None, video_grid_thw: Optional[torch.Tensor] = None,
                second_per_grid_ts=None, **unused) -> torch.Tensor:
        m = self.media
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        images = _split_by_grid(pixel_values, image_grid_thw)
        videos = _split_by_grid(pixel_values_videos, video_grid_thw)
        secs = None  # Qwen2-VL (no temporal rule) ignores them, as transformers' Qwen2-VL does
        if m.tokens_per_second is not None and second_per_grid_ts is not None:
            secs = torch.as_tensor(second_per_grid_ts).reshape(-1).tolist()
        positions = torch.zeros((3, *input_ids.shape), dtype=torch.long)
        doc_ids = torch.zeros_like(input_ids)
        order, next_image, next_video = [], 0, 0
        for row in range(input_ids.shape[0]):
            n = int(mask[row].sum())
            ids = input_ids[row, :n]
            row_images, row_videos, first_video = [], [], next_video
            for kind in _media_order(ids, m):
                if kind == "image":
                    row_images.append(images[next_image])
                    order.append(images[next_image])
                    next_image += 1
                else:
                    row_videos.append(videos[next_video])
                    order.append(videos[next_video])
                    next_video += 1
            pos, _ = mrope_positions(ids.tolist(), [g for _, g in row_images], [g for _, g in row_videos],
                                     m.image, m.video, m.merge,
                                     None if secs is None else secs[first_video:next_video], m.tokens_per_second)
            positions[:, row, :n] = torch.as_tensor(pos)
            doc_ids[row, n:] = 1
        ids = input_ids.masked_fill(input_ids == m.video, m.image)  # one part: its placeholder
        payloads = {}
        if order:
            payloads[m.part] = {"pixel_values": torch.cat([p for p, _ in order]),
                                "grid_thw": torch.stack([torch.as_tensor(g) for _, g in order]).long()}
        batch = Batch(input_ids=ids, position_ids=positions.to(input_ids.device), doc_ids=doc_ids.to(input_ids.device),
                      payloads=payloads)
        return self.omni.text_logits(batch)


Qwen2VLModel = VisionLanguageModel  # the name it had when Qwen2-VL was the only family


def _split_by_grid(pixels: Optional[torch.Tensor], grid: Optional[torch.Tensor]) -> list:
    if pixels is None or grid is None:
        return []
    sizes = [int(t * h * w) for t, h, w in grid.tolist()]
    return list(zip(pixels.split(sizes), grid.tolist()))


def _media_order(ids: torch.Tensor, m: MediaTokens) -> list[str]:
    """'image' / 'video' for each media span of a row, in order (a span is a run of its pad
    token; consecutive media are separated by vision start/end tokens in processor output)."""
    kinds = []
    prev = None
    for t in ids.tolist():
        kind = "image" if t == m.image else "video" if t == m.video else None
        if kind is not None and kind != prev:
            kinds.append(kind)
        prev = kind
    return kinds


def load_pretrained(folder: Path, dtype: torch.dtype = torch.float32, device="cpu") -> VisionLanguageModel:
    cfg, media = config_from_hf(*_read_config(folder))
    with torch.device("meta"):
        omni = build_model(cfg)
    omni.to(dtype)
    omni.to_empty(device=device)
    omni.reset_buffers()
    load_weights_(omni, folder)
    return VisionLanguageModel(omni.eval(), media).eval()


# ---- export --------------------------------------------------------------------------------
# Files of a released folder that travel with its weights (tokenizer, chat template, processors).
RELEASE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
                 "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")


def export(src: Path, out: Path, release: Path, max_shard_size: int = 5 * 10**9,
           dtype: Optional[torch.dtype] = None) -> Path:
    """A training checkpoint (sharded DCP, read without a process group) or a released folder of
    the family -> a folder in the released layout: transformers 5's tensor names, safetensors
    shards (with an index when several), the release's config.json, tokenizer and processor files."""
    import shutil

    from .convert import DCPSource
    from .hf import HFCheckpointError
    from .safetensors_io import TensorSpec, read_header, shard_groups, shard_names, write_index, write_safetensors

    hf_config, source_name = _read_config(release)
    fam = family(hf_config, source_name)
    cfg, _ = config_from_hf(hf_config, source_name)
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in build_model(cfg).named_parameters()}
    if (src / ".metadata").is_file():
        source = DCPSource(src)
        specs = source.specs
        read = source.read_group
    else:  # a released folder: ours are its names through the adapter
        tensors = TensorFiles(_safetensors_files(src))
        names = {fam.from_hf(k): k for k in tensors.keys() if fam.from_hf(k) is not None}
        specs = {}
        for f in tensors.files:
            specs.update({fam.from_hf(s.name): s for s in read_header(f)[0] if fam.from_hf(s.name) is not None})

        def read(group):
            return lambda name: tensors.get(names[name])
    missing = sorted(set(expected) - set(specs))
    if missing or any(tuple(specs[n].shape) != expected[n] for n in expected):
        bad = missing[0] if missing else next(n for n in expected if tuple(specs[n].shape) != expected[n])
        raise HFCheckpointError(f"{src} does not hold the model of {release}/config.json (tensor {bad!r}): export with "
                                "the release the run was initialised from")
    ours, layout = list(expected), layout_of(release)  # written as the release names its tensors
    out_specs = [TensorSpec(fam.to_hf(n, layout), dtype or specs[n].dtype, expected[n]) for n in ours]
    back = {fam.to_hf(n, layout): n for n in ours}
    groups = shard_groups(out_specs, max_shard_size)
    files = shard_names("model", len(groups))
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors", out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    for name, group in zip(files, groups):
        get = read([back[s.name] for s in group])
        write_safetensors(out / name, group, lambda hf_name, get=get, group=group: get(back[hf_name]).to(
            next(s.dtype for s in group if s.name == hf_name)).contiguous(), {"format": "pt"})
    if len(files) > 1:
        write_index(out, "model", files, groups)
    if dtype is not None:
        hf_config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for f in RELEASE_FILES:
        if (release / f).is_file() and release.resolve() != out.resolve():
            shutil.copyfile(release / f, out / f)
    return out
