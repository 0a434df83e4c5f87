"""The prefix cache on tiny random models: a prompt whose start is restored from the cache gives
the logits of a full prefill (transformers + peft as the reference), blocks never cross adapter
versions, eviction keeps chains usable from the start, and a freed version is forgotten."""
from __future__ import annotations

import pytest
import torch

from engine.serving.prefix_cache import BLOCK_TOKENS, PrefixCache, chain
from tests.engine.serving.conftest import TinyModel, close_to_peft
from tests.engine.serving.test_runner import reference_logits, runtime

SHARED = [(7 * i + 3) % 90 + 1 for i in range(2 * BLOCK_TOKENS + 5)]  # two full blocks and 5 tokens more
TAIL_A = [11 + i for i in range(16)]  # so the block holding the end of SHARED is full
TAIL_B = [40, 41, 42, 43, 44, 45]


def prefill(rt, slot: int, lslot: int, seq: list[int], start: int = 0) -> torch.Tensor:
    rt.lora_idx[slot] = lslot
    return rt.prefill([(slot, lslot, seq[start:], start)])[0]


def stored(rt, key: str, seq: list[int], slot: int) -> None:
    assert rt.prefix.store(key, seq, chain(key, seq), slot, len(seq)) == len(seq) // BLOCK_TOKENS


def cached(rt, key: str, seq: list[int], limit: int | None = None) -> int:
    """Tokens of `seq` a lookup finds (at most len - 1: a row computes its last token itself)."""
    return rt.prefix.lookup(key, seq, chain(key, seq), len(seq) - 1 if limit is None else limit).tokens


def with_stored(tiny: TinyModel, adapter: str, seq: list[int]):
    """A runtime whose prefix cache holds `seq`, prefilled with `adapter`."""
    rt, slots = runtime(tiny)
    k = rt.cache.allocate()
    prefill(rt, k, slots[adapter], seq)
    stored(rt, adapter, seq, k)
    return rt


@pytest.mark.parametrize("mode", [None, "a", "b"])
def test_a_restored_start_gives_the_logits_of_a_full_prefill(tiny: TinyModel, mode: str | None) -> None:
    first, second = SHARED + TAIL_A, SHARED + TAIL_B
    ref = reference_logits(tiny, mode, second)
    rt, slots = runtime(tiny)
    key = mode or "base"
    k1, k2 = rt.cache.allocate(), rt.cache.allocate()
    prefill(rt, k1, slots[mode], first)
    stored(rt, key, first, k1)
    hit = rt.prefix.lookup(key, second, chain(key, second), len(second) - 1)
    assert (len(hit.blocks), hit.partial_tokens, hit.tokens) == (2, 5, len(SHARED))  # ends inside block 3
    rt.prefix.restore(hit, k2)
    logits = prefill(rt, k2, slots[mode], second, start=hit.tokens)
    torch.testing.assert_close(logits, ref[-1], **close_to_peft(tiny, mode))
    # and decoding on from the restored slot stays exact
    rt.tok[k2], rt.pos[k2], rt.active[k2] = 5, len(second), True
    out, _ = rt.decode(rt.cache.high(), len(second) + 1, {slots[mode]})
    torch.testing.assert_close(out[k2], reference_logits(tiny, mode, second + [5])[-1], **close_to_peft(tiny, mode))


@pytest.mark.parametrize("tiny", ["llama-gqa"], indirect=True)
def test_blocks_never_cross_adapter_versions(tiny: TinyModel) -> None:
    seq = SHARED + TAIL_A
    rt = with_stored(tiny, "a", seq)
    assert cached(rt, "b", seq) == cached(rt, "base", seq) == 0
    assert cached(rt, "a", seq) == 3 * BLOCK_TOKENS  # full blocks only
    assert cached(rt, "a", seq[:48]) == 47  # never the whole prompt


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_eviction_takes_the_least_recent_ends_of_chains_first(tiny: TinyModel) -> None:
    rt, _ = runtime(tiny, prefix_cache_tokens=4 * BLOCK_TOKENS)  # room for 4 blocks
    x = [1 + i % 50 for i in range(3 * BLOCK_TOKENS + 1)]
    y = [60 + i % 30 for i in range(3 * BLOCK_TOKENS + 1)]
    kx, ky = rt.cache.allocate(), rt.cache.allocate()
    prefill(rt, kx, 0, x)
    prefill(rt, ky, 0, y)
    stored(rt, "base", x, kx)
    stored(rt, "base", y, ky)  # needs 3 blocks: the free one, then x's last two
    assert len(rt.prefix) == 4
    assert cached(rt, "base", x) == BLOCK_TOKENS  # x's first block lives
    assert cached(rt, "base", y) == 3 * BLOCK_TOKENS


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_a_chain_longer_than_the_pool_keeps_its_start(tiny: TinyModel) -> None:
    rt, _ = runtime(tiny, prefix_cache_tokens=2 * BLOCK_TOKENS)
    seq = [1 + i % 70 for i in range(4 * BLOCK_TOKENS + 3)]
    k = rt.cache.allocate()
    prefill(rt, k, 0, seq)
    assert rt.prefix.store("base", seq, chain("base", seq), k, len(seq)) == 2
    assert cached(rt, "base", seq) == 2 * BLOCK_TOKENS


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_a_freed_version_is_forgotten(tiny: TinyModel) -> None:
    seq = SHARED + TAIL_A
    rt = with_stored(tiny, "a", seq)
    rt.delete("a")  # what the registry calls, from the loader thread, when the version is freed
    assert cached(rt, "a", seq) == 0
    assert len(rt.prefix) == 0


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_clear_forgets_everything(tiny: TinyModel) -> None:
    seq = SHARED + TAIL_A
    rt = with_stored(tiny, "a", seq)
    rt.prefix.clear()
    assert cached(rt, "a", seq) == 0 and len(rt.prefix) == 0


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_prefix_cache_tokens_zero_turns_it_off(tiny: TinyModel) -> None:
    rt, _ = runtime(tiny, prefix_cache_tokens=0)
    assert rt.prefix is None


def test_pool_memory_is_what_the_setting_asks() -> None:
    from engine.serving.kv_cache import SlotKVCache

    cache = SlotKVCache(layers=3, slots=2, kv_heads=2, head_dim=8, context=64, dtype=torch.float32, device="cpu")
    pc = PrefixCache(cache, 5 * BLOCK_TOKENS + 7)  # whole blocks only
    assert pc.num_blocks == 5
    assert pc.bytes == 3 * 2 * 2 * 5 * BLOCK_TOKENS * 8 * 4
