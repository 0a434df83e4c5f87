"""The vLLM backend against fake vLLM replicas over real HTTP (tests/fakes/vllm.py).

What is checked is what an operator relies on: answers stream from the replica with the
user's adapter, built from the same prompt as the local engine; promotion reaches every
replica before anyone is switched; an old version leaves a replica only after its last
request; a replica that fails before the first token is replaced by another; a restarted
replica gets its adapters back; cancelling closes the HTTP stream (the replica aborts).
Timing is driven by gates and the fakes' records, never by sleeping.
"""
from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest

from engine.errors import AdapterInvalid, AdapterNotFound, EngineBusy, EngineError
from engine.prompts import PromptBuilder, TemplateLibrary
from engine.types import GenerationParams, Message, Mode, UserContext
from tests.engine.vllm_support import REPO, _no_vllm_env, adapters_dir, fakes, make_engine  # noqa: F401
from tests.fakes.adapters import MODEL_ID, write_adapter

pytestmark = pytest.mark.timeout(120)

HISTORY = [Message("user", "My landlord kept the deposit."), Message("assistant", "That may be unlawful."),
           Message("user", "What can I do?")]


async def collect(stream) -> list[str]:
    return [piece async for piece in stream]


# ---- answers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "model"), [
    (Mode(None, "assistant"), MODEL_ID),
    (Mode("legal", "lawyer"), "legal__v1"),
    (Mode("medical", "doctor"), "medical__v1"),
    (Mode("legal", "assistant"), "legal__v1"),  # adapter and role are independent
])
async def test_answers_stream_per_mode_from_the_same_prompt_as_the_local_engine(
    fakes, make_engine, tokenizer, mode, model
):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    user = UserContext(first_name="Ann", language="ru")
    stream = engine.generate(HISTORY, mode, GenerationParams(temperature=0.0, top_k=0, seed=7), user=user)
    pieces = await collect(stream)

    assert "".join(pieces) == stream.result.text
    assert pieces[0] == f"vllm-1:{model}" and len(pieces) > 3  # streamed piece by piece, by that adapter
    (request,) = replica.completions
    assert request.model == model and request.finished
    # the prompt: our role template (in the user's language) + history, through the chat template
    system = TemplateLibrary(REPO / "templates").render_system(mode.role, user)
    expected, trimmed = PromptBuilder(tokenizer, engine.settings.context_tokens).build(system, HISTORY, 32)
    assert request.prompt == expected and trimmed == 0
    # sampling settings map one to one; top_k 0 (off) is vLLM's -1
    body = request.body
    assert (body["max_tokens"], body["temperature"], body["top_k"], body["seed"]) == (32, 0.0, -1, 7)
    assert body["top_p"] == engine.settings.top_p and body["repetition_penalty"] == engine.settings.repetition_penalty
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in body["stop_token_ids"]
    res = stream.result
    assert (res.adapter, res.adapter_version, res.role) == (mode.adapter, "v1" if mode.adapter else None, mode.role)
    assert res.finish_reason == "stop" and res.prompt_tokens == len(expected)
    assert res.completion_tokens == len(pieces)  # from the final usage chunk
    assert res.time_to_first_token_s is not None


async def test_cached_prompt_tokens_come_from_vllms_usage_when_it_reports_them(fakes, make_engine):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    first = engine.generate([Message("user", "hi")], Mode())
    await collect(first)
    assert first.result.cached_prompt_tokens == 0  # no prompt_tokens_details: nothing claimed
    replica.cached_tokens = 16
    second = engine.generate([Message("user", "hi")], Mode())
    await collect(second)
    assert second.result.cached_prompt_tokens == 16 < second.result.prompt_tokens


async def test_the_answer_cap_ends_with_length_and_defaults_come_from_the_settings(fakes, make_engine):
    (replica,) = await fakes(1)
    engine = await make_engine(replica, engine={"temperature": 0.3, "top_k": 20, "max_new_tokens": 3})
    stream = engine.generate([Message("user", "hi")], Mode())
    assert len(await collect(stream)) == 3
    assert stream.result.finish_reason == "length"
    body = replica.completions[0].body
    assert (body["max_tokens"], body["temperature"], body["top_k"]) == (3, 0.3, 20) and "seed" not in body


async def test_an_unknown_adapter_or_role_is_refused_before_any_request(fakes, make_engine):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    with pytest.raises(AdapterNotFound, match="finance"):
        await collect(engine.generate([Message("user", "hi")], Mode("finance")))
    with pytest.raises(EngineError, match="no_such_role"):
        await collect(engine.generate([Message("user", "hi")], Mode(None, "no_such_role")))
    assert replica.completions == []


async def test_an_error_chunk_mid_stream_ends_the_answer_with_the_pieces_kept(fakes, make_engine):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    replica.script("one two three four", fail_after=2)
    stream = engine.generate([Message("user", "hi")], Mode("legal"))
    got = []
    with pytest.raises(EngineError, match="broke off"):
        async for piece in stream:
            got.append(piece)
    assert got == ["one", " two"] and stream.result.text == "one two"
    assert stream.result.finish_reason == "error"
    assert engine.status().replicas[0].state == "ready"  # it answered with an error: not taken out


# ---- start: checking the replicas --------------------------------------------------------------


async def test_start_registers_every_serving_version_on_every_replica(fakes, make_engine, adapters_dir):
    replicas = await fakes(2)
    engine = await make_engine(*replicas)
    for replica in replicas:
        assert replica.adapters == {"legal__v1": str((adapters_dir / "legal" / "v1").resolve()),
                                    "medical__v1": str((adapters_dir / "medical" / "v1").resolve())}
    status = engine.status()
    assert status.ready and status.backend == "vllm"
    assert [(r.name, r.state, r.adapters) for r in status.replicas] == [(f.url, "ready", 2) for f in replicas]
    catalog = engine.modes()
    assert [(a.name, a.current) for a in catalog.adapters] == [("legal", "v1"), ("medical", "v1")]
    assert catalog.role("lawyer") is not None


