"""A dataset defined outside engine/ through its public API only (`data.plugins`): is the
sum of some toy_sensor readings positive? Rows of step s are drawn from a generator seeded
by (seed, s, row), so the global batch does not depend on the layout."""

import numpy as np
import torch

from engine.config import Config
from engine.data import IGNORE_INDEX, OmniSample, fill_rows, micro_batches_of_rows, register_dataset
from engine.data import PushBackIterator
from engine.models import PartLayout

PROMPT, YES, NO, EOS = 10, 20, 21, 3


class SensorParity:
    def __init__(self, parts: PartLayout, seq_len: int, seed: int):
        self.parts, self.seq_len, self.seed = parts, seq_len, seed
        self.ph = parts.placeholders["toy_sensor"]
        self.channels = parts.parts["toy_sensor"].channels

    def _samples(self, step: int, row: int):
        rng = np.random.default_rng([self.seed, step, row])
        while True:
            n = int(rng.integers(1, 4))
            readings = torch.from_numpy(rng.standard_normal((n, self.channels)).astype(np.float32))
            full = [PROMPT] + [self.ph] * n + [YES if float(readings.sum()) > 0 else NO, EOS]
            first = 1 + n  # the last placeholder predicts the answer
            labels = [full[i + 1] if i + 1 >= first else IGNORE_INDEX for i in range(len(full) - 1)]
            yield OmniSample(full[:-1], labels, {"toy_sensor": [{"readings": readings}]})

    def row(self, step: int, row: int) -> list[OmniSample]:
        rows, _ = fill_rows(PushBackIterator(self._samples(step, row)), 1, self.seq_len)
        return rows[0]

    def micro_batches(self, step, global_batch_size, dp_rank, dp_size, micro_batch_size):
        return micro_batches_of_rows(self.row, step, global_batch_size, dp_rank, dp_size, micro_batch_size,
                                     self.seq_len, 0, self.parts.placeholders, self.parts.decoders, self.parts.parts)

    def skipped_counts(self) -> dict[str, int]:
        return {}


@register_dataset("sensor_parity", modalities=True)
def build(cfg: Config, parts: PartLayout) -> SensorParity:
    return SensorParity(parts, cfg.data.seq_len, cfg.train.seed)
