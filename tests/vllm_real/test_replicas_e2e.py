"""The vLLM backend (the engine face the bot uses under ENGINE_BACKEND=vllm) on real replicas.

Two real vLLM servers (tests/vllm_real/servers.py) serve the default model with the shipped
adapters; each test drives `VllmEngine` as the bot does and checks what a user or an operator
sees: answers in every mode, the same prompt as the local engine for a long conversation, a
promoted version live on the running replicas, a replica killed mid-answer (the answer goes
on from the other) and restarted (its adapters come back, it takes requests again), a replica
without LoRA left out without blaming the adapter, idling past vLLM's keep-alive, a
setting vLLM refuses, and an A/B's candidates held on every replica beside the serving
versions (more than --max-loras) and answering pinned requests. The keep-alive check also runs on the fake, the rest only on real vLLM.
"""
from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from engine.errors import EngineError
from engine.types import GenerationParams, Message, Mode
from tests.fakes.adapters import write_adapter
from tests.fakes.slow_link import SlowLink
from tests.vllm_real.servers import API_KEY

pytestmark = pytest.mark.timeout(900)

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=12)
QUESTION = [Message("user", "My landlord kept my deposit. What can I do?")]


async def collect(stream) -> str:
    return "".join([piece async for piece in stream])


def adapters_on(url: str) -> set[str]:
    req = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return {m["id"] for m in json.load(r)["data"] if m.get("parent")}


async def until(predicate, timeout: float = 300.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.2)


@pytest.fixture
async def fleet(real_replicas, vllm_engines, shipped_adapters):
    """A VllmEngine on both real replicas (health checks every 0.5 s), and the replicas."""
    servers = await asyncio.to_thread(real_replicas.standard)
    engine = await vllm_engines([s.url for s in servers], shipped_adapters, vllm_health_interval_s=0.5,
                                vllm_retry_after_s=0.5)
    return engine, servers


pytestmark_real = pytest.mark.vllm_real


@pytestmark_real
async def test_a_replica_without_lora_is_left_out_and_the_promoted_adapter_serves(real_replicas, vllm_engines,
                                                                                 tmp_path, shipped_adapters):
    good, bare = real_replicas.servers
    await asyncio.to_thread(real_replicas.ensure, good)
    await asyncio.to_thread(real_replicas.ensure, bare, lora=False)  # an operator forgot --enable-lora
    # (first in this module: the last contract test left the second replica so)
    empty = tmp_path / "empty-adapters"
    empty.mkdir()
    engine = await vllm_engines([good.url, bare.url], empty)
    assert [r.state for r in engine.status().replicas] == ["ready", "ready"]  # nothing to register yet
    write_adapter(empty, "legal", "v1", current=False)
    assert await engine.training.promote("legal", "v1") == "v1"
    states = {r.name: (r.state, r.error) for r in engine.status().replicas}
    assert states[good.url] == ("ready", None)
    assert states[bare.url][0] == "incompatible" and "--enable-lora" in states[bare.url][1]
    assert engine.modes().adapter("legal").error is None
    stream = engine.generate(QUESTION, Mode("legal"), GREEDY)
    assert (await collect(stream)).strip() and stream.replica_url == good.url


@pytestmark_real
async def test_every_mode_answers_from_the_replicas(fleet):
    engine, servers = fleet
    for s in servers:
        assert adapters_on(s.url) == {"legal__v1", "medical__v1", "finance__v1"}
    answers = {}
    for mode in (Mode(None, "assistant"), Mode("legal", "assistant"), Mode("medical", "assistant"),
                 Mode("finance", "assistant"), Mode("legal", "lawyer")):
        stream = engine.generate(QUESTION, mode, GREEDY)
        answers[mode] = await collect(stream)
        assert answers[mode].strip() and stream.result.finish_reason in ("stop", "length")
        assert stream.result.adapter_version == ("v1" if mode.adapter else None)
        assert stream.result.completion_tokens > 0 and stream.result.prompt_tokens > 20
    assert len(set(answers.values())) > 2  # the trained adapters and the role change the answer
    assert all(r.state == "ready" for r in engine.status().replicas)


@pytestmark_real
async def test_a_conversation_longer_than_history_tokens_sends_the_local_engines_prompt(real_replicas, vllm_engines,
                                                                                    shipped_adapters):
    from engine.model import load_tokenizer, resolve_source
    from engine.prompts import PromptMaker, load_templates
    from tests.vllm_real.conftest import engine_settings

    servers = await asyncio.to_thread(real_replicas.standard)
    engine = await vllm_engines([servers[0].url], shipped_adapters, engine={"history_tokens": 64})
    history = [Message("user", "Please review this contract: " + "clause " * 400),
               Message("assistant", "It looks fine."), Message("user", "And the deposit?")]
    stream = engine.generate(history, Mode("legal", "lawyer"), GREEDY)
    assert (await collect(stream)).strip()
    settings = engine_settings(shipped_adapters, history_tokens=64)
    local = PromptMaker(load_templates(settings), load_tokenizer(resolve_source(settings)), settings)
    ids, trimmed = local.build("lawyer", None, history, GREEDY.max_new_tokens)
    assert stream.result.trimmed_turns == trimmed == 2
    assert stream.result.prompt_tokens == len(ids) < 200  # what vLLM counted, from its usage


@pytestmark_real
async def test_a_promoted_version_goes_live_on_the_running_replicas(fleet, shipped_adapters):
    engine, servers = fleet
    base = await collect(engine.generate(QUESTION, Mode(None, "assistant"), GREEDY))
    trained = await collect(engine.generate(QUESTION, Mode("legal", "assistant"), GREEDY))
    write_adapter(shipped_adapters, "legal", "v2", current=False)  # B = 0: answers as the base model
    assert await engine.training.promote("legal", "v2") == "v2"
    for s in servers:
        await until(lambda url=s.url: "legal__v2" in adapters_on(url) and "legal__v1" not in adapters_on(url), 60)
    stream = engine.generate(QUESTION, Mode("legal", "assistant"), GREEDY)
    assert await collect(stream) == base != trained
    assert stream.result.adapter_version == "v2"


@pytestmark_real
async def test_held_candidates_are_on_every_replica_and_pinned_requests_get_them(fleet, shipped_adapters):
    import shutil

    from tests.vllm_real.servers import MAX_LORAS

    engine, servers = fleet
    expected = {}
    for name, mode in (("base", Mode(None, "assistant")), ("legal", Mode("legal", "assistant")),
                       ("medical", Mode("medical", "assistant"))):
        expected[name] = await collect(engine.generate(QUESTION, mode, GREEDY))
    assert len(set(expected.values())) == 3
    # three candidates of legal: untrained (answers as the base), medical's weights, legal's own
    write_adapter(shipped_adapters, "legal", "v2", current=False)
    for version, source in (("v3", "medical"), ("v4", "legal")):
        shutil.copytree(shipped_adapters / source / "v1", shipped_adapters / "legal" / version)
    twins = {"v2": "base", "v3": "medical", "v4": "legal"}
    await engine.hold("legal", tuple(twins))
    registered = {"legal__v1", "medical__v1", "finance__v1", "legal__v2", "legal__v3", "legal__v4"}
    assert len(registered) > MAX_LORAS
    for s in servers:
        assert adapters_on(s.url) == registered
    for _ in range(2):  # the second round after vLLM's LRU evicted some: each still answers as itself
        for version, twin in twins.items():
            stream = engine.generate(QUESTION, Mode("legal", "assistant"), GenerationParams(
                temperature=0.0, max_new_tokens=GREEDY.max_new_tokens, adapter_version=version))
            assert await collect(stream) == expected[twin], version
            stamp = stream.result.stamp
            assert (stream.result.adapter_version, stamp.adapter_version, stamp.backend) == (version, version, "vllm")
            assert stamp.replica == stream.replica_url in [s.url for s in servers]
        serving = engine.generate(QUESTION, Mode("legal", "assistant"), GREEDY)
        assert await collect(serving) == expected["legal"] and serving.result.adapter_version == "v1"
    await engine.hold("legal", ())
    for s in servers:
        assert adapters_on(s.url) == {"legal__v1", "medical__v1", "finance__v1"}


