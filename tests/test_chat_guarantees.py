"""What chat guarantees at the edges, on the real models: turn-aligned evictions for every
policy, the system prompt kept (recompute too) and checked up front, templates that re-render
history, chat after a plain stream, /reset, and BOS for models that want one."""

from __future__ import annotations


import numpy as np
import pytest

from edgesink.chat import TemplateRewriteError
from edgesink.cli.chat import run_command
from edgesink.errors import SystemPromptTooLongError

SYSTEM = "You are a pirate. Always answer like a pirate."


def system_tokens(model, system=SYSTEM):
    return (model.tokenize("<|im_start|>system\n", special=True) + model.tokenize(system)
            + model.tokenize("<|im_end|>\n", special=True))


def window_starts_a_turn(model, session) -> bool:
    """After the kept tokens (sinks or the pinned system prompt) the cache begins a user turn."""
    kept = session.stats.tokens_kept
    return session.cached_tokens()[kept:kept + 2] == model.tokenize("<|im_start|>user", special=True)


def user_turn_start(model, session, tokens_before: int) -> int:
    """The stream index where the user turn of the newest exchange begins (it is all cached)."""
    new = session.cached_tokens()[tokens_before - session.stats.tokens_seen:]
    marker = model.tokenize("<|im_start|>user", special=True)
    return tokens_before + next(i for i in range(len(new)) if new[i:i + len(marker)] == marker)


def assert_only_what_did_not_fit_left(session, user_starts: list[int], slack: int) -> None:
    """A lower bound on the history kept: the cut moves to a turn, but no further than needed.

    The newest turn that left the cache could not have stayed: from its start to the end of the
    stream there are more tokens than the window holds, less ``slack``, what the policy evicts
    at once beyond what is needed (chunk - 1; half the window for halve). An eviction that
    dropped every older turn, or one turn too many, fails this.
    """
    st = session.stats
    window_start = st.tokens_seen - (st.tokens_in_cache - st.tokens_kept)
    gone = [start for start in user_starts if start < window_start]
    if gone:
        assert st.tokens_seen - gone[-1] > session.n_ctx - st.tokens_kept - slack, (gone[-1], window_start)


# -- 7: evictions cut between turns, for every policy that evicts --------------------------------

@pytest.mark.parametrize("options", [{"policy": "sink"}, pytest.param({"policy": "window"}, marks=pytest.mark.slow),
                                     pytest.param({"policy": "halve"}, marks=pytest.mark.slow),  # 6 s each
                                     {"policy": "sink", "evict_chunk": 16},
                                     pytest.param({"policy": "recompute"}, marks=pytest.mark.slow)],  # 15 s
                         ids=["sink", "window", "halve", "sink-chunk16", "recompute"])
