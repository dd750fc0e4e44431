"""Soak: a very long stream through ``sink``, with perplexity per segment and RSS over time.

Tokens are fed in large calls (whole feed batches) and only a sample is scored: one position
at random in each block of ``sample_every`` tokens, so only those rows compute logits.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ..session import Session
from .config import Variant
from .memory import rss_mb

CHUNK_BATCHES = 64  # feed batches per call; RSS is sampled after each call


def run_soak(model, variant: Variant, tokens: np.ndarray, *, segment: int, sample_every: int,
             threads: int | None = None, seed: int = 0,
             progress: Callable[[int], None] = lambda n: None) -> dict:
    """Stream all of ``tokens`` (held in memory beforehand) through one session."""
    rng = np.random.default_rng(seed)
    n_segments = -(-len(tokens) // segment)
    nll_sum, scored = np.zeros(n_segments), np.zeros(n_segments, dtype=np.int64)
    series: list[tuple[int, float, float]] = []  # (tokens streamed, seconds, RSS MiB)
    with Session(model, **variant.session_options(), n_threads=threads) as session:
        chunk = session.batch_size * CHUNK_BATCHES
        rss_after_fill = None
        start_time = time.perf_counter()
        for start in range(0, len(tokens), chunk):
            part = tokens[start:start + chunk]
            local = np.arange(0, len(part), sample_every) + rng.integers(0, sample_every, -(-len(part) // sample_every))
            local = local[local < len(part)]
            nll = session.score_tokens(part.tolist(), positions=local)[local]
            ok = np.isfinite(nll)
            seg = (start + local[ok]) // segment
            np.add.at(nll_sum, seg, nll[ok])
            np.add.at(scored, seg, 1)
            done = start + len(part)
            series.append((done, time.perf_counter() - start_time, rss_mb()))
            if rss_after_fill is None and done >= variant.n_ctx:
                rss_after_fill = series[-1][2]
            progress(len(part))
        stats = session.stats
        seconds = time.perf_counter() - start_time
    segments = [{"start": i * segment, "end": min(len(tokens), (i + 1) * segment),
                 "ppl": float(np.exp(nll_sum[i] / scored[i])) if scored[i] else None, "scored": int(scored[i])}
                for i in range(n_segments)]
    rss = np.array([s[2] for s in series])
    return {"segments": segments, "series": series, "rss_after_fill_mb": rss_after_fill,
            "rss_end_mb": float(rss[-1]), "rss_max_mb": float(rss.max()),
            "rss_min_after_fill_mb": float(rss[[s[0] >= variant.n_ctx for s in series]].min()),
            "seconds": seconds, "tokens_per_s": len(tokens) / seconds,
            "evictions": stats.evictions, "rebases": stats.rebases, "refreshes": stats.refreshes,
            "tokens_in_cache": stats.tokens_in_cache}
