import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the benchmarks package, under plain `pytest` too
torch.set_num_threads(1)

import omni_datasets  # noqa: E402,F401  registers the Shakespeare corpus download (the engine never downloads)
from engine.data import ensure_corpus  # noqa: E402


def pytest_sessionstart(session):
    """The demo corpus in the default cache before any test: tests that launch workers or
    torchrun ranks directly (not through pretrain_omni.py) read it from there. Every xdist
    worker calls this; the first builds it under a file lock, the others read it."""
    ensure_corpus(Path("~/.cache/omni-engine").expanduser())
