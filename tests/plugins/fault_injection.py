"""A test-only data plugin (`data.plugins: [tests/plugins/fault_injection.py]`,
`data.dataset: shakespeare_faults`): the shakespeare data, plus faults injected from
environment variables, so that the engine carries no test hooks.

    OMNI_FAULT_SLEEP_S=0.2             sleep this long in every step's batch (slow steps, so that a
                                       test can signal a run mid-way)
    OMNI_FAULT_KILL=STEP:RANK:MARKER   the process of rank RANK kills itself with SIGKILL when it
                                       asks for the batch of STEP (optimizer steps taken so far),
                                       once: it creates MARKER first, and a restart finding MARKER
                                       trains on
"""

import os
import signal
import time
from pathlib import Path

from engine.data import register_dataset
from engine.data.sources import build_shakespeare


class FaultyData:
    def __init__(self, inner):
        self.inner = inner

    def micro_batches(self, step, global_batch_size, dp_rank, dp_size, micro_batch_size):
        kill = os.environ.get("OMNI_FAULT_KILL")
        if kill:
            at, rank, marker = kill.split(":", 2)
            if step == int(at) and os.environ.get("RANK", "0") == rank and not Path(marker).exists():
                Path(marker).write_text(f"killed at step {step}\n")
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(float(os.environ.get("OMNI_FAULT_SLEEP_S", "0")))
        return self.inner.micro_batches(step, global_batch_size, dp_rank, dp_size, micro_batch_size)

    def skipped_counts(self):
        return self.inner.skipped_counts()


@register_dataset("shakespeare_faults", modalities=False)
def build(cfg, parts):
    return FaultyData(build_shakespeare(cfg, parts))
