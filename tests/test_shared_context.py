"""Sessions sharing one llama.cpp context (a sequence each) compute what lone sessions compute, stay
apart, batch their decodes, and save files any session can load."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import edgesink
from edgesink import ClosedError, NoFreeSlotError, Session, SessionConfig, SettingsError, SharedContext

CONFIG = SessionConfig.of(n_ctx=256, shift_mode="window-back", n_threads=1, batch_size=32)
WORDS = ["apples", "rivers", "violins", "glaciers", "lanterns", "falcons", "copper", "tulips"]
TEXTS = [f"Session {i} speaks of {word} and only of {word}. " * 25 for i, word in enumerate(WORDS)]


def lone_result(model, text: str, config=CONFIG):
    with Session(model, config) as s:
        s.feed(text)
        return s.next_logits(), s.generate_text(12, temperature=0), s.cached_tokens()


def run_together(shared: SharedContext, model, texts, config=CONFIG):
    """Feed and generate in every text's session at once, each from its own thread."""
    results, errors = [None] * len(texts), []

    def work(i):
        try:
            with Session(model, config, context=shared) as s:
                s.feed(texts[i])
                results[i] = (s.next_logits(), s.generate_text(12, temperature=0), s.cached_tokens())
        except Exception as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_eight_sessions_decoded_together_compute_what_each_computes_alone(model):
    """Past their window (eviction, shifts), eight concurrent streams give bitwise a lone session's
    logits and text, hold only their own tokens, and share decodes (fewer calls than requests)."""
    alone = [lone_result(model, text) for text in TEXTS]
    with SharedContext(model, CONFIG, slots=8) as shared:
        together = run_together(shared, model, TEXTS)
        assert shared.decoded_requests > shared.decodes * 1.5, (shared.decodes, shared.decoded_requests)
    for i, ((logits, text, cached), (logits2, text2, cached2)) in enumerate(zip(alone, together)):
        assert np.array_equal(logits, logits2), i
        assert text == text2
        assert cached == cached2  # isolation: exactly its own tokens, none of another stream's
    for i, (_, _, cached) in enumerate(together):
        cached_text = model.detokenize(cached)
        assert [w for w in WORDS if w in cached_text] == [WORDS[i]]


def test_saved_files_move_between_shared_and_lone_sessions(model, tmp_path):
    with SharedContext(model, CONFIG, slots=3) as shared:
        occupant = Session(model, CONFIG, context=shared)  # another stream in the context, sequence 0
        occupant.feed(TEXTS[1])
        with Session(model, CONFIG, context=shared) as s:
            s.feed(TEXTS[0])
            s.save(tmp_path / "shared.session")
            expected = s.next_logits()
        restored_lone = Session.restore(tmp_path / "shared.session", model, n_threads=1)
        assert np.array_equal(restored_lone.next_logits(), expected)
        restored_lone.feed(" And then")
        restored_lone.save(tmp_path / "lone.session")
        after = restored_lone.next_logits()
        restored_lone.close()
        back = Session.restore(tmp_path / "lone.session", model, n_threads=1, context=shared)
        assert back.cache.seq != 0 or occupant.cache.seq != 0
        assert np.array_equal(back.next_logits(), after)
        with Session(model, CONFIG) as lone:
            lone.feed(TEXTS[1])
            assert occupant.cached_tokens() == lone.cached_tokens()  # untouched by the restores
            assert np.array_equal(occupant.next_logits(), lone.next_logits())
        back.close()
        occupant.close()


def test_shared_context_refusals(model, gemma, monkeypatch):
    with SharedContext(model, CONFIG, slots=1) as shared:
        with monkeypatch.context() as m:  # a libllama without patch 0007 cannot re-encode in place
            m.setattr(edgesink._native, "patch_level", lambda: 6)
            with pytest.raises(SettingsError, match="in place"):
                Session(model, SessionConfig.of(n_ctx=256, shift_mode="kept-forward", n_threads=1), context=shared)
            with Session(model, SessionConfig.of(n_ctx=256, n_threads=1), context=shared) as auto:
                assert not auto.kept_forward
        with pytest.raises(SettingsError, match="n_ctx"):
            Session(model, SessionConfig.of(n_ctx=512, shift_mode="window-back", n_threads=1), context=shared)
        first = Session(model, CONFIG, context=shared)
        with pytest.raises(NoFreeSlotError, match="close one first"):
            Session(model, CONFIG, context=shared)
        first.close()
        Session(model, CONFIG, context=shared).close()  # the slot came back
    with pytest.raises(SettingsError, match="slots"):
        SharedContext(model, CONFIG, slots=0)
    with SharedContext(gemma, CONFIG, slots=1) as shared:  # kept tokens cannot go in front of an SWA cache's window
        with pytest.raises(SettingsError, match="sliding-window"):
            Session(gemma, SessionConfig.of(n_ctx=256, shift_mode="kept-forward", n_threads=1), context=shared)


def test_closing_the_model_closes_the_shared_context_and_its_sessions(model_path):
    model = edgesink.load(model_path)
    shared = SharedContext(model, CONFIG, slots=2)
    s = Session(model, CONFIG, context=shared)
    s.feed("Hello there.")
    model.close()
    assert shared.ctx is None
    with pytest.raises(ClosedError):
        s.feed("more")
    s.close()
    shared.close()  # idempotent


