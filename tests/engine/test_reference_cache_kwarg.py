"""The reference path names the KV cache as the installed transformers does.

transformers renamed the forward keyword `past_key_values` to `cache` (the old name is
deprecated and goes in 5.40, inside the `transformers<6` this project allows). The reference
scheduler (and with it the benchmark's previous path) must keep working on both sides of
the rename, and must not log a deprecation notice on every step where the new name exists.
"""
from __future__ import annotations

import warnings

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from engine.scheduler import cache_kwarg, returned_cache


def _tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


class _BeforeTheRename:
    def forward(self, input_ids=None, past_key_values=None, use_cache=None):  # noqa: ANN001, ANN202
        return None


class _AfterTheRename:
    def forward(self, input_ids=None, cache=None, use_cache=None):  # noqa: ANN001, ANN202
        return None


class _Wrapper:  # peft's PeftModel: forward(**kwargs), the real model behind get_base_model()
    def __init__(self, inner: object) -> None:
        self.inner = inner

    def get_base_model(self) -> object:
        return self.inner

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return None


def test_the_keyword_follows_the_model_class_and_looks_through_a_wrapper() -> None:
    assert cache_kwarg(_BeforeTheRename()) == "past_key_values"
    assert cache_kwarg(_AfterTheRename()) == "cache"
    assert cache_kwarg(_Wrapper(_BeforeTheRename())) == "past_key_values"
    assert cache_kwarg(_Wrapper(_AfterTheRename())) == "cache"


def test_the_installed_transformers_takes_the_keyword_silently_and_returns_the_cache() -> None:
    model = _tiny()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deprecated keyword would raise here
        with torch.no_grad():
            out = model(input_ids=ids, **{cache_kwarg(model): DynamicCache()}, use_cache=True)
            cache = returned_cache(out)
            assert cache.get_seq_length() == 5
            step = model(input_ids=torch.tensor([[6]]), position_ids=torch.tensor([[5]]),
                         **{cache_kwarg(model): cache}, use_cache=True)
    assert returned_cache(step).get_seq_length() == 6
    with torch.no_grad():  # the cached step equals the same six tokens computed at once
        whole = model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6]])).logits[0, -1]
    torch.testing.assert_close(step.logits[0, -1], whole, rtol=1e-5, atol=1e-5)
