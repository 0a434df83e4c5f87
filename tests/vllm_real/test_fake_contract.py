"""The fake vLLM's promises, each checked against the fake and a real vLLM (`vllm_real`).

tests/fakes/vllm.py stands in for vLLM in the fast tests; every behaviour the backend relies
on is asserted here once, with the same expectations for both servers, so the fake cannot
drift from what vLLM really answers: the shapes, the error codes and words, what is refused
before the stream and what inside it, the API key before routing, the keep-alive. Where the
backend classifies an answer (a refusal of the adapter, LoRA off, a prompt too long, the
request's fault inside the stream), the check goes through its client code too.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import aiohttp
import pytest

from engine.vllm.client import (
    LoraDisabled, ModelMissing, PromptTooLong, ReplicaClient, ReplicaRejected, Timeouts,
    open_session,
)
from tests.fakes.adapters import write_adapter
from tests.vllm_real.conftest import Server

pytestmark = pytest.mark.timeout(600)


async def post(server: Server, path: str, body: Any, *, key: str | None = "ok") -> tuple[int, Any]:
    headers = server.headers if key == "ok" else ({"Authorization": f"Bearer {key}"} if key else {})
    async with aiohttp.ClientSession() as s:
        async with s.post(server.url + path, json=body, headers=headers) as r:
            text = await r.text()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


async def stream_events(server: Server, body: dict[str, Any]) -> tuple[int, list[Any]]:
    """HTTP status and the `data:` payloads of a streamed completion (errors included)."""
    async with aiohttp.ClientSession() as s:
        async with s.post(server.url + "/v1/completions", json={"stream": True, **body},
                          headers=server.headers) as r:
            raw = (await r.read()).decode()
    if r.status != 200:
        return r.status, [json.loads(raw)]
    events = [line[5:].strip() for line in raw.split("\n") if line.startswith("data:")]
    return r.status, [e if e == "[DONE]" else json.loads(e) for e in events]


def client(server: Server, session: aiohttp.ClientSession) -> ReplicaClient:
    return ReplicaClient(server.url, session, server.api_key, Timeouts(5.0, 120.0))


def completion(server: Server, **body: Any) -> dict[str, Any]:
    return {"model": server.model, "prompt": [1, 2, 3], "max_tokens": 4, **body}


# ---- models and adapters ---------------------------------------------------------------------


async def test_models_list_the_base_with_its_context_and_each_adapter_under_it(vllm_server, tmp_path):
    path = write_adapter(tmp_path / "adapters", "legal")
    async with open_session() as session:
        c = client(vllm_server, session)
        await c.load_adapter("legal__v1", str(path))
        try:
            cards = await c.models()
        finally:
            assert await c.unload_adapter("legal__v1") is True
        assert await c.unload_adapter("legal__v1") is False  # 404: not there any more
    base, lora = cards
    assert (base["id"], base["parent"], base["max_model_len"]) == (vllm_server.model, None, vllm_server.max_model_len)
    assert (lora["id"], lora["parent"], lora["root"]) == ("legal__v1", vllm_server.model, str(path))


async def test_loading_answers_in_vllms_words(vllm_server, tmp_path):
    path = write_adapter(tmp_path / "adapters", "legal")
    body = {"lora_name": "legal__v1", "lora_path": str(path)}
    assert await post(vllm_server, "/v1/load_lora_adapter", body) == \
        (200, "Success: LoRA adapter 'legal__v1' added successfully.")
    try:
        status, again = await post(vllm_server, "/v1/load_lora_adapter", body)
        assert status == 400 and again["error"]["message"].startswith("The lora adapter 'legal__v1' has already been "
                                                                      "loaded.")
    finally:
        assert (await post(vllm_server, "/v1/unload_lora_adapter", {"lora_name": "legal__v1"}))[0] == 200
    status, missing = await post(vllm_server, "/v1/load_lora_adapter",
                                 {"lora_name": "gone__v1", "lora_path": str(tmp_path / "nothing")})
    assert (status, missing["error"]["type"]) == (404, "NotFoundError")
    assert missing["error"]["message"] == "Loading lora gone__v1 failed: No adapter found for <path>"  # hidden
    status, clash = await post(vllm_server, "/v1/load_lora_adapter", {**body, "lora_name": vllm_server.model})
    assert (status, clash["error"]["message"]) == (400, f"The lora adapter '{vllm_server.model}' conflicts with a "
                                                        "served base model.")


async def test_more_adapters_than_max_loras_are_accepted_and_each_answers_as_itself(vllm_server, tmp_path):
    """--max-loras bounds the adapters in one batch and --max-cpu-loras (unset: the same) an LRU
    cache, not what may be registered: past both, every adapter is listed and answers, vLLM
    loading an evicted one again from its path (the backend registers the serving and held
    versions of every domain whatever the replicas' limits)."""
    n = vllm_server.max_loras + 2
    paths = {f"d{i}__v1": write_adapter(tmp_path / "adapters", f"d{i}", r=4, seed=i) for i in range(n)}
    async with open_session() as session:
        c = client(vllm_server, session)
        try:
            for name, path in paths.items():
                await c.load_adapter(name, str(path))
            assert [m["id"] for m in await c.models() if m.get("parent")] == list(paths)
            for _ in range(2):  # the second round asks for adapters the first one evicted
                for name in paths:
                    status, events = await stream_events(vllm_server, completion(vllm_server, model=name))
                    assert status == 200 and events[-1] == "[DONE]" and events[0]["model"] == name
        finally:
            for name in paths:
                await c.unload_adapter(name)


async def test_a_rank_above_max_lora_rank_is_a_refusal_of_the_adapter(vllm_server, tmp_path):
    path = write_adapter(tmp_path / "adapters", "legal", r=16)
    async with open_session() as session:
        with pytest.raises(ReplicaRejected) as err:
            await client(vllm_server, session).load_adapter("legal__v1", str(path))
    assert err.value.status == 500 and type(err.value) is ReplicaRejected  # the adapter's fault, not retried
    assert f"LoRA rank 16 is greater than max_lora_rank {vllm_server.max_lora_rank}." in err.value.detail


async def test_an_unknown_model_is_404_model_missing(vllm_server):
    status, answer = await post(vllm_server, "/v1/completions", completion(vllm_server, model="gone__v1"))
    assert status == 404 and answer["error"]["param"] == "model"
    assert answer["error"]["message"].startswith("The model `gone__v1` does not exist.")
    async with open_session() as session:
        with pytest.raises(ModelMissing):
            await client(vllm_server, session).complete({**completion(vllm_server, model="gone__v1"), "stream": True},
                                                        60)


# ---- the API key comes first -----------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                              ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/no_such_route")])
async def test_a_wrong_key_is_401_before_anything_else_under_v1(vllm_server, method, path):
    async with aiohttp.ClientSession() as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            async with s.request(method, vllm_server.url + path, json=completion(vllm_server, model="gone"),
                                 headers=headers) as r:
                assert (r.status, await r.json()) == (401, {"error": "Unauthorized"})
        async with s.get(vllm_server.url + "/health") as r:
            assert r.status == 200  # outside /v1: no key needed
        async with s.post(vllm_server.url + "/v1/no_such_route", headers=vllm_server.headers) as r:
            assert (r.status, await r.json()) == (404, {"detail": "Not Found"})


# ---- what is refused before the stream --------------------------------------------------------

RANGES = [
    ({"temperature": 3.0}, "temperature must be in [0, 2], got 3.0. (parameter=temperature, value=3.0)",
     "temperature"),
    ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0. (parameter=top_p, value=0.0)", "top_p"),
    ({"top_k": -5}, "top_k must be 0 (disable), or at least 1, got -5.", None),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be greater than zero, got 0.0.", None),
    ({"max_tokens": 4096}, "max_tokens=4096 cannot be greater than max_model_len=2048. Please request fewer output "
                           "tokens. (parameter=max_tokens, value=4096)", "max_tokens"),
]


@pytest.mark.parametrize(("setting", "message", "param"), RANGES, ids=[next(iter(r[0])) for r in RANGES])
async def test_sampling_settings_out_of_range_are_400_before_the_stream(vllm_server, setting, message, param):
    status, (answer,) = await stream_events(vllm_server, completion(vllm_server, **setting))
    assert status == 400
    assert answer["error"] == {"message": message, "type": "BadRequestError", "param": param, "code": 400}


async def test_the_edges_of_the_sampling_ranges_are_accepted(vllm_server):
    status, events = await stream_events(vllm_server, completion(vllm_server, temperature=2.0, top_p=1.0, top_k=-1,
                                                                 repetition_penalty=0.01, max_tokens=1))
    assert status == 200 and events[-1] == "[DONE]"


async def test_a_prompt_over_the_context_is_refused_as_too_long(vllm_server):
    n = vllm_server.max_model_len + 50
    status, (answer,) = await stream_events(vllm_server, completion(vllm_server, prompt=[1] * n))
    assert status == 400 and answer["error"]["param"] == "input_tokens"
    assert answer["error"]["message"] == (
        f"This model's maximum context length is {vllm_server.max_model_len} tokens. However, your prompt contains "
        f"{n} input tokens, which exceeds this limit even without any output tokens. Please reduce the length of "
        f"the input prompt. (parameter=input_tokens, value={n})")
    async with open_session() as session:
        with pytest.raises(PromptTooLong):
            await client(vllm_server, session).complete({**completion(vllm_server, prompt=[1] * n), "stream": True},
                                                        60)


async def test_a_prompt_that_fills_the_context_leaves_max_tokens_0_and_a_shorter_room_is_answered_shorter(
        vllm_server):
    full = vllm_server.max_model_len
    status, (answer,) = await stream_events(vllm_server, completion(vllm_server, prompt=[1] * full))
    assert (status, answer["error"]["message"]) == (400, "max_tokens must be at least 1, got 0. "
                                                         "(parameter=max_tokens, value=0)")
    status, events = await stream_events(vllm_server, completion(vllm_server, prompt=[1] * (full - 2), max_tokens=10,
                                                                 ignore_eos=True))
    choices = [c for e in events if isinstance(e, dict) for c in e.get("choices", [])]
    assert status == 200 and len([c for c in choices if c["text"]]) <= 2 and choices[-1]["finish_reason"] == "length"


# ---- what is refused inside the stream --------------------------------------------------------


@pytest.mark.parametrize(("body", "message", "param"), [
    ({"stop_token_ids": [49152]}, "token_id(s) [49152] in stop_token_ids contain out-of-vocab token ids. Vocabulary "
                                  "size: 49152 (parameter=stop_token_ids, value=[49152])", "stop_token_ids"),
    ({"prompt": [1, 2, 99999]}, "Token id 99999 is out of vocabulary", None),
], ids=["stop id", "prompt id"])
async def test_ids_outside_the_vocabulary_are_a_400_inside_the_stream(vllm_server, body, message, param):
    status, events = await stream_events(vllm_server, completion(vllm_server, **body))
    assert status == 200 and events == [
        {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}, "[DONE]"]
    async with open_session() as session:  # the backend's client: the request's fault, not the replica's
        stream = await client(vllm_server, session).complete({**completion(vllm_server, **body), "stream": True}, 60)
        try:
            with pytest.raises(ReplicaRejected) as err:
                await stream.next_event(60)
        finally:
            stream.close()
    assert (err.value.status, err.value.param, err.value.detail) == (400, param, message)


# ---- the stream -------------------------------------------------------------------------------


async def test_a_stream_carries_text_token_ids_the_finish_usage_then_done(vllm_server):
    status, events = await stream_events(vllm_server, completion(
        vllm_server, max_tokens=3, ignore_eos=True, return_token_ids=True, stream_options={"include_usage": True}))
    assert status == 200 and events[-1] == "[DONE]"
    *pieces, usage = events[:-1]
    assert len(pieces) == 3 and all(e["object"] == "text_completion" for e in pieces)
    choices = [e["choices"][0] for e in pieces]
    assert choices[0]["prompt_token_ids"] == [1, 2, 3] and all(c["prompt_token_ids"] is None for c in choices[1:])
    assert all(len(c["token_ids"]) == 1 and c["text"] for c in choices)
    assert [c["finish_reason"] for c in choices] == [None, None, "length"]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                                         "total_tokens": 6}


