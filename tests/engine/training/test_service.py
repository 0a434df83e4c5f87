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

from engine.adapters.store import AdapterStore
from engine.errors import AdapterIncompatible, AdapterInvalid, AdapterNotFound, NoTrainingData, TrainingBusy
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
    log.append(JobRecord("j1", "legal", "running", "2025-01-01T00:00:00+00:00", "admin:1", pid=999999999,
                         origin="service"))
    (adapters / "legal" / ".staging-dead").mkdir(parents=True)

    svc = TrainingService(settings, model_id=MODEL_ID)

    [rec] = svc.history()
    assert rec.status == "failed" and "interrupted: the bot that ran it stopped" in rec.message
    assert "pid 999999999" in rec.message and "removed 1 half-written folder" in rec.message
    assert not (adapters / "legal" / ".staging-dead").exists()


@pytest.mark.parametrize("record", [
    JobRecord("j2", "legal", "running", "2025-01-01T00:00:00+00:00", "cli", pid=999999998, origin="cli"),
    JobRecord("j2", "legal", "running", "2025-01-01T00:00:00+00:00", "cli", pid=999999998),  # before `origin`
])
def test_a_dead_shell_job_is_not_blamed_on_the_engine(settings, store, adapters, record: JobRecord) -> None:
    JobLog(adapters / ".runs" / "jobs.jsonl").append(record)
    [rec] = TrainingService(settings, model_id=MODEL_ID).history()
    assert rec.status == "failed" and "started from the shell" in rec.message and "killed or crashed" in rec.message
    assert "bot" not in rec.message and "engine stopped" not in rec.message


def test_a_live_shell_job_is_left_running(settings, store, adapters) -> None:
    from engine.training import lock

    log = JobLog(adapters / ".runs" / "jobs.jsonl")
    (adapters / "legal" / ".staging-live").mkdir(parents=True)
    with lock.hold(adapters, domain="legal", job_id="j3"):  # as `python -m engine.train` holds it
        log.append(JobRecord("j3", "legal", "running", "2025-01-01T00:00:00+00:00", "cli", pid=1, origin="cli"))
        svc = TrainingService(settings, model_id=MODEL_ID)
        assert [r.status for r in svc.history()] == ["running"]
        assert (adapters / "legal" / ".staging-live").is_dir()


#: A shell training job's bookkeeping, as `python -m engine.train` does it: the lock, a
#: "running" record, a staging folder; then it works until killed.
SHELL_JOB = """
import sys, time
from engine.adapters.store import AdapterStore, utc_now
from engine.training import lock
from engine.training.jobs import JobLog, JobRecord
import os
adapters = sys.argv[1]
with lock.hold(adapters, domain="legal", job_id="shell-1"):
    JobLog(lock.runs_dir(adapters) / "jobs.jsonl").append(
        JobRecord("shell-1", "legal", "running", utc_now(), "cli", pid=os.getpid(), origin="cli"))
    with AdapterStore(adapters).staging("legal") as staged:
        print(staged, flush=True)
        time.sleep(600)
"""


async def test_a_shell_job_killed_while_the_bot_runs_is_reported_and_cleaned_at_once(settings, adapters) -> None:
    import os
    import signal

    (adapters / "legal" / "data").mkdir(parents=True)
    svc = TrainingService(settings, model_id=MODEL_ID)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SHELL_JOB, str(adapters), cwd=REPO, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        staged = Path((await proc.stdout.readline()).decode().strip())
        assert staged.is_dir()
        with pytest.raises(TrainingBusy, match="shell-1"):
            await svc.start("legal")
        os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer would
        await proc.wait()
        for _ in range(300):  # nobody asks: the service notices by itself
            if not staged.exists():
                break
            await asyncio.sleep(0.05)
        assert not staged.exists()
        [rec] = [r for r in JobLog(adapters / ".runs" / "jobs.jsonl").records() if r.job_id == "shell-1"]
        assert rec.status == "failed" and f"pid {proc.pid}" in rec.message and "killed or crashed" in rec.message
    finally:
        await svc.close()


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


def test_a_learning_rate_of_zero_is_refused_up_front() -> None:
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="learning_rate=0.0.*nothing is learned"):
        TrainOptions(learning_rate=0.0)


@pytest.mark.parametrize("options, rows, steps", [
    (TrainOptions(max_steps=1), 1000, 1),
    (TrainOptions(epochs=3.0, batch_size=8), 335, 126),  # the shipped default /train: 42 steps an epoch
    (TrainOptions(epochs=1.0, batch_size=8, grad_accum=2), 64, 4),
    (TrainOptions(epochs=0.5, batch_size=8), 3, 1),
])
def test_planned_steps_and_whole_step_warm_up(options: TrainOptions, rows: int, steps: int) -> None:
    from engine.training.runner import planned_steps

    assert planned_steps(options, rows) == steps
    assert int(options.warmup * planned_steps(options, rows)) == (6 if steps == 126 else 0)


def test_an_adapter_whose_b_matrices_are_zero_is_untrained() -> None:
    """The guard behind "training changed nothing": peft starts every LoRA at B = 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.training.runner import is_untrained

    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    model = get_peft_model(tiny, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert is_untrained(model)
    name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with __import__("torch").no_grad():
        param[0, 0] = 1e-6
    assert not is_untrained(model)
