"""What the benchmark reports record about the machine they ran on (shared by tools/bench_*.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def cpu_model(default: Optional[str] = None) -> Optional[str]:
    """The CPU's model name from /proc/cpuinfo (Linux), else `default`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default
