"""`python -m bench.conversation`: its smallest run on the real model. Behaviour only: the rows
come out, the cache-on engine reuses the conversation, both engines answer alike."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.model
def test_smallest_run_reuses_the_conversation_and_answers_alike(tmp_path: Path) -> None:
    """With fp32 activations (fp16 weights where fbgemm is, else none), where a restored start
    must give the very answer a full prefill gives; bf16's row-count-dependent rounding may
    part them (README), so `auto`'s bf16 is not what this checks."""
    from engine.weights import fp16_weights

    out = tmp_path / "conversation.json"
    env = os.environ | {"QUANTIZATION": "fp16" if fp16_weights.available() else "none"}
    proc = subprocess.run([sys.executable, "-m", "bench.conversation", "--device", "cpu", "--turns", "2",
                           "--tokens", "3", "--threads", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| message 2" in proc.stdout and "TTFT cache off ms" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["quantization"] == env["QUANTIZATION"]
    rows = data["rows"]
    assert [r["label"] for r in rows] == ["message 1", "message 2", "another user, same role, 1st message"]
    first, second, other = rows
    assert first["cached_on"] == 0  # the run starts cold
    assert second["cached_on"] >= first["prompt_tokens"] - 16  # the whole first message, to the last full block
    assert 0 < other["cached_on"] < other["prompt_tokens"]  # the role's system prompt only
    assert all(r["same_answer"] for r in rows)
    assert all(r["ttft_on_ms"] > 0 and r["ttft_off_ms"] > 0 for r in rows)
