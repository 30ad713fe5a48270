"""Qwen2-VL, Qwen2.5-VL and Qwen2.5-Omni (thinker) checkpoints in and out: each family's
state-dict adapter, the config that composes our omni model from registered parts, and a module
that takes transformers' keyword arguments.

Composition: a vision part around a dense backbone with multimodal rotary positions
(`model.mrope_section`). The tower's merger already outputs the language model's width, so the
encoder has no projection (`project: false`), and its placeholder is the checkpoint's own
`<|image_pad|>` id; `<|video_pad|>` positions are the same part's (one vision part serves images
and videos, fed in order of appearance). What differs between the architectures is a row of
`FAMILIES`:

- the registered vision part (`vision`: Qwen2-VL's tower; `qwen2_5_vision`: Qwen2.5-VL's and
  Qwen2.5-Omni's, with window attention); our parameters are `encoders.<part>.*`, the tower's
  own names after it;
- how its options are read (the part's `options_from_hf_config`) and which of them is the
  output width that must equal the text model's `hidden_size`;
- the temporal rule of video positions: Qwen2-VL steps by 1 per temporal patch, Qwen2.5-VL by
  `vision_config.tokens_per_second * second_per_grid_ts` (per video; kept as the part's
  `tokens_per_second` option, `engine.data.mrope`);
- Qwen2.5-Omni's thinker (engine/checkpoint/qwen2_5_omni.py: its TMRoPE positions and audio
  keyword arguments): an audio part as well (`qwen2_5_omni_audio`, placeholder = the audio pad
  id, `audio_tower.*` tensors), its tower's attention stored as separate `attn.q/k/v` tensors
  (one of our `attn.qkv`: concatenated on load, rows read piece by piece; split on export), the
  config under the thinker's keys (`image_token_index`, ..., `position_id_per_seconds`, which is
  the vision part's `tokens_per_second`). A whole Qwen2.5-Omni folder (`thinker_config`, tensors
  under `thinker.`) is read for its thinker only: its talker and token2wav are ignored on load
  and copied through unchanged on export.

Both config layouts are read: transformers 5's (`text_config` nested) and the older flat one
(text keys at the top); and both tensor namings: the released one (`model.layers.*`,
`visual.*`: the hub's files, and what transformers' save_pretrained still writes) and
transformers 5's in-memory one (`model.language_model.*`, `model.visual.*`). Export writes the
naming of the release the run started from. Safetensors only, one tensor at a time.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from engine.batch import Batch
from engine.config import ModelConfig
from engine.data.mrope import mrope_positions
from engine.models import build_model
from engine.tensor_files import TensorFiles, model_files

# (text, vision tower, audio tower) prefixes of each tensor naming
LAYOUTS = {"released": ("model.", "visual.", "audio_tower."),
           "nested": ("model.language_model.", "model.visual.", "model.audio_tower.")}
# transformers' Qwen2_5_VLVisionConfig default, for a config.json that does not name it
DEFAULT_TOKENS_PER_SECOND = 4
# transformers' Qwen2_5OmniThinkerConfig defaults, for a config.json that does not name them
OMNI_DEFAULTS = {"position_id_per_seconds": 25, "seconds_per_chunk": 2, "vision_start_token_id": 151652,
                 "audio_start_token_id": 151647}
_SPLIT_QKV = re.compile(r"(blocks\.\d+\.attn\.)(q|k|v)\.(weight|bias)")  # Qwen2.5-Omni's tower, on disk
_FUSED_QKV = re.compile(r"(blocks\.\d+\.attn\.)qkv\.(weight|bias)")  # ours


@dataclass(frozen=True)
class Family:
    """What one architecture of the Qwen2-VL family changes (see the module docstring)."""

    architecture: str
    part: str  # the registered vision part
    width: str  # the part's option (and vision_config key) that is its output width
    timed: bool  # video temporal positions spaced by tokens_per_second * second_per_grid_ts
    audio: Optional[str] = None  # the registered audio part (Qwen2.5-Omni's thinker); None: no audio
    prefix: str = ""  # where the model sits in a larger checkpoint ("thinker."): other tensors are not ours
    split_qkv: bool = False  # the tower's attention stored as separate q, k, v tensors (our attn.qkv)

    def root(self, hf: dict, source: str = "config.json") -> dict:
        """The config this model is read from: a whole Qwen2.5-Omni's `thinker_config`, else `hf`."""
        from .hf import HFCheckpointError

        if not self.prefix:
            return hf
        if not isinstance(hf.get("thinker_config"), dict):
            raise HFCheckpointError(f"{source}: a {self.architecture} config needs its thinker_config: add it to "
                                    "config.json")
        return hf["thinker_config"]

    def vision_options(self, hf: dict) -> dict:
        from engine.modalities import get_encoder

        opts = get_encoder(self.part).options_from_hf_config(hf)
        if self.audio:  # Qwen2.5-Omni: the thinker's position_id_per_seconds (as transformers reads it)
            key = "position_id_per_seconds"
            opts["tokens_per_second"] = self.root(hf).get(key, OMNI_DEFAULTS[key])
        elif self.timed:
            opts.setdefault("tokens_per_second", DEFAULT_TOKENS_PER_SECOND)
        return opts

    # ---- the state-dict adapter
    def from_hf(self, name: str) -> Optional[str]:
        """Our parameter name for a checkpoint tensor name (None: not a parameter, or not this
        model's: a whole Qwen2.5-Omni's talker and token2wav). Qwen2.5-Omni's tower's separate
        `attn.q/k/v` tensors all map to our one `attn.qkv` (see `hf_names` for their order)."""
        if self.prefix:
            if not name.startswith(self.prefix):
                return None
            full, name = name, name[len(self.prefix):]
        else:
            full = name
        if name.endswith("rotary_emb.inv_freq"):
            return None
        for prefix in ("model.visual.", "visual."):
            if name.startswith(prefix):
                rest = name[len(prefix):]
                split = _SPLIT_QKV.fullmatch(rest) if self.split_qkv else None
                return f"encoders.{self.part}." + (f"{split[1]}qkv.{split[3]}" if split else rest)
        if self.audio:
            for prefix in ("model.audio_tower.", "audio_tower."):
                if name.startswith(prefix):
                    return f"encoders.{self.audio}." + name[len(prefix):]
        for prefix in ("model.language_model.", "model."):
            if name.startswith(prefix):
                rest = name[len(prefix):]
                return "backbone." + ("blocks." + rest[len("layers."):] if rest.startswith("layers.") else rest)
        if name == "lm_head.weight":
            return "backbone.lm_head.weight"
        return full

    def hf_names(self, name: str, layout: str = "released") -> tuple[str, ...]:
        """The checkpoint's tensor names of one of our parameters, in the order they stack along
        dim 0 (one name, or q, k, v for Qwen2.5-Omni's tower's attention), in the released
        layout (what the hub's files and transformers' save_pretrained write: `model.layers.*`,
        `visual.*`) or transformers 5's in-memory one (`model.language_model.*`, `model.visual.*`)."""
        text, visual, audio = LAYOUTS[layout]
        ours = f"encoders.{self.part}."
        if name.startswith(ours):
            rest = name[len(ours):]
            fused = _FUSED_QKV.fullmatch(rest) if self.split_qkv else None
            names = [f"{fused[1]}{x}.{fused[2]}" for x in "qkv"] if fused else [rest]
            return tuple(self.prefix + visual + n for n in names)
        if self.audio and name.startswith(f"encoders.{self.audio}."):
            return (self.prefix + audio + name[len(f"encoders.{self.audio}."):],)
        if name == "backbone.lm_head.weight":
            return (self.prefix + "lm_head.weight",)
        rest = name[len("backbone."):]
        return (self.prefix + text + ("layers." + rest[len("blocks."):] if rest.startswith("blocks.") else rest),)

    def to_hf(self, name: str, layout: str = "released") -> str:
        """The checkpoint's one tensor name for one of our parameters (`hf_names`); a ValueError
        for a parameter stored as several tensors (Qwen2.5-Omni's attn.qkv)."""
        names = self.hf_names(name, layout)
        if len(names) != 1:
            raise ValueError(f"{name} is stored as {len(names)} tensors ({', '.join(names)}): use hf_names")
        return names[0]

    @staticmethod
    def piece(name: str) -> int:
        """Where a checkpoint tensor goes in the parameter it is part of (0, 1, 2 for q, k, v)."""
        split = _SPLIT_QKV.search(name)
        return "qkv".index(split[2]) if split and split.end() == len(name) else 0


