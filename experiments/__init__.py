"""Experiment configs (get_config) and benchmarks (bench_*.py)."""
