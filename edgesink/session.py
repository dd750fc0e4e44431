"""A streaming session: an unbounded token stream through a bounded KV cache.

``feed`` pushes text in, ``generate`` draws text out, ``score`` measures how well the model
predicts text, and all three go through the same context policy, so what ``score`` reports is
exactly what ``feed`` computes. This module holds that stream: feeding, generation and stats.
The conversation methods come from :mod:`edgesink.session_chat`, saving and restoring from
:mod:`edgesink.session_state`.
"""

from __future__ import annotations

import operator
import os
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from ._native import C
from .contexts import OwnContext, SharedContext, context_params
from .errors import Cancelled, ClosedError, SettingsError, UnsupportedModelError
from .kvcache import StreamCache, deferred_interrupt
from .config import SessionConfig
from .options import check_n_ctx, kept_forward_mode, not_int, stop_strings
from .sampling import Sampler, SamplingParams
from .scoring import position_mask, token_nll
from .session_chat import ChatMethods
from .session_lock import exclusive
from .session_state import SnapshotMethods
from .textstream import GenerationChunk, StopMatcher, Utf8Stream, text_pieces


@dataclass
class Rate:
    """Tokens handled and the seconds they took, for a tokens-per-second figure."""

    tokens: int = 0
    seconds: float = 0.0

    def add(self, n: int, since: float) -> None:
        """Count ``n`` tokens handled since ``since`` (a ``time.perf_counter()`` reading)."""
        self.tokens += n
        self.seconds += time.perf_counter() - since

    @property
    def per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class SessionStats:
    """A snapshot of what a session has done (``Session.stats``)."""

    tokens_seen: int  # tokens that entered the stream, fed or generated
    tokens_in_cache: int
    tokens_kept: int  # sinks / pinned prompt
    evictions: int  # tokens evicted so far
    shifts: int  # K-shift events
    rebases: int
    refreshes: int
    first_position: int  # llama.cpp positions of the oldest and newest cached token
    last_position: int
    decode_seconds: float
    tokens_decoded: int
    feed_tokens_per_s: float
    generate_tokens_per_s: float
    extra: dict = field(default_factory=dict)

    def shift_counts(self) -> dict:
        """What eviction did so far: ``evictions``, ``shifts``, ``rebases`` and ``refreshes``."""
        return {"evictions": self.evictions, "shifts": self.shifts, "rebases": self.rebases, "refreshes": self.refreshes}


