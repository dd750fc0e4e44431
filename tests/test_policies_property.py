"""Property tests for the context policies and the cache layout (Hypothesis).

Most need no model: the policies decide how many of the oldest window tokens leave, and the real
:class:`~edgesink.layout.CacheLayout` is driven exactly as the Session drives it (batches,
eviction, then append; kept tokens first; both shift modes, with rebases and refreshes). Where
its tokens sit is checked on a small model of llama.cpp's cells, moved only by the memory
operations the layout returns. One test drives the real llama.cpp cache of a small session and
compares its positions with the bookkeeping.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesink import ContextFullError
from edgesink._native import C
from edgesink.kvcache import STREAM_SEQ
from edgesink.layout import CacheLayout, EncodeKeptFresh, Remove, Shift, state_problem
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


# -- whole streams, on the real layout ----------------------------------------------------------------


class LlamaCells:
    """llama.cpp's cells of the stream's sequence, as far as positions go: ``[token, position]`` pairs.

    Changed only as llama.cpp changes them: a decode adds cells, and the layout's operations
    remove (seq_rm), move (seq_add) or re-encode (scratch decode + seq_cp) them. A list, not a
    dict, so a cell left behind by a missing removal shows up as a duplicate.
    """

    def __init__(self):
        self.cells: list[list[int]] = []

    def decode(self, tokens, pos0: int) -> None:
        self.cells += [[t, pos0 + i] for i, t in enumerate(tokens)]

    def apply(self, ops) -> None:
        for op in ops:
            if isinstance(op, Remove):
                self.cells = [c for c in self.cells if not _in_range(c[1], op.p0, op.p1)]
            elif isinstance(op, Shift):
                for c in self.cells:
                    if _in_range(c[1], op.p0, op.p1):
                        c[1] += op.delta
                self.cells = [c for c in self.cells if c[1] >= 0]  # llama.cpp drops cells moved below 0
            else:
                assert isinstance(op, EncodeKeptFresh)
                self.decode(op.tokens, op.pos0)

    def in_order(self) -> tuple[list[int], list[int]]:
        """The cached tokens by position, and their positions."""
        cells = sorted(self.cells, key=lambda c: c[1])
        return [t for t, _ in cells], [p for _, p in cells]


def _in_range(pos: int, p0: int, p1: int) -> bool:
    return max(p0, 0) <= pos and (p1 < 0 or pos < p1)


@dataclass
class Stream:
    """A layout driven as the Session drives it, the stream it has seen, and llama.cpp's cells."""

    policy: object
    capacity: int
    batch: int
    layout: CacheLayout
    keep_target: int = 0
    stream: list[int] = field(default_factory=list)  # every token still in the stream, in order
    cells: LlamaCells = field(default_factory=LlamaCells)
    next_token: int = 0  # tokens are unique ids, never reused
    evicted_any: bool = False
    peak: int = 0  # the longest the stream has been

    def feed(self, size: int) -> None:
        """``size`` new tokens, in batches: the policy's evictions, then the batch (Session._ingest)."""
        for start in range(0, size, self.batch):
            b = min(self.batch, size - start)
            if self.policy.recomputes:
                for _ in range(b):
                    self._push_uncomputed()
            else:
                n = self.policy.evictions(self.capacity, self.layout.n_kept, self.layout.n_window, b)
                self.cells.apply(self.layout.evict(n))
                tokens = self._new_tokens(b)
                self.cells.decode(tokens, self.layout.next_pos)
                self.layout.append(tokens, self.keep_target)
                self.evicted_any |= n > 0
                check_bookkeeping(self, evicted_now=n)
        if self.policy.recomputes and self.layout.n_cached:
            self.rebuild()  # as the Session does when it needs the newest logits

    def _push_uncomputed(self) -> None:
        """One token of the recompute policy (Session._ingest_recomputing): no llama.cpp change."""
        n = self.policy.evictions(self.capacity, self.layout.n_kept, self.layout.n_window, 1)
        self.layout.drop_oldest(n)
        self.layout.record(self._new_tokens(1)[0], self.keep_target)
        self.evicted_any |= n > 0
        check_bookkeeping(self, evicted_now=n)

    def rebuild(self) -> None:
        """Everything encoded again from position 0 (StreamCache.rebuild)."""
        self.cells = LlamaCells()
        self.cells.decode(self.layout.tokens(), 0)
        self.layout.restart_positions()

    def _new_tokens(self, n: int) -> list[int]:
        tokens = list(range(self.next_token, self.next_token + n))
        self.next_token += n
        self.stream += tokens
        self.peak = max(self.peak, len(self.stream))
        return tokens

    def drop_newest(self, n: int) -> None:
        """Session.drop_newest, within first_removable: the whole cache until an eviction, then the window."""
        n = min(n, self.layout.n_window if self.evicted_any else self.layout.n_cached)
        self.cells.apply(self.layout.drop_newest(n))
        del self.stream[len(self.stream) - n:]

    def pin(self, n_tokens: int) -> None:
        """Session.pin_prefix, where it is allowed: before any eviction, leaving room for a batch
        (and only ever a longer prefix, so the kept tokens are always the first ``keep_target``)."""
        target = max(self.policy.sinks, n_tokens)
        if (self.evicted_any or not self.policy.evicts or target + self.batch > self.capacity
                or target <= self.keep_target):
            return
        self.keep_target = target
        self.layout.adopt_kept(target)

    def run(self, op: tuple[str, int]) -> None:
        """Carry out one generated operation, then check the invariants."""
        kind, n = op
        {"feed": self.feed, "drop": self.drop_newest, "pin": self.pin}[kind](n)
        check_bookkeeping(self)
        if not self.policy.recomputes or kind == "feed":
            check_positions(self)


