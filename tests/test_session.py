"""The streaming engine on the real model: what the cache holds, generation, scoring, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import edgesink
from edgesink import ContextFullError, Session
from edgesink._native import C


def assert_cache_consistent(s: Session, sinks: int):
    """The real llama.cpp cache agrees with the bookkeeping: kept + most recent, consecutive positions."""
    st = s.stats
    first, last = C.llama_memory_seq_pos_min(s.cache.mem, 0), C.llama_memory_seq_pos_max(s.cache.mem, 0)
    assert (first, last) == (st.first_position, st.last_position)
    assert last - first + 1 == st.tokens_in_cache <= s.n_ctx
    assert st.tokens_kept == min(sinks, st.tokens_seen)
    assert first == s.cache.w0 - s.cache.n_kept


@pytest.mark.parametrize("policy", ["sink", pytest.param("window", marks=pytest.mark.slow),
                                    pytest.param("halve", marks=pytest.mark.slow)])  # about 9 s each
def test_ten_times_n_ctx_through_feed_and_generate(model, prose_tokens, policy):
    n_ctx = 128
    sinks = 0 if policy == "window" else 4
    stream = prose_tokens[:10 * n_ctx]
    with model.session(n_ctx=n_ctx, policy=policy, batch_size=8) as s:
        for start in range(0, len(stream), 97):
            s.feed_tokens(stream[start:start + 97])
            assert_cache_consistent(s, sinks)
        cached = s.cached_tokens()
        assert cached[:sinks] == stream[:sinks]
        window = cached[sinks:]
        assert window == stream[len(stream) - len(window):]
        if policy != "halve":
            assert len(cached) == n_ctx
        generated = []
        for chunk in s.stream_generate(3 * n_ctx, top_k=1, seed=1):
            if chunk.token is not None:
                generated.append(chunk.token)
            assert_cache_consistent(s, sinks)
        st = s.stats
        assert st.tokens_seen == len(stream) + len(generated)
        assert st.evictions == st.tokens_seen - st.tokens_in_cache
        assert s.cached_tokens()[sinks:][-len(generated):] == generated[-(len(s.cached_tokens()) - sinks):] \
            or generated[-1] == s.cached_tokens()[-1]


def test_positions_stay_bounded_by_rebasing(model, prose_tokens):
    with model.session(n_ctx=32, policy="sink", batch_size=8) as s:
        s.feed_tokens(prose_tokens[:1000])
        st = s.stats
        assert st.rebases >= 25  # one per 32 evicted tokens
        assert st.last_position < 2 * 32 + 4
        assert_cache_consistent(s, 4)


def test_kept_tokens_are_refreshed_between_rebases(model, prose_tokens):
    with model.session(n_ctx=64, policy="sink", batch_size=4, refresh_every=16, rebase_every=10**6) as s:
        s.feed_tokens(prose_tokens[:600])
        st = s.stats
        assert st.rebases == 0 and st.refreshes == st.shifts // 16 and st.refreshes >= 8
        assert_cache_consistent(s, 4)


def test_generation_is_reproducible_and_ends(model):
    with model.session(n_ctx=256) as a, model.session(n_ctx=256) as b:
        for s in (a, b):
            s.feed("Once upon a time, in a small village by the sea,")
        first = a.generate_text(30, seed=42, temperature=0.9)
        assert first == b.generate_text(30, seed=42, temperature=0.9)
        chunks = list(a.stream_generate(5, seed=1))
        assert chunks[-1].finish_reason == "length" and sum(c.token is not None for c in chunks) == 5


def test_stop_strings_cut_the_text(model):
    with model.session(n_ctx=256) as s:
        s.feed("1, 2, 3, 4, 5, 6,")
        text = s.generate_text(40, top_k=1, stop=["9"])
        assert "9" not in text and text.strip().startswith("7")
        chunks = list(s.stream_generate(40, top_k=1, stop=[","]))
        assert chunks[-1].finish_reason == "stop_string"


def test_end_of_generation_token_ends_it(model):
    with model.session(n_ctx=256) as s:
        s.feed_tokens(model.tokenize("<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n", special=True))
        chunks = list(s.stream_generate(200, top_k=1))
        assert chunks[-1].finish_reason == "stop"
        assert model.is_end_of_generation(s.cached_tokens()[-1])


def test_endless_generation_passes_n_ctx_many_times(model):
    with model.session(n_ctx=64, policy="sink") as s:
        s.feed("The sea")
        seed = 3
        # an end-of-generation token ends a generate() call (which token comes first depends on the
        # CPU's kernels): start another, so the stream itself goes on past n_ctx many times
        while s.stats.tokens_seen <= 6 * 64:
            for _ in s.generate(None, seed=seed):
                if s.stats.tokens_seen > 6 * 64:
                    break
            seed += 1
        assert s.stats.evictions > 5 * 64 - 16
        assert_cache_consistent(s, 4)


def test_dense_raises_context_full_and_loses_nothing(model):
    with model.session(n_ctx=64, policy="dense") as s:
        s.feed_tokens(list(range(1000, 1060)))
        before = s.cached_tokens()
        with pytest.raises(ContextFullError, match="dense"):
            s.feed_tokens(list(range(2000, 2010)))
        assert s.cached_tokens() == before
        with pytest.raises(ContextFullError):
            s.generate_text(20)
        assert len(s.cached_tokens()) == 64


def test_score_reports_what_feed_computes(model, prose_tokens):
    tokens = prose_tokens[:400]
    with model.session(n_ctx=128, batch_size=8) as a, model.session(n_ctx=128, batch_size=8) as b, \
            model.session(n_ctx=1024, policy="dense", batch_size=8) as dense:
        nll = a.score_tokens(tokens)
        b.feed_tokens(tokens)
        assert np.array_equal(a.next_logits(), b.next_logits())
        assert a.cached_tokens() == b.cached_tokens()
        assert np.isnan(nll[0]) and np.all(np.isfinite(nll[1:]))
        # Before the first eviction every policy sees the same context as a dense cache.
        reference = dense.score_tokens(tokens)
        assert np.allclose(nll[1:120], reference[1:120], atol=1e-3)
        assert np.exp(np.mean(nll[1:])) < 100


def test_score_on_a_sample_of_positions(model, prose_tokens):
    tokens = prose_tokens[:300]
    positions = list(range(10, 300, 29))
    with model.session(n_ctx=128, batch_size=8) as a, model.session(n_ctx=128, batch_size=8) as b:
        full = a.score_tokens(tokens)
        sampled = b.score_tokens(tokens, positions=positions)
    assert np.allclose(full[positions], sampled[positions], atol=1e-4)
    assert np.isnan(np.delete(sampled, positions)).all()


def _nll_of(logits: np.ndarray, token: int) -> float:
    shifted = logits.astype(np.float64) - logits.max()
    return float(np.log(np.exp(shifted).sum()) - shifted[token])


def test_recompute_scores_each_token_on_a_fresh_window(model, prose_tokens):
    tokens = prose_tokens[:200]
    with model.session(n_ctx=64, policy="recompute") as s:
        nll = s.score_tokens(tokens, positions=[150, 199])
        assert s.stats.extra["rebuilds"] == 2
    # Token 150 as recompute sees it: the 64 tokens before it, encoded fresh at positions 0..63 in
    # an empty cache of the same size, in one batch as recompute decodes them (batch size changes
    # the kernels' rounding, enough to move an NLL by 0.02), and not what a streamed cache gives.
    with model.session(n_ctx=64, policy="dense", batch_size=64) as fresh:
        fresh.feed_tokens(tokens[150 - 64:150])
        expected = _nll_of(fresh.next_logits(), tokens[150])
    with model.session(n_ctx=64, policy="sink") as streamed:
        streamed.feed_tokens(tokens[:150])
        streamed_nll = _nll_of(streamed.next_logits(), tokens[150])
    assert nll[150] == pytest.approx(expected, abs=1e-3)
    assert abs(streamed_nll - expected) > 1e-3


def test_bytes_split_across_feeds_are_joined(model):
    text = "Grüße — 東京 🎉🚀 ok"  # characters of 2, 3 and 4 bytes
    data = text.encode()
    with model.session(n_ctx=64, batch_size=32) as split:  # cuts, not batching, are the point here
        for cut in range(1, len(data)):  # every cut, inside ü, inside 東, inside an emoji included
            split.reset()
            split.feed(data[:cut])
            split.feed(data[cut:])
            assert model.detokenize(split.cached_tokens()) == text, cut


def test_generated_pieces_never_hold_half_a_character(model):
    samples_with_split_characters = 0
    with model.session(n_ctx=256) as s:
        for seed in range(1, 5):
            s.reset()
            s.feed("日本語で答えてください。東京は")
            n_prompt = len(s.cached_tokens())
            pieces = list(s.generate(40, seed=seed, temperature=1.0))
            generated = s.cached_tokens()[n_prompt:]
            raw = b"".join(model.token_bytes(t) for t in generated)
            # Had any piece ended inside a character, its bytes would have become U+FFFD on their own
            # and the joined pieces would differ from decoding the whole byte stream at once.
            assert "".join(pieces) == raw.decode("utf-8", "replace")
            samples_with_split_characters += any(
                not model.token_bytes(t).decode("utf-8", "ignore") for t in generated)
    assert samples_with_split_characters, "no sample held a token carrying part of a character"


# Prompts whose greedy continuations differ, so that a session given another's cache would show.
PROMPTS = ["The capital of France is", "1, 2, 3, 4, 5,", "Roses are red, violets are", "def add(a, b):\n    return"]


def greedy_alone(model, prompt: str) -> str:
    """What a lone fresh session makes of ``prompt`` (greedy, 6 tokens)."""
    with model.session(n_ctx=64, n_threads=1) as s:
        s.feed(prompt)
        return s.generate_text(6, top_k=1)


def test_one_model_backs_many_sessions(model):
    """Sessions of one model stay separate: generating in turns, one token each, every session
    continues its own prompt exactly as a lone session would."""
    sessions = [model.session(n_ctx=64, n_threads=1) for _ in PROMPTS]
    try:
        for s, prompt in zip(sessions, PROMPTS):
            s.feed(prompt)
        streams = [s.stream_generate(6, top_k=1) for s in sessions]
        texts, running = ["" for _ in sessions], set(range(len(sessions)))
        while running:  # one chunk from each session in turn
            for i in sorted(running):
                chunk = next(streams[i], None)
                if chunk is None:
                    running.remove(i)
                else:
                    texts[i] += chunk.text
        cached = [s.cached_tokens() for s in sessions]
    finally:
        for s in sessions:
            s.close()
    assert texts == [greedy_alone(model, prompt) for prompt in PROMPTS]
    assert len(set(texts)) == len(PROMPTS)  # different inputs, different continuations: a mix-up would show
    for prompt, tokens in zip(PROMPTS, cached):
        assert tokens[:len(model.tokenize(prompt))] == model.tokenize(prompt)


def test_session_takes_a_loaded_model_and_says_how_to_load_a_path(model_path):
    with pytest.raises(TypeError, match=r"edgesink\.load\("):
        edgesink.Session(model_path, n_ctx=64)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is a Linux API")
def test_default_threads_follow_the_cpus_this_process_may_use(model_path):
    """Threads beyond the usable CPUs spin-wait for each other: a container's cpuset, not the host's cores."""
    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from edgesink import load; from edgesink._native import C; "
            "m = load(sys.argv[1], check='none'); s = m.session(n_ctx=64); "
            "print(C.llama_n_threads(s.cache.ctx), C.llama_n_threads_batch(s.cache.ctx))")
    out = subprocess.run([sys.executable, "-c", code, str(model_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]
    with edgesink.load(model_path, check="none") as m, Session(m, n_ctx=64) as s:
        assert C.llama_n_threads(s.cache.ctx) == len(os.sched_getaffinity(0))
