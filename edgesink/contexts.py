"""Where a stream's KV cache lives: a llama.cpp context of its own, or one sequence of a shared one.

A :class:`~edgesink.kvcache.StreamCache` talks to its context only through a *slot*: decode some
tokens of its sequence, move or remove its cells, save or restore its cells. Two kinds of slot:

* :class:`OwnContext`: one context per stream (``Session`` by default). Its stream is sequence 0,
  with a scratch sequence 1 to re-encode the kept tokens alone.
* :class:`SharedContext` hands out :class:`SharedSlot` objects: many streams, one context, one
  sequence each (llama.cpp's ``n_seq_max``, ``kv_unified=false``: every sequence has its own cells
  and attends only to them). One driver thread decodes the streams' requests in rounds, those of
  one length in one ``llama_decode``, so the weights are read once for all of them. There is no
  scratch sequence (llama.cpp copies cells between sequences only whole-stream): a shared stream
  re-encodes its kept tokens in place, in front of its window, which the patched libllama allows
  (patch 0007).
"""

from __future__ import annotations

import collections
import ctypes
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from . import seqstate
from ._native import C
from .errors import ClosedError, ContextCreationError, DecodeError, NoFreeSlotError, SettingsError
from .options import CACHE_TYPES, default_threads

STREAM_SEQ = seqstate.ONE_STREAM_SEQ  # an own context's stream lives in sequence 0, as saved states name it
SCRATCH_SEQ = 1  # and its kept tokens are re-encoded in sequence 1, then handed to sequence 0


def context_params(model, config):
    """``llama_context_params`` for one stream of a :class:`~edgesink.config.SessionConfig`."""
    p = C.llama_context_default_params()
    p.n_ctx = config.n_ctx
    p.n_batch = p.n_ubatch = max(config.batch_size, min(512, config.n_ctx))
    p.n_seq_max = 2  # the stream, and a scratch sequence to re-encode the kept tokens
    p.kv_unified = True  # one cache of n_ctx cells shared by both sequences
    p.n_threads = p.n_threads_batch = config.n_threads or default_threads()
    p.type_k, p.type_v = CACHE_TYPES[config.type_k], CACHE_TYPES[config.type_v]
    p.flash_attn_type = {None: -1, True: 1, False: 0}[config.flash_attn]
    # Sliding-window (iSWA) models keep only the last n_swa tokens by default, which cannot shift.
    p.swa_full = model.n_swa > 0 and config.policy.shifts
    p.no_perf = True
    return p


def new_context(model, params, what: str):
    """``llama_init_from_model`` or ContextCreationError naming ``what`` failed."""
    ctx = C.llama_init_from_model(model.handle, params)
    if not ctx:
        raise ContextCreationError(f"llama.cpp could not create {what} for {model.path.name} "
                                   "(out of memory, or a parameter it rejects; see --verbose)")
    return ctx


class _Batch:
    """A ``llama_batch`` of up to ``n`` tokens with numpy views of its arrays."""

    def __init__(self, n: int):
        self.n = n
        self.batch = C.llama_batch_init(n, 0, 1)
        as_np = np.ctypeslib.as_array
        b = self.batch
        self.token = as_np(ctypes.cast(b.token, ctypes.POINTER(ctypes.c_int32)), shape=(n,))
        self.pos = as_np(ctypes.cast(b.pos, ctypes.POINTER(ctypes.c_int32)), shape=(n,))
        self.n_seq_id = as_np(ctypes.cast(b.n_seq_id, ctypes.POINTER(ctypes.c_int32)), shape=(n,))
        self.logits = as_np(ctypes.cast(b.logits, ctypes.POINTER(ctypes.c_int8)), shape=(n,))
        self.seq_ptrs = [b.seq_id[i] for i in range(n)]

    def fill(self, start: int, tokens, pos0: int, seq: int, want_logits) -> None:
        n = len(tokens)
        self.token[start:start + n] = tokens
        self.pos[start:start + n] = np.arange(pos0, pos0 + n, dtype=np.int32)
        self.n_seq_id[start:start + n] = 1
        self.logits[start:start + n] = want_logits
        for i in range(start, start + n):
            self.seq_ptrs[i][0] = seq

    def free(self) -> None:
        if self.batch is not None:
            C.llama_batch_free(self.batch)
            self.batch = None


