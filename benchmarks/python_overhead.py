"""What the Python layer costs on top of llama.cpp (the engine issue's two targets).

1. feed: the same token batches with the same evictions (sink policy, the 4 kept cells moved
   forward) through ``Session.feed_tokens`` and through a loop of bare ``llama_decode`` /
   ``llama_memory_*`` calls, interleaved and repeated; throughput ratio (target >= 0.90).
2. generate, per token, at a full cache with one-token eviction (target < 0.3 ms of Python):
   - accounted: ``Session.stream_generate`` with every native call it makes timed; Python's share
     is the wall time less the time spent inside llama.cpp. This is exact whatever the noise, since
     both are measured on the same tokens.
   - side by side: the median step of the Session against a bare loop doing the same work
     (sample, evict, decode). The difference is noisier: one decode step is tens of milliseconds.

    .venv/bin/python benchmarks/python_overhead.py [--n-ctx 2048] [--tokens 4000] [--threads 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time

import edgesink
from edgesink.bindings import C
from edgesink.bench.machine import publish
from edgesink.corpus import austen_text
from edgesink.sampling import Sampler, SamplingParams

N_KEPT = 4
# Every native function a Session calls while generating; the accounted measure times these.
NATIVE_CALLS = ("llama_decode", "llama_sampler_sample", "llama_sampler_accept", "llama_memory_seq_rm",
                "llama_memory_seq_add", "llama_memory_seq_cp", "llama_get_logits", "llama_get_logits_ith")


def raw_feed(session, tokens, batch_size) -> float:
    """Feed like the Session does (evict, move the kept cells forward, decode), with bare bindings."""
    cache = session.cache
    ctx, mem, seq, n_ctx = cache.ctx, cache.mem, cache.seq, session.n_ctx
    batch = C.llama_batch_init(batch_size, 0, 1)
    w0, n_window = N_KEPT, -N_KEPT  # the first batch's first tokens become the kept ones
    start = time.perf_counter()
    for b0 in range(0, len(tokens), batch_size):
        chunk = tokens[b0:b0 + batch_size]
        excess = N_KEPT + n_window + len(chunk) - n_ctx
        if excess > 0:
            C.llama_memory_seq_rm(mem, seq, w0, w0 + excess)
            C.llama_memory_seq_add(mem, seq, w0 - N_KEPT, w0, excess)
            w0 += excess
            n_window -= excess
        pos0 = w0 + n_window
        for i, t in enumerate(chunk):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
            batch.seq_id[i][0], batch.logits[i] = seq, i == len(chunk) - 1
        batch.n_tokens = len(chunk)
        assert C.llama_decode(ctx, batch) == 0
        n_window += len(chunk)
    elapsed = time.perf_counter() - start
    C.llama_batch_free(batch)
    return elapsed


def no_upkeep_session(model, n_ctx, batch_size, threads):
    """A sink Session without rebases or refreshes: the bare loop does neither, so both do the same work."""
    return edgesink.Session(model, n_ctx=n_ctx, batch_size=batch_size, n_threads=threads,
                            refresh_every=10**9, rebase_every=10**9)


def feed_ratio(model, tokens, n_ctx, batch_size, threads, repeats) -> dict:
    raw, session = [], []
    for _ in range(repeats):
        with no_upkeep_session(model, n_ctx, batch_size, threads) as s:
            raw.append(raw_feed(s, tokens, batch_size))
        with no_upkeep_session(model, n_ctx, batch_size, threads) as s:
            start = time.perf_counter()
            s.feed_tokens(tokens)
            session.append(time.perf_counter() - start)
    raw_s, ses_s = statistics.median(raw), statistics.median(session)
    return {"feed_tokens_per_s_raw": len(tokens) / raw_s, "feed_tokens_per_s_session": len(tokens) / ses_s,
            "feed_ratio": raw_s / ses_s, "feed_seconds_raw": raw, "feed_seconds_session": session}


class NativeClock:
    """Accumulates the wall time spent inside the named llama.cpp functions while active."""

    def __init__(self, names):
        self.names, self.seconds, self.calls = names, 0.0, 0
        self._originals = {}

    def _timed(self, function):
        def timed(*args):
            start = time.perf_counter()
            try:
                return function(*args)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed

    def __enter__(self):
        for name in self.names:
            self._originals[name] = getattr(C, name)
            setattr(C, name, self._timed(self._originals[name]))
        return self

    def __exit__(self, *exc):
        for name, function in self._originals.items():
            setattr(C, name, function)


def accounted_python_ms(session, n) -> dict:
    with NativeClock(NATIVE_CALLS) as clock:
        seen = session.stats.tokens_seen
        start = time.perf_counter()
        for _ in session.stream_generate(n, top_k=1):
            pass
        wall = time.perf_counter() - start
    produced = session.stats.tokens_seen - seen
    return {"tokens": produced, "wall_ms_per_token": 1e3 * wall / produced,
            "native_ms_per_token": 1e3 * clock.seconds / produced,
            "python_ms_per_token": 1e3 * (wall - clock.seconds) / produced,
            "native_calls_per_token": clock.calls / produced}


def raw_generate_step_times(session, n) -> list[float]:
    """Sample, evict one token moving the kept cells forward, decode: the Session's step, bare."""
    cache = session.cache
    ctx, mem, seq, layout = cache.ctx, cache.mem, cache.seq, cache.layout
    batch = C.llama_batch_init(1, 0, 1)
    times = []
    with Sampler(SamplingParams(top_k=1)) as sampler:
        for _ in range(n):
            start = time.perf_counter()
            token = sampler.sample(ctx)
            w0 = layout.w0
            C.llama_memory_seq_rm(mem, seq, w0, w0 + 1)
            C.llama_memory_seq_add(mem, seq, w0 - N_KEPT, w0, 1)
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = \
                token, layout.next_pos, 1, seq, 1
            batch.n_tokens = 1
            assert C.llama_decode(ctx, batch) == 0
            # Keep the Session's bookkeeping in step (the layout's own fields: the cache only shows
            # them), so its own steps that follow stay valid.
            layout.w0 += 1
            layout.window.popleft()
            layout.window.append(token)
            times.append(time.perf_counter() - start)
    C.llama_batch_free(batch)
    return times


