"""The session's lock around a method: one thread at a time works on a session's llama.cpp context."""

from __future__ import annotations

from functools import wraps


def exclusive(method):
    """Run ``method`` holding ``self._lock`` (a session's re-entrant lock)."""
    @wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked
