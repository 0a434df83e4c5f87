"""One user's speed over separate engine processes, by how OpenMP's idle threads wait.

    python -m bench.wait_policy [--rounds 3] [--tokens 48] [--neighbours 0] [--quantization auto]

Each setting runs in its own process (`bench.peers.engine_side`: one user on the base model and
on an adapter, each the median of 3 streams), settings in turn, `--rounds` times; the table
shows each setting's median tok/s and its spread over the processes ((max - min) / median).
`--neighbours N` runs N busy-loop processes beside the whole time (another tenant, a training
job). Settings: the engine's default (a bounded spin, GOMP_SPINCOUNT=30000), libgomp's default spin
(GOMP_SPINCOUNT=300000), sleeping at once (OMP_WAIT_POLICY=PASSIVE) and one thread (CPU_THREADS=1).
Prints tables; asserts nothing (these machines are shared and noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench.engine import ROOT, table

SETTINGS = {
    "GOMP_SPINCOUNT=30000 (engine default)": {},
    "GOMP_SPINCOUNT=300000 (libgomp default)": {"GOMP_SPINCOUNT": "300000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "CPU_THREADS=1": {"CPU_THREADS": "1"},
}
ROWS = ("single-base", "single-adapter")
#: One process is stopped after this long: a collapsed setting must not hold the bench for minutes.
RUN_TIMEOUT_S = 300.0


def one_process(extra: dict[str, str], job: dict[str, object]) -> dict[str, float | None]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CPU_THREADS")}
    env.update(extra)
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.peers.engine_side"], input=json.dumps(job), env=env,
                              capture_output=True, text=True, cwd=ROOT, timeout=RUN_TIMEOUT_S)
        rows = json.loads(proc.stdout)["rows"]
    except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError):
        return {key: None for key in ROWS}
    return {key: None if rows[key]["row"]["cut"] else rows[key]["row"]["tokens_per_s"] for key in ROWS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wait_policy", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--neighbours", type=int, default=0, help="busy-loop processes beside the engine")
    p.add_argument("--quantization", default="auto")
    args = p.parse_args(argv)
    from bench.peers.side_by_side import cpu_model

    job = {"tokens": args.tokens, "users": [1], "repeat_single": 3, "deadline_s": RUN_TIMEOUT_S / 2,
           "quantization": args.quantization, "dtype": "auto", "kv_dtype": "auto"}
    got: dict[str, dict[str, list[float | None]]] = {name: {key: [] for key in ROWS} for name in SETTINGS}
    loads = [os.getloadavg()[0]]
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.neighbours)]
    try:
        for r in range(args.rounds):
            for name, extra in SETTINGS.items():
                started = time.monotonic()
                for key, value in one_process(extra, job).items():
                    got[name][key].append(value)
                loads.append(os.getloadavg()[0])
                print(f"round {r + 1}, {name}: {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    finally:
        for hog in hogs:
            hog.kill()
    print(f"# bench.wait_policy: {cpu_model()}, {args.tokens} tokens, QUANTIZATION={args.quantization}, "
          f"{args.neighbours} busy neighbours, load average {min(loads):.1f}-{max(loads):.1f}")
    rows = []
    for name, by_row in got.items():
        for key, values in by_row.items():
            ok = [v for v in values if v is not None]
            med = statistics.median(ok) if ok else None
            rows.append([name, key, "-" if med is None else f"{med:.1f}",
                         "-" if med is None else f"{100 * (max(ok) - min(ok)) / med:.0f}%",
                         " / ".join("cut" if v is None else f"{v:.1f}" for v in values)])
    table(f"one user, tok/s over {args.rounds} processes per setting",
          ["setting", "row", "median", "spread", "each process"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
