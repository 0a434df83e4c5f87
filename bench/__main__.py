"""`python -m bench [name ...]`: run the benchmark modules of this folder, one after the other.

Every `bench/<name>.py` (except `_`-prefixed files) is a benchmark that prints its own
tables when run as `python -m bench.<name>`. Each runs in its own process, so one that
crashes or leaks a model does not take the others with it, and memory is freed between
them. A failing benchmark is reported and the rest still run; the exit code is non-zero if
any failed. Arguments after `--` go to the selected benchmarks unchanged.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
#: Run first, in this order (cheapest and most basic first); any other module follows by name.
PREFERRED_ORDER = ("engine", "bot_frontend", "training")


@dataclass(frozen=True)
class Outcome:
    name: str
    returncode: int
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def discover(folder: Path = BENCH_DIR) -> list[str]:
    """Benchmark module names in the folder, preferred ones first, then alphabetical."""
    names = {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_")}
    first = [n for n in PREFERRED_ORDER if n in names]
    return first + sorted(names - set(first))


def run_one(name: str, args: list[str]) -> Outcome:
    """`python -m bench.<name> [args]` from the project root (where `.env`, adapters/ and models/ are)."""
    cmd = [sys.executable, "-m", f"bench.{name}", *args]
    started = time.monotonic()
    try:
        code = subprocess.run(cmd, cwd=PROJECT_ROOT).returncode
    except OSError as exc:
        print(f"cannot start {' '.join(cmd)}: {exc}", file=sys.stderr)
        code = 127
    return Outcome(name, code, time.monotonic() - started)


def _describe(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def build_parser(available: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run the benchmarks in bench/, one after the other, each in its own process.",
        epilog=f"benchmarks: {', '.join(available) or '(none found)'}. "
               "Example: python -m bench engine -- --help",
    )
    p.add_argument("names", nargs="*", metavar="name", help="benchmarks to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    forwarded: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, forwarded = argv[:i], argv[i + 1:]
    available = discover()
    args = build_parser(available).parse_args(argv)
    if args.list:
        print("\n".join(available))
        return 0
    unknown = [n for n in args.names if n not in available]
    if unknown:
        print(f"no benchmark named {', '.join(unknown)} in {BENCH_DIR}; available: "
              f"{', '.join(available) or 'none'}", file=sys.stderr)
        return 2
    selected = args.names or available
    if not selected:
        print(f"no benchmark modules in {BENCH_DIR}", file=sys.stderr)
        return 2

    outcomes: list[Outcome] = []
    try:
        for n, name in enumerate(selected, 1):
            print(f"\n{'=' * 78}\n== bench.{name}  ({n}/{len(selected)})\n{'=' * 78}", flush=True)
            outcome = run_one(name, forwarded)
            outcomes.append(outcome)
            if not outcome.ok:
                print(f"!! bench.{name} failed ({_describe(outcome.returncode)})", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted; the remaining benchmarks were not run", file=sys.stderr)
        return 130

    print(f"\n{'=' * 78}\nSummary", flush=True)
    for o in outcomes:
        status = "ok" if o.ok else f"FAILED ({_describe(o.returncode)})"
        print(f"  bench.{o.name:<16} {status:<28} {o.seconds:8.1f} s")
    failed = [o.name for o in outcomes if not o.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
