"""The omni model: named encoders and decoders around a dense or MoE backbone.

Placeholder tokens mark where each part's embeddings go. Their ids are the last ids of
the backbone vocabulary, one per part, in config order (encoders, then decoders); the text
tokenizer uses the ids below them. Each encoder's `lm_encode` output is projected to the
backbone width and written into its placeholders; each decoder's target is encoded into
codes whose embeddings fill its placeholders, and the hidden state just before each code
predicts it through the decoder's own head.

Computation-only. Batches may carry `ph_index` (per position: index of this placeholder
within its part's payload order, -1 elsewhere) and `dec_next_index` / `dec_next_part`
(per position: the code the next position holds, and which decoder); the data layer
computes them over whole rows, so that a sequence shard (Ulysses) knows which rows of an
encoder's output it needs without ever holding the full-length embedding sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from engine.batch import IGNORE_INDEX, Batch
from engine.config import ConfigError, ModelConfig
from engine.modalities import call_part
from engine.ops.fused_loss import linear_cross_entropy
from engine.plugins import load_plugins

from .part_specs import build_part, part_specs

def placeholder_ids(cfg: ModelConfig) -> dict[str, int]:
    """Part name -> its placeholder token id: the spec's `placeholder` (a released checkpoint's
    own media token, e.g. Qwen2-VL's <|image_pad|>), else one of the last ids of the vocabulary."""
    specs = [spec for _, _, spec in part_specs(cfg)]
    implicit = [spec["name"] for spec in specs if spec.get("placeholder") is None]
    first = cfg.vocab_size - len(implicit)
    return {spec["name"]: int(spec["placeholder"]) if spec.get("placeholder") is not None
            else first + implicit.index(spec["name"]) for spec in specs}


def text_vocab_size(cfg: ModelConfig) -> int:
    """Ids available to the text tokenizer (all but the implicit placeholders)."""
    return cfg.vocab_size - sum(1 for _, _, spec in part_specs(cfg) if spec.get("placeholder") is None)


@dataclass
class PartLayout:
    """What a data source needs to know of a model's parts, without the model: each part
    built from its spec on the meta device (shape logic such as `num_tokens`, `patchify`
    and `dummy_payload`; no weights), its placeholder id, and which parts are decoders."""

    parts: dict[str, nn.Module]
    placeholders: dict[str, int]
    decoders: list[str]
    text_vocab_size: int


def part_layout(cfg: ModelConfig) -> PartLayout:
    """The PartLayout of `cfg` (imports `model.plugins` first, as `build_model` does)."""
    load_plugins(cfg.plugins, "model.plugins")
    parts = {}
    with torch.device("meta"):
        for kind, i, spec in part_specs(cfg):
            part = build_part(kind, i, spec)
            if kind == "decoders":
                part.set_hidden_in(cfg.hidden_size)
            parts[spec["name"]] = part
    decoders = [spec["name"] for kind, _, spec in part_specs(cfg) if kind == "decoders"]
    return PartLayout(parts, placeholder_ids(cfg), decoders, text_vocab_size(cfg))


def placeholder_layout(input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor], ph: dict[str, int],
                       decoders: list[str]) -> dict[str, torch.Tensor]:
    """ph_index, dec_next_index, dec_next_part over whole rows (see the module docstring)."""
    ph_index = torch.full_like(input_ids, -1)
    for pid in ph.values():
        mask = input_ids == pid
        ph_index[mask] = torch.arange(int(mask.sum()), device=input_ids.device)
    dec_next_index = torch.full_like(input_ids, -1)
    dec_next_part = torch.full_like(input_ids, -1)
    same_doc = torch.ones_like(input_ids[:, 1:], dtype=torch.bool) if doc_ids is None else \
        doc_ids[:, 1:] == doc_ids[:, :-1]
    for j, name in enumerate(decoders):
        nxt = (input_ids[:, 1:] == ph[name]) & same_doc
        dec_next_index[:, :-1][nxt] = ph_index[:, 1:][nxt]
        dec_next_part[:, :-1][nxt] = j
    return {"ph_index": ph_index, "dec_next_index": dec_next_index, "dec_next_part": dec_next_part}


