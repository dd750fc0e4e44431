"""Turning streams of bytes into text safely: whole characters only, stop strings held back."""

from __future__ import annotations

import codecs


class Utf8Stream:
    """Incremental UTF-8 decoding: a character split across chunks is held until it is complete.

    Invalid bytes become U+FFFD. :attr:`pending` is the incomplete tail kept for the next chunk.
    """

    def __init__(self, pending: bytes = b""):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._decoder.setstate((pending, 0))

    def push(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        """Whatever is held back, with an incomplete tail replaced by U+FFFD."""
        return self._decoder.decode(b"", final=True)

    @property
    def pending(self) -> bytes:
        return self._decoder.getstate()[0]


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that may be the start of one."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was reached."""
        self._held += text
        cut = min((i for i in (self._held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._held = self._held[:cut], ""
            return out, True
        keep = self._longest_stop_prefix_suffix()
        out = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return out, False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:n]):
                    best = n
                    break
        return best
