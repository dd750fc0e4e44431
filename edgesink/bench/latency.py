"""Speed: per-token generation latency at a full cache, feed throughput, and eviction overhead."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .. import _native
from ..session import Session
from .config import Variant

WARMUP_STEPS = 8


def _cycled(tokens: np.ndarray, start: int, n: int) -> list[int]:
    return [int(tokens[(start + i) % len(tokens)]) for i in range(n)]


def generation_latencies(session: Session, n_tokens: int) -> list[float]:
    """Milliseconds per generated token (greedy), continuing past an end-of-generation token."""
    found: list[float] = []
    while len(found) < n_tokens:
        last = time.perf_counter()
        for chunk in session.stream_generate(n_tokens - len(found), top_k=1, seed=0):
            now = time.perf_counter()
            if chunk.token is not None or chunk.finish_reason == "stop":  # "stop": an end token was decoded
                found.append((now - last) * 1000)
            last = now
    return found


def measure_generation(model, variant: Variant, tokens: np.ndarray, *, gen_tokens: int, feed_tokens: int,
                       threads: int | None = None, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Fill the cache, time feeding at a full cache, then time generation token by token.

    ``dense`` cannot pass its cache: it is filled to n_ctx - gen_tokens - 1 and generates up to
    the brim, and its feed rate is that of filling. ``recompute`` feeds lazily (nothing is
    computed until logits are needed), so its feed rate is one re-encoding per token.
    """
    with Session(model, **variant.session_options(), n_threads=threads) as session:
        policy = session.policy
        if not policy.evicts:
            gen_tokens = max(1, min(gen_tokens, variant.n_ctx // 2))
        fill = variant.n_ctx - gen_tokens - 1 if not policy.evicts else variant.n_ctx
        start = time.perf_counter()
        session.feed_tokens(_cycled(tokens, 0, fill))
        fill_seconds = time.perf_counter() - start
        progress(0 if policy.recomputes else fill)
        feed_tps = None
        if policy.evicts and not policy.recomputes:
            start = time.perf_counter()
            session.feed_tokens(_cycled(tokens, fill, feed_tokens))
            feed_tps = feed_tokens / (time.perf_counter() - start)
            progress(feed_tokens)
        elif not policy.evicts:
            feed_tps = fill / fill_seconds
        ms = generation_latencies(session, gen_tokens)
        progress(gen_tokens * (variant.n_ctx if policy.recomputes else 1))
        if policy.recomputes:
            feed_tps = 1000 / float(np.median(ms))
        stats = session.stats
    return {"ms": ms, "feed_tokens_per_s": feed_tps, "tokens_in_cache": stats.tokens_in_cache,
            "evictions": stats.evictions}


def dense_step(session: Session) -> None:
    """Decode one token at a full cache without evicting: the newest cell is removed and re-decoded."""
    session.cache.redecode_newest()


def measure_eviction_overhead(model, variant: Variant, tokens: np.ndarray, *, steps: int,
                              threads: int | None = None,
                              progress: Callable[[int], None] = lambda n: None) -> dict:
    """Eviction steps (evict one token, decode one) interleaved with dense steps at the same fill.

    Both see the same cache fill and machine state; the order within each pair alternates.
    Returns the milliseconds of each, and which shift path the loaded library took.
    """
    with Session(model, **variant.session_options(), n_threads=threads) as session:
        session.feed_tokens(_cycled(tokens, 0, variant.n_ctx))
        progress(variant.n_ctx)
        evict_ms, dense_ms = [], []
        next_token = variant.n_ctx
        for i in range(WARMUP_STEPS + steps):
            token = _cycled(tokens, next_token, 1)
            next_token += 1
            pair = [("evict", lambda: session.feed_tokens(token)), ("dense", lambda: dense_step(session))]
            for name, step in (pair if i % 2 == 0 else pair[::-1]):
                start = time.perf_counter()
                step()
                ms = (time.perf_counter() - start) * 1000
                if i >= WARMUP_STEPS:
                    (evict_ms if name == "evict" else dense_ms).append(ms)
            progress(2)
        stats = session.stats
    return {"evict_ms": evict_ms, "dense_ms": dense_ms, "patch_level": _native.patch_level(),
            "kept_forward": bool(stats.extra.get("kept_forward")),
            "rebases": stats.rebases, "refreshes": stats.refreshes}
