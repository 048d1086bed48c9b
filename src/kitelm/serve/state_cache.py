"""Kept state: the inference state at the end of a request's tokens, keyed by those tokens, in an LRU within a byte
budget. A request whose tokens extend a kept sequence continues from its state and pays only for the new tokens.

For Griffin/Hawk an entry is the fixed-size state (independent of the tokens it has seen); for the transformer
baseline it is the KV cache of exactly those tokens. Entries are single-row caches owned by the cache: a lookup
returns the stored cache, which the caller copies (`state.gather`) before continuing it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .state import state_nbytes


class StateCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self._entries: OrderedDict[tuple[int, ...], tuple[object, int]] = OrderedDict()
        self._lengths: dict[int, int] = {}  # key length → number of entries of that length
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.hit_tokens = 0
        self._lock = threading.Lock()  # the engine writes; /metrics reads from another thread

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], cache) -> None:
        """Keep `cache` (a single-row cache, not copied) as the state after `tokens`; evict least recently used
        entries until the budget holds. A state larger than the whole budget is not kept."""
        size = state_nbytes(cache)
        key = tuple(tokens)
        if not key or size > self.budget:
            return
        with self._lock:
            if key in self._entries:
                self._remove(key)
            self._entries[key] = (cache, size)
            self._lengths[len(key)] = self._lengths.get(len(key), 0) + 1
            self.bytes += size
            while self.bytes > self.budget:
                self._remove(next(iter(self._entries)))
                self.evictions += 1

    def _remove(self, key) -> None:
        _, size = self._entries.pop(key)
        self.bytes -= size
        self._lengths[len(key)] -= 1
        if not self._lengths[len(key)]:
            del self._lengths[len(key)]

    def lookup(self, tokens: list[int], max_len: int) -> tuple[int, object | None]:
        """(n, cache) for the longest kept key that is a prefix of `tokens` with n ≤ `max_len`; (0, None) if none."""
        with self._lock:
            for n in sorted((n for n in self._lengths if n <= max_len), reverse=True):
                key = tuple(tokens[:n])
                if key in self._entries:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    self.hit_tokens += n
                    return n, self._entries[key][0]
            self.misses += 1
            return 0, None

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._lengths.clear()
            self.bytes = 0
