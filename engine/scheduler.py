"""The one thread that runs the model: admission, batched decoding, streaming, cancel.

Continuous batching: every step decodes one token for every active row, whatever adapter
each row uses (peft's mixed-batch LoRA, routed by `LoraRuntime.row_adapters`). A new request
is prefilled alone and its KV cache merged into the batch (left-padded), so it joins between
two steps instead of waiting for a long answer to finish; a finished or cancelled row is
dropped at once. Other threads talk to this one only through `submit` and `run_exclusive`.
"""
from __future__ import annotations

import collections
import functools
import inspect
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from engine import cpu_threads
from engine.config import EngineSettings
from engine.errors import EngineBusy, EngineClosed, EngineError
from engine.metrics import EngineMetrics
from engine.requests import Request, StreamEnd
from engine.sampling import IncrementalDecoder, next_token

log = logging.getLogger(__name__)


def cache_kwarg(model: Any) -> str:
    """The forward keyword of the KV cache: `cache` since transformers renamed it, where
    `past_key_values` is deprecated (removed in 5.40, which `transformers<6` allows);
    `past_key_values` in the releases before the rename."""
    inner = getattr(model, "get_base_model", None)  # peft's wrapper passes **kwargs through
    return _cache_kwarg_of(type(inner() if inner is not None else model))