KEPT_FORWARD = SessionConfig.of(n_ctx=64, shift_mode="kept-forward", n_threads=1, evict_chunk=1,
                                refresh_every=8, rebase_every=24)


@pytest.mark.parametrize("config", [
    SessionConfig.of(n_ctx=64, shift_mode="window-back", n_threads=1, evict_chunk=1), KEPT_FORWARD,
], ids=["window-back", "kept-forward"])
def test_a_shared_slot_evicting_one_token_at_a_time_matches_a_lone_session_at_every_step(random_model, config):
    """Every token a step, each past the window evicting exactly one: the shared slot (not sequence 0,
    beside another stream that evicts too) gives bitwise the lone session's next logits at every step.
    A sink moved wrongly in a shared slot shows here at once, not only after a large batched eviction.
    Kept-forward: the sinks move forward, are re-encoded in place in front of the window every 8
    shifts and rebased every 24 evictions, where the lone session re-encodes them in its scratch
    sequence."""
    tokens = random_model.tokenize(TEXTS[2] * 2)[:150]
    with SharedContext(random_model, config, slots=2) as shared, Session(random_model, config) as lone:
        occupant = Session(random_model, config, context=shared)
        occupant.feed(TEXTS[3])
        with Session(random_model, config, context=shared) as s:
            assert s.cache.seq == 1 and s.kept_forward == lone.kept_forward == (config is KEPT_FORWARD)
            for i, token in enumerate(tokens):
                s.feed_tokens([token]), lone.feed_tokens([token])
                occupant.feed_tokens([token])  # its cells move in the same K-shift as s's
                assert np.array_equal(s.next_logits(), lone.next_logits()), i
            assert s.stats.evictions == len(tokens) - 64 and s.stats.shifts == len(tokens) - 64
            assert s.cached_tokens() == lone.cached_tokens()
            if s.kept_forward:
                assert s.stats.refreshes >= 5 and s.stats.rebases >= 2
                assert (s.stats.refreshes, s.stats.rebases) == (lone.stats.refreshes, lone.stats.rebases)
        occupant.close()


def test_a_restored_shared_session_continues_as_one_never_saved(random_model, tmp_path, measured):
    """The restore is compared with a twin that was never saved, not only with the saver (which runs
    the same save code). A restore that re-decoded a wrong newest token stands far above the noise."""
    config = SessionConfig.of(n_ctx=64, shift_mode="window-back", n_threads=1, evict_chunk=1)
    tokens = random_model.tokenize(TEXTS[4] * 2)
    before, after = tokens[:100], tokens[100:140]
    with SharedContext(random_model, config, slots=2) as shared, Session(random_model, config) as twin:
        twin.feed_tokens(before)
        with Session(random_model, config, context=shared) as saver:
            saver.feed_tokens(before)
            saver.save(tmp_path / "s.session")
        with Session.restore(tmp_path / "s.session", random_model, context=shared, n_threads=1) as restored:
            noise = float(np.abs(restored.next_logits() - twin.next_logits()).max())
            for token in after:
                restored.feed_tokens([token]), twin.feed_tokens([token])
                noise = max(noise, float(np.abs(restored.next_logits() - twin.next_logits()).max()))
            assert restored.cached_tokens() == twin.cached_tokens()
        with Session(random_model, config) as wrong:  # what a restore that re-decoded another token gives
            wrong.feed_tokens(before[:-1] + [before[-2]])
            with Session(random_model, config) as right:
                right.feed_tokens(before)
                error = float(np.abs(wrong.next_logits() - right.next_logits()).max())
    measured("restored vs never-saved twin, max logit difference over 40 steps", f"{noise:.2e}")
    measured("a wrong newest token, max logit difference", f"{error:.2f}")
    assert noise < 1e-3 < error / 100


def test_both_kinds_of_slot_have_the_shape_a_stream_cache_needs(model):
    """OwnContext and SharedSlot, as sessions get them, hold every member of the ContextSlot Protocol:
    attributes as attributes, properties and methods with the Protocol's parameters."""
    import inspect

    from edgesink.contexts import ContextSlot

    members = {name for name in vars(ContextSlot) if not name.startswith("_")} | set(ContextSlot.__annotations__)
    assert {"ctx", "mem", "decode", "state_get", "state_set", "seq", "lock"} <= members
    with SharedContext(model, CONFIG, slots=2) as shared, Session(model, CONFIG) as own, \
            Session(model, CONFIG, context=shared) as served:
        for slot in (own.cache.slot, served.cache.slot):
            kind = type(slot).__name__
            for name in members:
                assert hasattr(slot, name), f"{kind} lacks {name}"
                wanted = inspect.getattr_static(ContextSlot, name, None)
                if inspect.isfunction(wanted):
                    assert list(inspect.signature(getattr(slot, name)).parameters) == \
                        list(inspect.signature(wanted).parameters)[1:], f"{kind}.{name}"
            assert slot.ctx and slot.mem and slot.n_batch >= 1
