"""Synthetic image captions for the tiny Qwen2-VL of tests/test_qwen2_vl.py (public engine API
only): text, then an image between <|vision_start|> and <|vision_end|> as the Qwen2-VL
processor lays it out, then a one-token answer (is the image's mean positive?). Rows carry
multimodal rotary positions [3, B, S] restarting per sample. Rows of step s come from a
generator seeded by (seed, s, row), so the global batch does not depend on the layout."""

import numpy as np
import torch

from engine.config import Config
from engine.data import IGNORE_INDEX, OmniSample, PushBackIterator, fill_rows, pack_rows, packed_mrope_positions
from engine.data import register_dataset
from engine.models import PartLayout

START, END, YES, NO = 302, 303, 10, 11  # the tiny model's <|vision_start|>, <|vision_end|>; two answer ids


class ImageCaptions:
    def __init__(self, parts: PartLayout, seq_len: int, seed: int):
        self.parts, self.seq_len, self.seed = parts, seq_len, seed
        self.ph = parts.placeholders["vision"]
        self.vision = parts.parts["vision"]

    def _samples(self, step: int, row: int):
        rng = np.random.default_rng([self.seed, step, row])
        m = self.vision.spatial_merge_size
        while True:
            grid = [1, m * int(rng.integers(1, 3)), m * int(rng.integers(1, 3))]
            pixels = torch.from_numpy(rng.standard_normal((int(np.prod(grid)), self.vision.patch_dim))
                                      .astype(np.float32))
            text = rng.integers(20, 290, int(rng.integers(2, 6))).tolist()
            n = int(np.prod(grid)) // m ** 2
            full = text + [START] + [self.ph] * n + [END] + [YES if float(pixels.mean()) > 0 else NO, END]
            labels = full[1:] + [IGNORE_INDEX]
            yield OmniSample(full, labels, {"vision": [{"pixel_values": pixels, "grid_thw": torch.tensor([grid])}]})

    def row(self, step: int, row: int) -> list[OmniSample]:
        rows, _ = fill_rows(PushBackIterator(self._samples(step, row)), 1, self.seq_len)
        return rows[0]

    def micro_batches(self, step, global_batch_size, dp_rank, dp_size, micro_batch_size):
        per_rank = global_batch_size // dp_size
        first = dp_rank * per_rank
        out = []
        for lo in range(first, first + per_rank, micro_batch_size):
            rows = [self.row(step, r) for r in range(lo, lo + micro_batch_size)]
            batch = pack_rows(rows, self.seq_len, 0, self.parts.placeholders, self.parts.decoders, self.parts.parts)
            positions = torch.stack([torch.from_numpy(packed_mrope_positions(
                batch.input_ids[r].tolist(), [len(s) for s in samples],
                [g for s in samples for g in s.payloads["vision"][0]["grid_thw"].tolist()], None,
                self.ph, -1, self.vision.spatial_merge_size)[0]) for r, samples in enumerate(rows)], dim=1)
            out.append(batch.replace(position_ids=positions))
        return out

    def skipped_counts(self) -> dict[str, int]:
        return {}


@register_dataset("qwen2_vl_images", modalities=True)
def build(cfg: Config, parts: PartLayout) -> ImageCaptions:
    return ImageCaptions(parts, cfg.data.seq_len, cfg.train.seed)
