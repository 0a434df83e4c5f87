"""Real training jobs on the default model, a few steps each, in a real child process.

The data is tiny and the eval split repeats the training facts, so a few steps at a high
learning rate reliably lower the eval loss (the gate passes); one step at a tiny learning rate
barely moves the adapter (the gate fails against a trained current version).
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engine.adapters.store import AdapterStore
from engine.errors import TrainingBusy
from engine.metrics import EngineMetrics
from engine.training import TrainingService, TrainOptions
from engine.types import ReloadReport, TrainingEvent

from .conftest import MODEL_ID, REPO, chat, write_jsonl

pytestmark = [pytest.mark.model, pytest.mark.slow]

FACTS = [(f"What does clause {i} of the model lease say?",
          f"Clause {i} says the tenant must give thirty days of written notice before leaving.") for i in range(12)]
BAD_ROWS = ["{this is not json", '{"messages": [{"role": "user", "content": "no answer"}]}']
QUICK = TrainOptions(max_steps=3, batch_size=4, learning_rate=2e-3, max_seq_len=128)
LONG = TrainOptions(max_steps=500, batch_size=4, learning_rate=1e-3, max_seq_len=128)


@pytest.fixture
def domain_data(adapters: Path) -> Path:
    data = adapters / "legal" / "data"
    write_jsonl(data / "train.jsonl", [chat(q, a) for q, a in FACTS[:10]] + BAD_ROWS)
    write_jsonl(data / "eval.jsonl", [chat(q, a) for q, a in FACTS[::3]])
    return data


class Reloads:
    def __init__(self, store: AdapterStore) -> None:
        self.store, self.calls = store, []

    async def __call__(self, domain: str) -> ReloadReport:
        self.calls.append((domain, self.store.current(domain)))
        return ReloadReport(loaded={domain: self.store.current(domain)})


def leftovers(adapters: Path) -> list[str]:
    d = adapters / "legal"
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".staging-") or p.name.startswith("v"))


def outcomes(metrics: EngineMetrics) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for m in metrics.registry.collect() if m.name == "llm_training_jobs"
            for s in m.samples if s.name.endswith("_total")}


async def test_job_writes_version_gates_and_promotes(settings, adapters, domain_data) -> None:
    store = AdapterStore(adapters)
    metrics = EngineMetrics()
    reloads = Reloads(store)
    svc = TrainingService(settings, model_id=MODEL_ID, reload=reloads, metrics=metrics)

    job = await svc.start("legal", requested_by="admin:1", options=QUICK)
    seen: list[TrainingEvent] = []
    async for ev in job.events():
        seen.append(ev)
        if not ev.final:
            assert store.versions("legal") == []  # nothing appears before the job succeeds
    final = seen[-1]

    assert final.kind == "finished" and final.promoted and final.version == "v1", final.message
    kinds = [e.kind for e in seen]
    assert kinds[0] == "queued" and "started" in kinds and "evaluating" in kinds
    steps = [e.step for e in seen if e.kind == "progress"]
    assert steps == sorted(steps) and steps[-1] == 3
    assert all(e.total_steps == 3 for e in seen if e.kind == "progress")
    assert any(e.loss is not None and e.eta_s is not None for e in seen if e.kind == "progress")
    assert "skipped 2 bad rows: train.jsonl:11: invalid JSON" in " ".join(e.message for e in seen)

    meta = store.version("legal", "v1").meta
    m = meta["metrics"]
    assert meta["base_model"] == MODEL_ID and meta["status"] == "promoted" and meta["parent"] is None
    assert m["eval_loss"] < m["eval_loss_base"] and m["eval_perplexity"] < m["eval_perplexity_base"]
    assert m["train_seconds"] > 0 and "train_loss" in m
    t = meta["training"]
    assert (t["r"], t["lora_alpha"], t["lora_dropout"], t["target_modules"], t["quantization"]) == (
        8, 32, 0.1, "all-linear", settings.resolved_quantization(settings.resolved_device()))
    assert (t["steps"], t["samples"], t["eval_samples"], t["skipped_rows"]) == (3, 10, 4, 2)
    assert final.metrics["eval_loss"] == m["eval_loss"]
    assert store.current("legal") == "v1" and reloads.calls == [("legal", "v1")]
    files = sorted((adapters / "legal" / "v1").iterdir())
    assert [p.name for p in files] == ["adapter_config.json", "adapter_model.safetensors", "meta.json"]
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in files)  # readable by a server running as another user

    # a version that does not beat the current one stays a candidate
    job2 = await svc.start("legal", options=TrainOptions(max_steps=1, batch_size=4, learning_rate=1e-6,
                                                         max_seq_len=128))
    final2 = await job2.wait()
    assert final2.kind == "finished" and not final2.promoted and final2.version == "v2", final2.message
    meta2 = store.version("legal", "v2").meta
    assert meta2["status"] == "candidate" and meta2["parent"] == "v1"
    assert meta2["gate"]["reference"] == "v1" and not meta2["gate"]["passed"]
    assert meta2["metrics"]["eval_loss_previous"] < meta2["metrics"]["eval_loss"]
    assert meta2["metrics"]["eval_loss"] == pytest.approx(meta2["metrics"]["eval_loss_base"], rel=1e-2)
    assert store.current("legal") == "v1" and len(reloads.calls) == 1
    assert "candidate" in final2.message

    # the admin may promote it anyway, and roll back
    await svc.promote("legal", "v2")
    assert store.current("legal") == "v2"
    assert await svc.rollback("legal") == "v1"
    assert reloads.calls[-2:] == [("legal", "v2"), ("legal", "v1")]

    assert outcomes(metrics) == {"promoted": 1.0, "candidate": 1.0}
    assert [(r.job_id, r.status, r.version) for r in svc.history()] == [
        (job2.id, "candidate", "v2"), (job.id, "promoted", "v1")]


async def test_cancel_stops_the_job_and_leaves_nothing(settings, adapters, domain_data) -> None:
    metrics = EngineMetrics()
    svc = TrainingService(settings, model_id=MODEL_ID, metrics=metrics)
    job = await svc.start("legal", options=LONG)
    async for ev in job.events():
        if ev.kind == "progress" and ev.step >= 1:
            break
    assert [n for n in leftovers(adapters) if n.startswith(".staging-")]  # the job works in staging

    with pytest.raises(TrainingBusy, match=r"legal \(step \d+/500"):
        await svc.start("legal", options=QUICK)

    assert await svc.cancel(requested_by="admin:1") is job
    final = await job.wait()
    assert final.kind == "cancelled" and "admin:1" in final.message
    assert leftovers(adapters) == []
    assert svc.current() is None and outcomes(metrics) == {"cancelled": 1.0}
    assert svc.history()[0].status == "cancelled"


async def test_killed_process_is_reported_failed_and_leaves_nothing(settings, adapters, domain_data) -> None:
    metrics = EngineMetrics()
    svc = TrainingService(settings, model_id=MODEL_ID, metrics=metrics)
    job = await svc.start("legal", options=LONG)
    async for ev in job.events():
        if ev.kind == "progress" and ev.step >= 1:
            break

    os.kill(job.pid, signal.SIGKILL)  # as the OOM killer would
    final = await job.wait()

    assert final.kind == "failed" and "SIGKILL" in final.message and final.version is None
    assert leftovers(adapters) == []
    assert AdapterStore(adapters).current("legal") is None
    assert outcomes(metrics) == {"failed": 1.0}
    assert svc.history()[0].status == "failed"


def test_cli_trains_one_step_for_real_and_prints_metrics(settings, adapters, domain_data) -> None:
    """`--steps 1` used to spend its only step in learning-rate warm-up (rate 0) and still write
    a "new version" identical to the base model. Output is a pipe here: log lines, no tqdm bar."""
    from safetensors.torch import load_file

    proc = subprocess.run(
        [sys.executable, "-m", "engine.train", "legal", "--steps", "1", "--batch-size", "4", "--lr", "2e-3",
         "--max-seq-len", "128", "--no-promote", "--settings-json", settings.model_dump_json()],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training legal: step 1/1, loss" in proc.stderr
    assert "it/s" not in proc.stderr and "\r" not in proc.stderr  # no progress bar into a pipe
    assert "legal v1 — candidate" in proc.stdout and "base model" in proc.stdout and "new (v1)" in proc.stdout
    store = AdapterStore(adapters)
    v1 = store.version("legal", "v1")
    assert v1.meta["status"] == "candidate" and v1.meta["training"]["steps"] == 1
    assert store.current("legal") is None  # --no-promote
    b = [t for k, t in load_file(str(v1.weights)).items() if "lora_B" in k]
    assert b and any(bool(t.any()) for t in b), "the one step did not change the adapter"
    assert v1.meta["metrics"]["eval_loss"] != v1.meta["metrics"]["eval_loss_base"]


async def test_promotion_hot_loads_into_a_running_engine_while_a_stream_continues(settings, adapters, domain_data) -> None:
    import shutil

    from engine.types import GenerationParams, Message, Mode

    Engine = pytest.importorskip("engine.engine", reason="engine/engine.py is not written yet").Engine
    engine = Engine(settings.model_copy(update={"templates_dir": REPO / "templates"}))
    await engine.start()
    try:
        job = await engine.training.start("legal", options=QUICK)
        first = await job.wait()
        assert first.kind == "finished" and first.promoted and first.version == "v1", first.message
        # v2 = the same weights as a new version, so the swap below is a real v1 -> v2 hot-load
        store = AdapterStore(adapters)
        v1 = store.version("legal", "v1")
        with store.staging("legal") as staged:
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.copy2(v1.path / name, staged / name)
            store.commit("legal", staged, {**v1.meta, "status": "candidate"})

        greedy = GenerationParams(max_new_tokens=48, temperature=0.0)
        stream = engine.generate([Message("user", "What should a lease say about notice?")], Mode(adapter="legal"), greedy)
        pieces: list[str] = []
        promotion = None
        async for piece in stream:
            pieces.append(piece)
            if promotion is None:  # the stream is live: promote while it keeps generating
                promotion = asyncio.create_task(engine.training.promote("legal", "v2"))
        assert promotion is not None and await promotion == "v2"
        assert stream.result.finish_reason in ("stop", "length")
        assert stream.result.adapter_version == "v1" and "".join(pieces) == stream.result.text != ""

        after = engine.generate([Message("user", "And a deposit?")], Mode(adapter="legal"), greedy)
        assert [p async for p in after] and after.result.adapter_version == "v2"
        assert store.current("legal") == "v2"
    finally:
        await engine.close()
