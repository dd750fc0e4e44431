"""What the Python layer costs on top of llama.cpp: Session against a raw-bindings loop doing the same work.

1. feed: the same token batches, with the same evictions (sink policy, kept cells moved forward),
   through ``Session.feed_tokens`` and through a loop of raw ``llama_decode`` / ``llama_memory_*``
   calls; throughput ratio.
2. generate: per-token wall time of ``Session.stream_generate`` against a raw loop (sample, evict,
   decode) at the same cache fill; the difference is what Python adds per token.

Runs are interleaved and repeated; medians are reported.

    .venv/bin/python benchmarks/python_overhead.py [--n-ctx 2048] [--tokens 6000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np

import edgesink
from edgesink._native import C
from edgesink.corpus import austen_text
from edgesink.sampling import Sampler, SamplingParams


def raw_feed(session, tokens, batch_size) -> float:
    """Feed like the Session does (evict, move the 4 kept cells forward, decode), with bare bindings."""
    cache = session._cache
    ctx, mem, n_ctx, n_kept = cache.ctx, cache.mem, session.n_ctx, 4
    batch = C.llama_batch_init(batch_size, 0, 1)
    w0, n_window = n_kept, -n_kept  # the first chunk's first 4 tokens become the kept ones
    start = time.perf_counter()
    for b0 in range(0, len(tokens), batch_size):
        chunk = tokens[b0:b0 + batch_size]
        excess = n_kept + n_window + len(chunk) - n_ctx
        if excess > 0:
            C.llama_memory_seq_rm(mem, 0, w0, w0 + excess)
            C.llama_memory_seq_add(mem, 0, w0 - n_kept, w0, excess)
            w0 += excess
            n_window -= excess
        pos0 = w0 + n_window
        for i, t in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, i == len(chunk) - 1
        batch.n_tokens = len(chunk)
        assert C.llama_decode(ctx, batch) == 0
        n_window += len(chunk)
    elapsed = time.perf_counter() - start
    C.llama_batch_free(batch)
    return elapsed


def session_feed(model, tokens, n_ctx, batch_size) -> float:
    # Rebase/refresh turned off: the raw loop does neither, so both do exactly the same work.
    with edgesink.Session(model, n_ctx=n_ctx, batch_size=batch_size, refresh_every=10**9, rebase_every=10**9) as s:
        start = time.perf_counter()
        s.feed_tokens(tokens)
        return time.perf_counter() - start


def raw_generate_step_times(session, n) -> list[float]:
    cache = session._cache
    ctx, mem = cache.ctx, cache.mem
    batch = C.llama_batch_init(1, 0, 1)
    times = []
    with Sampler(SamplingParams(top_k=1)) as sampler:
        for _ in range(n):
            start = time.perf_counter()
            token = sampler.sample(ctx)
            w0 = cache.w0
            C.llama_memory_seq_rm(mem, 0, w0, w0 + 1)
            C.llama_memory_seq_add(mem, 0, w0 - 4, w0, 1)
            cache.w0 += 1
            cache.window.popleft()
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = \
                token, cache.next_pos, 1, 0, 1
            batch.n_tokens = 1
            assert C.llama_decode(ctx, batch) == 0
            cache.window.append(token)
            times.append(time.perf_counter() - start)
    C.llama_batch_free(batch)
    return times


def session_generate_step_times(session, n) -> list[float]:
    times, last = [], time.perf_counter()
    for _ in session.stream_generate(n, top_k=1):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times[:-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = edgesink.load(args.model)
    tokens = model.tokenize(austen_text()[: args.tokens * 6])[: args.tokens]
    feed_raw, feed_session = [], []
    for _ in range(args.repeats):
        with edgesink.Session(model, n_ctx=args.n_ctx, batch_size=args.batch_size) as s:
            feed_raw.append(raw_feed(s, tokens, args.batch_size))
        feed_session.append(session_feed(model, tokens, args.n_ctx, args.batch_size))
    raw_s, ses_s = statistics.median(feed_raw), statistics.median(feed_session)

    gen_raw, gen_session = [], []
    with edgesink.Session(model, n_ctx=args.n_ctx, refresh_every=10**9, rebase_every=10**9) as s:
        s.feed_tokens(tokens[: args.n_ctx])
        for _ in range(args.repeats):
            gen_raw += raw_generate_step_times(s, 64)
            gen_session += session_generate_step_times(s, 65)
    raw_ms, ses_ms = statistics.median(gen_raw) * 1e3, statistics.median(gen_session) * 1e3

    result = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores",
        "n_ctx": args.n_ctx, "tokens": len(tokens), "batch_size": args.batch_size,
        "feed_tokens_per_s_raw": len(tokens) / raw_s, "feed_tokens_per_s_session": len(tokens) / ses_s,
        "feed_ratio": raw_s / ses_s,
        "generate_ms_per_token_raw": raw_ms, "generate_ms_per_token_session": ses_ms,
        "python_ms_per_generated_token": ses_ms - raw_ms,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
