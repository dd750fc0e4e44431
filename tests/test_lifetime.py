"""Lifetimes and threads: a closed model or session raises ClosedError (never an abort), closing a
model closes its sessions, a dropped chat session frees its context at once, and threads sharing
a session take turns. Whatever could abort runs in a child process, so a regression fails the
test instead of killing pytest. Real model."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

CHILD = """
import sys, threading
import edgesink
m = edgesink.load(sys.argv[1], check="none")
s = m.session(n_ctx=64, n_threads=1)
s.feed("Hello there, general")

def expect_closed(name, call, message):
    try:
        call()
    except edgesink.ClosedError as e:
        print(name, "ok" if str(e) == message else f"WRONG MESSAGE {e!r}")
    except BaseException as e:
        print(name, "WRONG", type(e).__name__, e)
    else:
        print(name, "NO ERROR")
"""

MODEL_CALLS = {
    "tokenize": "m.tokenize('x')", "detokenize": "m.detokenize([1])", "token_bytes": "m.token_bytes(1)",
    "token_text": "m.token_text(1)", "is_end_of_generation": "m.is_end_of_generation(1)",
    "metadata": "m.metadata('general.name')", "chat_template": "m.chat_template", "description": "m.description()",
    "size_bytes": "m.size_bytes", "session": "m.session(n_ctx=64)", "Session": "edgesink.Session(m, n_ctx=64)",
}
SESSION_CALLS = {
    "feed": "s.feed('x')", "feed_tokens": "s.feed_tokens([1])", "score": "s.score('x')",
    "score_tokens": "s.score_tokens([1])", "generate_text": "s.generate_text(4)", "generate": "next(s.generate(4))",
    "stream_generate": "next(s.stream_generate(4))", "stats": "s.stats", "reset": "s.reset()",
    "next_logits": "s.next_logits()", "cached_tokens": "s.cached_tokens()", "start_chat": "s.start_chat('hi')",
    "chat": "next(s.chat('hi'))", "pin_prefix": "s.pin_prefix(1)", "save": "s.save(sys.argv[2])",
}


def run_child(model_path, tmp_path, body: str) -> list[str]:
    """Run CHILD + body in a fresh interpreter; its stdout lines (it must exit cleanly)."""
    code = CHILD + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", code, str(model_path), str(tmp_path / "s.state")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the child died ({result.returncode}): {result.stderr[-2000:]}"
    return result.stdout.splitlines()


def checks(calls: dict, message: str) -> str:
    return "".join(f"expect_closed({name!r}, lambda: {call}, {message!r})\n" for name, call in calls.items())


def assert_all_ok(lines: list[str], calls: dict) -> None:
    assert lines == [f"{name} ok" for name in calls]


def test_a_closed_model_raises_closed_error(model_path, tmp_path):
    body = "s.close()\nm.close()\nm.close()\n" + checks(MODEL_CALLS, "this model is closed")
    lines = run_child(model_path, tmp_path, body + "print(m.path.name, m.n_vocab, m.architecture)\n")
    assert_all_ok(lines[:-1], MODEL_CALLS)
    assert lines[-1] == f"{model_path.name} 49152 llama"  # what was read at load stays readable


def test_closing_a_model_closes_its_sessions_first(model_path, tmp_path):
    closed = "this session is closed (its model was closed)"
    body = "s.start_chat('Be brief.')\nm.close()\n" + checks(SESSION_CALLS, closed)
    lines = run_child(model_path, tmp_path, body + "s.close()\nprint(s.in_chat, s.n_ctx)\n")
    assert_all_ok(lines[:-1], SESSION_CALLS)
    assert lines[-1] == "True 64"  # plain bookkeeping stays readable


def test_a_closed_session_raises_closed_error(model_path, tmp_path):
    lines = run_child(model_path, tmp_path, "s.close()\ns.close()\n" + checks(SESSION_CALLS, "this session is closed")
                      + "print(len(m.tokenize('still usable')))\n")
    assert_all_ok(lines[:-1], SESSION_CALLS)
    assert lines[-1] == "2"


def test_a_generator_outliving_its_model_raises_closed_error(model_path, tmp_path):
    body = """
        g = s.generate(8, top_k=1)
        next(g)
        m.close()
        expect_closed("next", lambda: next(g), "this session is closed (its model was closed)")
    """
    assert run_child(model_path, tmp_path, body) == ["next ok"]


def test_a_dropped_chat_session_frees_its_context_at_once(model):
    """No reference cycle between a session and its chat: the cache goes with the last reference."""
    gc.collect()
    gc.disable()
    try:
        s = model.session(n_ctx=64, n_threads=1)
        s.start_chat("Be brief.")
        "".join(s.chat("Hi", max_tokens=2, seed=1))
        cache = s.cache
        del s
        assert cache.ctx is None  # freed by the session's own finalizer, not by the cycle collector
    finally:
        gc.enable()
        gc.collect()  # a session kept by a cycle must go while the model it uses is alive


def test_threads_feeding_one_session_take_turns(model_path, tmp_path):
    body = """
        text = " ".join(f"word{i}" for i in range(40))
        shared = m.session(n_ctx=64, batch_size=4, n_threads=1)
        barrier, errors = threading.Barrier(3), []

        def feed():
            barrier.wait()
            try:
                shared.feed(text)
            except BaseException as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=feed) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        one = m.session(n_ctx=64, batch_size=4, n_threads=1)
        for _ in range(3):
            one.feed(text)
        print(errors, shared.cached_tokens() == one.cached_tokens(), shared.stats.tokens_seen == one.stats.tokens_seen,
              float(abs(shared.next_logits() - one.next_logits()).max()) < 1e-3, shared.stats.evictions > 0)
    """
    assert run_child(model_path, tmp_path, body) == ["[] True True True True"]