_OMNI = dict(part="qwen2_5_vision", width="out_hidden_size", timed=True, audio="qwen2_5_omni_audio", split_qkv=True)
FAMILIES = {f.architecture: f for f in (
    Family("Qwen2VLForConditionalGeneration", part="vision", width="hidden_size", timed=False),
    Family("Qwen2_5_VLForConditionalGeneration", part="qwen2_5_vision", width="out_hidden_size", timed=True),
    Family("Qwen2_5OmniThinkerForConditionalGeneration", **_OMNI),
    Family("Qwen2_5OmniForConditionalGeneration", **_OMNI, prefix="thinker."),
    Family("Qwen2_5OmniModel", **_OMNI, prefix="thinker."),  # the name the hub's Qwen2.5-Omni config.json gives
)}
ARCHITECTURE = "Qwen2VLForConditionalGeneration"  # the first family (kept for callers that name it)


@dataclass(frozen=True)
class MediaTokens:
    image: int
    video: int
    merge: int
    part: str = "vision"
    tokens_per_second: Optional[float] = None  # None: video temporal positions step by 1 (Qwen2-VL)
    # Qwen2.5-Omni's thinker (None otherwise): the audio pad id and part, and what its TMRoPE reads
    audio: Optional[int] = None
    audio_part: Optional[str] = None
    vision_start: Optional[int] = None
    audio_start: Optional[int] = None
    seconds_per_chunk: Optional[float] = None


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
        text = {k: v for k, v in hf.items() if k not in ("vision_config", "audio_config")}
    return text


