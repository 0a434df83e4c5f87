"""The model thread: admission into cache slots, chunked prefill, one sync per step.

It decides on plain data (which request gets which cache slot, which prompt tokens are
prefilled this turn, when a row ends) and the runtime computes: `engine.serving.runner.FastRuntime`
(every row at once), or `engine.reference.ReferenceRuntime` (one row at a time).

Each loop turn: drop cancelled rows; admit waiting requests into free cache slots (each
with its adapter and its sampling settings); prefill at most
`PREFILL_CHUNK_TOKENS` prompt tokens, taken from several waiting prompts at once; then one
decode step for every decoding row. A step's only device-to-host copy is the new token ids;
text is made from them by the stream writer thread, off the forward's critical path.

A long prompt is prefilled over several turns, each followed by a decode step, so running
streams never wait longer than one chunk. A row joining or leaving touches only its own slot.

With the prefix cache (`PREFIX_CACHE_TOKENS`), a row's prefill starts by copying the longest
cached start of its prompt into its slot; every finished block of a prompt, and at the end
the whole conversation so far, is offered to the cache. A row whose start another row of the
same adapter is computing right now waits for it (rows of a burst in one role share their
system prompt), then takes it from the cache; on CUDA only when the prompts waiting would
not fit in one chunk anyway (there a chunk costs about the same whatever its length).
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from engine.config import EngineSettings
from engine.errors import EngineBusy, EngineClosed, EngineError
from engine.metrics import EngineMetrics
from engine.requests import Request, StreamEnd
from engine.serving import threads as cpu_threads
from engine.serving.prefix_cache import BLOCK_TOKENS, chain
from engine.serving.writer import StreamWriter

log = logging.getLogger(__name__)


@dataclass(eq=False)
class SlotRow:
    req: Request
    key: str  # adapter key (peft name or BASE_ADAPTER)
    kv_slot: int
    prompt: list[int]
    done: int = 0  # prompt tokens prefilled so far
    pos: int = 0  # position of the token the next decode step feeds
    generated: int = 0
    decoding: bool = False
    finished: bool = False
    decoder: Any = None
    text: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # generated tokens (offered to the prefix cache at the end)
    started: bool = False  # prefill begun (a cached start, if any, restored)
    digests: list[int] = field(default_factory=list)  # the prompt's block chain (prefix cache)
    stored: int = 0  # prompt blocks offered to the prefix cache so far


class SlotScheduler(threading.Thread):
    """The model thread: the only thread that runs forward passes. Other threads talk to it
    through `submit` and `run_exclusive`; it drives a runtime (`engine.serving.runner.FastRuntime`,
    or `engine.reference.ReferenceRuntime` with room for one row) by cache slot and token ids."""

    def __init__(self, runtime: Any, tokenizer: Any, settings: EngineSettings, metrics: EngineMetrics,
                 eos_ids: set[int], registry: Any) -> None:
        super().__init__(name="model", daemon=True)
        self.rt = runtime
        self.settings, self.metrics, self.eos_ids = settings, metrics, eos_ids
        self.registry = registry  # engine.adapters.AdapterRegistry: leases of adapter versions
        self.chunk_tokens = settings.resolved_prefill_chunk(str(runtime.device))
        self.writer = StreamWriter(tokenizer, metrics)
        self.rows: list[SlotRow] = []
        self.steps = 0
        self.tokens_generated = 0
        self._out: list[tuple[SlotRow, int | None, str | None, Exception | None]] = []
        self._waiting: collections.deque[Request] = collections.deque()
        self._commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False

    # ---- other threads -------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        with self._wake:
            if self._stopping:
                raise EngineClosed("the engine is shutting down")
            if len(self._waiting) >= self.settings.max_queue:
                raise EngineBusy(f"{len(self._waiting)} requests are waiting (MAX_QUEUE={self.settings.max_queue})")
            self._waiting.append(req)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()

    def run_exclusive(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` on the model thread between two steps (model mutations that need it)."""
        fut: Future = Future()
        with self._wake:
            if not self.is_alive():
                try:
                    fut.set_result(fn())
                except Exception as exc:
                    fut.set_exception(exc)
                return fut
            self._commands.append((fn, fut))
            self._wake.notify()
        return fut

    def queue_depth(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self.writer.start()
        super().start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self.is_alive():
            self.join(timeout)

    # ---- the model thread ----------------------------------------------------------------
    def run(self) -> None:
        if self.rt.device.type == "cpu":  # the forward's OpenMP team is this thread's (engine.serving.threads)
            cpu_threads.claim(self.settings.resolved_cpu_threads())
        while True:
            self._run_commands()
            with self._wake:
                if self._stopping:
                    break
                if not self.rows and not self._waiting and not self._commands:
                    self._wake.wait(timeout=0.05)
                    continue
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    self._admit()
                    if self.rows:
                        self._step()
                    else:
                        with self._wake:  # requests wait for an adapter load: don't spin on it
                            if not self._commands and not self._stopping:
                                self._wake.wait(timeout=0.01)
            except Exception as exc:  # a failed step must not kill the thread serving everyone
                log.exception("decode step failed; failing the %d active requests", len(self.rows))
                for row in list(self.rows):
                    self._finish(row, "error", EngineError(f"generation failed: {exc}"))
        self._shutdown()

    def _run_commands(self) -> None:
        while self._commands:
            fn, fut = self._commands.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as exc:
                    fut.set_exception(exc)

    def _shutdown(self) -> None:
        for row in list(self.rows):
            self._finish(row, "cancelled")
        while self._waiting:
            req = self._waiting.popleft()
            req.result.finish_reason = "cancelled"
            req.emit(EngineClosed("the engine is shutting down"))
        self._run_commands()
        self._flush()
        self.writer.close()

    def _flush(self) -> None:
        out, self._out = self._out, []
        self.writer.put(out)

    # ---- finishing ----------------------------------------------------------------------
    def _release(self, row: SlotRow, keep: bool = False) -> None:
        if row.finished:
            return
        row.finished = True
        if keep:
            self._offer_conversation(row)
        if row in self.rows:
            self.rows.remove(row)
        self.rt.remove_row(row.kv_slot)
        self.registry.release(row.key)

    def _finish(self, row: SlotRow, reason: str, error: Exception | None = None) -> None:
        self._release(row, keep=error is None)
        label = row.req.domain or "base"
        self.metrics.requests.labels(label, reason).inc()
        self.metrics.tokens.labels(label).inc(row.generated)
        self.metrics.active.set(len(self.rows))
        self._out.append((row, None, reason, error))
        if error is not None or reason == "cancelled":
            self._flush()

    def _drop_cancelled(self) -> None:
        for row in [r for r in self.rows if r.req.cancelled.is_set()]:
            self._finish(row, "cancelled")

    # ---- admission and prefill ------------------------------------------------------------
    def _admit(self) -> None:
        for req in list(self._waiting):
            if len(self.rows) >= min(self.rt.slots, self.settings.max_batch_size):
                break
            key = self._claim(req)
            if key is not None:
                self._place(req, key)
        self._prefill_turn()
        self._flush()

    def _claim(self, req: Request) -> str | None:
        """Take a waiting request off the queue with its adapter; returns the adapter key.

        None when it was cancelled or refused (it has been answered) or when its adapter is
        still loading (it keeps its place; others go ahead).
        """
        if req.cancelled.is_set():
            self._remove_waiting(req)
            req.result.finish_reason = "cancelled"
            req.emit(StreamEnd())
            return None
        try:
            got = self.registry.acquire(req.domain, req.version)
        except EngineError as exc:
            self._remove_waiting(req)
            req.result.finish_reason = "error"
            self.metrics.requests.labels(req.domain or "base", "error").inc()
            req.emit(exc)
            return None
        if got is None:
            return None
        self._remove_waiting(req)
        key, version = got
        req.result.adapter_version = version
        if req.stamp is not None:  # now the version that answers is known
            req.result.stamp = dataclasses.replace(req.stamp, adapter_version=version)
        return key

    def _remove_waiting(self, req: Request) -> None:
        with self._wake:
            try:
                self._waiting.remove(req)
            except ValueError:
                pass
            self.metrics.queue_depth.set(len(self._waiting))

    def _place(self, req: Request, key: str) -> None:
        sampling = req.sampling
        if sampling.seed is None:  # an unseeded request still draws from a seed of its own
            sampling = dataclasses.replace(sampling, seed=random.getrandbits(62))
        slot = self.rt.add_row(key, sampling, req.prompt_ids)
        now = time.monotonic()
        req.result.queue_wait_s = now - req.submitted
        self.metrics.queue_wait.observe(req.result.queue_wait_s)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        prompt = list(req.prompt_ids)
        digests = chain(key, prompt) if self.rt.prefix is not None else []  # its block chain, hashed once
        self.rows.append(SlotRow(req, key, slot, prompt, digests=digests))
        self.metrics.active.set(len(self.rows))

    def _prefill_turn(self) -> None:
        """Prefill up to `chunk_tokens` prompt tokens of the rows still prefilling."""
        prefilling = [r for r in self.rows if not r.decoding]
        if not prefilling:
            return
        budget = self.chunk_tokens
        chunks, rows = [], []
        pending = self._pending_blocks(prefilling)
        # On a GPU a prefill turn costs about the same launches whatever its length: a row waits
        # for a shared start only when the work left would not fit in this turn anyway. On a
        # CPU every token costs: it always waits.
        hold = self.rt.device.type != "cuda" or sum(len(r.prompt) - r.done for r in prefilling) > budget
        for row in prefilling:
            if budget <= 0:
                break
            if not row.started:
                if hold and self._waits_for_shared_start(row, pending):
                    continue
                self._start(row)
                pending.update(row.digests[row.done // BLOCK_TOKENS:])
            take = min(len(row.prompt) - row.done, budget)
            chunks.append((row.kv_slot, row.prompt[row.done:row.done + take], row.done))
            rows.append(row)
            budget -= take
        if not chunks:
            return
        first = self.rt.prefill_step(chunks)
        for row, (_slot, ids, _start) in zip(rows, chunks):
            row.done += len(ids)
            self._offer_prompt(row)
        for row in rows:
            if row.kv_slot in first:
                row.decoding, row.pos = True, len(row.prompt)
                self._accept(row, first[row.kv_slot])

    # ---- the prefix cache ---------------------------------------------------------------
    def _pending_blocks(self, prefilling: list[SlotRow]) -> set[int]:
        """The blocks that rows prefilling now will have computed when their prompts are done."""
        out: set[int] = set()
        for row in prefilling:
            if row.started:
                out.update(row.digests[row.done // BLOCK_TOKENS:])
        return out

    def _waits_for_shared_start(self, row: SlotRow, pending: set[int]) -> bool:
        """True while another row computes the next block of this row's prompt start (so this
        one takes it from the cache in a turn or two instead of computing it again)."""
        prefix = self.rt.prefix
        if prefix is None:
            return False
        usable = (len(row.prompt) - 1) // BLOCK_TOKENS
        cached = prefix.cached_blocks(row.key, row.digests[:usable])
        return cached < usable and row.digests[cached] in pending

    def _start(self, row: SlotRow) -> None:
        row.started = True
        prefix = self.rt.prefix
        if prefix is None:
            return
        hit = prefix.lookup(row.key, row.prompt, row.digests, len(row.prompt) - 1)
        if hit.tokens:
            prefix.restore(hit, row.kv_slot)
            row.done = hit.tokens
            row.req.result.cached_prompt_tokens = hit.tokens
            self.metrics.cached_prompt_tokens.inc(hit.tokens)

    def _offer_prompt(self, row: SlotRow) -> None:
        """Hand the prompt's newly finished blocks to the cache (rows waiting for them go next)."""
        prefix = self.rt.prefix
        if prefix is not None and row.done // BLOCK_TOKENS > row.stored:
            prefix.store(row.key, row.prompt, row.digests, row.kv_slot, row.done)
            row.stored = row.done // BLOCK_TOKENS

    def _offer_conversation(self, row: SlotRow) -> None:
        """At the end of a row: its prompt and answer so far, for the conversation's next message."""
        prefix = self.rt.prefix
        if prefix is None or not row.started:
            return
        valid = row.pos if row.decoding else row.done  # positions whose keys and values are in the slot
        tokens = (row.prompt + row.ids)[:valid]
        if valid // BLOCK_TOKENS > row.stored:
            try:
                prefix.store(row.key, tokens, chain(row.key, tokens), row.kv_slot, valid)
            except Exception:  # a cache is an optimisation: never fail a finished answer for it
                log.exception("storing a finished row in the prefix cache failed")

    # ---- decoding ---------------------------------------------------------------------
    def _step(self) -> None:
        decoding = [r for r in self.rows if r.decoding]
        if not decoding:
            return
        started = time.monotonic()
        ids = self.rt.decode_step([r.kv_slot for r in decoding], max(r.pos for r in decoding) + 1)
        self.steps += 1
        for row, tok in zip(decoding, ids):
            row.pos += 1
            self._accept(row, tok)
        self.metrics.batch_size.set(len(decoding))
        self.metrics.step_seconds.observe(time.monotonic() - started)
        self._flush()

    def _accept(self, row: SlotRow, tok: int) -> None:
        s = row.req.sampling
        if tok in self.eos_ids and not s.ignore_eos:
            self._finish(row, "stop")
            return
        row.generated += 1
        self.tokens_generated += 1
        row.ids.append(tok)
        self._out.append((row, tok, None, None))
        if row.req.cancelled.is_set():
            self._finish(row, "cancelled")
        elif row.generated >= s.max_new_tokens:
            self._finish(row, "length")
