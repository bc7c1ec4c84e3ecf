"""Benchmarks: the spec batches and timers (`spec`), attention backends side by side
(`attention`), training throughput (`train`) and where a step's time goes (`profile`). Scripts
built on these live in the repository's top-level `bench/`; results are in BENCHMARKS.md."""
