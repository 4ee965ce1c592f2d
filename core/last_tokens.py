"""
Each cache row's last token id, for a model that smears the previous token into the next (G4): the graph reads it as
an input (prev_ids) rather than a cached embedding, so a row continues exactly from any position of its cache. A
caller that continues a row before its end (a prompt sharing part of a cached row) says so with continue_after.
"""

from __future__ import annotations

import numpy as np


class LastTokens:
    def __init__(self, max_slots: int) -> None:
        self.ids = np.zeros(max_slots, dtype=np.int64)

    def before(self, slots: np.ndarray) -> np.ndarray:
        """The token before each row's next one: the graph's prev_ids."""
        return self.ids[np.asarray(slots, dtype=np.int64)]

    def fed(self, slots: np.ndarray, input_ids: np.ndarray) -> None:
        """The rows took input_ids (B, T): each now ends with its last one."""
        self.ids[np.asarray(slots, dtype=np.int64)] = np.asarray(input_ids)[:, -1]

    def continue_after(self, slot: int, token: int) -> None:
        """The row's next token follows `token` (the cache holds the row up to it)."""
        self.ids[slot] = token
