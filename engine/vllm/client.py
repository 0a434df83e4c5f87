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
at the top level with `"object": "error"`); a wrong API key is 401 `{"error": "Unauthorized"}`.
Closing a streaming response closes the connection, and vLLM aborts the request.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp

from engine.errors import EngineError

log = logging.getLogger(__name__)


class ReplicaUnavailable(EngineError):
    """The replica did not answer usably: connection refused or reset, a timeout, a 5xx."""


class ReplicaRejected(EngineError):
    """The replica answered with an error about the request (vLLM's ErrorResponse)."""

    def __init__(self, url: str, status: int, err_type: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{url} answered {status} {err_type}: {message}")
        self.status, self.err_type, self.detail, self.param = status, err_type, message, param


class ModelMissing(ReplicaRejected):
    """The replica does not know the model name asked for: it restarted and forgot an adapter."""


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

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, str]:
        try:
            async with self._session.request(
                method, self.url + path, json=body, headers=self._headers, timeout=self._timeout(self._timeouts.admin_s),
            ) as resp:
                return resp.status, await resp.text()
        except asyncio.TimeoutError:
            raise ReplicaUnavailable(f"{self.url}{path}: no answer within {self._timeouts.admin_s:g} s") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise ReplicaUnavailable(f"{self.url}{path}: {type(exc).__name__}: {exc}") from exc

    def _rejected(self, status: int, text: str, *, server_errors_are_answers: bool = False) -> EngineError:
        """The exception for an error answer. A 5xx means the replica is unwell (try another),
        except where vLLM reports a refusal as 500 (loading an adapter: the rank, LoRA off)."""
        etype, message, param = parse_error(status, text)
        if status >= 500 and not (status == 500 and server_errors_are_answers):
            return ReplicaUnavailable(f"{self.url} answered {status} {etype}: {message}")
        cls = ModelMissing if status == 404 and (param == "model" or "does not exist" in message) else ReplicaRejected
        return cls(self.url, status, etype, message, param)

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
        """Register an adapter; already registered under that name counts as done."""
        status, text = await self._call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status == 200:
            return
        etype, message, _ = parse_error(status, text)
        if status == 400 and "already been loaded" in message:
            return
        raise self._rejected(status, text, server_errors_are_answers=True)

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
        try:
            resp = await asyncio.wait_for(self._session.post(
                self.url + "/v1/completions", json=body, headers=self._headers, timeout=self._timeout(None),
            ), first_token_timeout_s)
        except asyncio.TimeoutError:
            raise ReplicaUnavailable(f"{self.url} did not accept the request within {first_token_timeout_s:g} s") \
                from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise ReplicaUnavailable(f"{self.url}/v1/completions: {type(exc).__name__}: {exc}") from exc
        if resp.status != 200:
            try:
                text = await asyncio.wait_for(resp.text(), self._timeouts.admin_s)
            except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError):
                text = ""
            finally:
                resp.release()
            raise self._rejected(resp.status, text)
        return CompletionStream(self.url, resp)
