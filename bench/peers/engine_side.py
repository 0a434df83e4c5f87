"""The engine's side of a side-by-side run: one process, the rows the peer is compared on.

    python -m bench.peers.engine_side < job.json > result.json

The job names the new tokens, the user counts, how often the single streams repeat and the
settings (quantization, dtypes); the engine (`serving_runtime="fast"`) is driven through its face
exactly as `bench.serving` drives it (`bench._serving_paths.EnginePath`), each row from an empty
prefix cache. stdout holds only the JSON result; progress goes to stderr.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

from bench._serving_paths import EnginePath, make_workdir, workloads
from bench._serving_report import summarize
from bench.peers._arith import median_measured, per_user


def rows_for(users: list[int]) -> list[Any]:
    """The engine rows a peer is compared on: both single streams and each N > 1 over 4 modes."""
    keep = {"single-base", "single-adapter", *(f"mixed-{n}" for n in users if n > 1)}
    return [w for w in workloads(users) if w.key in keep]


async def measure(job: dict[str, Any], root: Path) -> dict[str, Any]:
    from bench.serving import Plan, settings_for

    users = sorted(set(job["users"]) | {1})
    plan = Plan(device="cpu", tokens=job["tokens"], users=users, paths=["new"], naive_max_users=0,
                deadline_s=job["deadline_s"], hotload_users=0, quantization=job["quantization"], dtype=job["dtype"],
                kv_dtype=job["kv_dtype"], syncs=False, json_path=None)
    runner = EnginePath("new", "fast", settings_for(plan, root, "fast"), root, "cpu")
    await runner.start()
    try:
        chosen = rows_for(users)
        await runner.warm_up([w.users for w in chosen], plan.tokens, plan.deadline_s)
        got: dict[str, list[tuple[Any, float | None]]] = {}
        for rep in range(job["repeat_single"]):  # round the rows, so a drift of the machine hits each alike
            for wl in chosen:
                if rep and wl.users > 1:
                    continue
                runner.cold_prefix_cache()
                traces, started, ended, cut, _ = await runner.drive(wl, plan.tokens, plan.deadline_s)
                row = summarize(traces, workload=wl.key, label=wl.label, path="engine", tokens_each=plan.tokens,
                                started=started, ended=ended, cut=cut, deadline_s=plan.deadline_s)
                got.setdefault(wl.key, []).append((row, per_user(traces)))
                print(f"engine: {wl.label} {row.tokens_per_s:.1f} tok/s", file=sys.stderr, flush=True)
        out = {key: median_measured(runs).to_json() for key, runs in got.items()}
        st = runner.engine.status()
        info = {"describe": runner.describe(), "quantization": st.quantization, "dtype": st.dtype,
                "model_bytes": st.model_bytes}
        return {"rows": out, "info": info}
    finally:
        await runner.close()


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    job = json.loads(sys.stdin.read())
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    from bench import use_cpu_threads

    threads = use_cpu_threads(None)
    root = make_workdir()
    try:
        result = asyncio.run(measure(job, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["info"]["threads"] = threads
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
