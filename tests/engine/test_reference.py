"""The serial oracle (engine.reference) on tiny random models: its answers are transformers'
and peft's own greedy forward passes, whatever adapters were loaded and freed beside it, and it
names the KV cache as the installed transformers does.

transformers renamed the forward keyword `past_key_values` to `cache` (the old name is
deprecated and goes in 5.40, inside the `transformers<6` this project allows). The oracle
(and with it `SERVING_RUNTIME=reference`) must keep working on both sides of the rename, and
must not log a deprecation notice on every step where the new name exists.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from engine.adapters.store import VersionDir
from engine.adapters.validate import ValidatedAdapter
from engine.reference import ReferenceRuntime, cache_kwarg, returned_cache
from engine.requests import SamplingSettings
from engine.types import BASE_ADAPTER
from tests.engine.serving.conftest import TinyModel, build_tiny
from tests.engine.serving.test_runner import SEQS, adapter_modules

GREEDY = SamplingSettings(max_new_tokens=6, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=0)


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


# ---- the oracle's answers ----------------------------------------------------------------------

@pytest.fixture(scope="module", params=["llama", "qwen2-bias", "llama-gqa-nf4"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny(request.param, tmp_path_factory.mktemp("tiny"))


def validated(tiny: TinyModel, name: str) -> ValidatedAdapter:
    folder = tiny.adapters[name]
    return ValidatedAdapter(VersionDir(name, "v1", folder), adapter_modules(folder), 0)


def peft_greedy(tiny: TinyModel, adapter: str | None, prompt: list[int], n: int) -> list[int]:
    """What transformers + peft answer alone, greedy, each token from a whole forward without
    a cache: the oracle's definition (end-of-sequence is the scheduler's business, not here)."""
    from peft import PeftModel

    model = copy.deepcopy(tiny.model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(tiny.adapters[adapter])).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def oracle_answer(oracle: ReferenceRuntime, key: str, prompt: list[int], n: int, chunk: int | None = None) -> list[int]:
    """The scheduler's calls for one row: the prompt in chunks, then decode steps."""
    slot = oracle.add_row(key, GREEDY, prompt)
    chunk = chunk or len(prompt)
    first: dict[int, int] = {}
    for start in range(0, len(prompt), chunk):
        first = oracle.prefill_step([(slot, prompt[start:start + chunk], start)])
        assert bool(first) == (start + chunk >= len(prompt))  # a token once the prompt is whole
    tokens = [first[slot]]
    while len(tokens) < n:
        tokens += oracle.decode_step([slot], len(prompt) + len(tokens))
    oracle.remove_row(slot)
    return tokens


def test_the_oracle_answers_as_peft_alone_with_adapters_coming_and_going(tiny: TinyModel) -> None:
    n = 6
    expected = {m: [peft_greedy(tiny, m, seq, n) for seq in SEQS] for m in (None, "a", "b")}
    assert expected["a"] != expected[None] != expected["b"]  # the adapters change the answers
    with torch.inference_mode():
        oracle = ReferenceRuntime(copy.deepcopy(tiny.model))
        assert [oracle_answer(oracle, BASE_ADAPTER, seq, n) for seq in SEQS] == expected[None]
        assert oracle.needs_exclusive(validated(tiny, "a"))  # peft changes the model: between two steps
        assert oracle.load(validated(tiny, "a")) > 0
        assert [oracle_answer(oracle, "a__v1", seq, n) for seq in SEQS] == expected["a"]
        oracle.load(validated(tiny, "b"))  # a second adapter leaves the first one's answers alone
        for key, mode in ((BASE_ADAPTER, None), ("b__v1", "b"), ("a__v1", "a"), (BASE_ADAPTER, None)):
            assert [oracle_answer(oracle, key, seq, n, chunk=4) for seq in SEQS] == expected[mode]
        oracle.delete("a__v1")  # from the loader thread: dropped before the next row
        assert oracle_answer(oracle, "b__v1", SEQS[0], n) == expected["b"][0]
        assert list(oracle.peft_model.peft_config) == ["b__v1"]


def test_a_seeded_row_draws_what_the_fast_paths_sampler_draws() -> None:
    """The oracle samples with the fast path's sampler, row by row: a seed means one answer."""
    from engine.serving.sampler import BatchSampler

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=64)).eval()
    sampled = SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=0.95, top_k=20, repetition_penalty=1.2,
                               seed=99)
    prompt = [1, 2, 3, 4]
    with torch.inference_mode():
        oracle = ReferenceRuntime(model)
        slot = oracle.add_row(BASE_ADAPTER, sampled, prompt)
        got = [oracle.prefill_step([(slot, prompt, 0)])[slot]]
        got += [oracle.decode_step([slot], len(prompt) + i + 1)[0] for i in range(7)]
        sampler = BatchSampler(1, 64, "cpu")
        sampler.set_row(0, temperature=1.0, top_k=20, top_p=0.95, penalty=1.2, seed=99, prompt=prompt)
        ids, want = list(prompt), []
        for _ in range(8):
            logits = model(input_ids=torch.tensor([ids])).logits[:, -1]
            want.append(int(sampler.sample(logits, slice(0, 1), sampler.plan([0]))[0]))
            ids.append(want[-1])
    assert got == want and len(set(got)) > 1
