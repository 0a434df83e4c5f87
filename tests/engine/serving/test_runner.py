"""The fast path's forward against transformers + peft on tiny random models.

Each architecture of the registry (Llama, Llama with grouped-query attention, Qwen2 with q/k/v
biases, Mistral) gets three rows in one batch: the base model and two adapters of different
rank and targets. Prompts of different lengths are prefilled together, then decoded token by
token (teacher-forced), and every logit vector must match the peft model run alone.
"""
from __future__ import annotations

import copy

import pytest
import torch

from engine.config import load_settings
from engine.serving.runner import FastRuntime
from tests.engine.serving.conftest import TinyModel, close_to_peft

SEQS = [[5, 17, 33, 2, 8, 61, 40, 9, 12, 77, 3], [11, 4, 90, 23, 7, 1, 55, 6], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39]]
MODES = [None, "a", "b"]
DECODE = 3  # tokens decoded one by one after the prefill


def adapter_modules(folder) -> frozenset[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    return frozenset(k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys if ".lora_A." in k)


def reference_logits(tiny: TinyModel, adapter: str | None, seq: list[int]) -> torch.Tensor:
    from peft import PeftModel

    model = copy.deepcopy(tiny.model)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(tiny.adapters[adapter])).eval()
    with torch.inference_mode():
        return model(input_ids=torch.tensor([seq])).logits[0].float()


def runtime(tiny: TinyModel, only: tuple[str, ...] | None = None,
            **settings) -> tuple[FastRuntime, dict[str | None, int]]:
    """A fast runtime over `tiny` with its adapters loaded. The cache is float32 unless asked
    otherwise: the reference (peft) attends in float32, and these tests compare at 1e-4; a bf16
    cache (KV_CACHE_DTYPE=bfloat16) has its own test below."""
    settings = {"kv_cache_dtype": "float32"} | settings
    s = load_settings(max_batch_size=4, context_tokens=128, max_new_tokens=16, max_resident_adapters=2, max_lora_rank=8, **settings)
    rt = FastRuntime(tiny.model, s)
    slots: dict[str | None, int] = {None: 0}
    for name, folder in tiny.adapters.items():
        if only is not None and name not in only:
            continue
        slots[name] = rt.lora.load(name, folder, folder / "adapter_model.safetensors", adapter_modules(folder), name)
    return rt, slots


def test_batched_rows_match_peft_alone(tiny: TinyModel) -> None:
    refs = [reference_logits(tiny, m, s) for m, s in zip(MODES, SEQS)]
    rt, slots = runtime(tiny)
    kv = [rt.cache.allocate() for _ in SEQS]
    for k, m in zip(kv, MODES):
        rt.lora_idx[k] = slots[m]
    cut = [len(s) - DECODE for s in SEQS]
    logits = rt.prefill([(k, slots[m], s[:c], 0) for k, m, s, c in zip(kv, MODES, SEQS, cut)])
    for i, c in enumerate(cut):
        torch.testing.assert_close(logits[i], refs[i][c - 1], **close_to_peft(tiny, MODES[i]))
    for i, (k, s, c) in enumerate(zip(kv, SEQS, cut)):
        rt.tok[k], rt.pos[k], rt.active[k] = s[c], c, True
    for step in range(DECODE - 1):
        pos = [c + step for c in cut]
        out, covered = rt.decode(rt.cache.high(), max(pos) + 1, {slots[m] for m in MODES})
        assert covered >= len(SEQS)
        for i, (k, s) in enumerate(zip(kv, SEQS)):
            torch.testing.assert_close(out[k], refs[i][pos[i]], **close_to_peft(tiny, MODES[i]))
            rt.tok[k], rt.pos[k] = s[pos[i] + 1], pos[i] + 1


