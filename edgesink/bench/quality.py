"""Quality: the per-token NLL of a long stream under one policy, and perplexities from it."""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..session import Session
from .config import Variant

CHUNK_BATCHES = 16  # tokens are scored in calls of this many feed batches (progress; same result)


def recompute_cost(positions: np.ndarray, n_ctx: int) -> int:
    """Tokens re-encoded to score ``positions`` with recompute (the whole window before each)."""
    return int(np.minimum(np.asarray(positions), n_ctx).sum())


def measure_quality(model, variant: Variant, tokens: np.ndarray, positions: np.ndarray, *,
                    threads: int | None = None, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Stream ``tokens`` through a session of ``variant``; the NLL of each token as fed.

    ``recompute`` is scored only at ``positions`` (each costs a re-encoding of the window); the
    other policies at every position. ``dense`` stops when its cache is full.
    """
    with Session(model, **variant.session_options(), n_threads=threads) as session:
        n = min(len(tokens), variant.n_ctx) if not variant.context_policy.evicts else len(tokens)
        nll = np.full(len(tokens), np.nan)
        chunk = session.batch_size * CHUNK_BATCHES  # whole batches: the same as one call
        recompute = session.policy.recomputes
        start_time = time.perf_counter()
        for start in range(0, n, chunk):
            part = tokens[start:min(n, start + chunk)]
            if recompute:
                local = positions[(positions >= start) & (positions < start + len(part))] - start
                nll[start:start + len(part)] = session.score_tokens(part, positions=local)
                progress(recompute_cost(local + start, variant.n_ctx))
            else:
                nll[start:start + len(part)] = session.score_tokens(part)
                progress(len(part))
        seconds = time.perf_counter() - start_time
        stats = session.stats
    return {"nll": nll, "seconds": seconds, "tokens_fed": n,
            "stats": {"evictions": stats.evictions, "shifts": stats.shifts, "rebases": stats.rebases,
                      "refreshes": stats.refreshes, "rebuilds": stats.extra.get("rebuilds", 0)}}


def perplexity(nll: np.ndarray, positions: np.ndarray | None = None) -> tuple[float | None, int]:
    """exp(mean NLL) over ``positions`` (all scored ones if None), and how many were scored."""
    values = nll if positions is None else nll[positions[positions < len(nll)]]
    values = values[np.isfinite(values)]
    return (float(np.exp(values.mean())) if len(values) else None), int(len(values))


def segment_perplexities(nll: np.ndarray, n_segments: int, positions: np.ndarray | None = None) -> list[dict]:
    """Perplexity per equal segment of the stream (on ``positions`` if given)."""
    edges = np.linspace(0, len(nll), n_segments + 1).astype(int)
    found = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        picked = None if positions is None else positions[(positions >= lo) & (positions < hi)]
        ppl, n = perplexity(nll[lo:hi] if picked is None else nll, picked)
        found.append({"start": int(lo), "end": int(hi), "ppl": ppl, "scored": n})
    return found