async def test_vllm_adapters_dir_is_where_the_replicas_find_the_versions(fakes, make_engine, adapters_dir):
    (replica,) = await fakes(1, path_map=("/srv/shared/adapters", adapters_dir))
    engine = await make_engine(replica, vllm_adapters_dir="/srv/shared/adapters")
    assert replica.adapters["legal__v1"] == "/srv/shared/adapters/legal/v1"
    assert "vllm-1:legal__v1" in "".join(await collect(engine.generate([Message("user", "q")], Mode("legal"))))


@pytest.mark.parametrize(("fake_kw", "vllm_kw", "expected"), [
    ({"model": "meta-llama/Llama-3.1-8B-Instruct"}, {}, "--served-model-name HuggingFaceTB/SmolLM2-135M-Instruct"),
    ({"max_model_len": 1024}, {}, "--max-model-len 2048"),
    ({"runtime_lora": False}, {}, "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"),
    ({"enable_lora": False}, {}, "LoRA is not enabled"),
    ({"api_key": "s3cret"}, {"vllm_api_key": "wrong"}, "VLLM_API_KEY"),
])
async def test_start_fails_naming_what_to_change_when_no_replica_can_serve(fakes, make_engine, fake_kw, vllm_kw,
                                                                             expected):
    (replica,) = await fakes(1, **fake_kw)
    with pytest.raises(EngineError, match="no vLLM replica can serve this bot") as err:
        await make_engine(replica, **vllm_kw)
    assert expected in str(err.value)


async def test_a_bad_replica_is_left_out_and_the_good_ones_serve(fakes, make_engine):
    good, = await fakes(1)
    bad, = await fakes(1, model="another/model")
    engine = await make_engine(good, bad)
    states = {r.name: (r.state, r.error) for r in engine.status().replicas}
    assert states[good.url] == ("ready", None)
    assert states[bad.url][0] == "incompatible" and "another/model" in states[bad.url][1]
    assert engine.status().ready
    assert bad.completions == [] and bad.adapters == {}


async def test_the_api_key_is_sent_as_a_bearer_token(fakes, make_engine):
    (replica,) = await fakes(1, api_key="s3cret")
    engine = await make_engine(replica, vllm_api_key="s3cret")
    assert "legal__v1" in "".join(await collect(engine.generate([Message("user", "q")], Mode("legal"))))


async def test_an_adapter_above_the_replicas_max_lora_rank_is_refused_and_the_others_serve(fakes, make_engine,
                                                                                            adapters_dir):
    write_adapter(adapters_dir, "finance", r=32, seed=2)
    (replica,) = await fakes(1, max_lora_rank=16)
    engine = await make_engine(replica)
    assert set(replica.adapters) == {"legal__v1", "medical__v1"}
    finance = engine.modes().adapter("finance")
    assert finance.current is None and "LoRA rank 32 is greater than max_lora_rank 16" in finance.error
    assert "--max-lora-rank 32 or more" in finance.error
    with pytest.raises(AdapterInvalid, match="max_lora_rank"):
        await collect(engine.generate([Message("user", "q")], Mode("finance")))
    assert engine.status().replicas[0].state == "ready"


async def test_an_adapter_for_another_base_model_is_refused_locally(fakes, make_engine, adapters_dir):
    write_adapter(adapters_dir, "finance", base_model="Qwen/Qwen2.5-0.5B-Instruct")
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    assert "Qwen/Qwen2.5-0.5B-Instruct" in engine.modes().adapter("finance").error
    assert not any(name.startswith("finance") for name, _, _ in replica.loads)


async def test_without_a_reachable_replica_it_starts_not_ready_and_serves_once_one_comes(fakes, make_engine):
    (replica,) = await fakes(1)
    await replica.stop()
    engine = await make_engine(replica, vllm_health_interval_s=0.05)
    assert not engine.status().ready and engine.status().replicas[0].state == "down"
    with pytest.raises(EngineBusy, match="no vLLM replica"):
        await collect(engine.generate([Message("user", "q")], Mode("legal")))
    await replica.start()
    await replica.wait_for(lambda: {"legal__v1", "medical__v1"} <= set(replica.adapters))
    while not engine.status().ready:
        await asyncio.sleep(0.02)
    assert "vllm-1:legal__v1" in "".join(await collect(engine.generate([Message("user", "q")], Mode("legal"))))


# ---- versions: promotion, rollback, unloading ----------------------------------------------------


async def test_promotion_registers_on_every_replica_before_requests_switch(fakes, make_engine, adapters_dir):
    a, b = await fakes(2)
    engine = await make_engine(a, b)
    write_adapter(adapters_dir, "legal", "v2", current=False, seed=5)
    gate = asyncio.Event()
    b.load_gate = gate  # replica b takes its time loading
    promotion = asyncio.create_task(engine.training.promote("legal", "v2"))
    await a.wait_for(lambda: "legal__v2" in a.adapters)
    await b.wait_for(lambda: b.load_waiting)
    # a has v2, b not yet: new requests still get v1, wherever they land
    for _ in range(4):
        stream = engine.generate([Message("user", "q")], Mode("legal"))
        await collect(stream)
        assert stream.result.adapter_version == "v1"
    assert {c.model for c in a.completions + b.completions} == {"legal__v1"}
    gate.set()
    assert await promotion == "v2"
    assert "legal__v2" in a.adapters and "legal__v2" in b.adapters
    for _ in range(2):
        stream = engine.generate([Message("user", "q")], Mode("legal"))
        await collect(stream)
        assert stream.result.adapter_version == "v2"
    assert "legal__v1" not in a.adapters and "legal__v1" not in b.adapters  # nobody used it any more
    assert engine.modes().adapter("legal").current == "v2"
    assert (adapters_dir / "legal" / "current").read_text().strip() == "v2"


