"""The interactive loop of ``edgesink chat``: prompt, streamed replies, in-chat commands."""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import click

from ..errors import EdgesinkError, SystemPromptTooLongError
from ..filecache import cache_dir
from .stats import speed_line, stream_line

PROMPT = ">>> "
PROMPT_WAKE_S = 0.1  # how often the wait at the prompt wakes to act on a Ctrl-C already noted
HISTORY_NAME = "chat_history"  # in edgesink's cache folder
# The in-chat commands, listed by /help and by 'edgesink chat --help' alike.
COMMANDS = """\
  /reset        forget the conversation (the system prompt stays)
  /stats        tokens seen, in cache, evictions, speed
  /save FILE    save the session (cache and conversation)
  /load FILE    load a session saved with /save (a stream saved by feed: chat after it)
  /system TEXT  start over with a new system prompt (one too long is refused, changing nothing)
  /help         list these commands
  /exit         quit (or Ctrl-D)"""
HELP = f"commands:\n{COMMANDS}\nCtrl-C stops a reply and keeps the session."


def run_chat(session, *, system: str | None, generation: dict, interactive: bool) -> None:
    """Read messages (a prompt on a terminal, lines otherwise) and stream the replies."""
    session.start_chat(system)
    if interactive:
        _setup_line_editing()
        click.echo(f"edgesink chat - {session.model.path.name}, n_ctx {session.n_ctx}, policy {session.policy.name}. "
                   "/help for commands, Ctrl-D to quit.", err=True)
    lines = None if interactive else iter(sys.stdin.readline, "")
    try:
        while True:
            try:
                message = read_message(PROMPT) if interactive else next(lines)
            except (EOFError, StopIteration):
                break
            except KeyboardInterrupt:  # at the prompt: a fresh line, nothing else
                click.echo("")
                continue
            message = message.rstrip("\n")
            if not message.strip():
                continue
            if message.startswith("/"):
                if run_command(session, message) == "exit":
                    break
                continue
            reply(session, message, generation)
    finally:
        if interactive:
            click.echo("")
            _save_history()


def read_message(prompt: str) -> str:
    """``input(prompt)`` at a terminal, where a Ctrl-C always gets through.

    A SIGINT that lands after readline has drawn the prompt but before it starts waiting for a
    key is only noted by Python; readline then waits for a key without acting on it, and the chat
    looks frozen. Waking the wait every PROMPT_WAKE_S lets readline act on a noted Ctrl-C.
    """
    with _waking_wait():
        return input(prompt)


@contextmanager
def _waking_wait():
    """SIGALRM every PROMPT_WAKE_S while inside (the main thread of a platform with interval timers)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGALRM) is not _wake:
        # Left installed: a tick still on its way after the timer stops must not meet the default
        # action, which ends the process.
        signal.signal(signal.SIGALRM, _wake)
    # readline waits in select(), which any tick ends: its reads and writes may carry on through one.
    # Without readline, Python's line reader waits in read(), which only an interrupting tick ends.
    signal.siginterrupt(signal.SIGALRM, "readline" not in sys.modules)
    try:
        signal.setitimer(signal.ITIMER_REAL, PROMPT_WAKE_S, PROMPT_WAKE_S)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _wake(signum, frame) -> None:
    """Nothing: the tick only ends readline's wait, and Python then runs any pending Ctrl-C."""


def reply(session, message: str, generation: dict) -> None:
    """Stream the reply to one message; Ctrl-C stops it and keeps what was said."""
    printed = False
    try:
        for piece in session.chat(message, **generation):
            click.echo(piece, nl=False)
            printed = True
    except KeyboardInterrupt:
        click.echo(" [stopped]", nl=False)
    except EdgesinkError as e:
        # On a line of its own: a reply cut short by an error must not run into the message.
        click.echo(("\n" if printed else "") + f"error: {e}; /reset starts over", nl=False)
    click.echo()


def run_command(session, line: str) -> str | None:
    """Carry out one /command; returns "exit" to leave the chat."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    try:
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name == "/help":
            click.echo(HELP)
        elif name == "/reset":
            session.reset()
            click.echo("[conversation reset]")
        elif name == "/stats":
            stats = session.stats
            click.echo(f"{stream_line(stats)}, {speed_line(stats)}")
        elif name == "/system":
            if not arg:
                raise click.UsageError("/system needs the new system prompt")
            session.start_chat(arg)
            click.echo("[new system prompt; conversation started over]")
        elif name in ("/save", "/load"):
            if not arg:
                raise click.UsageError(f"{name} needs a file name")
            path = Path(arg).expanduser()
            if name == "/save":
                session.save(path)
                click.echo(f"[saved to {path}]")
            else:
                load(session, path)
        else:
            click.echo(f"unknown command {name}; /help lists them")
    except (EdgesinkError, ValueError, OSError, click.UsageError) as e:
        click.echo(f"error: {e}")
    return None


def load(session, path: Path) -> None:
    """Load a saved session; a plain stream (saved by ``feed``) becomes the start of a chat."""
    system = session.system_prompt
    session.load(path)
    if session.in_chat:
        click.echo(f"[loaded {path}: {len(session.messages)} messages]")
        return
    # Chatting about a fed document is the point of loading one: keep it, the chat goes on after it.
    n = session.stats.tokens_in_cache
    try:
        session.start_chat(system, continue_stream=True)
        note = "; the system prompt follows it once (not kept for ever)" if system else ""
    except SystemPromptTooLongError as e:
        note = f"; without the system prompt ({e})"
    click.echo(f"[loaded {path}: a stream of {n} cached tokens, not a chat; the conversation continues after it{note}]")


def _setup_line_editing() -> None:
    """Line editing and a history kept between chats (where Python has readline)."""
    try:
        import readline
    except ImportError:
        return
    try:
        readline.read_history_file(cache_dir() / HISTORY_NAME)
    except OSError:
        pass
    readline.set_history_length(1000)


def _save_history() -> None:
    try:
        import readline

        path = cache_dir() / HISTORY_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)
    except (ImportError, OSError):
        pass
