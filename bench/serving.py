"""Serving benchmark: the new decode path, the previous one and a naive baseline, one workload.

    python -m bench.serving [--device cpu|cuda] [--quick] [--tokens N] [--users 1,4,16,64]
                            [--paths new,previous,naive] [--json FILE]
    python -m bench serving -- --quick          (the same, through the bench runner)
    python -m bench.serving --peer llamacpp [--quick] (the engine beside llama.cpp: bench.peers.side_by_side)

Paths, all in the same run and process, one after the other:
  new       Engine(serving_runtime="fast"): the batched multi-LoRA decode path (issue 8)
  previous  Engine(serving_runtime="reference"): the serial oracle, transformers + peft, one request
            at a time through the engine's scheduler
  naive     plain transformers `generate`, one request at a time, peft `set_adapter` per request

The workload is fixed: eight fixed questions, greedy, a fixed number of new tokens with EOS
ignored, the `assistant` role. Rows: one user on the base model and on an adapter; N users
spread over four modes (base + legal, medical, finance) and N users on one adapter. Every
number is measured on the consumer side, from the arrival times of each stream's pieces.
Each row of the new path starts with an empty prefix cache, so it reuses only what its own
users share (their role's system prompt: a burst in one role computes it once), never an
earlier row's identical prompts; the note column says how many prompt tokens were reused.
A hot-load row then switches `legal` to a new version while 16 streams decode, and the
issue's targets are printed as "target | measured | met?". Adapters are copied into a
temporary folder; the repository's adapters/ is never written.

Prints tables; asserts nothing (these machines are shared and noisy).
"""
from __future__ import annotations
import argparse
import asyncio
import dataclasses
import datetime as dt
import gc
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from bench._serving_paths import (
    DOMAINS, ONE_ADAPTER, PROMPTS, ROLE, ROOT, SAMPLED, BenchError, EnginePath, NaivePath, Workload, make_workdir,
    use_the_fast_paths_attention, workloads,
)
from bench._serving_report import (
    COLUMNS, HOTLOAD_COLUMNS, TARGET_COLUMNS, HotLoad, Row, median_run, render_table, targets,
)

PATHS = {"new": "fast", "previous": "reference", "naive": None}
#: How --budget is shared out: the previous path is the slow one at large N, the new one repeats its rows.
BUDGET_WEIGHT = {"new": 1.5, "previous": 1.5, "naive": 1.0}


# ---- the run -------------------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    device: str
    tokens: int
    users: list[int]
    paths: list[str]
    naive_max_users: int
    deadline_s: float
    hotload_users: int
    quantization: str
    dtype: str
    kv_dtype: str
    syncs: bool
    json_path: Path | None
    budget_s: float | None = None
    repeat: int = 1

    def repeats(self, path: str, wl: Workload) -> bool:
        """Which rows are measured `repeat` times: the new path's up to 16 users (the CPU targets
        are its ratios) and the naive path's single streams (its N-user row is N requests one
        after another: an average already). The previous path is shown for comparison, once."""
        if path == "naive":
            return wl.users == 1
        return path == "new" and wl.users <= 16

    def profiles(self, path: str, wl: Workload) -> bool:
        """Which rows get a sync profile (a separate short run): every row of the new path; on the
        slower paths only the single stream with an adapter and the largest mixed row, which is
        what the issue's numbers compare (a profile of the previous path at 64 rows costs minutes)."""
        if not self.syncs:
            return False
        largest = max((n for n in self.users if n > 1), default=None)
        return path == "new" or wl.key in ("single-adapter", f"mixed-{largest}")


def plan_from_args(args: argparse.Namespace) -> Plan:
    cuda = args.device.startswith("cuda")
    budget = None
    if args.quick:
        tokens, users, naive_max, deadline = 16, [1, 4, 16], 4, 120.0
    elif cuda:  # the naive baseline is sequential: its single streams say all there is to say
        tokens, users, naive_max, deadline = 64, [1, 4, 16, 64], 1, 15.0
    else:  # bounded: 64 users of the previous path alone can take many minutes on 2 cores
        tokens, users, naive_max, deadline, budget = 48, [1, 4, 16, 64], 16, 180.0, 840.0
    return Plan(
        device=args.device, tokens=args.tokens or tokens, users=args.users or users, paths=args.paths,
        naive_max_users=naive_max if args.naive_max_users is None else args.naive_max_users,
        deadline_s=args.deadline or deadline, hotload_users=args.hotload_users, quantization=args.quantization,
        dtype=args.dtype, kv_dtype=args.kv_cache_dtype, syncs=(cuda or args.syncs) and not args.no_syncs, json_path=args.json,
        budget_s=args.budget or budget,
        repeat=args.repeat or (1 if cuda else 3),
    )


