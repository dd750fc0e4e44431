"""The command line's own work on a scripted engine (tests/fake_engine.py): milliseconds per test.

Options reaching the session, the chat loop and its /commands, Ctrl-C and errors inside a reply,
progress lines. Every command also runs end to end on the real model in test_cli.py and
test_cli_resume.py; the chat's rendering and guarantees are tested on the real model too.
"""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

import edgesink._native
from edgesink.cli import feeding, main
from edgesink.policies import Sink
from fake_engine import FakeSession, fake_engine


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, prog_name="edgesink", obj=fake_engine())


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result


def chat_lines(script: str, *options) -> list[str]:
    return ok(run("chat", "--n-ctx", 256, *options, input=script)).stdout.splitlines()


def test_every_session_option_reaches_the_session_and_the_model():
    ok(run("generate", "my.gguf", "-p", "x", "--n-ctx", 512, "--policy", "sink", "--sinks", 2, "--threads", 3,
           "--n-gpu-layers", 5, "--device", "Vulkan1", "-o", "evict_chunk=8", "-o", "batch_size=16", "-o", "type_k=q8_0",
           "-o", "shift_mode=window-back", "-o", "refresh_every=7", "-o", "rebase_every=99", "-o", "flash_attn=false"))
    (session,) = FakeSession.made
    config = session.config
    assert config.policy == Sink(sinks=2, evict_chunk=8)
    assert (config.n_ctx, config.n_threads, config.batch_size, config.type_k) == (512, 3, 16, "q8_0")
    assert (config.shift_mode, config.refresh_every, config.rebase_every, config.flash_attn) == ("window-back", 7, 99, False)
    assert session.model.path.name == "my.gguf" and session.model.options == {"n_gpu_layers": 5, "device": "Vulkan1"}
    assert session.closed


def test_generate_feeds_the_prompt_then_streams_the_continuation():
    assert ok(run("generate", "-p", "Once upon a time", "--max-tokens", 2)).stdout == " and so\n"
    assert FakeSession.made[0].fed == ["Once upon a time"]
    ok(run("generate", input="from a pipe"))
    assert FakeSession.made[0].fed == ["from a pipe"]


def test_a_usage_error_loads_no_model():
    for args in (["generate", "-p", "x", "-o", "evict_chunk=0"], ["generate", "-p", "x", "--temp", "-1"],
                 ["chat", "--policy", "halve", "-o", "evict_chunk=4"], ["generate", "-p", ""]):
        result = run(*args)
        assert result.exit_code == 2 and "Traceback" not in result.output, args
        assert FakeSession.made == [], args  # refused before any model was loaded


def test_chat_commands_in_a_pipe(tmp_path):
    state = tmp_path / "chat.state"
    lines = chat_lines(f"/help\nHi\n/stats\n/save {state}\n/reset\n/stats\n/load {state}\n/system You are a cat.\n"
                       "/load /no/such/file\n/bogus\n/exit\nnever answered\n")
    text = "\n".join(lines)
    assert "/system TEXT" in text and "you said: Hi" in lines
    stats = [line for line in lines if line.startswith("tokens seen")]
    assert stats == ["tokens seen 3, in cache 3 (kept 0), evicted 0, positions 0..2, "
                     "generate 0.0 tokens/s, feed 0 tokens/s",
                     "tokens seen 0, in cache 0 (kept 0), evicted 0, positions 0..0, "
                     "generate 0.0 tokens/s, feed 0 tokens/s"]
    assert f"[saved to {state}]" in lines and "[conversation reset]" in lines
    assert f"[loaded {state}: 2 messages]" in lines and "[new system prompt; conversation started over]" in lines
    assert "error: no session file at /no/such/file" in lines and "unknown command /bogus; /help lists them" in lines
    assert "never answered" not in text
    assert FakeSession.made[0].system_prompt == "You are a cat." and FakeSession.made[0].closed


def test_ctrl_c_or_an_error_inside_a_reply_keeps_the_chat():
    lines = chat_lines("one ctrl-c two\nan overflow here\nstill there?\n")
    assert lines == ["you [stopped]", "you", "error: the cache is full; /reset starts over", "you said: still there?"]
    assert [m["content"] for m in FakeSession.made[0].messages] == [
        "one ctrl-c two", "you", "an overflow here", "you", "still there?", "you said: still there?"]


def test_a_system_prompt_too_long_is_refused_and_the_old_one_stays():
    lines = chat_lines("/system " + "word " * 200 + "\nHi\n", "--system", "Be brief.")
    assert lines[0].startswith("error: the system prompt is 200 tokens")
    assert lines[1] == "you said: Hi"
    assert FakeSession.made[0].system_prompt == "Be brief."


@pytest.mark.parametrize("system, note", [
    (None, "]"), ("Be brief.", "; the system prompt follows it once (not kept for ever)]"),
    ("word " * 100, "; without the system prompt (the system prompt is 100 tokens; too long)]")])  # fits alone only
def test_loading_a_plain_stream_starts_the_chat_after_it(tmp_path, system, note):
    state = tmp_path / "stream.state"
    state.write_text('{"messages": [], "in_chat": false, "seen": 40}')
    lines = chat_lines(f"/load {state}\nHi\n", *(["--system", system] if system else []))
    assert lines == [f"[loaded {state}: a stream of 40 cached tokens, not a chat; the conversation continues "
                     f"after it{note}", "you said: Hi"]


