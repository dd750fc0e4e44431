"""Every bad parameter of the engine is a ValueError with a message, before anything breaks.

Found while writing these: ``n_threads=100000`` made llama.cpp crash (SIGSEGV; ggml allows 512),
``flash_attn="yes"`` was a KeyError, ``evict_chunk=0`` and ``sinks`` given to ``window`` were
silently ignored, ``stop="\\n\\n"`` stopped at a single newline, and ``feed(5)`` fed five NUL bytes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import edgesink
from edgesink import ModelLoadError, ModelNotFoundError, Session

SESSION_CASES = {
    "n_ctx 0": (dict(n_ctx=0), "n_ctx"),
    "n_ctx 1": (dict(n_ctx=1), "n_ctx"),
    "n_ctx str": (dict(n_ctx="64"), "n_ctx"),
    "n_ctx float": (dict(n_ctx=64.0), "n_ctx"),
    "n_ctx bool": (dict(n_ctx=True), "n_ctx"),
    "n_ctx beyond training": (dict(n_ctx=8193), "trained on"),
    "sinks negative": (dict(sinks=-1), "sinks"),
    "sinks = n_ctx": (dict(n_ctx=64, sinks=64), "sinks"),
    "sinks str": (dict(sinks="4"), "sinks"),
    "sinks for window": (dict(policy="window", sinks=4), "keeps no sinks"),
    "sinks for dense": (dict(policy="dense", sinks=4), "keeps no sinks"),
    "sinks for recompute": (dict(policy="recompute", sinks=2), "keeps no sinks"),
    "evict_chunk 0": (dict(evict_chunk=0), "evict_chunk"),
    "evict_chunk negative": (dict(evict_chunk=-1), "evict_chunk"),
    "evict_chunk beyond window": (dict(n_ctx=64, evict_chunk=100), "evict_chunk"),
    "evict_chunk for halve": (dict(policy="halve", evict_chunk=3), "evict_chunk"),
    "batch 0": (dict(batch_size=0), "batch_size"),
    "batch negative": (dict(batch_size=-1), "batch_size"),
    "batch larger than the window": (dict(n_ctx=64, batch_size=64), "batch"),
    "type_k unknown": (dict(type_k="f64"), "cache type"),
    "type_v unknown": (dict(type_v="q9"), "cache type"),
    "flash_attn str": (dict(flash_attn="yes"), "flash_attn"),
    "n_threads 0": (dict(n_threads=0), "n_threads"),
    "n_threads negative": (dict(n_threads=-1), "n_threads"),
    "n_threads str": (dict(n_threads="2"), "n_threads"),
    "n_threads beyond ggml's limit": (dict(n_threads=100_000), "n_threads"),
    "shift_mode unknown": (dict(shift_mode="sideways"), "shift_mode"),
    "refresh_every 0": (dict(refresh_every=0), "refresh_every"),
    "rebase_every 0": (dict(rebase_every=0), "rebase_every"),
    "policy unknown": (dict(policy="bogus"), "unknown policy"),
    "policy None": (dict(policy=None), "policy"),
}


@pytest.mark.parametrize("name", sorted(SESSION_CASES))
def test_bad_session_parameter(model, name):
    options, match = SESSION_CASES[name]
    options = {"n_ctx": 64, **options}
    with pytest.raises(ValueError, match=match):
        Session(model, **options)


SAMPLING_CASES = {
    "max_tokens 0": (dict(max_tokens=0), "max_tokens"),
    "max_tokens negative": (dict(max_tokens=-5), "max_tokens"),
    "max_tokens float": (dict(max_tokens=2.5), "max_tokens"),
    "temperature negative": (dict(temperature=-1), "temperature"),
    "temperature nan": (dict(temperature=math.nan), "temperature"),
    "temperature inf": (dict(temperature=math.inf), "temperature"),
    "temperature str": (dict(temperature="0.7"), "temperature"),
    "top_p 0": (dict(top_p=0), "top_p"),
    "top_p above 1": (dict(top_p=1.5), "top_p"),
    "top_p nan": (dict(top_p=math.nan), "top_p"),
    "top_k negative": (dict(top_k=-1), "top_k"),
    "top_k float": (dict(top_k=2.5), "top_k"),
    "min_p 1": (dict(min_p=1), "min_p"),
    "min_p negative": (dict(min_p=-0.1), "min_p"),
    "repeat_penalty 0": (dict(repeat_penalty=0), "repeat_penalty"),
    "repeat_last_n negative": (dict(repeat_last_n=-1), "repeat_last_n"),
    "seed negative": (dict(seed=-1), "seed"),
    "seed 2**32": (dict(seed=2**32), "seed"),
    "seed str": (dict(seed="1"), "seed"),
    "misspelt setting": (dict(temperatur=0.5), "unknown sampling"),
    "stop not strings": (dict(stop=[1, 2]), "stop"),
}


@pytest.fixture(scope="module")
def fed_session(model):
    with model.session(n_ctx=64, n_threads=1) as s:
        s.feed("The weather today is")
        yield s


@pytest.mark.parametrize("name", sorted(SAMPLING_CASES))
def test_bad_generation_parameter(fed_session, name):
    options, match = SAMPLING_CASES[name]
    before = fed_session.stats.tokens_seen
    with pytest.raises(ValueError, match=match):
        fed_session.generate_text(**{"max_tokens": 2, **options})
    with pytest.raises(ValueError, match=match):
        next(iter(fed_session.stream_generate(**{"max_tokens": 2, **options})))
    assert fed_session.stats.tokens_seen == before  # nothing was generated


def test_stop_string_is_one_string(fed_session):
    """A bare string is one stop string (it used to be a set of characters)."""
    def greedy(**options):
        fed_session.reset()
        fed_session.feed("1, 2, 3, 4, 5, 6, 7, 8,")
        return fed_session.generate_text(12, top_k=1, temperature=1.0, **options)

    reference = greedy()
    first = next(c for c in reference if not c.isspace())
    assert greedy(stop=first + "\x00") == reference  # its first character alone does not stop it
    assert greedy(stop=reference[2:5]) == reference[:2]


@pytest.mark.parametrize("tokens", [[-1], [49152], [2**40], [1.5], ["5"], [None], [np.float32(3)]])
def test_bad_token_ids(model, fed_session, tokens):
    before = fed_session.stats.tokens_seen
    for call in (fed_session.feed_tokens, fed_session.score_tokens):
        with pytest.raises(ValueError, match="token id"):
            call(tokens)
    assert fed_session.stats.tokens_seen == before


def test_token_ids_accept_numpy_integers(fed_session):
    assert fed_session.feed_tokens(np.array([10, 11], dtype=np.int32)) == 2


@pytest.mark.parametrize("bad", [-1, 49152, 10**9])
def test_bad_token_ids_in_the_vocabulary_api(model, bad):
    for call in (model.token_text, model.token_bytes, lambda t: model.detokenize([t])):
        with pytest.raises(ValueError, match="out of range"):
            call(bad)


def test_bad_score_positions_and_pins(model, fed_session):
    with pytest.raises(ValueError, match="positions"):
        fed_session.score_tokens([1, 2, 3], positions=[3])
    with pytest.raises(ValueError, match="positions"):
        fed_session.score_tokens([1, 2, 3], positions=[-1])
    with model.session(n_ctx=64, n_threads=1) as s:
        with pytest.raises(ValueError, match="pinned prefix"):
            s.pin_prefix(100)


def test_bad_chat_role(model):
    with model.session(n_ctx=256, n_threads=1) as s:
        with pytest.raises(ValueError, match="role"):
            list(s.chat("hi", role="root"))


def test_bad_model_parameters(model_path, tmp_path):
    with pytest.raises(ValueError, match="n_gpu_layers"):
        edgesink.load(model_path, n_gpu_layers="all")
    with pytest.raises(ValueError, match="check"):
        edgesink.load(model_path, check=True)
    with pytest.raises(ModelNotFoundError):
        edgesink.load(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match="directory"):
        edgesink.load(tmp_path)


def test_temperature_zero_is_greedy(fed_session):
    """temperature=0 is greedy, as in llama.cpp: the likeliest token, whatever the seed."""
    def continuation(**sampling):
        fed_session.reset()
        fed_session.feed("The weather today is")
        return fed_session.generate_text(10, **sampling)

    greedy = continuation(top_k=1, seed=1)
    assert continuation(temperature=0, seed=1) == continuation(temperature=0, seed=2) == greedy
    assert continuation(temperature=0.0, top_k=0, top_p=0.5, min_p=0.2) == greedy  # filters cannot change it


def test_greedy_takes_the_first_largest_logit_as_llama_cpps_greedy_sampler_does(model):
    """temperature=0 alone skips llama.cpp's token array (an argmax); it must pick what the sampler picks."""
    from edgesink.sampling import Sampler, SamplingParams

    rng = np.random.default_rng(3)
    rows = [rng.normal(size=model.n_vocab).astype(np.float32) for _ in range(20)]
    tied = np.zeros(model.n_vocab, dtype=np.float32)
    tied[[7, 900, 40000]] = 5.0  # a tie: the first of them
    for logits in rows + [tied]:
        with Sampler(SamplingParams.of(temperature=0), model) as fast, \
                Sampler(SamplingParams.of(temperature=0), model) as chain:
            chain._argmax_only = False  # through llama.cpp's greedy sampler
            assert fast.sample_logits(logits) == chain.sample_logits(logits) == int(np.argmax(logits))
    with Sampler(SamplingParams.of(temperature=0), model) as fast:
        assert fast.sample_logits(tied) == 7


def test_the_session_is_fine_after_all_that(fed_session):
    fed_session.reset()
    fed_session.feed("Once upon a time")
    assert fed_session.generate_text(3, seed=1)
