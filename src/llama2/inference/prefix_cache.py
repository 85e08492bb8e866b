"""Keys and values of token prefixes kept across requests (a system prompt, a few-shot context, a chat's history).

The cache holds blocks of `block` positions in one preallocated pool per layer, `[n_kv_heads, blocks, block,
head_dim]`. A block is found by its place in a chain: its key is (the id of the block before it, its own token
ids), so a block matches only where every token before it matched too, and matching compares the token ids
themselves (no hash can collide). Each stored block gets a fresh id, so the children of an evicted block are
never found again; they are evicted in turn.

Keys and values computed with a LoRA adapter are kept apart from the base model's: lookup and store take a
`space` (the adapter's id, 0 for the base), and a chain's first block hangs from -space, so blocks of different
spaces never match.

`lookup(ids, limit)` returns the longest chain of stored blocks that begins `ids` and covers at most `limit`
positions; `load` copies them into an engine's cache row; `store` copies a row's full blocks in (those already
stored are only marked used). Eviction is least recently used, and a lookup marks a chain's blocks used deepest
first, so a chain's first blocks (shared by the most requests) are the last to go. Because the keys and values of
position i depend only on the tokens up to i, a request whose first P positions come from here computes the
rest as if it had prefilled the whole prompt: the same tokens, and log-probabilities equal up to the order of
floating-point sums.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..errors import Llama2Error
from ..model import KVCache

BLOCK = 16  # positions per block (vLLM's default block size too)


class PrefixCache:
    """A bounded store of prefix keys and values for the KV caches `caches` (one per layer), `tokens` positions
    in all (rounded down to whole blocks)."""

    def __init__(self, caches: Sequence[KVCache], tokens: int, block: int = BLOCK) -> None:
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < block:
            raise Llama2Error(f"prefix_cache must be a number of positions >= {block} (one block), or 0 for none; "
                              f"got {tokens!r}")
        self.block = block
        self.blocks = tokens // block
        _, heads, _, dim = caches[0].k.shape
        like = caches[0].k
        shape = (len(caches), heads, self.blocks, block, dim)
        # empty, not zeros: on the CPU the pages of blocks never stored are never touched, so a pool sized for a
        # whole context costs memory only as it fills (a chat's history grows into it)
        self.k = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.v = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.caches = list(caches)
        self._index: dict[tuple[int, tuple[int, ...]], int] = {}  # (id before, block's tokens) -> pool block
        self._key: list[tuple[int, tuple[int, ...]] | None] = [None] * self.blocks  # pool block -> its key
        self._id = [0] * self.blocks  # pool block -> the id of what it holds now
        self._next_id = 1  # 0 is the empty prefix
        self._used: OrderedDict[int, None] = OrderedDict()  # pool blocks, least recently used first
        self._free = list(range(self.blocks - 1, -1, -1))
        self.hits = self.lookups = self.hit_positions = 0  # statistics: requests, and positions not recomputed

    @property
    def stored_blocks(self) -> int:
        return len(self._used)

    def lookup(self, ids: Sequence[int], limit: int, space: int = 0) -> list[int]:
        """The pool blocks holding the longest stored prefix of ids that is at most `limit` positions long."""
        B = self.block
        chain: list[int] = []
        parent = -space
        for start in range(0, min(limit, len(ids)) - B + 1, B):
            at = self._index.get((parent, tuple(ids[start:start + B])))
            if at is None:
                break
            chain.append(at)
            parent = self._id[at]
        self.lookups += 1
        if chain:
            self.hits += 1
            self.hit_positions += len(chain) * B
            self._touch(chain)
        return chain

    def load(self, chain: list[int], row: int) -> int:
        """Copy the chain's keys and values into positions 0.. of `row` of every layer; returns the positions."""
        n = len(chain) * self.block
        at = torch.tensor(chain, device=self.k.device)
        for layer, c in enumerate(self.caches):
            heads, dim = c.k.shape[1], c.k.shape[3]
            c.k[row, :, :n] = self.k[layer][:, at].reshape(heads, n, dim)
            c.v[row, :, :n] = self.v[layer][:, at].reshape(heads, n, dim)
        return n

    def store(self, ids: Sequence[int], row: int, length: int, space: int = 0) -> None:
        """Keep the full blocks of positions 0..length-1 of `row`, which hold the keys and values of ids[:length].
        Blocks already stored are marked used; new ones take free pool blocks or evict the least recently used
        (never one of this chain's)."""
        B = self.block
        chain: list[int] = []
        new: list[tuple[int, int]] = []  # (pool block, first position)
        parent = -space
        for start in range(0, min(length, len(ids)) - B + 1, B):
            key = (parent, tuple(ids[start:start + B]))
            at = self._index.get(key)
            if at is None:
                at = self._take(set(chain))
                if at is None:  # the pool is smaller than this chain
                    break
                self._index[key] = at
                self._key[at] = key
                self._id[at] = self._next_id
                self._next_id += 1
                new.append((at, start))
            chain.append(at)
            parent = self._id[at]
        if new:
            blocks = torch.tensor([a for a, _ in new], device=self.k.device)
            pos = torch.cat([torch.arange(s, s + B) for _, s in new]).to(self.k.device)
            for layer, c in enumerate(self.caches):
                heads, dim = c.k.shape[1], c.k.shape[3]
                self.k[layer][:, blocks] = c.k[row][:, pos].view(heads, len(new), B, dim)
                self.v[layer][:, blocks] = c.v[row][:, pos].view(heads, len(new), B, dim)
        if chain:
            self._touch(chain)

    def _touch(self, chain: list[int]) -> None:
        for at in reversed(chain):  # deepest first: the chain's first blocks end up most recently used
            self._used[at] = None
            self._used.move_to_end(at)

    def _take(self, keep: set[int]) -> int | None:
        """A free pool block, else the least recently used one not in keep (evicted), else None."""
        if self._free:
            return self._free.pop()
        for at in self._used:
            if at in keep:
                continue
            del self._used[at]
            del self._index[self._key[at]]
            self._key[at] = None
            return at
        return None