async def test_a_version_one_replica_refuses_is_not_switched_to_anywhere(fakes, make_engine, adapters_dir):
    a, = await fakes(1)
    b, = await fakes(1, max_lora_rank=8)
    engine = await make_engine(a, b)
    write_adapter(adapters_dir, "legal", "v2", current=False, r=16, seed=5)
    with pytest.raises(AdapterInvalid, match="greater than max_lora_rank 8"):
        await engine.training.promote("legal", "v2")
    assert "legal__v2" not in a.adapters and "legal__v2" not in b.adapters  # a's copy taken back
    assert engine.modes().adapter("legal").current == "v1"
    assert (adapters_dir / "legal" / "current").read_text().strip() == "v1"  # the promotion was undone
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    await collect(stream)
    assert stream.result.adapter_version == "v1"


async def test_the_old_version_is_unloaded_only_after_its_requests_end(fakes, make_engine, adapters_dir):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    reply = replica.script("still on the old version", stepped=True)
    running = engine.generate([Message("user", "q")], Mode("legal"))
    first = await running.__anext__()
    write_adapter(adapters_dir, "legal", "v2", seed=5)
    report = await engine.reload("legal")
    assert report.loaded == {"legal": "v2"}
    fresh = engine.generate([Message("user", "q")], Mode("legal"))
    await collect(fresh)
    assert fresh.result.adapter_version == "v2"
    assert "legal__v1" in replica.adapters  # its request is still streaming
    assert ("legal__v1", 200) not in replica.unloads
    assert {a.version: a.state for a in engine.status().adapters if a.name == "legal"} == {"v1": "retired",
                                                                                            "v2": "ready"}
    reply.allow(10)
    rest = await collect(running)
    assert first + "".join(rest) == "still on the old version" and running.result.adapter_version == "v1"
    await replica.wait_for(lambda: "legal__v1" not in replica.adapters)
    assert ("legal__v1", 200) in replica.unloads


async def test_rollback_goes_back_through_the_replicas(fakes, make_engine, adapters_dir):
    a, b = await fakes(2)
    engine = await make_engine(a, b)
    write_adapter(adapters_dir, "legal", "v2", seed=5)
    assert (await engine.reload("legal")).loaded == {"legal": "v2"}
    assert await engine.training.rollback("legal") == "v1"
    for replica in (a, b):
        await replica.wait_for(lambda r=replica: "legal__v1" in r.adapters and "legal__v2" not in r.adapters)
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    await collect(stream)
    assert stream.result.adapter_version == "v1"


async def test_a_rollback_while_the_old_version_still_streams_revives_it_in_place(fakes, make_engine, adapters_dir):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    reply = replica.script("long answer on v1", stepped=True)
    running = engine.generate([Message("user", "q")], Mode("legal"))
    await running.__anext__()
    write_adapter(adapters_dir, "legal", "v2", seed=5)
    await engine.reload("legal")
    loads = [name for name, _, _ in replica.loads]
    assert await engine.training.rollback("legal") == "v1"
    assert [name for name, _, _ in replica.loads] == loads  # still registered: nothing loaded again
    await replica.wait_for(lambda: "legal__v2" not in replica.adapters)
    reply.allow(10)
    await collect(running)
    fresh = engine.generate([Message("user", "q")], Mode("legal"))
    await collect(fresh)
    assert fresh.result.adapter_version == "v1" and "legal__v1" in replica.adapters
    assert ("legal__v1", 200) not in replica.unloads


async def test_reload_of_an_unchanged_version_touches_no_replica(fakes, make_engine):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    loads = len(replica.loads)
    report = await engine.reload()
    assert report.unchanged == {"legal": "v1", "medical": "v1"} and not report.loaded and not report.failed
    assert len(replica.loads) == loads


# ---- several replicas: spreading, failover, busy -------------------------------------------------


async def test_requests_go_to_the_replica_with_fewest_in_flight(fakes, make_engine):
    a, b = await fakes(2)
    engine = await make_engine(a, b)
    held = []
    for _ in range(4):
        gate = asyncio.Event()
        for replica in (a, b):
            replica.script(gate=gate)
        stream = engine.generate([Message("user", "q")], Mode("legal"))
        task = asyncio.create_task(collect(stream))
        held.append((gate, task))
        await asyncio.wait_for(_until(lambda n=len(held): len(a.completions) + len(b.completions) == n), 30)
    assert (len(a.completions), len(b.completions)) == (2, 2)
    assert [r.in_flight for r in engine.status().replicas] == [2, 2]
    for gate, task in held:
        gate.set()
        await task
    assert [r.in_flight for r in engine.status().replicas] == [0, 0]


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("failure", ["down", "503", "stall", "dropped", "restarted-between-looks"])
async def test_a_replica_failing_before_the_first_token_is_replaced_by_another(fakes, make_engine, failure):
    a, b = await fakes(2)
    engine = await make_engine(a, b, vllm_first_token_timeout_s=1.0)
    if failure == "down":
        await a.stop()
    elif failure == "503":
        a.fail("/v1/completions", 503)
    elif failure == "stall":
        a.hold()
    elif failure == "dropped":
        a.script(drop_after=0)
    elif failure == "restarted-between-looks":
        a.forget()
        a.fail("/v1/load_lora_adapter", 503, times=5)  # and cannot take its adapters back yet
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    text = "".join(await collect(stream))
    assert text.startswith("vllm-2:legal__v1") and stream.result.finish_reason == "stop"
    (state_a, state_b) = engine.status().replicas
    assert state_a.state == "down" and state_a.failures == 1 and state_a.error
    assert state_b.state == "ready"
    stream = engine.generate([Message("user", "q")], Mode("legal"))  # a stays out for now
    assert "".join(await collect(stream)).startswith("vllm-2:")


