"""Everything per step and per token of the fast serving path.

`FastRuntime` bundles the runner (our Llama-family forward over the loaded modules), the
slot KV cache, the stacked LoRA slots, the batched sampler, the decode state on the device
and, on CUDA, the decode step's CUDA graphs. The model thread's policy (who is admitted, how
prompts are chunked, when rows finish) lives in `engine.slot_scheduler`; the adapter registry
talks to this object exactly as it talks to the reference path's `LoraRuntime`.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from engine.config import EngineSettings
from engine.runtime.graphs import DecodeGraphs, powers_of_two
from engine.runtime.kv_cache import SlotKVCache
from engine.runtime.llama import ARCHITECTURES, unsupported_reason
from engine.runtime.lora import LoraSlots, serving_targets
from engine.runtime.sampler import BatchSampler

log = logging.getLogger(__name__)

__all__ = ["FastRuntime", "unsupported_reason"]


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
        self.cache = SlotKVCache(layers, slots, kv_heads, head_dim, settings.context_tokens, self.dtype, self.device)
        targets = serving_targets(model, settings.lora_target_modules)
        from engine.adapters import linear_shapes

        # every linear layer, so validation names the real problem ("not served" vs "no such module")
        self.linear_shapes = linear_shapes(model)
        self.lora = LoraSlots(targets, settings.max_resident_adapters + 2, settings.served_lora_rank(), self.dtype,
                              self.device)
        self.runner = runner_cls(model, self.cache, self.lora)
        self.vocab = int(model.lm_head.out_features if hasattr(model.lm_head, "out_features")
                         else model.lm_head.weight.shape[0])
        self.sampler = BatchSampler(slots, self.vocab, self.device)
        # the decode state: one entry per cache slot, read by the (captured) decode step
        i64 = dict(dtype=torch.int64, device=self.device)
        self.tok = torch.zeros(slots, **i64)
        self.pos = torch.zeros(slots, **i64)
        self.lora_idx = torch.zeros(slots, **i64)
        self.active = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self._slot_ids = torch.arange(slots, **i64)
        self._key_ids = torch.arange(settings.context_tokens, **i64)
        use_graphs = is_cuda if cuda_graphs is None else (cuda_graphs and is_cuda)
        self.graphs = DecodeGraphs(self._decode_logits, slots, settings.context_tokens) if use_graphs else None
        log.info(
            "fast runtime: %s, %d cache slots x %d tokens (%.0f MB), %d LoRA slots x rank %d on %d modules (%.0f MB)%s",
            model.config.model_type, slots, settings.context_tokens, self.cache.bytes / 2**20,
            self.lora.num_slots - 1, self.lora.max_rank, len(targets),
            self.lora.slot_bytes * self.lora.num_slots / 2**20, ", CUDA graphs" if self.graphs else "",
        )

    def warm_up(self) -> None:
        """Capture the decode graphs of every batch bucket for short answers before serving,
        so the first users do not wait for captures (longer key buckets come on first use)."""
        if self.graphs is None:
            return
        key = self.graphs.key_buckets[0]
        for rows in self.graphs.batch_buckets:
            self.graphs.run(rows, key)
        torch.cuda.synchronize()
        log.info("decode graphs captured for batch %s at %d keys%s", self.graphs.batch_buckets, key,
                 f"; capture failed, decoding eagerly: {self.graphs.failed}" if self.graphs.failed else "")

    # ---- the decode step ----------------------------------------------------------------
    def _decode_logits(self, rows: int, key_len: int, used: set[int] | None = None) -> torch.Tensor:
        """One token for cache slots [0, rows), from the decode state only (graph-safe)."""
        active = self.active[:rows]
        pos = torch.where(active, self.pos[:rows], 0)
        write_pos = torch.where(active, self.pos[:rows], self.cache.scratch)
        mask = (self._key_ids[:key_len].unsqueeze(0) <= pos.unsqueeze(1)).view(rows, 1, 1, key_len)
        lora = self.lora.batch(self.lora_idx[:rows], used)
        return self.runner.forward(
            self.tok[:rows].unsqueeze(1), pos.unsqueeze(1), self._slot_ids[:rows], write_pos,
            slice(0, rows), key_len, mask, lora,
        )

    def decode(self, rows: int, key_len: int, used: set[int]) -> tuple[torch.Tensor, int]:
        """Logits for slots [0, rows) and the number of rows they cover (a bucket on CUDA)."""
        if self.graphs is not None:
            b_rows, _ = self.graphs.shape(rows, key_len)
            return self.graphs.run(rows, key_len), b_rows
        return self._decode_logits(rows, key_len, used), rows

    # ---- prefill ------------------------------------------------------------------------
    def prefill(self, chunks: list[tuple[int, int, list[int], int]]) -> torch.Tensor:
        """Prefill several rows' prompt chunks together; returns each row's last logits [n, V].

        `chunks`: (cache slot, LoRA slot, token ids, start position) per row.
        """
        n, t = len(chunks), max(len(c[2]) for c in chunks)
        key_len = max(start + len(ids) for _s, _l, ids, start in chunks)
        dev = self.device
        tokens = torch.zeros(n, t, dtype=torch.int64)
        positions = torch.zeros(n, t, dtype=torch.int64)
        write_pos = torch.full((n, t), self.cache.scratch, dtype=torch.int64)
        lengths = torch.tensor([len(c[2]) for c in chunks])
        for i, (_slot, _lslot, ids, start) in enumerate(chunks):
            tokens[i, :len(ids)] = torch.tensor(ids)
            positions[i, :len(ids)] = torch.arange(start, start + len(ids))
            write_pos[i, :len(ids)] = positions[i, :len(ids)]
        valid = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)  # [n, t]
        keys = torch.arange(key_len)
        mask = (keys.view(1, 1, key_len) <= positions.unsqueeze(2)) & valid.unsqueeze(2)
        mask |= (~valid).unsqueeze(2) & (keys.view(1, 1, key_len) == 0)  # padding looks at key 0: no NaN
        slots = torch.tensor([c[0] for c in chunks], dtype=torch.int64)
        lslots = torch.tensor([c[1] for c in chunks], dtype=torch.int64)
        lora = self.lora.batch(lslots.to(dev), {c[1] for c in chunks})
        return self.runner.forward(
            tokens.to(dev), positions.to(dev), slots.repeat_interleave(t).to(dev), write_pos.view(-1).to(dev),
            slots.to(dev), key_len, mask.unsqueeze(1).to(dev), lora, last=(lengths - 1).to(dev),
        )

    # ---- the adapter registry's side (same face as engine.adapters.LoraRuntime) ---------------
    def needs_exclusive(self, adapter: Any) -> bool:
        return False  # a load writes into a free slot; nothing the model thread reads changes

    def load(self, adapter: Any) -> int:
        from engine.adapters import peft_name

        v = adapter.version
        key = peft_name(v.domain, v.version)
        self.lora.load(key, v.path, v.weights, adapter.modules, f"adapter {v.domain}/{v.version} ({v.path})")
        return self.lora.slot_bytes

    def delete(self, name: str) -> None:
        self.lora.free(name)

    def slot_of(self, key: str) -> int:
        return self.lora.slot_of(key)

