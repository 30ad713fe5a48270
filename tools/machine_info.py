"""What the benchmark reports record about the machine they ran on, and how they are saved
(shared by tools/bench_*.py)."""

from __future__ import annotations

import json
import os
import tempfile
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


def save_report(report: dict, out: Path) -> None:
    """Write the JSON report atomically (a reader never sees half a file), world-readable."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=1)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)  # NamedTemporaryFile creates 0600
    os.replace(f.name, out)
