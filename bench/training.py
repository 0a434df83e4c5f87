"""`python -m bench.training`: what each shipped adapter bought, measured on this machine.

For every domain with a current version: how long its training took here, its eval loss
against the base model's on the held-out split (from meta.json, where the training job
recorded it), the held-out loss of the base model and of each adapter again on the weights
each CPU format serves (`--formats`: is a quantized format within 2% of bf16?), and one
held-out question answered greedily by the base model and by the adapter, in the same role,
through the live Engine. Prints tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import textwrap
from typing import Any

from engine.adapters.store import AdapterStore
from engine.config import load_settings
from engine.training.data import load_domain_data
from engine.types import GenerationParams, Message, Mode

GREEDY = GenerationParams(temperature=0.0, max_new_tokens=120, seed=0)


def metrics_rows(store: AdapterStore) -> list[dict[str, Any]]:
    rows = []
    for domain in store.domains():
        current = store.current(domain)
        if current is None:
            continue
        meta = store.version(domain, current).meta
        m, t = meta.get("metrics", {}), meta.get("training", {})
        base, new = m.get("eval_loss_base"), m.get("eval_loss")
        rows.append({
            "domain": domain, "version": current, "rows": t.get("samples"), "steps": t.get("steps"),
            "epochs": t.get("epochs"), "lr": t.get("learning_rate"), "train_s": m.get("train_seconds"),
            "base": base, "new": new, "change": 100 * (new - base) / base if base and new is not None else None,
            "ppl_base": m.get("eval_perplexity_base"), "ppl_new": m.get("eval_perplexity"),
        })
    return rows


def print_metrics(rows: list[dict[str, Any]]) -> None:
    print("## Shipped adapters: training on this machine and held-out eval loss\n")
    print("| adapter | version | train rows | steps | epochs | lr | training time | eval loss base -> adapter "
          "| change | perplexity base -> adapter |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        minutes = f"{r['train_s'] / 60:.1f} min" if r["train_s"] is not None else "-"
        print(f"| {r['domain']} | {r['version']} | {r['rows']} | {r['steps']} | {r['epochs']} | {r['lr']} | {minutes} "
              f"| {r['base']:.3f} -> {r['new']:.3f} | {r['change']:+.1f}% "
              f"| {r['ppl_base']:.1f} -> {r['ppl_new']:.1f} |")
    print()


def format_losses(settings: Any, store: AdapterStore, domains: list[str], formats: list[str]) -> None:
    """The held-out loss (the training job's `eval_loss`, on the same split) of the base model
    and of each domain's current version, with the base model's linear layers in each
    QUANTIZATION of `formats` (the first is the one the others are compared with).

    Computed through the converted modules, as they serve: with `int4` every product is the
    4-bit kernel's (`int4+bf16` serves decode steps of up to 8 rows with it, wider ones in bf16)."""
    import copy

    from peft import PeftModel

    from engine import model as engine_model
    from engine.training.encoding import encode_dataset
    from engine.training.evaluate import eval_loss
    from engine.training.options import TrainOptions

    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass
    options = TrainOptions()
    losses: dict[tuple[str, str], dict[str, float]] = {}
    for q in formats:
        loaded = engine_model.load(settings.model_copy(update={"quantization": q, "device": "cpu"}))
        for domain in domains:
            _train, held_out = load_domain_data(store.domain_dir(domain) / "data").datasets()
            encoded, _ = encode_dataset(loaded.tokenizer, held_out, options.max_seq_len)
            version = store.version(domain, store.current(domain))
            adapter = PeftModel.from_pretrained(copy.deepcopy(loaded.model), str(version.path)).eval()
            for label, model in (("base", loaded.model), (f"{domain} {version.version}", adapter)):
                result = eval_loss(model, loaded.tokenizer, encoded, options.eval_batch_size)
                losses.setdefault((domain, label), {})[q] = result.loss
        del loaded
    first = formats[0]
    print(f"## Held-out eval loss by weight format (vs {first}; the bound for a quantized format: within 2%)\n")
    print("| held-out split | model | " + " | ".join(formats) + " | "
          + " | ".join(f"{q} vs {first}" for q in formats[1:]) + " |")
    print("|---" * (2 + 2 * len(formats) - 1) + "|")
    for (domain, label), by in losses.items():
        print(f"| {domain} | {label} | " + " | ".join(f"{by[q]:.4f}" for q in formats) + " | "
              + " | ".join(f"{100 * (by[q] - by[first]) / by[first]:+.2f}%" for q in formats[1:]) + " |")
    print()


async def examples(settings: Any, store: AdapterStore, domains: list[str]) -> None:
    from engine import Engine

    engine = Engine(settings)
    await engine.start()
    try:
        catalog = engine.modes()
        print("## One held-out question, base model vs adapter (greedy, same role)\n")
        for domain in domains:
            data = load_domain_data(store.domain_dir(domain) / "data")
            question = next(m["content"] for m in data.eval[0]["messages"] if m["role"] == "user")
            role = next((r.id for r in catalog.roles if r.suggested_adapter == domain), "assistant")
            print(f"### {domain} (role {role})\n\nQ: {question}\n")
            for label, adapter in (("base", None), (f"{domain} adapter", domain)):
                stream = engine.generate([Message("user", question)], Mode(adapter=adapter, role=role), GREEDY)
                text = "".join([piece async for piece in stream]).strip()
                print(f"{label}:\n{textwrap.indent(textwrap.fill(text, 100), '    ')}\n")
    finally:
        await engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-examples", action="store_true", help="only the metrics table (no model)")
    parser.add_argument("--formats", default="bf16,int4,none",
                        help="QUANTIZATIONs (CPU) whose held-out losses are compared with the first's; empty: skip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    settings = load_settings()
    store = AdapterStore(settings.adapters_dir)
    rows = metrics_rows(store)
    if not rows:
        print(f"no adapter in {settings.adapters_dir} has a current version; train one: python -m engine.train legal")
        return 0
    print_metrics(rows)
    formats = [q.strip() for q in args.formats.split(",") if q.strip()]
    if formats and not args.no_examples:
        format_losses(settings, store, [r["domain"] for r in rows], formats)
    if not args.no_examples:
        asyncio.run(examples(settings, store, [r["domain"] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
