"""The real ``edgesink`` program in a pseudo-terminal (pexpect): what a user at a terminal sees."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

EDGESINK = Path(sys.executable).with_name("edgesink")
PROMPT = ">>> "


def spawn(*args: str):
    # The isolated HOME / HF_HOME / HF_ENDPOINT that conftest set are in os.environ: inherited.
    env = dict(os.environ, TERM="dumb")
    child = pexpect.spawn(str(EDGESINK), [*args, "--n-ctx", "256", "--threads", "1"], env=env,
                          encoding="utf-8", timeout=90, dimensions=(24, 200))
    return child


def test_chat_at_a_terminal():
    child = spawn("chat", "--max-tokens", "1000", "--top-k", "1", "--seed", "1")
    try:
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
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in child.before


def test_ctrl_c_at_the_prompt_and_ctrl_d_to_quit():
    child = spawn("chat")
    try:
        child.expect_exact(PROMPT)
        child.sendintr()  # at the prompt: a new prompt, the chat goes on
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_endless_generation_until_ctrl_c():
    child = spawn("generate", "-p", "Once upon a time", "--max-tokens", "-1", "--seed", "3")
    try:
        child.expect(re.compile(r"(\w+\W+){60}"))  # well past the first words, still going
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "Traceback" not in (child.before or "")
