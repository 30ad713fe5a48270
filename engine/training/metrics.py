"""Per-step metrics: metrics.jsonl, TensorBoard events, the console progress bar, MFU."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device and compute precision (vendor data sheets, without sparsity):
# bf16 tensor cores; tf32 tensor cores (fp32 runs with TF32 matmuls, the CUDA default here);
# fp32 without tensor cores (train.tf32=false). Devices not listed get mfu=null: an invented
# peak would make the number meaningless.
PEAK_FLOPS = {
    "H100": {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12},  # SXM; the PCIe card is matched first
    "H100 PCIe": {"bf16": 756e12, "tf32": 378e12, "fp32": 51.2e12},
    "H200": {"bf16": 989e12, "tf32": 494.5e12, "fp32": 66.9e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "B200": {"bf16": 2250e12, "tf32": 1100e12, "fp32": 80e12},
}


def compute_precision(dtype: str, tf32: bool) -> str:
    """Which peak a run's matmuls are measured against: bf16, or fp32 with or without TF32."""
    return "bf16" if dtype == "bf16" else ("tf32" if tf32 else "fp32")


def device_peak_flops(device: torch.device, precision: str = "bf16") -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_FLOPS[key].get(precision)
    return None


def memory_gb(device: torch.device) -> float:
    """Peak memory of this rank: CUDA max allocated on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20


_NVML_HANDLES: dict = {}


def gpu_utilization(device: torch.device) -> Optional[float]:
    """Percent of the last sample period a kernel ran (nvidia-smi's figure), or None without
    nvidia-ml-py. NVML is initialised once per process, and its device index is the physical
    one that CUDA_VISIBLE_DEVICES maps this CUDA device to."""
    if device.type != "cuda":
        return None
    try:
        import pynvml  # nvidia-ml-py, GPU extra
        index = torch.cuda.current_device() if device.index is None else device.index
        handle = _NVML_HANDLES.get(index)
        if handle is None:
            pynvml.nvmlInit()
            nvml_index = torch.cuda._get_nvml_device_index(index)  # honours CUDA_VISIBLE_DEVICES
            handle = _NVML_HANDLES[index] = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
        return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except Exception:  # no NVML library or driver, an unknown device: the metric is optional
        return None


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the records of steps <= `last_step` in metrics.jsonl (a run resumed from step k
    logs k+1 onwards again, so every step appears once); a line cut short by a crash is
    dropped. Atomic: a temporary file renamed over the old one. Returns the records dropped."""
    if not path.is_file():
        return 0
    text = path.read_text()
    kept, dropped = [], 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
            keep = int(record["step"]) <= last_step
        except (ValueError, TypeError, KeyError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += bool(line.strip())
    if dropped or (text and not text.endswith("\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


class MetricsLogger:
    """Writes on rank 0 only; other ranks hold a no-op logger. Records after `start_step`
    (left by a run that went further than the checkpoint resumed from) are removed first."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, total_steps: int, start_step: int,
                 progress_bar: bool):
        self.enabled = enabled
        self.file = None
        self.writer = None
        self.bar = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        dropped = truncate_metrics(output_dir / "metrics.jsonl", start_step)
        if dropped:
            log.info("metrics.jsonl: %d records after step %d removed (they are logged again)", dropped, start_step)
        self.file = open(output_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=sys.stderr,
                            dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"train/{key}", value, record["step"])
        if self.bar is not None:
            decoders = {k: f"{v:.3f}" for k, v in record.items() if k.startswith("loss_")}
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", **decoders, lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()
