"""Which cached token sits at which llama.cpp position: the stream cache's bookkeeping alone.

Pure Python (no llama.cpp, no numpy), so the rules can be tested on their own; the cache in
:mod:`edgesink.kvcache` carries out the memory operations each change returns.

Layout of the stream's sequence, in llama.cpp positions::

    kept tokens        window tokens (oldest ... newest)
    [w0 - n_kept, w0)  [w0, w0 + n_window)

The kept tokens (attention sinks, or a pinned prompt) always sit just before the oldest window
token. RoPE attention depends only on the distance between query and key, so this gives exactly
StreamingLLM's scores (positions assigned within the cache) however many tokens were evicted.

Evicting ``n`` window tokens is done one of two ways:

* ``kept-forward`` (patched libllama): remove the cells, then move the few kept cells forward by
  ``n``. The patched K-shift rotates only those cells. Positions grow, so every ``rebase_every``
  evicted tokens the whole window moves back once; and since each shift re-rounds the stored
  keys (F16 by default), the kept tokens are re-encoded fresh every ``refresh_every`` shifts.
  They attend only to each other, so a fresh encoding is exact.
* ``window-back`` (stock libllama, or asked for): remove the cells and move the whole window back
  by ``n``, as llama.cpp does. A stock K-shift rotates every cell whatever moved.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, fields

# -- memory operations on the stream's sequence ---------------------------------------------------------


@dataclass(frozen=True)
class Remove:
    """Remove the cells at positions ``[p0, p1)``; ``p1 = -1`` means to the end (llama_memory_seq_rm)."""

    p0: int
    p1: int


@dataclass(frozen=True)
class Shift:
    """Add ``delta`` to the positions in ``[p0, p1)``; ``p1 = -1`` means to the end (llama_memory_seq_add)."""

    p0: int
    p1: int
    delta: int


@dataclass(frozen=True)
class EncodeKeptFresh:
    """Encode ``tokens`` (the kept ones, whose cells were removed) anew at positions ``pos0...``.

    Decoded alone in a scratch sequence they attend only to each other, as when first seen; the
    cells are then handed to the stream's sequence. Done even when ``tokens`` is empty.
    """

    pos0: int
    tokens: tuple[int, ...]


MemoryOp = Remove | Shift | EncodeKeptFresh


@dataclass
class CacheCounters:
    """What the cache has done so far."""

    evicted: int = 0  # tokens evicted
    shifts: int = 0  # K-shift events (cells moved)
    rebases: int = 0  # whole-window moves back to small positions
    refreshes: int = 0  # fresh re-encodings of the kept tokens
    rebuilds: int = 0  # full re-computations (recompute policy)
    decode_seconds: float = 0.0
    tokens_decoded: int = 0


# -- the layout ------------------------------------------------------------------------------------------


class CacheLayout:
    """``kept + window`` and their positions; each change returns the memory operations it needs.

    The operations of one call must all be carried out, in order: the bookkeeping has already moved on.
    """

    def __init__(self, *, kept_forward: bool, rebase_every: int, refresh_every: int):
        self.kept_forward = kept_forward
        self.rebase_every = rebase_every
        self.refresh_every = refresh_every
        self.kept: list[int] = []
        self.window: deque[int] = deque()
        self.w0 = 0  # position of the oldest window token
        self.shifts_since_refresh = 0  # K-shifts since the kept tokens were last encoded fresh
        self.counters = CacheCounters()

    # -- views --------------------------------------------------------------------------------

    @property
    def n_kept(self) -> int:
        return len(self.kept)

    @property
    def n_window(self) -> int:
        return len(self.window)

    @property
    def n_cached(self) -> int:
        return len(self.kept) + len(self.window)

    @property
    def next_pos(self) -> int:
        """The position of the next token appended."""
        return self.w0 + len(self.window)

    def tokens(self) -> list[int]:
        """The cached tokens in stream order."""
        return self.kept + list(self.window)

    def clear(self) -> None:
        """Forget every token and start the counters afresh (a new stream)."""
        self.kept.clear()
        self.window.clear()
        self.w0 = 0
        self.shifts_since_refresh = 0
        self.counters = CacheCounters()

    # -- new tokens ---------------------------------------------------------------------------

    def record(self, token: int, n_keep_target: int) -> None:
        """Book a new newest token (at :attr:`next_pos`): kept while ``kept`` is short of its target
        and no window began, since kept tokens must stay the stream's first ones."""
        if len(self.kept) < n_keep_target and not self.window:
            self.kept.append(token)
            self.w0 += 1
        else:
            self.window.append(token)

    def append(self, tokens, n_keep_target: int) -> None:
        """Book new tokens, decoded at positions ``next_pos...``, as :meth:`record` does each."""
        for t in tokens:
            self.record(t, n_keep_target)

    def adopt_kept(self, n_keep: int) -> None:
        """Make the first ``n_keep`` cached tokens kept ones (e.g. a chat's system prompt), if cached yet.

        No memory operation: the oldest window tokens already sit just after the kept ones.
        """
        while len(self.kept) < n_keep and self.window:
            self.kept.append(self.window.popleft())
            self.w0 += 1

    def drop_newest(self, n: int) -> list[MemoryOp]:
        """Forget the ``n`` newest tokens, window first.

        Kept tokens sit just before the window, so the newest ``n`` are always consecutive cells.
        """
        if not 0 <= n <= self.n_cached:
            raise ValueError(f"cannot remove the {n} newest tokens from a cache of {self.n_cached}")
        ops = [Remove(self.next_pos - n, -1)]
        from_window = min(n, len(self.window))
        for _ in range(from_window):
            self.window.pop()
        for _ in range(n - from_window):
            self.kept.pop()
            self.w0 -= 1
        return ops

    def push_newest(self, token: int, *, kept: bool) -> None:
        """Book ``token`` as the newest again, kept or in the window (undoing ``drop_newest(1)``
        around a re-decode, whatever the keep target says)."""
        if kept and self.window:
            raise ValueError("a kept token cannot follow window tokens")
        if kept:
            self.kept.append(token)
            self.w0 += 1
        else:
            self.window.append(token)

    # -- eviction -----------------------------------------------------------------------------

    def evict(self, n: int) -> list[MemoryOp]:
        """Drop the ``n`` oldest window tokens, keeping positions consecutive (and, kept-forward,
        small and the kept keys fresh)."""
        if n <= 0:
            return []
        if n > len(self.window):
            raise ValueError(f"cannot evict {n} tokens from a window of {len(self.window)}")
        ops: list[MemoryOp] = [Remove(self.w0, self.w0 + n)]
        for _ in range(n):
            self.window.popleft()
        self.counters.evicted += n
        if not self.kept_forward:
            ops.append(Shift(self.w0 + n, -1, -n))  # the window moves back into the gap
            self._count_shift()
            return ops
        if self.kept:
            ops.append(Shift(self.w0 - len(self.kept), self.w0, n))  # the kept tokens move up to the window
            self._count_shift()
        self.w0 += n
        return ops + self._maintain_positions()

    def _count_shift(self) -> None:
        self.counters.shifts += 1
        self.shifts_since_refresh += 1

    def _maintain_positions(self) -> list[MemoryOp]:
        """Keep positions small and the kept keys fresh (kept-forward mode only)."""
        if self.w0 - len(self.kept) >= self.rebase_every:
            return self.rebase()
        if self.kept and self.shifts_since_refresh >= self.refresh_every:
            return self.refresh_kept()
        return []

    def rebase(self) -> list[MemoryOp]:
        """Move the whole window back so the kept tokens start at position 0 again."""
        n_kept = len(self.kept)
        delta = self.w0 - n_kept
        if delta == 0:
            return []
        # The kept cells go first: once the window moves back it overlaps their old positions.
        ops: list[MemoryOp] = [Remove(self.w0 - n_kept, self.w0), Shift(self.w0, -1, -delta)]
        self.w0 = n_kept
        self.counters.rebases += 1
        return ops + self._encode_kept_fresh()

    def refresh_kept(self) -> list[MemoryOp]:
        """Re-encode the kept tokens at their current positions, discarding the rounding of past shifts."""
        ops: list[MemoryOp] = [Remove(self.w0 - len(self.kept), self.w0)]
        self.counters.refreshes += 1
        return ops + self._encode_kept_fresh()

    def _encode_kept_fresh(self) -> list[MemoryOp]:
        self.shifts_since_refresh = 0
        return [EncodeKeptFresh(self.w0 - len(self.kept), tuple(self.kept))]

    # -- re-computation -----------------------------------------------------------------------

    def drop_oldest(self, n: int) -> None:
        """Forget the ``n`` oldest window tokens; no memory operation (recompute policy: the
        cache is rebuilt before its logits are needed)."""
        if not 0 <= n <= len(self.window):
            raise ValueError(f"cannot drop {n} tokens from a window of {len(self.window)}")
        for _ in range(n):
            self.window.popleft()
        self.counters.evicted += n

    def restart_positions(self) -> None:
        """Book a rebuild: every cached token encoded again, the kept ones from position 0."""
        self.w0 = len(self.kept)
        self.counters.rebuilds += 1

    # -- saved state --------------------------------------------------------------------------

    def state(self) -> dict:
        """The bookkeeping as plain JSON-able data (the keys saved session files hold)."""
        return {
            "kept": list(self.kept), "window": list(self.window), "w0": self.w0,
            "counters": asdict(self.counters), "shifts_since_refresh": self.shifts_since_refresh,
        }

    @classmethod
    def from_state(cls, state: dict, *, kept_forward: bool, rebase_every: int, refresh_every: int) -> CacheLayout:
        """A layout holding a :meth:`state` (checked by :func:`state_problem` first)."""
        layout = cls(kept_forward=kept_forward, rebase_every=rebase_every, refresh_every=refresh_every)
        layout.kept = list(state["kept"])
        layout.window = deque(state["window"])
        layout.w0 = state["w0"]
        layout.counters = CacheCounters(**state["counters"])
        layout.shifts_since_refresh = state.get("shifts_since_refresh", 0)  # absent in files of older versions
        return layout