async def test_a_replica_failing_mid_answer_is_taken_out_and_another_continues_the_answer(fakes, make_engine):
    a, b = await fakes(2)
    engine = await make_engine(a, b)
    reply = a.script("one two three", drop_after=2, stepped=True)  # stepped: the test reads each piece first
    b.script(pieces=[" three", " four"])
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    got = [await stream.__anext__()]
    reply.allow()
    got.append(await stream.__anext__())
    reply.allow()
    got += [piece async for piece in stream]
    assert got == ["one", " two", " three", " four"] and stream.result.text == "one two three four"
    assert stream.result.finish_reason == "stop" and stream.result.completion_tokens == 4
    assert stream.replicas_used == [a.url, b.url]
    (first,), (rest,) = a.completions, b.completions
    sent_ids = [1000 + (len(first.prompt) + i) % 1000 for i in range(2)]  # the fake's token ids of "one two"
    assert rest.model == "legal__v1" and rest.prompt == first.prompt + sent_ids
    assert rest.body["max_tokens"] == first.body["max_tokens"] - 2
    assert [r.state for r in engine.status().replicas] == ["down", "ready"]


async def test_a_replica_failing_mid_answer_with_none_left_ends_the_answer_keeping_the_pieces(fakes, make_engine):
    (a,) = await fakes(1)
    engine = await make_engine(a)
    reply = a.script("one two three", drop_after=2, stepped=True)
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    got = [await stream.__anext__()]
    reply.allow(2)
    with pytest.raises(EngineError, match="broke off.*no other replica could continue it"):
        async for piece in stream:
            got.append(piece)
    assert got == ["one", " two"] and stream.result.text == "one two" and stream.result.finish_reason == "error"


@pytest.mark.parametrize("how", ["all down", "all full"])
async def test_busy_when_no_replica_is_left(fakes, make_engine, how):
    a, b = await fakes(2)
    engine = await make_engine(a, b, vllm_max_in_flight=1)
    held = []
    if how == "all down":
        await a.stop()
        await b.stop()
    else:
        gate = asyncio.Event()
        for _ in range(2):
            for replica in (a, b):
                replica.script(gate=gate)
            stream = engine.generate([Message("user", "q")], Mode())
            held.append(asyncio.create_task(collect(stream)))
        await asyncio.wait_for(_until(lambda: len(a.completions) + len(b.completions) == 2), 30)
    with pytest.raises(EngineBusy, match="no vLLM replica can take the request now") as err:
        await collect(engine.generate([Message("user", "q")], Mode()))
    assert ("down" if how == "all down" else "VLLM_MAX_IN_FLIGHT=1") in str(err.value)
    if held:
        gate.set()
        await asyncio.gather(*held)


# ---- restarts ------------------------------------------------------------------------------------


async def test_a_restarted_replica_is_registered_again_when_seen(fakes, make_engine):
    a, b = await fakes(2)
    engine = await make_engine(a, b, vllm_health_interval_s=0.05)
    await a.restart()
    assert a.adapters == {}
    await a.wait_for(lambda: set(a.adapters) == {"legal__v1", "medical__v1"})
    await _wait_ready(engine, 2)
    assert [c.model for c in a.completions] == []
    stream = engine.generate([Message("user", "q")], Mode("medical"))
    assert "medical__v1" in "".join(await collect(stream))


async def _wait_ready(engine, n: int) -> None:
    await asyncio.wait_for(_until(lambda: sum(r.state == "ready" for r in engine.status().replicas) == n), 30)


async def test_a_request_that_finds_its_adapter_gone_registers_it_again_and_is_answered(fakes, make_engine):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    replica.forget()  # restarted between two health checks
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    assert "".join(await collect(stream)).startswith("vllm-1:legal__v1")
    assert set(replica.adapters) == {"legal__v1", "medical__v1"}
    assert engine.status().replicas[0].state == "ready"


async def test_a_replica_that_went_down_serves_again_after_the_retry_delay(fakes, make_engine):
    a, b = await fakes(2)
    engine = await make_engine(a, b, vllm_health_interval_s=0.05, vllm_retry_after_s=0.2)
    a.fail("/v1/completions", 500)
    await collect(engine.generate([Message("user", "q")], Mode()))
    assert engine.status().replicas[0].state == "down"
    await _wait_ready(engine, 2)
    assert engine.status().replicas[0].failures == 1


# ---- cancelling and closing ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["aclose", "task cancelled"])
async def test_cancelling_closes_the_http_stream_and_the_replica_aborts(fakes, make_engine, how):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    replica.script("a long answer that nobody waits for", stepped=True)
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    assert await stream.__anext__() == "a"
    if how == "aclose":
        await stream.aclose()
    else:
        task = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await replica.wait_for(lambda: replica.completions[0].aborted)
    assert not replica.completions[0].finished
    assert stream.result.finish_reason == "cancelled" and stream.result.text == "a"
    assert engine.status().active_requests == 0
    assert [a.in_flight for a in engine.status().adapters] == [0, 0]


async def test_close_cancels_running_streams(fakes, make_engine):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    replica.script("x y z", stepped=True)
    stream = engine.generate([Message("user", "q")], Mode())
    await stream.__anext__()
    await engine.close()
    await replica.wait_for(lambda: replica.completions[0].aborted)
    assert stream.result.finish_reason == "cancelled"
    assert not engine.status().ready


