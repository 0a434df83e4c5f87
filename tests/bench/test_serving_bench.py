"""`python -m bench.serving`: its smallest run end to end on the real model, its arithmetic, its CLI.

Behaviour only: which rows and columns come out, that every number was measured, that the
repository's adapters are left alone. No timing threshold (the machines are shared).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import _serving_report as rep
from bench.__main__ import discover

ROOT = Path(__file__).resolve().parents[2]
PATHS = ("new", "previous", "naive")
WORKLOADS = ("single-base", "single-adapter", "mixed-2", "uniform-2")
TOKENS = 3


def _bench(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench.serving", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _adapters_snapshot() -> dict[str, object]:
    """Every file under the repo's adapters/ with its size and mtime: the benchmark must not touch it."""
    return {str(p.relative_to(ROOT)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted((ROOT / "adapters").rglob("*")) if p.is_file()}


@pytest.mark.model
def test_smallest_run_prints_every_row_of_every_path(tmp_path: Path) -> None:
    before = _adapters_snapshot()
    out = tmp_path / "serving.json"
    # one thread: on a shared 2-core machine two OpenMP threads spin at every barrier (5-20x slower)
    proc = _bench("--device", "cpu", "--tokens", str(TOKENS), "--users", "1,2", "--hotload-users", "2",
                  "--threads", "1", "--repeat", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _adapters_snapshot() == before

    data = json.loads(out.read_text())
    assert data["complete"] is True and data["failures"] == {}
    assert set(data["paths"]) == set(PATHS)
    assert data["meta"]["device"] == "cpu"
    rows = {(r["workload"], r["path"]): r for r in data["rows"]}
    # the sampled row (the engine's default sampling) on the engine's paths, not the naive one
    assert set(rows) == {(w, p) for w in WORKLOADS for p in PATHS} | {("sampled-2", "new"), ("sampled-2", "previous")}
    for (workload, path), r in rows.items():
        users = 1 if workload.startswith("single") else 2
        assert r["users"] == users
        # EOS ignored, greedy or sampled: exactly the asked number of tokens on every path
        assert r["tokens"] == users * TOKENS == r["expected_tokens"], (workload, path, r["note"])
        assert r["tokens_per_s"] > 0 and not r["cut"]
        assert r["ttft_p50_ms"] is not None and r["ttft_p50_ms"] <= r["ttft_p95_ms"]
        assert r["gap_p50_ms"] is not None and r["gap_p50_ms"] <= r["gap_p99_ms"]
        assert r["peak_mib"] is not None and r["peak_mib"] >= 0
        assert r["syncs_per_step"] is None  # CPU: n/a
        # the new path's rows and naive single streams measured twice, the median kept
        repeated = path == "new" or (path == "naive" and users == 1)
        assert len(r["runs"]) == (2 if repeated else 1), (workload, path)
        assert min(r["runs"]) <= r["tokens_per_s"] <= max(r["runs"])

    hot = {h["path"]: h for h in data["hotload"]}
    assert set(hot) == {"new", "previous"}  # the naive baseline has no hot-load
    h = hot["new"]
    assert h["streams"] == 2
    assert h["loaded"] == "legal v1 -> v2", h["note"]
    assert h["reload_ms"] > 0 and h["median_step_ms"] > 0 and h["ratio"] is not None
    # the reference path is the serial oracle: its streams never decode together
    assert "one request at a time" in hot["previous"]["note"] and hot["previous"]["reload_ms"] is None

    names = [t["target"] for t in data["targets"]]
    assert len(names) == 5 and names[0].startswith("1 user: adapter")
    assert next(t for t in data["targets"] if t["target"].startswith("1 user"))["met"] in ("yes", "no")
    assert all(t["met"].startswith("not measured") for t in data["targets"] if "16 users" in t["target"])

    text = proc.stdout
    for column in (*rep.COLUMNS, *rep.HOTLOAD_COLUMNS, *rep.TARGET_COLUMNS):
        assert column in text
    lines = text.splitlines()
    for label in ("1 user, base", "1 user, adapter (legal)", "2 users, 4 modes", "2 users, 1 adapter (legal)"):
        got = [ln.split("|")[2].strip() for ln in lines if ln.startswith(f"| {label} ")]
        assert got == list(PATHS), label
    sampled = [ln.split("|")[2].strip() for ln in lines if ln.startswith("| 2 users, 4 modes, sampled ")]
    assert sampled == ["new", "previous"]
    for field in ("machine:", "torch threads 1", "torch 2", "device:       cpu", "quantization", "EOS ignored",
                  "temperature 0.7", "KV cache float32", "attention:"):
        assert field in text
    # each path says whether it decodes through CUDA graphs and which attention it may use
    described = data["paths"]
    assert "no CUDA graphs (CPU)" in described["new"] and "attention SDPA" in described["new"]
    assert "no CUDA graphs" in described["previous"] and "attention transformers sdpa" in described["previous"]
    assert "no CUDA graphs" in described["naive"] and "attention transformers sdpa" in described["naive"]


@pytest.mark.model
def test_sync_profile_window_runs_on_a_live_engine(tmp_path: Path) -> None:
    """The CUDA-only column's machinery (profile window over a running batch, steps counted by the
    engine's step histogram), forced on CPU: no CUDA syncs there, but real steps and no error."""
    out = tmp_path / "serving.json"
    proc = _bench("--device", "cpu", "--paths", "new", "--users", "1", "--tokens", "2", "--hotload-users", "0",
                  "--threads", "1", "--syncs", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["workload"] for r in rows] == ["single-base", "single-adapter"]
    for r in rows:
        assert r["syncs_per_step"] == 0.0 and r["dtoh_per_step"] == 0.0, r["note"]
        assert r["sync_steps"] >= 4
        # the profiler sees the model thread's CUDA kernels, not its CPU ops: nothing to name on a CPU
        assert r["attention"] is None


def test_a_row_without_a_sync_count_shows_n_a() -> None:
    assert rep.Row("single-base", "1 user", "new", 1, 2, 2, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0).cells()[9] == "n/a"


@pytest.mark.parametrize("args, message", [
    (("--users", "0,4"), "between 1 and 512"),
    (("--users", "a,b"), "numbers separated by commas"),
    (("--paths", "new,fast"), "expected some of new, previous, naive"),
    (("--tokens", "-3"), "must be above 0"),
])
def test_bad_arguments_are_refused_with_the_reason(args: tuple[str, ...], message: str) -> None:
    proc = _bench(*args, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_cuda_asked_without_a_gpu_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal only happens without one")
    proc = _bench("--device", "cuda", timeout=120)
    assert proc.returncode == 2
    assert "sees no CUDA device" in proc.stderr and "--device cpu" in proc.stderr


def test_the_bench_runner_lists_it() -> None:
    assert "serving" in discover()


# ---- the arithmetic, on hand-made timestamps ------------------------------------------------

def _trace(submitted: float, *arrivals: float) -> rep.Trace:
    return rep.Trace(submitted, list(arrivals), tokens=len(arrivals), finish="length")


def test_summary_counts_from_submission_and_pools_gaps() -> None:
    traces = [_trace(0.0, 0.5, 0.6, 0.7), _trace(0.0, 1.0, 1.2, 1.4)]
    row = rep.summarize(traces, workload="mixed-2", label="2 users", path="new", tokens_each=3, started=0.0,
                        ended=9.0, cut=False)
    assert row.tokens == 6 and row.note == ""
    assert row.seconds == pytest.approx(1.4)  # to the last piece, not to `ended`
    assert row.tokens_per_s == pytest.approx(6 / 1.4)
    assert row.ttft_p50_ms == pytest.approx(750.0)
    assert row.gap_p50_ms == pytest.approx(150.0)
    assert row.gap_p99_ms == pytest.approx(200.0, rel=0.01)


def test_repeated_runs_report_the_median_run_with_the_spread() -> None:
    def run(seconds: float) -> rep.Row:
        return rep.summarize([_trace(0.0, seconds / 2, seconds)], workload="single-base", label="1", path="new",
                             tokens_each=2, started=0.0, ended=seconds, cut=False)

    runs = [run(1.0), run(4.0), run(2.0)]  # 2, 0.5 and 1 tok/s
    row = rep.median_run(runs)
    assert row.tokens_per_s == pytest.approx(1.0) and row.seconds == pytest.approx(2.0)
    assert row.runs == [pytest.approx(2.0), pytest.approx(0.5), pytest.approx(1.0)]
    assert row.note.startswith("median of 3 runs (0.5")
    assert rep.median_run(runs[:2]).tokens_per_s == pytest.approx(0.5)  # even count: the lower middle
    assert rep.median_run(runs[:1]).note == ""


def test_prefix_cache_reuse_is_noted() -> None:
    t = _trace(0.0, 0.5, 0.6)
    t.prompt_tokens, t.cached_tokens = 70, 47
    row = rep.summarize([t], workload="single-base", label="1", path="new", tokens_each=2, started=0.0, ended=1.0,
                        cut=False)
    assert row.note == "prefix cache: 47/70 prompt tokens"


def test_summary_notes_a_cut_run_and_streams_that_stopped_early() -> None:
    stopped = rep.Trace(0.0, [0.5], tokens=1, finish="stop")
    silent = rep.Trace(0.0, [], tokens=0, finish=None)
    row = rep.summarize([_trace(0.0, 0.5, 0.6), stopped, silent], workload="mixed-3", label="3", path="previous",
                        tokens_each=2, started=0.0, ended=5.0, cut=True, deadline_s=5)
    assert row.cut and row.seconds == pytest.approx(5.0)
    assert "cut at 5 s" in row.note and "3/6 tokens" in row.note
    assert "1 streams got no token" in row.note and "1 stopped at EOS" in row.note


def test_hotload_takes_the_longest_gap_touching_the_reload() -> None:
    steady = [0.1 * i for i in range(1, 30)]
    slow = [t + (0.25 if t > 1.5 else 0.0) for t in steady]  # one 350 ms gap across the reload at 1.5 s
    h = rep.hotload_summary([_trace(0.0, *steady), _trace(0.0, *slow)], path="new", steady_from=0.2,
                            steady_to=3.5, reload_from=1.45, reload_to=1.55, loaded="legal v1 -> v2")
    assert h.median_step_ms == pytest.approx(100.0)
    assert h.longest_reload_ms == pytest.approx(350.0)
    assert h.ratio == pytest.approx(3.5)


def _row(workload: str, path: str, tps: float, **kw: object) -> rep.Row:
    users = 1 if workload.startswith("single") else int(workload.split("-")[1])
    base = dict(workload=workload, label=workload, path=path, users=users, tokens=10 * users,
                expected_tokens=10 * users, seconds=1.0, tokens_per_s=tps, ttft_p50_ms=100.0, ttft_p95_ms=100.0,
                gap_p50_ms=10.0, gap_p99_ms=10.0)
    base.update(kw)
    return rep.Row(**base)  # type: ignore[arg-type]


def test_cpu_targets_compare_the_new_path_and_never_pass_an_incomplete_run() -> None:
    rows = [_row("single-base", "new", 10), _row("single-adapter", "new", 9.5), _row("mixed-16", "new", 80),
            _row("uniform-16", "new", 100), _row("mixed-4", "naive", 10), _row("single-base", "previous", 10),
            _row("single-adapter", "previous", 5)]
    hot = [rep.HotLoad("new", 16, 50.0, 100.0, 150.0, 150.0, "legal v1 -> v2")]
    got = {t.target: t for t in rep.targets(rows, hot, "cpu")}
    by = lambda prefix: next(t for k, t in got.items() if k.startswith(prefix))  # noqa: E731
    assert by("1 user: adapter").met == "yes" and by("1 user: adapter").previous == "0.50x"
    naive = by("16 users over 4 modes >= 8x")
    assert "mixed-4" in naive.target and naive.met == "yes"  # 80 / 10, against its largest mixed row
    assert by("16 users over 4 modes >= 5x").met == "yes"  # 80 / 10
    assert by("mixed >= 0.9x").met == "no"  # 0.8
    assert by("hot-load").met == "yes" and by("hot-load").new.startswith("1.50x")

    rows[2] = _row("mixed-16", "new", 1000, cut=True)
    got = {t.target: t for t in rep.targets(rows, hot, "cpu")}
    assert by("16 users over 4 modes >= 5x").met == "no"
    assert "incomplete" in by("16 users over 4 modes >= 5x").new


def test_cuda_targets_include_absolute_rates_and_syncs() -> None:
    rows = [_row("single-base", "new", 500, ttft_p50_ms=10.0), _row("single-adapter", "new", 450),
            _row("mixed-64", "new", 12_000, ttft_p50_ms=25.0, syncs_per_step=1.0, dtoh_per_step=1.0, sync_steps=24),
            _row("uniform-64", "new", 12_500)]
    got = {t.target: t.met for t in rep.targets(rows, [], "cuda")}
    assert list(got.values()) == ["yes", "yes", "yes", "yes", "yes"]
    rows[2].syncs_per_step = 6.0
    assert rep.targets(rows, [], "cuda")[-1].met == "no"


def test_sync_count_reads_the_cuda_runtime_calls_of_a_profile() -> None:
    names = ["aten::mm", "cudaLaunchKernel", "cudaMemcpyAsync", "cudaStreamSynchronize",
             "Memcpy DtoH (Device -> Pageable)", "cudaStreamSynchronize", "Memcpy HtoD (Pageable -> Device)",
             "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize"]
    assert rep.count_syncs(names) == (5, 1)


def test_attention_is_named_by_the_aten_op_or_the_cuda_kernel_a_profile_saw() -> None:
    assert rep.attention_kinds(["aten::mm", "aten::_scaled_dot_product_efficient_attention",
                                "aten::_efficient_attention_forward"]) == "efficient"
    assert rep.attention_kinds(["aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_attention_math"]) \
        == "cuDNN + math"
    # a replayed CUDA graph shows kernels only
    assert rep.attention_kinds(["cudaGraphLaunch", "fmha_cutlassF_f32_aligned_64x64_rf_sm80(...)"]) == "efficient"
    assert rep.attention_kinds(["aten::_scaled_dot_product_flash_attention_for_cpu"]) == "flash (CPU)"
    assert rep.attention_kinds(["aten::mm", "cudaLaunchKernel"]) is None
    row = rep.Row("single-base", "1 user", "new", 1, 2, 2, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, note="x", attention="efficient")
    assert row.cells()[-1] == "x; attention: efficient"


def test_a_spent_budget_lists_what_was_not_run_and_still_prints_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "serving.json"
    proc = _bench("--device", "cpu", "--budget", "1", "--json", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["complete"] is False and data["rows"] == []
    assert data["skipped"] == ["new: the whole path", "previous: the whole path", "naive: the whole path"]
    assert "not run (the path's share of --budget 1 s was spent): new: the whole path" in proc.stdout
    assert "## Issue 8 targets (CPU)" in proc.stdout