class Session(ChatMethods, SnapshotMethods):
    """A stream of tokens through a bounded cache with a context policy.

    Args:
        model: a loaded :class:`Model` (``edgesink.load``); ``model.session(...)`` says the same.
        config: a :class:`SessionConfig`; or the settings below as keywords (not both).
        n_ctx: cache size in tokens; the stream itself is unbounded.
        policy: ``"sink"`` (default), ``"window"``, ``"halve"``, ``"dense"``, ``"recompute"``,
            or a policy object from :mod:`edgesink.policies`.
        sinks: attention sinks kept for ``sink`` / ``halve`` (default 4).
        evict_chunk: eviction granularity of ``sink`` / ``window`` (default 1, the paper's).
        batch_size: tokens decoded per step while feeding (default n_ctx/16, at most 64). A batch
            of b tokens needs b evictions first, so its first token sees only n_ctx - b older
            tokens: keep b a small fraction of the window.
        type_k, type_v: cache types (``f16`` default; ``q8_0``, ``f32``, ...).
        flash_attn: True/False, or None to let llama.cpp decide.
        n_threads: CPU threads (default: every CPU this process may run on).
        shift_mode: ``"auto"`` (kept-forward with a patched libllama, else window-back; on a shared
            context, patch level 7 or more), ``"kept-forward"`` or ``"window-back"``; see
            :mod:`edgesink.layout`.
        refresh_every: re-encode the kept tokens after this many shifts (kept-forward mode).
        rebase_every: move positions back after this many evicted tokens (default n_ctx).
        context: a :class:`~edgesink.contexts.SharedContext` to live in (one of its sequences),
            decoding together with the other sessions there; None (default): a context of its own.

    Threads may share a session: a lock lets one call at a time work on its context. Each
    ``feed``, ``score``, ``reset``, ``start_chat``, ``stats``... runs whole, so two threads feeding
    get the same stream as feeding one after the other; a generator holds the lock for one token
    at a time, so text another thread feeds between two tokens enters the stream there and the
    generation continues after it.

    After :meth:`close` (or closing the model, which closes its sessions first) every method that
    needs the cache raises :class:`ClosedError`; ``n_ctx``, ``policy``, ``messages`` and the
    like stay readable.
    """

    def __init__(self, model, config: SessionConfig | None = None, *,
                 context: SharedContext | None = None, **settings):
        self._lock = threading.RLock()  # re-entrant: feed calls feed_tokens, start_chat calls reset...
        self._stream: StreamCache | None = None
        if isinstance(model, (str, bytes, os.PathLike)):
            raise TypeError(f"Session takes a loaded model, not a path: edgesink.load({os.fspath(model)!r}).session(...)")
        if config is not None and settings:
            raise TypeError("give a SessionConfig or keyword settings, not both")
        self.config = config = SessionConfig.of(**settings) if config is None else config
        model.check_open()
        check_n_ctx(model, config.n_ctx, config.type_k, config.type_v)
        self.model = model
        self.policy, self.n_ctx, self.batch_size = config.policy, config.n_ctx, config.batch_size
        self.type_k, self.type_v = config.type_k, config.type_v
        self.kept_forward = kept_forward_mode(config.shift_mode, shared=context is not None,
                                              sliding_window=model.n_swa > 0)
        if context is not None:
            context.check_config(config)
        slot = OwnContext(model, context_params(model, config), self.n_ctx) if context is None else context.open_slot()
        self._stream = StreamCache(self.model, slot, capacity=self.n_ctx,
                                   kept_forward=self.kept_forward, rebase_every=config.rebase_every,
                                   refresh_every=config.refresh_every)
        self.model.attach(self._stream, self._lock)  # closing the model closes this cache first
        self._check_shift_support()
        self._n_keep_target = self.policy.sinks
        self._utf8_in = Utf8Stream()
        self._last_logits: np.ndarray | None = None
        self._tokens_seen = 0
        self._feed_rate = Rate()
        self._gen_rate = Rate()
        self._chat = None
        self._stop_check: Callable[[], bool] | None = None

    # -- construction helpers ------------------------------------------------------------------

    def _check_shift_support(self) -> None:
        if self.policy.shifts and not C.llama_memory_can_shift(self.cache.mem):
            arch = self.model.architecture
            self.close()
            raise UnsupportedModelError(
                f"policy {self.policy.name!r} moves cached tokens, but {arch} models cannot shift their "
                "memory (recurrent, MLA or M-RoPE); use policy 'dense' or 'recompute'"
            )

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def cache(self) -> StreamCache:
        """The stream's KV cache (its llama.cpp context and bookkeeping), for tools that measure or
        save it; ClosedError once this session or its model is closed. Changing it by hand desyncs
        the session: feed, generate and load are the ways in."""
        return self._check_open()

    def _check_open(self) -> StreamCache:
        cache = self._stream
        if cache is None:
            raise ClosedError("this session is closed")
        if not cache.ctx:
            raise ClosedError("this session is closed (its model was closed)")
        return cache

    def close(self) -> None:
        """Free the cache (the model stays loaded). Idempotent."""
        with getattr(self, "_lock", None) or nullcontext():  # waits for a step another thread is running
            cache = getattr(self, "_stream", None)
            if cache is not None:
                self.model.detach(cache)
                cache.close()
                self._stream = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    @exclusive
    def reset(self) -> None:
        """Forget the whole stream, its counters and rates; settings stay (and a chat's system prompt)."""
        self.cache.clear()
        self._utf8_in = Utf8Stream()
        self._last_logits = None
        self._tokens_seen = 0
        self._feed_rate = Rate()
        self._gen_rate = Rate()
        self._n_keep_target = self.policy.sinks
        if self._chat is not None:
            chat = self._chat
            self._chat = None
            self.start_chat(chat.system, keep_system=chat.keep_system, template=chat.template_source)

    @exclusive
    def pin_prefix(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` of the stream for ever, like sinks (at least the policy's sinks).

        ``recompute`` then re-encodes them before the window each time.
        """
        if self.cache.counters.evicted:
            raise ValueError("pin_prefix must be called before anything was evicted from the stream")
        if not self.policy.evicts:
            return
        target = max(self.policy.sinks, n_tokens)
        if target + self.batch_size > self.n_ctx:
            raise ValueError(f"a pinned prefix of {n_tokens} tokens leaves no room in n_ctx {self.n_ctx}")
        self._n_keep_target = target
        self.cache.adopt_kept(target)

    @property
    def tokens_seen(self) -> int:
        """Tokens that entered the stream so far, fed or generated (also in :attr:`stats`)."""
        return self._tokens_seen

    def first_removable(self) -> int:
        """The oldest stream index :meth:`drop_newest` may cut back to.

        Until something is evicted the cache holds the whole stream; after that, the window only
        (the kept tokens then stand before a gap and cannot be replaced).
        """
        if self.cache.counters.evicted == 0:
            return 0
        return self._tokens_seen - self.cache.n_window

    @exclusive
    def drop_newest(self, n: int) -> None:
        """Take the ``n`` newest tokens out of the stream (a chat template rewrote them).

        They must all be at or after :meth:`first_removable`.
        """
        self.cache.drop_newest(n)
        self._tokens_seen -= n
        self._last_logits = None

    # -- feeding -------------------------------------------------------------------------------

    def _run(self) -> AbstractContextManager:
        """Around a series of decodes (a feed, a generation): a shared context's rounds wait for this
        stream's next decode instead of leaving it a round behind (see :class:`SharedContext`)."""
        return self._check_open().slot.running()

    @contextmanager
    def cancel_when(self, stopped: Callable[[], bool]) -> Iterator[None]:
        """Within this block, feeding checks ``stopped()`` before each batch and raises
        :class:`Cancelled` once it is true, so a long prompt can be abandoned within one batch
        (a server's client went away). The stream keeps the batches fed before that, each whole."""
        previous, self._stop_check = self._stop_check, stopped
        try:
            yield
        finally:
            self._stop_check = previous

    def _check_cancelled(self) -> None:
        if self._stop_check is not None and self._stop_check():
            raise Cancelled("feeding was cancelled (the caller's stop check fired); "
                            f"the stream holds the {self._tokens_seen} tokens fed before it")

    @exclusive
    def feed(self, text: "str | bytes") -> int:
        """Push text into the stream; returns the number of tokens consumed.

        Any length, any number of calls. Bytes that end mid-character are kept until the next
        call. Text is tokenized in pieces split at whitespace, so memory stays bounded; special
        token strings (``<|im_start|>``...) stay literal text.
        """
        n = 0
        with self._run():
            for piece in self._text_pieces(text):
                n += self.feed_tokens(self.model.tokenize(piece))
        return n

    @exclusive
    def feed_tokens(self, tokens: Iterable[int]) -> int:
        """Push token ids into the stream; returns how many (with a BOS the model wants at the start)."""
        self._check_open()
        tokens = self._checked_tokens(tokens)
        tokens = self._bos_prefix(tokens) + tokens
        start = time.perf_counter()
        with self._run():
            self._ingest(tokens, want=None)
        self._feed_rate.add(len(tokens), start)
        return len(tokens)

    @exclusive
    def score(self, text: str) -> np.ndarray:
        """Per-token negative log-likelihood (natural log) of ``text``, fed exactly as :meth:`feed` would.

        Element i is the NLL of the text's i-th token given everything before it in the stream;
        NaN for a first token that has nothing before it.
        """
        self._check_open()
        tokens: list[int] = []
        for piece in self._text_pieces(text):
            tokens += self.model.tokenize(piece)
        return self.score_tokens(tokens)

    @exclusive
    def score_tokens(self, tokens: Iterable[int], positions: Iterable[int] | None = None) -> np.ndarray:
        """NLL of each token as it is fed; only at ``positions`` (indices) if given, NaN elsewhere.

        Scoring a subset costs the same for the shifting policies, but for ``recompute`` only
        the scored positions are re-computed (the benchmark scores it on a uniform sample).
        """
        self._check_open()
        tokens = self._checked_tokens(tokens)
        scored = np.ones(len(tokens), dtype=bool) if positions is None else position_mask(positions, len(tokens))
        nll = np.full(len(tokens), np.nan)
        start = time.perf_counter()
        bos = self._bos_prefix(tokens)
        with self._run():
            if bos:  # fed first and not scored: the text's first token is then predicted from it
                self._ingest(bos, want=None)
            self._ingest(tokens, want=scored, nll=nll)
        self._feed_rate.add(len(tokens), start)
        return nll

    def _bos_prefix(self, tokens: list[int]) -> list[int]:
        """``[BOS]`` when these tokens begin the stream and the model wants a BOS first (and they lack it)."""
        bos = self.model.bos_token
        if self._tokens_seen == 0 and tokens and self.model.add_bos and bos >= 0 and tokens[0] != bos:
            return [bos]
        return []

    def _text_pieces(self, text: "str | bytes") -> Iterator[str]:
        return text_pieces(text, self._utf8_in)

    def _checked_tokens(self, tokens: Iterable[int]) -> list[int]:
        try:
            tokens = [operator.index(t) for t in tokens]
        except TypeError:
            raise ValueError("token ids must be integers") from None
        bad = next((t for t in tokens if not 0 <= t < self.model.n_vocab), None)
        if bad is not None:
            self.model.check_token(bad)
        return tokens

    # -- the one path every token takes ---------------------------------------------------------

    def _ingest(self, tokens: list[int], want: np.ndarray | None, nll: np.ndarray | None = None) -> None:
        """Evict as the policy says, then decode. ``want[i]``: the NLL of token i is wanted."""
        if self.policy.recomputes:
            self._ingest_recomputing(tokens, want, nll)
            return
        cache = self.cache
        if not self.policy.evicts:
            # A policy that never evicts refuses the whole input up front, so nothing is half-consumed.
            self.policy.evictions(self.n_ctx, cache.n_kept, cache.n_window, len(tokens))
        for start in range(0, len(tokens), self.batch_size):
            batch = tokens[start:start + self.batch_size]
            self._check_cancelled()
            if want is not None:
                # Before evicting: a rebase or refresh during eviction overwrites the context's logits.
                self._score_first(batch[0], want[start], nll, start)
            # One batch is one step for Ctrl-C: an eviction's shift must not stay pending without its decode.
            with deferred_interrupt():
                n_evict = self.policy.evictions(self.n_ctx, cache.n_kept, cache.n_window, len(batch))
                n_evict = self._aligned_eviction(n_evict, needed=cache.n_cached + len(batch) - self.n_ctx)
                cache.evict(n_evict)
                # Row j's logits predict token j+1; the last row is kept for what comes next.
                logits_for = np.zeros(len(batch), dtype=np.int8)
                logits_for[-1] = 1
                if want is not None:
                    logits_for[:-1] = want[start + 1:start + len(batch)]
                cache.append(batch, logits_for, self._n_keep_target)
                self._tokens_seen += len(batch)
                if want is not None:
                    rows = cache.logits_rows(int(logits_for.sum()))
                    self._score_rows(batch, logits_for, rows, nll, start)
                    self._last_logits = rows[-1]
                else:
                    self._last_logits = None

    def _ingest_recomputing(self, tokens, want, nll) -> None:
        cache = self.cache
        for i, token in enumerate(tokens):
            self._check_cancelled()
            if want is not None:
                self._score_first(token, want[i], nll, i)
            with deferred_interrupt():
                n_evict = self.policy.evictions(self.n_ctx, cache.n_kept, cache.n_window, 1)
                n_evict = self._aligned_eviction(n_evict, needed=n_evict)
                cache.drop_oldest(n_evict)
                cache.push_uncomputed(token, self._n_keep_target)  # computed lazily, only where logits are needed
                self._tokens_seen += 1
                self._last_logits = None

    def _score_first(self, token: int, wanted: bool, nll: np.ndarray, index: int) -> None:
        """The NLL of a token predicted by logits from before its batch."""
        if not wanted:
            return
        logits = self._current_logits()
        if logits is not None:
            nll[index] = token_nll(logits[None, :], np.array([token]))[0]

    def _score_rows(self, batch, logits_for, rows, nll, offset) -> None:
        predicted = np.flatnonzero(logits_for[:-1])  # row k predicts token predicted[k] + 1
        if len(predicted):
            targets = np.asarray(batch)[predicted + 1]
            nll[offset + predicted + 1] = token_nll(rows[: len(predicted)], targets)

    def _current_logits(self) -> np.ndarray | None:
        """Logits predicting the next token, computing them if needed; None for an empty stream."""
        if self._last_logits is not None:
            return self._last_logits
        if self.cache.n_cached == 0:
            return None
        self._ensure_context_logits()
        self._last_logits = self.cache.last_logits()
        return self._last_logits

    def _ensure_context_logits(self) -> None:
        """Make the context hold logits for the newest token (recompute's lazy feed, a restore)."""
        cache = self.cache
        if cache.has_logits:
            return
        if self.policy.recomputes:
            cache.rebuild()
        else:
            cache.redecode_newest()

    # -- generation ------------------------------------------------------------------------------

    def stream_generate(self, max_tokens: int | None = 200, *, stop: Iterable[str] = (),
                        **sampling) -> Iterator[GenerationChunk]:
        """Generate after the stream so far, one :class:`GenerationChunk` per token.

        ``max_tokens=None`` generates without end (the cache evicts as it goes). Sampling
        settings are those of :class:`SamplingParams` (temperature, top_k, top_p, min_p,
        repeat_penalty, seed, grammar). Ends at an end-of-generation token, a stop string or max_tokens.
        Each token is one step under the session's lock (see :class:`Session` on threads).
        """
        if max_tokens is not None and (not_int(max_tokens) or max_tokens < 1):
            raise SettingsError(f"max_tokens must be an integer >= 1 (or None for endless), got {max_tokens!r}")
        params = SamplingParams.of(**sampling)
        if self.cache.n_cached == 0:
            raise ValueError("nothing to continue: feed a prompt first")
        utf8, stops = Utf8Stream(), StopMatcher(stop_strings(stop))
        n = 0
        with Sampler(params, self.model) as sampler, self._run():
            while max_tokens is None or n < max_tokens:
                token, piece = self._generate_one(sampler)
                n += 1
                if piece is None:
                    yield GenerationChunk(stops.flush() + utf8.flush(), None, "stop", end_token=token)
                    return
                text, stopped = stops.push(utf8.push(piece))
                if stopped:
                    yield GenerationChunk(text, token, "stop_string")
                    return
                yield GenerationChunk(text, token)
        yield GenerationChunk(stops.push(utf8.flush())[0] + stops.flush(), None, "length")

    @exclusive
    def _generate_one(self, sampler: Sampler) -> tuple[int, bytes | None]:
        """Sample a token and feed it: (token, its bytes), or (token, None) for an end-of-generation token."""
        start = time.perf_counter()
        self._ensure_context_logits()
        token = sampler.sample_logits(self._current_logits())
        self._ingest([token], want=None)
        self._gen_rate.add(1, start)
        if self.model.is_end_of_generation(token):
            return token, None
        return token, self.model.token_bytes(token)

    def generate(self, max_tokens: int | None = 200, *, stop: Iterable[str] = (), **sampling) -> Iterator[str]:
        """Text pieces as they are generated (see :meth:`stream_generate`)."""
        for chunk in self.stream_generate(max_tokens, stop=stop, **sampling):
            if chunk.text:
                yield chunk.text

    def generate_text(self, max_tokens: int | None = 200, *, stop: Iterable[str] = (), **sampling) -> str:
        """The whole generated text at once."""
        return "".join(self.generate(max_tokens, stop=stop, **sampling))

    # -- introspection ---------------------------------------------------------------------------

    @property
    @exclusive
    def stats(self) -> SessionStats:
        cache = self.cache
        c = cache.counters
        first, last = cache.llama_pos_range()
        return SessionStats(
            tokens_seen=self._tokens_seen, tokens_in_cache=cache.n_cached, tokens_kept=cache.n_kept,
            evictions=c.evicted, shifts=c.shifts, rebases=c.rebases, refreshes=c.refreshes,
            first_position=first, last_position=last,
            decode_seconds=c.decode_seconds, tokens_decoded=c.tokens_decoded,
            feed_tokens_per_s=self._feed_rate.per_second, generate_tokens_per_s=self._gen_rate.per_second,
            extra={"policy": self.policy.name, "n_ctx": self.n_ctx, "kept_forward": cache.kept_forward,
                   "rebuilds": c.rebuilds},
        )

    @exclusive
    def next_logits(self) -> np.ndarray:
        """A copy of the logits predicting the next token (computing them if the cache lacks them)."""
        self._check_open()
        logits = self._current_logits()
        if logits is None:
            raise ValueError("the stream is empty: feed something first")
        return logits.copy()

    @exclusive
    def cached_tokens(self) -> list[int]:
        """The tokens in the cache, in stream order (kept first, then the window)."""
        return self.cache.tokens()
