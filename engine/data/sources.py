"""The data stages of the build: `prepare_data(cfg)` then `build_train_data(cfg)`, and the
built-in datasets (`shakespeare` text, `synthetic_omni`). Neither stage sees the model."""

from __future__ import annotations

import copy
import logging

import numpy as np

from engine.config import Config, ConfigError, expand_path
from engine.models.omni import PartLayout, part_layout, text_vocab_size
from engine.plugins import load_plugins

from .packing import PackedTextDataset, micro_batches
from .source import DataSource, DatasetEntry, get_dataset, register_dataset
from .synthetic_omni import SyntheticOmniData
from .text_dataset import build_text_dataset
from .tokenizer import TOKENIZER_KINDS, VocabularyUnreachableError
from .user_data import UserData, build_user_data

log = logging.getLogger(__name__)


def _entry(cfg: Config) -> DatasetEntry:
    try:
        load_plugins(cfg.data.plugins, "data.plugins")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    entry = get_dataset(cfg.data.dataset)
    has_parts = bool(cfg.model.encoders or cfg.model.decoders)
    if has_parts and entry.modalities is False:
        raise ConfigError(f"config key 'data.dataset'={entry.name!r} has no modality payloads for a model with "
                          "encoders/decoders; use a dataset registered with modalities=True (e.g. synthetic_omni)")
    if entry.modalities and not has_parts:
        raise ConfigError(f"config key 'data.dataset'={entry.name!r} feeds model parts, but the model has no "
                          "encoders/decoders; add them, or use a text dataset such as shakespeare")
    return entry


def prepare_data(cfg: Config) -> Config:
    """Run the dataset's prepare step (its files; weights it makes for parts) and return the
    config with those weights set as the parts' `init_from` where the config leaves it unset."""
    entry = _entry(cfg)
    made = entry.prepare(cfg) if entry.prepare else {}
    if not made:
        return cfg
    cfg = copy.deepcopy(cfg)
    for spec in [*cfg.model.encoders, *cfg.model.decoders]:
        path = made.get(spec["name"])
        if path and not spec.get("init_from"):
            spec["init_from"] = str(path)
            log.info("part %s: init_from=%s (prepared by data.dataset=%s)", spec["name"], path, entry.name)
    return cfg


def dataset_parts(cfg: Config, entry: DatasetEntry | None = None) -> PartLayout | None:
    """The model's parts for a dataset that feeds them (modalities=True), or may (None)."""
    entry = entry or _entry(cfg)
    has_parts = bool(cfg.model.encoders or cfg.model.decoders)
    return part_layout(cfg.model) if entry.modalities or (entry.modalities is None and has_parts) else None


def build_train_data(cfg: Config) -> DataSource:
    entry = _entry(cfg)
    return entry.build(cfg, dataset_parts(cfg, entry))


def build_eval_data(cfg: Config) -> DataSource | None:
    """Validation data of the text and conversations datasets (None without data.eval_path
    or data.eval_fraction, and for other datasets)."""
    if cfg.data.dataset not in ("text", "conversations"):
        if cfg.data.eval_path or cfg.data.eval_fraction:
            raise ConfigError(f"config keys 'data.eval_path' / 'data.eval_fraction' need data.dataset=text or "
                              f"conversations, not {cfg.data.dataset}")
        return None
    return build_user_data(cfg, evaluation=True, parts=dataset_parts(cfg))


def text_stream(cfg: Config) -> tuple[PackedTextDataset, object]:
    """The Shakespeare token stream and the text tokenizer (`data.tokenizer`, sized to the
    model's text ids), as every built-in dataset uses them; for plugins too."""
    n_text = text_vocab_size(cfg.model)
    if cfg.data.tokenizer not in TOKENIZER_KINDS:
        raise ConfigError(f"config key 'data.tokenizer'={cfg.data.tokenizer!r}: data.dataset={cfg.data.dataset} trains "
                          f"its own tokenizer on its corpus; use {' or '.join(TOKENIZER_KINDS)} (a tokenizer path is "
                          "for data.dataset=text or conversations)")
    try:
        return build_text_dataset(expand_path(cfg.data.cache_dir), n_text, cfg.data.seq_len, cfg.train.seed,
                                  cfg.data.tokenizer)
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


# ---- built-in datasets -------------------------------------------------------------------
class TextData:
    """Packed windows of the Shakespeare stream (documents masked at their boundaries)."""

    def __init__(self, dataset: PackedTextDataset, tokenizer):
        self.dataset, self.tokenizer = dataset, tokenizer

    def micro_batches(self, step, global_batch_size, dp_rank, dp_size, micro_batch_size):
        return micro_batches(self.dataset, step, global_batch_size, dp_rank, dp_size, micro_batch_size)

    def skipped_counts(self) -> dict[str, int]:
        return {}


@register_dataset("shakespeare", modalities=False)
def build_shakespeare(cfg: Config, parts: None) -> TextData:
    return TextData(*text_stream(cfg))


@register_dataset("text", modalities=None)
def build_text(cfg: Config, parts: PartLayout | None) -> UserData:
    return build_user_data(cfg)


@register_dataset("conversations", modalities=None)
def build_conversations(cfg: Config, parts: PartLayout | None) -> UserData:
    return build_user_data(cfg, parts=parts)


@register_dataset("synthetic_omni", modalities=True)
def build_synthetic_omni(cfg: Config, parts: PartLayout) -> SyntheticOmniData:
    text, tokenizer = text_stream(cfg)
    return SyntheticOmniData(np.asarray(text.tokens), parts.parts, parts.placeholders, parts.decoders,
                             cfg.data.seq_len, cfg.train.seed, tokenizer)