def _output_rows(ctx, indices, n_vocab: int) -> np.ndarray:
    """Copies of the logits of the batch positions ``indices`` of the last decode, shape (len, n_vocab).

    By position: llama.cpp may split a batch of several streams and order its outputs otherwise."""
    rows = np.empty((len(indices), n_vocab), dtype=np.float32)
    for k, i in enumerate(indices):
        rows[k] = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, int(i)), shape=(n_vocab,))
    return rows


def _decode_error(rc: int, n: int, pos0: int) -> DecodeError:
    cause = "no free cache cell" if rc == 1 else "compute error"
    return DecodeError(f"llama_decode failed with code {rc} ({cause}) decoding {n} tokens at position {pos0}")


class ContextSlot(Protocol):
    """What a :class:`~edgesink.kvcache.StreamCache` needs of the context its cells live in.

    :class:`OwnContext` and :class:`SharedSlot` are the two kinds; a test holds both to this shape.
    """

    seq: int  # the stream's sequence
    scratch_seq: int | None  # a sequence to re-encode kept tokens alone; None: re-encode in place
    shared: bool  # other streams decode in the same context
    n_batch: int  # tokens per decode while feeding
    lock: AbstractContextManager  # held around every use of ctx and mem

    @property
    def ctx(self) -> ctypes.c_void_p:
        """The ``llama_context *``."""

    @property
    def mem(self) -> ctypes.c_void_p:
        """Its ``llama_memory_t``."""

    def decode(self, tokens, pos0: int, seq: int, want_logits) -> np.ndarray:
        """Decode ``tokens`` at ``pos0...`` in ``seq``; the logits rows of the tokens ``want_logits`` marks."""

    def running(self) -> AbstractContextManager:
        """Open while the stream decodes one request after another (feeding, generating), so that a
        shared context's rounds wait for its next request rather than leave it a round behind."""

    def clear(self) -> None:
        """Remove every cell of the stream."""

    def state_get(self) -> bytearray:
        """The stream's cells in llama.cpp's one-stream sequence-state form (:mod:`edgesink.seqstate`)."""

    def state_set(self, payload: bytearray) -> int:
        """Make ``payload`` (one-stream form) the stream's cells; the bytes llama.cpp read (0: refused)."""

    def close(self) -> None:
        """Give the slot's cells (and an own context) back."""


class OwnContext:
    """A llama.cpp context holding one stream (sequence 0) and its scratch sequence (1)."""

    seq = STREAM_SEQ
    scratch_seq = SCRATCH_SEQ
    shared = False

    def __init__(self, model, params, capacity: int):
        self.model = model
        self.ctx = new_context(model, params, f"a context of n_ctx {capacity}")
        self.mem = C.llama_get_memory(self.ctx)
        self.n_batch = C.llama_n_batch(self.ctx)
        self._batch = _Batch(self.n_batch)
        self.lock = nullcontext()  # nothing else touches this context

    def running(self) -> AbstractContextManager:
        """Nothing to mark: no other stream waits for this one."""
        return nullcontext()

    def decode(self, tokens, pos0: int, seq: int, want_logits) -> np.ndarray:
        """Decode ``tokens`` at ``pos0...`` in ``seq``; the logits rows of the marked tokens, copied."""
        n = len(tokens)
        self._batch.fill(0, tokens, pos0, seq, want_logits)
        self._batch.batch.n_tokens = n
        rc = C.llama_decode(self.ctx, self._batch.batch)
        if rc != 0:
            raise _decode_error(rc, n, pos0)
        # One stream, one batch: llama.cpp keeps the outputs contiguous and in batch order, one copy takes them.
        n_out = int(np.count_nonzero(want_logits))
        return np.ctypeslib.as_array(C.llama_get_logits(self.ctx), shape=(n_out, self.model.n_vocab)).copy()

    def clear(self) -> None:
        """Empty the whole memory (also sends llama.cpp's search for free cells back to cell 0)."""
        C.llama_memory_clear(self.mem, True)

    def state_get(self) -> bytearray:
        """llama.cpp's state of the stream's sequence, written straight into one buffer."""
        return _seq_state(self.ctx, STREAM_SEQ)

    def state_set(self, payload: bytearray) -> int:
        """Put a sequence state in place of the whole memory; the bytes llama.cpp read (0: refused)."""
        C.llama_memory_clear(self.mem, False)
        return C.llama_state_seq_set_data(self.ctx, _uint8_view(payload), len(payload), STREAM_SEQ)

    def close(self) -> None:
        if self.ctx:
            self._batch.free()
            C.llama_free(self.ctx)
            self.ctx = None


