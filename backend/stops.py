"""
Stop strings: an answer ends where one first appears in its text, cut just before it. Text arrives in pieces and a
stop string may span them, so `StopMatcher` holds back any end of the text that could begin one. The backend matches
the detokenized text, so the slot is freed at the stop.
"""

from __future__ import annotations


class StopMatcher:
    """Finds the first stop string in a stream of text pieces, holding back what could begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to send now, whether a stop string was reached: then nothing follows)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = len(self.pending) - self._open_tail()
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def _open_tail(self) -> int:
        """The length of the longest end of the pending text that begins a stop string (0: none)."""
        for k in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        """What is held back, at the end of an answer that met no stop string."""
        out, self.pending = self.pending, ""
        return out
