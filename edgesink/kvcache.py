"""The stream's KV cache: a llama.cpp context plus the bookkeeping of which token sits where.

Layout of sequence 0, in llama.cpp positions::

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

import ctypes
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from ._native import C
from .errors import DecodeError

STREAM_SEQ = 0  # the stream lives in sequence 0
SCRATCH_SEQ = 1  # kept tokens are re-encoded here, alone, then handed to sequence 0


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


class StreamCache:
    """Owns one llama.cpp context and keeps ``kept + window`` in sync with it."""

    def __init__(self, model, ctx_params, *, capacity: int, kept_forward: bool,
                 rebase_every: int, refresh_every: int):
        self.model = model
        self.capacity = capacity
        self.kept_forward = kept_forward
        self.rebase_every = rebase_every
        self.refresh_every = refresh_every
        self.ctx = C.llama_init_from_model(model.handle, ctx_params)
        if not self.ctx:
            raise ValueError(
                f"llama.cpp could not create a context of n_ctx {capacity} for {model.path.name} "
                "(out of memory, or a parameter it rejects; see --verbose)"
            )
        self.mem = C.llama_get_memory(self.ctx)
        self.n_batch = C.llama_n_batch(self.ctx)
        self._batch = C.llama_batch_init(self.n_batch, 0, 1)
        self._batch_views = self._make_batch_views()
        self.kept: list[int] = []
        self.window: deque[int] = deque()
        self.w0 = 0
        self.counters = CacheCounters()
        self.shifts_since_refresh = 0  # K-shifts since the kept tokens were last encoded fresh
        self.has_logits = False  # the context holds logits for the newest token

    def _make_batch_views(self):
        n = self.n_batch
        as_np = np.ctypeslib.as_array
        token = as_np(ctypes.cast(self._batch.token, ctypes.POINTER(ctypes.c_int32)), shape=(n,))
        pos = as_np(ctypes.cast(self._batch.pos, ctypes.POINTER(ctypes.c_int32)), shape=(n,))
        n_seq_id = as_np(ctypes.cast(self._batch.n_seq_id, ctypes.POINTER(ctypes.c_int32)), shape=(n,))
        logits = as_np(ctypes.cast(self._batch.logits, ctypes.POINTER(ctypes.c_int8)), shape=(n,))
        seq_ptrs = [self._batch.seq_id[i] for i in range(n)]
        return token, pos, n_seq_id, logits, seq_ptrs

    def close(self) -> None:
        if getattr(self, "ctx", None):
            C.llama_batch_free(self._batch)
            C.llama_free(self.ctx)
            self.ctx = None

    # -- state --------------------------------------------------------------------------------

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
        return self.w0 + len(self.window)

    def tokens(self) -> list[int]:
        """The cached tokens in stream order."""
        return self.kept + list(self.window)

    def llama_pos_range(self) -> tuple[int, int]:
        """(min, max) position of sequence 0 as llama.cpp reports it; (-1, -1) when empty."""
        return (C.llama_memory_seq_pos_min(self.mem, STREAM_SEQ), C.llama_memory_seq_pos_max(self.mem, STREAM_SEQ))

    def clear(self) -> None:
        """Empty the cache and start the counters afresh (a new stream)."""
        with deferred_interrupt():
            C.llama_memory_clear(self.mem, True)
            self.kept.clear()
            self.window.clear()
            self.w0 = 0
            self.shifts_since_refresh = 0
            self.has_logits = False
            self.counters = CacheCounters()

    # -- decoding -----------------------------------------------------------------------------

    def decode(self, tokens, pos0: int, seq: int, want_logits) -> None:
        """Decode ``tokens`` at positions ``pos0...`` in ``seq``; ``want_logits[i]`` marks outputs.

        At most n_batch tokens per call.
        """
        n = len(tokens)
        token, pos, n_seq_id, logits, seq_ptrs = self._batch_views
        token[:n] = tokens
        pos[:n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        n_seq_id[:n] = 1
        logits[:n] = want_logits
        for i in range(n):
            seq_ptrs[i][0] = seq
        self._batch.n_tokens = n
        start = time.perf_counter()
        rc = C.llama_decode(self.ctx, self._batch)
        self.counters.decode_seconds += time.perf_counter() - start
        self.counters.tokens_decoded += n
        if rc != 0:
            raise DecodeError(
                f"llama_decode failed with code {rc} ({'no free cache cell' if rc == 1 else 'compute error'}) "
                f"decoding {n} tokens at position {pos0}"
            )

    def logits_rows(self, n_rows: int) -> np.ndarray:
        """A copy of the logits of the last decode's outputs, shape (n_rows, n_vocab)."""
        ptr = C.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_rows, self.model.n_vocab)).copy()

    def last_logits(self) -> np.ndarray:
        ptr = C.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def append(self, tokens, want_logits, n_keep_target: int) -> None:
        """Decode new tokens after the newest one; the first go to ``kept`` until it holds ``n_keep_target``."""
        with deferred_interrupt():
            self.decode(tokens, self.next_pos, STREAM_SEQ, want_logits)
            self.has_logits = bool(want_logits[-1])
            for t in tokens:
                self._record(t, n_keep_target)

    def _record(self, token: int, n_keep_target: int) -> None:
        """Book a new newest token: kept while ``kept`` is short of its target and no window began."""
        if len(self.kept) < n_keep_target and not self.window:
            self.kept.append(token)
            self.w0 += 1
        else:
            self.window.append(token)

    def adopt_kept(self, n_keep: int) -> None:
        """Make the first ``n_keep`` cached tokens kept ones (e.g. a chat's system prompt), if cached yet."""
        while len(self.kept) < n_keep and self.window:
            self.kept.append(self.window.popleft())
            self.w0 += 1

    def redecode_newest(self) -> None:
        """Decode the newest token again, with logits (when the context lost them, e.g. after a restore)."""
        with deferred_interrupt():
            in_window = bool(self.window)
            token = self.window.pop() if in_window else self.kept.pop()
            if not in_window:
                self.w0 -= 1
            C.llama_memory_seq_rm(self.mem, STREAM_SEQ, self.next_pos, -1)
            self.decode([token], self.next_pos, STREAM_SEQ, np.ones(1, dtype=np.int8))
            if in_window:
                self.window.append(token)
            else:
                self.kept.append(token)
                self.w0 += 1
            self.has_logits = True

    def drop_newest(self, n: int) -> None:
        """Remove the ``n`` newest cached tokens (a chat template rewrote them), window first.

        Kept tokens sit just before the window, so the newest ``n`` are always consecutive.
        """
        if not 0 <= n <= self.n_cached:
            raise ValueError(f"cannot remove the {n} newest tokens from a cache of {self.n_cached}")
        with deferred_interrupt():
            C.llama_memory_seq_rm(self.mem, STREAM_SEQ, self.next_pos - n, -1)
            from_window = min(n, len(self.window))
            for _ in range(from_window):
                self.window.pop()
            for _ in range(n - from_window):
                self.kept.pop()
                self.w0 -= 1
            self.has_logits = False

    # -- eviction -----------------------------------------------------------------------------

    def evict(self, n: int) -> None:
        """Drop the ``n`` oldest window tokens, keeping positions consecutive."""
        if n <= 0:
            return
        if n > len(self.window):
            raise ValueError(f"cannot evict {n} tokens from a window of {len(self.window)}")
        with deferred_interrupt():
            C.llama_memory_seq_rm(self.mem, STREAM_SEQ, self.w0, self.w0 + n)
            for _ in range(n):
                self.window.popleft()
            self.counters.evicted += n
            if self.kept_forward:
                if self.kept:
                    C.llama_memory_seq_add(self.mem, STREAM_SEQ, self.w0 - len(self.kept), self.w0, n)
                    self._count_shift()
                self.w0 += n
            else:
                C.llama_memory_seq_add(self.mem, STREAM_SEQ, self.w0 + n, -1, -n)
                self._count_shift()
        if self.kept_forward:
            self._maintain_positions()

    def _count_shift(self) -> None:
        self.counters.shifts += 1
        self.shifts_since_refresh += 1

    def _maintain_positions(self) -> None:
        """Keep positions small and the kept keys fresh (kept-forward mode only)."""
        if self.w0 - len(self.kept) >= self.rebase_every:
            self.rebase()
        elif self.kept and self.shifts_since_refresh >= self.refresh_every:
            self.refresh_kept()

    def rebase(self) -> None:
        """Move the whole window back so the kept tokens start at position 0 again."""
        n_kept = len(self.kept)
        delta = self.w0 - n_kept
        if delta == 0:
            return
        with deferred_interrupt():
            # The kept cells go first: once the window moves back it overlaps their old positions.
            C.llama_memory_seq_rm(self.mem, STREAM_SEQ, self.w0 - n_kept, self.w0)
            C.llama_memory_seq_add(self.mem, STREAM_SEQ, self.w0, -1, -delta)
            self.w0 = n_kept
            self._encode_kept_fresh()
            self.counters.rebases += 1
            self.has_logits = False

    def refresh_kept(self) -> None:
        """Re-encode the kept tokens at their current positions, discarding the rounding of past shifts."""
        with deferred_interrupt():
            C.llama_memory_seq_rm(self.mem, STREAM_SEQ, self.w0 - len(self.kept), self.w0)
            self._encode_kept_fresh()
            self.counters.refreshes += 1
            self.has_logits = False

    def _encode_kept_fresh(self) -> None:
        # Decoded alone in a scratch sequence, the kept tokens attend only to each other (as
        # they did when first seen), then the cells are handed over to the stream's sequence.
        pos0 = self.w0 - len(self.kept)
        for start in range(0, len(self.kept), self.n_batch):
            chunk = self.kept[start:start + self.n_batch]
            self.decode(chunk, pos0 + start, SCRATCH_SEQ, np.zeros(len(chunk), dtype=np.int8))
        C.llama_memory_seq_cp(self.mem, SCRATCH_SEQ, STREAM_SEQ, -1, -1)
        C.llama_memory_seq_rm(self.mem, SCRATCH_SEQ, -1, -1)
        self.shifts_since_refresh = 0

    # -- re-computation -----------------------------------------------------------------------

    def drop_oldest(self, n: int) -> None:
        """Forget the ``n`` oldest window tokens without touching llama.cpp (recompute policy)."""
        for _ in range(n):
            self.window.popleft()
        self.counters.evicted += n
        self.has_logits = False

    def push_uncomputed(self, token: int, n_keep_target: int) -> None:
        """Record a token whose KV is not computed yet (recompute policy); kept first, as :meth:`append`."""
        self._record(token, n_keep_target)
        self.has_logits = False

    def rebuild(self) -> None:
        """Re-encode the kept tokens and the window from position 0, with logits for the newest token."""
        with deferred_interrupt():
            C.llama_memory_clear(self.mem, True)
            tokens = self.kept + list(self.window)
            self.w0 = len(self.kept)
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                want = np.zeros(len(chunk), dtype=np.int8)
                want[-1] = start + len(chunk) == len(tokens)
                self.decode(chunk, start, STREAM_SEQ, want)
            self.counters.rebuilds += 1
            self.has_logits = True