def settings_for(plan: Plan, root: Path, runtime: str | None) -> Any:
    from engine.config import load_settings

    largest = max([*plan.users, plan.hotload_users, 1])
    extra = {} if runtime is None else {"serving_runtime": runtime}
    return load_settings(
        adapters_dir=root / "adapters", templates_dir=root / "templates", model_cache_dir=ROOT / "models",
        quantization=plan.quantization, compute_dtype=plan.dtype, kv_cache_dtype=plan.kv_dtype, device=plan.device,
        max_batch_size=largest, max_queue=max(64, 2 * largest), temperature=0.0, repetition_penalty=1.0,
        template_poll_s=0.0, **extra,
    )


def header(plan: Plan, argv: Sequence[str]) -> dict[str, Any]:
    import torch

    from engine.config import load_settings
    from engine.model import torch_dtype

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    s = load_settings(quantization=plan.quantization, compute_dtype=plan.dtype, kv_cache_dtype=plan.kv_dtype,
                      device=plan.device)
    quantization = s.resolved_quantization(plan.device)
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    machine = (f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, torch threads "
               f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start")
    if plan.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(plan.device))
        machine += f"; GPU {p.name}, {p.total_memory / 2**30:.0f} GiB"
    return {
        "command": "python -m bench.serving " + " ".join(argv),
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": version("transformers"),
        "peft": version("peft"), "bitsandbytes": version("bitsandbytes"),
        "device": plan.device,
        "dtype": f"{str(torch_dtype(s, plan.device)).removeprefix('torch.')} ({plan.dtype})",
        "quantization": f"{quantization} ({plan.quantization})",
        "kv_cache": f"{s.resolved_kv_cache_dtype(plan.device)} ({plan.kv_dtype}; the new path)",
        "model": s.model,
        "workload": (f"greedy, EOS ignored, {plan.tokens} new tokens per request, {len(PROMPTS)} fixed questions, "
                     f"role {ROLE}, modes base + {', '.join(DOMAINS)}; users {','.join(map(str, plan.users))}; "
                     f"naive up to {plan.naive_max_users} users; each run cut at {plan.deadline_s:.0f} s; "
                     f"new path's rows up to 16 users and naive single streams measured {plan.repeat}x round the "
                     "workloads, median shown; the 'sampled' row: seeded sampling with the engine's defaults "
                     f"({', '.join(f'{k} {v}' for k, v in SAMPLED.items())}), EOS ignored, not on the naive path"),
    }


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.readlines()
    except OSError:
        return []


