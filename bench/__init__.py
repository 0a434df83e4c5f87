"""Benchmarks: each `bench/<name>.py` prints its tables; `python -m bench` runs them all."""
