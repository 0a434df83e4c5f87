"""The Makefile's interface: `make help` tells every target, torch can come from another index,
and what set-up generates stays out of git."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def make(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.fail("make is not installed; the project is driven by it")
    done = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def phony_targets() -> list[str]:
    text = (REPO / "Makefile").read_text()
    (line,) = re.findall(r"^\.PHONY:(.*)$", text, re.M)
    return [t for t in line.split() if t != "help"]


def test_make_help_lists_every_target_and_the_variables() -> None:
    out = make("help")
    listed = set(re.findall(r"^make ([\w-]+)", out, re.M))
    assert set(phony_targets()) <= listed, f"missing from `make help`: {set(phony_targets()) - listed}"
    assert "TORCH=" in out and "TORCH_INDEX_URL=" in out


@pytest.mark.parametrize("index", ["", "https://download.pytorch.org/whl/cu128"])
def test_torch_can_be_installed_from_another_index(tmp_path: Path, index: str) -> None:
    out = make("-n", "setup", f"VENV={tmp_path / 'venv'}", "TORCH=torch==2.13.0", f"TORCH_INDEX_URL={index}")
    (torch_line,) = [line for line in out.splitlines() if '"torch==2.13.0"' in line]
    if index:
        assert f'--index-url "{index}"' in torch_line
    else:
        assert "--index-url" not in torch_line
    assert all("--index-url" not in line for line in out.splitlines() if line != torch_line)


def test_generated_packaging_metadata_is_not_in_git() -> None:
    assert "*.egg-info/" in (REPO / ".gitignore").read_text().splitlines()
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return  # a source archive: the .gitignore line above is what matters
    tracked = subprocess.run(["git", "ls-files", "--", "*.egg-info*"], cwd=REPO, capture_output=True, text=True)
    assert tracked.stdout.strip() == "", f"tracked: {tracked.stdout}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "loratg.egg-info/PKG-INFO"], cwd=REPO)
    assert ignored.returncode == 0
