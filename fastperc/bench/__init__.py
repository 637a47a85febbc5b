"""Benchmarks shared by the pytest-benchmark suites (benchmarks/) and ``fastperc bench``."""
