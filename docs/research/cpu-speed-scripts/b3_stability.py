"""B3: the engine's 1-user rows in separate processes under different thread/memory settings.

    .venv/bin/python b3_stability.py --rounds 3 --tokens 48 --configs default,passive,thp

Each process is `python -m bench.peers.engine_side` (the engine through its face, the bench's own
1-user base and adapter rows, each the median of 3 within the process). Configurations run
round-robin (round 1: A B C ..., round 2: A B C ...), so a drift of the shared machine hits each
alike; per process the within-process runs are kept too, to tell a per-process effect (stable
inside, different across) from minute-to-minute noise (unstable inside). The load average is
recorded before each process.
"""
from __future__ import annotations

import os as _os
REPO_ROOT = _os.environ.get("LORATG_ROOT", _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "../../..")))

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = REPO_ROOT
CONFIGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "bind": {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"},
    "notok": {"TOKENIZERS_PARALLELISM": "false"},
    "1thread": {"CPU_THREADS": "1"},
    "thp+passive": {"THP_MEM_ALLOC_ENABLE": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}


def one(config: str, tokens: int) -> dict:
    env = {**os.environ, **CONFIGS[config], "PYTHONPATH": REPO}
    job = {"tokens": tokens, "users": [1], "repeat_single": 3, "deadline_s": 300.0, "quantization": "auto",
           "dtype": "auto", "kv_dtype": "auto"}
    load = os.getloadavg()[0]
    t0 = time.time()
    p = subprocess.run([f"{REPO}/.venv/bin/python", "-m", "bench.peers.engine_side"], input=json.dumps(job),
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    if p.returncode:
        return {"config": config, "error": p.stderr[-1500:]}
    d = json.loads(p.stdout)
    return {"config": config, "load": load, "wall_s": time.time() - t0,
            "base": d["rows"]["single-base"]["row"]["runs"], "adapter": d["rows"]["single-adapter"]["row"]["runs"],
            "base_median": d["rows"]["single-base"]["row"]["tokens_per_s"],
            "adapter_median": d["rows"]["single-adapter"]["row"]["tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--configs", default="default,passive,thp")
    ap.add_argument("--json")
    a = ap.parse_args()
    configs = a.configs.split(",")
    out = []
    for r in range(a.rounds):
        for c in configs:
            got = one(c, a.tokens)
            got["round"] = r + 1
            out.append(got)
            print(json.dumps(got), flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(out, f, indent=1)
    print("\nconfig        base tok/s per process (median of 3 inside)        spread   within-process spread (median)")
    for c in configs:
        rows = [o for o in out if o["config"] == c and "error" not in o]
        if not rows:
            continue
        meds = [o["base_median"] for o in rows]
        inside = [(max(o["base"]) - min(o["base"])) / statistics.median(o["base"]) for o in rows]
        print(f"{c:12s} {', '.join(f'{m:.1f}' for m in meds):45s} {100 * (max(meds) - min(meds)) / statistics.median(meds):5.0f}%"
              f"   {100 * statistics.median(inside):5.0f}%   loads " + ", ".join(f"{o['load']:.1f}" for o in rows))


if __name__ == "__main__":
    main()
