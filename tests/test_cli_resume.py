"""The command line keeps a long feed's work: --save checked up front, --resume, readable progress."""

from __future__ import annotations

import io
import re
import tempfile


from edgesink import Session
from edgesink.cli import feeding
from edgesink.cli.feeding import feed_files
from test_cli import GREEDY, run

FAST = ["--n-ctx", "256", "--threads", "1"]
TEXT_A = "It is a truth universally acknowledged, that a single man in possession of a good fortune, " * 8
TEXT_B = "must be in want of a wife. However little known the feelings or views of such a man may be. " * 8


def ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "Traceback" not in result.output
    return result


def tokens_seen(stderr: str) -> int:
    return int(re.search(r"tokens seen (\d+)", stderr).group(1))


def test_feed_resume_save_then_generate_resume(tmp_path, model):
    (tmp_path / "a.txt").write_text(TEXT_A)
    (tmp_path / "b.txt").write_text(TEXT_B)
    first, second = tmp_path / "a.state", tmp_path / "ab.state"
    seen_a = tokens_seen(ok(run("feed", tmp_path / "a.txt", "--save", first, *FAST)).stderr)
    result = ok(run("feed", tmp_path / "b.txt", "--resume", first, "--save", second, *FAST))
    fed_b = int(re.search(r"fed (\d+) tokens", result.stderr).group(1))
    assert fed_b > 0 and tokens_seen(result.stderr) == seen_a + fed_b  # the stream went on
    assert int(re.search(r"evicted (\d+), positions", result.stderr).group(1)) > 0  # past n_ctx 256

    # Continuing by the CLI equals continuing by the API from the same file.
    args = ["generate", "--resume", second, "-p", " And so", "--max-tokens", 8, *GREEDY, "--threads", 1]
    text = ok(run(*args)).stdout
    with Session.restore(second, model, n_threads=1) as s:
        assert s.stats.tokens_seen == seen_a + fed_b
        s.feed(" And so")
        assert text == s.generate_text(8, top_k=1, seed=1) + "\n"
    # Without a prompt it continues the saved stream as it is.
    assert ok(run("generate", "--resume", second, "--max-tokens", 4, *GREEDY, "--threads", 1)).stdout.strip()
    # The file resumed from is unchanged: resuming it again gives the same continuation.
    assert ok(run(*args)).stdout == text


def test_resume_refuses_what_it_cannot_continue(tmp_path, model_path):
    from random_model import write_random_llama

    state = tmp_path / "s.state"
    ok(run("feed", "--save", state, *FAST, input="Some text to keep."))
    other = write_random_llama(tmp_path / "other.gguf", model_path)
    cases = [
        (["generate", other, "--resume", state, "--threads", 1], 1, "saved with another model"),
        (["feed", "--resume", state, "--n-ctx", 512, "--threads", 1], 1, "saved with n_ctx=256"),
        (["generate", "--resume", tmp_path / "missing.state"], 2, "no session file at"),
        (["generate", "--resume", tmp_path], 2, "is a directory"),
    ]
    (tmp_path / "notes.txt").write_text("not a session")
    cases.append((["feed", "--resume", tmp_path / "notes.txt"], 2, "not an edgesink session file"))
    for args, code, message in cases:
        result = run(*args, input="")
        assert result.exit_code == code, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert ok(run("generate", "--resume", state, "--max-tokens", 2, "--threads", 1)).stdout  # still usable


def test_a_bad_save_path_fails_before_the_feed(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT_A)
    for path, message in [(tmp_path / "no" / "such" / "s.state", "does not exist"), (tmp_path, "is a directory")]:
        result = run("feed", tmp_path / "a.txt", "--save", path, *FAST)
        assert result.exit_code == 2 and "Invalid value for '--save'" in result.output and message in result.output
        assert "fed " not in result.output  # nothing was fed


def test_a_failed_final_save_is_rescued(tmp_path, monkeypatch, model):
    """The --save folder passes the up-front check, then goes away while the text is fed."""
    folder = tmp_path / "gone"
    folder.mkdir()

    def feed_then_remove_folder(*args, **kwargs):
        result = feed_files(*args, **kwargs)
        folder.rmdir()
        return result

    monkeypatch.setattr(feeding, "feed_files", feed_then_remove_folder)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run("feed", "--save", folder / "lost.state", *FAST, input=TEXT_A)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"could not save the session to {folder / 'lost.state'}" in result.output
    rescued = next(tmp_path.glob("edgesink-*-lost.state"))
    assert f"saved it to {rescued} instead" in result.output
    with Session.restore(rescued, model, n_threads=1) as s:
        assert s.stats.tokens_seen == tokens_seen(result.stderr)


def test_progress_on_a_terminal_updates_one_line(model, monkeypatch):
    monkeypatch.setattr(feeding, "READ_BYTES", 64)
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    with model.session(n_ctx=256, n_threads=1) as s:
        feeding.feed_files(s, [io.BytesIO(TEXT_A.encode())], out=out, every_seconds=0.0)
    text = out.getvalue()
    assert text.count("\r") > 5 and text.count("\n") == 2  # one line updated in place, then the stats line
    assert text.split("\n")[1].startswith("fed ")


def test_temp_zero_is_greedy():
    args = ["generate", "-p", "Once upon a time", "--max-tokens", 12, *FAST]
    runs = [ok(run(*args, "--temp", 0, "--seed", seed)).stdout for seed in (1, 2)]
    assert runs[0] == runs[1] == ok(run(*args, "--top-k", 1)).stdout
    assert "--temp FLOAT" in run("generate", "--help").output and "0: greedy" in run("generate", "--help").output
