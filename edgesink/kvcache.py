"""The stream's KV cache: a llama.cpp context that carries out what the bookkeeping decides.

Which token sits at which position, and how eviction keeps positions consecutive (kept-forward
or window-back), is :mod:`edgesink.layout`; this module runs its memory operations on llama.cpp.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager

import numpy as np

from ._native import C
from .contexts import SCRATCH_SEQ, STREAM_SEQ, ContextSlot  # noqa: F401  (the SEQs re-exported: where the stream lives)
from .layout import CacheLayout, EncodeKeptFresh, MemoryOp, Remove, Shift


_holding_interrupts = 0  # nesting depth of deferred_interrupt in the main thread


@contextmanager
def deferred_interrupt():
    """Hold back Ctrl-C while llama.cpp's memory and our bookkeeping are changed together.

    A SIGINT that arrives meanwhile then goes where SIGINT went before: Python's KeyboardInterrupt,
    a program's own handler, or nowhere where SIGINT is ignored (a job started in the background).
    Nested uses join the outermost one, which alone delivers it.
    """
    global _holding_interrupts
    if threading.current_thread() is not threading.main_thread() or _holding_interrupts:
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    _holding_interrupts += 1
    try:
        yield
    finally:
        _holding_interrupts -= 1
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)


def _layout_view(name: str, doc: str) -> property:
    """A read-only property showing the attribute ``name`` of the cache's layout."""
    return property(lambda self: getattr(self.layout, name), doc=doc)