class Report:
    """Everything measured so far; printed at the end and written to --json after every path."""

    def __init__(self, meta: dict[str, Any], json_path: Path | None) -> None:
        self.meta, self.json_path = meta, json_path
        self.paths: dict[str, str] = {}
        self.rows: list[Row] = []
        self.hotloads: list[HotLoad] = []
        self.failures: dict[str, str] = {}
        self.skipped: list[str] = []  # rows left out because --budget was spent

    def save(self, complete: bool = False) -> None:
        if self.json_path is None:
            return
        data = {"meta": self.meta, "paths": self.paths, "rows": [dataclasses.asdict(r) for r in self.rows],
                "hotload": [dataclasses.asdict(h) | {"ratio": h.ratio} for h in self.hotloads],
                "targets": [dataclasses.asdict(t) for t in targets(self.rows, self.hotloads, self.meta["device"])],
                "failures": self.failures, "skipped": self.skipped, "complete": complete}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_name(self.json_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.json_path)

    def render(self, plan: Plan) -> str:
        m = self.meta
        out = ["# Serving benchmark: new vs previous decode path vs naive generate",
               f"command:      {m['command']}",
               f"machine:      {m['machine']}",
               f"software:     python {m['python']}, torch {m['torch']} (CUDA {m['cuda']}), transformers "
               f"{m['transformers']}, peft {m['peft']}, bitsandbytes {m['bitsandbytes']}",
               f"device:       {m['device']}, dtype {m['dtype']}, quantization {m['quantization']}, "
               f"KV cache {m.get('kv_cache', '?')}, model {m['model']}",
               f"attention:    {m.get('attention', '?')}; the note column names the kernels a row's sync profile saw",
               f"workload:     {m['workload']}"]
        out += [f"path          {d}" for d in self.paths.values()]
        order = {w.key: i for i, w in enumerate(workloads(plan.users))}
        rows = sorted(self.rows, key=lambda r: (order.get(r.workload, 99), plan.paths.index(r.path)))
        out.append(render_table(
            "Throughput and latency (aggregate tok/s; TTFT from submission; gaps between a stream's pieces)",
            COLUMNS, [r.cells() for r in rows]))
        if not plan.device.startswith("cuda"):
            out.append("peak MiB: peak RSS above the start of the row (CPU); syncs/step: CUDA only")
        else:
            out.append("peak MiB: torch.cuda.max_memory_allocated during the row (weights included); syncs/step: "
                       "cudaStreamSynchronize/DeviceSynchronize/EventSynchronize/cudaMemcpy per decode step "
                       "(torch.profiler over a separate short run; on the previous and naive paths only for "
                       "the single stream with an adapter and the largest mixed row)")
        skipped = [n for n in plan.users if n > plan.naive_max_users]
        if "naive" in plan.paths and skipped:
            out.append(f"naive: not run for {', '.join(map(str, skipped))} users (--naive-max-users "
                       f"{plan.naive_max_users}); one request at a time, its tok/s does not grow with N")
        if self.hotloads:
            out.append(render_table(
                f"Hot-load: reload('{ONE_ADAPTER}') v1 -> v2 while {plan.hotload_users} streams decode (4 modes)",
                HOTLOAD_COLUMNS, [h.cells() for h in self.hotloads]))
        kind = "CUDA" if plan.device.startswith("cuda") else "CPU"
        out.append(render_table(f"Issue 8 targets ({kind}), measured in this run", TARGET_COLUMNS,
                                [[t.target, t.new, t.previous, t.met] for t in
                                 targets(self.rows, self.hotloads, plan.device)]))
        if self.skipped:
            out.append(f"not run (the path's share of --budget {plan.budget_s:.0f} s was spent): "
                       f"{'; '.join(self.skipped)}")
        for path, why in self.failures.items():
            out.append(f"!! {path}: {why}")
        return "\n".join(out)


