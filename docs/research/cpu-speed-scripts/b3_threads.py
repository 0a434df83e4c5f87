"""B3: which threads an engine process has, and which of them burn CPU while one user decodes.

    PYTHONPATH=. .venv/bin/python b3_threads.py [--tokens 64]

Starts the engine like the bench (greedy, EOS ignored), streams one answer, and reads
/proc/self/task/*/stat (utime + stime, in clock ticks) before and after: the CPU seconds each
thread used during the stream, and its name.
"""
from __future__ import annotations

import os as _os
REPO_ROOT = _os.environ.get("LORATG_ROOT", _os.path.abspath(_os.path.join(_os.path.dirname(__file__), "../../..")))

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, REPO_ROOT)


def threads() -> dict[int, tuple[str, float]]:
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                parts = f.read().rsplit(")", 1)
            name = open(f"/proc/self/task/{tid}/comm").read().strip()
            fields = parts[1].split()
            out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
        except OSError:
            pass
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    from bench import use_cpu_threads
    from bench._serving_paths import PROMPTS, ROLE, TODAY, make_workdir
    from bench.serving import Plan, settings_for
    from engine import Engine, GenerationParams, Message, Mode, UserContext

    use_cpu_threads(None)
    root = make_workdir()
    plan = Plan(device="cpu", tokens=a.tokens, users=[1], paths=["new"], naive_max_users=0, deadline_s=300,
                hotload_users=0, quantization="auto", dtype="auto", kv_dtype="auto", syncs=False, json_path=None)
    eng = Engine(settings_for(plan, root, "fast"))
    await eng.start()
    params = GenerationParams(max_new_tokens=a.tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    user = UserContext(language="en", today=TODAY)
    async for _ in eng.generate([Message("user", PROMPTS[0])], Mode(None, ROLE), params, user=user):
        pass
    before = threads()
    t0 = time.perf_counter()
    n = 0
    async for _ in eng.generate([Message("user", PROMPTS[1])], Mode("legal", ROLE), params, user=user):
        n += 1
    wall = time.perf_counter() - t0
    after = threads()
    print(f"{n} pieces in {wall:.2f} s ({n / wall:.1f}/s); threads now: {len(after)}; "
          f"process affinity {sorted(os.sched_getaffinity(0))}")
    import threading

    py = {t.native_id: t.name for t in threading.enumerate()}
    rows = []
    for tid, (name, cpu) in after.items():
        name = py.get(tid, name if name != "python" else "(native: OpenMP/Rayon/other)")
        used = cpu - before.get(tid, (name, 0.0))[1]
        rows.append((used, tid, name))
    for used, tid, name in sorted(rows, reverse=True):
        print(f"  {name:20s} tid {tid:7d}  CPU {used:6.2f} s  ({100 * used / wall:5.1f}% of the wall time)")
    await eng.close()


if __name__ == "__main__":
    asyncio.run(main())
