"""A real sliding-window (iSWA) model: Gemma 3 270M, whose local layers see only the last 512 tokens.

Its local layers' cache must be full size for the cache to shift (the session asks for it), and
both shift paths must act on both caches: streams far past the sliding window and past n_ctx.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgesink import Session, SessionConfig, SharedContext
from edgesink._native import C

N_CTX = 768  # larger than the 512-token sliding window, so both kinds of layers matter


@pytest.fixture(scope="module")
def gemma_tokens(gemma, prose):
    return gemma.tokenize(prose[:40_000])[:1400]  # past the window, and past n_ctx by 630 (BOS first)


def test_it_is_a_sliding_window_model(gemma):
    assert gemma.architecture == "gemma3" and gemma.n_swa == 512


@pytest.mark.slow(seconds=25)  # Gemma 3 270M through 2,200 tokens, on one CPU
def test_sink_streams_past_the_window_and_the_cache(gemma, gemma_tokens):
    with gemma.session(n_ctx=N_CTX, policy="sink") as s:
        s.feed_tokens(gemma_tokens)
        generated = [c.token for c in s.stream_generate(N_CTX + 50, top_k=1) if c.token is not None]
        stream = [gemma.bos_token] + gemma_tokens + generated  # Gemma asks for a BOS: the stream begins with it
        assert len(generated) > N_CTX  # generation alone passed n_ctx (no end token in greedy prose)
        assert s.cached_tokens() == stream[:4] + stream[-(N_CTX - 4):]
        assert s.stats.tokens_in_cache == N_CTX and s.stats.evictions == len(stream) - N_CTX
        # llama.cpp's newest cell is the session's newest token, n_ctx - 1 positions after the sinks
        assert C.llama_memory_seq_pos_max(s.cache.mem, 0) == s.stats.last_position
        assert s.stats.last_position - (s.cache.w0 - 4) == N_CTX - 1
        assert np.isfinite(s.next_logits()).all()


@pytest.mark.slow(seconds=40)  # Gemma 3 270M scoring 1,400 tokens twice, on one CPU
def test_both_shift_paths_agree_on_both_caches(gemma, gemma_tokens):
    """Sinks moved forward and window moved back give the same scores, past the sliding window.

    Had either path shifted one kind of layer wrongly (the local layers rotate with another RoPE
    base), its perplexity would part from the other's by far more than rounding.
    """
    ppl, last = {}, {}
    for mode in ("kept-forward", "window-back"):
        with gemma.session(n_ctx=N_CTX, policy="sink", shift_mode=mode) as s:
            nll = s.score_tokens(gemma_tokens)
            last[mode] = s.next_logits()
            assert s.stats.evictions == 1 + len(gemma_tokens) - N_CTX  # the BOS fed before them
        ppl[mode] = float(np.exp(nll[N_CTX:].mean()))  # only tokens scored after evictions began
    assert abs(ppl["kept-forward"] / ppl["window-back"] - 1) < 0.01, ppl
    assert last["kept-forward"].argmax() == last["window-back"].argmax()


@pytest.mark.slow(seconds=60)  # Gemma 3 270M through 1,100 tokens twice, on one CPU
def test_shared_gemma_sessions_compute_what_lone_ones_do_and_saves_move_between_them(gemma, gemma_tokens, tmp_path):
    """Past the sliding window and past n_ctx, a shared slot (beside another stream) gives bitwise the logits
    of a lone session. Its memory holds two caches, so its saved state has two sections: a save moves from
    the shared slot to a lone session and back. Shared Gemma streams move the window back ('auto'): kept
    tokens written in front of the window would be dropped by llama.cpp's SWA cache."""
    config = SessionConfig.of(n_ctx=N_CTX, policy="sink", n_threads=1)
    lone_config = SessionConfig.of(n_ctx=N_CTX, policy="sink", n_threads=1, shift_mode="window-back")
    with SharedContext(gemma, config, slots=2) as shared, Session(gemma, lone_config) as lone:
        occupant = Session(gemma, config, context=shared)
        occupant.feed_tokens(gemma_tokens[1200:1400])
        with Session(gemma, config, context=shared) as s:
            assert s.cache.seq == 1 and not s.kept_forward
            s.feed_tokens(gemma_tokens[:1000]), lone.feed_tokens(gemma_tokens[:1000])
            assert s.stats.evictions == lone.stats.evictions > 200
            assert np.array_equal(s.next_logits(), lone.next_logits())
            assert s.generate_text(12, top_k=1) == lone.generate_text(12, top_k=1)
            s.save(tmp_path / "shared.session")
            expected = s.next_logits()
        with Session.restore(tmp_path / "shared.session", gemma, n_threads=1) as restored:
            assert np.array_equal(restored.next_logits(), expected)
            restored.feed_tokens(gemma_tokens[1000:1040])
            restored.save(tmp_path / "lone.session")
            after, cached_after = restored.next_logits(), restored.cached_tokens()
        with Session.restore(tmp_path / "lone.session", gemma, n_threads=1, context=shared) as back:
            assert np.array_equal(back.next_logits(), after)
            assert back.cached_tokens() == cached_after
        occupant.close()