def _token_id(root: dict, text: dict, kind: str) -> Optional[int]:
    """`KIND_token_id`, or Qwen2.5-Omni's `KIND_token_index`, at the top or in the text config."""
    for where in (root, text):
        for key in (f"{kind}_token_id", f"{kind}_token_index"):
            if where.get(key) is not None:
                return int(where[key])
    return None


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[ModelConfig, MediaTokens]:
    """Our ModelConfig (omni: the family's vision part (and audio part) + dense M-RoPE backbone)
    and the media tokens."""
    from engine.modalities import get_encoder

    from .hf import HFCheckpointError, config_from_hf as text_config_from_hf

    fam = family(hf, source)
    root = fam.root(hf, source)
    text = _text_config(root)
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or root.get("rope_scaling") or {})
    section = rope.get("mrope_section")
    if not section:
        raise HFCheckpointError(f"{source}: a {fam.architecture} config needs rope mrope_section: add it to "
                                "config.json")
    plain = {**text, "architectures": ["Qwen2ForCausalLM"], "rope_parameters": {
        "rope_type": "default", "rope_theta": rope.get("rope_theta", text.get("rope_theta", 1000000.0))}}
    plain.pop("rope_scaling", None)
    if fam.audio:  # the thinker's own key, as transformers reads it (its text_config's default, true, is not used)
        plain["tie_word_embeddings"] = bool(root.get("tie_word_embeddings", False))
    else:
        plain.setdefault("tie_word_embeddings", root.get("tie_word_embeddings", False))
    cfg = text_config_from_hf(plain, source)
    vision = fam.vision_options(hf)
    if vision.setdefault(fam.width, cfg.hidden_size) != cfg.hidden_size:
        raise HFCheckpointError(f"{source}: vision_config.{fam.width}={vision[fam.width]} differs from the text "
                                f"model's hidden_size={cfg.hidden_size}: fix config.json")
    ids = {kind: _token_id(root, text, kind) for kind in ("image", "video", "audio")}
    if ids["image"] is None or ids["video"] is None:
        raise HFCheckpointError(f"{source}: a {fam.architecture} config needs image_token_id and video_token_id")
    cfg.encoders = [{"name": fam.part, **vision, "project": False, "placeholder": ids["image"]}]
    omni = {}
    if fam.audio:
        try:
            audio = get_encoder(fam.audio).options_from_hf_config(root)
        except ValueError as e:
            raise HFCheckpointError(f"{source}: {e}") from None
        if audio.setdefault("output_dim", cfg.hidden_size) != cfg.hidden_size:
            raise HFCheckpointError(f"{source}: audio_config.output_dim={audio['output_dim']} differs from the text "
                                    f"model's hidden_size={cfg.hidden_size}: fix config.json")
        if ids["audio"] is None:
            raise HFCheckpointError(f"{source}: a {fam.architecture} config needs audio_token_index")
        cfg.encoders.append({"name": fam.audio, **audio, "project": False, "placeholder": ids["audio"]})
        at = {k: root.get(k, v) for k, v in OMNI_DEFAULTS.items()}
        omni = dict(audio=ids["audio"], audio_part=fam.audio, vision_start=int(at["vision_start_token_id"]),
                    audio_start=int(at["audio_start_token_id"]), seconds_per_chunk=at["seconds_per_chunk"])
        cfg.seconds_per_chunk = float(at["seconds_per_chunk"])
    cfg.mrope_section = [int(s) for s in section]
    half = (cfg.head_dim or cfg.hidden_size // cfg.num_heads) // 2
    if len(cfg.mrope_section) != 3 or sum(cfg.mrope_section) != half:
        raise HFCheckpointError(f"{source}: mrope_section={cfg.mrope_section} must be 3 bands summing to head_dim / 2 "
                                f"= {half}: fix config.json")
    media = MediaTokens(ids["image"], ids["video"], int(vision.get("spatial_merge_size", 2)), fam.part,
                        vision.get("tokens_per_second") if fam.timed else None, **omni)
    return cfg, media


def layout_of(folder: Path, fam: Optional[Family] = None) -> str:
    """Which naming the folder's tensors use (`fam`: the folder's family, read when not given)."""
    fam = fam or family_of(folder)
    text = (fam.prefix if fam else "") + "model.language_model."
    if any(k.startswith(text) for k in TensorFiles(_safetensors_files(folder)).keys()):
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
                     "attention_bias", "tie_embeddings", "encoders", "decoders", "mrope_section", "seconds_per_chunk",
                     "backbone")


