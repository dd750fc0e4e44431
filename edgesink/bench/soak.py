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
from .memory import anon_swap_mb, rss_mb

CHUNK_BATCHES = 64  # feed batches per call; RSS is sampled after each call


def run_soak(model, variant: Variant, tokens: np.ndarray, *, segment: int, sample_every: int,
             threads: int | None = None, seed: int = 0,
             progress: Callable[[int], None] = lambda n: None) -> dict:
    """Stream all of ``tokens`` (held in memory beforehand) through one session."""
    rng = np.random.default_rng(seed)
    n_segments = -(-len(tokens) // segment)
    nll_sum, scored = np.zeros(n_segments), np.zeros(n_segments, dtype=np.int64)
    series: list[tuple[int, float, float, float | None]] = []  # (tokens streamed, seconds, RSS, anon+swap MiB)
    with Session(model, **variant.session_options(), n_threads=threads) as session:
        chunk = session.batch_size * CHUNK_BATCHES
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
            series.append((done, time.perf_counter() - start_time, rss_mb(), anon_swap_mb()))
            progress(len(part))
        stats = session.stats
        seconds = time.perf_counter() - start_time
    segments = [{"start": i * segment, "end": min(len(tokens), (i + 1) * segment),
                 "ppl": float(np.exp(nll_sum[i] / scored[i])) if scored[i] else None, "scored": int(scored[i])}
                for i in range(n_segments)]
    return {"segments": segments, "series": series, **memory_figures(series, variant.n_ctx),
            **_speed_figures(series), "seconds": seconds, "tokens_per_s": len(tokens) / seconds,
            "evictions": stats.evictions, "rebases": stats.rebases, "refreshes": stats.refreshes,
            "tokens_in_cache": stats.tokens_in_cache}


def memory_figures(series, n_ctx: int) -> dict:
    """RSS and anonymous+swap memory once the cache is full: first and last sample, the median
    of each quarter of the stream, and the least-squares trend in MiB per 100k tokens.

    Single samples swing by a MiB or two (the allocator returns and takes pages); the quarter
    medians and the trend are what show growth.
    """
    after_fill = [s for s in series if s[0] >= n_ctx]
    done = np.array([s[0] for s in after_fill], dtype=float)
    figures = {}
    for name, column in (("rss", 2), ("anon_swap", 3)):
        values = np.array([np.nan if s[column] is None else s[column] for s in after_fill], dtype=float)
        if not len(values) or np.isnan(values).any():
            continue
        quarters = np.array_split(values, 4) if len(values) >= 4 else [values]
        slope = np.polyfit(done, values, 1)[0] if len(values) >= 2 and np.ptp(done) > 0 else 0.0
        figures.update({f"{name}_after_fill_mb": float(values[0]), f"{name}_end_mb": float(values[-1]),
                        f"{name}_quarter_medians_mb": [float(np.median(q)) for q in quarters],
                        f"{name}_trend_mb_per_100k": float(slope * 100_000)})
    return figures


def _speed_figures(series) -> dict:
    """Milliseconds per streamed token in each chunk, and its median over the first and last tenth."""
    done = np.array([0] + [s[0] for s in series], dtype=float)
    seconds = np.array([0.0] + [s[1] for s in series])
    ms = 1e3 * np.diff(seconds) / np.diff(done)
    tenth = max(1, len(ms) // 10)
    return {"ms_per_token_chunks": ms.tolist(), "ms_per_token_first_tenth": float(np.median(ms[:tenth])),
            "ms_per_token_last_tenth": float(np.median(ms[-tenth:]))}
