"""GPU twins of the fast path's tests (marked `gpu`; they skip without CUDA).

CPU twins: tests/engine/serving/test_runner.py (tiny models vs peft),
tests/engine/serving/test_graphs.py (bucketing, how a capture failure is reported) and
tests/engine/test_fast_path.py (the real model, fast vs reference; the decoding window of the
sync count). Here the decode step runs as CUDA graphs: equality in fp32, bounded drift in bf16
(nf4, the product's default on CUDA), graphs captured for the nf4 kernels (q/k/v and gate/up as
one 4-bit product each), a capture that another thread cannot break, a failed capture that
says why, and one host sync per decode step.

Written to fail only for the engine's reasons: fp32 comparisons run with an fp32 KV cache,
answers of a batch are compared with answers computed one at a time only where both are exact
(fp32), and the sync count is taken while every row is still decoding, outside any capture.
"""
from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch

from engine import Engine, GenerationParams, Message, Mode
from tests.engine.serving.conftest import build_tiny
from tests.engine.serving.test_runner import MODES, SEQS, adapter_modules, reference_logits
from tests.engine.test_fast_path import CASES, settings, window_while_decoding, workdir  # noqa: F401

pytestmark = [pytest.mark.gpu]


@pytest.mark.parametrize("arch", ["llama", "qwen2-bias", "llama-gqa"])
def test_tiny_models_decode_through_cuda_graphs_like_peft(arch: str, tmp_path: Path) -> None:
    from engine.config import load_settings
    from engine.serving.runner import FastRuntime

    tiny = build_tiny(arch, tmp_path)
    refs = [reference_logits(tiny, m, s) for m, s in zip(MODES, SEQS)]
    model = copy.deepcopy(tiny.model).to("cuda")
    # fp32 like the model and peft's reference: `auto` is bf16 on CUDA, and a bf16 cache alone
    # moves the logits by ~1e-2, past the 1e-3 this compares at
    rt = FastRuntime(model, load_settings(max_batch_size=4, context_tokens=128, max_new_tokens=16,
                                          max_resident_adapters=2, max_lora_rank=8, kv_cache_dtype="float32"))
    assert rt.cache.k[0].dtype == torch.float32
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
    """bf16 products round by the rows they multiply: a batch's answers may part from the same
    questions asked one at a time after a few tokens, legitimately. So the texts compared are
    the fast path's and the reference's, each asked one at a time; the batch checks the graphs
    and the fused kernels."""
    from engine.config import load_settings

    def nf4(runtime: str):
        base = settings(workdir, runtime, device="cuda")
        return load_settings(**(base.model_dump() | {"quantization": "nf4", "compute_dtype": "bfloat16"}))

    async with Engine(nf4("reference")) as ref:
        expected = await _answers(ref, concurrent=False)
    async with Engine(nf4("fast")) as fast:
        alone = await _answers(fast, concurrent=False)
        batched = await _answers(fast, concurrent=True)
        failed = fast.runtime.graphs.failed
        layers = fast.runtime.runner.layers
        kinds = {L.qkv.kind for L in layers} | {L.gate_up.kind for L in layers}
    assert failed is None, f"bitsandbytes nf4 could not be captured: {failed}"
    assert kinds == {"4-bit packed"}, f"q/k/v and gate/up in nf4 ran as {kinds} (the log says why)"
    for a, b in zip(alone, expected):
        assert a.split()[:4] == b.split()[:4]
    assert all(text.strip() for text in batched), batched


@pytest.mark.model
async def test_one_host_sync_per_decode_step(workdir: Path) -> None:  # noqa: F811
    """CPU twin: test_fast_path.py::test_a_window_of_decode_steps_sees_every_row_decoding."""
    from torch.profiler import ProfilerActivity, profile

    async with Engine(settings(workdir, "fast", device="cuda")) as fast:
        # 300 of CONTEXT_TOKENS=512: hundreds of steps, the window takes 24 of them
        params = GenerationParams(max_new_tokens=300, temperature=0.7, top_k=50, top_p=0.9, ignore_eos=True)
        prof, steps = await window_while_decoding(
            fast, params, lambda: profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]))
        assert fast.runtime.graphs is not None and fast.runtime.graphs.failed is None
    syncs = sum(e.count for e in prof.key_averages()
                if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"))
    assert steps >= 24
    assert syncs / steps <= 1.2, f"{syncs} host syncs over {steps} decode steps"


def test_a_capture_survives_another_thread_allocating() -> None:
    """Thread-local capture mode: a cudaMalloc on another thread (an adapter loading, a
    benchmark reading memory) while the model thread captures neither fails nor breaks the graph."""
    import threading

    from engine.serving.graphs import DecodeGraphs

    x = torch.arange(8, dtype=torch.float32, device="cuda")
    other_done, other_error = threading.Event(), []

    def allocate() -> None:
        try:
            torch.empty(256 << 20, dtype=torch.uint8, device="cuda").fill_(1)  # a new block: cudaMalloc
        except Exception as exc:  # noqa: BLE001  (the assertion below reports it)
            other_error.append(exc)
        finally:
            other_done.set()

    def step(rows: int, key_len: int, lora: bool) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing() and not other_done.is_set():
            thread = threading.Thread(target=allocate)
            thread.start()
            thread.join(30)
        return x[:rows] * 2 + key_len

    graphs = DecodeGraphs(step, slots=8, context=256)
    out = graphs.run(3, 100)
    torch.cuda.synchronize()
    assert other_done.is_set() and not other_error, other_error
    assert graphs.failed is None and graphs.captures == 1, graphs.failed
    x.add_(1)  # the replay reads the static buffer again
    torch.testing.assert_close(graphs.run(3, 100)[:3].cpu(), torch.tensor([130.0, 132.0, 134.0]))
    assert out.shape[0] == 4  # the batch bucket


def test_a_failed_capture_decodes_eagerly_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    """A step that syncs the host (here `.item()`) cannot be captured: the log carries the
    traceback and the first error, and the step goes on eagerly with the right numbers."""
    import logging

    from engine.serving.graphs import DecodeGraphs

    x = torch.arange(8, dtype=torch.float32, device="cuda")

    def step(rows: int, key_len: int, lora: bool) -> torch.Tensor:
        return x[:rows] * float(x.sum().item())  # a host sync: not permitted while capturing

    graphs = DecodeGraphs(step, slots=8, context=256)
    stream = torch.cuda.current_stream()
    with caplog.at_level(logging.WARNING, logger="engine.serving.graphs"):
        out = graphs.run(2, 100)
    assert torch.cuda.current_stream() == stream, "the failed capture left its stream current"
    torch.testing.assert_close(out.cpu(), torch.tensor([0.0, 28.0]))
    assert graphs.failed is not None and "captur" in graphs.failed.lower(), graphs.failed
    (record,) = [r for r in caplog.records if "capture failed" in r.getMessage()]
    assert record.exc_info is not None
    torch.testing.assert_close(graphs.run(2, 100).cpu(), torch.tensor([0.0, 28.0]))  # eager from now on
    assert graphs.captures == 0
