"""A streaming session: an unbounded token stream through a bounded KV cache.

``feed`` pushes text in, ``generate`` draws text out, ``score`` measures how well the model
predicts text, and all three go through the same context policy, so what ``score`` reports is
exactly what ``feed`` computes.
"""

from __future__ import annotations

import operator
import os
import threading
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import wraps
from typing import Iterable, Iterator

import numpy as np

from ._native import C
from .errors import ClosedError, UnsupportedModelError
from .kvcache import CacheCounters, StreamCache, deferred_interrupt
from .model import Model, load
from .options import (cache_type, check_n_ctx, check_session_options, default_threads, kept_forward_mode, not_int,
                      sampling_params, stop_strings)
from .policies import ContextPolicy, make_policy
from .sampling import Sampler
from .textstream import StopMatcher, Utf8Stream, text_pieces


def _exclusive(method):
    """Run ``method`` holding the session's lock: one thread at a time works on its llama.cpp context."""
    @wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return locked


@dataclass(frozen=True)
class GenerationChunk:
    """One step of :meth:`Session.stream_generate`."""

    text: str  # whole characters only; may be empty while a character or stop string is pending
    token: int | None  # the sampled token (None on the final chunk)
    finish_reason: str | None = None  # "stop" (end token), "stop_string", "length" on the last chunk


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


