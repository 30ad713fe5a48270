"""Read every tensor of a folder of .safetensors files (what transformers saved), for tests."""

from pathlib import Path

import torch
from safetensors import safe_open


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out
