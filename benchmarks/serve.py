"""`edgesink serve` under load: endless sessions side by side, and a 200-turn chat with a resending client.

1. concurrency: 1, 4 and 8 named sessions, each first fed past its window (n_ctx 2048), then all
   streaming a reply at once through the HTTP API. Aggregate tokens/s (all replies' tokens over
   the wall time) and each session's median time between tokens. Beside it, in the same run, the
   same sessions without the server: decoded together in one shared context, and one after the
   other in contexts of their own (what a server without batching does).
2. long chat: a client that re-sends its whole history, as OpenAI clients do, for 200 turns.
   Tokens fed and seconds per turn must stay flat while the history grows.
3. batching throughput (engine): 1, 4 and 8 sessions generating at once in a shared context, at
   n_ctx 512 and 2048, against the bare bindings stepping the same sequences with one llama_decode
   per step (the engine's ceiling on the machine).
4. fairness (engine): a 4,000-token prompt fed into one session of a shared context while 4 others
   generate. The generators' 99th-percentile gap between tokens against one prompt chunk plus one
   generating step (each measured alone, in the same run), and the prompt's speed against its
   speed alone.
5. soak (only with --parts soak): 16 clients on 4 slots for 2 minutes, a quarter of their requests
   abandoned mid-reply. Every request answered once or refused, no conversation holding another's
   messages or tokens, checked in llama.cpp's cells.

    .venv/bin/python benchmarks/serve.py --json benchmarks/results/serve.json
    .venv/bin/python benchmarks/serve.py --parts soak --json benchmarks/results/serve_soak.json

The server runs in this process (uvicorn in a thread) and is reached on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import http.client
import json
import random
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import uvicorn

import edgesink
from edgesink import Session, SessionConfig, SharedContext
from edgesink.bindings import C
from edgesink import seqstate
from edgesink.contexts import context_params
from edgesink.bench.machine import publish
from edgesink.corpus import austen_text
from edgesink.serve import Access, ServeLimits, Server, SessionPool, create_app, served_config
from edgesink.serve.guard import RequestGuard


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def start_server(model, config, slots: int, port: int, sessions_dir):
    pool = SessionPool(model, config, slots=slots, sessions_dir=sessions_dir)
    server = uvicorn.Server(uvicorn.Config(RequestGuard(create_app(Server(pool, ["bench"], access=Access(), limits=ServeLimits())),
                                                        bind="127.0.0.1"),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join()
        pool.close()
    return stop


def chat(port: int, session: str, messages: list[dict], max_tokens: int, seed: int = 1) -> dict:
    """One streamed chat request: its text, the times its pieces arrived, its usage."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "stream": True, "seed": seed,
            "temperature": 0.8, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                       headers={"content-type": "application/json", "x-edgesink-session": session})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    pieces, times, usage = [], [], None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            if choice["delta"].get("content"):
                pieces.append(choice["delta"]["content"])
                times.append(time.perf_counter())
    connection.close()
    return {"text": "".join(pieces), "start": start, "times": times, "end": time.perf_counter(), "usage": usage}


def prose_message(model, n_tokens: int, offset: int) -> str:
    """About ``n_tokens`` tokens of prose, different for each offset."""
    text = austen_text()[offset * 20000:]
    return model.detokenize(model.tokenize(text[: n_tokens * 6])[:n_tokens])


def concurrency_over_api(model, config, port, counts, reply_tokens):
    results = {}
    stop = start_server(model, config, max(counts), port, None)  # no --sessions: nothing saved per request
    try:
        for n in counts:
            progress(f"over the API: {n} sessions")
            histories = [filling_history(model, config.n_ctx, i) for i in range(n)]
            fills = _together(lambda i: chat(port, f"c{n}-{i}", histories[i], 1), n)  # every session past its window
            for history, fill in zip(histories, fills):
                history += [{"role": "assistant", "content": fill["text"]}, {"role": "user", "content": "Go on."}]
            replies = _together(lambda i: chat(port, f"c{n}-{i}", histories[i], reply_tokens), n)
            results[n] = {**_rates(replies), "evicted_while_filling": [f["usage"]["evicted_tokens"] for f in fills],
                          "cached_tokens_after": [r["usage"]["cached_tokens"] for r in replies],
                          "fed_tokens": [r["usage"]["prompt_tokens"] for r in replies]}
    finally:
        stop()
    return results


