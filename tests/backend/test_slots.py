"""The slot choice of backend/slots.py against the rule it implements, written out as a scan of every free row:
the index by first tokens must never change which row a prompt takes or how much of it is reused."""

from __future__ import annotations

import random

from backend.slots import HEAD, Slots


def by_scan(slots: Slots, held: dict[int, list[int]], order: list[int], prompt: list[int]) -> tuple[int, int]:
    """The rule: the least recently used row, unless an older-to-newer scan finds one that gives more and at
    least half of what it holds."""
    best, reuse = order[0], slots.reusable(held[order[0]], prompt)
    for slot in order[1:]:
        n = slots.reusable(held[slot], prompt)
        if n > reuse and 2 * n >= len(held[slot]):
            best, reuse = slot, n
    return best, reuse


def test_the_index_chooses_as_a_scan_of_every_row_does():
    rng = random.Random(0)
    stems = [[rng.randrange(50) for _ in range(rng.choice([3, HEAD, 2 * HEAD, 90]))] for _ in range(6)]
    slots, n = Slots(12, prefix_cache=True), 12
    held, order = {s: [] for s in range(n)}, list(range(n))  # what the test expects each row to hold, LRU first
    for _ in range(400):
        if slots.free > 2 and rng.random() < 0.6:
            stem = rng.choice(stems)
            prompt = stem[: rng.randrange(1, len(stem) + 1)] + [rng.randrange(50) for _ in range(rng.randrange(3))]
            want = by_scan(slots, held, order, prompt)
            assert slots.best_reuse(prompt) >= want[1]
            assert slots.take(prompt) == want, prompt
            order.remove(want[0])
            held[want[0]] = None  # busy
        else:
            busy = [s for s in range(n) if held[s] is None]
            if not busy:
                continue
            slot = rng.choice(busy)
            stem = rng.choice(stems)
            held[slot] = stem[: rng.randrange(0, len(stem) + 1)] + [rng.randrange(50) for _ in range(rng.randrange(4))]
            slots.give_back(slot, list(held[slot]))
            order.append(slot)


def test_without_prefix_caching_rows_go_least_recently_used_first_and_nothing_is_reused():
    slots = Slots(3, prefix_cache=False)
    assert [slots.take([1, 2, 3])[0] for _ in range(3)] == [0, 1, 2]
    slots.give_back(2, [1, 2, 3, 4])
    slots.give_back(0, [1, 2, 3, 4])
    assert slots.take([1, 2, 3, 4, 5]) == (2, 0)
