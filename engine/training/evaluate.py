"""Evaluation loss on the held-out split, and the gate that decides promotion.

The loss is the mean over every labelled (assistant) token of the split, not a mean of
batch means, so base model, current version and new version are compared on exactly the
same tokens whatever the batch size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.training.encoding import IGNORE, collator


@dataclass(frozen=True)
class EvalResult:
    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def eval_loss(model: Any, tokenizer: Any, encoded: Any, batch_size: int = 8) -> EvalResult:
    """Token-weighted cross-entropy of `model` on an encoded split (input_ids/labels)."""
    import torch

    collate = collator(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                batch = collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))])
                batch = {k: v.to(device) for k, v in batch.items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                # position t predicts token t+1
                logits = logits[:, :-1, :].float()
                labels = batch["labels"][:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                    ignore_index=IGNORE, reduction="sum",
                )
                total += float(loss)
                count += int((labels != IGNORE).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation split has no labelled tokens")
    return EvalResult(total / count, count)


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reference: str  # "v2" (the current version) or "base"
    reference_loss: float
    new_loss: float

    @property
    def reason(self) -> str:
        verdict = "beats" if self.passed else "does not beat"
        return (f"eval loss {self.new_loss:.4f} {verdict} {self.reference} "
                f"({self.reference_loss:.4f})")


def gate(new_loss: float, base_loss: float, current: tuple[str, float] | None) -> GateDecision:
    """Promote only if the new version beats what serves now.

    What serves now is the current version, or the bare base model when the domain has none:
    an adapter that makes the base model worse never goes live on its own.
    """
    name, ref = current if current is not None else ("base", base_loss)
    return GateDecision(new_loss < ref, name, ref, new_loss)
