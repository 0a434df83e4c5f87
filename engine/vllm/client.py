"""HTTP to one vLLM replica: its OpenAI-compatible server, as vLLM really answers.

The endpoints used, with the shapes vLLM gives them (vllm/entrypoints/openai and
vllm/entrypoints/serve/lora in vllm-project/vllm):

- `GET /v1/models` -> `{"object": "list", "data": [ModelCard...]}`; the first card is the
  base model (`id` = --served-model-name, `root` = its path, `max_model_len`), then one card
  per registered LoRA (`id` = lora_name, `root` = lora_path, `parent` = the base model).
- `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` -> 200 with a plain-text "Success: ...";
  400 when the name is already loaded; 404 when nothing is at the path; 500 with the engine's
  message otherwise ("LoRA rank 32 is greater than max_lora_rank 16.", "LoRA is not enabled.").
  Without VLLM_ALLOW_RUNTIME_LORA_UPDATING the route does not exist: FastAPI's 404
  `{"detail": "Not Found"}`.
- `POST /v1/unload_lora_adapter {"lora_name"}` -> 200 "Success: ..." or 404 NotFoundError.
- `POST /v1/completions` with `prompt` as token ids and `stream: true` -> Server-Sent Events:
  `data: {CompletionStreamResponse}` per piece (`choices[0].text`, `finish_reason` on the
  last), with `stream_options.include_usage` a final chunk with `choices: []` and `usage`,
  then `data: [DONE]`. An error after the headers comes as `data: {"error": {...}}`.
  An adapter the replica does not know: 404 "The model `x` does not exist." (param "model").

Errors are `{"error": {"message", "type", "param", "code"}}` (older releases: the same fields
at the top level with `"object": "error"`); a wrong API key is 401 `{"error": "Unauthorized"}`,
checked before anything else under /v1 (a route that does not exist included). vLLM validates
part of a request only once the stream has begun (the prompt's and the stop tokens' ids against
the vocabulary, in some releases the sampling ranges): those refusals arrive as an error chunk
with a 4xx `code` after HTTP 200, and are the request's fault like a 400 before the stream.
Closing a streaming response closes the connection, and vLLM aborts the request.

vLLM (uvicorn) closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); a request
written on it just as it closes fails with a disconnect before any answer. So pooled
connections are dropped here after KEEPALIVE_S, and a request that meets such a disconnect is
sent once more on a new connection instead of failing the replica.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp

from engine.errors import EngineError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds an idle pooled connection is reused: well below vLLM's 5 s keep-alive, so the server
#: never closes one under a request the client is writing.
KEEPALIVE_S = 2.0

#: vLLM's words when an adapter itself cannot be loaded (vllm/lora/peft_helper.py,
#: lora_model.py, utils.py), whatever the replica: a refusal of that version. Any other 500 from
#: /v1/load_lora_adapter is the engine's trouble (vLLM maps every engine error to 500) and is
#: retried.
ADAPTER_REFUSALS = (
    "greater than max_lora_rank", "Missing required configuration fields", "must be a positive integer",
    "vLLM does not support", "Unsupported modules_to_save", "expected target modules", "doesn't contain tensors",
    "Error while deserializing", "unsupported LoRA weight", "must be consistent with", "is missing weight",
    "full classification module",
)
#: vLLM's words when the replica was started without --enable-lora: the replica's fault.
LORA_DISABLED = "LoRA is not enabled"
#: Attempts at loading an adapter when vLLM answers an engine error (500 of unknown cause).
LOAD_ATTEMPTS = 3
LOAD_BACKOFF_S = 0.5


def open_session() -> aiohttp.ClientSession:
    """The session every replica client shares (no connection limit; see KEEPALIVE_S)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S))


def _stale_connection(exc: BaseException) -> bool:
    """The server closed the connection the request went out on (not: nobody listens)."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)


def prompt_too_long(message: str, param: str | None) -> bool:
    """vLLM's refusal of a prompt longer than its context, in the wordings its releases use:
    "This model's maximum context length is N tokens. However, your prompt contains M input
    tokens ..." (param input_tokens / input_text), "You passed N input tokens and requested M
    output tokens. However, the model's context length is only L tokens ...", "The decoder
    prompt (length N) is longer than the maximum model length of L"."""
    if param in ("input_tokens", "input_text"):
        return True
    text = message.lower()
    return any(words in text for words in ("maximum context length", "context length is only",
                                            "maximum model length"))


class ReplicaUnavailable(EngineError):
    """The replica did not answer usably: connection refused or reset, a timeout, a 5xx."""