# ---- the connection -------------------------------------------------------------------------------


async def test_an_idle_connection_is_closed_after_5_seconds(vllm_server):
    idle = await asyncio.to_thread(_idle_until_closed, vllm_server.url)
    assert 4.0 <= idle <= 7.0, f"closed after {idle:.1f} s"


def _idle_until_closed(url: str) -> float:
    """Seconds from an answer until the server closes the keep-alive connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = sock.recv(65536)
        answered = time.monotonic()
        assert answer.startswith(b"HTTP/1.1 200")
        sock.settimeout(15)
        while sock.recv(65536):  # until the server closes it
            pass
        return time.monotonic() - answered


@pytest.mark.parametrize("kind", ["fake", pytest.param("real", marks=pytest.mark.vllm_real)])
async def test_a_replica_without_lora_says_so_when_asked_to_load(request, tmp_path, kind):
    """Not on `vllm_server`: it needs a replica started without --enable-lora (the real one
    is the second replica, restarted so; the first test of test_replicas_e2e.py uses it as it
    is, then `standard()` puts it back). Last in this module for that reason."""
    from tests.fakes.vllm import FakeVllm
    from tests.vllm_real.servers import API_KEY, SERVED_NAME

    path = write_adapter(tmp_path / "adapters", "legal")
    fake = None
    if kind == "fake":
        fake = FakeVllm(model=SERVED_NAME, api_key=API_KEY, enable_lora=False)
        url = await fake.start()
    else:
        replicas = request.getfixturevalue("real_replicas")
        bare = replicas.servers[1]
        await asyncio.to_thread(replicas.ensure, bare, lora=False)
        url = bare.url
    try:
        async with open_session() as session:
            c = ReplicaClient(url, session, API_KEY, Timeouts(5.0, 120.0))
            assert await c.runtime_lora_updating() is True  # the route is there; loading is what fails
            with pytest.raises(LoraDisabled) as err:
                await c.load_adapter("legal__v1", str(path))
        assert err.value.status == 500 and "LoRA is not enabled" in err.value.detail
    finally:
        if fake is not None:
            await fake.stop()
