"""Streaming files through a session with progress (the command-line face of ``Session.feed``)."""

from __future__ import annotations

import sys
import time
from typing import BinaryIO, Iterable

READ_BYTES = 1 << 16  # files are read and fed in pieces: memory stays bounded for any size


def feed_files(session, files: Iterable[BinaryIO], out=sys.stderr, every_seconds: float = 1.0) -> int:
    """Feed each file's bytes to ``session``; print progress and the final stats to ``out``."""
    start = last = time.perf_counter()
    total = 0
    for f in files:
        while chunk := f.read(READ_BYTES):
            total += session.feed(chunk)
            now = time.perf_counter()
            if now - last >= every_seconds:
                last = now
                print(f"\r{total} tokens, {total / (now - start):.0f} tokens/s, "
                      f"{session.stats.evictions} evicted", end="", file=out, flush=True)
    elapsed = time.perf_counter() - start
    stats = session.stats
    print(f"\rfed {total} tokens in {elapsed:.1f} s ({total / elapsed if elapsed else 0:.0f} tokens/s); "
          f"in cache {stats.tokens_in_cache} (kept {stats.tokens_kept}), evicted {stats.evictions}, "
          f"positions {stats.first_position}..{stats.last_position}", file=out)
    return total
