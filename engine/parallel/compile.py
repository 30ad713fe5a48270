"""torch.compile per transformer block, applied from the parallel layer (torchtitan style).

Each block is compiled on its own rather than the whole model: every block has the same
code and shapes, so Dynamo traces one graph and reuses it for all of them (the compile
cost does not grow with depth), and the pieces around the blocks (embedding, head, loss,
the FSDP root) stay eager. Order in `parallelize`: activation checkpointing first (the
checkpoint becomes part of the compiled graph), then compile, then FSDP (its hooks run
outside the compiled region).

`torch.compile(block)` wraps the block in an `OptimizedModule`, which adds `_orig_mod.`
to parameter names; `engine.parallel.init` strips it before seeding, and DCP's
`get_state_dict` strips it from checkpoint keys, so seeds and checkpoints do not depend on
whether compile is on.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def apply_compile(blocks: nn.ModuleDict) -> None:
    """Replace every block of `blocks` with its compiled version (in place)."""
    for name, block in list(blocks.items()):
        blocks[name] = torch.compile(block, fullgraph=False)