def test_feed_progress_lines_in_a_pipe_do_not_run_together(monkeypatch):
    monkeypatch.setattr(feeding, "READ_BYTES", 64)  # many small pieces ...
    monkeypatch.setattr(feeding, "PROGRESS_SECONDS", 0.0)  # ... each reported
    lines = ok(run("feed", "--n-ctx", 64, input="abc " * 128)).stderr.split("\n")  # 8 pieces of 16 "tokens"
    assert "\r" not in "".join(lines)
    progress, final = lines[:-2], lines[-2]
    assert all(re.fullmatch(r"\d+ tokens, \d+ tokens/s, \d+ evicted", x) for x in progress)
    assert [line.split(",")[0] for line in progress] == [f"{16 * i} tokens" for i in range(1, 9)]
    assert progress[-1].endswith(" 64 evicted")
    assert final.startswith("fed 128 tokens in ") and final.endswith("tokens seen 128, in cache 64 (kept 0), "
                                                                      "evicted 64, positions 0..63")
    assert lines[-1] == ""


def test_serve_options_reach_the_server(monkeypatch, tmp_path):
    import edgesink.serve
    from edgesink.serve import Listening, ServeLimits
    calls = []
    monkeypatch.setattr(edgesink.serve, "run", lambda model, config, **kw: calls.append((model, config, kw)))
    monkeypatch.setenv("EDGESINK_API_KEY", "from-the-environment")
    ok(run("serve", "smollm2-135m", "--n-ctx", 512, "--threads", 1, "--port", 9000, "--slots", 3, "--max-queue", 5,
           "--queue-timeout", 2, "--max-body", 4096, "--max-tokens", 100, "--max-prompt-tokens", 300,
           "--max-messages", 7, "--body-timeout", 3, "--allow-host", "box.lan", "--cors-origin", "http://ui.lan:3000",
           "--max-connections", 9, "--header-timeout", 4, "--shutdown-timeout", 6, "--sessions-max-bytes", 1000))
    ((model, config, options),) = calls
    assert model.path.name == "smollm2-135m"
    assert (config.n_ctx, config.n_threads, config.shift_mode) == (512, 1, "auto")
    assert config.policy == Sink(sinks=4, evict_chunk=1)  # the patched libllama moves the sinks forward: per token
    assert options["limits"] == ServeLimits(max_body_bytes=4096, max_queue=5, queue_timeout=2.0, max_tokens=100,
                                            max_prompt_tokens=300, max_messages=7, body_timeout=3.0)
    assert options["listening"] == Listening(host="127.0.0.1", port=9000, allowed_hosts=("box.lan",),
                                             cors_origins=("http://ui.lan:3000",), max_connections=9,
                                             header_timeout=4.0, shutdown_timeout=6.0)
    assert options["slots"] == 3 and options["sessions_max_bytes"] == 1000 and not options["session_from_user"]
    assert options["access"].required and options["access"].namespace("Bearer from-the-environment")
    assert options["sessions_dir"] is None
    assert options["model_ids"] == ["smollm2-135m"]
    keys = tmp_path / "keys"
    keys.write_text("# the team's keys\nk1\n\nk2\n")
    ok(run("serve", "models/x.gguf", "--api-key", "k", "--api-keys-file", keys, "-o", "evict_chunk=1",
           "--session-from-user"))
    access = calls[-1][2]["access"]
    assert calls[-1][2]["model_ids"] == ["x"] and calls[-1][2]["session_from_user"]
    assert len({access.namespace(f"bearer {k}") for k in ("k", "k1", "k2")}) == 3  # a namespace per key
    assert calls[-1][1].policy == Sink(sinks=4, evict_chunk=1)
    ok(run("serve", "--policy", "halve"))
    ok(run("serve", "-o", "shift_mode=window-back"))
    assert calls[-1][1].policy == Sink(sinks=4, evict_chunk=64)  # a window moved back once per 64 tokens, not per token
    ok(run("serve", "models/gemma-swa.gguf"))  # a sliding-window model's shared streams move the window back
    assert calls[-1][1].policy == Sink(sinks=4, evict_chunk=64) and calls[-1][1].shift_mode == "auto"
    assert "sliding-window" in run("serve", "models/gemma-swa.gguf", "-o", "shift_mode=kept-forward").output
    keys.write_text("# nothing but a comment\n")
    result = run("serve", "--api-keys-file", keys)
    assert result.exit_code == 2 and "holds no key" in result.output


def test_serve_help_says_what_unnamed_requests_get():
    text = ok(run("serve", "--help")).output
    assert "share one conversation" not in text  # each unnamed client gets its own (row 18 of the review)
    assert "anonymous conversation of its own" in text
    for option in ("--allow-host", "--cors-origin", "--max-prompt-tokens", "--shutdown-timeout", "--api-keys-file"):
        assert option in text


def test_serve_refuses_a_shift_mode_it_cannot_run(monkeypatch):
    import edgesink.serve
    monkeypatch.setattr(edgesink.serve, "run", lambda *a, **kw: pytest.fail("the server must not start"))
    monkeypatch.setattr(edgesink._native, "patch_level", lambda: 6)  # a libllama without patch 0007
    result = run("serve", "-o", "shift_mode=kept-forward")
    assert result.exit_code != 0 and "in place" in result.output and "window-back" in result.output
    assert run("serve", "--slots", 0).exit_code == 2