# ---- status and metrics --------------------------------------------------------------------------


async def test_metrics_show_each_replica_and_the_requests(fakes, make_engine):
    a, b = await fakes(2)
    engine = await make_engine(a, b)
    await b.stop()
    for _ in range(2):
        await collect(engine.generate([Message("user", "q")], Mode("legal")))
    text = generate_latest(engine.metrics.registry).decode()
    assert f'llm_replica_up{{replica="{a.url}"}} 1.0' in text
    assert f'llm_replica_up{{replica="{b.url}"}} 0.0' in text
    assert f'llm_replica_state{{replica="{b.url}",state="down"}} 1.0' in text
    assert f'llm_replica_requests_total{{outcome="ok",replica="{a.url}"}} 2.0' in text
    assert 'llm_requests_total{adapter="legal",outcome="stop"} 2.0' in text
    assert f'llm_replica_adapter_loads_total{{outcome="ok",replica="{a.url}"}} 2.0' in text


def test_vllm_settings_read_the_environment_and_name_bad_values(monkeypatch, tmp_path):
    from engine.errors import ConfigError
    from engine.vllm.config import load_vllm_settings

    monkeypatch.setenv("VLLM_URLS", "http://vllm-1:8000/v1, http://vllm-2:8000/")
    monkeypatch.setenv("VLLM_API_KEY", "tok-9f3a")
    s = load_vllm_settings(_env_file=None)
    assert s.vllm_urls == ("http://vllm-1:8000", "http://vllm-2:8000") and s.api_key == "tok-9f3a"
    assert "tok-9f3a" not in repr(s)
    for name, value in [("VLLM_URLS", "vllm:8000"), ("VLLM_FIRST_TOKEN_TIMEOUT_S", "0"),
                        ("VLLM_URLS", "http://a:1,http://a:1")]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=name):
            load_vllm_settings(_env_file=None)
        monkeypatch.delenv(name)


def test_the_vllm_backend_without_urls_says_what_to_set(monkeypatch):
    from engine.config import load_settings
    from engine.errors import ConfigError
    from engine.vllm.config import load_vllm_settings
    from engine.vllm.engine import VllmEngine

    with pytest.raises(ConfigError, match="VLLM_URLS"):
        VllmEngine(load_settings(_env_file=None), load_vllm_settings(_env_file=None))


def test_importing_the_backend_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, engine.vllm.engine, engine.vllm; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


# ---- what the fake long hid (issue 30): each fails against the backend before its fix -----------


@pytest.mark.parametrize("refusal", [
    "temperature must be in [0, 2], got 3.0. (parameter=temperature, value=3.0)",  # releases that validate lazily
    "token_id(s) [49152] in stop_token_ids contain out-of-vocab token ids. Vocabulary size: 49152",
])
async def test_a_4xx_inside_the_stream_fails_that_request_and_takes_no_replica_out(fakes, make_engine, refusal):
    a, b = await fakes(2)
    engine = await make_engine(a, b)
    for replica in (a, b):
        replica.script(fail_after=0, fail_status=400, fail_message=refusal)
    with pytest.raises(EngineError, match="refused the request") as err:
        await collect(engine.generate([Message("user", "q")], Mode("legal")))
    assert refusal in str(err.value)
    assert len(a.completions) + len(b.completions) == 1  # the request's fault: not tried elsewhere
    assert [r.state for r in engine.status().replicas] == ["ready", "ready"]
    a.replies.clear()
    b.replies.clear()
    assert "vllm-" in "".join(await collect(engine.generate([Message("user", "q")], Mode("legal"))))


async def test_a_transient_engine_error_loading_an_adapter_is_retried_not_taken_as_a_refusal(fakes, make_engine):
    (replica,) = await fakes(1)
    replica.fail("/v1/load_lora_adapter", 500, message="Call to add_lora method failed: Worker failed with error "
                 "'EngineCore RPC timed out', please check the stack trace above for the root cause")
    engine = await make_engine(replica)
    assert set(replica.adapters) == {"legal__v1", "medical__v1"}
    assert [(a.name, a.current, a.error) for a in engine.modes().adapters] == [("legal", "v1", None),
                                                                               ("medical", "v1", None)]
    assert "vllm-1:legal__v1" in "".join(await collect(engine.generate([Message("user", "q")], Mode("legal"))))


async def test_an_engine_error_that_stays_leaves_the_version_off_that_replica_and_is_retried(fakes, make_engine):
    a, b = await fakes(2, )
    a.fail("/v1/load_lora_adapter", 500, times=3, message="Call to add_lora method failed: Worker failed with "
           "error 'EngineCore RPC timed out', please check the stack trace above for the root cause")
    engine = await make_engine(a, b, vllm_health_interval_s=0.05)
    assert engine.modes().adapter("legal").current == "v1"  # not refused: it serves from b meanwhile
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    await collect(stream)
    assert stream.replica_url == b.url
    await a.wait_for(lambda: {"legal__v1", "medical__v1"} <= set(a.adapters))  # the health check tried again
    assert [r.state for r in engine.status().replicas] == ["ready", "ready"]


async def test_a_promotion_failing_on_an_engine_error_keeps_the_old_version_and_no_replica_out(
        fakes, make_engine, adapters_dir):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    write_adapter(adapters_dir, "legal", "v2", current=False, seed=5)
    replica.fail("/v1/load_lora_adapter", 500, times=3, message="Call to add_lora method failed: boom")
    with pytest.raises(AdapterInvalid, match="/reload legal tries again"):
        await engine.training.promote("legal", "v2")
    assert engine.modes().adapter("legal").current == "v1" and engine.status().replicas[0].state == "ready"
    assert (await engine.reload("legal")).failed == {}  # the admin tries again: it goes through
    assert engine.modes().adapter("legal").current == "v1"  # reload follows `current`, which the promotion undid


