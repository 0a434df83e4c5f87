"""Choosing the next token of one row: greedy, or temperature / top-k / top-p sampling."""
from __future__ import annotations

from typing import Any

import torch


def penalized(logits: torch.Tensor, repetition_penalty: float, seen: torch.Tensor | None) -> torch.Tensor:
    """One row's logits in fp32 with the repetition penalty applied to the seen tokens."""
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None and seen.numel():
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
    return logits


def reference_probs(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution one row samples from (temperature > 0), after top-k and top-p.

    This per-row code is the reference the batched sampler (`engine.runtime.sampler`) is
    tested against; it is not normalised after top-p (sampling does not need it).
    """
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs


def next_token(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    seen: torch.Tensor | None,
    generator: torch.Generator | None,
) -> int:
    """One row's logits [vocab] -> token id. Deterministic when temperature is 0."""
    logits = penalized(logits, repetition_penalty, seen)
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = reference_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


class IncrementalDecoder:
    """Token ids -> text deltas, holding back bytes of a character not yet complete."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""
