"""Property tests for the context policies (Hypothesis).

Most need no model: the policies only decide how many of the oldest window tokens leave, so the
cache is simulated here exactly as the Session drives it (batches, eviction, then append; kept
tokens first; positions assigned within the cache, in both shift modes). One test drives the real
llama.cpp cache of a small session and compares its positions with the bookkeeping.
"""

from __future__ import annotations

import struct
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesink import ContextFullError
from edgesink._native import C
from edgesink.kvcache import STREAM_SEQ
from edgesink.persistence import _sequence_state
from edgesink.policies import Dense, Halve, Recompute, Sink, Window


@st.composite
def configs(draw, policies=("sink", "window", "halve", "dense", "recompute")):
    """A valid (policy, capacity, batch size)."""
    name = draw(st.sampled_from(policies))
    capacity = draw(st.integers(2, 96))
    sinks = draw(st.integers(0, capacity - 2)) if name in ("sink", "halve") else 0
    batch = draw(st.integers(1, capacity - sinks - (0 if name in ("dense", "recompute") else 1)))
    batch = max(1, batch)
    chunk = draw(st.integers(1, capacity - sinks)) if name in ("sink", "window") else 1
    policy = {"sink": lambda: Sink(sinks=sinks, evict_chunk=chunk), "window": lambda: Window(evict_chunk=chunk),
              "halve": lambda: Halve(sinks=sinks), "dense": Dense, "recompute": Recompute}[name]()
    policy.validate(capacity, batch)
    return policy, capacity, batch


# -- one decision ----------------------------------------------------------------------------------------