def filling_history(model, n_ctx: int, offset: int) -> list[dict]:
    """A conversation of short turns longer than the cache: replayed, it leaves the cache full of whole turns."""
    prose = prose_message(model, n_ctx + 300, offset).split(". ")
    history, size = [], len(prose) // 40 + 1
    for k in range(0, len(prose), size):
        history += [{"role": "user", "content": ". ".join(prose[k:k + size]) + "."},
                    {"role": "assistant", "content": "Yes."}]
    return history[:-1]


def _rates(replies) -> dict:
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    # From the first token to the last: the generation itself (the new turns are a few tokens each).
    wall = max(r["times"][-1] for r in replies) - min(r["times"][0] for r in replies)
    gaps = [statistics.median(b - a for a, b in zip(r["times"], r["times"][1:])) for r in replies if len(r["times"]) > 2]
    return {"sessions": len(replies), "tokens": tokens, "seconds": round(wall, 2),
            "aggregate_tokens_per_s": round(tokens / wall, 1),
            "median_ms_between_tokens": round(1000 * statistics.median(gaps), 1) if gaps else None,
            "worst_session_ms_between_tokens": round(1000 * max(gaps), 1) if gaps else None}


def _together(work, n):
    results = [None] * n
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, work(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def engine_side_by_side(model, config, n: int, tokens: int) -> dict:
    """The same n endless sessions decoded together (shared context) and one after the other (own contexts)."""
    progress(f"engine side by side: {n} sessions")
    texts = [prose_message(model, config.n_ctx + 100, i) for i in range(n)]
    with SharedContext(model, config, slots=n) as shared:
        sessions = [Session(model, config, context=shared) for _ in range(n)]
        for s, text in zip(sessions, texts):
            s.feed(text)

        def generate(i):
            return _generated(sessions[i].stream_generate(tokens, seed=i + 1))
        start = time.perf_counter()
        produced = sum(_together(generate, n))
        together = produced / (time.perf_counter() - start)
        for s in sessions:
            s.close()
    sessions = [Session(model, config) for _ in range(n)]
    for s, text in zip(sessions, texts):
        s.feed(text)
    streams = [s.stream_generate(tokens, seed=i + 1) for i, s in enumerate(sessions)]
    start, produced = time.perf_counter(), 0
    for _ in range(tokens):
        for stream in streams:
            produced += next(stream, None) is not None
    apart = produced / (time.perf_counter() - start)
    for s in sessions:
        s.close()
    return {"sessions": n, "together_tokens_per_s": round(together, 1), "one_after_another_tokens_per_s": round(apart, 1)}


def _generated(chunks) -> int:
    """Tokens generated: the chunks that carry one (the last chunk of a length-limited generation does not)."""
    return sum(c.token is not None or c.end_token is not None for c in chunks)


def batching_throughput(model, config, n: int, tokens: int, rounds: int = 7) -> dict:
    """n endless sessions generating greedily at once in a shared context (each its own thread, past its
    window, evicting every token), against the bare bindings' ceiling: the same n sequences, as full
    (n_ctx cells each), stepped by one ``llama_decode`` of n tokens per step, greedy, no K-shift, no
    Python layer. ``rounds`` pairs of ``tokens`` tokens each, the two back to back, which goes first
    alternating (this machine's speed drifts by tens of percent within a minute; a pair sees the same
    drift); the ratio is the median of the pairs' ratios, the rates the medians of their rounds."""
    progress(f"batching throughput: {n} sessions, n_ctx {config.n_ctx}")
    streams = [model.tokenize(prose_message(model, config.n_ctx + 100, i)) for i in range(n)]
    ours, bare_rates, counts = [], [], []
    with SharedContext(model, config, slots=n) as shared, _BareBindings(model, config, n) as bare:
        sessions = [Session(model, config, context=shared) for _ in range(n)]
        for s, stream in zip(sessions, streams):
            s.feed_tokens(stream)
        bare.fill([stream[: config.n_ctx] for stream in streams])

        def edgesink_round() -> None:
            start = time.perf_counter()
            produced = sum(_together(lambda i: _generated(sessions[i].stream_generate(tokens, temperature=0)), n))
            ours.append(produced / (time.perf_counter() - start))
            counts.append(produced)  # fewer than n * tokens: a session met an end token

        for i in range(rounds):
            pair = [edgesink_round, lambda: bare_rates.append(bare.rate(tokens))]
            for measure in pair if i % 2 == 0 else reversed(pair):
                measure()
        evictions = sum(s.stats.evictions for s in sessions)
        for s in sessions:
            s.close()
    ratio = statistics.median(a / b for a, b in zip(ours, bare_rates))
    return {"sessions": n, "n_ctx": config.n_ctx, "tokens_per_session": tokens * rounds, "rounds": rounds,
            "evictions": evictions, "edgesink_tokens": counts,
            "edgesink_tokens_per_s": round(statistics.median(ours), 1),
            "bare_bindings_tokens_per_s": round(statistics.median(bare_rates), 1),
            "edgesink_over_bare": round(ratio, 3),
            "pair_ratios": [round(a / b, 3) for a, b in zip(ours, bare_rates)],
            "edgesink_rounds": [round(x, 1) for x in ours], "bare_rounds": [round(x, 1) for x in bare_rates]}


class _BareBindings:
    """n sequences in a context shaped as a SharedContext's, stepped through llama.cpp's bindings alone.

    Each step attends over as many cells as a full session's: a sequence's oldest token is removed
    (``llama_memory_seq_rm``, bookkeeping only) as its newest comes, and positions simply go on, so
    no key is rotated. A cache left to fill up instead would attend over fewer cells on average,
    and cost less per step than the sessions it is the ceiling of."""

    def __init__(self, model, config, n: int):
        self.model, self.n = model, n
        params = context_params(model, config)
        params.n_ctx, params.n_seq_max, params.kv_unified = config.n_ctx * n, n, False
        params.n_batch = params.n_ubatch = max(512, n)
        self.n_batch = params.n_batch
        self.ctx = C.llama_init_from_model(model.handle, params)
        self.batch = C.llama_batch_init(params.n_batch, 0, 1)

    def _decode(self, items) -> None:  # [(token, pos, seq, logits)]
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        assert C.llama_decode(self.ctx, b) == 0

    def _argmax(self, i: int) -> int:
        return int(np.argmax(np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, i), shape=(self.model.n_vocab,))))

    def fill(self, prefixes: list[list[int]]) -> None:
        self.next_pos, self.last = [], []
        for seq, prefix in enumerate(prefixes):
            for at in range(0, len(prefix), self.n_batch):
                piece = prefix[at:at + self.n_batch]
                self._decode([(t, at + j, seq, at + j == len(prefix) - 1) for j, t in enumerate(piece)])
            self.next_pos.append(len(prefix))
            self.last.append(self._argmax(-1))
        self.oldest = [0] * len(prefixes)

    def rate(self, steps: int) -> float:
        """Tokens/s of ``steps`` greedy steps of every sequence, one llama_decode each."""
        start = time.perf_counter()
        mem = C.llama_get_memory(self.ctx)
        for _ in range(steps):
            for seq in range(self.n):  # room for the new token: the cache stays as full as a session's
                C.llama_memory_seq_rm(mem, seq, self.oldest[seq], self.oldest[seq] + 1)
                self.oldest[seq] += 1
            self._decode([(self.last[seq], self.next_pos[seq], seq, True) for seq in range(self.n)])
            self.next_pos = [p + 1 for p in self.next_pos]
            self.last = [self._argmax(i) for i in range(self.n)]
        return self.n * steps / (time.perf_counter() - start)

    def __enter__(self) -> "_BareBindings":
        return self

    def __exit__(self, *exc) -> None:
        C.llama_batch_free(self.batch)
        C.llama_free(self.ctx)


