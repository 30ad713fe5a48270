"""The contract every trainable model answers (dense, MoE and omni alike), so that the
trainer and the parallel layer never branch on the model kind or probe for attributes.

Training:
- `target_counts(batch) -> {loss name: int}`: targets of each counted loss in this local
  batch, known before the forward pass (the trainer sums them over the global batch);
- `loss_sums(batch) -> {loss name: 0-d tensor}`: each counted loss summed over its
  targets, plus terms without a count (e.g. `aux_loss`, a MoE load-balancing loss that is
  already this rank's share), which the trainer adds as they are;
- `loss_weights -> {loss name: float}`: the weight of each counted loss.
The trainer minimises sum_k w_k * loss_sums[k] / global_count[k] + the uncounted terms.
`loss_sums` is the model's entry point: the parallel layer registers it with FSDP, so it
must reach `forward` by a plain method call, not through `__call__`.

For the parallel layer and the metrics:
- `blocks` (ModuleDict of transformer blocks), `attention_modules()`, `set_attention_fn(fn)`,
  `moe_layers() -> {path: MoE}` (empty when dense), `parts() -> {name: part}` (empty when
  there are none), `flops_per_token(seq_len)`, `init_param_(name, tensor, generator)`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

@runtime_checkable
class TrainableModel(Protocol):
    blocks: nn.ModuleDict

    @property
    def loss_weights(self) -> dict[str, float]: ...

    def target_counts(self, batch) -> dict[str, int]: ...

    def loss_sums(self, batch) -> dict[str, torch.Tensor]: ...

    def attention_modules(self) -> list: ...

    def set_attention_fn(self, fn) -> None: ...

    def moe_layers(self) -> dict[str, nn.Module]: ...

    def parts(self) -> dict[str, nn.Module]: ...

    def flops_per_token(self, seq_len: int) -> float: ...

    def init_param_(self, name: str, tensor: torch.Tensor, generator: torch.Generator) -> None: ...


def check_contract(model: nn.Module) -> None:
    """A registered backbone that misses part of the contract is a programming error.

    Checked by name, not ``isinstance(model, TrainableModel)``: from Python 3.12 a runtime
    protocol looks members up statically, which misses submodules (``blocks``) that
    ``nn.Module`` serves through ``__getattr__``."""
    missing = sorted(name for name in _CONTRACT_MEMBERS if not hasattr(model, name))
    assert not missing, \
        f"{type(model).__name__} does not answer the model contract (engine/models/contract.py): lacks {missing}"


_CONTRACT_MEMBERS = frozenset(TrainableModel.__annotations__) | frozenset(
    name for name in vars(TrainableModel) if not name.startswith("_"))
