"""`python -m engine.train <domain>`: train a new LoRA version of a domain, without Telegram.

The same job the bot's `/train` runs: QLoRA on adapters/<domain>/data, evaluation of the
base model, the current version and the new one on the held-out split, a new version
written atomically, promoted when it beats the current one (unless --no-promote). Shows a
progress bar and prints the metrics table; the exit code is non-zero on failure.

The training service runs this same module as its training process with --events-json:
events then go to stdout as JSON lines, and everything else (logs, stray prints) to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from typing import Any, Callable

from engine.adapters.store import AdapterStore, utc_now
from engine.errors import AdapterNotFound, ConfigError, EngineError, NoTrainingData, TrainingBusy
from engine.types import TrainingEvent

log = logging.getLogger("engine.train")

EXIT_FAILED, EXIT_USAGE, EXIT_BUSY, EXIT_CANCELLED = 1, 2, 3, 130


class Cancelled(KeyboardInterrupt):
    """SIGTERM (the service's cancel) or a vanished parent: unwind so staging is removed."""


def build_parser() -> argparse.ArgumentParser:
    from engine.training.options import TrainOptions

    d = TrainOptions()
    p = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.split("\n\n")[0])
    p.add_argument("domain", help="adapter domain, e.g. legal (data in adapters/<domain>/data)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=None, help=f"passes over the training rows (default {d.epochs:g})")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default {d.learning_rate:g})")
    p.add_argument("--batch-size", type=int, default=None, help=f"rows per step (default {d.batch_size})")
    p.add_argument("--max-seq-len", type=int, default=None, help=f"tokens per row (default {d.max_seq_len})")
    p.add_argument("--seed", type=int, default=None, help=f"(default {d.seed})")
    p.add_argument("--dataset", default=None, help="hub data set id instead of the data folder (needs network)")
    p.add_argument("--no-promote", action="store_true", help="keep the new version as a candidate")
    p.add_argument("--options-json", default=None, help="all training options as JSON (service use)")
    p.add_argument("--settings-json", default=None, help="engine settings as JSON (service use)")
    p.add_argument("--events-json", action="store_true", help="stream events as JSON lines on stdout")
    p.add_argument("--job-id", default=None)
    p.add_argument("--requested-by", default=None)
    p.add_argument("--parent-pid", type=int, default=None, help="stop when this process goes away")
    p.add_argument("--nice", type=int, default=0, help="lower this process's CPU priority by N")
    return p


def options_from_args(args: argparse.Namespace) -> Any:
    from engine.training.options import TrainOptions

    data: dict[str, Any] = json.loads(args.options_json) if args.options_json else {}
    flags = {"max_steps": args.steps, "epochs": args.epochs, "learning_rate": args.lr,
             "batch_size": args.batch_size, "max_seq_len": args.max_seq_len, "seed": args.seed,
             "dataset": args.dataset}
    data.update({k: v for k, v in flags.items() if v is not None})
    return TrainOptions.from_dict(data)


# ---- event sinks -------------------------------------------------------------------------

def json_sink() -> Callable[[TrainingEvent], None]:
    """Events on the real stdout; fd 1 is pointed at stderr so nothing else lands there."""
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)

    def emit(event: TrainingEvent) -> None:
        events.write(json.dumps(asdict(event), ensure_ascii=False) + "\n")
        events.flush()

    return emit


