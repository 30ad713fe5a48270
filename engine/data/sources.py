"""Pick the training data source for a config: packed text, or an omni stream."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from engine.config import Config, ConfigError, expand_path

from .packing import PackedTextDataset, micro_batches
from .text_dataset import build_text_dataset
from .tokenizer import Tokenizer, VocabularyUnreachableError

OMNI_DATASETS = ("synthetic_omni", "omni_digits")


@dataclass
class TextData:
    dataset: PackedTextDataset

    def micro_batches(self, step, global_batch_size, dp_rank, dp_size, micro_batch_size) -> list[dict]:
        return micro_batches(self.dataset, step, global_batch_size, dp_rank, dp_size, micro_batch_size)


def build_train_data(cfg: Config, model: nn.Module) -> tuple[object, Tokenizer]:
    """`model` may be on the meta device: omni sources only use its parts' shape logic."""
    from engine.models.omni import OmniModel, placeholder_ids, text_vocab_size

    omni = isinstance(model, OmniModel)
    name = cfg.data.dataset
    if omni and name not in OMNI_DATASETS:
        raise ConfigError(f"config key 'data.dataset'={name!r} has no modality payloads for an omni model; "
                          f"use one of {', '.join(OMNI_DATASETS)}")
    if not omni and name != "shakespeare":
        raise ConfigError(f"config key 'data.dataset'={name!r} needs model.encoders/decoders; use shakespeare "
                          "for a text-only model")
    n_text = text_vocab_size(cfg.model)
    try:
        text, tokenizer = build_text_dataset(expand_path(cfg.data.cache_dir), n_text, cfg.data.seq_len,
                                             cfg.train.seed, cfg.data.tokenizer)
    except VocabularyUnreachableError as e:
        parts = f" less {cfg.model.vocab_size - n_text} placeholder ids" if n_text != cfg.model.vocab_size else ""
        if n_text < 260:
            fix = "raise model.vocab_size to 512 or more"
        elif cfg.data.tokenizer == "sentencepiece":
            fix = "set data.tokenizer=bpe, or lower model.vocab_size"
        else:
            fix = "lower model.vocab_size"
        raise ConfigError(f"config key 'model.vocab_size'={cfg.model.vocab_size}{parts} asks for a {n_text}-id "
                          f"data.tokenizer={cfg.data.tokenizer}, which the corpus cannot give ({e}); {fix}") from None
    if not omni:
        return TextData(text), tokenizer
    if name == "omni_digits":  # real digits: images, speech, videos, drawing (engine/data/omni_digits.py)
        from .omni_digits_source import build_omni_digits_data

        return build_omni_digits_data(cfg, model, tokenizer, text.tokens, strict=cfg.data.strict), tokenizer
    from .synthetic_omni import SyntheticOmniData

    parts = {**dict(model.encoders.items()), **dict(model.decoders.items())}
    return SyntheticOmniData(text.tokens, parts, placeholder_ids(cfg.model), list(model.decoders), cfg.data.seq_len,
                             cfg.train.seed, pad_id=tokenizer.pad_id), tokenizer
