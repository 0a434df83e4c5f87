"""The KV cache, preallocated by slot: one slot per batch row, for the whole context.

Keys and values of every layer live in one tensor [layers, 2, slots, kv_heads, context + 1,
head_dim]; `k[layer]` and `v[layer]` are views of it. One tensor means one copy moves a row's
prefix (all layers, keys and values) in or out of the prefix cache. A row is prefilled
into a free slot and decodes at its own position, so a row joining or leaving never copies
another row's cache. The extra last position is a scratch column: rows that are
only padding in a step write there, and no real query ever reads it.

Slots are handed out lowest first, so a decode step covers the contiguous range
[0, high) with at most a few idle slots in it (they compute, and are ignored).
"""
from __future__ import annotations

import heapq

import torch


class SlotKVCache:
    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, context: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.kv = torch.zeros(layers, 2, slots, kv_heads, context + 1, head_dim, dtype=dtype, device=device)
        self.k = [self.kv[layer, 0] for layer in range(layers)]
        self.v = [self.kv[layer, 1] for layer in range(layers)]
        self.slots, self.context = slots, context
        self.scratch = context  # index of the scratch column
        self._free = list(range(slots))
        heapq.heapify(self._free)
        self._used: set[int] = set()

    @property
    def bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def row(self, slot: int, start: int, end: int) -> torch.Tensor:
        """Keys and values of positions [start, end) of a slot, every layer: [layers, 2, kv_heads, n, head_dim]."""
        return self.kv[:, :, slot, :, start:end]

    def allocate(self) -> int | None:
        """The lowest free slot, or None when every slot holds a row."""
        if not self._free:
            return None
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        return slot

    def release(self, slot: int) -> None:
        if slot in self._used:
            self._used.discard(slot)
            heapq.heappush(self._free, slot)

    def high(self) -> int:
        """One past the highest slot in use (0 when empty)."""
        return max(self._used) + 1 if self._used else 0