def _say(text: str) -> None:
    """Progress on stderr, so stdout holds only the tables."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


#: A row is not started with less than this left of its path's share of --budget.
MIN_ROW_S = 10.0


async def run_path(name: str, plan: Plan, root: Path, report: Report, budget_end: float | None) -> None:
    """Load one path, warm it up, measure its rows and its hot-load, unload it.

    With a budget, every run inside is cut at the budget's end too, and a row that would
    start with less than MIN_ROW_S left is skipped and listed instead.
    """
    def over_budget() -> bool:
        return budget_end is not None and budget_end - time.monotonic() < MIN_ROW_S

    def deadline() -> float:
        left = float("inf") if budget_end is None else budget_end - time.monotonic()
        return max(1.0, min(plan.deadline_s, left))

    runtime = PATHS[name]
    settings = settings_for(plan, root, runtime)
    runner: Any = NaivePath(settings, root, plan.device) if runtime is None else \
        EnginePath(name, runtime, settings, root, plan.device)
    _say(f"{name}: loading")
    try:
        await runner.start()
        report.paths[name] = runner.describe()
        _say(report.paths[name])
        chosen = [w for w in workloads(plan.users)
                  if name != "naive" or (w.users <= plan.naive_max_users and not w.sampled)]
        await runner.warm_up([w.users for w in chosen], plan.tokens, deadline())
        runs: dict[str, list[Row]] = {}
        # repetitions go round the workloads, so a drift of the machine's speed hits every row alike
        for rep in range(plan.repeat):
            for wl in chosen:
                if rep and not plan.repeats(name, wl):
                    continue
                if over_budget():
                    if not rep:
                        report.skipped.append(f"{name}: {wl.label}")
                    continue
                runs.setdefault(wl.key, []).append(await runner.measure(wl, plan.tokens, deadline()))
        for wl in chosen:
            if wl.key not in runs:
                continue
            row = median_run(runs[wl.key])
            if plan.profiles(name, wl) and not over_budget():
                try:
                    got = await runner.syncs(wl, deadline() / 2)
                except Exception as exc:  # the profiler is a guest here: its failure is a note, not a crash
                    got = f"profile failed: {type(exc).__name__}: {exc}"
                if isinstance(got, tuple):
                    row.syncs_per_step, row.dtoh_per_step, row.sync_steps, row.attention = got
                else:
                    row.note = "; ".join(filter(None, [row.note, f"syncs: {got}"]))
            report.rows.append(row)
            _say(f"{name:<8} {wl.label:<28} {row.tokens_per_s:9.1f} tok/s  TTFT p50 {row.ttft_p50_ms or 0:8.1f} ms  "
                 f"gap p50 {row.gap_p50_ms or 0:7.1f} ms  syncs/step {row.syncs_per_step}  {row.note}")
        if isinstance(runner, EnginePath) and plan.hotload_users > 0:
            if over_budget():
                report.skipped.append(f"{name}: hot-load")
            else:
                hot = await runner.hot_load(plan.hotload_users, deadline() / 2)
                report.hotloads.append(hot)
                _say(f"{name:<8} hot-load: reload {hot.reload_ms or 0:.0f} ms, median step "
                     f"{hot.median_step_ms or 0:.1f} ms, longest gap {hot.longest_reload_ms or 0:.1f} ms {hot.note}")
    finally:
        await runner.close()
        del runner
        gc.collect()
        if plan.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
        report.save()


async def run(plan: Plan, argv: Sequence[str]) -> int:
    """Every path in turn; on SIGTERM (a `timeout` around the run) the tables so far still print."""
    attention = use_the_fast_paths_attention(plan.device)  # process-wide: before any path loads
    report = Report(header(plan, argv) | {"attention": attention}, plan.json_path)
    root = make_workdir()
    budget_end = None if plan.budget_s is None else time.monotonic() + plan.budget_s
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)  # type: ignore[union-attr]
    except (NotImplementedError, RuntimeError):
        pass
    code = 0
    try:
        for i, name in enumerate(plan.paths):
            share = None  # each path gets its weight's part of what is left; one that ends early leaves more
            if budget_end is not None:
                left = budget_end - time.monotonic()
                if left < MIN_ROW_S:
                    report.skipped.append(f"{name}: the whole path")
                    continue
                weights = [BUDGET_WEIGHT[p] for p in plan.paths[i:]]
                share = time.monotonic() + left * weights[0] / sum(weights)
            try:
                await run_path(name, plan, root, report, share)
            except Exception as exc:  # one broken path must not hide the others' numbers
                traceback.print_exc()
                report.failures[name] = f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        report.failures["run"] = "stopped by SIGTERM (time limit): the tables hold what was measured until then"
        code = 124
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)
    report.save(complete=not report.failures and not report.skipped)
    print(report.render(plan), flush=True)
    return code or (1 if report.failures else 0)


# ---- command line --------------------------------------------------------------------------

def _counts(option: str, example: str, high: int) -> Callable[[str], list[int]]:
    """A parser of comma-separated counts 1..high for `option`."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} {text!r}: expected numbers separated by commas, like {example}")
        if not values or any(not 1 <= v <= high for v in values):
            raise argparse.ArgumentTypeError(f"{option} {text!r}: each count must be between 1 and {high}")
        return sorted(set(values))
    return parse


_users = _counts("--users", "1,4,16,64", 512)
_peer_threads = _counts("--peer-threads", "1,2", 256)


def _paths(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in values if v not in PATHS]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"--paths {text!r}: expected some of {', '.join(PATHS)}, comma-separated")
    return list(dict.fromkeys(values))


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
        return v
    return parse