class Session:
    """A stream of tokens through a bounded cache with a context policy.

    Args:
        model: a :class:`Model`, a ``.gguf`` path or a registry name (then the session owns it).
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
        shift_mode: ``"auto"`` (kept-forward with a patched libllama, else window-back),
            ``"kept-forward"`` or ``"window-back"``; see :mod:`edgesink.kvcache`.
        refresh_every: re-encode the kept tokens after this many shifts (kept-forward mode).
        rebase_every: move positions back after this many evicted tokens (default n_ctx).

    Threads may share a session: a lock lets one call at a time work on its context. Each
    ``feed``, ``score``, ``reset``, ``start_chat``, ``stats``... runs whole, so two threads feeding
    get the same stream as feeding one after the other; a generator holds the lock for one token
    at a time, so text another thread feeds between two tokens enters the stream there and the
    generation continues after it.

    After :meth:`close` (or closing the model, which closes its sessions first) every method that
    needs the cache raises :class:`ClosedError`; ``n_ctx``, ``policy``, ``messages`` and the
    like stay readable.
    """

    def __init__(self, model: "Model | str | os.PathLike", *, n_ctx: int = 2048,
                 policy: "str | ContextPolicy" = "sink", sinks: int | None = None,
                 evict_chunk: int | None = None, batch_size: int | None = None,
                 type_k: str = "f16", type_v: str = "f16", flash_attn: bool | None = None,
                 n_threads: int | None = None, shift_mode: str = "auto",
                 refresh_every: int = 128, rebase_every: int | None = None):
        self._lock = threading.RLock()  # re-entrant: feed calls feed_tokens, start_chat calls reset...
        self._stream: StreamCache | None = None
        check_session_options(policy, sinks=sinks, evict_chunk=evict_chunk, batch_size=batch_size,
                              n_threads=n_threads, flash_attn=flash_attn, refresh_every=refresh_every,
                              rebase_every=rebase_every)
        self._owns_model = not isinstance(model, Model)
        self.model = load(model)
        self.model._check_open()
        try:
            self.policy = make_policy(policy, sinks=sinks, evict_chunk=evict_chunk) if isinstance(policy, str) else policy
            self.n_ctx = check_n_ctx(self.model, n_ctx, type_k, type_v)
            self.batch_size = batch_size if batch_size is not None else max(1, min(64, n_ctx // 16))
            self.policy.validate(self.n_ctx, self.batch_size)
            rebase_every = n_ctx if rebase_every is None else rebase_every
            self.kept_forward = kept_forward_mode(shift_mode)
            params = self._context_params(type_k, type_v, flash_attn, n_threads)
            self._stream = StreamCache(self.model, params, capacity=self.n_ctx, kept_forward=self.kept_forward,
                                       rebase_every=rebase_every, refresh_every=refresh_every)
            self.model._attach(self._stream, self._lock)  # closing the model closes this cache first
        except BaseException:
            if self._owns_model:
                self.model.close()
            raise
        self._check_shift_support()
        self.type_k, self.type_v = type_k, type_v
        self._n_keep_target = self.policy.sinks
        self._utf8_in = Utf8Stream()
        self._last_logits: np.ndarray | None = None
        self._tokens_seen = 0
        self._feed_time = [0, 0.0]
        self._gen_time = [0, 0.0]
        self._message_starts: deque[int] = deque()  # stream indices where chat messages begin
        self._chat = None
        self.last_end_token_text = ""

    # -- construction helpers ------------------------------------------------------------------

    def _context_params(self, type_k, type_v, flash_attn, n_threads):
        p = C.llama_context_default_params()
        p.n_ctx = self.n_ctx
        p.n_batch = p.n_ubatch = max(self.batch_size, min(512, self.n_ctx))
        p.n_seq_max = 2  # the stream, and a scratch sequence to re-encode the kept tokens
        p.kv_unified = True  # one cache of n_ctx cells shared by both sequences
        p.n_threads = p.n_threads_batch = n_threads or default_threads()
        p.type_k, p.type_v = cache_type(type_k), cache_type(type_v)
        p.flash_attn_type = {None: -1, True: 1, False: 0}[flash_attn]
        # Sliding-window (iSWA) models keep only the last n_swa tokens by default, which cannot shift.
        p.swa_full = self.model.n_swa > 0 and self.policy.shifts
        p.no_perf = True
        return p

    def _check_shift_support(self) -> None:
        if self.policy.shifts and not C.llama_memory_can_shift(self._cache.mem):
            arch = self.model.architecture
            self.close()
            raise UnsupportedModelError(
                f"policy {self.policy.name!r} moves cached tokens, but {arch} models cannot shift their "
                "memory (recurrent, MLA or M-RoPE); use policy 'dense' or 'recompute'"
            )

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def _cache(self) -> StreamCache:
        """The stream's cache; ClosedError once this session or its model is closed."""
        return self._check_open()

    def _check_open(self) -> StreamCache:
        cache = self._stream
        if cache is None:
            raise ClosedError("this session is closed")
        if not cache.ctx:
            raise ClosedError("this session is closed (its model was closed)")
        return cache

    def close(self) -> None:
        """Free the cache (and the model, if this session loaded it). Idempotent."""
        with getattr(self, "_lock", None) or nullcontext():  # waits for a step another thread is running
            cache = getattr(self, "_stream", None)
            if cache is not None:
                self.model._detach(cache)
                cache.close()
                self._stream = None
            if getattr(self, "_owns_model", False) and self.model is not None:
                self.model.close()
                self.model = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    @_exclusive
    def reset(self) -> None:
        """Forget the whole stream, its counters and rates; settings stay (and a chat's system prompt)."""
        self._cache.clear()
        self._utf8_in = Utf8Stream()
        self._last_logits = None
        self._tokens_seen = 0
        self._feed_time = [0, 0.0]
        self._gen_time = [0, 0.0]
        self._n_keep_target = self.policy.sinks
        self._message_starts.clear()
        self.last_end_token_text = ""
        if self._chat is not None:
            chat = self._chat
            self._chat = None
            self.start_chat(chat.system, keep_system=chat.keep_system, template=chat.template_source)

    # -- chat ----------------------------------------------------------------------------------

    @_exclusive
    def start_chat(self, system: str | None = None, *, keep_system: bool = True, template: str | None = None,
                   continue_stream: bool = False) -> None:
        """Begin a conversation.

        By default the stream is reset first; with ``keep_system`` the whole system prompt is then
        kept in the cache for ever, like the sinks. ``continue_stream=True`` keeps what the stream
        holds (a document fed or loaded) and starts the conversation after it; a system prompt is
        then fed once and leaves the cache like any message. ``template``: a Jinja chat template
        to use instead of the model's own.

        Raises :class:`SystemPromptTooLongError` when the system prompt takes more than half the
        cache (all of it for ``dense``); nothing is changed then.
        """
        from .chat import Chat

        self._check_open()
        continuing = continue_stream and self._cache.n_cached > 0
        chat = Chat(self, system=system, keep_system=keep_system, template=template)
        chat.check_system_fits(continuing)  # before the old conversation is touched
        if self._cache.n_cached and not continuing:
            self._chat = None
            self.reset()
        self._chat = chat
        chat.begin(pin=keep_system and not continuing)

    def chat(self, message: str, role: str = "user", **generation) -> Iterator[str]:
        """Send a message and stream the reply (text pieces).

        Outside a conversation, one starts after whatever the stream holds (see
        :meth:`start_chat` with ``continue_stream``). Generation settings as
        :meth:`stream_generate`; ``max_tokens`` defaults to 512.
        """
        self._check_open()
        if self._chat is None:
            self.start_chat(continue_stream=True)
        generation.setdefault("max_tokens", 512)
        return self._chat.send(message, role=role, **generation)

    @property
    def in_chat(self) -> bool:
        """Whether the stream is a conversation (:meth:`start_chat`, :meth:`chat`, or a loaded chat)."""
        return self._chat is not None

    @property
    def system_prompt(self) -> str | None:
        """The conversation's system prompt (None outside chat or without one)."""
        return self._chat.system if self._chat else None

    @property
    def messages(self) -> list[dict]:
        """The conversation so far (empty outside chat)."""
        return [dict(m) for m in self._chat.messages] if self._chat else []

    @_exclusive
    def pin_prefix(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` of the stream for ever, like sinks (at least the policy's sinks).

        ``recompute`` then re-encodes them before the window each time.
        """
        if self._cache.counters.evicted:
            raise ValueError("pin_prefix must be called before anything was evicted from the stream")
        if not self.policy.evicts:
            return
        target = max(self.policy.sinks, n_tokens)
        if target + self.batch_size > self.n_ctx:
            raise ValueError(f"a pinned prefix of {n_tokens} tokens leaves no room in n_ctx {self.n_ctx}")
        self._n_keep_target = target
        self._cache.adopt_kept(target)

    def mark_message_start(self) -> None:
        """Record that the next token begins a message: evictions cut the window there."""
        self._message_starts.append(self._tokens_seen)

    def _align_to_message(self, n: int, needed: int) -> int:
        """Where to cut the window so that it starts at a message: how many tokens to evict.

        ``n`` is what the policy asks, ``needed`` the least that makes room. The cut moves
        forward to the first message start at or after ``n``; failing that, back to the last one
        at or after ``needed``; failing both (the newest message alone outgrows the window) it
        stays at ``n``, inside that message.
        """
        window_start = self._tokens_seen - self._cache.n_window
        offsets = [start - window_start for start in self._message_starts]
        cut = next((o for o in offsets if n <= o <= self._cache.n_window), None)
        if cut is None:
            cut = max((o for o in offsets if needed <= o < n), default=n)
        while self._message_starts and self._message_starts[0] < window_start + cut:
            self._message_starts.popleft()  # evicted: no longer a place to cut
        return cut

    def _first_removable(self) -> int:
        """The oldest stream index :meth:`_drop_newest` may cut back to.

        Until something is evicted the cache holds the whole stream; after that, the window only
        (the kept tokens then stand before a gap and cannot be replaced).
        """
        if self._cache.counters.evicted == 0:
            return 0
        return self._tokens_seen - self._cache.n_window

    @_exclusive
    def _drop_newest(self, n: int) -> None:
        """Take the ``n`` newest tokens out of the stream (a chat template rewrote them).

        They must all be at or after :meth:`_first_removable`.
        """
        self._cache.drop_newest(n)
        self._tokens_seen -= n
        while self._message_starts and self._message_starts[-1] > self._tokens_seen:
            self._message_starts.pop()
        self._last_logits = None

    # -- feeding -------------------------------------------------------------------------------

    @_exclusive
    def feed(self, text: "str | bytes") -> int:
        """Push text into the stream; returns the number of tokens consumed.

        Any length, any number of calls. Bytes that end mid-character are kept until the next
        call. Text is tokenized in pieces split at whitespace, so memory stays bounded; special
        token strings (``<|im_start|>``...) stay literal text.
        """
        self._check_open()
        n = 0
        for piece in self._text_pieces(text):
            n += self.feed_tokens(self.model.tokenize(piece))
        return n

    @_exclusive
    def feed_tokens(self, tokens: Iterable[int]) -> int:
        """Push token ids into the stream; returns how many (with a BOS the model wants at the start)."""
        self._check_open()
        tokens = self._checked_tokens(tokens)
        tokens = self._bos_prefix(tokens) + tokens
        start = time.perf_counter()
        self._ingest(tokens, want=None)
        self._count(self._feed_time, len(tokens), start)
        return len(tokens)

    @_exclusive
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

    @_exclusive
    def score_tokens(self, tokens: Iterable[int], positions: Iterable[int] | None = None) -> np.ndarray:
        """NLL of each token as it is fed; only at ``positions`` (indices) if given, NaN elsewhere.

        Scoring a subset costs the same for the shifting policies, but for ``recompute`` only
        the scored positions are re-computed (the benchmark scores it on a uniform sample).
        """
        self._check_open()
        tokens = self._checked_tokens(tokens)
        scored = np.ones(len(tokens), dtype=bool) if positions is None else _mask(positions, len(tokens))
        nll = np.full(len(tokens), np.nan)
        start = time.perf_counter()
        bos = self._bos_prefix(tokens)
        if bos:  # fed first and not scored: the text's first token is then predicted from it
            self._ingest(bos, want=None)
        self._ingest(tokens, want=scored, nll=nll)
        self._count(self._feed_time, len(tokens), start)
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
        cache = self._cache
        if not self.policy.evicts:
            # A policy that never evicts refuses the whole input up front, so nothing is half-consumed.
            self.policy.evictions(self.n_ctx, cache.n_kept, cache.n_window, len(tokens))
        for start in range(0, len(tokens), self.batch_size):
            batch = tokens[start:start + self.batch_size]
            if want is not None:
                # Before evicting: a rebase or refresh during eviction overwrites the context's logits.
                self._score_first(batch[0], want[start], nll, start)
            # One batch is one step for Ctrl-C: an eviction's shift must not stay pending without its decode.
            with deferred_interrupt():
                n_evict = self.policy.evictions(self.n_ctx, cache.n_kept, cache.n_window, len(batch))
                if n_evict and self._message_starts:
                    n_evict = self._align_to_message(n_evict, needed=cache.n_cached + len(batch) - self.n_ctx)
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
        cache = self._cache
        for i, token in enumerate(tokens):
            if want is not None:
                self._score_first(token, want[i], nll, i)
            with deferred_interrupt():
                n_evict = self.policy.evictions(self.n_ctx, cache.n_kept, cache.n_window, 1)
                if n_evict and self._message_starts:
                    n_evict = self._align_to_message(n_evict, needed=n_evict)
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
            nll[index] = _nll(logits[None, :], np.array([token]))[0]

    def _score_rows(self, batch, logits_for, rows, nll, offset) -> None:
        predicted = np.flatnonzero(logits_for[:-1])  # row k predicts token predicted[k] + 1
        if len(predicted):
            targets = np.asarray(batch)[predicted + 1]
            nll[offset + predicted + 1] = _nll(rows[: len(predicted)], targets)

    def _current_logits(self) -> np.ndarray | None:
        """Logits predicting the next token, computing them if needed; None for an empty stream."""
        if self._last_logits is not None:
            return self._last_logits
        if self._cache.n_cached == 0:
            return None
        self._ensure_context_logits()
        self._last_logits = self._cache.last_logits()
        return self._last_logits

    def _ensure_context_logits(self) -> None:
        """Make the context hold logits for the newest token (recompute's lazy feed, a restore)."""
        cache = self._cache
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
        repeat_penalty, seed). Ends at an end-of-generation token, a stop string or max_tokens.
        Each token is one step under the session's lock (see :class:`Session` on threads).
        """
        if max_tokens is not None and (not_int(max_tokens) or max_tokens < 1):
            raise ValueError(f"max_tokens must be an integer >= 1 (or None for endless), got {max_tokens!r}")
        params = sampling_params(sampling)
        if self._cache.n_cached == 0:
            raise ValueError("nothing to continue: feed a prompt first")
        utf8, stops = Utf8Stream(), StopMatcher(stop_strings(stop))
        n = 0
        with Sampler(params) as sampler:
            while max_tokens is None or n < max_tokens:
                token, piece = self._generate_one(sampler)
                n += 1
                if piece is None:
                    yield GenerationChunk(stops.flush() + utf8.flush(), None, "stop")
                    return
                text, stopped = stops.push(utf8.push(piece))
                if stopped:
                    yield GenerationChunk(text, token, "stop_string")
                    return
                yield GenerationChunk(text, token)
        yield GenerationChunk(stops.push(utf8.flush())[0] + stops.flush(), None, "length")

    @_exclusive
    def _generate_one(self, sampler: Sampler) -> tuple[int, bytes | None]:
        """Sample a token and feed it: (token, its bytes), or (token, None) for an end-of-generation token."""
        start = time.perf_counter()
        self._ensure_context_logits()
        token = sampler.sample(self._cache.ctx)
        self._ingest([token], want=None)
        self._count(self._gen_time, 1, start)
        if self.model.is_end_of_generation(token):
            self.last_end_token_text = self.model.token_text(token)
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

    # -- persistence ----------------------------------------------------------------------------

    @_exclusive
    def save(self, path: "str | os.PathLike") -> None:
        """Save the session (cache, bookkeeping, conversation) to ``path`` atomically."""
        from .persistence import save_session

        save_session(self, path)

    @_exclusive
    def load(self, path: "str | os.PathLike") -> None:
        """Replace this session's stream with one saved by :meth:`save` (same model and settings).

        Raises :class:`edgesink.SessionFileError` naming the cause; the session is then
        unchanged and usable.
        """
        from .persistence import load_session

        load_session(self, path)

    @classmethod
    def restore(cls, path: "str | os.PathLike", model: "Model | str | os.PathLike", **options) -> "Session":
        """A new session continuing the stream saved at ``path``, with the settings it was saved with.

        ``options`` override the saved ones that a session may change (``batch_size``,
        ``refresh_every``, ``rebase_every``, ``shift_mode``) and add others (``n_threads``); with
        the saved settings and as many threads, the new session continues exactly as the saved
        one did: bitwise the same logits.
        """
        from .persistence import read_session_header

        header = read_session_header(path)
        policy = header["policy"]
        settings = {"n_ctx": header["n_ctx"], "policy": policy["name"], "type_k": header["type_k"],
                    "type_v": header["type_v"], **header.get("options", {}), **options}
        if policy["name"] in ("sink", "halve"):
            settings.setdefault("sinks", policy["sinks"])
        if policy["name"] in ("sink", "window") and policy.get("evict_chunk"):
            settings.setdefault("evict_chunk", policy["evict_chunk"])
        session = cls(model, **settings)
        try:
            session.load(path)
        except BaseException:
            session.close()
            raise
        return session

    def _saved_state(self) -> dict:
        cache, chat = self._cache, self._chat
        return {
            "kept": cache.kept, "window": list(cache.window), "w0": cache.w0,
            "tokens_seen": self._tokens_seen, "n_keep_target": self._n_keep_target,
            "pending_utf8": self._utf8_in.pending.hex(), "message_starts": list(self._message_starts),
            "last_end_token_text": self.last_end_token_text,
            "counters": vars(cache.counters).copy(), "shifts_since_refresh": cache.shifts_since_refresh,
            "chat": None if chat is None else chat.saved_state(),
        }

    def _validate_saved_state(self, state: dict) -> None:
        """Raise SessionFileError unless every field :meth:`_apply_saved_state` reads is sound."""
        from .chat import saved_chat_problem
        from .errors import SessionFileError

        try:
            problem = self._saved_stream_problem(state) or saved_chat_problem(state["chat"], state["tokens_seen"])
        except (KeyError, TypeError, ValueError, AttributeError):
            problem = "a field is missing or of the wrong type"
        if problem:
            raise SessionFileError(f"the session file's bookkeeping is inconsistent ({problem}); refusing it")

    def _saved_stream_problem(self, state: dict) -> str | None:
        """What is wrong with the stream's saved fields, or None."""
        kept, window, seen = state["kept"], state["window"], state["tokens_seen"]
        if not (isinstance(kept, list) and isinstance(window, list)):
            return "kept and window must be lists"
        tokens = kept + window
        if len(tokens) > self.n_ctx or not all(_is_int(t) and 0 <= t < self.model.n_vocab for t in tokens):
            return "cached tokens"
        if not (_is_int(state["w0"]) and state["w0"] >= len(kept)):
            return "w0"
        if not (_is_int(state["n_keep_target"]) and 0 <= state["n_keep_target"] < self.n_ctx):
            return "n_keep_target"
        if not (_is_int(seen) and seen >= len(tokens)):
            return "tokens_seen"
        if not isinstance(state["pending_utf8"], str) or len(bytes.fromhex(state["pending_utf8"])) > 3:
            return "pending_utf8"
        starts = state["message_starts"]
        if not (isinstance(starts, list) and all(_is_int(i) and 0 <= i <= seen for i in starts)
                and starts == sorted(starts)):
            return "message_starts"
        if not isinstance(state["last_end_token_text"], str):
            return "last_end_token_text"
        counters, fields = state["counters"], vars(CacheCounters())
        if not (isinstance(counters, dict) and set(counters) <= set(fields)
                and all(_is_int(v) or (k == "decode_seconds" and isinstance(v, float))
                        for k, v in counters.items())
                and all(v >= 0 for v in counters.values())):
            return "counters"
        since_refresh = state.get("shifts_since_refresh", 0)  # absent in files of older versions
        if not (_is_int(since_refresh) and since_refresh >= 0):
            return "shifts_since_refresh"
        return None

    def _apply_saved_state(self, state: dict) -> None:
        from .chat import Chat

        cache = self._cache
        cache.kept = list(state["kept"])
        cache.window = deque(state["window"])
        cache.w0 = state["w0"]
        cache.has_logits = False
        cache.counters = CacheCounters(**state["counters"])
        cache.shifts_since_refresh = state.get("shifts_since_refresh", 0)
        self._tokens_seen = state["tokens_seen"]
        self._n_keep_target = state["n_keep_target"]
        self._utf8_in = Utf8Stream(bytes.fromhex(state["pending_utf8"]))
        self._message_starts = deque(state["message_starts"])
        self.last_end_token_text = state["last_end_token_text"]
        self._last_logits = None
        self._chat = None if state["chat"] is None else Chat.from_saved(self, state["chat"])

    def _forget_logits(self) -> None:
        """Drop the newest token's logits, as a restore does: the next step decodes that token again, alone."""
        self._cache.has_logits = False
        self._last_logits = None

    # -- introspection ---------------------------------------------------------------------------

    @property
    @_exclusive
    def stats(self) -> SessionStats:
        cache = self._cache
        c = cache.counters
        first, last = cache.llama_pos_range()
        return SessionStats(
            tokens_seen=self._tokens_seen, tokens_in_cache=cache.n_cached, tokens_kept=cache.n_kept,
            evictions=c.evicted, shifts=c.shifts, rebases=c.rebases, refreshes=c.refreshes,
            first_position=first, last_position=last,
            decode_seconds=c.decode_seconds, tokens_decoded=c.tokens_decoded,
            feed_tokens_per_s=_rate(self._feed_time), generate_tokens_per_s=_rate(self._gen_time),
            extra={"policy": self.policy.name, "n_ctx": self.n_ctx, "kept_forward": cache.kept_forward,
                   "rebuilds": c.rebuilds},
        )

    @_exclusive
    def next_logits(self) -> np.ndarray:
        """A copy of the logits predicting the next token (computing them if the cache lacks them)."""
        self._check_open()
        logits = self._current_logits()
        if logits is None:
            raise ValueError("the stream is empty: feed something first")
        return logits.copy()

    @_exclusive
    def cached_tokens(self) -> list[int]:
        """The tokens in the cache, in stream order (kept first, then the window)."""
        return self._cache.tokens()

    @staticmethod
    def _count(counter: list, n: int, start: float) -> None:
        counter[0] += n
        counter[1] += time.perf_counter() - start


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64 for stability."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_z - logits[np.arange(len(targets)), targets]


def _mask(positions: Iterable[int], n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    idx = np.fromiter(positions, dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"positions must be token indices in [0, {n})")
    mask[idx] = True
    return mask


def _is_int(value) -> bool:
    return type(value) is int  # JSON's true/false are bools, which isinstance(..., int) lets through


def _rate(counter: list) -> float:
    return counter[0] / counter[1] if counter[1] > 0 else 0.0
