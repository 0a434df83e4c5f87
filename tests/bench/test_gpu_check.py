"""bench/gpu_check.sh, the one command of a GPU lease: its limits, checked without a GPU.

A lease is 15 minutes of device time, start-up included: the script's default limits must let
one run and a rerun fit, and no limit may turn into "none" (`timeout 0` runs forever).
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
LIMITS = ("ENV_S", "PREPARE_S", "PYTEST_S", "BENCH_S", "CONV_S")


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in LIMITS} | {"OUT": str(tmp_path), "DEVICE": "cpu"} | env
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


def test_the_default_limits_fit_six_minutes() -> None:
    text = SCRIPT.read_text()
    defaults = {name: int(re.search(rf"{name}=\$\{{{name}:-(\d+)\}}", text).group(1)) for name in LIMITS}
    assert sum(defaults.values()) <= 360, defaults
    assert defaults["PYTEST_S"] >= 60 and defaults["BENCH_S"] >= 120, defaults
    assert "--users 1,16,64" in text


def test_a_limit_of_zero_skips_its_step_instead_of_lifting_the_limit(tmp_path: Path) -> None:
    done = run(tmp_path, **{name: "0" for name in LIMITS})
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("env", "prepare", "pytest", "bench", "conversation"):
        assert re.search(rf"^{step}\s+skipped \(limit 0\)", summary, re.M), summary
    assert "0 step(s) failed" in summary


@pytest.mark.parametrize("value", ["-5", "1.5", "soon"])
def test_a_limit_that_is_no_whole_number_is_refused_before_anything_runs(tmp_path: Path, value: str) -> None:
    done = run(tmp_path, BENCH_S=value)
    assert done.returncode == 99
    assert f"BENCH_S={value}: expected a whole number of seconds" in done.stderr
    assert not (tmp_path / "summary.txt").exists()
