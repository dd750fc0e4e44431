"""The headline figures in one short run: quality and per-token eviction cost (the full sweep is context_shift.py).

1. quality: perplexity of sink, halve, window and recompute at one n_ctx on the same long text,
   all scored on the same uniform sample of positions after the cache first filled;
2. per-token cost at a full cache: a dense step, one-token eviction moving the 4 sink cells
   forward, and one-token eviction moving the whole window back, interleaved, with this process's
   libllama (run it again with EDGESINK_LIB_PATH=build/stock/lib for the stock library), and how
   many of those steps reused llama.cpp's previous compute graph instead of building one;
3. the same for served sessions: 1 and 4 sessions in one shared context, every session stepping
   in each round (decoded together, one llama_decode), a dense round against a round in which
   every session evicts one token, sinks forward (in-place re-encoding, patch 0007) and window back.

    .venv/bin/python benchmarks/headline.py quality --n-ctx 512 --tokens 20000 --sample 128
    .venv/bin/python benchmarks/headline.py latency --n-ctx 2048,8192 --steps 40 --threads 1,2
    .venv/bin/python benchmarks/headline.py shared --n-ctx 2048 --slots 1,4 --steps 40 --threads 1,2

`make bench-headline` runs the latency part with the patched and then with the stock library;
`make bench-headline-vulkan` counts the reused graphs of the Vulkan build on lavapipe.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import numpy as np

import edgesink
from edgesink import bindings
from edgesink.bench.machine import publish, repo_relative
from edgesink.corpus import austen_text


def quality(model, n_ctx, n_tokens, n_sample, threads):
    tokens = model.tokenize(austen_text()[: n_tokens * 6])[:n_tokens]
    positions = np.linspace(2 * n_ctx, n_tokens - 1, n_sample).astype(int)
    results = {}
    for name in ("sink", "halve", "window", "recompute"):
        start = time.perf_counter()
        with model.session(n_ctx=n_ctx, policy=name, n_threads=threads) as s:
            nll = s.score_tokens(tokens, positions=positions)
        results[name] = {"ppl": float(np.exp(np.nanmean(nll[positions]))), "seconds": time.perf_counter() - start}
        print(name, results[name], flush=True)
    ref = results["recompute"]["ppl"]
    return {"n_ctx": n_ctx, "tokens": len(tokens), "scored_positions": len(positions), "results": results,
            "sink_vs_recompute": results["sink"]["ppl"] / ref - 1, "sink_vs_halve": results["sink"]["ppl"] / results["halve"]["ppl"] - 1}


def _graphs_reused(ctx) -> int:
    """How many decodes of this context reused the previous compute graph (llama_perf_context's n_reused)."""
    return int(bindings.C.llama_perf_context(ctx).n_reused)


def latency(model, n_ctx, steps, threads):
    tokens = model.tokenize(austen_text()[: n_ctx * 6])[: n_ctx + 2 * steps + 8]
    out = {}
    for mode in ("kept-forward", "window-back"):
        with model.session(n_ctx=n_ctx, shift_mode=mode, batch_size=64, refresh_every=10**9, rebase_every=10**9,
                           n_threads=threads) as s:
            s.feed_tokens(tokens[:n_ctx])
            cache, dense, evict = s.cache, [], []
            reused = {"dense": 0, "evict": 0}  # steps whose compute graph llama.cpp reused instead of building it
            for i in range(steps):
                # dense step at the same fill: the newest token decoded again in its own cell, nothing evicted
                before = _graphs_reused(cache.ctx)
                t = time.perf_counter(); cache.redecode_newest(); dense.append(time.perf_counter() - t)
                reused["dense"] += _graphs_reused(cache.ctx) - before
                before = _graphs_reused(cache.ctx)
                t = time.perf_counter(); s.feed_tokens([tokens[n_ctx + i]]); evict.append(time.perf_counter() - t)
                reused["evict"] += _graphs_reused(cache.ctx) - before
            evict_ms, dense_ms = statistics.median(evict) * 1e3, statistics.median(dense) * 1e3
            out[mode] = {"evict_ms": evict_ms, "dense_ms": dense_ms, "evict_over_dense": evict_ms / dense_ms,
                         "graphs_reused_dense": reused["dense"], "graphs_reused_evict": reused["evict"]}
        print(n_ctx, threads, mode, out[mode], flush=True, file=sys.stderr)
    return {"n_ctx": n_ctx, "threads": threads, "patch_level": bindings.patch_level(), **out}


class _Workers:
    """One thread per session, each inside its slot's ``running()`` for the whole run (as a served
    session's generation is), so every round's steps meet in one llama_decode; :meth:`round` times
    one step of every session."""

    def __init__(self, shared, sessions):
        self.shared, self.sessions = shared, sessions
        self.start, self.end = threading.Barrier(len(sessions) + 1), threading.Barrier(len(sessions) + 1)
        self.action, self.errors = None, []
        self.threads = [threading.Thread(target=self._work, args=(s,), daemon=True) for s in sessions]
        for t in self.threads:
            t.start()

    def _work(self, session):
        with session.cache.slot.running():
            while True:
                self.start.wait()
                if self.action is None:
                    return
                try:
                    self.action(session)
                except Exception as error:  # reported by round()
                    self.errors.append(error)
                self.end.wait()

    def round(self, action) -> float:
        self.action = action
        t = time.perf_counter()
        self.start.wait()
        self.end.wait()
        elapsed = time.perf_counter() - t
        if self.errors:
            raise self.errors[0]
        return elapsed

    def stop(self):
        self.action = None
        self.start.wait()
        for t in self.threads:
            t.join()


def shared_latency(model, n_ctx, slots, steps, threads):
    """Rounds of one step in each of ``slots`` served sessions at a full cache: dense against evicting."""
    text = austen_text()
    streams = [model.tokenize(text[i * n_ctx * 6: (i + 1) * n_ctx * 6])[: n_ctx + steps + 8] for i in range(slots)]
    out = {}
    for mode in ("kept-forward", "window-back"):
        config = edgesink.SessionConfig.of(n_ctx=n_ctx, shift_mode=mode, batch_size=64, refresh_every=10**9,
                                           rebase_every=10**9, n_threads=threads)
        with edgesink.SharedContext(model, config, slots=slots) as shared:
            sessions = [edgesink.Session(model, config, context=shared) for _ in range(slots)]
            for s, tokens in zip(sessions, streams):
                s.feed_tokens(tokens[:n_ctx])
            assert all(s.kept_forward == (mode == "kept-forward") for s in sessions)
            workers, dense, evict = _Workers(shared, sessions), [], []
            reused = {"dense": 0, "evict": 0}
            decodes = shared.decodes
            try:
                for i in range(steps):
                    before = _graphs_reused(shared.ctx)
                    dense.append(workers.round(lambda s: s.cache.redecode_newest()))
                    reused["dense"] += _graphs_reused(shared.ctx) - before
                    before = _graphs_reused(shared.ctx)
                    evict.append(workers.round(lambda s: s.feed_tokens([streams[sessions.index(s)][n_ctx + i]])))
                    reused["evict"] += _graphs_reused(shared.ctx) - before
            finally:
                workers.stop()
            rounds_decoded_together = (2 * steps) / max(1, shared.decodes - decodes)
            evict_ms, dense_ms = statistics.median(evict) * 1e3, statistics.median(dense) * 1e3
            out[mode] = {"evict_ms": evict_ms, "dense_ms": dense_ms, "evict_over_dense": evict_ms / dense_ms,
                         "graphs_reused_dense": reused["dense"], "graphs_reused_evict": reused["evict"],
                         "evictions": sum(s.stats.evictions for s in sessions),
                         "rounds_per_decode": rounds_decoded_together}
            for s in sessions:
                s.close()
        print(n_ctx, slots, threads, mode, out[mode], flush=True, file=sys.stderr)
    return {"n_ctx": n_ctx, "slots": slots, "threads": threads, "patch_level": bindings.patch_level(), **out}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["quality", "latency", "shared"])
    parser.add_argument("--n-ctx", default="512")
    parser.add_argument("--tokens", type=int, default=20000)
    parser.add_argument("--sample", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--slots", default="1,4", help="shared: sessions in the shared context, a list")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", default=None,
                        help="threads per decode; latency takes a list (1,2), each measured in turn")
    parser.add_argument("--model", default=None, help="a .gguf path or registry name (default: the default model)")
    args = parser.parse_args()
    # A busy machine wants 1 thread: llama.cpp's threads wait for each other.
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [None]
    model = edgesink.load(args.model)
    n_ctxs = [int(n) for n in args.n_ctx.split(",")]
    if args.what == "quality":
        runs = [quality(model, n, args.tokens, args.sample, threads[0]) for n in n_ctxs]
    elif args.what == "latency":
        runs = [latency(model, n, args.steps, t) for t in threads for n in n_ctxs]
    else:
        slots = [int(n) for n in args.slots.split(",")]
        runs = [shared_latency(model, n, k, args.steps, t) for t in threads for n in n_ctxs for k in slots]
    command = "python benchmarks/headline.py " + " ".join(sys.argv[1:])
    publish({"command": command, "steps": args.steps if args.what != "quality" else None, "threads": threads[0],
             "library": repo_relative(bindings.LIBRARY_FOLDER), "layers_on": str(model.offload),
             "runs": runs}, args.json)


if __name__ == "__main__":
    main()