def turn_cut(n: int, needed: int, message_starts, *, window_start: int, n_window: int) -> int:
    """Where to cut the window so that it starts at a message: how many window tokens to evict.

    ``n`` is what the policy asks, ``needed`` the least that makes room (>= 1); the window holds the
    stream indices from ``window_start``, ``n_window`` of them; ``message_starts`` are the stream
    indices where a chat's messages begin, oldest first (those already evicted are skipped). The cut
    moves forward to the first message start at or after ``n``; failing that, back to the last one at
    or after ``needed``; failing both (the newest message alone outgrows the window) it stays at ``n``,
    inside that message.
    """
    offsets = [start - window_start for start in message_starts if start >= window_start]
    cut = next((o for o in offsets if n <= o <= n_window), None)
    if cut is None:
        cut = max((o for o in offsets if needed <= o < n), default=n)
    return cut


def state_problem(state: dict, *, n_ctx: int, n_vocab: int) -> str | None:
    """What is wrong with the layout fields of a saved state for a cache of ``n_ctx`` cells, or None.

    A short name of the faulty field. A missing required field raises KeyError (the caller words it).
    """
    kept, window = state["kept"], state["window"]
    if not (isinstance(kept, list) and isinstance(window, list)):
        return "kept and window must be lists"
    tokens = kept + window
    if len(tokens) > n_ctx or not all(is_json_int(t) and 0 <= t < n_vocab for t in tokens):
        return "cached tokens"
    if not (is_json_int(state["w0"]) and state["w0"] >= len(kept)):
        return "w0"
    if not _counters_sound(state["counters"]):
        return "counters"
    since_refresh = state.get("shifts_since_refresh", 0)  # absent in files of older versions
    if not (is_json_int(since_refresh) and since_refresh >= 0):
        return "shifts_since_refresh"
    return None


def _counters_sound(counters) -> bool:
    """Known fields only (missing ones start at 0), each a count >= 0 (decode_seconds may be a float)."""
    known = {f.name for f in fields(CacheCounters)}
    return (isinstance(counters, dict) and set(counters) <= known
            and all(is_json_int(v) or (k == "decode_seconds" and isinstance(v, float)) for k, v in counters.items())
            and all(v >= 0 for v in counters.values()))


def is_json_int(value) -> bool:
    """An integer read from JSON (saved state): JSON's true/false arrive as bools, which
    ``isinstance(value, int)`` would let through."""
    return type(value) is int