def test_temperature_is_bounded_as_vllm_bounds_it():
    from engine.config import load_settings
    from engine.errors import ConfigError

    assert load_settings(_env_file=None, temperature=2.0).temperature == 2.0
    with pytest.raises(ConfigError, match="TEMPERATURE"):
        load_settings(_env_file=None, temperature=2.5)


@pytest.mark.parametrize("message", [
    "You passed 2100 input tokens and requested 32 output tokens. However, the model's context length is only "
    "2048 tokens, resulting in a maximum input length of 2016 tokens. Please reduce the length of the input prompt.",
    "This model's maximum context length is 2048 tokens. However, your prompt contains 2100 input tokens, which "
    "exceeds this limit even without any output tokens. Please reduce the length of the input prompt.",
    "The decoder prompt (length 2100) is longer than the maximum model length of 2048. Make sure that "
    "`max_model_len` is no smaller than the number of text tokens.",
])
async def test_every_wording_of_a_prompt_too_long_is_told_as_too_long(fakes, make_engine, message):
    from engine.errors import InputTooLong

    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    replica.fail("/v1/completions", 400, message=message)
    with pytest.raises(InputTooLong, match="refused the prompt"):
        await collect(engine.generate([Message("user", "q")], Mode()))
    assert engine.status().replicas[0].state == "ready"


async def test_ignore_eos_is_forwarded_and_our_stop_ids_are_left_out(fakes, make_engine):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    await collect(engine.generate([Message("user", "q")], Mode(), GenerationParams(ignore_eos=True)))
    await collect(engine.generate([Message("user", "q")], Mode()))
    fixed, normal = (c.body for c in replica.completions)
    assert fixed["ignore_eos"] is True and fixed["stop_token_ids"] == []  # vLLM stops on stop ids regardless
    assert "ignore_eos" not in normal and normal["stop_token_ids"] == engine.stop_token_ids


@pytest.mark.parametrize("when", ["at start", "restarted without it"])
async def test_a_replica_without_lora_is_left_out_and_the_adapter_is_not_blamed(fakes, make_engine, adapters_dir,
                                                                              when):
    import shutil

    shutil.rmtree(adapters_dir)
    adapters_dir.mkdir()  # nothing to register at start: both replicas take requests
    good, = await fakes(1)
    bare, = await fakes(1, enable_lora=(when != "at start"))
    engine = await make_engine(good, bare)
    assert [r.state for r in engine.status().replicas] == ["ready", "ready"]
    bare.enable_lora = False
    write_adapter(adapters_dir, "legal", "v1", current=False)
    assert await engine.training.promote("legal", "v1") == "v1"  # the version is fine: it goes live
    states = {r.name: (r.state, r.error) for r in engine.status().replicas}
    assert states[good.url] == ("ready", None)
    assert states[bare.url][0] == "incompatible" and "--enable-lora" in states[bare.url][1]
    assert engine.modes().adapter("legal").current == "v1" and engine.modes().adapter("legal").error is None
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    assert "legal__v1" in "".join(await collect(stream)) and stream.replica_url == good.url


async def test_history_tokens_and_template_limits_apply_as_in_the_local_engine(fakes, make_engine, tokenizer,
                                                                              tmp_path):
    from engine.config import load_settings
    from engine.prompts import PromptMaker, load_templates

    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "assistant.j2").write_text("You are a helpful assistant.\n", encoding="utf-8")
    (templates / "poet.j2").write_text("{{ 'Write verse. ' * 40 }}\n", encoding="utf-8")  # 600 chars
    knobs = {"history_tokens": 64, "template_max_chars": 200, "templates_dir": templates}
    (replica,) = await fakes(1)
    engine = await make_engine(replica, engine=knobs)
    paste = "Please review this contract: " + "clause " * 300
    history = [Message("user", paste), Message("assistant", "It looks fine."), Message("user", "And the deposit?")]
    for role in ("assistant", "poet"):
        stream = engine.generate(history, Mode(None, role), GenerationParams(max_new_tokens=32))
        await collect(stream)
        assert stream.result.trimmed_turns == 2  # the long paste is over HISTORY_TOKENS
    settings = load_settings(_env_file=None, model_cache_dir=REPO / "models", max_new_tokens=32, **knobs)
    local = PromptMaker(load_templates(settings), tokenizer, settings)  # what engine.Engine builds prompts with
    for request, role in zip(replica.completions, ("assistant", "poet")):
        assert request.prompt == local.build(role, None, history, 32)[0]
    assert tokenizer.decode(replica.completions[1].prompt).count("Write verse") == 0  # over TEMPLATE_MAX_CHARS
    assert len(replica.completions[0].prompt) < 100


# ---- operators' controls (issue 27): held versions, pinned requests, the audit stamp --------------


async def test_hold_registers_the_candidate_on_every_replica_and_a_pinned_request_uses_it(fakes, make_engine,
                                                                                        adapters_dir):
    a, b = await fakes(2)
    engine = await make_engine(a, b)
    write_adapter(adapters_dir, "legal", "v2", current=False, seed=5)
    resident = await engine.hold("legal", ("v2",))
    assert [(r.name, r.version, r.state) for r in resident] == [("legal", "v2", "ready")]
    for replica in (a, b):
        assert set(replica.adapters) == {"legal__v1", "legal__v2", "medical__v1"}
    legal = engine.modes().adapter("legal")
    assert legal.current == "v1"
    assert {v.version: v.state for v in legal.versions} == {"v1": "ready", "v2": "ready"}
    pinned = engine.generate([Message("user", "q")], Mode("legal"), GenerationParams(adapter_version="v2"))
    assert "legal__v2" in "".join(await collect(pinned))
    assert pinned.result.adapter_version == "v2"
    serving = engine.generate([Message("user", "q")], Mode("legal"))
    await collect(serving)
    assert serving.result.adapter_version == "v1"
    assert [c.body["model"] for c in a.completions + b.completions] == ["legal__v2", "legal__v1"]
    assert [a.in_flight for a in engine.status().adapters] == [0, 0, 0]
    assert await engine.hold("legal", ("v2",)) == resident  # idempotent: nothing loaded again
    assert len(a.loads) == len(b.loads) == 3


