"""
The KV-cache rows of one runner and what each free row still holds (prefix caching): which row a new prompt takes,
and how much of it is already there. The KV at a position depends only on the tokens up to it, so a prompt that
begins with what a free row holds is prefilled from where they part. Owned by the step thread.
"""

from __future__ import annotations

from collections import OrderedDict

# Free rows are indexed by their first HEAD tokens, so choosing is no scan of every row (256 rows of a thousand
# tokens each): a row of 2*HEAD tokens or more counts only if the prompt shares at least HEAD of them.
HEAD = 16


class Slots:
    def __init__(self, n: int, prefix_cache: bool) -> None:
        self.prefix_cache = prefix_cache
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(n))  # least recently used first
        self._held: list[list[int]] = [[] for _ in range(n)]  # tokens whose KV each free row holds
        self._by_head: dict[tuple[int, ...], set[int]] = {}  # free rows of 2*HEAD tokens or more, by their start
        self._short: set[int] = set()  # free rows holding 1..2*HEAD-1 tokens
        self._age = [(0, slot) for slot in range(n)]  # when each row was given back: the older wins a tie
        self._clock = 0

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, prompt: list[int]) -> tuple[int, int]:
        """The row for a prompt and how many of its tokens that row already holds."""
        lru = next(iter(self._free))
        best, reuse = lru, 0
        if self.prefix_cache:
            reuse = self.reusable(self._held[lru], prompt)
            for slot in sorted(self._candidates(prompt) - {lru}, key=self._age.__getitem__):
                n = self.reusable(self._held[slot], prompt)
                # at least half of what the row holds: a few common tokens (the chat template's start) never take
                # another conversation's cache
                if n > reuse and 2 * n >= len(self._held[slot]):
                    best, reuse = slot, n
        self._unindex(best)
        del self._free[best]
        self._held[best] = []
        return best, reuse

    def best_reuse(self, prompt: list[int]) -> int:
        """The most of a prompt any free row could give (those with the most to reuse choose first)."""
        slots = self._candidates(prompt) | {next(iter(self._free))}
        return max(self.reusable(self._held[slot], prompt) for slot in slots)

    def give_back(self, slot: int, held: list[int]) -> None:
        """A row is free again, holding the KV of `held` (empty: nothing in it is reused)."""
        held = held if self.prefix_cache else []
        self._held[slot] = held
        self._clock += 1
        self._age[slot] = (self._clock, slot)
        self._free[slot] = None  # the most recently used
        if len(held) >= 2 * HEAD:
            self._by_head.setdefault(tuple(held[:HEAD]), set()).add(slot)
        elif held:
            self._short.add(slot)

    def reusable(self, held: list[int], prompt: list[int]) -> int:
        """How many of `held`'s tokens a prompt can start after: their common beginning, short of the prompt's last
        token."""
        n = 0
        for a, b in zip(held, prompt[: len(prompt) - 1], strict=False):  # zip stops at the shorter
            if a != b:
                break
            n += 1
        return n

    def _candidates(self, prompt: list[int]) -> set[int]:
        return self._by_head.get(tuple(prompt[:HEAD]), set()) | self._short

    def _unindex(self, slot: int) -> None:
        held = self._held[slot]
        if len(held) >= 2 * HEAD:
            group = self._by_head[tuple(held[:HEAD])]
            group.discard(slot)
            if not group:
                del self._by_head[tuple(held[:HEAD])]
        self._short.discard(slot)