@given(configs(), st.data())
def test_one_decision(config, data):
    policy, capacity, batch = config
    n_kept = data.draw(st.integers(0, policy.sinks))
    n_window = data.draw(st.integers(0, capacity - n_kept))
    n_incoming = data.draw(st.integers(1, batch))
    missing = max(0, n_kept + n_window + n_incoming - capacity)
    if not policy.evicts:
        if missing:
            with pytest.raises(ContextFullError):
                policy.evictions(capacity, n_kept, n_window, n_incoming)
        else:
            assert policy.evictions(capacity, n_kept, n_window, n_incoming) == 0
        return
    n = policy.evictions(capacity, n_kept, n_window, n_incoming)
    assert 0 <= n <= n_window  # only window tokens leave, never more than there are
    if missing == 0:
        assert n == 0  # nothing leaves a cache with room
    elif missing <= n_window:
        assert n >= missing  # afterwards the batch fits
    chunk = getattr(policy, "evict_chunk", 1)
    if isinstance(policy, Halve):
        assert n == min(n_window, max(missing, n_window // 2)) if missing else n == 0
    elif missing:
        assert n == n_window or (n % chunk == 0 and n - chunk < missing)  # whole chunks, no more than needed


@given(st.integers(-3, 40), st.integers(-3, 40), st.integers(-3, 40), st.integers(-3, 40))
def test_validate_accepts_exactly_the_workable_settings(capacity, sinks, chunk, batch):
    workable = (capacity >= 2 and 0 <= sinks < capacity and batch >= 1 and sinks + batch <= capacity
                and 1 <= chunk <= capacity - sinks)
    try:
        Sink(sinks=sinks, evict_chunk=chunk).validate(capacity, batch)
        accepted = True
    except ValueError as e:
        assert str(e)
        accepted = False
    assert accepted == workable


# -- whole streams, simulated ---------------------------------------------------------------------------

class SimulatedCache:
    """The Session's bookkeeping and llama.cpp's positions, without llama.cpp.

    ``pos`` maps each cached stream index to its llama.cpp position, moved exactly as
    StreamCache moves cells in its two modes (kept-forward with rebases, or window-back).
    """

    def __init__(self, capacity: int, n_keep: int, kept_forward: bool, rebase_every: int):
        self.capacity, self.n_keep, self.kept_forward, self.rebase_every = capacity, n_keep, kept_forward, rebase_every
        self.kept: list[int] = []
        self.window: deque[int] = deque()
        self.pos: dict[int, int] = {}
        self.w0 = 0
        self.seen = 0

    def evict(self, n: int) -> None:
        for _ in range(n):
            del self.pos[self.window.popleft()]
        if self.kept_forward:
            for t in self.kept:
                self.pos[t] += n
            self.w0 += n
            if self.w0 - len(self.kept) >= self.rebase_every:  # rebase: everything moves back
                delta = self.w0 - len(self.kept)
                for t in self.pos:
                    self.pos[t] -= delta
                self.w0 = len(self.kept)
        else:
            for t in self.window:
                self.pos[t] -= n

    def append(self, n: int) -> None:
        for _ in range(n):
            t = self.seen
            self.pos[t] = self.w0 + len(self.window)
            if len(self.kept) < self.n_keep and not self.window:
                self.kept.append(t)
                self.w0 += 1
            else:
                self.window.append(t)
            self.seen += 1


def run_stream(policy, capacity, batch, feeds, kept_forward, rebase_every):
    cache = SimulatedCache(capacity, policy.sinks, kept_forward, rebase_every)
    for size in feeds:
        for start in range(0, size, batch):
            b = min(batch, size - start)
            n = policy.evictions(capacity, len(cache.kept), len(cache.window), b)
            cache.evict(n)
            cache.append(b)
            yield cache


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(configs(policies=("sink", "window", "halve", "recompute")), st.lists(st.integers(1, 200), max_size=12),
       st.booleans(), st.integers(1, 300))
def test_any_stream_keeps_sinks_and_the_most_recent_tokens(config, feeds, kept_forward, rebase_every):
    policy, capacity, batch = config
    for cache in run_stream(policy, capacity, batch, feeds, kept_forward, rebase_every):
        seen = cache.seen
        n_cached = len(cache.kept) + len(cache.window)
        assert n_cached <= capacity  # never more than n_ctx cells
        assert cache.kept == list(range(min(policy.sinks, seen)))  # the sinks are the first tokens
        assert list(cache.window) == list(range(seen - len(cache.window), seen))  # the most recent ones
        if seen <= capacity:
            assert n_cached == seen  # nothing evicted before the cache is full
        # Positions consecutive, in stream order: kept just before the oldest window token.
        positions = [cache.pos[t] for t in cache.kept + list(cache.window)]
        assert positions == list(range(positions[0], positions[0] + n_cached))
        assert positions[0] >= 0 and positions[-1] < rebase_every + capacity + batch  # and small
    if feeds and isinstance(policy, (Sink, Recompute)):
        # Sink, window and recompute keep the window as full as the batch allows.
        if cache.seen >= capacity:
            chunk = getattr(policy, "evict_chunk", 1)
            assert len(cache.kept) + len(cache.window) >= capacity - chunk - batch + 1


@given(st.integers(2, 64), st.lists(st.integers(1, 50), max_size=8))
def test_dense_fills_and_then_refuses(capacity, feeds):
    policy, cache = Dense(), SimulatedCache(capacity, 0, False, 10**9)
    for size in feeds:
        if cache.seen + size > capacity:
            with pytest.raises(ContextFullError):
                policy.evictions(capacity, 0, len(cache.window), size)
            return
        policy.evictions(capacity, 0, len(cache.window), size)
        cache.append(size)
    assert len(cache.window) == cache.seen <= capacity


# -- the real cache -------------------------------------------------------------------------------------

def _cell_count(session) -> int:
    """Cells of the stream's sequence, from the head of llama.cpp's own sequence state."""
    return struct.unpack_from("<IiII", _sequence_state(session))[3]


def check_real_cache(session) -> None:
    cache = session._cache
    first = cache.w0 - cache.n_kept
    last = cache.w0 + cache.n_window - 1
    assert (C.llama_memory_seq_pos_min(cache.mem, STREAM_SEQ), C.llama_memory_seq_pos_max(cache.mem, STREAM_SEQ)) == (
        (first, last) if cache.n_cached else (-1, -1))
    assert _cell_count(session) == cache.n_cached <= session.n_ctx
    assert C.llama_memory_seq_pos_max(cache.mem, 1) == -1  # the scratch sequence is empty between steps
    stats = session.stats
    assert (stats.first_position, stats.last_position, stats.tokens_in_cache) == (
        (first, last, cache.n_cached) if cache.n_cached else (-1, -1, 0))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.sampled_from([("sink", "kept-forward"), ("sink", "window-back"), ("window", "auto"), ("halve", "auto")]),
       st.integers(24, 48), st.integers(0, 4), st.integers(1, 6), st.integers(3, 40),
       st.lists(st.tuples(st.sampled_from(["feed", "generate"]), st.integers(1, 40)), min_size=1, max_size=8))
def test_real_cache_positions_agree_with_the_bookkeeping(model, prose_tokens, setting, n_ctx, sinks, batch,
                                                         rebase_every, ops):
    policy, shift_mode = setting
    options = dict(n_ctx=n_ctx, policy=policy, batch_size=batch, shift_mode=shift_mode, n_threads=1,
                   rebase_every=rebase_every, refresh_every=5)
    if policy != "window":
        options["sinks"] = sinks
    with model.session(**options) as s:
        offset, sinks_seen = 0, None
        for op, n in ops:
            if op == "feed" or s.stats.tokens_seen == 0:
                s.feed_tokens(prose_tokens[offset:offset + n])
                offset += n
            else:
                s.generate_text(min(n, 6), seed=n, top_k=5)
            check_real_cache(s)
            kept = s.cached_tokens()[:s._cache.n_kept]
            if sinks_seen is not None:
                assert kept == sinks_seen  # once complete, the sinks never change
            elif len(kept) == s.policy.sinks:
                sinks_seen = kept
