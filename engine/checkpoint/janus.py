"""Janus checkpoints in and out (transformers' `JanusForConditionalGeneration`): the state-dict
adapter, the config that composes our omni model from registered parts, and a module that takes
transformers' keyword arguments.

Composition (what `config_from_hf` makes of a Janus config.json):
- the `siglip` encoder part: Janus's vision tower and its aligner MLP (`vision_config`); the aligner
  already outputs the language model's width, so the part has no projection (`project: false`) and
  its placeholder is the checkpoint's own `image_token_id` (<image_placeholder>);
- a dense LLaMA backbone (`text_config`), its lm_head tied to the embeddings when the top-level
  `tie_word_embeddings` says so (JanusConfig's default, true; the text config's own key is not
  what transformers ties by);
- the `image_vq` decoder part: the VQ tokenizer (`vq_config`) with the generation embeddings,
  aligner and head; its code embeddings already have the backbone's width (`project: false`).
  Janus has no text token for an image being generated: the part's placeholder is the last id of
  the vocabulary, as for any part without one (its code embeddings replace it, so the
  checkpoint's token there is never read by our training data).

Names: ours are `encoders.siglip.*` (the tower under transformers' names, the attention's
`projection_layer` as SigLIP's `out_proj`; `aligner.*`), `backbone.*` (`blocks.N` for
`layers.N`) and `decoders.image_vq.*` (`vqmodel.*`, `generation_*`); the checkpoint's are
`model.vision_model.*`, `model.aligner.*`, `model.language_model.*`, `model.vqmodel.*`,
`model.generation_*`, `lm_head.weight`. Loading (strict, streamed, FSDP rows only) and export
(release naming, sharded safetensors, config and tokenizer files copied) are qwen2_vl.py's, given
this adapter.
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
from engine.models import build_model

from .qwen2_vl import _read_config

ARCHITECTURE = "JanusForConditionalGeneration"
ENCODER, DECODER = "siglip", "image_vq"
DEFAULT_IMAGE_TOKEN_ID = 100581  # JanusConfig's default
_OUT = (".self_attn.out_proj.", ".self_attn.projection_layer.")  # (ours, Janus's)
_DECODER_PREFIXES = ("vqmodel.", "generation_embeddings.", "generation_aligner.", "generation_head.")


@dataclass(frozen=True)
class JanusFamily:
    """The state-dict adapter of Janus checkpoints (the interface of qwen2_vl.Family that
    loading and export use). `tied`: the lm_head is the embeddings (a checkpoint's
    lm_head.weight, when it has one, is then not read)."""

    tied: bool = False
    architecture: str = ARCHITECTURE
    prefix: str = ""  # the whole checkpoint is the model

    @property
    def architectures(self) -> tuple[str, ...]:
        return (self.architecture,)

    def from_hf(self, name: str) -> Optional[str]:
        if name.endswith("rotary_emb.inv_freq") or (self.tied and name == "lm_head.weight"):
            return None
        if name.startswith("model.vision_model."):
            return f"encoders.{ENCODER}." + name[len("model.vision_model."):].replace(_OUT[1], _OUT[0])
        if name.startswith("model.aligner."):
            return f"encoders.{ENCODER}.aligner." + name[len("model.aligner."):]
        if name.startswith("model.") and name[len("model."):].startswith(_DECODER_PREFIXES):
            return f"decoders.{DECODER}." + name[len("model."):]
        if name.startswith("model.language_model."):
            rest = name[len("model.language_model."):]
            return "backbone." + ("blocks." + rest[len("layers."):] if rest.startswith("layers.") else rest)
        if name == "lm_head.weight":
            return "backbone.lm_head.weight"
        return name  # not ours: the loader names it as a tensor without a place in the model

    def to_hf(self, name: str, layout: str = "released") -> str:
        enc, dec = f"encoders.{ENCODER}.", f"decoders.{DECODER}."
        if name.startswith(enc + "aligner."):
            return "model.aligner." + name[len(enc + "aligner."):]
        if name.startswith(enc):
            return "model.vision_model." + name[len(enc):].replace(_OUT[0], _OUT[1])
        if name.startswith(dec):
            return "model." + name[len(dec):]
        if name == "backbone.lm_head.weight":
            return "lm_head.weight"
        rest = name[len("backbone."):]
        return "model.language_model." + ("layers." + rest[len("blocks."):] if rest.startswith("blocks.") else rest)

    def hf_names(self, name: str, layout: str = "released") -> tuple[str, ...]:
        return (self.to_hf(name),)  # one tensor per parameter; Janus has one naming

    @staticmethod
    def piece(name: str) -> int:
        return 0


def is_janus(folder: Path) -> bool:
    """Whether `folder` holds a Janus config.json."""
    config = Path(folder) / "config.json"
    try:
        return config.is_file() and (json.loads(config.read_text()).get("architectures") or [None])[0] == ARCHITECTURE
    except json.JSONDecodeError:
        return False


def family(hf: dict) -> JanusFamily:
    return JanusFamily(tied=bool(hf.get("tie_word_embeddings", True)))


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[ModelConfig, int]:
    """Our ModelConfig (siglip encoder + LLaMA backbone + image_vq decoder) and the image token id."""
    from engine.modalities.image_vq import ImageVQDecoder
    from engine.modalities.siglip import SiglipEncoder

    from .hf import HFCheckpointError, UnsupportedArchitectureError
    from .hf import config_from_hf as text_config_from_hf

    arch = (hf.get("architectures") or [None])[0]
    if arch != ARCHITECTURE:
        raise UnsupportedArchitectureError(f"{source}: architecture {arch!r} is not {ARCHITECTURE}")
    for key in ("text_config", "vision_config", "vq_config"):
        if not isinstance(hf.get(key), dict):
            raise HFCheckpointError(f"{source}: a {ARCHITECTURE} config needs its {key}: add it to config.json")
    text = hf["text_config"]
    if text.get("model_type", "llama") != "llama":
        raise UnsupportedArchitectureError(f"{source}: a Janus text model of type {text['model_type']!r} is not "
                                           "supported: only llama")
    cfg = text_config_from_hf({**text, "architectures": ["LlamaForCausalLM"],
                               "tie_word_embeddings": family(hf).tied}, source)
    vision = SiglipEncoder.options_from_hf_config(hf)
    try:
        vq = ImageVQDecoder.options_from_hf_config(hf)
    except ValueError as e:
        raise HFCheckpointError(f"{source}: {e}") from None
    widths = {"vision_config.projection_dim": vision["projection_dim"], "vq_config.projection_dim":
              vq["projection_dim"], "vq_config.image_token_embed_dim": vq["hidden_in"]}
    for key, width in widths.items():
        if width != cfg.hidden_size:
            raise HFCheckpointError(f"{source}: {key}={width} differs from the text model's hidden_size="
                                    f"{cfg.hidden_size}: fix config.json")
    image = int(hf.get("image_token_id", DEFAULT_IMAGE_TOKEN_ID))
    if not 0 <= image < cfg.vocab_size - 1:
        raise HFCheckpointError(f"{source}: image_token_id={image} must lie below vocab_size - 1 = "
                                f"{cfg.vocab_size - 1} (the last id is the image_vq part's placeholder)")
    cfg.encoders = [{"name": ENCODER, **vision, "project": False, "placeholder": image}]
    cfg.decoders = [{"name": DECODER, **vq, "project": False}]
    return cfg, image


# What the checkpoint's config.json decides; the run config keeps every other model key.
ARCHITECTURE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "rope_theta", "rope_scaling", "max_position_embeddings", "rms_norm_eps", "qk_norm",
                     "attention_bias", "tie_embeddings", "encoders", "decoders", "mrope_section", "backbone")


def compose_model_config(run: ModelConfig) -> ModelConfig:
    """`model.init_from: JANUS_FOLDER` alone: the model the folder's config.json describes (the
    run's other model keys kept). A part's `loss_weight`, `freeze`, `recipe` or
    `activation_checkpointing` given in the run config for the same part name is kept."""
    made, _ = config_from_hf(*_read_config(Path(run.init_from).expanduser()))
    out = copy.deepcopy(run)
    keep = {s.get("name"): {k: v for k, v in s.items() if k in ("loss_weight", "freeze", "recipe",
                                                              "activation_checkpointing")}
            for s in [*run.encoders, *run.decoders] if isinstance(s, dict)}
    for key in ARCHITECTURE_KEYS:
        setattr(out, key, copy.deepcopy(getattr(made, key)))
    out.encoders = [{**s, **keep.get(s["name"], {})} for s in out.encoders]
    out.decoders = [{**s, **keep.get(s["name"], {})} for s in out.decoders]
    return out


def load_weights_(model: nn.Module, folder: Path) -> int:
    """Stream a Janus folder's tensors into our (possibly FSDP-sharded) omni model, strictly.
    Returns the bytes read."""
    from . import qwen2_vl

    hf, _ = _read_config(folder)
    return qwen2_vl.load_weights_(model, Path(folder), fam=family(hf))


# ---- transformers' calling convention ----------------------------------------------------
class JanusModel(nn.Module):
    """Our omni model behind `JanusForConditionalGeneration`'s keyword arguments.

    - `model(input_ids, pixel_values=None, attention_mask=None)` -> text logits [B, S, V]
      (understanding: each image [C, H, W] of `pixel_values` fills the next run of
      image_token_id placeholders; `attention_mask` may pad rows on the right);
    - `model.generation_logits(input_ids, image_tokens)` -> [B, n, num_embeddings]: the
      generation head's logits of each of the n codes of `image_tokens` [B, n], predicted after
      the prompt `input_ids` and the codes before it (what transformers' `generate` with
      generation_mode="image" scores, fed the same codes: teacher forcing)."""

    def __init__(self, omni: nn.Module, image_token_id: int):
        super().__init__()
        self.omni, self.image_token_id = omni, image_token_id

    @property
    def config(self) -> ModelConfig:
        return self.omni.cfg

    def forward(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, **unused) -> torch.Tensor:
        payloads = {} if pixel_values is None else {ENCODER: {"pixel_values": pixel_values}}
        b, s = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        lengths = mask.sum(-1)
        if not torch.equal(mask, (torch.arange(s, device=mask.device)[None] < lengths[:, None]).to(mask.dtype)):
            raise ValueError("attention_mask must pad rows on the right only (1s, then 0s)")
        doc_ids = (mask == 0).long()  # the padding is a document of its own
        positions = torch.arange(s, device=input_ids.device)[None].expand(b, s)
        batch = Batch(input_ids=input_ids, position_ids=positions, doc_ids=doc_ids, payloads=payloads)
        return self.omni.text_logits(batch)

    def generation_logits(self, input_ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        omni = self.omni
        dec = omni.decoders[DECODER]
        if image_tokens.ndim != 2 or image_tokens.shape[0] != input_ids.shape[0] or image_tokens.shape[1] < 1:
            raise ValueError(f"image_tokens has shape {tuple(image_tokens.shape)}; expected [{input_ids.shape[0]}, "
                             "n >= 1] (one row of codes per prompt)")
        text = omni.backbone.embed(input_ids)
        codes = omni.decoder_proj[DECODER](dec.generation_aligner(dec.generation_embeddings(image_tokens)))
        emb = torch.cat([text, codes.to(text.dtype)], dim=1)
        hidden = omni.backbone(inputs_embeds=emb, return_hidden=True)
        first = input_ids.shape[1] - 1
        return dec.generation_head(hidden[:, first:first + image_tokens.shape[1]])


def load_pretrained(folder: Path, dtype: torch.dtype = torch.float32, device="cpu") -> JanusModel:
    """A one-process model of a Janus folder behind transformers' keyword arguments."""
    cfg, image = config_from_hf(*_read_config(folder))
    with torch.device("meta"):
        omni = build_model(cfg)
    omni.to(dtype)
    omni.to_empty(device=device)
    omni.reset_buffers()
    load_weights_(omni, folder)
    return JanusModel(omni.eval(), image).eval()


def export(src: Path, out: Path, release: Path, max_shard_size: int = 5 * 10**9,
           dtype: Optional[torch.dtype] = None) -> Path:
    """A training checkpoint (DCP) or a Janus folder -> a folder in the release's layout, with its
    config.json, tokenizer and processor files (qwen2_vl.export with the Janus adapter)."""
    from . import qwen2_vl

    hf, source = _read_config(release)
    cfg, _ = config_from_hf(hf, source)
    return qwen2_vl.export(Path(src), Path(out), Path(release), max_shard_size, dtype, fam=family(hf), cfg=cfg)