@pytestmark_real
async def test_ignore_eos_makes_the_replica_write_the_whole_budget(fleet):
    engine, _ = fleet
    short = [Message("user", "Reply with one word: yes or no. Is water wet?")]
    normal = engine.generate(short, Mode(None, "assistant"), GenerationParams(temperature=0.0, max_new_tokens=40))
    await collect(normal)
    fixed = engine.generate(short, Mode(None, "assistant"),
                            GenerationParams(temperature=0.0, max_new_tokens=40, ignore_eos=True))
    await collect(fixed)
    assert normal.result.finish_reason == "stop" and normal.result.completion_tokens < 40
    assert (fixed.result.finish_reason, fixed.result.completion_tokens) == ("length", 40)


@pytestmark_real
async def test_a_setting_vllm_refuses_fails_that_request_only(fleet):
    engine, _ = fleet
    with pytest.raises(EngineError, match=r"refused the request: temperature must be in \[0, 2\]"):
        await collect(engine.generate(QUESTION, Mode("legal"), GenerationParams(temperature=3.0)))
    assert [r.state for r in engine.status().replicas] == ["ready", "ready"]
    assert (await collect(engine.generate(QUESTION, Mode("legal"), GREEDY))).strip()


@pytestmark_real
async def test_a_replica_killed_mid_answer_hands_the_answer_to_the_other_and_comes_back(fleet, real_replicas):
    engine, servers = fleet
    params = GenerationParams(temperature=0.0, max_new_tokens=48, ignore_eos=True)
    stream = engine.generate(QUESTION, Mode("legal", "lawyer"), params)
    first = await stream.__anext__()
    victim = next(s for s in servers if s.url == stream.replica_url)
    await asyncio.to_thread(victim.kill)
    rest = await collect(stream)
    other = next(s for s in servers if s is not victim)
    assert stream.replicas_used == [victim.url, other.url]
    assert stream.result.text == first + rest and rest  # nothing the user saw is lost; the answer went on
    assert (stream.result.finish_reason, stream.result.completion_tokens) == ("length", 48)
    states = {r.name: r.state for r in engine.status().replicas}
    assert states == {victim.url: "down", other.url: "ready"}
    answer = engine.generate(QUESTION, Mode("medical"), GREEDY)  # meanwhile the other one serves
    assert (await collect(answer)).strip() and answer.replica_url == other.url

    await asyncio.to_thread(real_replicas.ensure, victim)
    await until(lambda: all(r.state == "ready" for r in engine.status().replicas))
    assert adapters_on(victim.url) == {"legal__v1", "medical__v1", "finance__v1"}  # registered again
    back = engine.generate(QUESTION, Mode("finance"), GREEDY)
    assert (await collect(back)).strip() and back.replica_url == victim.url  # fewest requests: it takes traffic


@pytest.mark.parametrize("kind", ["fake", pytest.param("real", marks=pytest.mark.vllm_real)])
async def test_idle_past_vllms_keep_alive_then_a_request_takes_no_replica_out(request, vllm_engines, tmp_path,
                                                                            kind):
    """Across a link with 0.3 s each way, a request sent after 4.7 s of idleness reaches the
    replica after its 5 s keep-alive closed the connection, while the client still saw it open."""
    from tests.fakes.vllm import FakeVllm
    from tests.vllm_real.servers import SERVED_NAME

    fake = None
    if kind == "fake":
        fake = FakeVllm(model=SERVED_NAME, api_key=API_KEY)
        await fake.start()
        port = int(fake.url.rsplit(":", 1)[1])
    else:
        port = (await asyncio.to_thread(request.getfixturevalue("real_replicas").standard))[0].port
    (tmp_path / "none").mkdir()
    try:
        async with SlowLink(port, latency_s=0.3) as link:
            engine = await vllm_engines([link.url], tmp_path / "none")
            for _ in range(2):
                assert (await collect(engine.generate(QUESTION, Mode(), GREEDY))).strip()
                await asyncio.sleep(4.7)
            stream = engine.generate(QUESTION, Mode(), GREEDY)
            assert (await collect(stream)).strip()
            assert engine.status().replicas[0].state == "ready" and engine.status().replicas[0].failures == 0
    finally:
        if fake is not None:
            await fake.stop()
