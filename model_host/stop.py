"""Stop strings over streamed text, shared by offline generation and the serving engine."""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Finds stop strings in streamed text and releases only text that cannot start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add decoded text; return the newly releasable text (sets ``stopped`` on a match)."""
        self.text += piece
        if self.stops:
            start = max(0, self.emitted - max(map(len, self.stops)))
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def flush(self) -> str:
        """Release everything still held back (generation ended without a stop match)."""
        return self._release(len(self.text))

    def _held_back(self) -> int:
        longest = max((len(s) for s in self.stops), default=1)
        for n in range(min(longest - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def _release(self, upto: int) -> str:
        out = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return out