def fairness(model, config, prompt_tokens: int, generators: int) -> dict:
    """How much a long prompt delays generating sessions of the same shared context, and they it."""
    progress(f"fairness: a {prompt_tokens}-token prompt beside {generators} generating sessions")
    prompt = model.tokenize(prose_message(model, prompt_tokens + 50, 7))[:prompt_tokens]
    with SharedContext(model, config, slots=generators + 1) as shared:
        feeder = Session(model, config, context=shared)
        chunks = []  # each chunk's time alone: a chunk costs more as the cache fills
        for at in range(0, len(prompt), config.batch_size):  # as feed_tokens feeds it: batch_size at a time
            start = time.perf_counter()
            feeder.feed_tokens(prompt[at:at + config.batch_size])
            chunks.append(time.perf_counter() - start)
        alone_s = sum(chunks)
        feeder.reset()
        sessions = [Session(model, config, context=shared) for _ in range(generators)]
        for i, s in enumerate(sessions):
            s.feed(prose_message(model, 200, i))
        feeding, times = threading.Event(), [[] for _ in sessions]

        def generate(i, until):
            for chunk in sessions[i].stream_generate(100_000, seed=i + 1):
                times[i].append(time.perf_counter())
                if until():
                    return

        steps_until = time.perf_counter() + 3.0  # generating alone first: one step's gap
        _together(lambda i: generate(i, lambda: time.perf_counter() > steps_until), generators)
        step_s = statistics.median(b - a for t in times for a, b in zip(t, t[1:]))
        times = [[] for _ in sessions]
        threads = [threading.Thread(target=generate, args=(i, lambda: not feeding.is_set())) for i in range(generators)]
        feeding.set()
        for t in threads:
            t.start()
        time.sleep(0.5)  # every generator is stepping before the prompt arrives
        decodes, requests = shared.decodes, shared.decoded_requests
        start = time.perf_counter()
        feeder.feed_tokens(prompt)
        together_s = time.perf_counter() - start
        end = time.perf_counter()
        decodes, requests = shared.decodes - decodes, shared.decoded_requests - requests
        feeding.clear()
        for t in threads:
            t.join()
        gaps = sorted(b - a for t in times for a, b in zip(t, t[1:]) if start <= a and b <= end)
        for s in [feeder, *sessions]:
            s.close()
    p99, chunk_p99 = _p99(gaps), _p99(chunks)
    return {"prompt_tokens": len(prompt), "generators": generators, "chunk_tokens": config.batch_size,
            "prompt_alone_s": round(alone_s, 2), "prompt_beside_generators_s": round(together_s, 2),
            "prompt_speed_ratio": round(alone_s / together_s, 3),
            "decodes_while_feeding": decodes, "requests_per_decode": round(requests / max(1, decodes), 2),
            "chunk_alone_median_ms": round(statistics.median(chunks) * 1e3, 1),
            "chunk_alone_p99_ms": round(chunk_p99 * 1e3, 1), "step_ms": round(step_s * 1e3, 1),
            "gaps_while_feeding": len(gaps), "p50_gap_ms": round(1e3 * statistics.median(gaps), 1),
            "p99_gap_ms": round(p99 * 1e3, 1),
            # The same percentile on both sides: a chunk at a full cache (most of a 4,000-token prompt) costs most.
            "p99_gap_over_p99_chunk_plus_step": round(p99 / (chunk_p99 + step_s), 3),
            "p50_gap_over_median_chunk_plus_step": round(statistics.median(gaps) / (statistics.median(chunks) + step_s), 3)}


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


