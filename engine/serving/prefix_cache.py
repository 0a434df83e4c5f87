"""Prefix cache: keys and values of prompt starts already computed, reused by later prompts.

Every prompt of a role starts with the same rendered system prompt, and every follow-up
message of a conversation starts with the conversation so far. Their keys and values depend
only on the tokens before them and the adapter version (attention is causal), so a row whose
prompt starts like a cached one copies that part into its KV slot and prefills only the rest.
This is vLLM's automatic prefix caching, small:

- The cache is a preallocated pool of blocks of `BLOCK_TOKENS` tokens, every layer's keys and
  values in one tensor `[layers, 2, kv_heads, blocks, BLOCK_TOKENS, head_dim]`
  (`PREFIX_CACHE_TOKENS` / `BLOCK_TOKENS` blocks), so its memory is fixed at start.
- A block is named by a hash chain: (the previous block's hash, its tokens), seeded with the
  adapter key (`legal__v3`, or the base model's), so two versions never share a block and a
  block means one exact token history. Shared starts are stored once.
- A lookup walks the chain of full blocks, then takes the longest common start of one more
  block among the children of the last match: a system prompt rarely ends on a block
  boundary, and the next message starts right after it.
- Least recently used blocks are evicted first; a hit touches its blocks child first, so a
  parent always outlives its children.

Restoring or storing any number of blocks is one or two tensor copies. The model thread is
the only user, except `drop`, which the adapter loader thread calls when it frees a version:
it only queues the key (a block can never match another key, so forgetting it late is safe).
"""
from __future__ import annotations

import collections
import queue
from dataclasses import dataclass, field

import torch

from engine.serving.kv_cache import SlotKVCache

#: Tokens per block: the unit of sharing (a hit also takes part of one more block).
BLOCK_TOKENS = 16


@dataclass(eq=False)
class _Block:
    index: int  # its place in the pool
    digest: int
    parent: int  # the previous block's digest (the chain's seed for a first block)
    tokens: tuple[int, ...]
    key: str  # adapter key


@dataclass
class Hit:
    """What a lookup found: full blocks in order, then part of one more block."""

    blocks: list[_Block] = field(default_factory=list)
    partial: _Block | None = None
    partial_tokens: int = 0

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK_TOKENS + self.partial_tokens


def _seed(key: str) -> int:
    """The parent digest of an adapter version's first blocks."""
    return hash(("prefix", key))


