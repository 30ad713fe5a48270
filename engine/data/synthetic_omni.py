"""A deterministic synthetic omni stream: real Shakespeare text around random payloads.

For layout and parity tests of the omni model (every part, every layout, seconds on a
CPU), not for learning anything: payloads are random tensors of the parts' own shapes.
Row r of step s is built from its own generator seeded by (seed, s, r), so a global
batch is identical whatever the parallel layout and resume point.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.batch import IGNORE_INDEX

from .omni_packing import OmniSample, PushBackIterator, fill_rows, micro_batches_of_rows


def randomize(payload: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Same shapes as the part's dummy payload; float tensors replaced by noise in [-1, 1]."""
    return {k: torch.rand(v.shape, generator=gen) * 2 - 1 if v.is_floating_point() else v.clone()
            for k, v in payload.items()}


class SyntheticOmniData:
    def __init__(self, tokens: np.ndarray, parts: dict, ph: dict[str, int], decoders: list[str], seq_len: int,
                 seed: int, tokenizer=None):
        self.tokens, self.parts, self.ph, self.decoders = tokens, parts, ph, decoders
        self.seq_len, self.seed, self.tokenizer = seq_len, seed, tokenizer
        self.pad_id = tokenizer.pad_id if tokenizer is not None else 0

    def skipped_counts(self) -> dict[str, int]:
        return {}

    def _text(self, rng, n: int) -> list[int]:
        start = int(rng.integers(0, len(self.tokens) - n))
        return [int(t) for t in self.tokens[start:start + n]]

    def _samples(self, step: int, row: int):
        rng = np.random.default_rng([self.seed, step, row])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        kinds = ["text", *self.parts]
        while True:
            kind = kinds[int(rng.integers(len(kinds)))]
            if kind == "text":
                seq = self._text(rng, int(rng.integers(8, max(9, self.seq_len // 2))) + 1)
                yield OmniSample(seq[:-1], seq[1:])
                continue
            part = self.parts[kind]
            payload = randomize(part.dummy_payload("cpu"), gen)
            n = part.num_tokens(payload)
            prompt = self._text(rng, 5)
            if kind in self.decoders:  # prompt, then the codes to generate
                tokens = prompt + [self.ph[kind]] * n
                labels = prompt[1:] + [IGNORE_INDEX] * (n + 1)
            else:  # prompt, payload, caption
                caption = self._text(rng, 6)
                tokens = prompt + [self.ph[kind]] * n + caption[:-1]
                labels = prompt[1:] + [IGNORE_INDEX] * (n + 1) + caption[1:]
            yield OmniSample(tokens, labels, {kind: [payload]})

    def row(self, step: int, row: int) -> list[OmniSample]:
        samples, _ = fill_rows(PushBackIterator(self._samples(step, row)), 1, self.seq_len)
        return samples[0]

    def micro_batches(self, step: int, global_batch_size: int, dp_rank: int, dp_size: int,
                      micro_batch_size: int) -> list[dict]:
        return micro_batches_of_rows(self.row, step, global_batch_size, dp_rank, dp_size, micro_batch_size,
                                     self.seq_len, self.pad_id, self.ph, self.decoders, self.parts)
