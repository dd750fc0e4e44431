"""The command line through click's runner, with the real default model (no network)."""

from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from edgesink import Session
from edgesink.cli.chat import HELP
from edgesink.cli import main
from edgesink.cli.commands import split_model_and_files
from edgesink.fetch.registry import load_registry

FAST = ["--n-ctx", "256", "--threads", "1"]
GREEDY = ["--top-k", "1", "--seed", "1"]


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input, prog_name="edgesink")


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result


def test_help_of_every_command_reads_well():
    top = ok(run("--help")).output
    for command in ("chat", "feed", "generate", "info", "models", "pull", "serve"):
        assert f"  {command} " in top
    assert "owner/repo:QUANT" in top and "Examples:" in top
    for name, command in main.commands.items():
        text = ok(run(name, "--help")).output
        assert command.help and text.count("Usage: edgesink " + name) == 1
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{name} {param.opts} has no help"
                assert param.opts[-1] in text
    chat_help = ok(run("chat", "-h")).output
    for line in HELP.splitlines()[1:-1]:  # every in-chat command, as /help lists them
        assert line.split()[0] in chat_help
    assert "printf 'Hi\\nWhat did I say?\\n' | edgesink chat" in chat_help
    assert ok(run("--version")).output.startswith("edgesink, version ")


def test_info_and_models():
    text = ok(run("info")).output
    assert "sink-shift patch" in text and "default model     smollm2-135m" in text
    data = json.loads(ok(run("info", "--json")).output)
    assert data["default_model"] == "smollm2-135m" and data["default_model_bytes"] > 50e6
    text = ok(run("models")).output
    entry = load_registry()["smollm2-135m"]
    assert "smollm2-135m" in text and f"{entry.file} ({entry.size_bytes / 1e6:.1f} MB)" in text
    assert "qwen2.5-0.5b" in text and "not fetched" in text


def test_generate_is_deterministic_with_a_seed(model_path):
    args = ["generate", "-p", "The capital of France is", "--max-tokens", 8, *GREEDY, *FAST]
    first = ok(run(*args)).stdout
    assert "Paris" in first  # not a copied output: the prompt reached the model, which knows this much
    assert ok(run(*args)).stdout == first
    assert ok(run(*args[:1], *args[3:], input="The capital of France is")).stdout == first  # prompt on stdin
    assert ok(run(*args, "smollm2-135m")).stdout == first  # a registry name
    assert ok(run(*args, model_path)).stdout == first  # a path
    sampled = [ok(run("generate", "-p", "Once upon a time", "--max-tokens", 12, "--seed", s, *FAST)).stdout
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


@pytest.mark.parametrize("args, message", [
    (["generate", "-p", "x", "--max-tokens", "0"], "--max-tokens"),
    (["generate", "-p", "x", "--max-tokens", "-2"], "--max-tokens"),
    (["generate", "-p", "x", "--n-ctx", "1"], "--n-ctx"),
    (["generate", "-p", "x", "--temp", "-1"], "temperature must be >= 0"),
    (["generate", "-p", "x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["chat", "--policy", "lru"], "'lru' is not one of"),
    (["chat", "--threads", "0"], "--threads"),
    (["chat", "--threads", "600"], "Invalid value for '--threads': 600 is not in the range 1<=x<=512"),
    (["generate", "-p", "x", "--n-gpu-layers", "-7"], "Invalid value for '--n-gpu-layers': -7 is not in the range x>=-1"),
    (["generate", "-p", "x", "--seed", "many"], "'many' is not a valid integer"),
    (["feed", "no-such-file.txt"], "cannot read no-such-file.txt"),
    (["generate", "--bogus"], "No such option '--bogus'"),
    (["generate", "-p", "x", "-o", "bogus=1"], "expected KEY=VALUE with KEY one of evict_chunk, batch_size"),
    (["generate", "-p", "x", "-o", "evict_chunk"], "expected KEY=VALUE"),
    (["generate", "-p", "x", "-o", "type_k=f8"], "unknown cache type 'f8' for type_k"),
    (["generate", "-p", "x", "-o", "evict_chunk=0"], "evict_chunk must be >= 1"),
    (["generate", "-p", "x", "--policy", "halve", "-o", "evict_chunk=4"], "policy 'halve' has no evict_chunk"),
    (["generate", "-p", "x", "-o", "flash_attn=maybe"], "flash_attn must be True, False or None"),
])
def test_bad_options_are_usage_errors(args, message):
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["generate", "no-such-model.gguf", "-p", "x"], "no model file at no-such-model.gguf"),
    (["generate", "nonsense", "-p", "x"], "'edgesink models' lists them"),
    (["generate", "-p", "x", "--n-ctx", "100000"], "larger than the 8192 tokens"),
    (["generate", "-p", "x", "--n-ctx", "128", "--sinks", "200"], "sinks"),
    (["generate", "-p", ""], "nothing to continue"),
    (["pull", "no-such-name"], "neither a known model name"),
])
def test_errors_are_one_clear_line(args, message):
    result = run(*args, *(["--threads", "1"] if args[0] != "pull" else []))
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
    assert result.output.startswith(("Error:", "Usage:"))