def chain(key: str, tokens: list[int]) -> list[int]:
    """The digests of the full blocks of `tokens` for adapter `key`."""
    out, digest = [], _seed(key)
    for lo in range(0, len(tokens) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        digest = hash((digest, tuple(tokens[lo:lo + BLOCK_TOKENS])))
        out.append(digest)
    return out


def _common(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    def __init__(self, cache: SlotKVCache, budget_tokens: int) -> None:
        layers, two, _slots, kv_heads, _ctx, head_dim = cache.kv.shape
        self.cache = cache
        self.num_blocks = budget_tokens // BLOCK_TOKENS
        self.pool = torch.zeros(layers, two, kv_heads, self.num_blocks, BLOCK_TOKENS, head_dim,
                                dtype=cache.kv.dtype, device=cache.kv.device)
        self._blocks: collections.OrderedDict[int, _Block] = collections.OrderedDict()  # LRU order, newest last
        self._children: dict[int, set[int]] = {}  # digest -> digests of the blocks that follow it
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._dropped: queue.SimpleQueue[str | None] = queue.SimpleQueue()  # keys freed elsewhere (None: all)

    @property
    def bytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def __len__(self) -> int:
        return len(self._blocks)

    # ---- lookup and restore -----------------------------------------------------------
    def cached_blocks(self, key: str, digests: list[int]) -> int:
        """How many leading blocks of a chain are cached (no LRU touch)."""
        n = 0
        for d in digests:
            b = self._blocks.get(d)
            if b is None or b.key != key:
                break
            n += 1
        return n

    def lookup(self, key: str, tokens: list[int], digests: list[int], limit: int) -> Hit:
        """The longest cached start of `tokens` (at most `limit` tokens), touched as used."""
        hit = Hit()
        self._forget_dropped()
        if self.num_blocks == 0 or limit <= 0:
            return hit
        parent = _seed(key)
        for i, d in enumerate(digests[:limit // BLOCK_TOKENS]):
            b = self._blocks.get(d)
            lo = i * BLOCK_TOKENS
            if b is None or b.key != key or b.parent != parent or b.tokens != tuple(tokens[lo:lo + BLOCK_TOKENS]):
                break
            hit.blocks.append(b)
            parent = d
        lo = len(hit.blocks) * BLOCK_TOKENS
        rest = tokens[lo:min(limit, lo + BLOCK_TOKENS)]
        best = 0
        for d in self._children.get(parent, ()):
            b = self._blocks.get(d)
            if b is not None and b.key == key:
                n = _common(b.tokens, rest)
                if n > best:
                    best, hit.partial = n, b
        hit.partial_tokens = best
        for b in ([hit.partial] if hit.partial else []) + hit.blocks[::-1]:  # child first: parents outlive
            self._blocks.move_to_end(b.digest)
        return hit

    def restore(self, hit: Hit, slot: int) -> None:
        """Copy a hit's keys and values into positions [0, hit.tokens) of a KV slot."""
        k = len(hit.blocks)
        if k:
            ids = torch.tensor([b.index for b in hit.blocks], device=self.pool.device)
            self.cache.row(slot, 0, k * BLOCK_TOKENS).unflatten(3, (k, BLOCK_TOKENS)).copy_(
                self.pool.index_select(3, ids))
        if hit.partial is not None and hit.partial_tokens:
            lo = k * BLOCK_TOKENS
            self.cache.row(slot, lo, lo + hit.partial_tokens).copy_(
                self.pool[:, :, :, hit.partial.index, :hit.partial_tokens])

    # ---- store ------------------------------------------------------------------------
    def store(self, key: str, tokens: list[int], digests: list[int], slot: int, upto: int) -> int:
        """Keep the full blocks of positions [0, upto) of a KV slot (their tokens: `tokens`).

        Blocks already cached are only touched. Returns how many blocks were added; fewer
        than asked when the pool is smaller than the chain (the chain's own blocks are never
        evicted to make room for its later ones).
        """
        self._forget_dropped()
        if self.num_blocks == 0:
            return 0
        full = min(upto // BLOCK_TOKENS, len(digests))
        own = set(digests[:full])
        new: list[int] = []  # block positions in the chain
        ids: list[int] = []  # their places in the pool
        parent = _seed(key)
        for i, d in enumerate(digests[:full]):
            if d not in self._blocks:
                index = self._take(own)
                if index is None:
                    break
                lo = i * BLOCK_TOKENS
                self._blocks[d] = _Block(index, d, parent, tuple(tokens[lo:lo + BLOCK_TOKENS]), key)
                self._children.setdefault(parent, set()).add(d)
                new.append(i)
                ids.append(index)
            parent = d
        for d in reversed(digests[:full]):  # newest, child first: parents outlive their children
            if d in self._blocks:
                self._blocks.move_to_end(d)
        if new:
            first, end = new[0], new[-1] + 1
            if len(new) == end - first:  # one run of blocks (the usual case): a view of the slot
                rows = self.cache.row(slot, first * BLOCK_TOKENS, end * BLOCK_TOKENS).unflatten(
                    3, (end - first, BLOCK_TOKENS))
            else:
                rows = self.cache.row(slot, 0, end * BLOCK_TOKENS).unflatten(3, (end, BLOCK_TOKENS)).index_select(
                    3, torch.tensor(new, device=self.pool.device))
            self.pool.index_copy_(3, torch.tensor(ids, device=self.pool.device), rows)
        return len(new)

    def _take(self, keep: set[int]) -> int | None:
        """A free block index, evicting the least recently used block outside `keep`."""
        if self._free:
            return self._free.pop()
        for d, b in self._blocks.items():
            if d not in keep:
                self._evict(b)
                return self._free.pop()
        return None

    def _evict(self, b: _Block) -> None:
        del self._blocks[b.digest]
        siblings = self._children.get(b.parent)
        if siblings is not None:
            siblings.discard(b.digest)
            if not siblings:
                del self._children[b.parent]
        self._free.append(b.index)

    def drop(self, key: str) -> None:
        """Forget an adapter version's blocks (its LoRA slot was freed); any thread, done lazily."""
        self._dropped.put(key)

    def clear(self) -> None:
        """Forget every block (benchmarks start each measurement cold); any thread, done lazily."""
        self._dropped.put(None)

    def _forget_dropped(self) -> None:
        keys = set()
        while True:
            try:
                keys.add(self._dropped.get_nowait())
            except queue.Empty:
                break
        if keys:
            for b in [b for b in self._blocks.values() if None in keys or b.key in keys]:
                self._evict(b)
