"""Benchmarks of the engine: run each from the repository root as
`python -m benchmarks.bench_<name>` (see docs/performance.md for what each measures)."""