def test_dash_o_reaches_every_other_session_setting(tmp_path, model):
    """-o KEY=VALUE sets what has no flag of its own; the saved session shows each setting arrived."""
    state = tmp_path / "s.state"
    settings = {"evict_chunk": 8, "batch_size": 8, "type_k": "f32", "type_v": "q8_0", "shift_mode": "window-back",
                "refresh_every": 7, "rebase_every": 99}
    options = [arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")]
    ok(run("feed", "-", "--save", state, *options, *FAST, input="one two three four five six seven eight " * 40))
    with Session.restore(state, model, n_threads=1) as restored:
        config = restored.config
        assert (config.policy.evict_chunk, config.batch_size, config.type_k, config.type_v) == (8, 8, "f32", "q8_0")
        assert (config.shift_mode, config.refresh_every, config.rebase_every) == ("window-back", 7, 99)
        assert restored.stats.evictions % 8 == 0 and restored.stats.evictions > 0


def test_max_tokens_minus_one_means_until_the_model_ends():
    # In a child process with a time limit: a reply that never ends must fail the test, not hang it.
    command = [sys.executable, "-c", "from edgesink.cli import main; main()",
               "chat", "--max-tokens", "-1", *GREEDY, *FAST]
    try:
        result = subprocess.run(command, input="Hi\n", capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("chat --max-tokens -1 did not end within 120 s")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.strip()  # the reply ended at the model's end-of-turn token


def test_feed_files_then_generate_and_save(tmp_path, model):
    book = tmp_path / "book.txt"
    book.write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                    "fortune, must be in want of a wife. " * 12)
    state = tmp_path / "book.state"
    result = ok(run("feed", book, "--then", " And so", "--save", state, "--max-tokens", 6, *GREEDY, *FAST))
    assert "fed " in result.stderr and "evicted" in result.stderr and f"saved the session to {state}" in result.stderr
    assert result.stdout.strip()  # the continuation
    with Session.restore(state, model, n_threads=1) as restored:
        assert restored.stats.tokens_seen > 256 and restored.stats.evictions > 0
    # Standard input: '-', no FILE at all, or the model named first.
    short = "A short text on standard input."
    piped = [ok(run("feed", *args, *FAST, input=short)).stderr for args in (["-"], [], ["smollm2-135m", "-"])]
    assert all("fed 7 tokens" in text for text in piped)


def test_feed_tells_the_model_from_the_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    assert split_model_and_files(("notes.txt",)) == (None, ["notes.txt"])
    assert split_model_and_files(("notes.txt", "-")) == (None, ["notes.txt", "-"])
    assert split_model_and_files(("-",)) == (None, ["-"])
    assert split_model_and_files(("smollm2-135m", "notes.txt")) == ("smollm2-135m", ["notes.txt"])
    assert split_model_and_files(("m.gguf",)) == ("m.gguf", [])
    assert split_model_and_files(("owner/repo:Q4_K_M", "-")) == ("owner/repo:Q4_K_M", ["-"])
    # A missing file in a folder that exists is a missing file, not a Hub repo named "todo.txt".
    (tmp_path / "notes").mkdir()
    assert split_model_and_files(("notes/todo.txt",)) == (None, ["notes/todo.txt"])
    result = run("feed", "notes/todo.txt")
    assert result.exit_code == 2 and "cannot read notes/todo.txt" in result.output


def test_chat_reads_messages_from_a_pipe(model):
    result = ok(run("chat", "--max-tokens", 24, *GREEDY, *FAST, input="Hi\nWhat did I say?\n"))
    with model.session(n_ctx=256, n_threads=1) as s:  # the same chat through the API
        s.start_chat()
        replies = ["".join(s.chat(m, max_tokens=24, top_k=1, seed=1)) for m in ("Hi", "What did I say?")]
    assert all(r.strip() for r in replies)
    assert result.stdout == "".join(r + "\n" for r in replies)
    assert result.stderr == ""  # no banner, no prompt when piped