@dataclass(eq=False)  # compared by identity: the driver takes requests out of the pending list
class _Request:
    seq: int
    tokens: list
    pos0: int
    want: np.ndarray
    rows: np.ndarray | None = None
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)


class SharedContext:
    """One llama.cpp context whose sequences are separate streams, decoded together.

    Args:
        model: the loaded :class:`~edgesink.Model`.
        config: the :class:`~edgesink.config.SessionConfig` of its streams: every session on it has
            this n_ctx, these cache types, threads and batch size (policies may differ).
        slots: how many streams it holds at most.
        late_s: how long a round waits for a running stream's next decode before it goes without
            it (a caller that does slow work between tokens); that stream is then not waited for
            again until it asks.

    One thread, the context's *driver*, makes every ``llama_decode`` call. Streams only queue a
    request and wait for its logits. Each *round* the driver takes every waiting one-token step
    and, first come first served, longer requests (a prompt's chunk, kept tokens re-encoded) of
    up to one chunk (the config's ``batch_size`` tokens, what a session feeds at a time; an
    oversized request goes alone, with the steps). It decodes those of each length in one
    ``llama_decode``, shortest first, and hands each its logits at once. So a generating stream
    waits at most one chunk, while a prompt is fed nearly at its own speed.

    Before a round the driver waits for the streams inside a run (:meth:`SharedSlot.running`:
    a Session's feed or generation) that are not asking yet: they are sampling their next token
    and would otherwise miss the round and wait a whole chunk. Streams join and leave between
    rounds. The driver starts with the first request and ends when no stream has run for two
    seconds, or at :meth:`close`.
    llama.cpp batches consecutive sequence ids together, so slots are handed out lowest first.
    """

    def __init__(self, model, config, *, slots: int, late_s: float = 0.02):
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise SettingsError(f"a shared context needs an integer number of slots >= 1, got {slots!r}")
        self.model = model
        self.caches = 2 if model.n_swa > 0 else 1  # a sliding-window model's memory: a full cache and an SWA one
        self.config = config
        self.slots = slots
        self.capacity = config.n_ctx
        params = context_params(model, config)
        params.n_ctx = params.n_ctx * slots
        params.n_seq_max = slots
        params.kv_unified = False  # a KV stream per sequence: each attends over its own cells only
        # One llama_decode takes a whole stream's kept tokens (re-encoded in place, they cannot come
        # in pieces); llama.cpp still computes n_ubatch tokens at a time, and streams feed that many.
        params.n_batch = self.capacity
        self.ctx = new_context(model, params, f"a shared context of {slots} x {self.capacity} cells")
        self.mem = C.llama_get_memory(self.ctx)
        self.n_batch = C.llama_n_ubatch(self.ctx)
        self.max_decode = C.llama_n_batch(self.ctx)
        self._batch = _Batch(self.max_decode)
        self.chunk = config.batch_size  # the tokens of longer requests a round takes: a prompt's chunk
        self.late_s = late_s
        self.linger_s = 2.0  # how long the driver outlives the last running stream, waiting for a request
        self.lock = threading.RLock()  # every llama.cpp call on the context
        self._cond = threading.Condition()  # guards the queue below, the slots and the driver's life
        self._pending: list[_Request] = []
        self._running: collections.Counter[int] = collections.Counter()  # sequence -> runs open on it
        self._late: set[int] = set()  # running sequences a round stopped waiting for
        self._driver: threading.Thread | None = None
        self._free = list(range(slots))
        self.decodes = 0  # llama_decode calls, and the sequences they carried: batching at work
        self.decoded_requests = 0
        self.late_streams = 0  # times a round went without a running stream that was too slow to ask
        model.attach(self, self.lock)  # closing the model frees this context first

    def check_config(self, config) -> None:
        """SettingsError unless a session of ``config`` can live here (same cache, threads, batch)."""
        for key in ("n_ctx", "type_k", "type_v", "n_threads", "flash_attn"):
            if getattr(config, key) != getattr(self.config, key):
                raise SettingsError(f"this shared context holds sessions of {key}={getattr(self.config, key)!r}, "
                                    f"not {getattr(config, key)!r}")
        if config.batch_size > self.n_batch:
            raise SettingsError(f"batch_size {config.batch_size} exceeds the shared context's batch of {self.n_batch}")

    def open_slot(self) -> "SharedSlot":
        """A free sequence of this context (empty), or NoFreeSlotError when all are taken."""
        with self._cond:
            if not self.ctx:
                raise ClosedError("this shared context is closed")
            if not self._free:
                raise NoFreeSlotError(f"all {self.slots} slots of the shared context hold a session; "
                                      "close one first")
            self._free.sort()
            seq = self._free.pop(0)
        with self.lock:
            C.llama_memory_seq_rm(self.mem, seq, -1, -1)
        return SharedSlot(self, seq)

    def release(self, seq: int) -> None:
        with self.lock:
            if self.ctx:
                C.llama_memory_seq_rm(self.mem, seq, -1, -1)
        with self._cond:
            self._free.append(seq)

    @property
    def free_slots(self) -> int:
        with self._cond:
            return len(self._free)

    # -- the driver ------------------------------------------------------------------------------

    @contextmanager
    def running(self, seq: int) -> Iterator[None]:
        """While open, rounds wait (up to ``late_s``) for ``seq``'s next decode (see the class)."""
        with self._cond:
            self._running[seq] += 1
        try:
            yield
        finally:
            with self._cond:
                self._running[seq] -= 1
                if self._running[seq] <= 0:
                    del self._running[seq]
                    self._late.discard(seq)
                self._cond.notify_all()

    def decode(self, seq: int, tokens, pos0: int, want_logits) -> np.ndarray:
        """Decode ``tokens`` of sequence ``seq`` at ``pos0...`` in the driver's next round; the logits
        rows of the tokens marked in ``want_logits``, copied."""
        if len(tokens) > self.max_decode:
            raise ValueError(f"{len(tokens)} tokens exceed the shared context's batch of {self.max_decode}")
        request = _Request(seq, list(tokens), pos0, np.asarray(want_logits, dtype=np.int8))
        with self._cond:
            if not self.ctx:
                raise DecodeError("the shared context is closed")
            self._pending.append(request)
            self._late.discard(seq)
            if self._driver is None:
                self._start_driver()
            self._cond.notify_all()
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.rows

    def _drive(self) -> None:
        """The driver thread: rounds until nothing was queued and no stream ran for ``linger_s``."""
        try:
            self._rounds()
        finally:  # ended by an error: another driver takes over what is queued
            with self._cond:
                if self._driver is threading.current_thread():
                    self._driver = None
                    if self._pending:
                        self._start_driver()

    def _start_driver(self) -> None:
        self._driver = threading.Thread(target=self._drive, name="edgesink-driver", daemon=True)
        self._driver.start()

    def _rounds(self) -> None:
        while True:
            with self._cond:
                taken = self._next_round()
                if not taken:  # decided under the lock, so a request queued after it starts a new driver
                    self._driver = None
                    return
            # One llama_decode per length, shortest first: llama.cpp splits a batch of several streams into
            # ubatches of as many tokens from each, so a prompt's chunk beside one-token steps would cost
            # more than the two apart; and the steps' streams get their logits (and sample) meanwhile.
            for length in sorted({len(r.tokens) for r in taken}):
                # In sequence order: llama.cpp computes consecutive sequences in one ubatch.
                self._decode_together(sorted((r for r in taken if len(r.tokens) == length), key=lambda r: r.seq))

    def _next_round(self) -> list[_Request]:
        """The requests of the next round (``_cond`` held): every step and one chunk of longer requests,
        once the running streams have asked or were given up on; none when the driver should end."""
        idle_until = time.monotonic() + self.linger_s
        while not self._pending:
            if self._running:
                idle_until = time.monotonic() + self.linger_s
            if not self.ctx or time.monotonic() >= idle_until:
                return []
            # Lingering, not ending at once: llama.cpp's CPU threads (OpenMP) belong to the thread that
            # calls llama_decode, and a new caller pays for a new team, several milliseconds.
            self._cond.wait(None if self._running else max(0.0, idle_until - time.monotonic()))
        # Running streams not asking yet are sampling their next token: wait for them, not for ever.
        deadline = time.monotonic() + self.late_s
        while missing := set(self._running) - {r.seq for r in self._pending} - self._late:
            if time.monotonic() >= deadline:
                self._late |= missing
                self.late_streams += len(missing)
                break
            self._cond.wait(max(0.0, deadline - time.monotonic()))
        steps = [r for r in self._pending if len(r.tokens) == 1]
        longer = [r for r in self._pending if len(r.tokens) > 1]
        taken, room = steps, self.chunk
        for request in longer:  # first come, first served; the first is taken even when oversized
            if len(request.tokens) <= room or room == self.chunk:
                taken.append(request)
                room -= len(request.tokens)
            if room <= 0:
                break
        self._pending = [r for r in self._pending if r not in taken]
        return taken

    def _decode_together(self, requests: list[_Request]) -> None:
        with self.lock:
            try:
                self._decode_requests(requests)
            except Exception as error:  # every request of the batch learns it failed
                for r in requests:
                    r.error = error
            finally:  # even on a BaseException: no thread may wait for ever on a request taken here
                for r in requests:
                    r.done.set()

    def _decode_requests(self, requests: list[_Request]) -> None:
        """One llama_decode of every request's tokens (the lock held); each request gets its rows."""
        if not self.ctx:
            raise DecodeError("the shared context is closed")
        start = 0
        for r in requests:
            self._batch.fill(start, r.tokens, r.pos0, r.seq, r.want)
            start += len(r.tokens)
        self._batch.batch.n_tokens = start
        rc = C.llama_decode(self.ctx, self._batch.batch)
        if rc != 0:
            raise _decode_error(rc, start, requests[0].pos0)
        self.decodes += 1
        self.decoded_requests += len(requests)
        start = 0
        for r in requests:
            r.rows = _output_rows(self.ctx, start + np.flatnonzero(r.want), self.model.n_vocab)
            start += len(r.tokens)

    def close(self) -> None:
        """Free the context; sessions still on it then raise ClosedError. Idempotent."""
        with getattr(self, "lock", None) or nullcontext():  # None: __init__ failed early
            if getattr(self, "ctx", None):
                self.model.detach(self)
                self._batch.free()
                C.llama_free(self.ctx)
                self.ctx = None
        cond = getattr(self, "_cond", None)
        if cond is not None:
            with cond:  # queued requests fail (DecodeError), and the driver ends
                cond.notify_all()

    def __enter__(self) -> "SharedContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()