def compose_model_config(run: ModelConfig) -> ModelConfig:
    """`model.init_from: FOLDER` alone: the model the folder's config.json describes (the run's
    other model keys kept, e.g. attention_backend)."""
    made, _ = config_from_hf(*_read_config(Path(run.init_from).expanduser()))
    out = copy.deepcopy(run)
    for key in ARCHITECTURE_KEYS:
        setattr(out, key, copy.deepcopy(getattr(made, key)))
    return out


def _pieces(files: TensorFiles, fam: Family, where: Path, params: dict) -> dict[str, list[str]]:
    """Our parameter -> the checkpoint's tensors that hold it, in stacking order (dim 0); every
    tensor of the model checked to have a parameter, every parameter its tensors, shapes by piece."""
    from .hf import KeyMismatchError, ShapeMismatchError

    pieces: dict[str, list[str]] = {}
    for key in files.keys():
        ours = fam.from_hf(key)
        if ours is None:
            continue
        if ours not in params:
            raise KeyMismatchError(f"{where}: tensor '{key}' in {files.where[key].name} has no place in the model "
                                   "composed from config.json: the config does not match the weights")
        pieces.setdefault(ours, []).append(key)
    missing = sorted(set(params) - set(pieces))
    if missing:
        raise KeyMismatchError(f"{where} lacks {len(missing)} tensor(s) the model needs (e.g. "
                               f"'{fam.hf_names(missing[0])[0]}'): the checkpoint is incomplete or saved for another "
                               "config")
    for ours, keys in pieces.items():
        keys.sort(key=fam.piece)
        want = fam.hf_names(ours, layout="released")
        if len(keys) != len(want):
            raise KeyMismatchError(f"{where}: {ours} is stored as {len(want)} tensors (e.g. {', '.join(want)}) but the "
                                   f"checkpoint has {', '.join(keys)}: the checkpoint is incomplete")
        shape = tuple(params[ours].shape)
        piece = (shape[0] // len(keys), *shape[1:]) if shape else shape
        for key in keys:
            if files.shape(key) != piece:
                raise ShapeMismatchError(f"tensor '{key}' in {files.where[key].name} has shape {files.shape(key)} but "
                                         f"the model expects {piece}: the weights do not match config.json; fix the "
                                         "config or use matching weights")
    return pieces


def _read(files: TensorFiles, keys: list[str], rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """The tensor stacked from `keys` along dim 0 (rows [first, last) of it: only the pieces'
    rows that fall there are read)."""
    if rows is None:
        return files.get(keys[0]) if len(keys) == 1 else torch.cat([files.get(k) for k in keys])
    out, at = [], 0
    for key in keys:
        n = files.shape(key)[0]
        first, last = max(rows[0], at), min(rows[1], at + n)
        if first < last or (not out and key == keys[-1]):
            out.append(files.rows(key, first - at, max(first, last) - at))
        at += n
    return out[0] if len(out) == 1 else torch.cat(out)


@torch.no_grad()
def load_weights_(model: nn.Module, folder: Path, fam=None) -> int:
    """Stream the checkpoint's tensors into `model`, strictly: every parameter filled once,
    shapes checked by name. An FSDP (DTensor) parameter sharded along dim 0 reads only its own
    rows (of a parameter stacked from several tensors, Qwen2.5-Omni's attn.qkv: only the rows of
    each piece that fall in its shard); others read the full tensor and keep their shard.
    `fam`: the names' adapter (default: the folder's Family; Janus passes its own). Returns the
    bytes read."""
    from engine.parallel.init import copy_full_, local_rows

    from .hf import clean_name

    fam = fam or family(*_read_config(folder))
    params = {clean_name(n): p for n, p in model.named_parameters()}
    files = TensorFiles(_safetensors_files(folder))
    total = 0
    for ours, keys in _pieces(files, fam, folder, params).items():
        param, rows = params[ours], local_rows(params[ours])
        if rows is not None and param.dim() > 0:  # FSDP: read only this rank's rows
            tensor = _read(files, keys, rows)
            param.to_local().copy_(tensor.to(param.dtype))
        else:
            tensor = _read(files, keys)
            copy_full_(param, tensor)
        total += tensor.numel() * tensor.element_size()
    return total


# ---- transformers' calling convention ----------------------------------------------------
class VisionLanguageModel(nn.Module):
    """Our omni model behind `Qwen2VLForConditionalGeneration`'s /
    `Qwen2_5_VLForConditionalGeneration`'s keyword arguments: `model(input_ids, attention_mask,
    pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, second_per_grid_ts)` ->
    logits [B, S, V]. Positions are the M-RoPE positions of each row (transformers'
    `get_rope_index`; `second_per_grid_ts`, one per video of the batch in order, only for a
    family with the temporal rule, Qwen2.5-VL); padded positions (attention_mask 0, right
    padding) form a document of their own. (Qwen2.5-Omni's thinker: `qwen2_5_omni.ThinkerModel`.)"""

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
        images = _split_by_grid(pixel_values, image_grid_thw)
        videos = _split_by_grid(pixel_values_videos, video_grid_thw)
        secs = None  # Qwen2-VL (no temporal rule) ignores them, as transformers' Qwen2-VL does
        if m.tokens_per_second is not None and second_per_grid_ts is not None:
            secs = torch.as_tensor(second_per_grid_ts).reshape(-1).tolist()

        def positions(ids: torch.Tensor, span: dict) -> np.ndarray:
            (i0, i1), (v0, v1) = span["image"], span["video"]
            return mrope_positions(ids.tolist(), [g for _, g in images[i0:i1]], [g for _, g in videos[v0:v1]],
                                   m.image, m.video, m.merge, None if secs is None else secs[v0:v1],
                                   m.tokens_per_second)[0]

        return self._logits(input_ids, attention_mask, images, videos, positions)

    def _logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], images: list, videos: list,
                positions, audio_tokens: Sequence[int] = (), payloads: Optional[dict] = None) -> torch.Tensor:
        """Logits of the rows of `input_ids` with their media: `images` / `videos` [(pixels, grid)]
        and the audio clips' token counts, each in the batch's order of its kind. A row holds the
        next items of each kind whose tokens fill its placeholders; `positions(row_ids, span)` ->
        its [3, n] positions, `span` = kind -> (first, last) items of the row. Images and videos
        feed the vision part in order of appearance; `payloads` (the audio part's) go as given."""
        m = self.media
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        merge2 = m.merge * m.merge
        sizes = {"image": [t * h * w // merge2 for _, (t, h, w) in images],
                 "video": [t * h * w // merge2 for _, (t, h, w) in videos]}
        tokens = {"image": m.image, "video": m.video}
        if m.audio is not None:
            sizes["audio"], tokens["audio"] = [int(n) for n in audio_tokens], m.audio
        pos = torch.zeros((3, *input_ids.shape), dtype=torch.long)
        doc_ids = torch.zeros_like(input_ids)
        taken, order = dict.fromkeys(sizes, 0), []
        for row in range(input_ids.shape[0]):
            n = int(mask[row].sum())
            ids = input_ids[row, :n]
            span = {}
            for kind, size in sizes.items():  # the next items whose tokens fill the row's placeholders
                k, need = taken[kind], int((ids == tokens[kind]).sum())
                while need > 0 and k < len(size):
                    need, k = need - size[k], k + 1
                span[kind], taken[kind] = (taken[kind], k), k
            order += _in_appearance(ids, {kind: (tokens[kind], sizes[kind], span[kind]) for kind in ("image", "video")})
            pos[:, row, :n] = torch.as_tensor(positions(ids, span))
            doc_ids[row, n:] = 1
        for kind, size in sizes.items():
            if taken[kind] != len(size):
                raise ValueError(f"{len(size)} {kind}(s) given but the rows' {kind} placeholder tokens (id "
                                 f"{tokens[kind]}) hold {taken[kind]}: pass one item per placeholder span")
        vision = [(images if kind == "image" else videos)[k] for kind, k in order]
        payloads = dict(payloads or {})
        if vision:
            payloads[m.part] = {"pixel_values": torch.cat([p for p, _ in vision]),
                                "grid_thw": torch.tensor([g for _, g in vision], dtype=torch.long)}
        ids = input_ids.masked_fill(input_ids == m.video, m.image)  # one part: its placeholder
        batch = Batch(input_ids=ids, position_ids=pos.to(input_ids.device), doc_ids=doc_ids.to(input_ids.device),
                      payloads=payloads)
        return self.omni.text_logits(batch)


Qwen2VLModel = VisionLanguageModel  # the name it had when Qwen2-VL was the only family


def _split_by_grid(pixels: Optional[torch.Tensor], grid: Optional[torch.Tensor]) -> list:
    if pixels is None or grid is None:
        return []
    grids = [[int(x) for x in g] for g in grid.tolist()]
    return list(zip(pixels.split([t * h * w for t, h, w in grids]), grids))


def _in_appearance(ids: torch.Tensor, kinds: dict[str, tuple[int, list, tuple[int, int]]]) -> list[tuple[str, int]]:
    """(kind, index) of a row's media items in order of their first token: of kind -> (its
    placeholder id, its items' token counts, the row's (first, last) items), item k holds the
    next counts[k] placeholders of its kind (whether they are contiguous or, as a video's with its
    audio interleaved, not)."""
    found = []
    for kind, (token, counts, (first, last)) in kinds.items():
        at = torch.nonzero(ids == token).flatten().tolist()
        offset = 0
        for k in range(first, last):
            found.append((at[offset] if offset < len(at) else len(ids), kind, k))
            offset += counts[k]
    return [(kind, k) for _, kind, k in sorted(found)]


def load_pretrained(folder: Path, dtype: torch.dtype = torch.float32, device="cpu") -> VisionLanguageModel:
    """A one-process model of a folder of the family behind transformers' keyword arguments
    (`VisionLanguageModel`; Qwen2.5-Omni: `qwen2_5_omni.ThinkerModel`)."""
    cfg, media = config_from_hf(*_read_config(folder))
    with torch.device("meta"):
        omni = build_model(cfg)
    omni.to(dtype)
    omni.to_empty(device=device)
    omni.reset_buffers()
    load_weights_(omni, folder)
    facade = VisionLanguageModel
    if media.audio is not None:
        from .qwen2_5_omni import ThinkerModel as facade
    return facade(omni.eval(), media).eval()


# ---- export --------------------------------------------------------------------------------
# Files of a released folder that travel with its weights (tokenizer, chat template, processors,
# a whole Qwen2.5-Omni's speakers).
RELEASE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
                 "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json", "spk_dict.pt")


def export(src: Path, out: Path, release: Path, max_shard_size: int = 5 * 10**9,
           dtype: Optional[torch.dtype] = None, fam=None, cfg: Optional[ModelConfig] = None) -> Path:
    """A training checkpoint (sharded DCP, read without a process group) or a released folder of
    the family -> a folder in the release's layout: its tensor names (a stacked parameter split
    back into its tensors: Qwen2.5-Omni's attn.qkv into attn.q/k/v), safetensors shards (with an
    index when several), the release's config.json, tokenizer and processor files. A whole
    Qwen2.5-Omni release's other tensors (talker, token2wav) are copied through unchanged (their
    dtype kept), so that the folder stays a whole model transformers loads. `fam` and `cfg` (the
    names' adapter and our model config; default: the release's Family and config_from_hf) let
    another family (Janus) reuse this writer."""
    import shutil

    from .convert import DCPSource
    from .hf import HFCheckpointError
    from .safetensors_io import TensorSpec, read_header, shard_groups, shard_names, write_index, write_safetensors

    hf_config, source_name = _read_config(release)
    if fam is None:
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
        header = {s.name: s for f in tensors.files for s in read_header(f)[0]}
        pieces: dict[str, list[str]] = {}
        for key in tensors.keys():
            if fam.from_hf(key) is not None:
                pieces.setdefault(fam.from_hf(key), []).append(key)
        specs = {}
        for n, keys in pieces.items():
            keys.sort(key=fam.piece)
            first = header[keys[0]]
            rows = sum(header[k].shape[0] for k in keys) if first.shape else 0
            specs[n] = TensorSpec(n, first.dtype, (rows, *first.shape[1:]) if first.shape else first.shape)

        def read(group):
            return lambda name: _read(tensors, pieces[name])
    missing = sorted(set(expected) - set(specs))
    if missing or any(tuple(specs[n].shape) != expected[n] for n in expected):
        bad = missing[0] if missing else next(n for n in expected if tuple(specs[n].shape) != expected[n])
        raise HFCheckpointError(f"{src} does not hold the model of {release}/config.json (tensor {bad!r}): export with "
                                "the release the run was initialised from")
    layout = layout_of(release, fam)  # written as the release names its tensors
    out_specs, take = [], {}  # take: the checkpoint's name -> (ours, rows of it; None: all)
    for n, shape in expected.items():
        names = fam.hf_names(n, layout)
        rows = shape[0] // len(names) if shape else 0
        for i, hf_name in enumerate(names):
            whole = len(names) == 1
            out_specs.append(TensorSpec(hf_name, dtype or specs[n].dtype, shape if whole else (rows, *shape[1:])))
            take[hf_name] = (n, None if whole else slice(i * rows, (i + 1) * rows))
    others = None  # a whole Qwen2.5-Omni: the tensors that are not the thinker's, copied through
    if fam.prefix:
        if out.resolve() == release.resolve():
            raise HFCheckpointError(f"export to {out} would overwrite the talker and token2wav tensors it copies from "
                                    f"{release}: export to another folder")
        others = TensorFiles(_safetensors_files(release))
        out_specs += [s for f in others.files for s in read_header(f)[0] if not s.name.startswith(fam.prefix)]
    groups = shard_groups(out_specs, max_shard_size)
    files = shard_names("model", len(groups))
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors", out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    for name, group in zip(files, groups):
        get = read(list(dict.fromkeys(take[s.name][0] for s in group if s.name in take)))
        write_safetensors(out / name, group, _tensor_getter(get, take, group, others), {"format": "pt"})
    if len(files) > 1:
        write_index(out, "model", files, groups)
    if dtype is not None:
        hf_config["dtype"] = str(dtype).removeprefix("torch.")
        if fam.prefix:
            hf_config["thinker_config"]["dtype"] = hf_config["dtype"]
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for f in RELEASE_FILES:
        if (release / f).is_file() and release.resolve() != out.resolve():
            shutil.copyfile(release / f, out / f)
    return out


def _tensor_getter(get, take: dict, group: list, others: Optional[TensorFiles]):
    """The writer's getter of one shard: each of our tensors read once (`get`, in order), its
    pieces sliced from it; a tensor not in `take` copied from `others` as stored."""
    dtypes = {s.name: s.dtype for s in group}
    held: dict[str, torch.Tensor] = {}

    def tensor(hf_name: str) -> torch.Tensor:
        if hf_name not in take:
            return others.get(hf_name)
        ours, rows = take[hf_name]
        if ours not in held:
            held.clear()  # the previous parameter is done: tensors are written in parameter order
            held[ours] = get(ours)
        t = held[ours] if rows is None else held[ours][rows]
        return t.to(dtypes[hf_name]).contiguous()
    return tensor
