"""TrainingService without training: promotion, rollback, export, refusals, job events.

Version folders are written the way a finished job leaves them (through AdapterStore), so
pointer moves can be checked without a model. `reload` is the engine's callback at the
service boundary; here it records calls and answers like Engine.reload does.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.adapter_store import AdapterStore
from engine.errors import AdapterIncompatible, AdapterInvalid, AdapterNotFound, NoTrainingData
from engine.metrics import EngineMetrics
from engine.training import TrainingJob, TrainingService, TrainOptions
from engine.training.jobs import JobLog, JobRecord
from engine.types import ReloadReport, TrainingEvent

from .conftest import MODEL_ID, REPO, chat, write_jsonl


class Reloads:
    """The engine's reload as the service sees it: records domains, can refuse one version."""

    def __init__(self, store: AdapterStore, refuse: str | None = None) -> None:
        self.store, self.refuse, self.calls = store, refuse, []

    async def __call__(self, domain: str) -> ReloadReport:
        current = self.store.current(domain)
        self.calls.append((domain, current))
        if current == self.refuse:
            return ReloadReport(failed={domain: "shape mismatch"})
        return ReloadReport(loaded={domain: current})


def add_version(store: AdapterStore, domain: str, base_model: str = MODEL_ID, status: str = "candidate") -> str:
    with store.staging(domain) as staged:
        (staged / "adapter_config.json").write_text("{}", encoding="utf-8")
        (staged / "adapter_model.safetensors").write_bytes(b"weights")
        return store.commit(domain, staged, {"base_model": base_model, "status": status}).version


@pytest.fixture
def store(adapters: Path) -> AdapterStore:
    return AdapterStore(adapters)


def service(settings, store: AdapterStore, **kw) -> tuple[TrainingService, Reloads]:
    reloads = Reloads(store, **kw)
    return TrainingService(settings, model_id=MODEL_ID, reload=reloads, metrics=EngineMetrics()), reloads


async def test_promote_moves_current_and_hot_loads(settings, store) -> None:
    svc, reloads = service(settings, store)
    v1, v2 = add_version(store, "legal"), add_version(store, "legal")

    assert await svc.promote("legal", v1) == "v1"
    assert await svc.promote("legal", v2) == "v2"

    assert store.current("legal") == "v2"
    assert store.version("legal", "v2").meta["status"] == "promoted"
    assert reloads.calls == [("legal", "v1"), ("legal", "v2")]


async def test_rollback_returns_to_the_version_that_served_before(settings, store) -> None:
    svc, reloads = service(settings, store)
    for _ in range(3):
        add_version(store, "legal")
    for v in ("v1", "v3", "v2"):  # served in this order: rollback follows it, not version numbers
        await svc.promote("legal", v)

    assert await svc.rollback("legal") == "v3"
    assert await svc.rollback("legal") == "v1"
    with pytest.raises(AdapterNotFound, match="no earlier version"):
        await svc.rollback("legal")
    assert store.current("legal") == "v1"
    assert reloads.calls[-2:] == [("legal", "v3"), ("legal", "v1")]


async def test_rollback_without_history_uses_the_newest_older_promoted_version(settings, store) -> None:
    svc, _ = service(settings, store)
    add_version(store, "legal", status="promoted")
    add_version(store, "legal", status="candidate")
    add_version(store, "legal", status="promoted")
    (store.domain_dir("legal") / "current").write_text("v3\n")  # as shipped: a pointer, no history

    assert await svc.rollback("legal") == "v1"


async def test_promotion_the_engine_refuses_is_undone(settings, store) -> None:
    svc, reloads = service(settings, store, refuse="v2")
    add_version(store, "legal"), add_version(store, "legal")
    await svc.promote("legal", "v1")

    with pytest.raises(AdapterInvalid, match="shape mismatch"):
        await svc.promote("legal", "v2")

    assert store.current("legal") == "v1"
    assert store.version("legal", "v2").meta["status"] == "candidate"
    assert reloads.calls[-1] == ("legal", "v1")  # the engine was told to go back


