"""KV bookkeeping: token slots in the pool and request rows in the workers' `req_to_token` table.

The scheduler is the only owner of this state; workers just obey the slot numbers in each plan.
"""

from __future__ import annotations


class FreeList:
    """Free integer ids 0..n-1, handed out lowest first so reuse is predictable."""

    def __init__(self, n: int) -> None:
        self.capacity = n
        self._free = list(range(n - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def take(self, k: int) -> list[int]:
        if k > len(self._free):
            raise MemoryError(f"asked for {k}, {len(self._free)} free")
        taken = self._free[len(self._free) - k:][::-1]
        del self._free[len(self._free) - k:]
        return taken

    def give(self, ids: list[int]) -> None:
        self._free.extend(ids)


class KVPool:
    def __init__(self, tokens: int, rows: int) -> None:
        self.slots = FreeList(tokens)
        self.rows = FreeList(rows)

    def stats(self) -> dict[str, int]:
        return {
            "pool_tokens_used": self.slots.used,
            "pool_tokens_free": self.slots.free,
            "rows_used": self.rows.used,
            "rows_free": self.rows.free,
        }