SOAK_WORDS = ["apples", "rivers", "violins", "glaciers", "lanterns", "falcons", "copper", "tulips", "comets",
              "pianos", "deserts", "harbors", "meadows", "volcanoes", "lighthouses", "orchids"]


def soak(model, config, port, clients: int, slots: int, seconds: float, reply_tokens: int, seed: int = 7) -> dict:
    """``clients`` named conversations on ``slots`` < clients slots for ``seconds``; a quarter of the requests
    are abandoned by their client after two streamed pieces. Then every request must have been answered
    exactly once (or refused with a status), each conversation's messages must be its client's history,
    and its cells (llama.cpp's, read back after a restore) must hold exactly its own tokens."""
    progress(f"soak: {clients} clients on {slots} slots for {seconds:g} s, n_ctx {config.n_ctx}")
    folder = tempfile.TemporaryDirectory(prefix="edgesink-soak-")
    stop = start_server(model, config, slots, port, folder.name)
    deadline = time.monotonic() + seconds
    logs = [[] for _ in range(clients)]
    histories = [[{"role": "system", "content": f"You talk only about {SOAK_WORDS[i]}."}] for i in range(clients)]
    try:
        _together(lambda i: _soak_client(port, i, histories[i], logs[i], deadline, reply_tokens,
                                         random.Random(seed + i)), clients)
    finally:
        stop()
    outcomes = [entry for log in logs for entry in log]
    ids = [e["id"] for e in outcomes if e.get("id")]
    report = {"clients": clients, "slots": slots, "seconds": seconds, "n_ctx": config.n_ctx,
              "requests": len(outcomes), "answered": sum(e["outcome"] == "answered" for e in outcomes),
              "abandoned_by_client": sum(e["outcome"] == "abandoned" for e in outcomes),
              "refused": {str(k): v for k, v in sorted(collections.Counter(e["status"] for e in outcomes
                                                                          if e["outcome"] == "refused").items())},
              "lost": sum(e["outcome"] == "lost" for e in outcomes),
              "answered_twice": len(ids) - len(set(ids)) + sum(e.get("done_events", 1) > 1 for e in outcomes)}
    report.update(_check_soaked_conversations(model, config, folder.name, histories))
    folder.cleanup()
    return report