async def test_promote_refuses_another_base_model_or_a_missing_version(settings, store) -> None:
    svc, reloads = service(settings, store)
    add_version(store, "legal", base_model="someone/else-7B")

    with pytest.raises(AdapterIncompatible, match="someone/else-7B"):
        await svc.promote("legal", "v1")
    with pytest.raises(AdapterNotFound, match="v9"):
        await svc.promote("legal", "v9")
    assert store.current("legal") is None and reloads.calls == []


async def test_export_appends_new_pairs_once(settings, store, adapters) -> None:
    svc, _ = service(settings, store)
    data = adapters / "legal" / "data"
    write_jsonl(data / "train.jsonl", [chat("What is a lease?", "A rental contract.")])
    write_jsonl(data / "eval.jsonl", [chat("What is a deed?", "A transfer document.")])
    pairs = [("What is a lease?", "A rental contract."), ("What is a tort?", "A civil wrong."),
             ("What is a deed?", "leaks the eval split")]

    assert await svc.export_examples("legal", pairs) == 1
    assert await svc.export_examples("legal", pairs) == 0  # already exported

    lines = (data / "feedback.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [chat("What is a tort?", "A civil wrong.")]
    with pytest.raises(AdapterNotFound):
        await svc.export_examples("nonexistent", pairs)


async def test_start_refuses_unknown_domain_and_missing_data_before_spawning(settings, adapters) -> None:
    svc = TrainingService(settings, model_id=MODEL_ID)
    (adapters / "legal" / "data").mkdir(parents=True)
    write_jsonl(adapters / "legal" / "data" / "train.jsonl", ["{broken"])

    with pytest.raises(AdapterNotFound, match="cooking"):
        await svc.start("cooking")
    with pytest.raises(NoTrainingData, match=r"train.jsonl:1: invalid JSON"):
        await svc.start("legal")
    assert svc.current() is None
    assert svc.history() == []


def test_cli_exits_nonzero_without_data(settings, adapters) -> None:
    (adapters / "legal" / "data").mkdir(parents=True)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.train", "legal", "--settings-json", settings.model_dump_json()],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "no usable training rows" in proc.stderr and str(adapters / "legal" / "data") in proc.stderr


def test_restart_marks_jobs_that_died_with_the_engine_failed(settings, store, adapters) -> None:
    log = JobLog(adapters / ".runs" / "jobs.jsonl")
    log.append(JobRecord("j1", "legal", "running", "2025-01-01T00:00:00+00:00"))
    (adapters / "legal" / ".staging-dead").mkdir(parents=True)

    svc = TrainingService(settings, model_id=MODEL_ID)

    [rec] = svc.history()
    assert rec.status == "failed" and "interrupted" in rec.message
    assert not (adapters / "legal" / ".staging-dead").exists()


async def test_job_events_fan_out_to_every_subscriber() -> None:
    job = TrainingJob("j1", "legal", TrainOptions())
    job.publish(TrainingEvent("j1", "legal", "queued"))
    early = asyncio.create_task(_collect(job))
    await asyncio.sleep(0)
    job.publish(TrainingEvent("j1", "legal", "progress", step=1, total_steps=2))
    late = asyncio.create_task(_collect(job))  # subscribes now: gets step 1, then the rest
    await asyncio.sleep(0)
    job.publish(TrainingEvent("j1", "legal", "progress", step=2, total_steps=2))
    job.publish(TrainingEvent("j1", "legal", "failed", message="boom"))
    job.publish(TrainingEvent("j1", "legal", "progress", step=3))  # after the end: ignored

    assert await early == ["queued", "progress:1", "progress:2", "failed"]
    assert await late == ["progress:1", "progress:2", "failed"]
    assert await _collect(job) == ["failed"]  # after the end: just the final event
    assert (await job.wait()).message == "boom"


async def _collect(job: TrainingJob) -> list[str]:
    return [f"{e.kind}:{e.step}" if e.kind == "progress" else e.kind async for e in job.events()]
