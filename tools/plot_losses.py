#!/usr/bin/env python
"""Plot the LM and decoder losses of one or more training runs from their metrics.jsonl.

    python tools/plot_losses.py outputs/omni_digits outputs/omni_digits_moe --out docs/omni_digits_losses.png

One panel per loss (`loss`, then every `loss_<decoder>`); each run is one line, the raw
per-step values faint and a moving average over --smooth steps on top. Needs matplotlib
(`pip install matplotlib`, or the `plots` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: pass a training run's train.output_dir")
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[r["step"]] = r  # a resumed run re-logs nothing, but keep the last record per step
    return [records[s] for s in sorted(records)]


def moving_average(x: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(x) < n:
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    head = c[1:n] / np.arange(1, n)  # shorter windows at the start, so the curve starts at step 1
    return np.concatenate([head, (c[n:] - c[:-n]) / n])


def plot(runs: list[Path], labels: list[str], out: Path, smooth: int) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_metrics(r) for r in runs]
    keys = ["loss"] + sorted({k for recs in data for k in recs[0] if k.startswith("loss_")})
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for recs, label in zip(data, labels):
            steps = np.array([r["step"] for r in recs if key in r])
            values = np.array([r[key] for r in recs if key in r], dtype=float)
            if not len(values):
                continue
            line, = ax.plot(steps, moving_average(values, smooth), label=label, lw=1.6)
            ax.plot(steps, values, color=line.get_color(), alpha=0.2, lw=0.7)
        ax.set_title("LM loss (answer and text tokens)" if key == "loss" else f"{key[5:]} decoder loss")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training output directories")
    parser.add_argument("--labels", nargs="*", help="one legend label per run (default: the directory names)")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    parser.add_argument("--smooth", type=int, default=20, help="moving-average window in steps")
    args = parser.parse_args(argv)
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        print(f"error: {len(labels)} labels for {len(args.runs)} runs; give one --labels entry per run",
              file=sys.stderr)
        return 2
    try:
        plot(args.runs, labels, args.out, args.smooth)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
