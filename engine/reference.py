"""The serial oracle: transformers' own forward with peft's adapter, one request at a time.

The tests hold the fast path (`engine.serving`) against it token for token, and it serves
what the fast path does not cover (`SERVING_RUNTIME=reference`, or `auto` when the fast path
refuses the model or the device). The model thread drives it as it drives the fast runtime,
with room for one row, so requests are answered one after another. It stays plain so that it
is plainly right: peft selects the row's adapter, transformers' `DynamicCache` holds its keys,
and the fast path's sampler picks its tokens (so a seeded request draws alike on both paths).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from engine.adapters.validate import ValidatedAdapter
from engine.model.shapes import linear_shapes
from engine.requests import SamplingSettings
from engine.serving.sampler import BatchSampler
from engine.types import BASE_ADAPTER


def cache_kwarg(model: Any) -> str:
    """The forward keyword of the KV cache: `cache` since transformers renamed it, where
    `past_key_values` is deprecated (removed in 5.40, which `transformers<6` allows);
    `past_key_values` in the releases before the rename."""
    inner = getattr(model, "get_base_model", None)  # peft's wrapper passes **kwargs through
    return _cache_kwarg_of(type(inner() if inner is not None else model))


@functools.cache
def _cache_kwarg_of(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    """The cache a forward returned, under either name (see `cache_kwarg`)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class ReferenceRuntime:
    """One row at a time; to the scheduler and the adapter registry it looks like `FastRuntime`."""

    slots = 1
    prefix = None  # no prefix cache: every prompt is computed whole

    def __init__(self, model: Any) -> None:
        self.base_model = model
        self.device = next(model.parameters()).device
        self.linear_shapes = linear_shapes(model)
        self.sampler = BatchSampler(1, model.config.vocab_size, self.device)
        self.peft_model: Any = None
        self._deleted: list[str] = []  # freed by the loader thread, removed by the model thread
        self._key, self._prompt_len, self._cache, self._last = BASE_ADAPTER, 0, None, 0

    # ---- the adapter registry's side -------------------------------------------------------
    def needs_exclusive(self, adapter: ValidatedAdapter) -> bool:
        return True  # peft adds modules to the model: only between two forwards

    def load(self, adapter: ValidatedAdapter) -> int:
        """Load a version under its peft name (on the model thread); returns its bytes."""
        from peft import PeftModel

        name, path = adapter.key, str(adapter.version.path)
        self._drop_deleted()  # a version freed a moment ago may be the one loaded again
        if self.peft_model is None:
            self.peft_model = PeftModel.from_pretrained(self.base_model, path, adapter_name=name, is_trainable=False)
        else:
            self.peft_model.load_adapter(path, adapter_name=name, is_trainable=False)
        self.peft_model.eval()
        self._select()  # a load may have made the new adapter active in layers it wrapped
        return sum(p.numel() * p.element_size() for n, p in self.peft_model.named_parameters() if f".{name}." in n)

    def delete(self, name: str) -> None:
        self._deleted.append(name)  # the model thread drops it before its next row

    # ---- the scheduler's side ------------------------------------------------------------
    def add_row(self, key: str, sampling: SamplingSettings, prompt: list[int]) -> int:
        from transformers import DynamicCache

        self._drop_deleted()
        s = sampling
        self.sampler.set_row(0, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             penalty=s.repetition_penalty, seed=s.seed, prompt=prompt)
        self._key, self._prompt_len, self._cache = key, len(prompt), DynamicCache()
        self._select()
        return 0

    def remove_row(self, slot: int) -> None:
        self.sampler.clear_row(slot)
        self._cache = None

    def prefill_step(self, chunks: list[tuple[int, list[int], int]]) -> dict[int, int]:
        ((slot, ids, start),) = chunks  # one row
        logits = self._forward(ids)
        return {slot: self._sample(logits)} if start + len(ids) == self._prompt_len else {}

    def decode_step(self, slots: list[int], key_len: int) -> list[int]:
        return [self._sample(self._forward([self._last]))]

    # ---- inside --------------------------------------------------------------------------
    def _drop_deleted(self) -> None:
        while self._deleted:
            self.peft_model.delete_adapter(self._deleted.pop(0))

    def _select(self) -> None:
        """Make the row's adapter the only active one (none for the base model)."""
        if self.peft_model is None:
            return
        if self._key == BASE_ADAPTER:
            self.peft_model.base_model.disable_adapter_layers()
        else:
            self.peft_model.base_model.enable_adapter_layers()
            self.peft_model.set_adapter(self._key)

    def _forward(self, ids: list[int]) -> torch.Tensor:
        model = self.base_model
        out = model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1,
                    **{cache_kwarg(model): self._cache})
        self._cache = returned_cache(out)
        return out.logits[:, -1].float()

    def _sample(self, logits: torch.Tensor) -> int:
        self._last = int(self.sampler.sample(logits, slice(0, 1), self.sampler.plan([0]))[0])
        return self._last