async def test_hold_of_nothing_unloads_the_candidate_and_keeps_the_serving_version(fakes, make_engine, adapters_dir):
    a, b = await fakes(2)
    engine = await make_engine(a, b)
    write_adapter(adapters_dir, "legal", "v2", current=False, seed=5)
    await engine.hold("legal", ("v2",))
    assert await engine.hold("legal", ()) == ()
    for replica in (a, b):
        assert set(replica.adapters) == {"legal__v1", "medical__v1"} and ("legal__v2", 200) in replica.unloads
    assert [(x.name, x.version) for x in engine.status().adapters] == [("legal", "v1"), ("medical", "v1")]
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    await collect(stream)
    assert stream.result.adapter_version == "v1"


async def test_a_candidate_let_go_while_a_pinned_request_runs_leaves_after_that_request(fakes, make_engine,
                                                                                     adapters_dir):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    write_adapter(adapters_dir, "legal", "v2", current=False, seed=5)
    await engine.hold("legal", ("v2",))
    reply = replica.script("an answer from the candidate", stepped=True)
    running = engine.generate([Message("user", "q")], Mode("legal"), GenerationParams(adapter_version="v2"))
    await running.__anext__()
    await engine.hold("legal", ())
    assert "legal__v2" in replica.adapters  # its request still streams
    reply.allow(10)
    await collect(running)
    await replica.wait_for(lambda: "legal__v2" not in replica.adapters)


async def test_a_pinned_version_not_held_is_registered_for_the_request_and_unloaded_after(fakes, make_engine,
                                                                                       adapters_dir):
    a, b = await fakes(2)
    engine = await make_engine(a, b)
    write_adapter(adapters_dir, "legal", "v2", current=False, seed=5)
    stream = engine.generate([Message("user", "q")], Mode("legal"), GenerationParams(adapter_version="v2"))
    assert "legal__v2" in "".join(await collect(stream))
    assert stream.result.adapter_version == "v2"
    assert all(("legal__v2", str((adapters_dir / "legal" / "v2").resolve()), 200) in r.loads for r in (a, b))
    for replica in (a, b):
        await replica.wait_for(lambda r=replica: "legal__v2" not in r.adapters)
    assert engine.modes().adapter("legal").current == "v1"
    assert [(x.name, x.version) for x in engine.status().adapters] == [("legal", "v1"), ("medical", "v1")]


async def test_held_versions_survive_promotion_of_another_version_and_reload(fakes, make_engine, adapters_dir):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    write_adapter(adapters_dir, "legal", "v2", current=False, seed=5)
    write_adapter(adapters_dir, "legal", "v3", current=False, seed=6)
    await engine.hold("legal", ("v2",))
    assert await engine.training.promote("legal", "v3") == "v3"
    await engine.reload()
    await replica.wait_for(lambda: "legal__v1" not in replica.adapters)  # the old serving one goes
    assert {"legal__v2", "legal__v3"} <= set(replica.adapters)
    pinned = engine.generate([Message("user", "q")], Mode("legal"), GenerationParams(adapter_version="v2"))
    assert "legal__v2" in "".join(await collect(pinned))
    # promoting the held version itself: it serves, and is no longer held beside itself
    assert await engine.training.promote("legal", "v2") == "v2"
    await replica.wait_for(lambda: "legal__v3" not in replica.adapters)
    assert await engine.hold("legal", ()) == ()
    assert {"legal__v2", "medical__v1"} == set(replica.adapters)


async def test_a_restarted_replica_gets_the_held_versions_back(fakes, make_engine, adapters_dir):
    a, b = await fakes(2)
    engine = await make_engine(a, b, vllm_health_interval_s=0.05)
    write_adapter(adapters_dir, "legal", "v2", current=False, seed=5)
    await engine.hold("legal", ("v2",))
    await a.restart()
    await a.wait_for(lambda: set(a.adapters) == {"legal__v1", "legal__v2", "medical__v1"})
    await _wait_ready(engine, 2)
    b.forget()  # restarted between two looks: a pinned request finds its version gone
    engine.fleet.replicas[0].in_flight = 10  # (route it to b)
    stream = engine.generate([Message("user", "q")], Mode("legal"), GenerationParams(adapter_version="v2"))
    assert "".join(await collect(stream)).startswith("vllm-2:legal__v2")
    engine.fleet.replicas[0].in_flight = 0
    assert "legal__v2" in b.adapters


