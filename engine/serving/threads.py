"""One OpenMP team for the forward pass on a CPU: the model thread's.

Why this module exists: libgomp (torch's OpenMP) keeps a team of worker threads for every OS
thread that ever ran a parallel region with more than one thread, until that thread exits.
Once the process holds more libgomp threads than it has cores, libgomp stops spinning at its
barriers (its "throttled" spin count) and every parallel region of a decode step waits for
its workers to wake up: a decode step with two threads then takes longer than with one. An engine that loads the model in a start thread,
decodes in the model thread and loads adapters in a third pays that price unless it keeps a
single team.

So:
- the model is loaded in a thread that exits when it is done (`run_in_passing_thread`), and
  its team goes with it;
- the model thread claims the thread count when it starts (`claim`);
- the torch work of every other long-lived thread (the adapter loader, a `BackgroundWorker`)
  runs single-threaded (`single_threaded`), so it never starts a team of its own, and at a
  lower priority (`lower_priority`), so a hot-load takes less from the running streams;
- the team's idle threads spin a short while at a barrier, then sleep (`default_wait_policy`):
  libgomp's default spins for a long time, and when a thread's partner has lost its core to
  another process (a shared host, a neighbour service) a decode step's hundreds of barriers
  each cost a time slice, so a single stream collapses; sleeping at once (PASSIVE) is steady
  under neighbours but wakes the partner at every barrier, which halves an idle host's
  single stream. A bounded spin keeps the idle host's speed and softens the collapse; an
  operator's own setting wins (docs/engine.md has the measurements and the choices).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_lock = threading.Lock()
_inside = 0  # threads inside `single_threaded` now
_claimed: int | None = None  # the model thread's count (`claim`)
_restore = 1  # what the last thread to leave `single_threaded` sets back
_wait_policy_source = "not set"  # where the wait setting came from (`default_wait_policy`), for the start log

#: libgomp's spin at a barrier before its thread sleeps, for the engine's processes unless the
#: operator set a wait policy: a tenth of libgomp's default of 300,000 rounds.
SPINCOUNT = "30000"
#: Settings of libgomp's waiting an operator may give; any of them set means the engine sets none.
_WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def default_wait_policy() -> None:
    """GOMP_SPINCOUNT=30000 for this process and its children, unless the operator set
    OMP_WAIT_POLICY or GOMP_SPINCOUNT (theirs wins).

    libgomp reads it once, when it is loaded, i.e. when torch is first imported: this runs
    when the `engine` package is imported (which imports no torch). Where torch was imported
    before, it is too late for this process; `describe` says so in the start log."""
    global _wait_policy_source
    given = [name for name in _WAIT_SETTINGS if os.environ.get(name, "").strip()]
    if given:
        _wait_policy_source = "set by " + " and ".join(f"{n}={os.environ[n]}" for n in given)
    elif "torch" in sys.modules:
        _wait_policy_source = (f"torch was imported before the engine, too early for its GOMP_SPINCOUNT={SPINCOUNT}; "
                               "set it in the environment")
    else:
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
        _wait_policy_source = "the engine's default"


def wait_policy() -> str:
    """How this process's OpenMP threads wait at a barrier, in words."""
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip()
    spin = os.environ.get("GOMP_SPINCOUNT", "").strip()
    if policy:
        return f"OMP_WAIT_POLICY={policy}" + (f", GOMP_SPINCOUNT={spin}" if spin else "")
    if spin:
        return f"spin {spin} rounds, then sleep (GOMP_SPINCOUNT)"
    return "libgomp's default (spin 300000 rounds)"


def describe(forward_threads: int) -> str:
    """The start log's line on the CPU's threads: who computes with how many."""
    import torch

    return (f"CPU threads: forward {forward_threads} (the model thread's OpenMP team, wait policy {wait_policy()}, "
            f"{_wait_policy_source}); adapter loader 1 (single-threaded, nice 10); "
            f"inter-op pool {torch.get_num_interop_threads()} (idle while decoding)")


def claim(threads: int) -> None:
    """The calling thread (the model thread) computes with `threads` OpenMP threads.

    torch's count looks global but OpenMP's is per thread: each thread takes torch's global
    value once, at its first parallel region or `get_num_threads`, and keeps it. That first
    read is made here, before setting, so it cannot come later (say in a `single_threaded`
    window of another thread, while the global is 1) and undo the claim."""
    import torch

    global _claimed
    with _lock:
        _claimed = threads
        torch.get_num_threads()  # this thread's one-time initialisation, now
        torch.set_num_threads(threads)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Torch work in this block, on this thread, runs on one thread (no OpenMP team).

    While any thread is inside, torch's global count is 1 too (a thread that has never
    computed would start with it; a thread that has, such as the model thread, keeps its own);
    the last thread to leave restores the model thread's count."""
    import torch

    global _inside, _restore
    with _lock:
        if _inside == 0:
            _restore = _claimed if _claimed is not None else torch.get_num_threads()
        _inside += 1
        torch.set_num_threads(1)
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                torch.set_num_threads(_restore)


def lower_priority(niceness: int = 10) -> None:
    """Lower the calling thread's CPU priority by `niceness` below its own (Linux: a thread's
    nice value is its own; 19 at most), so a process started under `nice` keeps the gap.

    For a background thread whose work can wait (an adapter load) while decode steps cannot:
    the forward's team uses every core it was given, so CPU time a loader takes stalls a
    barrier of the running step. Nice 10 gives it about a tenth of a core against a busy
    team, so a load still ends in well under a second; `SCHED_IDLE` (run only on idle cores)
    would starve a load behind a busy model thread for as long as it stays busy. Raising a nice
    value needs no privilege; where it is refused the thread keeps its priority."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
    except (AttributeError, OSError) as exc:  # not Linux, or a sandbox that refuses
        log.debug("could not lower the priority of thread %s: %s", threading.current_thread().name, exc)


class BackgroundWorker(ThreadPoolExecutor):
    """One thread for torch work that can wait (adapter loads and frees): at a lower priority,
    and each task single-threaded, so it neither starts an OpenMP team nor slows the steps."""

    def __init__(self, name: str) -> None:
        super().__init__(max_workers=1, thread_name_prefix=name, initializer=lower_priority)

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "Future[T]":
        def task() -> T:
            with single_threaded():
                return fn(*args, **kwargs)

        return super().submit(task)


def run_in_passing_thread(fn: Callable[[], T], name: str) -> T:
    """`fn()` in a new thread that exits when it returns, so the OpenMP team its torch work
    started exits too; its result or exception is the caller's."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
