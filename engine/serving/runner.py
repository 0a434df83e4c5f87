"""Everything per step and per token of the fast serving path.

`FastRuntime` bundles the runner (our Llama-family forward over the loaded modules), the
slot KV cache, the stacked LoRA slots, the batched sampler, the decode state on the device
and, on CUDA, the decode step's CUDA graphs, and it alone writes them. The model thread's
policy (who is admitted, how prompts are chunked, when rows finish) lives in
`engine.serving.scheduler`, which talks to this object by cache slot and token ids, as it talks
to the serial oracle `engine.reference.ReferenceRuntime`; so does the adapter registry.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import EngineSettings
from engine.requests import SamplingSettings
from engine.serving.graphs import DecodeGraphs, powers_of_two
from engine.serving.kv_cache import SlotKVCache
from engine.serving.llama import ARCHITECTURES, Packing, unsupported_reason
from engine.serving.lora import LoraSlots, serving_targets
from engine.serving.prefix_cache import PrefixCache
from engine.serving.sampler import BatchSampler
from engine.types import BASE_ADAPTER

log = logging.getLogger(__name__)

__all__ = ["FastRuntime", "unsupported_reason"]


@dataclass
class _Row:
    """What the host keeps of a row in a cache slot (its device state is in the tensors)."""

    lora_slot: int
    prompt_len: int


class FastRuntime:
    def __init__(self, model: Any, settings: EngineSettings, *, cuda_graphs: bool | None = None) -> None:
        self.base_model = model
        self.device = model.model.embed_tokens.weight.device
        self.dtype = model.model.embed_tokens.weight.dtype
        is_cuda = self.device.type == "cuda"
        slots = settings.max_batch_size
        if is_cuda:  # whole buckets, so a bucketed step never reaches past the cache
            slots = powers_of_two(1, 1 << max(0, (slots - 1).bit_length()))[-1]
        runner_cls = ARCHITECTURES[model.config.model_type]
        layers, kv_heads, head_dim = runner_cls.cache_shape(model)
        kv_dtype = getattr(torch, settings.resolved_kv_cache_dtype(str(self.device)))
        self.cache = SlotKVCache(layers, slots, kv_heads, head_dim, settings.context_tokens, kv_dtype, self.device)
        targets = serving_targets(model, settings.lora_target_modules)
        from engine.model.shapes import linear_shapes

        # every linear layer, so validation names the real problem ("not served" vs "no such module")
        self.linear_shapes = linear_shapes(model)
        self.lora = LoraSlots(targets, settings.max_resident_adapters + 2, settings.served_lora_rank(), self.dtype,
                              self.device, runner_cls.products(model))
        self.runner = runner_cls(model, self.cache, self.lora)
        self.vocab = int(model.lm_head.out_features if hasattr(model.lm_head, "out_features")
                         else model.lm_head.weight.shape[0])
        self.sampler = BatchSampler(slots, self.vocab, self.device)
        self.prefix = PrefixCache(self.cache, settings.prefix_cache_tokens) if settings.prefix_cache_tokens else None
        # the decode state: one entry per cache slot, read by the (captured) decode step
        i64 = dict(dtype=torch.int64, device=self.device)
        self.tok = torch.zeros(slots, **i64)
        self.pos = torch.zeros(slots, **i64)
        self.lora_idx = torch.zeros(slots, **i64)
        self.active = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self._slot_ids = torch.arange(slots, **i64)
        self._rows: dict[int, _Row] = {}  # cache slot -> its row
        self._key_ids = torch.arange(settings.context_tokens, **i64)
        use_graphs = is_cuda if cuda_graphs is None else (cuda_graphs and is_cuda)
        self.graphs = DecodeGraphs(self._graph_step, slots, settings.context_tokens) if use_graphs else None
        log.info(
            "fast runtime: %s, %d cache slots x %d tokens (%s, %.0f MB), %d LoRA slots x rank %d on %d modules in %d products "
            "(%.0f MB), "
            "prefix cache %d tokens (%.0f MB)%s",
            model.config.model_type, slots, settings.context_tokens, str(kv_dtype).removeprefix("torch."),
            self.cache.bytes / 2**20,
            self.lora.num_slots - 1, self.lora.max_rank, len(targets), len(self.lora.groups),
            self.lora.slot_bytes * self.lora.num_slots / 2**20, settings.prefix_cache_tokens,
            (self.prefix.bytes if self.prefix else 0) / 2**20, ", CUDA graphs" if self.graphs else "",
        )

    def warm_up(self) -> None:
        """Capture the decode graphs of every batch bucket for short answers before serving,
        so the first users do not wait for captures (longer key buckets come on first use)."""
        if self.graphs is None:
            return
        key = self.graphs.key_buckets[0]
        for rows in self.graphs.batch_buckets:
            for lora in (True, False):
                self.graphs.run(rows, key, lora)
        torch.cuda.synchronize()
        log.info("decode graphs captured for batch %s at %d keys%s", self.graphs.batch_buckets, key,
                 f"; capture failed, decoding eagerly: {self.graphs.failed}" if self.graphs.failed else "")

    # ---- rows: the scheduler says what to compute, this object writes every tensor ----------
    @property
    def slots(self) -> int:
        """Rows held at once (cache slots)."""
        return self.cache.slots

    def add_row(self, key: str, sampling: SamplingSettings, prompt: list[int]) -> int:
        """A new row with adapter `key` in the lowest free cache slot; returns the slot.

        `sampling.seed` must be set (the scheduler draws one for unseeded requests)."""
        slot = self.cache.allocate()
        if slot is None:
            raise RuntimeError(f"every one of the {self.cache.slots} cache slots holds a row")
        lora_slot = 0 if key == BASE_ADAPTER else self.lora.slot_of(key)
        s = sampling
        self.sampler.set_row(slot, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             penalty=s.repetition_penalty, seed=s.seed, prompt=prompt)
        self.lora_idx[slot] = lora_slot
        self.active[slot] = False
        self._rows[slot] = _Row(lora_slot, len(prompt))
        return slot

    def remove_row(self, slot: int) -> None:
        self.active[slot] = False
        self.sampler.clear_row(slot)
        self.cache.release(slot)
        self._rows.pop(slot, None)

    def prefill_step(self, chunks: list[tuple[int, list[int], int]]) -> dict[int, int]:
        """Prefill prompt chunks (cache slot, token ids, start position) of several rows at once;
        a row whose prompt this completes gets its first token sampled and starts decoding.
        Returns those first tokens by slot."""
        logits = self.prefill([(slot, self._rows[slot].lora_slot, ids, start) for slot, ids, start in chunks])
        ready = [i for i, (slot, ids, start) in enumerate(chunks) if start + len(ids) == self._rows[slot].prompt_len]
        if not ready:
            return {}
        slots = [chunks[i][0] for i in ready]
        slot_t = torch.tensor(slots, device=self.device)
        tokens = self.sampler.sample(logits.index_select(0, torch.tensor(ready, device=self.device)), slot_t,
                                     self.sampler.plan(slots))
        self.tok[slot_t] = tokens
        self.pos[slot_t] = torch.tensor([self._rows[s].prompt_len for s in slots], device=self.device)
        self.active[slot_t] = True
        return dict(zip(slots, tokens.tolist()))

    def decode_step(self, slots: list[int], key_len: int) -> list[int]:
        """One token for each decoding row (`slots`), whose longest holds `key_len` keys after
        this step; the step's one device-to-host copy is these ids."""
        logits, covered = self.decode(self.cache.high(), key_len, {self._rows[s].lora_slot for s in slots})
        rows = slice(0, covered)
        active = self.active[rows]
        tokens = self.sampler.sample(logits, rows, self.sampler.plan(slots), active)
        self.tok[rows] = torch.where(active, tokens, self.tok[rows])
        self.pos[rows] += active.long()
        ids = tokens.tolist()
        return [ids[s] for s in slots]

    # ---- the decode step ----------------------------------------------------------------
    def _graph_step(self, rows: int, key_len: int, lora: bool) -> torch.Tensor:
        """The captured step: every LoRA slot (static shapes), or none when no row uses one."""
        return self._decode_logits(rows, key_len, None if lora else {0})

    def _decode_logits(self, rows: int, key_len: int, used: set[int] | None = None) -> torch.Tensor:
        """One token for cache slots [0, rows), from the decode state only (graph-safe).

        `used`: the LoRA slots of the active rows when the host knows them (eager steps use
        only their range); None = every slot (CUDA graphs)."""
        active = self.active[:rows]
        pos = torch.where(active, self.pos[:rows], 0)
        write_pos = torch.where(active, self.pos[:rows], self.cache.scratch)
        mask = (self._key_ids[:key_len].unsqueeze(0) <= pos.unsqueeze(1)).view(rows, 1, 1, key_len)
        lora = self.lora.batch(self.lora_idx[:rows], used)
        return self.runner.forward(self.tok[:rows], pos, self._slot_ids[:rows], write_pos, slice(0, rows), key_len,
                                   mask, lora)

    def decode(self, rows: int, key_len: int, used: set[int]) -> tuple[torch.Tensor, int]:
        """Logits for slots [0, rows) and the number of rows they cover (a bucket on CUDA)."""
        if self.graphs is not None:
            b_rows, _ = self.graphs.shape(rows, key_len)
            return self.graphs.run(rows, key_len, lora=bool(used - {0})), b_rows
        return self._decode_logits(rows, key_len, used), rows

    # ---- prefill ------------------------------------------------------------------------
    def prefill(self, chunks: list[tuple[int, int, list[int], int]]) -> torch.Tensor:
        """Prefill several rows' prompt chunks together; returns each row's last logits [n, V].

        `chunks`: (cache slot, LoRA slot, token ids, start position) per row. The tokens are
        packed (see `Packing`): a long chunk beside short ones costs no padding compute. The
        index tensors are built on the host and go to the device in one copy.
        """
        n = len(chunks)
        lengths = [len(c[2]) for c in chunks]
        t, m = max(lengths), sum(lengths)
        key_len = max(start + len(ids) for _s, _l, ids, start in chunks)
        tokens: list[int] = []
        positions: list[int] = []
        rows: list[int] = []  # the row of each packed token
        pad = [0] * (n * t)  # padded place -> packed token
        pad_pos = [0] * (n * t)  # padded place -> position (padding: 0)
        valid = [0] * (n * t)
        unpad: list[int] = []
        last: list[int] = []
        for i, (_slot, _lslot, ids, start) in enumerate(chunks):
            base = len(tokens)
            tokens += ids
            positions += range(start, start + len(ids))
            rows += [i] * len(ids)
            lo, hi = i * t, i * t + len(ids)
            pad[lo:hi], valid[lo:hi] = range(base, base + len(ids)), [1] * len(ids)
            pad_pos[lo:hi] = range(start, start + len(ids))
            unpad += range(lo, hi)
            last.append(base + len(ids) - 1)
        slots = [c[0] for c in chunks]
        lslots = [c[1] for c in chunks]
        host = torch.tensor(tokens + positions + rows + pad + pad_pos + valid + unpad + last + slots + lslots,
                            dtype=torch.int64)
        flat = host.to(self.device, non_blocking=True) if self.device.type == "cuda" else host
        sizes = [m, m, m, n * t, n * t, n * t, m, n, n, n]
        tok_d, pos_d, row_d, pad_d, pad_pos_d, valid_d, unpad_d, last_d, slot_d, lslot_d = flat.split(sizes)
        keys = torch.arange(key_len, device=self.device).view(1, 1, key_len)
        pad_pos_d, valid_d = pad_pos_d.view(n, t, 1), valid_d.view(n, t, 1).bool()
        # a real place attends to the keys up to its position; padding looks at key 0 (no NaN)
        mask = torch.where(valid_d, keys <= pad_pos_d, keys == 0)
        write_rows = slot_d.index_select(0, row_d)
        batch = self.lora.batch(lslot_d, set(lslots))
        lora = None if batch is None else batch.for_tokens(row_d)
        return self.runner.forward(tok_d, pos_d, write_rows, pos_d, slot_d, key_len, mask.unsqueeze(1), lora,
                                   Packing(pad_d, unpad_d, last_d))

    # ---- the adapter registry's side (same face as engine.reference.ReferenceRuntime) ---------
    def needs_exclusive(self, adapter: Any) -> bool:
        return False  # a load writes into a free slot; nothing the model thread reads changes

    def load(self, adapter: Any) -> int:
        """Copy a validated version (engine.adapters.registry.ValidatedAdapter) into a free LoRA slot."""
        v, key = adapter.version, adapter.key
        weights = adapter.tensors if adapter.tensors is not None else v.weights  # read once, by validation
        self.lora.load(key, v.path, weights, adapter.modules, f"adapter {v.domain}/{v.version} ({v.path})")
        return self.lora.slot_bytes

    def delete(self, name: str) -> None:
        self.lora.free(name)
        if self.prefix is not None:
            self.prefix.drop(name)  # its slot may hold another version next: its blocks mean nothing

