"""CUDA graphs for the decode step, one per (batch bucket, key-length bucket, LoRA or not).

A decode step of a small model on a big GPU is tens of microseconds of GPU work behind
milliseconds of kernel launches; replaying a captured graph launches them all at once. The
graph reads only static buffers (the decode state's token, position, activity and LoRA-slot
tensors, the LoRA stacks and the KV cache), so loading an adapter into a slot or a row joining
never forces a re-capture. Buckets: batch 1, 2, 4, 8, ... up to the slot count; key length
128, 256, ... up to the context. A step whose rows all use the base model replays a graph
captured without the LoRA stacks (3 kernels per linear layer fewer). Graphs are captured on
first use and share one memory pool.

Captures run in CUDA's thread-local capture mode: only this (the model) thread may not make
capture-unsafe calls while a graph is recorded. In the default global mode a `torch.cuda.
synchronize()` or an allocation on any other thread of the process (an adapter loading, a
profiler, a benchmark reading memory statistics) would fail there and invalidate the capture.

If capture fails (a kernel that cannot be captured), the error is logged once with its
traceback and the step runs eagerly from then on: correct, only slower; `failed` says why.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]


def powers_of_two(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return out


def failure_text(exc: BaseException) -> str:
    """`Type: message` of an exception, led by the first error of its chain: when a capture
    fails, ending it raises too ("operation failed due to a previous error during capture"),
    and that second error hides the cause."""
    chain = [exc]
    while chain[-1].__context__ is not None and len(chain) < 8:
        chain.append(chain[-1].__context__)
    first = chain[-1]
    text = f"{type(first).__name__}: {first}".strip()
    if first is not exc:
        text += f" (then {type(exc).__name__}: {exc})".rstrip()
    return text


class DecodeGraphs:
    def __init__(self, step: Callable[[int, int, bool], torch.Tensor], slots: int, context: int) -> None:
        self.step = step  # (rows, key_len, lora) -> logits, reading only static buffers
        self.batch_buckets = powers_of_two(1, slots)
        self.key_buckets = powers_of_two(min(128, context), context)
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self.failed: str | None = None
        self.captures = 0

    def shape(self, rows: int, key_len: int) -> tuple[int, int]:
        return bucket(rows, self.batch_buckets), bucket(key_len, self.key_buckets)

    def run(self, rows: int, key_len: int, lora: bool = True) -> torch.Tensor:
        """Logits of the bucketed step (rows past `rows` are idle padding); `lora=False` when
        no row uses an adapter."""
        shape = (*self.shape(rows, key_len), lora)
        if self.failed is not None:
            return self.step(*shape)
        entry = self._graphs.get(shape)
        if entry is None:
            try:
                entry = self._capture(*shape)
            except Exception as exc:  # evidence for the log, then eager for good
                self.failed = failure_text(exc)
                # exc_info: the traceback names the kernel; a capture that fails inside often
                # fails again when it is ended, and the first error is the one that says why
                log.warning("CUDA graph capture failed for batch %d, keys %d, LoRA %s; decoding eagerly from now on: "
                            "%s", shape[0], shape[1], shape[2], self.failed, exc_info=True)
                torch.cuda.synchronize()
                return self.step(*shape)
            self._graphs[shape] = entry
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, rows: int, key_len: int, lora: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy inits and autotuning happen outside the capture
                self.step(rows, key_len, lora)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self.step(rows, key_len, lora)
        except BaseException:
            # when ending a failed capture raises, torch leaves its capture stream current
            torch.cuda.set_stream(stream)
            raise
        self.captures += 1
        log.info("captured the decode step for batch %d, keys %d%s", rows, key_len, "" if lora else ", base model only")
        return graph, out