class StreamCache:
    """Owns one slot of a llama.cpp context (a context of its own, or a sequence of a shared one) and
    keeps its cells in sync with a :class:`~edgesink.layout.CacheLayout`.

    The layout decides (``kept + window`` and their positions); this class decodes and carries out
    the memory operations the layout returns, each change inside :func:`deferred_interrupt` so
    that Ctrl-C never lands between the bookkeeping and llama.cpp's memory.
    """

    def __init__(self, model, slot: ContextSlot, *, capacity: int, kept_forward: bool,
                 rebase_every: int, refresh_every: int):
        """``slot``: where the cells live (:mod:`edgesink.contexts`); this cache owns and closes it."""
        self.model = model
        self.capacity = capacity
        self.slot = slot
        self.n_batch = slot.n_batch
        self.layout = CacheLayout(kept_forward=kept_forward, rebase_every=rebase_every, refresh_every=refresh_every)
        self.has_logits = False  # the context holds logits for the newest token
        self._outputs = None  # logits rows of the last decode (copies)

    @property
    def ctx(self):
        """The ``llama_context *`` holding the cells; None once closed (or its shared context was)."""
        return self.slot.ctx if self.slot is not None else None

    @property
    def mem(self):
        return self.slot.mem

    @property
    def seq(self) -> int:
        """The llama.cpp sequence of the stream."""
        return self.slot.seq

    def close(self) -> None:
        if getattr(self, "slot", None) is not None:
            self.slot.close()
            self.slot = None

    # -- state ------------------------------------------------------------------------------

    # Read-only views of the layout: only the methods below change it, each with llama.cpp's memory.
    kept = _layout_view("kept", "The kept tokens (sinks or a pinned prefix), oldest first.")
    window = _layout_view("window", "The window tokens (a deque), oldest first.")
    w0 = _layout_view("w0", "The position of the oldest window token.")
    counters = _layout_view("counters", "What the cache has done so far (CacheCounters).")
    shifts_since_refresh = _layout_view("shifts_since_refresh", "K-shifts since the kept tokens were encoded fresh.")
    kept_forward = _layout_view("kept_forward", "Whether evictions move the kept tokens up (else the window back).")
    rebase_every = _layout_view("rebase_every", "Kept-forward: how far the kept tokens may drift before a rebase.")
    refresh_every = _layout_view("refresh_every", "Kept-forward: shifts after which the kept tokens are re-encoded.")
    n_kept = _layout_view("n_kept", "How many tokens are kept.")
    n_window = _layout_view("n_window", "How many tokens the window holds.")
    n_cached = _layout_view("n_cached", "How many tokens the cache holds.")
    next_pos = _layout_view("next_pos", "The position of the next token appended.")

    def tokens(self) -> list[int]:
        """The cached tokens in stream order."""
        return self.layout.tokens()

    def state(self) -> dict:
        """The bookkeeping as plain JSON-able data (see :meth:`CacheLayout.state`)."""
        return self.layout.state()

    def set_state(self, state: dict) -> None:
        """Take over the bookkeeping of a :meth:`state` (checked by :func:`edgesink.layout.state_problem`).

        llama.cpp's memory is not touched: the caller puts the matching cells in place. The
        context's logits belong to no token of the new state, so they count as lost.
        """
        self.layout = CacheLayout.from_state(state, kept_forward=self.kept_forward, rebase_every=self.rebase_every,
                                             refresh_every=self.refresh_every)
        self.has_logits = False

    def llama_pos_range(self) -> tuple[int, int]:
        """(min, max) position of this cache's sequence as llama.cpp reports it; (-1, -1) when empty."""
        with self.slot.lock:
            return (C.llama_memory_seq_pos_min(self.mem, self.seq), C.llama_memory_seq_pos_max(self.mem, self.seq))

    def clear(self) -> None:
        """Empty the cache and start the counters afresh (a new stream)."""
        with deferred_interrupt():
            self.slot.clear()
            self.layout.clear()
            self.has_logits = False

    # -- decoding -----------------------------------------------------------------------------

    def decode(self, tokens, pos0: int, seq: int, want_logits) -> None:
        """Decode ``tokens`` at positions ``pos0...`` in ``seq``; ``want_logits[i]`` marks outputs.

        At most n_batch tokens per call.
        """
        start = time.perf_counter()
        self._outputs = self.slot.decode(tokens, pos0, seq, want_logits)
        self.counters.decode_seconds += time.perf_counter() - start
        self.counters.tokens_decoded += len(tokens)

    def logits_rows(self, n_rows: int) -> np.ndarray:
        """The logits of the last decode's outputs, shape (n_rows, n_vocab)."""
        return self._outputs[:n_rows]

    def last_logits(self) -> np.ndarray:
        """The logits of the last decode's last output."""
        return self._outputs[-1]

    def append(self, tokens, want_logits, n_keep_target: int) -> None:
        """Decode new tokens after the newest one; the first go to ``kept`` until it holds ``n_keep_target``."""
        with deferred_interrupt():
            # Decoded before they are booked: a failed decode leaves the bookkeeping as it was.
            self.decode(tokens, self.next_pos, self.seq, want_logits)
            self.has_logits = bool(want_logits[-1])
            self.layout.append(tokens, n_keep_target)

    def adopt_kept(self, n_keep: int) -> None:
        """Make the first ``n_keep`` cached tokens kept ones (e.g. a chat's system prompt), if cached yet."""
        self.layout.adopt_kept(n_keep)

    def redecode_newest(self) -> None:
        """Decode the newest token again, with logits (when the context lost them, e.g. after a restore)."""
        with deferred_interrupt():
            token = (self.window or self.kept)[-1]
            in_kept = not self.window
            self._run(self.layout.drop_newest(1))
            self.decode([token], self.next_pos, self.seq, np.ones(1, dtype=np.int8))
            self.layout.push_newest(token, kept=in_kept)
            self.has_logits = True

    def drop_newest(self, n: int) -> None:
        """Remove the ``n`` newest cached tokens (a chat template rewrote them), window first."""
        with deferred_interrupt():
            self._run(self.layout.drop_newest(n))
            self.has_logits = False

    # -- eviction -----------------------------------------------------------------------------

    def evict(self, n: int) -> None:
        """Drop the ``n`` oldest window tokens, keeping positions consecutive (see :mod:`edgesink.layout`)."""
        with deferred_interrupt():
            self._run(self.layout.evict(n))

    def rebase(self) -> None:
        """Move the whole window back so the kept tokens start at position 0 again."""
        with deferred_interrupt():
            self._run(self.layout.rebase())

    def refresh_kept(self) -> None:
        """Re-encode the kept tokens at their current positions, discarding the rounding of past shifts."""
        with deferred_interrupt():
            self._run(self.layout.refresh_kept())

    def _run(self, ops: list[MemoryOp]) -> None:
        """Carry out the layout's memory operations on the stream's sequence, in order."""
        for op in ops:
            if isinstance(op, Remove):
                with self.slot.lock:
                    C.llama_memory_seq_rm(self.mem, self.seq, op.p0, op.p1)
            elif isinstance(op, Shift):
                with self.slot.lock:
                    C.llama_memory_seq_add(self.mem, self.seq, op.p0, op.p1, op.delta)
            elif isinstance(op, EncodeKeptFresh):
                self._encode_fresh(op)
            else:
                raise TypeError(f"unknown memory operation {op!r}")

    def _encode_fresh(self, op: EncodeKeptFresh) -> None:
        if self.slot.scratch_seq is None:
            self._encode_fresh_in_place(op)
            return
        # Decoded alone in a scratch sequence, the kept tokens attend only to each other (as
        # they did when first seen), then the cells are handed over to the stream's sequence.
        for start in range(0, len(op.tokens), self.n_batch):
            chunk = op.tokens[start:start + self.n_batch]
            self.decode(chunk, op.pos0 + start, self.slot.scratch_seq, np.zeros(len(chunk), dtype=np.int8))
        C.llama_memory_seq_cp(self.mem, self.slot.scratch_seq, self.seq, -1, -1)
        C.llama_memory_seq_rm(self.mem, self.slot.scratch_seq, -1, -1)
        self.has_logits = False  # the scratch decodes replaced the context's outputs

    def _encode_fresh_in_place(self, op: EncodeKeptFresh) -> None:
        # In front of the window, the kept tokens see only each other: attention is causal by position
        # (patch 0007 lets llama.cpp take them there). One decode: a second piece would land between
        # the first and the window, which llama.cpp refuses.
        if op.tokens:
            self.decode(list(op.tokens), op.pos0, self.seq, np.zeros(len(op.tokens), dtype=np.int8))
        self.has_logits = False

    # -- re-computation -----------------------------------------------------------------------

    def drop_oldest(self, n: int) -> None:
        """Forget the ``n`` oldest window tokens without touching llama.cpp (recompute policy)."""
        self.layout.drop_oldest(n)
        self.has_logits = False

    def push_uncomputed(self, token: int, n_keep_target: int) -> None:
        """Record a token whose KV is not computed yet (recompute policy); kept first, as :meth:`append`."""
        self.layout.record(token, n_keep_target)
        self.has_logits = False

    def rebuild(self) -> None:
        """Re-encode the kept tokens and the window from position 0, with logits for the newest token."""
        with deferred_interrupt():
            self.slot.clear()
            tokens = self.tokens()
            self.layout.restart_positions()
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                want = np.zeros(len(chunk), dtype=np.int8)
                want[-1] = start + len(chunk) == len(tokens)
                self.decode(chunk, start, self.seq, want)
            self.has_logits = True
