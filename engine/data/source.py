"""The DataSource contract and the dataset registry.

A data source yields the Batches of (optimizer step, data-parallel rank): the global
batch of a step must not depend on the layout (dp size, micro-batch size) or on where a
run resumed. It never touches the model or its weights; what it needs to know of the
model's parts (placeholder ids, how many placeholders a payload fills) comes from a
`PartLayout`, built from the config alone.

Datasets are registered by name, like encoders:

    @register_dataset("my_data", modalities=True)
    def build(cfg: Config, parts: PartLayout | None) -> DataSource: ...

`modalities`: whether the dataset feeds an omni model's parts (then `parts` is given) or
plain text (a model without parts); None: text that suits both (a released omni model
fine-tuned on text conversations: its parts then run on dummy payloads). `prepare(cfg) -> {part name: weights path}`, optional,
runs first on every rank (so it must be safe to run concurrently: build files under
`build_once`): it builds the dataset's files and may name weights it made for parts (a
tokenizer it trains); the trainer loads those through the part's `init_from`, never
directly. A plugin module registers its datasets at import time and is listed in
`data.plugins`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, runtime_checkable

from engine.batch import Batch
from engine.config import Config, ConfigError


@runtime_checkable
class DataSource(Protocol):
    def micro_batches(self, step: int, global_batch_size: int, dp_rank: int, dp_size: int,
                      micro_batch_size: int) -> list[Batch]:
        """This rank's micro-batches of `step`; all ranks' together are the global batch."""

    def skipped_counts(self) -> dict[str, int]:
        """Bad samples left out so far, by reason (empty when none can be)."""


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    build: Callable[..., DataSource]
    modalities: Optional[bool]
    prepare: Optional[Callable[[Config], dict[str, str]]] = None


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(name: str, *, modalities: Optional[bool], prepare: Optional[Callable[[Config], dict[str, str]]] = None):
    """Decorator registering `build(cfg, parts) -> DataSource` under `name`."""
    def wrap(build):
        if name in DATASETS and DATASETS[name].build is not build:
            raise ValueError(f"dataset name {name!r} is already registered by {DATASETS[name].build.__module__}; "
                             "pick another")
        DATASETS[name] = DatasetEntry(name, build, modalities, prepare)
        return build
    return wrap


def get_dataset(name: str) -> DatasetEntry:
    if name not in DATASETS:
        raise ConfigError(f"config key 'data.dataset'={name!r} is not a registered dataset; registered: "
                          f"{', '.join(sorted(DATASETS))} (a plugin registers one with register_dataset; list its "
                          "module in data.plugins)")
    return DATASETS[name]
