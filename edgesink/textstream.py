"""Turning streams of bytes into text safely: whole characters only, stop strings held back."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Iterator

TEXT_CHUNK_CHARS = 16_384  # long text is tokenized in pieces of about this size (bounded memory)
SURROGATES = re.compile("[\ud800-\udfff]")  # lone surrogates cannot be encoded


@dataclass(frozen=True)
class GenerationChunk:
    """One step of :meth:`~edgesink.session.Session.stream_generate`: a piece of text and the token it ends with."""

    text: str  # whole characters only; may be empty while a character or stop string is pending
    token: int | None  # the sampled token (None on the final chunk)
    finish_reason: str | None = None  # "stop" (end token), "stop_string", "length" on the last chunk
    end_token: int | None = None  # with "stop": the end-of-generation token (fed to the stream, not in text)


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


def text_pieces(text: "str | bytes", utf8: Utf8Stream) -> Iterator[str]:
    """Text to tokenize, in pieces of bounded size; bytes go through ``utf8`` (a split character waits)."""
    if isinstance(text, str):
        if utf8.pending:  # a str cannot finish a character begun in bytes: U+FFFD for it
            yield utf8.flush()
        # Lone surrogates cannot be encoded; they become U+FFFD like invalid UTF-8 bytes.
        yield from split_at_spaces(SURROGATES.sub("\ufffd", text) if SURROGATES.search(text) else text)
    elif isinstance(text, (bytes, bytearray, memoryview)):
        data = memoryview(text).cast("B")
        carry = ""
        for i in range(0, len(data), TEXT_CHUNK_CHARS):  # decoded in pieces too: memory stays bounded
            carry = yield from split_at_spaces(carry + utf8.push(data[i:i + TEXT_CHUNK_CHARS]), keep_tail=True)
        if carry:
            yield carry
    else:
        raise ValueError(f"feed takes str or bytes, got {type(text).__name__}")


def split_at_spaces(text: str, keep_tail: bool = False):
    """Pieces of about TEXT_CHUNK_CHARS, cut before a space; returns the unfinished tail if ``keep_tail``."""
    start = 0
    while len(text) - start > (TEXT_CHUNK_CHARS if keep_tail else 0):
        end = min(len(text), start + TEXT_CHUNK_CHARS)
        if end < len(text):
            split = text.rfind(" ", start + 1, end)
            end = split if split > start else end
        yield text[start:end]
        start = end
    if not keep_tail:
        return ""
    return text[start:]
