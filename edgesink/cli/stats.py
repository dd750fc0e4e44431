"""The one line of session stats the commands print (chat's /stats, the end of a feed)."""

from __future__ import annotations


def stream_line(stats) -> str:
    """Where the stream stands: tokens seen, cached, kept, evicted, and the positions in use."""
    return (f"tokens seen {stats.tokens_seen}, in cache {stats.tokens_in_cache} (kept {stats.tokens_kept}), "
            f"evicted {stats.evictions}, positions {stats.first_position}..{stats.last_position}")


def speed_line(stats) -> str:
    """The session's generation and feeding rates so far."""
    return f"generate {stats.generate_tokens_per_s:.1f} tokens/s, feed {stats.feed_tokens_per_s:.0f} tokens/s"