def _soak_client(port, i, history, log, deadline, reply_tokens, rng) -> None:
    """One client's turns until ``deadline``; its last turn is never abandoned, so the conversation ends
    holding exactly ``history``."""
    turn = 0
    while True:
        last = time.monotonic() > deadline
        turn += 1
        history.append({"role": "user", "content": f"Tell me one more thing about {SOAK_WORDS[i]} (turn {turn})."})
        abandon = not last and rng.random() < 0.25
        entry = _soak_request(port, f"soak-{i}", history, reply_tokens, seed=rng.randrange(1 << 30), abandon=abandon)
        log.append(entry)
        if entry["outcome"] == "answered":
            history.append({"role": "assistant", "content": entry["text"]})
        else:
            history.pop()  # not answered (or not waited for): the client asks something else next
        if last and entry["outcome"] == "answered":
            return
        if last and len(log) > 1000:
            raise RuntimeError(f"client {i} got no answer to its last turn: {entry}")


def _soak_request(port, session, history, max_tokens, seed, abandon) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = {"model": "bench", "messages": history, "max_tokens": max_tokens, "stream": True, "seed": seed,
            "temperature": 0.8}
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body),
                           headers={"content-type": "application/json", "x-edgesink-session": session})
        response = connection.getresponse()
        if response.status != 200:
            response.read()
            return {"outcome": "refused", "status": response.status}
        pieces, ids, done_events = [], set(), 0
        for line in response:
            if line.strip() == b"data: [DONE]":
                done_events += 1
                continue
            if not line.startswith(b"data: "):
                continue
            event = json.loads(line[6:])
            ids.add(event.get("id"))
            for choice in event.get("choices", []):
                pieces.append(choice["delta"].get("content") or "")
            if abandon and len(pieces) >= 2:
                connection.sock.close()  # the client goes away mid-reply
                return {"outcome": "abandoned"}
        if done_events != 1 or len(ids) != 1:
            return {"outcome": "lost", "done_events": done_events, "ids": len(ids)}
        return {"outcome": "answered", "id": ids.pop(), "text": "".join(pieces), "done_events": done_events}
    except (OSError, http.client.HTTPException) as error:
        return {"outcome": "lost", "error": repr(error)}
    finally:
        connection.close()


