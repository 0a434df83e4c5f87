"""Which QUANTIZATION is fastest here: none, nf4, int8 and (on CPU) fp16, bf16, int4 and int4+bf16, on the fast serving path.

    python -m bench.quantization [--tokens 32] [--batch 8] [--device cpu|cuda]

`QUANTIZATION=auto` picks nf4 on CUDA (one quantized model in GPU memory is the product's
promise) and, on CPU, `int4+bf16` where the CPU has AMX tiles and `fp16` (fbgemm-packed fp16
weights, fp32 compute) elsewhere, as measured by this benchmark and `bench.step` (docs/engine.md). Single stream with an
adapter, and a batch of rows over the three adapters and the base model; greedy, a fixed number
of tokens (EOS ignored). All run in one process, one after another, so their ratios are
comparable.
"""
from __future__ import annotations

import argparse
import asyncio
import platform
import time

from bench.engine import ROOT, table, workdir

MODES = [(None, "assistant"), ("legal", "lawyer"), ("medical", "doctor"), ("finance", "financial_analyst")]


async def measure(quantization: str, device: str, tokens: int, batch: int, root) -> list[object]:
    import torch

    from engine import Engine, GenerationParams, Message, Mode
    from engine.config import load_settings

    settings = load_settings(
        model_cache_dir=ROOT / "models", adapters_dir=root / "adapters", templates_dir=root / "templates",
        quantization=quantization, device=device, max_batch_size=max(batch, 1), context_tokens=512,
    )
    params = GenerationParams(max_new_tokens=tokens, temperature=0, ignore_eos=True)

    async def one(engine, adapter, role) -> int:
        s = engine.generate([Message("user", "Tell me about contracts.")], Mode(adapter, role), params)
        async for _ in s:
            pass
        return s.result.completion_tokens

    async with Engine(settings) as engine:
        await one(engine, "legal", "lawyer")  # warm-up
        started = time.perf_counter()
        single = await one(engine, "legal", "lawyer") / (time.perf_counter() - started)
        started = time.perf_counter()
        done = await asyncio.gather(*(one(engine, *MODES[i % len(MODES)]) for i in range(batch)))
        batched = sum(done) / (time.perf_counter() - started)
        size = engine.status().model_bytes
        kind = engine.runtime_kind
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return [quantization, kind, round(single, 1), round(batched, 1), round(size / 2**20)]


async def main_async(args: argparse.Namespace) -> None:
    import torch

    root = workdir()
    if args.device == "cpu":
        from bench import use_cpu_threads

        use_cpu_threads(None)  # the count the engines will use, so the header says it
    from engine.weights import bf16_weights

    print(f"# bench.quantization: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"AMX {'yes' if bf16_weights.available() else 'no'}, "
          f"torch {torch.__version__}, device {args.device}, {args.tokens} tokens, batch {args.batch}")
    kinds = ["none", "nf4", "int8"]
    if args.device == "cpu":
        from engine.weights import fp16_weights

        if fp16_weights.available():
            kinds.append("fp16")  # a CPU-only kind: fbgemm's packed fp16 GEMM
        kinds.append("bf16")  # a CPU-only kind: bf16 products (fast where the CPU has AMX tiles)
        from engine.weights import cpu_int4

        if cpu_int4.available():
            kinds += ["int4", "int4+bf16"]  # CPU-only kinds: 4-bit decoder weights (+ the bf16 copy for batches)
    rows = [await measure(q, args.device, args.tokens, args.batch, root) for q in kinds]
    base = rows[0][2]
    for r in rows:
        r.append(f"{r[2] / base:.2f}x")
    table("tokens/s by quantization (fast path, greedy, EOS ignored)",
          ["quantization", "path", "1 stream + adapter", f"{args.batch} streams, 4 modes", "model MiB", "vs none"],
          rows)
    single, batched = max(rows, key=lambda r: r[2])[0], max(rows, key=lambda r: r[3])[0]
    print(f"\nfastest here: single stream {single}, {args.batch} streams {batched}")


def main() -> None:
    import logging

    from engine.logs import LibraryNoiseFilter

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().handlers[0].addFilter(LibraryNoiseFilter())  # int8 on CPU warns on every matmul
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    p = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
