"""GPU twins of the fast path's tests (marked `gpu`; they skip without CUDA).

CPU twins: tests/engine/runtime/test_runner.py (tiny models vs peft) and
tests/engine/test_fast_path.py (the real model, fast vs reference). Here the decode step runs
as CUDA graphs: equality in fp32, bounded drift in bf16 (nf4, the product's default on CUDA),
graphs captured for the nf4 kernels (q/k/v and gate/up as one 4-bit product each), and one
host sync per decode step.
"""
from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch

from engine import Engine, GenerationParams, Message, Mode
from tests.engine.runtime.conftest import build_tiny
from tests.engine.runtime.test_runner import MODES, SEQS, adapter_modules, reference_logits
from tests.engine.test_fast_path import CASES, settings, workdir  # noqa: F401  (module fixture)

pytestmark = [pytest.mark.gpu]


@pytest.mark.parametrize("arch", ["llama", "qwen2-bias", "llama-gqa"])
def test_tiny_models_decode_through_cuda_graphs_like_peft(arch: str, tmp_path: Path) -> None:
    from engine.config import load_settings
    from engine.runtime import FastRuntime

    tiny = build_tiny(arch, tmp_path)
    refs = [reference_logits(tiny, m, s) for m, s in zip(MODES, SEQS)]
    model = copy.deepcopy(tiny.model).to("cuda")
    rt = FastRuntime(model, load_settings(max_batch_size=4, context_tokens=128, max_new_tokens=16,
                                          max_resident_adapters=2, max_lora_rank=8))
    assert rt.graphs is not None
    slots = {None: 0}
    for name, folder in tiny.adapters.items():
        slots[name] = rt.lora.load(name, folder, folder / "adapter_model.safetensors", adapter_modules(folder), name)
    kv = [rt.cache.allocate() for _ in SEQS]
    cut = [len(s) - 3 for s in SEQS]
    for k, m in zip(kv, MODES):
        rt.lora_idx[k] = slots[m]
    rt.prefill([(k, slots[m], s[:c], 0) for k, m, s, c in zip(kv, MODES, SEQS, cut)])
    for k, s, c in zip(kv, SEQS, cut):
        rt.tok[k], rt.pos[k], rt.active[k] = s[c], c, True
    for step in range(2):
        pos = [c + step for c in cut]
        out, _ = rt.decode(rt.cache.high(), max(pos) + 1, set(slots.values()))
        for i, (k, s) in enumerate(zip(kv, SEQS)):
            torch.testing.assert_close(out[k].cpu(), refs[i][pos[i]], atol=1e-3, rtol=1e-3)
            rt.tok[k], rt.pos[k] = s[pos[i] + 1], pos[i] + 1
    # a step whose rows all use the base model replays the graph captured without the LoRA stacks
    rt.active[kv[1]] = rt.active[kv[2]] = False
    last = cut[0] + 2
    out, _ = rt.decode(rt.cache.high(), last + 1, {0})
    torch.testing.assert_close(out[kv[0]].cpu(), refs[0][last], atol=1e-3, rtol=1e-3)
    assert rt.graphs.failed is None and rt.graphs.captures >= 2
    assert {lora for _rows, _keys, lora in rt.graphs._graphs} == {True, False}


async def _answers(engine: Engine, concurrent: bool) -> list[str]:
    async def one(m: Mode, q: str, n: int) -> str:
        s = engine.generate([Message("user", q)], m, GenerationParams(max_new_tokens=n, temperature=0))
        return "".join([p async for p in s])
    if concurrent:
        return list(await asyncio.gather(*(one(*c) for c in CASES)))
    return [await one(*c) for c in CASES]


@pytest.mark.model
async def test_fp32_on_cuda_equals_the_reference_path(workdir: Path) -> None:  # noqa: F811
    async with Engine(settings(workdir, "reference", device="cuda")) as ref:
        expected = await _answers(ref, concurrent=False)
    async with Engine(settings(workdir, "fast", device="cuda", prefill_chunk_tokens=24)) as fast:
        got = await _answers(fast, concurrent=True)
        assert fast.runtime.graphs is not None and fast.runtime.graphs.failed is None
    assert got == expected


@pytest.mark.model
async def test_nf4_bf16_on_cuda_drifts_only_late_and_captures_graphs(workdir: Path) -> None:  # noqa: F811
    from engine.config import load_settings

    def nf4(runtime: str):
        base = settings(workdir, runtime, device="cuda")
        return load_settings(**(base.model_dump() | {"quantization": "nf4", "compute_dtype": "bfloat16"}))

    async with Engine(nf4("reference")) as ref:
        expected = await _answers(ref, concurrent=False)
    async with Engine(nf4("fast")) as fast:
        got = await _answers(fast, concurrent=True)
        failed = fast.runtime.graphs.failed
        layers = fast.runtime.runner.layers
        kinds = {L.qkv.kind for L in layers} | {L.gate_up.kind for L in layers}
    assert failed is None, f"bitsandbytes nf4 could not be captured: {failed}"
    assert kinds == {"4-bit packed"}, f"q/k/v and gate/up in nf4 ran as {kinds} (the log says why)"
    for a, b in zip(got, expected):
        assert a.split()[:4] == b.split()[:4]


@pytest.mark.model
async def test_one_host_sync_per_decode_step(workdir: Path) -> None:  # noqa: F811
    from torch.profiler import ProfilerActivity, profile

    async with Engine(settings(workdir, "fast", device="cuda")) as fast:
        params = GenerationParams(max_new_tokens=80, temperature=0.7, top_k=50, top_p=0.9, ignore_eos=True)
        streams = [fast.generate([Message("user", q)], m, params) for m, q, _n in CASES * 3]
        tasks = [asyncio.create_task(_drain(s)) for s in streams]
        await asyncio.sleep(1.0)  # everyone admitted and decoding, graphs captured
        before = fast.scheduler.steps
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            await asyncio.sleep(0.5)
        steps = fast.scheduler.steps - before
        await asyncio.gather(*tasks)
    syncs = sum(e.count for e in prof.key_averages()
                if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"))
    assert steps > 5
    assert syncs / steps <= 1.2, f"{syncs} host syncs over {steps} decode steps"


async def _drain(stream) -> None:
    async for _ in stream:
        pass
