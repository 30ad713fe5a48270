import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parents[1]))  # the benchmarks package, under plain `pytest` too
torch.set_num_threads(1)