def test_the_step_cuda_graphs_capture_serves_every_row_as_peft_does(tiny: TinyModel) -> None:
    """CPU twin of the captured step (see `FastRuntime._graph_step`): every LoRA slot at once
    (static shapes, the rows' masks pick their slot), rows padded to the batch bucket with an
    idle row, keys to the key bucket. On a GPU this is what `DecodeGraphs` captures and
    replays; here it runs eagerly, so its numbers are checked on every CI run."""
    refs = [reference_logits(tiny, m, s) for m, s in zip(MODES, SEQS)]
    rt, slots = runtime(tiny)
    assert rt.graphs is None  # CPU: the same function, called directly
    kv = [rt.cache.allocate() for _ in SEQS]
    idle = rt.cache.allocate()  # the bucket's fourth row: allocated, never active
    idle_before = rt.cache.row(idle, 0, rt.cache.context).clone()
    for k, m in zip(kv, MODES):
        rt.lora_idx[k] = slots[m]
    cut = [len(s) - DECODE for s in SEQS]
    rt.prefill([(k, slots[m], s[:c], 0) for k, m, s, c in zip(kv, MODES, SEQS, cut)])
    for k, s, c in zip(kv, SEQS, cut):
        rt.tok[k], rt.pos[k], rt.active[k] = s[c], c, True
    bucket_rows, bucket_keys = 4, rt.cache.context  # more rows and keys than the step needs
    for step in range(DECODE - 1):
        pos = [c + step for c in cut]
        out = rt._graph_step(bucket_rows, bucket_keys, True)
        assert out.shape[0] == bucket_rows
        for i, (k, s) in enumerate(zip(kv, SEQS)):
            torch.testing.assert_close(out[k], refs[i][pos[i]], **close_to_peft(tiny, MODES[i]))
            rt.tok[k], rt.pos[k] = s[pos[i] + 1], pos[i] + 1
    assert torch.equal(rt.cache.row(idle, 0, rt.cache.context), idle_before)  # the idle row wrote only scratch
    # base rows only: the graph captured without the LoRA stacks
    rt.active[kv[1]] = rt.active[kv[2]] = False
    last = cut[0] + DECODE - 1
    out = rt._graph_step(bucket_rows, bucket_keys, False)
    torch.testing.assert_close(out[kv[0]], refs[0][last], **close_to_peft(tiny, MODES[0]))


@pytest.mark.parametrize("tiny", ["llama-gqa", "qwen2-bias-bf16"], indirect=True)
def test_a_bf16_cache_holds_half_the_bytes_and_stays_within_bf16_rounding(tiny: TinyModel) -> None:
    """KV_CACHE_DTYPE=bfloat16 under fp32 activations: queries, keys and values are rounded to
    bf16 for attention, so the logits move by bf16 rounding (2^-9 relative), no more, in
    prefill and decode, for every row of a mixed batch."""
    refs = [reference_logits(tiny, m, s) for m, s in zip(MODES, SEQS)]
    rt32, _ = runtime(tiny)
    rt, slots = runtime(tiny, kv_cache_dtype="bfloat16")
    assert rt.cache.kv.dtype == torch.bfloat16 and rt.cache.bytes * 2 == rt32.cache.bytes
    kv = [rt.cache.allocate() for _ in SEQS]
    for k, m in zip(kv, MODES):
        rt.lora_idx[k] = slots[m]
    cut = [len(s) - DECODE for s in SEQS]
    got = [[] for _ in SEQS]
    logits = rt.prefill([(k, slots[m], s[:c], 0) for k, m, s, c in zip(kv, MODES, SEQS, cut)])
    for i, c in enumerate(cut):
        got[i].append((logits[i], refs[i][c - 1]))
        rt.tok[kv[i]], rt.pos[kv[i]], rt.active[kv[i]] = SEQS[i][c], c, True
    for step in range(DECODE - 1):
        pos = [c + step for c in cut]
        out, _ = rt.decode(rt.cache.high(), max(pos) + 1, {slots[m] for m in MODES})
        for i, (k, s) in enumerate(zip(kv, SEQS)):
            got[i].append((out[k], refs[i][pos[i]]))
            rt.tok[k], rt.pos[k] = s[pos[i] + 1], pos[i] + 1
    # measured: at most 1.3% of the logits' spread apart (fp32 linears), 3.3% (bf16 linears, whose
    # outputs are rounded to bf16 again after every product); at 1e-4 (a float32 cache) they agree
    worst = max(float((mine - ref).abs().max()) / float(ref.std()) for pairs in got for mine, ref in pairs)
    assert 0 < worst <= 0.06


def test_chunked_prefill_with_a_decoding_neighbour_matches(tiny: TinyModel) -> None:
    """A prompt prefilled in chunks of 3, with another row decoding between the chunks."""
    long_seq, other = SEQS[0], SEQS[1]
    ref_long, ref_other = reference_logits(tiny, "a", long_seq), reference_logits(tiny, "b", other)
    rt, slots = runtime(tiny)
    k_other, k_long = rt.cache.allocate(), rt.cache.allocate()
    rt.lora_idx[k_other], rt.lora_idx[k_long] = slots["b"], slots["a"]
    rt.prefill([(k_other, slots["b"], other[:2], 0)])
    rt.tok[k_other], rt.pos[k_other], rt.active[k_other] = other[2], 2, True
    done, pos = 0, 2
    while done < len(long_seq):
        chunk = long_seq[done:done + 3]
        last = rt.prefill([(k_long, slots["a"], chunk, done)])
        done += len(chunk)
        torch.testing.assert_close(last[0], ref_long[done - 1], **close_to_peft(tiny, "a"))
        out, _ = rt.decode(rt.cache.high(), pos + 1, {slots["b"]})
        torch.testing.assert_close(out[k_other], ref_other[pos], **close_to_peft(tiny, "b"))
        pos += 1
        rt.tok[k_other], rt.pos[k_other] = other[pos], pos