def session_generate_step_times(session, n) -> list[float]:
    times, last = [], time.perf_counter()
    for _ in session.stream_generate(n, top_k=1):
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def generate_overhead(model, tokens, n_ctx, threads, steps, repeats) -> dict:
    with no_upkeep_session(model, n_ctx, None, threads) as s:
        s.feed_tokens(tokens[:n_ctx])
        s.generate_text(8, top_k=1)  # warm-up
        accounted = accounted_python_ms(s, steps * repeats)
        raw, session = [], []
        for _ in range(repeats):
            raw += raw_generate_step_times(s, steps)
            session += session_generate_step_times(s, steps)
    raw_ms, ses_ms = statistics.median(raw) * 1e3, statistics.median(session) * 1e3
    return {"accounted": accounted, "generate_ms_per_token_raw": raw_ms, "generate_ms_per_token_session": ses_ms,
            "side_by_side_python_ms_per_token": ses_ms - raw_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="generated tokens per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = edgesink.load(args.model)
    tokens = model.tokenize(austen_text()[: args.tokens * 6])[: args.tokens]
    report = {"threads": args.threads, "n_ctx": args.n_ctx, "tokens": len(tokens), "batch_size": args.batch_size}
    report.update(feed_ratio(model, tokens, args.n_ctx, args.batch_size, args.threads, args.repeats))
    report.update(generate_overhead(model, tokens, args.n_ctx, args.threads, args.steps, args.repeats))
    publish(report, args.json)


if __name__ == "__main__":
    main()
