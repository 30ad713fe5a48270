"""What the benchmark reports share: the machine they ran on, markdown tables, number formatting
and the atomic JSON save.

Top-level imports stay stdlib only: bench_data's spawned prepare workers re-import their main
module, and this one with it."""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]


def cpu_model(default: Optional[str] = None) -> Optional[str]:
    """The CPU's model name from /proc/cpuinfo (Linux), else `default`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return default


def load_average() -> Optional[list[float]]:
    """The 1, 5 and 15-minute load averages (Linux), to judge how busy the machine was."""
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def peak_rss_mib() -> float:
    """High-water RSS of this process image. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    from the parent across fork + exec, so a child would report the (bigger) parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(**extra) -> dict:
    """The machine and library versions a report was measured with (plus `extra` fields)."""
    import torch

    info = {"cpu": cpu_model(platform.processor() or "unknown"), "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "loadavg_start": load_average()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return {**info, **extra}


def table(header: list[str], rows: list[list], align: Optional[str] = None, title: Optional[str] = None) -> str:
    """A padded markdown table; `align` one 'l' / 'r' per column (default: all right)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    align = align or "r" * len(header)
    assert len(align) == len(header), (align, header)
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)) + " |"

    rule = "|" + "|".join("-" * (w + 2) if a == "l" else "-" * (w + 1) + ":" for w, a in zip(widths, align)) + "|"
    out = ([f"\n{title}"] if title else []) + [line(cells[0]), rule] + [line(r) for r in cells[1:]]
    return "\n".join(out)


def fmt(x, digits: int = 0) -> str:
    """A number with thousands separators; '-' for a missing value."""
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def command(module: str, argv: Optional[list[str]]) -> str:
    """The command line that reproduces a run, recorded in its report."""
    import sys

    return f"python -m benchmarks.{module} " + " ".join(sys.argv[1:] if argv is None else argv)


def save_report(report: dict, out: Path) -> None:
    """Write the JSON report atomically (a reader never sees half a file), world-readable."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as f:
        json.dump(report, f, indent=1)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)  # NamedTemporaryFile creates 0600
    os.replace(f.name, out)