def check_bookkeeping(s: Stream, evicted_now: int = 0) -> None:
    """Kept are the stream's first tokens, the window its most recent, and the cache never overflows."""
    layout = s.layout
    assert layout.n_cached <= s.capacity  # never more than n_ctx cells
    assert layout.kept == s.stream[:min(s.keep_target, len(s.stream))]  # the sinks are the first tokens
    assert list(layout.window) == s.stream[len(s.stream) - layout.n_window:]  # the most recent ones
    if s.peak <= s.capacity:
        assert layout.n_cached == len(s.stream)  # nothing evicted before the cache is full
        assert layout.counters.evicted == 0
    if evicted_now and isinstance(s.policy, (Sink, Recompute)):
        # Sink, window and recompute evict no more than makes room (in whole chunks): the window
        # stays as full as the batch allows.
        chunk = getattr(s.policy, "evict_chunk", 1)
        assert layout.n_cached >= s.capacity - chunk + 1


def check_positions(s: Stream) -> None:
    """llama.cpp's cells hold exactly the cached tokens, at consecutive positions in stream order, small."""
    layout = s.layout
    tokens, positions = s.cells.in_order()
    assert tokens == layout.tokens()
    if not tokens:
        return
    first = layout.w0 - layout.n_kept  # where the bookkeeping says the kept tokens start
    assert positions == list(range(first, first + layout.n_cached))
    assert first >= 0
    assert positions[-1] < (layout.rebase_every if layout.kept_forward else 0) + s.capacity + s.batch


def stream_ops():
    """Feeds, with now and then a template's rewrite (drop_newest) or a pinned prefix (adopt_kept)."""
    return st.lists(st.one_of(st.tuples(st.just("feed"), st.integers(1, 200)),
                              st.tuples(st.just("drop"), st.integers(0, 40)),
                              st.tuples(st.just("pin"), st.integers(0, 40))), max_size=14)


def new_stream(config, kept_forward: bool, rebase_every: int, refresh_every: int) -> Stream:
    policy, capacity, batch = config
    layout = CacheLayout(kept_forward=kept_forward, rebase_every=rebase_every, refresh_every=refresh_every)
    return Stream(policy, capacity, batch, layout, keep_target=policy.sinks)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(policies=("sink", "window", "halve", "recompute")), stream_ops(), st.booleans(),
       st.integers(1, 300), st.integers(1, 8))
def test_any_stream_keeps_sinks_and_the_most_recent_tokens(config, ops, kept_forward, rebase_every, refresh_every):
    s = new_stream(config, kept_forward, rebase_every, refresh_every)
    for op in ops:
        s.run(op)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(policies=("sink", "window", "halve")), stream_ops(), stream_ops(), st.booleans(),
       st.integers(1, 300), st.integers(1, 8))
def test_a_restored_state_carries_on_as_the_original(config, before, after, kept_forward, rebase_every,
                                                     refresh_every):
    s = new_stream(config, kept_forward, rebase_every, refresh_every)
    for op in before:
        s.run(op)
    state = json.loads(json.dumps(s.layout.state()))  # as a session file stores it
    assert state_problem(state, n_ctx=s.capacity, n_vocab=s.next_token + 1) is None
    restored = CacheLayout.from_state(state, kept_forward=kept_forward, rebase_every=rebase_every,
                                      refresh_every=refresh_every)
    assert restored.state() == s.layout.state()
    cells = LlamaCells()
    cells.cells = [list(c) for c in s.cells.cells]
    twin = replace(s, layout=restored, stream=list(s.stream), cells=cells)
    for op in after:  # the same decisions, the same memory operations, from then on
        s.run(op)
        twin.run(op)
        assert twin.layout.state() == s.layout.state()
        assert twin.cells.cells == s.cells.cells


@given(st.integers(2, 64), st.lists(st.integers(1, 50), max_size=8))
def test_dense_fills_and_then_refuses(capacity, feeds):
    policy, layout, seen = Dense(), CacheLayout(kept_forward=False, rebase_every=10**9, refresh_every=1), 0
    for size in feeds:
        if seen + size > capacity:
            with pytest.raises(ContextFullError):
                policy.evictions(capacity, 0, layout.n_window, size)
            return
        policy.evictions(capacity, 0, layout.n_window, size)
        layout.append(range(seen, seen + size), 0)
        seen += size
    assert layout.n_window == seen <= capacity


# -- the real cache -------------------------------------------------------------------------------------

def _cell_count(session) -> int:
    """Cells of the stream's sequence, from the head of llama.cpp's own sequence state."""
    return struct.unpack_from("<IiII", _sequence_state(session))[3]


def check_real_cache(session) -> None:
    cache = session.cache
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
            kept = s.cached_tokens()[:s.cache.n_kept]
            if sinks_seen is not None:
                assert kept == sinks_seen  # once complete, the sinks never change
            elif len(kept) == s.policy.sinks:
                sinks_seen = kept
