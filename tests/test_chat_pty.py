"""The real ``edgesink`` program in a pseudo-terminal (pexpect): what a user at a terminal sees."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import sys
import textwrap
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

EDGESINK = Path(sys.executable).with_name("edgesink")
PROMPT = ">>> "


def ctrl_c_as_at_a_terminal() -> None:
    """In the child, before it starts: SIGINT acts as on a program started at a terminal.

    A test run started in the background (``make test &``) inherits SIGINT ignored, and so would
    the program: a Ctrl-C at its prompt would do nothing.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def spawn(*args: str):
    """The program in a terminal; if it stops answering, the test fails with every thread's stack."""
    # The isolated HOME / HF_HOME / HF_ENDPOINT that conftest set are in os.environ: inherited.
    # PYTHONFAULTHANDLER: SIGABRT makes the child print where each thread is before it dies.
    env = dict(os.environ, TERM="dumb", PYTHONFAULTHANDLER="1")
    child = pexpect.spawn(str(EDGESINK), [*args, "--n-ctx", "256", "--threads", "1"], env=env,
                          encoding="utf-8", timeout=90, dimensions=(24, 200), preexec_fn=ctrl_c_as_at_a_terminal)
    child.logfile_read = io.StringIO()  # everything it printed, for checks over the whole session
    try:
        yield child
    except pexpect.TIMEOUT:
        seen = child.before
        child.kill(signal.SIGABRT)
        with contextlib.suppress(pexpect.TIMEOUT, pexpect.EOF):
            child.expect(pexpect.EOF, timeout=20)
        pytest.fail(f"edgesink {args[0]} stopped answering.\nIt printed:\n{seen}\nIts stacks:\n{child.before}")
    finally:
        child.close()


def test_chat_at_a_terminal():
    with spawn("chat", "--max-tokens", "1000", "--top-k", "1", "--seed", "1") as child:
        child.expect_exact("loading the default model ...")
        child.expect("edgesink chat - SmolLM2-135M-Instruct.Q4_1.gguf, n_ctx 256, policy sink")
        child.expect_exact(PROMPT)
        child.sendline("Hi")
        child.expect("Hello")  # the reply, as it streams
        child.expect_exact(PROMPT)

        child.sendline("/stats")
        child.expect(r"tokens seen (\d+), in cache (\d+) \(kept \d+\), evicted (\d+)")
        seen_before = int(child.match.group(1))
        child.expect_exact(PROMPT)

        # A long reply, stopped with Ctrl-C once it is under way (so it was streaming).
        child.sendline("List 100 animals, numbered.")
        child.expect(r"1\. \w+\r\n2\. \w+\r\n3\. ")
        child.sendintr()
        child.expect_exact("[stopped]")
        child.expect_exact(PROMPT)

        child.sendline("/stats")
        child.expect(r"tokens seen (\d+), in cache (\d+) \(kept \d+\), evicted (\d+)")
        assert int(child.match.group(1)) > seen_before and int(child.match.group(2)) <= 256
        child.expect_exact(PROMPT)

        child.sendline("Hi again")  # the session goes on after Ctrl-C
        child.expect(r"\w+")
        child.expect_exact(PROMPT)
        child.sendline("/help")
        child.expect_exact("/save FILE")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    assert child.exitstatus == 0
    assert "Traceback" not in child.logfile_read.getvalue()


def test_ctrl_c_at_the_prompt_and_ctrl_d_to_quit():
    with spawn("chat") as child:
        child.expect_exact(PROMPT)
        child.sendintr()  # at the prompt: a new prompt, the chat goes on
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    assert child.exitstatus == 0
    assert "Traceback" not in child.logfile_read.getvalue()


def test_a_ctrl_c_noted_before_the_prompt_waits_still_gets_through():
    """A SIGINT that lands after readline has drawn the prompt, but before it waits for a key, is only
    noted by Python: unless the wait is woken, readline waits for a key and the chat looks frozen.

    ``_thread.interrupt_main()`` leaves exactly that state: a SIGINT noted, the wait not woken.
    """
    code = textwrap.dedent("""
        import _thread, readline, threading
        from edgesink.cli.chat import read_message
        # Once the prompt is drawn, from another thread: note a SIGINT without waking the wait.
        readline.set_pre_input_hook(lambda: threading.Timer(0.2, _thread.interrupt_main).start())
        try:
            read_message(">>> ")
        except KeyboardInterrupt:
            print("interrupted at the prompt")
    """)
    child = pexpect.spawn(sys.executable, ["-c", code], env=dict(os.environ, TERM="dumb"), encoding="utf-8",
                          timeout=60, preexec_fn=ctrl_c_as_at_a_terminal)
    try:
        child.expect_exact(PROMPT)
        child.expect_exact("interrupted at the prompt")  # 0.2 s, then at the wait's next wake-up
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_endless_generation_until_ctrl_c():
    with spawn("generate", "-p", "Once upon a time", "--max-tokens", "-1", "--seed", "3") as child:
        child.expect(re.compile(r"(\w+\W+){60}"))  # well past the first words, still going
        child.sendintr()
        child.expect(pexpect.EOF)
    assert child.exitstatus == 0
    assert "Traceback" not in child.logfile_read.getvalue()
