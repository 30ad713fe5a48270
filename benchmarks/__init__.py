"""Benchmarks of the engine: run each from the repository root as
`python -m benchmarks.bench_<name>` (see docs/performance.md for what each measures)."""

import omni_datasets  # noqa: E402,F401  (registers the demo corpus's download: the engine never downloads)