def _at_least_zero(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return v


def build_parser() -> argparse.ArgumentParser:
    from typing import get_args

    from engine.config import DType, Quantization

    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when torch sees one, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on a 2-core CPU: 16 tokens, users 1,4,16, naive up to 4 users")
    p.add_argument("--tokens", type=_positive(int), help="new tokens per request (default 48 on CPU, 64 on CUDA)")
    p.add_argument("--users", type=_users, help="concurrent users per row, e.g. 1,4,16,64 (the default)")
    p.add_argument("--paths", type=_paths, default=list(PATHS), help="which of new,previous,naive to run, in order")
    p.add_argument("--json", type=Path, help="also write every number to this file (rewritten after each path)")
    p.add_argument("--quantization", choices=get_args(Quantization), default="auto",
                   help="QUANTIZATION for all three paths (default auto: the engine's choice for the device)")
    p.add_argument("--dtype", choices=get_args(DType), default="auto",
                   help="COMPUTE_DTYPE for all three paths")
    p.add_argument("--kv-cache-dtype", choices=get_args(DType), default="auto",
                   help="KV_CACHE_DTYPE of the new path (the others keep transformers' cache in the compute dtype)")
    p.add_argument("--naive-max-users", type=_at_least_zero, help="largest N the naive baseline runs (it is sequential)")
    p.add_argument("--deadline", type=_positive(float), help="seconds after which a row's streams are cut")
    p.add_argument("--hotload-users", type=_at_least_zero, default=16, help="streams decoding during the hot-load (0: skip)")
    syncs = p.add_mutually_exclusive_group()
    syncs.add_argument("--no-syncs", action="store_true", help="on CUDA, skip the torch.profiler sync count")
    syncs.add_argument("--syncs", action="store_true",
                       help="run the sync profile on CPU too (it counts 0 there; checks the profiling itself)")
    p.add_argument("--repeat", type=_positive(int),
                   help="measure each row up to 16 users this many times, round the workloads, and report the "
                   "median (default 3 on CPU, whose speed drifts from minute to minute; 1 on CUDA)")
    p.add_argument("--threads", type=_positive(int),
                   help="torch CPU threads for every path (default: the engine's CPU_THREADS rule, every usable "
                   "core)")
    p.add_argument("--peer", choices=("llamacpp",),
                   help="instead of the paths above: the engine beside llama.cpp (node-llama-cpp) in alternating "
                   "processes, median ratios and their range (bench.peers.side_by_side; users 1,16,64 unless "
                   "--users says otherwise; CPU only)")
    p.add_argument("--versus", choices=get_args(Quantization),
                   help="with --peer: each alternation also runs the engine with this QUANTIZATION (e.g. bf16), "
                   "and a table shows the engine over itself in it")
    p.add_argument("--peer-threads", type=_peer_threads,
                   help="with --peer: llama.cpp's thread counts, each run in every alternation; its figure is its "
                   "best of them (default: 1 and the engine's thread count)")
    p.add_argument("--peer-runs", type=_positive(int), default=3,
                   help="processes of each side with --peer, alternating (default 3)")
    p.add_argument("--budget", type=_positive(float),
                   help="seconds for the whole run, shared out between the paths; runs are cut at the end of "
                   "their path's share and rows that would start later are skipped and listed (default: "
                   "840 for the full CPU run, none otherwise)")
    return p


def run_beside_peer(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """--peer: the engine and the peer in alternating processes (bench.peers.side_by_side)."""
    if args.device != "cpu":
        print(f"--peer {args.peer}: the peer runs on the CPU, so the engine is compared there too; "
              f"use --device cpu (not {args.device})", file=sys.stderr)
        return 2
    from bench.peers import side_by_side

    return side_by_side.run(args, argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from engine.logs import LibraryNoiseFilter

    logging.getLogger().handlers[0].addFilter(LibraryNoiseFilter())  # a library warning once, not every step
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecations would bury the tables
    import torch

    if args.device is None:
        args.device = "cpu" if args.peer else "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        from bench import use_cpu_threads

        use_cpu_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: torch {torch.__version__} sees no CUDA device here; use --device cpu",
              file=sys.stderr)
        return 2
    if args.device != "cpu" and not args.device.startswith("cuda"):
        print(f"--device {args.device!r}: expected cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if args.peer:
        return run_beside_peer(args, argv)
    plan = plan_from_args(args)
    try:
        return asyncio.run(run(plan, argv))
    except BenchError as exc:
        print(f"bench.serving: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