@pytest.mark.parametrize("problem", ["missing", "not on disk", "corrupt", "refused by a replica"])
async def test_a_bad_candidate_is_refused_and_leaves_the_serving_version_and_the_held_set(fakes, make_engine,
                                                                                       adapters_dir, problem):
    a, = await fakes(1)
    b, = await fakes(1, max_lora_rank=8)
    engine = await make_engine(a, b)
    write_adapter(adapters_dir, "legal", "v2", current=False, seed=5)
    await engine.hold("legal", ("v2",))
    if problem == "corrupt":
        path = write_adapter(adapters_dir, "legal", "v3", current=False, seed=6)
        (path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    elif problem == "refused by a replica":
        write_adapter(adapters_dir, "legal", "v3", current=False, r=16, seed=6)  # above b's max_lora_rank
    elif problem == "not on disk":
        write_adapter(adapters_dir, "legal", "v3", current=False, seed=6)
    expected = AdapterNotFound if problem in ("missing", "not on disk") else AdapterInvalid
    name = "finance" if problem == "not on disk" else "legal"
    with pytest.raises(expected):
        await engine.hold(name, ("v2", "v3") if name == "legal" else ("v1",))
    with pytest.raises(expected):
        await collect(engine.generate([Message("user", "q")], Mode(name), GenerationParams(adapter_version="v3")
                                      if name == "legal" else GenerationParams(adapter_version="v1")))
    for replica in (a, b):
        assert set(replica.adapters) == {"legal__v1", "legal__v2", "medical__v1"}  # v3 taken back, v2 still held
    legal = engine.modes().adapter("legal")
    assert (legal.current, legal.error) == ("v1", None)
    assert [r.state for r in engine.status().replicas] == ["ready", "ready"]
    for version in ("v1", "v2"):
        stream = engine.generate([Message("user", "q")], Mode("legal"),
                                 GenerationParams(adapter_version=version if version == "v2" else None))
        assert f"legal__{version}" in "".join(await collect(stream))


async def test_a_pinned_version_needs_an_adapter_in_the_mode(fakes, make_engine):
    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    with pytest.raises(EngineError, match="needs an adapter"):
        await collect(engine.generate([Message("user", "q")], Mode(), GenerationParams(adapter_version="v1")))
    assert replica.completions == []


async def test_the_stamp_names_the_backend_the_replica_the_template_and_the_effective_sampling(
        fakes, make_engine, adapters_dir):
    from engine.model.fingerprint import fingerprint_model

    (replica,) = await fakes(1)
    engine = await make_engine(replica, engine={"temperature": 0.3, "top_k": 20})
    write_adapter(adapters_dir, "legal", "v2", current=False, seed=5)
    user = UserContext(first_name="Ann", language="ru")
    stream = engine.generate(HISTORY, Mode("legal", "lawyer"), GenerationParams(adapter_version="v2", seed=7,
                                                                             max_new_tokens=16), user=user)
    await collect(stream)
    stamp = stream.result.stamp
    system = engine.prompts.templates.system_prompt("lawyer", user)
    assert (stamp.backend, stamp.replica, stamp.adapter, stamp.adapter_version) == ("vllm", replica.url, "legal", "v2")
    assert (stamp.template, stamp.template_hash, stamp.template_language) == ("lawyer", system.sha256,
                                                                             system.language)
    assert (stamp.sampling.max_new_tokens, stamp.sampling.temperature, stamp.sampling.top_k, stamp.sampling.seed,
            stamp.sampling.top_p) == (16, 0.3, 20, 7, engine.settings.top_p)
    assert stamp.base_model == MODEL_ID and stamp.quantization is None
    assert stamp.base_fingerprint == fingerprint_model(str(REPO / "models" / "SmolLM2-135M-Instruct"))
    assert stamp.base_fingerprint.startswith("w1:")
    base = engine.generate([Message("user", "q")], Mode())
    await collect(base)
    assert (base.result.stamp.adapter, base.result.stamp.adapter_version, base.result.stamp.template) == \
        (None, None, "assistant")


async def test_the_stamp_names_the_replica_that_finished_an_answer_continued_elsewhere(fakes, make_engine):
    a, b = await fakes(2)
    engine = await make_engine(a, b)
    reply = a.script("one two three", drop_after=2, stepped=True)
    b.script(pieces=[" three", " four"])
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    await stream.__anext__()
    assert stream.result.stamp.replica == a.url
    reply.allow(2)
    assert "".join(await collect(stream)) == " two three four"
    assert stream.replicas_used == [a.url, b.url] and stream.result.stamp.replica == b.url


async def test_a_held_version_a_restarted_replica_refuses_is_let_go_and_the_domain_keeps_serving(
        fakes, make_engine, adapters_dir):
    (replica,) = await fakes(1)
    engine = await make_engine(replica, vllm_health_interval_s=0.05)
    write_adapter(adapters_dir, "legal", "v2", current=False, r=8, seed=5)
    await engine.hold("legal", ("v2",))
    replica.max_lora_rank = 4  # restarted with a lower --max-lora-rank: the candidate no longer fits
    await replica.restart()
    await replica.wait_for(lambda: set(replica.adapters) == {"legal__v1", "medical__v1"})
    await _wait_ready(engine, 1)
    legal = engine.modes().adapter("legal")
    assert (legal.current, legal.error) == ("v1", None)
    assert {v.version: v.state for v in legal.versions} == {"v1": "ready", "v2": None}  # let go, not resident
    stream = engine.generate([Message("user", "q")], Mode("legal"))
    assert "legal__v1" in "".join(await collect(stream))


async def test_the_engine_gives_its_streams_everything_their_host_protocol_names(fakes, make_engine):
    """engine.vllm.stream sees the engine only through StreamHost (no import back into the engine
    module); a started VllmEngine must have every attribute and method it names."""
    import inspect

    from engine.vllm.stream import StreamHost

    (replica,) = await fakes(1)
    engine = await make_engine(replica)
    names = set(StreamHost.__annotations__) | {n for n, _ in inspect.getmembers(StreamHost, inspect.isfunction)
                                               if not n.startswith("_")}
    assert {"fleet", "lease", "stream_ended", "build_prompt"} <= names
    missing = sorted(n for n in names if not hasattr(engine, n))
    assert not missing, f"VllmEngine lacks {missing}"
    for n in names:
        if inspect.isfunction(getattr(StreamHost, n, None)):
            assert inspect.iscoroutinefunction(getattr(StreamHost, n)) == \
                inspect.iscoroutinefunction(getattr(engine, n)), n