def _check_soaked_conversations(model, config, folder, histories) -> dict:
    """Each saved conversation, restored: its messages are its client's history, and each of its cells
    holds the token its bookkeeping names (by the first layer's V row, which only the token decides)."""
    problems, cells, tokens_by_conversation = [], 0, []
    for i, history in enumerate(histories):
        with Session.restore(f"{folder}/soak-{i}.session", model, n_threads=config.n_threads) as session:
            held = [(m["role"], m["content"].strip()) for m in session.messages]
            if held != [(m["role"], m["content"].strip()) for m in history]:
                problems.append(f"conversation {i}: its messages are not its client's history")
            text = model.detokenize(session.cached_tokens())
            foreign = [w for j, w in enumerate(SOAK_WORDS[:len(histories)]) if j != i and w in text]
            if foreign:
                problems.append(f"conversation {i} holds words of others: {foreign}")
            positions, values = seqstate.first_layer_values(session.cache.slot.state_get())
            tokens_by_conversation.append((session.cached_tokens(), positions, values))
    reference = _first_layer_rows(model, sorted({t for tokens, _, _ in tokens_by_conversation for t in tokens}))
    worst = 0.0
    for i, (tokens, positions, values) in enumerate(tokens_by_conversation):
        order = np.argsort(positions)
        if len(tokens) != len(positions) or np.any(np.diff(positions[order]) != 1):
            problems.append(f"conversation {i}: {len(positions)} cells for {len(tokens)} tokens, or positions not consecutive")
            continue
        for token, row in zip(tokens, values[order]):
            worst = max(worst, float(np.abs(reference[token] - row).max()))
        cells += len(tokens)
    rows = np.stack(list(reference.values()))
    nearest = min(float(np.abs(rows[a] - rows[b]).max()) for a in range(len(rows)) for b in range(a + 1, len(rows)))
    if worst > nearest / 10:
        problems.append(f"a cell's V row differs from its token's by {worst:.3g} (two tokens differ by {nearest:.3g})")
    return {"cells_checked": cells, "distinct_tokens": len(reference),
            "largest_cell_difference_from_its_token": worst, "smallest_difference_between_two_tokens": nearest,
            "problems": problems}


def _first_layer_rows(model, tokens: list[int]) -> dict[int, np.ndarray]:
    """Each token's first-layer V row, from a lone session fed them all."""
    config = SessionConfig.of(n_ctx=max(256, len(tokens) + 1), policy="dense")
    with Session(model, config) as session:
        session.feed_tokens(tokens)
        positions, values = seqstate.first_layer_values(session.cache.slot.state_get())
        cached = session.cached_tokens()
    return {token: row for token, row in zip(cached, values[np.argsort(positions)])}


