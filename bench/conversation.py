"""Conversation benchmark: time to first token of each message of a chat, prefix cache on vs off.

    python -m bench.conversation [--device cpu|cuda] [--turns 5] [--tokens 48] [--json FILE]

A Telegram user's every message is sent to the model with the role's system prompt and the
conversation so far (`HISTORY_TOKENS`), so without reuse each message re-computes a prompt
that grows turn by turn. The fast path's prefix cache keeps those keys and values. This runs
one fixed conversation (mode legal + lawyer, greedy, fixed questions) on the engine with the
default `PREFIX_CACHE_TOKENS` and replays the very same messages on an engine with
`PREFIX_CACHE_TOKENS=0`, in the same run; then a second user's first message in the same role
(only the system prompt is shared). With fp32 activations (QUANTIZATION=fp16 or none) both
engines give the same answers (greedy); bf16 products round by the rows they multiply, so
there answers may part after some tokens. The table says which. Prints tables; asserts nothing
(these machines are shared and noisy).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODE = ("legal", "lawyer")
QUESTIONS = (
    "My landlord wants to raise the rent by a third next month. Is that allowed?",
    "The contract says nothing about rent increases. Does that change anything?",
    "He also says the heating costs went up and I must pay for them. What now?",
    "Should I answer him in writing, and what should the letter say?",
    "If he refuses, where can I get help, and how much might it cost?",
    "How long do I have before I must move out if I do not sign?",
)
OTHER_USER = "Can my employer make me work on Sundays?"
TODAY = dt.date(2026, 1, 1)


@dataclasses.dataclass
class Turn:
    label: str
    prompt_tokens: int
    cached_on: int
    ttft_on_ms: float
    ttft_off_ms: float
    same_answer: bool

    @property
    def speedup(self) -> float:
        return self.ttft_off_ms / self.ttft_on_ms if self.ttft_on_ms else float("nan")


def workdir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="bench-conversation-"))
    domain = MODE[0]
    shutil.copytree(ROOT / "adapters" / domain / "v1", root / "adapters" / domain / "v1")
    (root / "adapters" / domain / "current").write_text("v1\n", encoding="utf-8")
    shutil.copytree(ROOT / "templates", root / "templates")
    return root


def settings(root: Path, device: str, prefix_tokens: int | None) -> Any:
    from engine.config import load_settings

    extra = {} if prefix_tokens is None else {"prefix_cache_tokens": prefix_tokens}
    return load_settings(adapters_dir=root / "adapters", templates_dir=root / "templates",
                         model_cache_dir=ROOT / "models", device=device, serving_runtime="fast",
                         template_poll_s=0.0, temperature=0.0, repetition_penalty=1.0, **extra)


async def ask(engine: Any, messages: list[Any], tokens: int) -> tuple[float, str, Any]:
    """(TTFT ms, answer, result) of one message, measured as the bot sees it (first piece)."""
    from engine import GenerationParams, Mode, UserContext

    stream = engine.generate(messages, Mode(*MODE), GenerationParams(max_new_tokens=tokens, temperature=0.0),
                             user=UserContext(language="en", today=TODAY))
    started = time.perf_counter()
    first, pieces = None, []
    async for piece in stream:
        first = first or time.perf_counter()
        pieces.append(piece)
    return ((first or time.perf_counter()) - started) * 1e3, "".join(pieces), stream.result


async def run(device: str, turns: int, tokens: int) -> tuple[list[Turn], dict[str, Any]]:
    from engine import Engine, Message

    root = workdir()
    try:
        on = Engine(settings(root, device, None))
        await on.start()
        try:
            await ask(on, [Message("user", "Hello")], 2)  # warm-up (first-call costs), then start cold
            on.runtime.prefix.clear()
            history: list[Any] = []
            asked, got = [], []
            for q in QUESTIONS[:turns]:
                messages = history + [Message("user", q)]
                ttft, text, res = await ask(on, messages, tokens)
                asked.append(messages)
                got.append((ttft, text, res))
                history = messages + [Message("assistant", text)]
            other = await ask(on, [Message("user", OTHER_USER)], tokens)
            status = on.status()
            meta = {"device": device, "model": status.model, "dtype": status.dtype, "quantization": status.quantization,
                    "prefix_cache_tokens": on.settings.prefix_cache_tokens, "history_tokens": on.settings.history_tokens}
        finally:
            await on.close()
        off = Engine(settings(root, device, 0))
        await off.start()
        try:
            await ask(off, [Message("user", "Hello")], 2)
            replay = [await ask(off, m, tokens) for m in asked]
            other_off = await ask(off, [Message("user", OTHER_USER)], tokens)
        finally:
            await off.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rows = [Turn(f"message {i + 1}", r.prompt_tokens, r.cached_prompt_tokens, t, rt, text == rtext)
            for i, ((t, text, r), (rt, rtext, _)) in enumerate(zip(got, replay))]
    rows.append(Turn("another user, same role, 1st message", other[2].prompt_tokens, other[2].cached_prompt_tokens,
                     other[0], other_off[0], other[1] == other_off[1]))
    return rows, meta


def render(rows: list[Turn], meta: dict[str, Any], argv: list[str]) -> str:
    head = ["message", "prompt tokens", "from cache", "TTFT cache on ms", "TTFT cache off ms", "off / on",
            "same answer"]
    cells = [head] + [[r.label, str(r.prompt_tokens), str(r.cached_on), f"{r.ttft_on_ms:,.0f}",
                       f"{r.ttft_off_ms:,.0f}", f"{r.speedup:.2f}x", "yes" if r.same_answer else "NO"] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["# Conversation benchmark: time to first token per message, prefix cache on vs off",
             "command:  python -m bench.conversation " + " ".join(argv),
             f"engine:   fast path, {meta['model']}, {meta['quantization']}, {meta['dtype']}, {meta['device']}; "
             f"PREFIX_CACHE_TOKENS={meta['prefix_cache_tokens']} vs 0; HISTORY_TOKENS={meta['history_tokens']}",
             f"workload: one conversation in mode {MODE[0]} + {MODE[1]}, greedy, fixed questions; each message "
             "carries the conversation so far; the cache-off engine replays the same messages", ""]
    for i, c in enumerate(cells):
        lines.append("| " + " | ".join(x.ljust(w) if j == 0 else x.rjust(w) for j, (x, w) in enumerate(zip(c, widths)))
                     + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    later = [r.speedup for r in rows[1:-1]]
    if later:
        lines.append(f"\nmessages 2..{len(rows) - 1}: TTFT off / on median {statistics.median(later):.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m bench.conversation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when torch sees one)")
    p.add_argument("--turns", type=int, default=5, choices=range(1, len(QUESTIONS) + 1), metavar=f"1..{len(QUESTIONS)}")
    p.add_argument("--tokens", type=int, default=48, help="new tokens per answer (default 48)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the engine's CPU_THREADS rule)")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        from bench import use_cpu_threads

        use_cpu_threads(args.threads)
    rows, meta = asyncio.run(run(device, args.turns, args.tokens))
    print(render(rows, meta, argv))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2) + "\n",
                             encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
