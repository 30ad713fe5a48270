"""Greedy decoding for one-process models, without a KV cache.

`greedy_generate(model, input_ids, max_new_tokens, eos_token_id=None, **model_kwargs)` calls
`model(input_ids=sequence_so_far, **model_kwargs)` on the whole sequence at every step and
appends the argmax of the last position's logits. Recomputing the prefix costs O(n^2) in the
sequence length, but it needs nothing from the model beyond its forward (no cache, no position
bookkeeping: a `Qwen2VLModel` recomputes its M-RoPE positions from the whole sequence) and the
logits are exactly those of a full forward. Meant for checks and short answers, not serving.

It follows transformers' `generate(do_sample=False)`:
- each row stops at its first `eos_token_id` (an id or a list of ids); a finished row is padded
  with the (first) eos id, as transformers pads with `pad_token_id` (which defaults to eos),
  and generation ends when every row has finished or after `max_new_tokens` steps;
- per-token keyword arguments grow with the sequence: `attention_mask` by ones,
  `mm_token_type_ids` (Qwen2-VL's text 0 / image 1 / video 2) by zeros, `token_type_ids` by
  its last value; everything else (pixel values, grids) is passed unchanged at every step.

Rows of a batch must have the same length and no padding (an `attention_mask` with zeros is
refused): our models take right-padded rows, which cannot be extended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn as nn

__all__ = ["greedy_generate"]

# How each per-token keyword argument is extended by one position per new token.
_GROWS_WITH_ONES = ("attention_mask",)
_GROWS_WITH_ZEROS = ("mm_token_type_ids",)
_GROWS_WITH_LAST = ("token_type_ids",)


def _logits(output) -> torch.Tensor:
    """Our models return logits; transformers' return an output object with `.logits`."""
    return output if isinstance(output, torch.Tensor) else output.logits


def _extended(name: str, value, batch: int):
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != batch:
        return value
    if name in _GROWS_WITH_ONES:
        new = value.new_ones((batch, 1))
    elif name in _GROWS_WITH_ZEROS:
        new = value.new_zeros((batch, 1))
    elif name in _GROWS_WITH_LAST:
        new = value[:, -1:]
    else:
        return value
    return torch.cat([value, new], dim=1)


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: Optional[Union[int, Sequence[int]]] = None, **model_kwargs) -> torch.Tensor:
    """The new token ids [B, n] (n <= max_new_tokens) of greedy decoding from `input_ids` [S] or
    [B, S]; `model(input_ids=..., **model_kwargs)` -> logits [B, S, V] (or an output with
    `.logits`). The model is run in eval mode (its previous mode is restored afterwards)."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [B, S] with S >= 1, got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    mask = model_kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool((mask != 0).all()):
        raise ValueError("padded prompts (attention_mask with zeros) are not supported: generate each prompt "
                         "on its own, or give rows of the same length")
    eos = [] if eos_token_id is None else [int(eos_token_id)] if isinstance(eos_token_id, int) else \
        [int(e) for e in eos_token_id]
    batch = input_ids.shape[0]
    sequence, kwargs = input_ids, dict(model_kwargs)
    eos_ids = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            logits = _logits(model(input_ids=sequence, **kwargs))
            token = logits[:, -1, :].argmax(dim=-1).to(input_ids.dtype)
            if eos:
                token = torch.where(finished, eos_ids[0], token)
                finished = finished | torch.isin(token, eos_ids)
            new_tokens.append(token)
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            kwargs = {name: _extended(name, value, batch) for name, value in kwargs.items()}
            if eos and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    if not new_tokens:
        return input_ids.new_zeros((batch, 0))
    return torch.stack(new_tokens, dim=1)
