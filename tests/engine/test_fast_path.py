"""The fast serving path equals the reference path token for token (greedy, fp32, the real
default model): a batch mixing the base model and three adapters, prompts of different
lengths prefilled in chunks, rows joining and leaving mid-stream, and a version hot-loaded
mid-stream. The reference is the serial oracle (`engine.reference`, `SERVING_RUNTIME=reference`):
transformers + peft, one request at a time."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import pytest_asyncio

from engine import Engine, GenerationParams, Message, Mode
from engine.adapters.store import AdapterStore
from engine.config import load_settings
from tests.engine.test_engine_integration import scaled_copy

pytestmark = [pytest.mark.model, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parents[2]
GREEDY = GenerationParams(max_new_tokens=20, temperature=0)
LONG_QUESTION = (
    "I rent a flat in a big city. The landlord wants to raise the rent by a third, says the heating "
    "costs went up, and asks me to sign a new contract within a week or move out at the end of the "
    "month. The old contract runs for another eight months and says nothing about heating. What can I do, "
    "and which papers should I keep?"
)
CASES = [  # mode, question, max_new_tokens
    (Mode(None, "assistant"), "What is a contract?", 20),
    (Mode("legal", "lawyer"), LONG_QUESTION, 20),
    (Mode("medical", "doctor"), "How much water should I drink a day?", 8),  # leaves early
    (Mode("finance", "financial_analyst"), "Should I pay off my credit card or save first?", 20),
    (Mode("legal", "assistant"), "Can my landlord keep my deposit?", 20),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fast")
    for domain in ("legal", "medical", "finance"):
        (root / "adapters" / domain).mkdir(parents=True)
        shutil.copytree(ROOT / "adapters" / domain / "v1", root / "adapters" / domain / "v1")
        (root / "adapters" / domain / "current").write_text("v1\n")
    shutil.copytree(ROOT / "templates", root / "templates")
    return root


def settings(workdir: Path, runtime: str, **extra):
    return load_settings(
        adapters_dir=workdir / "adapters", templates_dir=workdir / "templates", model_cache_dir=ROOT / "models",
        quantization="none", compute_dtype="float32", serving_runtime=runtime, context_tokens=512,
        max_batch_size=8, template_poll_s=0, **extra,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(workdir: Path):
    fast = Engine(settings(workdir, "fast", prefill_chunk_tokens=24))
    ref = Engine(settings(workdir, "reference"))
    await fast.start()
    await ref.start()
    assert (fast.runtime_kind, ref.runtime_kind) == ("fast", "reference")
    yield fast, ref
    await fast.close()
    await ref.close()


async def answer(engine: Engine, mode: Mode, question: str, max_new: int = 20) -> tuple[str, object]:
    stream = engine.generate([Message("user", question)], mode, GenerationParams(max_new_tokens=max_new, temperature=0))
    text = "".join([p async for p in stream])
    return text, stream.result


async def test_mixed_batch_with_joins_and_leaves_equals_the_reference(engines) -> None:
    fast, ref = engines
    expected = [(await answer(ref, m, q, n))[0] for m, q, n in CASES]
    assert len(set(expected)) == len(expected)

    async def run(i: int, started: asyncio.Event | None = None) -> str:
        m, q, n = CASES[i]
        stream = fast.generate([Message("user", q)], m, GenerationParams(max_new_tokens=n, temperature=0))
        pieces = []
        async for p in stream:
            pieces.append(p)
            if started is not None and len(pieces) == 3:
                started.set()
        assert stream.result.finish_reason == "length" or len(pieces) < n
        return "".join(pieces)

    first = asyncio.Event()
    early = [asyncio.create_task(run(0, first)), asyncio.create_task(run(2))]
    await first.wait()  # rows 0 and 2 are decoding; the rest join mid-stream
    late = [asyncio.create_task(run(i)) for i in (1, 3, 4)]
    got = await asyncio.gather(*early, *late)
    assert [got[0], got[2], got[3], got[4], got[1]] == [expected[i] for i in (0, 1, 3, 4, 2)]
    assert fast.status().active_requests == 0


async def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(engines) -> None:
    """A running stream keeps getting tokens while a long prompt is prefilled chunk by chunk."""
    fast, _ = engines
    running = fast.generate([Message("user", "Tell me a long story about a cat.")], Mode(None, "assistant"),
                            GenerationParams(max_new_tokens=60, temperature=0, ignore_eos=True))
    await running.__anext__()
    before = fast.scheduler.steps
    long_text, long_res = await answer(fast, Mode("finance", "lawyer"), LONG_QUESTION, 1)  # a mode not seen yet
    chunks = -(-(long_res.prompt_tokens - long_res.cached_prompt_tokens) // fast.scheduler.chunk_tokens)
    assert chunks >= 4
    assert fast.scheduler.steps - before >= chunks - 1  # a decode step after every chunk
    await running.aclose()


async def test_hot_load_mid_stream_keeps_the_stream_and_serves_the_new_version(engines, workdir: Path) -> None:
    fast, ref = engines
    store = AdapterStore(workdir / "adapters")
    mode, question = Mode("legal", "assistant"), "What should I check before signing a rental contract?"
    v1_text, _ = await answer(ref, mode, question, 24)
    stream = fast.generate([Message("user", question)], mode, GenerationParams(max_new_tokens=24, temperature=0))
    pieces = [await stream.__anext__()]
    version = scaled_copy(store, "legal", workdir / "adapters/legal/v1", 3.0)
    store.set_current("legal", version)
    assert (await fast.reload("legal")).loaded == {"legal": version}
    assert (await ref.reload("legal")).loaded == {"legal": version}
    pieces += [p async for p in stream]
    assert "".join(pieces) == v1_text and stream.result.adapter_version == "v1"
    v2_fast, res = await answer(fast, mode, question, 24)
    v2_ref, _ = await answer(ref, mode, question, 24)
    assert res.adapter_version == version and v2_fast == v2_ref != v1_text
    fast.registry.wait_idle()
    resident = {(a.name, a.version) for a in fast.status().adapters}
    assert ("legal", "v1") not in resident and ("legal", version) in resident
    assert fast.runtime.lora.free_slots() == fast.runtime.lora.num_slots - 1 - 3  # v1's slot came back


async def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(engines) -> None:
    fast, _ = engines
    params = GenerationParams(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=1234)

    async def seeded() -> str:
        s = fast.generate([Message("user", "Give me a name for a dog.")], Mode("medical", "assistant"), params)
        return "".join([p async for p in s])

    alone = await seeded()
    crowd = await asyncio.gather(seeded(), *(answer(fast, m, q, 12) for m, q, _n in CASES[:3]))
    assert crowd[0] == alone


async def test_a_seed_gives_one_answer_on_both_paths(engines) -> None:
    """Both paths draw with one sampler (a row's noise is a hash of its seed, step and token),
    so a seeded request gets the same sampled answer from the fast path and from the oracle."""
    params = GenerationParams(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=40, seed=1234)
    got = []
    for engine in engines:
        stream = engine.generate([Message("user", "Give me a name for a dog.")], Mode("medical", "assistant"), params)
        got.append("".join([p async for p in stream]))
    assert got[0] == got[1] != ""


BURST = ["What should I eat before a long run?", "Is it bad to sleep after lunch?",
         "How often should I wash my hands?", "What helps against a sore throat?"]


async def test_a_burst_in_one_mode_computes_the_system_prompt_once(engines) -> None:
    """Four users of one mode at once: the first prefills the role's system prompt, the others
    wait for it, copy it from the prefix cache, and answer exactly as the reference does."""
    fast, ref = engines
    mode = Mode(None, "doctor")  # no earlier test used it: nothing of it is cached yet
    expected = [(await answer(ref, mode, q))[0] for q in BURST]
    got = await asyncio.gather(*(answer(fast, mode, q) for q in BURST))
    assert [text for text, _ in got] == expected
    cached = sorted(res.cached_prompt_tokens for _, res in got)
    prompts = [res.prompt_tokens for _, res in got]
    shared = 90  # the doctor template's system prompt: more than 90 tokens, the same for every question
    assert cached[0] < shared  # the one that computed it (it may share a few opening tokens with other roles)
    assert all(c >= shared for c in cached[1:]) and all(c < p for c, p in zip(cached, prompts))


async def test_a_follow_up_message_reuses_the_conversation_so_far(engines) -> None:
    """The next message of a conversation prefills only what is new: the earlier prompt and the
    answer (its own tokens, kept at the end of the answer) come from the prefix cache."""
    fast, ref = engines
    mode = Mode("medical", "financial_analyst")
    first = [Message("user", "I have a headache after work every day. What could it be?")]
    text, res1 = await answer(fast, mode, first[0].content)
    follow = first + [Message("assistant", text), Message("user", "And what if it is worse in the morning?")]
    stream = fast.generate(follow, mode, GenerationParams(max_new_tokens=20, temperature=0))
    got = "".join([p async for p in stream])
    assert stream.result.cached_prompt_tokens >= res1.prompt_tokens  # at least the whole first prompt
    ref_stream = ref.generate(follow, mode, GenerationParams(max_new_tokens=20, temperature=0))
    assert got == "".join([p async for p in ref_stream])
    assert fast.metrics.cached_prompt_tokens._value.get() >= stream.result.cached_prompt_tokens


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["fp16", "bf16"])
async def cpu16_engines(request: pytest.FixtureRequest, workdir: Path):
    """The CPU defaults, QUANTIZATION=fp16 (fbgemm's packed fp16 GEMM) and bf16 (on a CPU with
    AMX): the fast path and the reference over the same 16-bit weights."""
    from engine.weights import fp16_weights

    quantization = request.param
    if quantization == "fp16" and not fp16_weights.available():
        pytest.skip("this torch build has no fbgemm (not x86): QUANTIZATION=fp16 is refused here")
    fast = Engine(settings(workdir, "fast").model_copy(update={"quantization": quantization}))
    ref = Engine(settings(workdir, "reference").model_copy(update={"quantization": quantization}))
    await fast.start()
    await ref.start()
    yield quantization, fast, ref
    await fast.close()
    await ref.close()


async def test_16_bit_weights_serve_a_mixed_batch_as_the_reference_does(cpu16_engines, engines) -> None:
    """With 16-bit linear layers (the CPU defaults) the model holds less memory than in fp32 and
    the batched path serves every mode. With fp16 (fp32 activations) it equals the reference
    token for token; bf16 rounds each linear layer's input, so the paths' last-bit differences
    in the fp32 parts can flip a near-tie and answers may part after a few tokens: its
    closeness to the reference is checked on logits in tests/engine/test_bf16_weights.py."""
    quantization, fast, ref = cpu16_engines
    status = fast.status()
    assert (status.quantization, status.dtype) == (quantization, "float32")
    assert status.model_bytes < 0.8 * engines[0].status().model_bytes
    expected = [(await answer(ref, m, q, n))[0] for m, q, n in CASES]
    assert len(set(expected)) == len(expected)
    got = [text for text, _ in await asyncio.gather(*(answer(fast, m, q, n) for m, q, n in CASES))]
    assert len(set(got)) == len(got) and all(got)
    if quantization == "fp16":
        assert got == expected


async def test_a_bf16_kv_cache_halves_the_cache_and_serves_every_mode(workdir: Path, engines) -> None:
    """KV_CACHE_DTYPE=bfloat16 over the fp32 model: half the cache's bytes, and the mixed batch
    with joins and leaves is answered in every mode. Attention in bf16 moves the logits by bf16
    rounding (tests/engine/serving/test_runner.py), so answers are not compared with fp32's."""
    fast = Engine(settings(workdir, "fast", kv_cache_dtype="bfloat16", prefill_chunk_tokens=24))
    await fast.start()
    try:
        assert fast.runtime.cache.bytes * 2 == engines[0].runtime.cache.bytes
        got = [text for text, _ in await asyncio.gather(*(answer(fast, m, q, n) for m, q, n in CASES))]
        assert len(set(got)) == len(got) and all(got)
    finally:
        await fast.close()


async def test_the_model_thread_computes_with_cpu_threads_and_the_loader_runs_lowered_and_alone(engines) -> None:
    """engine.serving.threads on a running engine: the model thread (of both paths) computes with
    CPU_THREADS whatever thread loaded the model, and adapter loads run single-threaded on a
    thread of lower priority."""
    import os
    import threading

    import torch

    for engine in engines:
        got = await asyncio.wrap_future(engine.scheduler.run_exclusive(torch.get_num_threads))
        assert got == engine.settings.resolved_cpu_threads()

    def loader_view() -> tuple[int, bool]:
        if not hasattr(os, "getpriority"):  # not POSIX: nothing to look at
            return torch.get_num_threads(), True
        return torch.get_num_threads(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) > base

    base = os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0
    fast = engines[0]
    threads, lowered = await asyncio.wrap_future(fast.registry.loader.submit(loader_view))
    assert threads == 1 and lowered


async def window_while_decoding(engine: Engine, params: GenerationParams, window, steps: int = 24,
                                timeout: float = 300.0):
    """Open `window()` (a context manager, e.g. a profiler) over at least `steps` decode steps of
    a full batch whose every row is still decoding, then cancel the rows; (what the window
    gave, the decode steps inside it).

    The rows ask for far more tokens than the window lasts (`params`: hundreds, within
    CONTEXT_TOKENS with the prompt, EOS ignored), so none
    finishes inside it and none waits for a slot (as many rows as the engine has). A window in
    which a CUDA graph was captured (a key-length bucket crossed: the capture syncs the device)
    is taken again; the next bucket is at least 128 steps away."""
    rows = engine.settings.max_batch_size
    streams = [engine.generate([Message("user", q)], m, params) for m, q, _n in (CASES * rows)[:rows]]
    pieces = [0] * rows

    async def drain(i: int) -> None:
        async for _ in streams[i]:
            pieces[i] += 1

    async def until(cond, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            ended = [t for t in tasks if t.done()]
            assert not ended, f"a row ended before {what}: {ended[0].exception() or 'finished'}"
            assert asyncio.get_running_loop().time() < deadline, (
                f"{what} not within {timeout} s: pieces per row {pieces}, {engine.scheduler.steps} steps")
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(drain(i)) for i in range(rows)]
    try:
        await until(lambda: all(n >= 3 for n in pieces), "every row decoding")
        graphs = getattr(engine.runtime, "graphs", None)
        for _ in range(3):
            captures, before = (graphs.captures if graphs is not None else 0), engine.scheduler.steps
            with window() as seen:
                await until(lambda: engine.scheduler.steps - before >= steps, f"{steps} decode steps")
                inside = engine.scheduler.steps - before
            if graphs is None or graphs.captures == captures:
                break
        assert not any(t.done() for t in tasks), "a row ended inside the window"
        assert all(n < params.max_new_tokens for n in pieces)
        return seen, inside
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_window_of_decode_steps_sees_every_row_decoding(engines) -> None:
    """CPU twin of test_fast_path_gpu.py::test_one_host_sync_per_decode_step: the profile
    window lies inside the decoding of a full batch (no CUDA call to count on a CPU), and the
    rows are cancelled afterwards."""
    from torch.profiler import ProfilerActivity, profile

    fast, _ = engines
    params = GenerationParams(max_new_tokens=300, temperature=0.7, top_k=50, top_p=0.9, ignore_eos=True)
    prof, steps = await window_while_decoding(fast, params, lambda: profile(activities=[ProfilerActivity.CPU]),
                                              steps=6)
    assert steps >= 6
    assert not [e.key for e in prof.key_averages() if "Synchronize" in e.key]
    for _ in range(200):  # the cancelled rows leave their slots at the next turn of the model thread
        if fast.status().active_requests == 0:
            break
        await asyncio.sleep(0.05)
    assert fast.status().active_requests == 0
