"""Streaming files through a session with progress (the command-line face of ``Session.feed``)."""

from __future__ import annotations

import sys
import time
from typing import BinaryIO, Iterable

from .stats import stream_line

READ_BYTES = 1 << 16  # files are read and fed in pieces: memory stays bounded for any size
PROGRESS_SECONDS = 1.0  # at most one progress report per this many seconds


def feed_files(session, files: Iterable[BinaryIO], out=sys.stderr, every_seconds: float | None = None) -> int:
    """Feed each file's bytes to ``session``; print progress and the final stats to ``out``.

    On a terminal the progress is one line updated in place; elsewhere (a pipe, a log file) each
    report is a line of its own. The final stats always start a new line. Returns the tokens fed.
    """
    every = PROGRESS_SECONDS if every_seconds is None else every_seconds
    live = _is_terminal(out)
    start = last = time.perf_counter()
    total = 0
    reported = False
    for f in files:
        while chunk := f.read(READ_BYTES):
            total += session.feed(chunk)
            now = time.perf_counter()
            if now - last >= every:
                last = now
                reported = True
                line = f"{total} tokens, {total / (now - start):.0f} tokens/s, {session.stats.evictions} evicted"
                print(f"\r{line}" if live else line, end="" if live else "\n", file=out, flush=True)
    if live and reported:
        print(file=out)  # end the line updated in place
    print(final_stats(session, total, time.perf_counter() - start), file=out)
    return total


def final_stats(session, fed: int, elapsed: float) -> str:
    """One line: what this feed did and where the whole stream stands."""
    rate = fed / elapsed if elapsed else 0
    return f"fed {fed} tokens in {elapsed:.1f} s ({rate:.0f} tokens/s); {stream_line(session.stats)}"


def _is_terminal(out) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
