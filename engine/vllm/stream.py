"""One answer from a vLLM replica, as the engine face's text stream.

The prompt is built by the same code, with the same settings, as the local engine's (role
template under its limits, HISTORY_TOKENS, history trimmed to CONTEXT_TOKENS, the tokenizer's
chat template: engine.prompts.PromptMaker) and sent as token ids, so both backends see the
same prompt. The request goes to the least busy ready replica; a replica that fails, times out
or is not ready before the first piece arrives is taken out and the request is retried on
another. A replica that fails in the middle of an answer is taken out too, and another one
continues the answer: it gets the prompt plus the token ids streamed so far (vLLM sends them
with each piece, `return_token_ids`) and the rest of the token budget, so the user's answer
goes on where it stopped (the answer's audit stamp then names the replica that finished it;
`replicas_used` lists them all). A refusal of the request itself (a 4xx, before or inside the stream)
ends it with an error naming what vLLM refused, and takes no replica out. Leaving early closes
the HTTP response, and vLLM aborts the request.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence

from engine.errors import EngineBusy, EngineClosed, EngineError, InputTooLong
from engine.audit import audit_stamp, effective_sampling
from engine.stream import StreamProtocols
from engine.types import (
    EffectiveSampling, FinishReason, GenerationParams, GenerationResult, Message, Mode, UserContext,
)
from engine.vllm.client import (
    CompletionStream, ModelMissing, PromptTooLong, ReplicaRejected, ReplicaUnavailable, StreamFailed,
)

if TYPE_CHECKING:
    from engine.config import EngineSettings
    from engine.prompts import BuiltPrompt
    from engine.vllm.config import VllmSettings
    from engine.vllm.fleet import Fleet, Replica
    from engine.vllm.lora import LoraVersion


class StreamHost(Protocol):
    """What a stream needs of the engine that opened it (engine.vllm.engine.VllmEngine)."""

    settings: "EngineSettings"
    vllm: "VllmSettings"
    fleet: "Fleet | None"
    started: bool
    closed: bool
    model_id: Any  # str, or engine.model.fingerprint.ModelIdentity
    base_fingerprint: str | None
    served_model: str
    stop_token_ids: list[int]

    async def build_prompt(self, role: str, user: UserContext | None, messages: Sequence[Message],
                           max_new: int) -> "BuiltPrompt": ...

    async def lease(self, domain: str, version: str | None) -> "LoraVersion": ...

    def register_stream(self, stream: "VllmStream") -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def stream_ended(self, stream: "VllmStream", answered: bool) -> None:
        """`stream` is done: count its answer if a replica `answered`, free its lease, forget it."""

log = logging.getLogger(__name__)

_FINISH: dict[str, FinishReason] = {"stop": "stop", "length": "length"}


def completion_body(engine: StreamHost, model: str, prompt_ids: list[int], params: GenerationParams,
                    sampling: EffectiveSampling) -> dict[str, Any]:
    """The /v1/completions request: the engine's sampling settings mapped one to one.

    `ignore_eos` (benchmarks: a fixed amount of work) also drops our stop ids, since vLLM stops
    on `stop_token_ids` whatever `ignore_eos` says, as the local engine's ignore_eos ignores
    every end-of-sequence id.
    """
    p, e = params, sampling
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": e.max_new_tokens,
        "temperature": e.temperature,  # 0 = greedy in both
        "top_p": e.top_p,
        "top_k": e.top_k if e.top_k > 0 else -1,  # ours: 0 disables; vLLM: -1 (every release accepts it)
        "repetition_penalty": e.repetition_penalty,
        "stop_token_ids": [] if p.ignore_eos else engine.stop_token_ids,
        "skip_special_tokens": True,
        "return_token_ids": True,  # what another replica continues from, should this one fail mid-answer
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if p.ignore_eos:
        body["ignore_eos"] = True
    if e.seed is not None:
        body["seed"] = e.seed
    return body


class VllmStream(StreamProtocols):
    """See the module docstring; the face's TextStream."""

    def __init__(self, engine: StreamHost, messages: Sequence[Message], mode: Mode, params: GenerationParams,
                 user: UserContext | None) -> None:
        self._engine, self._messages, self._mode, self._params, self._user = engine, messages, mode, params, user
        self.result = GenerationResult(adapter=mode.adapter, role=mode.role)
        self._started = False
        self._done = False
        self._pieces: deque[str] = deque()
        self._events: CompletionStream | None = None
        self._replica: "Replica | None" = None
        self.lease: "LoraVersion | None" = None  # the adapter version it holds, given back at its end
        self._finish: FinishReason | None = None
        self._usage: dict[str, Any] | None = None  # the first replica's usage (prompt, prefix cache)
        self._last_usage: dict[str, Any] | None = None
        self._body: dict[str, Any] = {}
        self._key: str | None = None
        self._prompt_ids: list[int] = []
        self._ids: list[int] | None = []  # token ids streamed so far; None once a piece came without them
        self._t0 = time.monotonic()
        self.replica_url: str | None = None  # who answered (tests and logs)
        self.replicas_used: list[str] = []  # more than one when another replica continued the answer

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        try:
            if not self._started:
                self._started = True
                await self._open()
            while not self._pieces:
                if self._events is None or self._events.closed:
                    self._end(self._finish or "stop")
                    raise StopAsyncIteration
                try:
                    event = await self._events.next_event(self._engine.vllm.vllm_stall_timeout_s)
                except ReplicaUnavailable as exc:
                    await self._continue_elsewhere(exc)
                    continue
                if event is None:
                    self._end(self._finish or "stop")
                    raise StopAsyncIteration
                self._absorb(event)
            piece = self._pieces.popleft()
            self.result.text += piece
            return piece
        except StopAsyncIteration:
            raise
        except asyncio.CancelledError:
            self.cancel()
            raise
        except ReplicaRejected as exc:  # inside the stream, after the first piece
            self._end("error")
            raise EngineError(f"the vLLM replica refused the request: {exc.detail}") from exc
        except BaseException:
            self._end("error")
            raise

    # ---- opening: prompt, replica, failover ---------------------------------------------------
    async def _open(self) -> None:
        engine = self._engine
        if engine.closed or not engine.started:
            raise EngineClosed("the engine is shutting down" if engine.closed else "the engine is not running")
        engine.register_stream(self)
        s, mode, p = engine.settings, self._mode, self._params
        sampling = effective_sampling(s, p)
        max_new = sampling.max_new_tokens
        if p.adapter_version is not None and mode.adapter is None:
            raise EngineError(f"adapter_version={p.adapter_version!r} needs an adapter in the mode")
        if mode.adapter is not None:
            self.lease = await engine.lease(mode.adapter, p.adapter_version)
            self.result.adapter_version = self.lease.version
        built = await engine.build_prompt(mode.role, self._user, self._messages, max_new)
        ids = built.ids
        self.result.prompt_tokens, self.result.trimmed_turns = len(ids), built.trimmed_turns
        self.result.stamp = audit_stamp(
            base_model=str(engine.model_id), base_fingerprint=engine.base_fingerprint, quantization=None,
            adapter=mode.adapter, adapter_version=self.result.adapter_version, system=built.system,
            sampling=sampling, backend="vllm",
        )  # the replica is named once one takes the request (and renamed if another continues it)
        model = self.lease.key if self.lease is not None else engine.served_model
        self._prompt_ids, self._key = ids, (model if self.lease is not None else None)
        self._body = completion_body(engine, model, ids, p, sampling)
        await self._send(self._body, self._key)

    async def _continue_elsewhere(self, exc: ReplicaUnavailable) -> None:
        """The replica failed mid-answer: take it out, and have another continue the answer
        from the token ids streamed so far with what is left of the budget."""
        r, fleet = self._replica, self._engine.fleet
        if r is not None and not isinstance(exc, StreamFailed):  # an error chunk: it still answers
            fleet.take_out(r, str(exc))
        failed = {r.url} if r is not None else set()
        self._drop_replica("failover")
        if self._finish is not None:  # the answer was complete; only the end of the stream was lost
            return
        if self._ids is None:
            raise EngineError(f"the answer broke off: {exc} (the replica sent no token ids to continue from)") from exc
        left = self._body["max_tokens"] - len(self._ids)
        if left <= 0:
            self._finish = "length"
            return
        log.warning("replica %s failed mid-answer after %d tokens (%s); another replica continues it",
                    r.url if r else "?", len(self._ids), exc)
        body = dict(self._body, prompt=self._prompt_ids + self._ids, max_tokens=left)
        try:
            await self._send(body, self._key, failed)
        except EngineBusy as busy:
            raise EngineError(f"the answer broke off: {exc}; no other replica could continue it ({busy})") from exc

    async def _send(self, body: dict[str, Any], key: str | None, exclude: Iterable[str] = ()) -> None:
        """Send to replicas in turn (none in `exclude`) until one streams its first event."""
        fleet, timeout = self._engine.fleet, self._engine.vllm.vllm_first_token_timeout_s
        tried: set[str] = set(exclude)
        recovered: set[str] = set()
        last: Exception | None = None
        while True:
            self._check_open()
            r = fleet.pick(key, tried)
            if r is None:
                why = fleet.why_none(key)
                log.warning("no replica for a request on %s: %s", key or "the base model", why)
                raise EngineBusy(f"no vLLM replica can take the request now ({why})"
                                 + (f"; last error: {last}" if last else "")) from last
            tried.add(r.url)
            fleet.acquire(r)
            self._replica, self.replica_url = r, r.url
            self.replicas_used.append(r.url)
            started = time.monotonic()
            try:
                self._events = await r.client.complete(body, timeout)
                while True:  # the first event with a choice (or the end) commits the request here
                    self._check_open()
                    left = max(0.001, timeout - (time.monotonic() - started))
                    event = await self._events.next_event(left)
                    if event is None:
                        self._events.close()
                        break
                    self._absorb(event)
                    if self._pieces or self._finish is not None:
                        break
                if self.result.stamp is not None:
                    self.result.stamp = replace(self.result.stamp, replica=r.url)
                return
            except ModelMissing as exc:
                self._drop_replica("failover")
                last = exc
                if r.url not in recovered:  # it restarted: give it the adapters again, then retry it
                    recovered.add(r.url)
                    tried.discard(r.url)
                    log.warning("replica %s does not know %s (restarted?); registering again", r.url, key)
                    await fleet.recover(r)
                else:
                    fleet.take_out(r, str(exc))
            except ReplicaUnavailable as exc:
                self._drop_replica("failover")
                fleet.take_out(r, str(exc))
                log.warning("replica %s failed before the first token; trying another: %s", r.url, exc)
                last = exc
            except ReplicaRejected as exc:  # the request's fault (before or inside the stream): no failover
                self._drop_replica("error")
                if exc.status in (401, 403):
                    fleet.take_out(r, f"the API key (VLLM_API_KEY) was refused: {exc.detail}")
                    last = exc
                    continue
                if isinstance(exc, PromptTooLong):
                    raise InputTooLong(f"the replica refused the prompt: {exc.detail}") from exc
                raise EngineError(f"the vLLM replica refused the request: {exc.detail}") from exc
            except BaseException:
                self._drop_replica("cancelled")
                raise

    def _check_open(self) -> None:
        """Cancelled from elsewhere (the engine closing) while waiting: stop sending."""
        if self._done:
            raise EngineClosed("the request was cancelled")

    def _drop_replica(self, outcome: str) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._replica is not None:
            self._engine.fleet.release(self._replica, outcome)
            self._replica = None

    # ---- events -------------------------------------------------------------------------------
    def _absorb(self, event: dict[str, Any]) -> None:
        usage = event.get("usage")
        if isinstance(usage, dict):
            self._usage = self._usage or usage
            self._last_usage = usage
        for choice in event.get("choices") or ():
            text = choice.get("text") or ""
            ids = choice.get("token_ids")
            if self._ids is not None:
                if isinstance(ids, list):
                    self._ids.extend(ids)
                elif text:
                    self._ids = None
            if text:
                if self.result.time_to_first_token_s is None:
                    self.result.time_to_first_token_s = time.monotonic() - self._t0
                    self._engine.first_token(self.result.time_to_first_token_s)
                self._pieces.append(text)
                self.result.completion_tokens += 1  # replaced by the usage count at the end
            reason = choice.get("finish_reason")
            if reason:
                self._finish = _FINISH.get(reason, "error")
                if self._finish == "error":
                    log.warning("replica %s ended a request with finish_reason=%r", self.replica_url, reason)

    # ---- ending -------------------------------------------------------------------------------
    def _end(self, reason: FinishReason) -> None:
        if self._done:
            return
        self._done = True
        res = self.result
        if res.finish_reason is None:
            res.finish_reason = reason
        res.duration_s = time.monotonic() - self._t0
        if self._ids:  # exact, however many replicas wrote the answer
            res.completion_tokens = len(self._ids)
        elif self._last_usage:
            res.completion_tokens = int(self._last_usage.get("completion_tokens") or res.completion_tokens)
        if self._usage:
            res.prompt_tokens = int(self._usage.get("prompt_tokens") or res.prompt_tokens)
            details = self._usage.get("prompt_tokens_details") or {}  # vLLM's prefix caching, when it reports it
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                res.cached_prompt_tokens = details["cached_tokens"]
        outcome = {"stop": "ok", "length": "ok"}.get(res.finish_reason or "", res.finish_reason or "error")
        self._drop_replica(outcome)
        self._engine.stream_ended(self, answered=self._started)

    def cancel(self) -> None:
        """Stop now: close the HTTP response (vLLM aborts the request), free the lease."""
        self._end("cancelled")

    async def aclose(self) -> None:
        self.cancel()
