"""Benchmarks people run from the CLI (`tformer bench ...`): timings, peak memory, JSON + markdown + PNG."""