def long_chat(model, config, port, sessions_dir, turns: int, reply_tokens: int) -> dict:
    stop = start_server(model, config, 2, port, sessions_dir)
    history = [{"role": "system", "content": "You are a friendly assistant who answers briefly."}]
    fed, seconds, evicted = [], [], []
    try:
        for turn in range(turns):
            if turn % 20 == 0:
                progress(f"long chat: turn {turn}")
            history.append({"role": "user", "content": f"Tell me one thing about the number {turn}."})
            reply = chat(port, "long", history, reply_tokens, seed=turn)
            history.append({"role": "assistant", "content": reply["text"]})
            fed.append(reply["usage"]["prompt_tokens"])
            seconds.append(reply["end"] - reply["start"])
            evicted.append(reply["usage"]["evicted_tokens"])
    finally:
        stop()
    # Until the cache is full a turn costs more as it fills (attention, the snapshot); after, it must not.
    full = next((i for i, n in enumerate(evicted) if n), None)
    if full is None or turns - full < 4:
        raise SystemExit(f"the chat filled its cache only at turn {full} of {turns}: give more --turns")
    span = min(20, (turns - full) // 2)
    return {"turns": turns, "history_characters_at_end": sum(len(m["content"]) for m in history),
            "evicted_tokens": sum(evicted), "first_turn_with_eviction": full,
            "fed_tokens_first_turns_after_full": round(statistics.mean(fed[full:full + span]), 1),
            "fed_tokens_last_turns": round(statistics.mean(fed[-span:]), 1),
            "fed_tokens_max_after_first": max(fed[1:]),
            "seconds_first_turns_after_full": round(statistics.mean(seconds[full:full + span]), 3),
            "seconds_last_turns": round(statistics.mean(seconds[-span:]), 3),
            "turns_averaged": span,
            "fed_tokens_per_turn": fed, "seconds_per_turn": [round(s, 3) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--port", type=int, default=8471)
    parser.add_argument("--sessions-dir", default="/tmp/edgesink-bench-sessions",
                        help="The long chat's --sessions folder (saved after every turn, as a durable server does).")
    parser.add_argument("--parts", default="api,engine,throughput,chat,fairness",
                        help="Which parts to run: api (streaming over the API), engine (side by side), throughput "
                             "(against the bare bindings, at --throughput-n-ctx), chat (long chat), "
                             "fairness (a long prompt beside generating sessions), soak (clients that come and go, "
                             "more than the slots; not run unless named).")
    parser.add_argument("--throughput-n-ctx", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--soak-seconds", type=float, default=120.0)
    parser.add_argument("--soak-clients", type=int, default=16)
    parser.add_argument("--soak-slots", type=int, default=4)
    parser.add_argument("--soak-n-ctx", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=4000, help="fairness: the long prompt's length")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    model = edgesink.load(args.model)
    # As `edgesink serve` configures its sessions.
    config = served_config(model, SessionConfig.of(n_ctx=args.n_ctx, n_threads=args.threads))
    given = {k: " ".join(map(str, v)) if isinstance(v, list) else v for k, v in vars(args).items()}
    report = {"command": "benchmarks/serve.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items()
                                                           if v is not None and k != "json"),
              "model": model.path.name, "n_ctx": args.n_ctx, "threads": args.threads}
    if "api" in parts:
        report["over_the_api"] = concurrency_over_api(model, config, args.port, args.sessions, args.reply_tokens)
    if "engine" in parts:
        report["engine_side_by_side"] = [engine_side_by_side(model, config, n, args.reply_tokens) for n in args.sessions]
    if "throughput" in parts:
        report["batching_throughput"] = [
            batching_throughput(model, dataclasses.replace(config, n_ctx=n_ctx), n, args.reply_tokens)
            for n_ctx in args.throughput_n_ctx for n in args.sessions]
    if "chat" in parts:
        progress("long chat")
        report["long_chat"] = long_chat(model, config, args.port + 1, args.sessions_dir, args.turns, 32)
    if "fairness" in parts:
        report["fairness"] = fairness(model, config, args.prompt_tokens, 4)
    if "soak" in parts:
        report["soak"] = soak(model, dataclasses.replace(config, n_ctx=args.soak_n_ctx), args.port,
                              args.soak_clients, args.soak_slots, args.soak_seconds, args.reply_tokens // 3)
    publish(report, args.json)


if __name__ == "__main__":
    main()