class SharedSlot:
    """One sequence of a :class:`SharedContext`: what a StreamCache needs of its context."""

    scratch_seq = None  # no scratch sequence: kept tokens are re-encoded in place
    shared = True

    def __init__(self, shared: SharedContext, seq: int):
        self.owner = shared
        self.model = shared.model
        self.seq = seq
        self.n_batch = shared.n_batch
        self.lock = shared.lock

    @property
    def ctx(self):
        return self.owner.ctx

    @property
    def mem(self):
        return self.owner.mem

    def decode(self, tokens, pos0: int, seq: int, want_logits) -> np.ndarray:
        return self.owner.decode(seq, tokens, pos0, want_logits)

    def running(self) -> AbstractContextManager:
        """The context's rounds wait for this stream's next request while open."""
        return self.owner.running(self.seq)

    def clear(self) -> None:
        with self.lock:
            C.llama_memory_seq_rm(self.mem, self.seq, -1, -1)

    def state_get(self) -> bytearray:
        """The sequence's state in the form a context of one stream writes (so any session loads it)."""
        with self.lock:
            state = _seq_state(self.ctx, self.seq)
        return seqstate.one_stream(state, self.seq, self.owner.slots, caches=self.owner.caches)

    def state_set(self, payload: bytearray) -> int:
        """Put a one-stream sequence state (:meth:`state_get`, or a lone session's) into this sequence;
        how many bytes of ``payload`` llama.cpp read (0: refused), as :meth:`OwnContext.state_set`."""
        full = seqstate.all_streams(payload, self.seq, self.owner.slots, caches=self.owner.caches)
        with self.lock:
            C.llama_memory_seq_rm(self.mem, self.seq, -1, -1)
            n_read = C.llama_state_seq_set_data(self.ctx, _uint8_view(full), len(full), self.seq)
        return max(0, n_read - (len(full) - len(payload)))  # of the bytes given: the padding added is not theirs

    def close(self) -> None:
        if self.seq is not None:
            self.owner.release(self.seq)
            self.seq = None


# -- sequence states ---------------------------------------------------------------------------------

def _seq_state(ctx, seq: int) -> bytearray:
    size = C.llama_state_seq_get_size(ctx, seq)
    state = bytearray(size)
    written = C.llama_state_seq_get_data(ctx, _uint8_view(state), size, seq)
    del state[written:]  # the ctypes view above is gone, so the buffer may shrink
    return state


def _uint8_view(buffer: bytearray):
    """``buffer`` as the ``uint8_t *`` llama.cpp's state functions take, sharing its memory."""
    return (ctypes.c_uint8 * len(buffer)).from_buffer(buffer)