def test_a_freed_slot_is_reused_by_another_version_without_leftovers(tiny: TinyModel) -> None:
    rt, slots = runtime(tiny)
    slot_b = slots["b"]
    assert rt.lora.free("b") and not rt.lora.free("b")
    folder = tiny.adapters["a"]
    again = rt.lora.load("a-copy", folder, folder / "adapter_model.safetensors", adapter_modules(folder), "a-copy")
    assert again == slot_b  # lowest free slot
    ref = reference_logits(tiny, "a", SEQS[2])
    k = rt.cache.allocate()
    out = rt.prefill([(k, again, SEQS[2], 0)])
    torch.testing.assert_close(out[0], ref[-1], **close_to_peft(tiny, "a"))


@pytest.mark.parametrize("tiny", ["llama-gqa", "llama-gqa-fp16", "qwen2-bias-bf16"], indirect=True)
def test_bf16_products_carry_the_lora_shrink_and_the_tolerance_still_sees_an_adapter(tiny: TinyModel) -> None:
    """With bf16 products every LoRA group's A rides below its product's weight (stored in
    bf16, half the bytes of an fp32 stack); other products keep separate fp32 stacks. The
    looser tolerance of the bf16 case (`close_to_peft`) is far below what an adapter changes,
    so an adapter left out or swapped would still fail the tests above."""
    rt, slots = runtime(tiny)
    bf16 = tiny.name.endswith("-bf16")
    assert rt.lora.riding == (set(rt.lora.groups) if bf16 else set())
    assert {a.dtype for a in rt.lora.a.values()} == {torch.bfloat16 if bf16 else torch.float32}
    a_bytes = 2 if bf16 else 4
    assert rt.lora.slot_bytes == rt.lora.max_rank * sum(
        (a_bytes * g.in_features + 4 * g.out_features) * g.width for g in rt.lora.groups.values())
    base, with_a, with_b = (reference_logits(tiny, m, SEQS[0]) for m in (None, "a", "b"))
    tol = close_to_peft(tiny, "a")["atol"]
    for moved in (with_a - base, with_b - base, with_a - with_b):
        assert float(moved.abs().mean()) > 10 * tol
    k = rt.cache.allocate()
    out = rt.prefill([(k, slots["a"], SEQS[0], 0)])
    torch.testing.assert_close(out[0], with_a[-1], **close_to_peft(tiny, "a"))


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_base_only_batches_skip_lora_entirely(tiny: TinyModel) -> None:
    rt, _ = runtime(tiny)
    assert rt.lora.batch(torch.tensor([0, 0]), {0}) is None
    masks = rt.lora.batch(torch.tensor([0, 2]), {0, 2}).masks
    # slot 2's rank rows only, per group width: q/k/v (3 members), gate/up (2), o and down alone
    assert {w: tuple(m.shape) for w, m in masks.items()} == {w: (2, w * rt.lora.max_rank) for w in (1, 2, 3)}


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
@pytest.mark.parametrize(("config", "modules", "words"), [
    ({"r": 16}, frozenset(), "MAX_LORA_RANK"),
    ({"r": 4, "use_dora": True}, frozenset(), "DoRA"),
    ({"r": 4, "rank_pattern": {"q_proj": 2}}, frozenset(), "rank_pattern"),
    ({"r": 4, "alpha_pattern": {"q_proj": 2}}, frozenset(), "alpha_pattern"),
    ({"r": 4, "modules_to_save": ["lm_head"]}, frozenset(), "modules_to_save"),
    ({"r": 4}, frozenset({"lm_head"}), "LORA_TARGET_MODULES"),
])
def test_versions_the_slots_cannot_hold_are_refused_with_what_to_change(tiny: TinyModel, config, modules, words) -> None:
    from engine.errors import AdapterIncompatible

    rt, _ = runtime(tiny)  # MAX_LORA_RANK=8
    with pytest.raises(AdapterIncompatible, match=words):
        rt.lora.check(config | {"peft_type": "LORA"}, modules, "adapter x/v1")


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_when_every_slot_is_taken_a_load_is_refused_naming_the_setting(tiny: TinyModel) -> None:
    from engine.errors import AdapterInvalid

    rt, _ = runtime(tiny)  # MAX_RESIDENT_ADAPTERS=2: 3 adapter slots, 2 taken by "a" and "b"
    folder = tiny.adapters["a"]
    args = (folder, folder / "adapter_model.safetensors", adapter_modules(folder))
    rt.lora.load("third", *args, "third")
    with pytest.raises(AdapterInvalid, match="MAX_RESIDENT_ADAPTERS"):
        rt.lora.load("fourth", *args, "fourth")
    assert rt.lora.free("third")
    assert rt.lora.load("fourth", *args, "fourth") >= 1