class ReplicaRejected(EngineError):
    """The replica answered with an error about the request (vLLM's ErrorResponse)."""

    def __init__(self, url: str, status: int, err_type: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{url} answered {status} {err_type}: {message}")
        self.status, self.err_type, self.detail, self.param = status, err_type, message, param


class ModelMissing(ReplicaRejected):
    """The replica does not know the model name asked for: it restarted and forgot an adapter."""


class PromptTooLong(ReplicaRejected):
    """The replica refused the prompt as longer than its context (see `prompt_too_long`)."""


class LoraDisabled(ReplicaRejected):
    """The replica cannot load any adapter: it was started without --enable-lora."""


class AdapterLoadFailed(ReplicaUnavailable):
    """Loading an adapter kept failing with an engine error of no known cause (retried)."""


class StreamFailed(ReplicaUnavailable):
    """The replica reported an error inside a stream (`data: {"error": ...}`): it is answering,
    so after the first token this fails the answer, not the replica."""


@dataclass(frozen=True)
class Timeouts:
    connect_s: float
    admin_s: float


def parse_error(status: int, text: str) -> tuple[str, str, str | None]:
    """(type, message, param) from any of the error bodies vLLM and its web stack send."""
    try:
        data = json.loads(text)
    except ValueError:
        return "HTTPError", (text.strip()[:300] or f"HTTP {status}"), None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return str(err.get("type") or "Error"), str(err.get("message") or ""), err.get("param")
        if isinstance(err, str):  # the API-key middleware: {"error": "Unauthorized"}
            return err, err, None
        if "message" in data:  # releases before the nested ErrorInfo
            return str(data.get("type") or "Error"), str(data["message"]), data.get("param")
        if "detail" in data:  # FastAPI: a route that does not exist, or request validation
            return "HTTPError", json.dumps(data["detail"])[:300] if not isinstance(data["detail"], str) \
                else data["detail"], None
    return "HTTPError", text.strip()[:300], None


def _error_code(payload: dict[str, Any]) -> int:
    """The HTTP status an in-stream error stands for (vLLM's ErrorInfo.code); 500 when absent."""
    err = payload.get("error")
    code = err.get("code") if isinstance(err, dict) else payload.get("code")
    try:
        return int(code)
    except (TypeError, ValueError):
        return 500


def rejection(url: str, status: int, text: str) -> ReplicaRejected:
    """The ReplicaRejected (or subclass) for an error answer about the request."""
    etype, message, param = parse_error(status, text)
    if status == 404 and (param == "model" or "does not exist" in message):
        return ModelMissing(url, status, etype, message, param)
    if status == 400 and prompt_too_long(message, param):
        return PromptTooLong(url, status, etype, message, param)
    return ReplicaRejected(url, status, etype, message, param)


class CompletionStream:
    """The events of one streaming completion. `close()` drops the connection (vLLM aborts)."""

    def __init__(self, url: str, response: aiohttp.ClientResponse) -> None:
        self.url = url
        self._response = response
        self._buffer = ""
        self.closed = False
        self.finished = False  # [DONE] was read: the connection can go back to the pool

    async def next_event(self, timeout_s: float) -> dict[str, Any] | None:
        """The next `data:` payload as a dict; None after `[DONE]`. Errors raise."""
        while True:
            cut = self._buffer.find("\n\n")
            if cut >= 0:
                event, self._buffer = self._buffer[:cut], self._buffer[cut + 2:]
                data = "\n".join(line[5:].lstrip() for line in event.split("\n") if line.startswith("data:"))
                if not data:
                    continue  # a comment or keep-alive
                if data == "[DONE]":
                    self.finished = True
                    return None
                try:
                    payload = json.loads(data)
                except ValueError as exc:
                    raise ReplicaUnavailable(f"{self.url} sent a chunk that is not JSON: {data[:200]!r}") from exc
                if isinstance(payload, dict) and "error" in payload:
                    status = _error_code(payload)
                    if 400 <= status < 500:  # the request's fault, told after the headers
                        raise rejection(self.url, status, data)
                    etype, message, _ = parse_error(500, data)
                    raise StreamFailed(f"{self.url} failed while streaming: {etype}: {message}")
                return payload
            try:
                chunk = await asyncio.wait_for(self._response.content.readany(), timeout_s)
            except asyncio.TimeoutError:
                raise ReplicaUnavailable(f"{self.url} sent nothing for {timeout_s:g} s") from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                raise ReplicaUnavailable(f"{self.url} broke the stream: {type(exc).__name__}: {exc}") from exc
            if not chunk:
                raise ReplicaUnavailable(f"{self.url} ended the stream without [DONE]")
            self._buffer += chunk.decode("utf-8", "replace").replace("\r\n", "\n")

    def close(self) -> None:
        """Done with the stream. Unfinished, the connection is closed (not pooled), so the
        server sees the client leave and aborts the request."""
        if not self.closed:
            self.closed = True
            if self.finished:
                self._response.release()
            else:
                self._response.close()


class ReplicaClient:
    """One replica's endpoints over a shared aiohttp session."""

    def __init__(self, url: str, session: aiohttp.ClientSession, api_key: str | None, timeouts: Timeouts) -> None:
        self.url = url
        self._session = session
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeouts = timeouts

    def _timeout(self, total: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total, connect=self._timeouts.connect_s)

    async def _sent(self, path: str, send: Callable[[], Awaitable[T]], timed_out: str) -> T:
        """`send()`, once more on a new connection if the pooled one was closed under it (nothing
        was answered: vLLM never saw it); ReplicaUnavailable saying `timed_out` on a timeout."""
        for attempt in (1, 2):
            try:
                return await send()
            except asyncio.TimeoutError:
                raise ReplicaUnavailable(f"{self.url}{timed_out}") from None
            except (aiohttp.ClientError, ConnectionError) as exc:
                if attempt == 1 and _stale_connection(exc):
                    log.info("%s%s: the connection was closed under the request (%s); sending it again",
                             self.url, path, exc)
                    continue
                raise ReplicaUnavailable(f"{self.url}{path}: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
        async def send() -> tuple[int, str]:
            async with self._session.request(method, self.url + path, json=body, headers=self._headers,
                                             timeout=self._timeout(self._timeouts.admin_s)) as resp:
                return resp.status, await resp.text()

        return await self._sent(path, send, f"{path}: no answer within {self._timeouts.admin_s:g} s")

    def _rejected(self, status: int, text: str) -> EngineError:
        """The exception for an error answer: a 5xx means the replica is unwell (try another)."""
        if status >= 500:
            etype, message, _ = parse_error(status, text)
            return ReplicaUnavailable(f"{self.url} answered {status} {etype}: {message}")
        return rejection(self.url, status, text)

    async def models(self) -> list[dict[str, Any]]:
        status, text = await self._call("GET", "/v1/models")
        if status != 200:
            raise self._rejected(status, text)
        try:
            data = json.loads(text)["data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ReplicaUnavailable(f"{self.url}/v1/models: not a model list: {text[:200]!r}") from exc
        return [m for m in data if isinstance(m, dict) and "id" in m]

    async def runtime_lora_updating(self) -> bool:
        """Whether /v1/load_lora_adapter exists (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True).

        Asks to unload a name nobody registers: vLLM answers its own 404 NotFoundError; a
        server without the route answers the web framework's 404 `{"detail": "Not Found"}`.
        """
        status, text = await self._call("POST", "/v1/unload_lora_adapter", {"lora_name": "__loratg_probe__"})
        if status in (401, 403) or status >= 500:
            raise self._rejected(status, text)
        try:
            data = json.loads(text)
        except ValueError:
            return False
        return isinstance(data, dict) and ("error" in data or data.get("object") == "error")

    async def load_adapter(self, name: str, path: str) -> None:
        """Register an adapter; already registered under that name counts as done.

        ReplicaRejected: the adapter was refused (vLLM's known words, or a 4xx such as a path
        the replica cannot see); LoraDisabled: the replica runs without --enable-lora;
        AdapterLoadFailed: a 500 of no known cause (vLLM's engine errors), still there after
        LOAD_ATTEMPTS; ReplicaUnavailable: no answer, or another 5xx.
        """
        for attempt in range(1, LOAD_ATTEMPTS + 1):
            status, text = await self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
            if status == 200:
                return
            etype, message, param = parse_error(status, text)
            if status == 400 and "already been loaded" in message:
                return
            if status < 500:
                raise rejection(self.url, status, text)
            if status != 500:  # 502, 503...: the replica (or what is in front of it) is not answering well
                raise self._rejected(status, text)
            if LORA_DISABLED in message:
                raise LoraDisabled(self.url, status, etype, message, param)
            if any(words in message for words in ADAPTER_REFUSALS):
                raise ReplicaRejected(self.url, status, etype, message, param)
            if attempt < LOAD_ATTEMPTS:
                log.warning("%s could not load adapter %s (attempt %d of %d): %s %s: %s", self.url, name, attempt,
                            LOAD_ATTEMPTS, status, etype, message)
                await asyncio.sleep(LOAD_BACKOFF_S * attempt)
        raise AdapterLoadFailed(f"{self.url} could not load adapter {name} ({LOAD_ATTEMPTS} attempts): "
                                f"{status} {etype}: {message}")

    async def unload_adapter(self, name: str) -> bool:
        """Unregister an adapter; False when the replica did not have it."""
        status, text = await self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status == 200:
            return True
        if status == 404:
            return False
        raise self._rejected(status, text)

    async def complete(self, body: dict[str, Any], first_token_timeout_s: float) -> CompletionStream:
        """Send a streaming completion; returns once the replica accepted it (HTTP 200)."""
        resp = await self._sent("/v1/completions", lambda: asyncio.wait_for(self._session.post(
            self.url + "/v1/completions", json=body, headers=self._headers, timeout=self._timeout(None),
        ), first_token_timeout_s), f" did not accept the request within {first_token_timeout_s:g} s")
        if resp.status != 200:
            try:
                text = await asyncio.wait_for(resp.text(), self._timeouts.admin_s)
            except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError):
                text = ""
            finally:
                resp.release()
            raise self._rejected(resp.status, text)
        return CompletionStream(self.url, resp)