def test_the_window_starts_at_a_turn_after_every_turn(model, options):
    n_ctx = 64 if options["policy"] == "recompute" else 128  # recompute re-encodes the window per token
    with model.session(n_ctx=n_ctx, n_threads=1, **options) as s:
        s.start_chat(SYSTEM)
        kept = system_tokens(model)
        slack = {"halve": (n_ctx - len(kept)) // 2}.get(options["policy"], options.get("evict_chunk", 1) - 1)
        turn, long_turn_seen, user_starts = 0, False, []
        while s.stats.tokens_seen < 5 * n_ctx:
            long_turn = turn == 6  # one message longer than the whole window
            message = " ".join(["word"] * (n_ctx + 20)) if long_turn else f"Question {turn}: " + "why " * (turn % 5)
            before = s.stats.tokens_seen
            "".join(s.chat(message, max_tokens=4 if long_turn else n_ctx // 12, seed=turn))
            # the long turn no longer sits whole in the cache: its call's start stands in (no later than its own)
            user_starts.append(before if long_turn else user_turn_start(model, s, before))
            assert s.cached_tokens()[:len(kept)] == kept, turn  # the persona stays, whole
            assert s.stats.tokens_in_cache <= n_ctx
            if long_turn:  # the documented exception: the turn itself is cut from its oldest end
                assert s.stats.evictions > 0 and not window_starts_a_turn(model, s)
                long_turn_seen = True
            else:
                assert window_starts_a_turn(model, s), (turn, model.detokenize(s.cached_tokens()[len(kept):][:8]))
                assert_only_what_did_not_fit_left(s, user_starts, slack)
            turn += 1
        assert long_turn_seen and s.stats.evictions > 3 * n_ctx


# -- 1: recompute keeps the system prompt ---------------------------------------------------------

@pytest.mark.slow  # about 9 s: recompute re-encodes the window per token
def test_recompute_keeps_the_system_prompt_in_what_it_encodes(model):
    n_ctx = 48  # small: every generated token re-encodes the whole cache
    kept = system_tokens(model)
    with model.session(n_ctx=n_ctx, policy="recompute", n_threads=1) as s:
        s.start_chat(SYSTEM)
        turn = 0
        while s.stats.tokens_seen < 5 * n_ctx + 16:
            "".join(s.chat(f"Ship {turn}?", max_tokens=4, seed=turn))
            assert s.cached_tokens()[:len(kept)] == kept
            turn += 1
        assert s.stats.evictions > 4 * n_ctx and s.stats.tokens_kept == len(kept)
        logits = s.next_logits()
        assert s.cache.llama_pos_range() == (0, s.stats.tokens_in_cache - 1)  # the whole cache was encoded
        # The same tokens encoded from scratch in one batch, as a rebuild does: the same logits.
        with model.session(n_ctx=n_ctx, policy="dense", batch_size=n_ctx, n_threads=1) as fresh:
            fresh.feed_tokens(s.cached_tokens())
            assert np.abs(fresh.next_logits() - logits).max() <= 1e-4


# -- 3: a system prompt that does not fit --------------------------------------------------------

def test_a_system_prompt_longer_than_half_the_cache_is_refused_up_front(model):
    with model.session(n_ctx=128, n_threads=1) as s:
        with pytest.raises(SystemPromptTooLongError, match="with n_ctx 128 it may take at most 64"):
            s.start_chat("Rule. " * 100)
        s.start_chat(SYSTEM)
        "".join(s.chat("Hello there", max_tokens=6, seed=1))
        before = (s.messages, s.cached_tokens(), s.stats.tokens_seen)
        with pytest.raises(SystemPromptTooLongError):
            s.start_chat("Rule. " * 100)
        assert (s.messages, s.cached_tokens(), s.stats.tokens_seen) == before  # the old chat is untouched
        "".join(s.chat("Still a pirate?", max_tokens=4, seed=2))
        assert s.system_prompt == SYSTEM and len(s.messages) == 5


def test_slash_system_too_long_keeps_the_chat(model, capsys):
    with model.session(n_ctx=128, n_threads=1) as s:
        s.start_chat(SYSTEM)
        "".join(s.chat("Hello there", max_tokens=6, seed=1))
        before = (s.messages, s.cached_tokens())
        run_command(s, "/system " + "Rule. " * 100)
        out = capsys.readouterr().out
        assert out.startswith("error: the system prompt is") and "nothing was changed" in out
        assert (s.messages, s.cached_tokens()) == before


# -- 2: chat after a stream that is not a chat ----------------------------------------------------

def test_loading_a_plain_stream_in_chat_continues_it(model, tmp_path, capsys):
    document = "The lighthouse keeper was called Oswin Hale. He lived on the rock for forty years."
    with model.session(n_ctx=256, n_threads=1) as fed:  # what `edgesink feed --save` does
        fed.feed(document)
        fed.save(tmp_path / "doc.state")
        doc_tokens = fed.cached_tokens()
    with model.session(n_ctx=256, n_threads=1) as s:
        s.start_chat(SYSTEM)
        "".join(s.chat("Hi", max_tokens=4, seed=1))
        run_command(s, f"/load {tmp_path / 'doc.state'}")
        assert "not a chat; the conversation continues after it" in capsys.readouterr().out
        "".join(s.chat("Who was the keeper?", max_tokens=8, seed=2))
        cached = s.cached_tokens()
        assert cached[:len(doc_tokens)] == doc_tokens  # the loaded stream is still there
        text = "".join(model.token_text(t) for t in cached)
        assert text.count(SYSTEM) == 1 and "Who was the keeper?" in text  # the persona, then the question
        assert [m["role"] for m in s.messages] == ["system", "user", "assistant"]
        run_command(s, "/reset")  # starts over with the persona, pinned
        assert s.cached_tokens() == system_tokens(model) and s.messages == [{"role": "system", "content": SYSTEM}]


def test_chat_after_feed_continues_the_stream(model):
    with model.session(n_ctx=256, n_threads=1) as s:
        s.feed("A note: the code word is heron.")
        note = s.cached_tokens()
        "".join(s.chat("What is the code word?", max_tokens=6, seed=1))
        assert s.cached_tokens()[:len(note)] == note and s.in_chat


# -- 5: /reset starts the counters afresh ---------------------------------------------------------

def test_reset_clears_counters_and_rates(model, capsys):
    with model.session(n_ctx=64, n_threads=1) as s:
        s.start_chat("Be brief.")
        for i in range(4):
            "".join(s.chat(f"Tell me a fact number {i}.", max_tokens=16, seed=i))
        assert s.stats.evictions > 0
        run_command(s, "/reset")
        stats = s.stats
        assert stats.tokens_seen == stats.tokens_in_cache == len(s.cached_tokens())
        assert (stats.evictions, stats.shifts, stats.rebases, stats.refreshes) == (0, 0, 0, 0)
        assert stats.generate_tokens_per_s == 0.0 and stats.tokens_decoded == stats.tokens_seen
        run_command(s, "/stats")
        out = capsys.readouterr().out
        assert f"tokens seen {stats.tokens_seen}," in out and "evicted 0," in out


# -- 6: templates that re-render history differently ---------------------------------------------

# The system prompt goes into the newest user message only (as some Mistral templates do).
FOLDING = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% elif m['role'] == 'user' and loop.last and messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>user\\n' + messages[0]['content'] + '\\n\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def cached_text(model, session) -> str:
    return "".join(model.token_text(t) for t in session.cached_tokens())


def expected_text(session, eog: bool) -> str:
    """The folding template's rendering of the conversation, as the cache should hold it."""
    messages = session.messages
    text = session.conversation.template.render(messages[:-1], add_generation_prompt=True) + messages[-1]["content"]
    return text + ("<|im_end|>" if eog else "")


@pytest.mark.parametrize("policy", ["sink", "window"])
def test_a_template_that_rewrites_history_is_not_duplicated(model, policy):
    with model.session(n_ctx=512, policy=policy, n_threads=1) as s:
        s.start_chat("Speak like a pirate.", template=FOLDING)
        for i, question in enumerate(["Where is the ship?", "Who is the captain?", "What is for dinner?"]):
            "".join(s.chat(question, max_tokens=10, seed=i))
            eog = model.is_end_of_generation(s.cached_tokens()[-1])
            text = cached_text(model, s)
            assert text == expected_text(s, eog), i
            assert text.count("Speak like a pirate.") == 1 and text.count("Where is the ship?") == 1
        assert s.stats.tokens_seen == s.stats.tokens_in_cache  # what was cut back left the stream


def test_a_rewrite_of_evicted_history_is_refused_clearly(model):
    # Every user message gets a numbered prefix that changes with the conversation's length.
    renumbering = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (messages|length|string) + ' '"
                   " + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with model.session(n_ctx=64, n_threads=1) as s:
        s.start_chat(template=renumbering)
        with pytest.raises(TemplateRewriteError, match="no longer in the window"):
            for i in range(20):
                "".join(s.chat(f"Count to {i}.", max_tokens=16, seed=i))
        assert s.stats.evictions > 0
        assert s.messages[-1]["role"] == "assistant"  # the refused message was not recorded


# -- 8: BOS for models that want one ------------------------------------------------------------

def test_a_fresh_stream_starts_with_bos_when_the_model_wants_one(gemma, model):
    assert gemma.add_bos and not model.add_bos
    with gemma.session(n_ctx=128, n_threads=1) as s:
        n = s.feed("Hello world")
        assert s.cached_tokens() == [gemma.bos_token] + gemma.tokenize("Hello world") and n == len(s.cached_tokens())
        s.feed(" and more")
        assert s.cached_tokens().count(gemma.bos_token) == 1
        s.reset()
        nll = s.score("Hello world")
        assert s.cached_tokens()[0] == gemma.bos_token and np.isfinite(nll).all()  # the first word predicted from BOS
    with model.session(n_ctx=128, n_threads=1) as s:  # SmolLM2 wants none: unchanged
        s.feed("Hello world")
        assert s.cached_tokens() == model.tokenize("Hello world")


def test_chat_has_exactly_one_bos(gemma):
    with gemma.session(n_ctx=256, n_threads=1) as s:
        s.start_chat("Be brief.")
        for i in range(2):
            "".join(s.chat(f"Say {i}.", max_tokens=6, seed=i))
        cached = s.cached_tokens()
        assert cached[0] == gemma.bos_token and cached.count(gemma.bos_token) == 1