class ProgressBar:
    """A tqdm bar on a terminal, messages above it; elsewhere (a pipe, a log file) no bar but a
    log line about every tenth of the steps, so a captured log stays readable."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.live = bool(getattr(sys.stderr, "isatty", lambda: False)()) and os.environ.get("TQDM_DISABLE") != "1"

    def __call__(self, event: TrainingEvent) -> None:
        from tqdm import tqdm

        if event.kind == "progress" and not self.live:
            every = max(1, event.total_steps // 10)
            if event.step and (event.step % every == 0 or event.step == event.total_steps):
                loss = f", loss {event.loss:.4f}" if event.loss is not None else ""
                log.info("training %s: step %d/%d%s", event.domain, event.step, event.total_steps, loss)
            return
        if event.kind == "progress":
            if self.bar is None and event.total_steps:
                self.bar = tqdm(total=event.total_steps, desc=f"training {event.domain}", unit="step")
            if self.bar is not None:
                self.bar.n = event.step
                if event.loss is not None:
                    self.bar.set_postfix(loss=f"{event.loss:.3f}", refresh=False)
                self.bar.refresh()
            return
        self.close()
        if event.message and self.live:
            tqdm.write(f"[{event.kind}] {event.message}", file=sys.stderr)
        elif event.message:
            log.info("[%s] %s", event.kind, event.message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def metrics_table(meta: dict[str, Any], promoted: bool) -> str:
    m, t = meta.get("metrics", {}), meta.get("training", {})
    gate = meta.get("gate", {})
    version = meta.get("version", "?")
    if promoted:
        state = f"promoted, now current ({gate.get('reason', '')})"
    elif gate.get("passed"):
        state = f"candidate (--no-promote; {gate.get('reason', '')})"
    else:
        state = f"candidate, not promoted ({gate.get('reason', '')})"
    rows = [("base model", m.get("eval_loss_base"), m.get("eval_perplexity_base"))]
    if "eval_loss_previous" in m:
        rows.append((f"current ({meta.get('parent')})", m["eval_loss_previous"], m.get("eval_perplexity_previous")))
    rows.append((f"new ({version})", m.get("eval_loss"), m.get("eval_perplexity")))
    lines = [f"{meta.get('name')} {version} — {state}", f"  {'':<16}{'eval loss':>10}{'perplexity':>12}"]
    for label, loss, ppl in rows:
        lines.append(f"  {label:<16}{loss:>10.4f}{ppl:>12.2f}" if loss is not None else f"  {label:<16}{'-':>10}")
    base, new = m.get("eval_loss_base"), m.get("eval_loss")
    if base and new is not None:
        lines.append(f"  eval loss vs base: {100 * (new - base) / base:+.1f}%")
    lines.append(
        f"  {t.get('steps')} steps, {t.get('epochs')} epochs, {t.get('samples')} rows "
        f"({t.get('skipped_rows', 0)} bad rows skipped), train loss {m.get('train_loss', float('nan')):.4f}, "
        f"training {m.get('train_seconds')} s, job {m.get('job_seconds')} s"
    )
    return "\n".join(lines)


# ---- process plumbing ----------------------------------------------------------------------

def _raise_cancelled(signum: int, _frame: Any) -> None:
    raise Cancelled(f"stopped by signal {signal.Signals(signum).name}")


def _watch_parent(parent_pid: int) -> None:
    """The service died without cancelling us: stop instead of training for nobody."""

    def loop() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    threading.Thread(target=loop, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.logs import disable_progress_bars, setup_logging

    # one line per event; library records through it; no library progress bars off a terminal
    setup_logging("text", False, "INFO", stream=sys.stderr)
    emit = json_sink() if args.events_json else ProgressBar()
    if args.events_json:  # nobody watches the child's stderr live; keep its log readable
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
        disable_progress_bars()
    signal.signal(signal.SIGTERM, _raise_cancelled)
    if args.parent_pid:
        _watch_parent(args.parent_pid)
    if args.nice:
        os.nice(args.nice)

    from engine.config import load_settings
    from engine.training import lock
    from engine.training.jobs import JobLog, JobRecord, new_job_id

    job_id = args.job_id or new_job_id()

    def fail(kind: str, message: str, code: int) -> int:
        if args.events_json:  # the console shows the event itself; the service's run log wants it
            log.error("%s", message)
        emit(TrainingEvent(job_id, args.domain, kind, message=message))  # type: ignore[arg-type]
        return code

    if not args.events_json:  # the bot already warned about its environment before starting us
        from engine.config import EngineSettings, misspelt_settings

        for warning in misspelt_settings(EngineSettings.model_fields):
            log.warning("%s", warning)
    try:
        settings = load_settings(**json.loads(args.settings_json)) if args.settings_json else load_settings()
        options = options_from_args(args)
    except (ConfigError, ValueError) as exc:
        return fail("failed", str(exc), EXIT_USAGE)
    store = AdapterStore(settings.adapters_dir)
    standalone = not args.events_json  # the service keeps its own job log
    job_log = JobLog(lock.runs_dir(settings.adapters_dir) / "jobs.jsonl")
    record = JobRecord(job_id, args.domain, "running", utc_now(), args.requested_by or "cli",
                       options=options.to_dict(), pid=os.getpid(), origin="cli")
    try:
        with lock.hold(settings.adapters_dir, domain=args.domain, job_id=job_id):
            from engine.training.reaper import reap_dead_jobs

            reap_dead_jobs(settings.adapters_dir, job_log, holding=job_id)  # jobs killed before ours
            if standalone:
                job_log.append(record)
            try:
                record = _run(settings, store, args, options, emit, job_id, record)
            except BaseException as exc:
                if standalone:
                    status = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
                    job_log.append(_replace(record, status=status, message=_reason(exc)))
                raise
            if standalone:
                job_log.append(record)
            return 0
    except TrainingBusy as exc:
        return fail("failed", str(exc), EXIT_BUSY)
    except (NoTrainingData, AdapterNotFound, ConfigError) as exc:
        return fail("failed", str(exc), EXIT_USAGE)
    except KeyboardInterrupt as exc:
        return fail("cancelled", _reason(exc) or "interrupted", EXIT_CANCELLED)
    except EngineError as exc:
        return fail("failed", str(exc), EXIT_FAILED)
    except Exception as exc:
        log.exception("training %s failed", args.domain)
        return fail("failed", _reason(exc), EXIT_FAILED)
    finally:
        if isinstance(emit, ProgressBar):
            emit.close()


def _run(settings: Any, store: Any, args: argparse.Namespace, options: Any,
         emit: Callable[[TrainingEvent], None], job_id: str, record: Any) -> Any:
    from engine.training.promotion import mark_promoted
    from engine.training.runner import run_job

    leftovers = store.clean_staging(args.domain)  # a killed job's; we hold the lock
    if leftovers:
        log.info("removed %d staging folder(s) left by an interrupted job", leftovers)
    version = run_job(settings, args.domain, options, emit=emit, job_id=job_id, requested_by=args.requested_by)
    promoted = False
    if args.events_json:
        return record  # the service decides promotion, because it can hot-load
    if version.meta.get("gate", {}).get("passed") and not args.no_promote:
        mark_promoted(store, args.domain, version.version, version.meta["base_model"])
        promoted = True
    if isinstance(emit, ProgressBar):
        emit.close()
    print(metrics_table(store.version(args.domain, version.version).meta, promoted))
    if promoted:
        print(f"  {args.domain}/current = {version.version}; a running engine serves it after "
              f"`engine.reload('{args.domain}')` (or a restart)")
    status = "promoted" if promoted else "candidate"
    return _replace(record, status=status, version=version.version,
                       metrics=version.meta.get("metrics", {}), message=version.meta.get("gate", {}).get("reason", ""))


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1]}" if text else type(exc).__name__


def _replace(record: Any, **changes: Any) -> Any:
    return replace(record, at=utc_now(), **changes)


if __name__ == "__main__":
    sys.exit(main())