class OmniModel(nn.Module):
    def __init__(self, cfg: ModelConfig, backbone: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        hidden = cfg.hidden_size
        self.encoders, self.encoder_proj = nn.ModuleDict(), nn.ModuleDict()
        self.decoders, self.decoder_proj = nn.ModuleDict(), nn.ModuleDict()
        self.decoder_loss_weights: dict[str, float] = {}
        self.specs: dict[str, dict] = {}
        self._where: dict[str, tuple[str, int]] = {}
        for kind, i, spec in part_specs(cfg):
            name = spec.get("name") if isinstance(spec, dict) else None
            if name in self.specs:
                raise ConfigError(f"model.{kind}[{i}]: part {name!r} is listed twice; each part appears once")
            part = build_part(kind, i, spec)
            self.specs[name], self._where[name] = spec, (kind, i)
            if kind == "encoders":
                self.encoders[name] = part
                if spec.get("project", True):
                    self.encoder_proj[name] = nn.Linear(part.out_dim, hidden)
                elif part.out_dim != hidden:  # a released model whose encoder already speaks the LM's width
                    raise ConfigError(f"config key 'model.{kind}[{i}].project' ({name}): project=false needs the "
                                      f"part's output width {part.out_dim} to equal model.hidden_size={hidden}")
            else:
                part.set_hidden_in(hidden)
                self.decoders[name] = part
                if spec.get("project", True):
                    self.decoder_proj[name] = nn.Linear(part.embed_dim, hidden)
                elif part.embed_dim == hidden:  # a released model (Janus) whose code embeddings speak the LM's width
                    self.decoder_proj[name] = nn.Identity()
                else:
                    raise ConfigError(f"config key 'model.{kind}[{i}].project' ({name}): project=false needs the "
                                      f"part's embedding width {part.embed_dim} to equal model.hidden_size={hidden}")
                self.decoder_loss_weights[name] = float(spec.get("loss_weight", 1.0))
            if spec.get("freeze"):
                part.requires_grad_(False)
        self.ph = placeholder_ids(cfg)

    def part(self, name: str) -> nn.Module:
        return self.encoders[name] if name in self.encoders else self.decoders[name]

    def parts(self) -> dict[str, nn.Module]:
        return {**dict(self.encoders.items()), **dict(self.decoders.items())}

    def build_unsharded_part(self, name: str) -> nn.Module:
        """A new copy of part `name` as the config describes it, on the current device, with
        nothing of the parallel layer's wrapping: the trainer loads `init_from` weights into
        it with the part's own loader, then copies them into the (sharded) part."""
        kind, i = self._where[name]
        part = build_part(kind, i, self.specs[name])
        if kind == "decoders":
            part.set_hidden_in(self.cfg.hidden_size)
        return part

    # ---- what the parallel layer and the trainer see of the backbone ------------------
    @property
    def blocks(self) -> nn.ModuleDict:
        return self.backbone.blocks

    def attention_modules(self) -> list:
        return self.backbone.attention_modules()

    def set_attention_fn(self, fn) -> None:
        self.backbone.set_attention_fn(fn)

    def moe_layers(self) -> dict:
        return self.backbone.moe_layers()

    def flops_per_token(self, seq_len: int) -> float:
        return self.backbone.flops_per_token(seq_len)

    def init_param_(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
        head, _, rest = name.partition(".")
        if head == "backbone":
            self.backbone.init_param_(rest, tensor, generator)
        elif head in ("encoders", "decoders"):
            part_name, _, param = rest.partition(".")
            getattr(self, head)[part_name].init_param_(param, tensor, generator)
        elif name.endswith("bias"):
            tensor.zero_()
        else:
            tensor.normal_(0.0, self.cfg.init_std, generator=generator)

    def reset_buffers(self) -> None:
        self.backbone.reset_buffers()

    # ---- forward -----------------------------------------------------------------------
    def layout(self, batch: Batch) -> Batch:
        if batch.ph_index is not None:
            return batch
        return batch.replace(**placeholder_layout(batch.input_ids, batch.doc_ids, self.ph, list(self.decoders)))

    # ---- the training contract ---------------------------------------------------------
    @property
    def loss_weights(self) -> dict[str, float]:
        return {"lm": 1.0, **self.decoder_loss_weights}

    def target_counts(self, batch: Batch) -> dict[str, int]:
        """Targets of each loss in this (local) batch: known before the forward pass."""
        batch = self.layout(batch)
        counts = {"lm": int(self._text_targets(batch.labels).sum())}
        for j, name in enumerate(self.decoders):
            counts[name] = int((batch.dec_next_part == j).sum())
        return counts

    def loss_sums(self, batch: Batch) -> dict[str, torch.Tensor]:
        """`forward`'s sums, plus the backbone's `aux_loss` when it has MoE layers."""
        sums = self.forward(batch)
        if self.training and self.moe_layers():
            sums["aux_loss"] = self.backbone.aux_loss()
        return sums

    def _text_targets(self, labels: torch.Tensor) -> torch.Tensor:
        mask = labels != IGNORE_INDEX
        for pid in self.ph.values():  # a placeholder is never a text target
            mask &= labels != pid
        return mask

    def _place(self, emb, ids, pid, ph_index, rows: torch.Tensor, name: str, real: bool):
        mask = ids == pid
        if not real:  # dummy payload: keep the part in the graph with zero weight
            return emb + 0.0 * rows.sum()
        idx = ph_index[mask]
        if idx.numel() and int(idx.max()) >= rows.shape[0]:
            raise ValueError(f"part {name!r}: the text has more placeholder tokens than its payload has embeddings "
                             f"({int(idx.max()) + 1} > {rows.shape[0]}); make the placeholder count match num_tokens()")
        return emb.masked_scatter(mask[..., None], rows[idx].to(emb.dtype))

    def _payload(self, name: str, part: nn.Module, payloads: dict, ids: torch.Tensor, full_sequence: bool):
        """(payload to run, whether it is real): the batch's payload for `part`, checked
        against the part and (on a whole sequence) its placeholder count, or the part's
        dummy payload when this micro-batch has none."""
        payload = payloads.get(name)
        if payload is None:
            return part.dummy_payload(ids.device), False
        part.check_payload(payload)
        if full_sequence:
            self._check_count(name, int((ids == self.ph[name]).sum()), part.num_tokens(payload))
        return payload, True

    def text_logits(self, batch: Batch) -> torch.Tensor:
        """Logits [B, S, V] of the text head at every position (inference, parity checks)."""
        hidden, _ = self.hidden_states(self.layout(batch))
        return self.backbone.logits(hidden)

    def hidden_states(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The backbone's final hidden states [B, S, H] with every part's embeddings placed,
        and each decoder's target codes. `batch` must carry its placeholder layout."""
        ids = batch.input_ids
        payloads = batch.payloads
        full_sequence = batch.attn_meta is None  # a Ulysses shard cannot check global counts
        emb = self.backbone.embed(ids)
        for name, enc in self.encoders.items():
            payload, real = self._payload(name, enc, payloads, ids, full_sequence)
            rows = call_part(enc, "lm_encode", payload)
            if name in self.encoder_proj:
                rows = self.encoder_proj[name](rows)
            emb = self._place(emb, ids, self.ph[name], batch.ph_index, rows, name, real)
        codes = {}
        for name, dec in self.decoders.items():
            target, real = self._payload(name, dec, payloads, ids, full_sequence)
            dec_emb, codes[name] = dec.lm_encode(target)
            rows = self.decoder_proj[name](dec_emb)
            emb = self._place(emb, ids, self.ph[name], batch.ph_index, rows, name, real)
        hidden = self.backbone(position_ids=batch.position_ids, doc_ids=batch.doc_ids, inputs_embeds=emb,
                               attn_meta=batch.attn_meta, return_hidden=True, token_mask=batch.token_mask)
        return hidden, codes

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Sums of cross-entropy per loss ("lm" and each decoder's name) over this batch."""
        batch = self.layout(batch)
        hidden, codes = self.hidden_states(batch)
        text = self._text_targets(batch.labels)
        fused = self.cfg.fused_loss
        sums = {"lm": linear_cross_entropy(hidden[text], self.backbone.head_weight(), batch.labels[text],
                                           setting=fused)[0]}
        for j, (name, dec) in enumerate(self.decoders.items()):
            sel = batch.dec_next_part == j
            labels = codes[name][batch.dec_next_index[sel]]
            sums[name] = dec.lm_head(hidden[sel], labels, fused_loss=fused)[0]
        return sums

    @staticmethod
    def _check_count(name: str, placeholders: int, expected: int) -> None:
        if placeholders != expected:
            raise ValueError(f"part {name!r}: {placeholders} placeholder tokens in the text but the payload gives "
                             f"{expected} embeddings; the data must put exactly num_tokens(payload) placeholders")
