"""engine.serving.threads: the forward's OpenMP team is the model thread's alone.

What must hold: a thread that claims N threads computes with N whatever other threads do; a
`single_threaded` block computes with one thread on its own thread only, and leaves the count
new threads start with as the model thread claimed it; a thread run in passing hands back its
result or its exception; a lowered thread runs at a lower priority, alone. The engine's side (the model
thread claims CPU_THREADS, the adapter loader runs lowered): tests/engine/test_fast_path.py.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Callable

import pytest
import torch

from engine.serving import threads as cpu_threads


@pytest.fixture(autouse=True)
def _restore_counts():
    before, claimed = torch.get_num_threads(), cpu_threads._claimed
    yield
    cpu_threads._claimed = claimed
    torch.set_num_threads(before)


def _in_thread(fn: Callable[[], Any]) -> Any:
    return cpu_threads.run_in_passing_thread(fn, "probe")  # its own behaviour: the test below


def test_a_single_threaded_block_leaves_the_claiming_thread_and_new_threads_their_count() -> None:
    claimed, inside, leave = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def model() -> None:
        cpu_threads.claim(2)
        claimed.set()
        inside.wait(10)
        seen["model, while a block is open"] = torch.get_num_threads()
        x = torch.randn(256, 256)
        (x @ x).sum()  # a parallel region on the model thread meanwhile
        seen["model, after its own work"] = torch.get_num_threads()
        leave.set()

    m = threading.Thread(target=model)
    m.start()
    claimed.wait(10)

    def helper() -> None:
        with cpu_threads.single_threaded():
            seen["helper, inside"] = torch.get_num_threads()
            inside.set()
            leave.wait(10)
            with cpu_threads.single_threaded():  # nested: still one, and leaving the inner one keeps it
                pass
            seen["helper, after a nested block"] = torch.get_num_threads()

    _in_thread(helper)
    m.join()
    seen["a new thread, after"] = _in_thread(torch.get_num_threads)
    assert seen == {
        "model, while a block is open": 2, "model, after its own work": 2,
        "helper, inside": 1, "helper, after a nested block": 1, "a new thread, after": 2,
    }


def test_a_thread_in_passing_returns_the_result_or_raises_and_is_gone() -> None:
    ran_in: list[threading.Thread] = []

    def work() -> int:
        ran_in.append(threading.current_thread())
        return 42

    assert cpu_threads.run_in_passing_thread(work, "probe") == 42
    assert ran_in[0] is not threading.current_thread() and ran_in[0].name == "probe"
    assert not ran_in[0].is_alive()

    def fail() -> None:
        raise ValueError("model file is broken")

    with pytest.raises(ValueError, match="model file is broken"):
        cpu_threads.run_in_passing_thread(fail, "probe")


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are POSIX")
def test_a_lowered_thread_runs_at_a_lower_priority_and_the_caller_keeps_its_own() -> None:
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def lowered() -> int:
        cpu_threads.lower_priority()
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert _in_thread(lowered) == min(19, mine + 10)  # nice values add up to 19 at most
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="thread priorities are POSIX")
def test_a_thread_already_niced_is_lowered_from_where_it_stands() -> None:
    """A process started under `nice` (a shared host, a test run) keeps its loader below its
    model thread: the niceness adds to the thread's own."""
    def niced_then_lowered() -> tuple[int, int]:
        tid = threading.get_native_id()
        start = min(19, os.getpriority(os.PRIO_PROCESS, tid) + 2)
        os.setpriority(os.PRIO_PROCESS, tid, start)
        cpu_threads.lower_priority(5)
        return start, os.getpriority(os.PRIO_PROCESS, tid)

    start, lowered = _in_thread(niced_then_lowered)
    assert lowered == min(19, start + 5)


PROBE = """
import os, sys
{first}
import engine, torch
from engine.serving import threads
print(os.environ.get("OMP_WAIT_POLICY", "-"), os.environ.get("GOMP_SPINCOUNT", "-"))
print(threads.describe(2))
"""


@pytest.mark.parametrize("env, torch_first, policy, words", [
    ({}, False, "- 30000", ["spin 30000 rounds, then sleep", "the engine's default", "forward 2", "adapter loader 1"]),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, False, "PASSIVE -", ["wait policy OMP_WAIT_POLICY=PASSIVE",
                                                          "set by OMP_WAIT_POLICY=PASSIVE"]),
    ({"GOMP_SPINCOUNT": "10000"}, False, "- 10000", ["spin 10000 rounds", "set by GOMP_SPINCOUNT=10000"]),
    ({}, True, "- -", ["libgomp's default (spin 300000 rounds)", "torch was imported before the engine",
                       "set it in the environment"]),
])
def test_importing_the_engine_bounds_openmp_spinning_unless_the_operator_said_otherwise(
        env: dict[str, str], torch_first: bool, policy: str, words: list[str]) -> None:
    """libgomp reads its wait settings when torch loads it: `import engine` sets a bounded spin
    (GOMP_SPINCOUNT=30000) before that, an operator's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins,
    and a process that imported torch first is told in the start log line that it is too late."""
    import subprocess
    import sys

    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = PROBE.format(first="import torch" if torch_first else "")
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == policy
    assert all(w in out[1] for w in words), out[1]
