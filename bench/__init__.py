"""Benchmarks: each `bench/<name>.py` prints its tables; `python -m bench` runs them all."""


def use_cpu_threads(threads: int | None) -> int:
    """Give this process the engine's CPU thread count, or `threads` (a --threads flag).

    The engines read CPU_THREADS at start; the flag goes there too, so every path of a run
    (and the naive baseline, which is no engine) computes with the same number of threads.
    """
    import os

    import torch

    from engine.config import load_settings

    if threads:
        os.environ["CPU_THREADS"] = str(threads)
    n = load_settings().resolved_cpu_threads()
    torch.set_num_threads(n)
    return n