@functools.cache
def _cache_kwarg_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The cache a forward returned, under either name (see `cache_kwarg`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


#: Prompt tokens prefilled per loop turn before the running rows get their next step.
PREFILL_BUDGET = 768


@dataclass(eq=False)
class Row:
    req: Request
    key: str  # peft adapter name or BASE_ADAPTER
    pos: int  # position id of the next token fed
    next_token: int
    decoder: IncrementalDecoder
    seen: list[int]
    generator: torch.Generator | None
    generated: int = 0
    text: list[str] = field(default_factory=list)


class Scheduler(threading.Thread):
    def __init__(
        self,
        runtime: Any,  # engine.adapters.LoraRuntime
        tokenizer: Any,
        settings: EngineSettings,
        metrics: EngineMetrics,
        eos_ids: set[int],
    ) -> None:
        super().__init__(name="model", daemon=True)
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.settings = settings
        self.metrics = metrics
        self.eos_ids = eos_ids
        self.registry: Any = None  # engine.adapters.AdapterRegistry, set before start()
        self.device = next(runtime.base_model.parameters()).device
        self._waiting: collections.deque[Request] = collections.deque()
        self._commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self.rows: list[Row] = []
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._batch_rows: list[Row] = []  # rows in the order of the cache's batch dimension
        self.tokens_generated = 0
        self.max_gap_s = 0.0  # longest pause between two steps while rows were active

    # ---- other threads -------------------------------------------------------------
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

    def stop(self, timeout: float = 30.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self.is_alive():
            self.join(timeout)

    # ---- the model thread ----------------------------------------------------------
    def run(self) -> None:
        if self.device.type == "cpu":  # the forward's OpenMP team is this thread's (engine.cpu_threads)
            cpu_threads.claim(self.settings.resolved_cpu_threads())
        last_step = None
        while True:
            self._run_commands()
            with self._wake:
                if self._stopping:
                    break
                if not self.rows and not self._admissible():
                    self._wake.wait(timeout=0.05)
                    last_step = None
                    continue
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    self._admit()
                    if self.rows:
                        now = time.monotonic()
                        if last_step is not None:
                            self.max_gap_s = max(self.max_gap_s, now - last_step)
                        self._step()
                        last_step = time.monotonic()
                    else:
                        last_step = None
                        with self._wake:  # requests wait for an adapter load: don't spin on it
                            if not self._commands and not self._stopping:
                                self._wake.wait(timeout=0.01)
            except Exception as exc:  # a failed step must not kill the thread serving everyone
                log.exception("decode step failed; failing the %d active requests", len(self.rows))
                for row in list(self.rows):
                    self._finish(row, "error", EngineError(f"generation failed: {exc}"))
                self._reset_batch()
        self._shutdown()

    def _reset_batch(self) -> None:
        self.rows, self._cache, self._mask, self._batch_rows = [], None, None, []

    def _admissible(self) -> bool:
        return bool(self._waiting) or bool(self._commands)

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
        self.rows, self._cache, self._mask = [], None, None
        while self._waiting:
            req = self._waiting.popleft()
            req.result.finish_reason = "cancelled"
            req.emit(EngineClosed("the engine is shutting down"))
        self._run_commands()

    def _drop_cancelled(self) -> None:
        done = [r for r in self.rows if r.req.cancelled.is_set()]
        for row in done:
            self._finish(row, "cancelled")
        if done:
            self._compact()

    def _admit(self) -> None:
        budget = PREFILL_BUDGET
        admitted = 0
        for req in list(self._waiting):
            if len(self.rows) >= self.settings.max_batch_size or (admitted and budget <= 0):
                break
            key = self._claim(req)
            if key is None:
                continue
            admitted += 1
            budget -= len(req.prompt_ids)
            self._prefill(req, key)

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
            got = self.registry.acquire(req.domain)
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
        return key

    def _remove_waiting(self, req: Request) -> None:
        with self._wake:
            try:
                self._waiting.remove(req)
            except ValueError:
                pass
            self.metrics.queue_depth.set(len(self._waiting))

    def _prefill(self, req: Request, key: str) -> None:
        from transformers import DynamicCache

        now = time.monotonic()
        req.result.queue_wait_s = now - req.submitted
        self.metrics.queue_wait.observe(req.result.queue_wait_s)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        ids = torch.tensor([req.prompt_ids], device=self.device)
        self.runtime.row_adapters = [key]
        model = self.runtime.forward_model
        out = model(input_ids=ids, **{cache_kwarg(model): DynamicCache()}, use_cache=True, logits_to_keep=1)
        gen = None
        if req.sampling.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(req.sampling.seed)
        row = Row(req, key, len(req.prompt_ids), -1, IncrementalDecoder(self.tokenizer), list(req.prompt_ids), gen)
        if self._accept(row, out.logits[0, -1]):
            return
        self._merge(returned_cache(out), len(req.prompt_ids))
        self.rows.append(row)
        self.metrics.active.set(len(self.rows))

    def _merge(self, cache: Any, length: int) -> None:
        """Add a prefilled row's cache to the batch, left-padding the shorter side."""
        ones = torch.ones((1, length), dtype=torch.long, device=self.device)
        if self._cache is None:
            self._cache, self._mask = cache, ones
            return
        total = self._mask.shape[1]
        pad_new, pad_old = max(0, total - length), max(0, length - total)
        for old, new in zip(self._cache.layers, cache.layers):
            ok, ov, nk, nv = old.keys, old.values, new.keys, new.values
            if pad_old:
                ok, ov = F.pad(ok, (0, 0, pad_old, 0)), F.pad(ov, (0, 0, pad_old, 0))
            if pad_new:
                nk, nv = F.pad(nk, (0, 0, pad_new, 0)), F.pad(nv, (0, 0, pad_new, 0))
            old.keys, old.values = torch.cat([ok, nk]), torch.cat([ov, nv])
        self._mask = torch.cat([F.pad(self._mask, (pad_old, 0)), F.pad(ones, (pad_new, 0))])

    def _compact(self) -> None:
        """Drop finished rows from the cache and the padding no remaining row needs."""
        keep = [i for i, r in enumerate(self._batch_rows) if r in self.rows]
        if not self.rows:
            self._cache, self._mask, self._batch_rows = None, None, []
            return
        if len(keep) != len(self._batch_rows):
            idx = torch.tensor(keep, device=self.device)
            mask = self._mask.index_select(0, idx)
            start = int((mask.sum(0) > 0).nonzero()[0])
            self._mask = mask[:, start:]
            for layer in self._cache.layers:
                layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
                layer.values = layer.values.index_select(0, idx)[:, :, start:]
        self._batch_rows = list(self.rows)

    def _step(self) -> None:
        # rows admitted since the last compaction are at the end of both lists
        self._batch_rows = self._batch_rows + [r for r in self.rows if r not in self._batch_rows]
        rows = self._batch_rows
        started = time.monotonic()
        mask = torch.cat([self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=self.device)], dim=1)
        self.runtime.row_adapters = [r.key for r in rows]
        model = self.runtime.forward_model
        out = model(
            input_ids=torch.tensor([[r.next_token] for r in rows], device=self.device),
            position_ids=torch.tensor([[r.pos] for r in rows], device=self.device),
            attention_mask=mask,
            use_cache=True,
            **{cache_kwarg(model): self._cache},
        )
        self._mask = mask
        logits = out.logits[:, -1]
        finished = False
        for i, row in enumerate(rows):
            row.pos += 1
            finished |= self._accept(row, logits[i])
        self.metrics.batch_size.set(len(rows))
        self.metrics.step_seconds.observe(time.monotonic() - started)
        if finished:
            self._compact()

    def _accept(self, row: Row, logits: torch.Tensor) -> bool:
        """Sample, stream and book one token of a row; True when the row is finished."""
        s = row.req.sampling
        seen = torch.tensor(row.seen, device=logits.device) if s.repetition_penalty != 1.0 else None
        tok = next_token(
            logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
            repetition_penalty=s.repetition_penalty, seen=seen, generator=row.generator,
        )
        if tok in self.eos_ids and not s.ignore_eos:
            self._finish(row, "stop")
            return True
        row.generated += 1
        self.tokens_generated += 1
        row.seen.append(tok)
        row.next_token = tok
        piece = row.decoder.push(tok)
        if piece:
            if row.req.result.time_to_first_token_s is None:
                row.req.result.time_to_first_token_s = time.monotonic() - row.req.submitted
                self.metrics.ttft.observe(row.req.result.time_to_first_token_s)
            row.text.append(piece)
            row.req.emit(piece)
        if row.req.cancelled.is_set():
            self._finish(row, "cancelled")
            return True
        if row.generated >= s.max_new_tokens:
            self._finish(row, "length")
            return True
        return False

    def _finish(self, row: Row, reason: str, error: Exception | None = None) -> None:
        res = row.req.result
        res.text = "".join(row.text)
        res.completion_tokens = row.generated
        res.finish_reason = reason  # type: ignore[assignment]
        res.duration_s = time.monotonic() - row.req.submitted
        if row in self.rows:
            self.rows.remove(row)
        self.registry.release(row.key)
        label = row.req.domain or "base"
        self.metrics.requests.labels(label, reason).inc()
        self.metrics.tokens.labels(label).inc(row.generated)
        decode_s = res.duration_s - res.queue_wait_s
        if row.generated > 1 and decode_s > 0:
            self.metrics.tokens_per_second.observe(row.generated / decode_s)
        self.metrics.active.set(len(self.rows))
        row.req.emit(error if error is not None else StreamEnd())
