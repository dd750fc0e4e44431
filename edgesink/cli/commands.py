"""The ``edgesink`` command line: a thin layer over the public API."""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
from click.core import ParameterSource

from .. import _native
from ..bench.cli import bench
from ..config import SETTING_NAMES, SessionConfig
from ..errors import EdgesinkError, SessionFileError, SessionSaveError, SettingsError
from ..fetch.hub import cached_models, hub_cache_dir, pull_model
from ..info import format_info, system_info
from ..loading import load
from ..options import MAX_THREADS, kept_forward_mode
from ..persistence import read_session_header
from ..policies import POLICY_NAMES
from ..fetch.registry import load_registry
from ..fetch.resolve import names_hub_model
from ..sampling import SamplingParams
from ..session import Session
from ..version import __version__
from . import feeding
from .chat import COMMANDS, run_chat
from .serving import serve_options, server_settings


@dataclass(frozen=True)
class SessionArgs:
    """What the session options of a command asked for."""

    n_ctx: int
    policy: str
    sinks: int | None
    threads: int | None
    n_gpu_layers: int
    device: str | None
    verbose: bool
    settings: dict  # from -o KEY=VALUE
    given: frozenset  # the options set on the command line (not defaults): they override a saved session's

    def load_options(self) -> dict:
        """Keywords for loading the model (``edgesink.load``)."""
        return {"n_gpu_layers": self.n_gpu_layers, **({"device": self.device} if self.device else {})}

    def config(self) -> SessionConfig:
        """The session's checked settings (SettingsError names a bad one)."""
        return SessionConfig.of(n_ctx=self.n_ctx, policy=self.policy, sinks=self.sinks, n_threads=self.threads,
                                **self.settings)


# Settings with a flag of their own; the others are reached with -o KEY=VALUE.
FLAGGED = {"n_ctx", "policy", "sinks", "n_threads"}
EXTRA_SETTINGS = [name for name in SETTING_NAMES if name not in FLAGGED]


def session_options(fn):
    """Options shared by every command that opens a session; the command gets them as ``session_args``."""
    options = [
        click.option("--n-ctx", type=click.IntRange(min=2), default=2048, show_default=True,
                     help="Cache size in tokens (the stream itself is unbounded)."),
        click.option("--policy", type=click.Choice(POLICY_NAMES), default="sink", show_default=True,
                     help="What to evict when the cache is full."),
        click.option("--sinks", type=click.IntRange(min=0), default=None,
                     help="Attention sinks kept by sink and halve (default 4)."),
        # ggml runs at most 512 threads (GGML_MAX_N_THREADS; more crashed llama.cpp): refuse them
        # here, before the model loads, rather than after.
        click.option("--threads", type=click.IntRange(1, MAX_THREADS), default=None,
                     help="CPU threads (default: every CPU this process may use)."),
        click.option("--n-gpu-layers", type=click.IntRange(min=-1), default=-1, show_default=True,
                     help="Layers offloaded to the GPU in GPU builds (-1: all, 0: none)."),
        click.option("--device", default=None, metavar="NAME",
                     help="The device the layers go to, by its name in 'edgesink info' (Vulkan0, CUDA1); "
                          "default: the GPUs llama.cpp finds. Lavapipe needs GGML_VK_VISIBLE_DEVICES=0."),
        click.option("-o", "--option", "settings", multiple=True, metavar="KEY=VALUE", callback=parse_settings,
                     help=f"Any other session setting, repeatable: {', '.join(EXTRA_SETTINGS)} "
                          "(see the Python API's Session; e.g. -o evict_chunk=8 -o type_k=q8_0)."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's log."),
    ]

    @functools.wraps(fn)
    def wrapper(*, n_ctx, policy, sinks, threads, n_gpu_layers, device, verbose, settings, **kwargs):
        ctx = click.get_current_context()
        given = frozenset(name for name in ("n_ctx", "policy", "sinks", "threads", "settings")
                          if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT))
        args = SessionArgs(n_ctx, policy, sinks, threads, n_gpu_layers, device, verbose, settings, given)
        return fn(session_args=args, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def parse_settings(ctx, param, values) -> dict:
    """``-o KEY=VALUE`` pairs as keyword settings: integers, true/false/none, or text."""
    settings = {}
    for item in values:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in EXTRA_SETTINGS:
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(EXTRA_SETTINGS)}",
                                     ctx=ctx, param=param)
        settings[key] = _setting_value(text.strip())
    return settings


def _setting_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return int(text)
    except ValueError:
        return text


def sampling_options(fn):
    """Options shared by every command that generates."""
    options = [
        click.option("--temp", type=float, default=0.8, show_default=True,
                     help="Sampling temperature; 0: greedy (always the likeliest token; the seed and "
                          "the top-k/top-p/min-p filters then do not matter)."),
        click.option("--top-k", type=int, default=40, show_default=True, help="Keep the k likeliest tokens (1: greedy, 0: off)."),
        click.option("--top-p", type=float, default=0.95, show_default=True, help="Nucleus sampling: keep this probability mass."),
        click.option("--min-p", type=float, default=0.05, show_default=True,
                     help="Drop tokens below this fraction of the likeliest one's probability."),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True,
                     help="Penalty for recently seen tokens (1: off)."),
        click.option("--seed", type=int, default=None, help="Random seed for reproducible output (default: random)."),
        click.option("--max-tokens", type=int, default=512, show_default=True,
                     help="Tokens per reply; -1: no limit (until Ctrl-C or the model ends)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def resume_option(fn):
    """--resume STATE, for the commands that can continue a saved stream."""
    return click.option(
        "--resume", "resume_path", type=click.Path(dir_okay=False), callback=check_session_file, default=None,
        help="Continue the stream saved in this file (by 'feed --save'), with the n-ctx, policy and sinks "
             "it was saved with; MODEL must be the model it was saved with.")(fn)


def check_session_file(ctx, param, value):
    """A --resume file must be a whole edgesink session file: checked before the model loads."""
    if value is not None:
        try:
            read_session_header(value, check_payload=True)  # the payload is hashed in pieces, not held
        except SessionFileError as e:
            raise click.BadParameter(str(e), ctx=ctx, param=param) from e
    return value


def check_save_path(ctx, param, value):
    """A --save file's folder must exist and be writable: checked before the work it would keep."""
    if value is not None:
        folder = Path(value).parent  # "" means the current folder
        if not folder.is_dir():
            raise click.BadParameter(f"folder {folder} does not exist", ctx=ctx, param=param)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise click.BadParameter(f"cannot write to folder {folder}", ctx=ctx, param=param)
    return value


def friendly_errors(fn):
    """Turn edgesink's errors (and the system's: a missing file, a full disk) into a message and exit
    status 1. Anything else is a bug, and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (EdgesinkError, OSError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


@dataclass(frozen=True)
class Engine:
    """What the commands run on: ``load`` (a model spec and options to a loaded model) and the
    ``session`` class (called as ``Session(model, config)``, with ``Session.restore``).

    The command line runs on edgesink's own. Tests of the command line itself pass a scripted
    stand-in as click's context object: ``CliRunner().invoke(main, args, obj=Engine(...))``.
    """

    load: Callable = load
    session: type = Session


def open_session(model, args: SessionArgs, resume=None) -> Session:
    """A new session, or with ``resume`` the stream saved in that file (Session.restore).

    The settings are checked before the model loads: a mistake costs no waiting.
    """
    engine = click.get_current_context().find_object(Engine) or Engine()
    if resume:
        # The saved settings apply unless given on the command line; a conflict is then a clean error.
        given = {"n_ctx": args.n_ctx, "policy": args.policy, "sinks": args.sinks}
        overrides = {name: value for name, value in given.items() if name in args.given}
        overrides.update(args.settings)
        config = None
    else:
        config = _checked(args.config)
    _native.set_verbose(args.verbose)
    if sys.stderr.isatty():  # a first load checks the file in a child process: say why we wait
        click.echo(f"loading {model or 'the default model'} ...", err=True)
    loaded = engine.load(model, **args.load_options())
    if resume:
        return engine.session.restore(resume, loaded, n_threads=args.threads, **overrides)
    return engine.session(loaded, config)


def _checked(make_config) -> SessionConfig:
    try:
        return make_config()
    except SettingsError as e:
        raise click.UsageError(str(e)) from e


def sampling_from(temp, top_k, top_p, min_p, repeat_penalty, seed, max_tokens) -> dict:
    """Generation settings for Session.generate / Session.chat, checked before a model is loaded."""
    if max_tokens == 0 or max_tokens < -1:
        raise click.BadParameter("must be >= 1, or -1 for no limit", param_hint="'--max-tokens'")
    settings = {"temperature": temp, "top_k": top_k, "top_p": top_p, "min_p": min_p,
                "repeat_penalty": repeat_penalty, "seed": seed}
    try:
        SamplingParams(**settings)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    return {**settings, "max_tokens": None if max_tokens == -1 else max_tokens}


def stream_out(pieces) -> None:
    """Print text pieces as they come; Ctrl-C stops them quietly."""
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
    except KeyboardInterrupt:
        pass
    click.echo()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgesink")
def main():
    """edgesink: run a GGUF model on an endless stream of text, with attention sinks.

    The KV cache holds n_ctx tokens; when it is full the oldest tokens are evicted and a few
    "attention sinks" (the first tokens) are kept, so a chat or a stream never stops.

    MODEL is a .gguf path, a registry name (see 'edgesink models') or a Hugging Face spec,
    owner/repo:QUANT or owner/repo/file.gguf; it defaults to the built-in SmolLM2-135M.

    \b
    Examples:
      edgesink chat
      edgesink chat Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M --system "Answer briefly."
      edgesink generate -p "Once upon a time" --max-tokens -1
      edgesink feed book.txt --then "In summary," --save book.state
      edgesink serve --sessions ~/.edgesink-sessions     # OpenAI-compatible, on 127.0.0.1:8080
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(as_json):
    """Versions, libllama (patched or not), devices, the default model."""
    data = system_info()
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


@main.command()
@click.argument("spec")
@friendly_errors
def pull(spec):
    """Fetch a model into the local cache and print its path.

    SPEC is a registry name (see 'edgesink models') or a Hugging Face spec: owner/repo:QUANT
    picks the repo's GGUF for that quantization (default Q4_K_M), owner/repo/file.gguf names
    the file. Split models are fetched whole. Each file's sha256 is checked against the Hub's.
    """
    click.echo(pull_model(spec))


@main.command()
@friendly_errors
def models():
    """Known models and the models fetched here, with sizes."""

    cached = cached_models()
    by_file = {(repo, name): (path, size) for repo, name, path, size in cached}
    click.echo("Registry ('edgesink pull NAME' fetches one; NAME works wherever MODEL does):")
    for entry in load_registry().values():
        if entry.pypi:
            path = entry.local_path
            found = (path, path.stat().st_size) if path.exists() else None
        else:
            found = by_file.pop((entry.repo, entry.file), None)
        where = f"{found[0]} ({_size(found[1])})" if found else "not fetched"
        click.echo(f"  {entry.name:14s} {entry.description}\n  {'':14s} {entry.repo}/{entry.file}: {where}")
    if by_file:
        click.echo(f"\nOther models in the Hugging Face cache ({hub_cache_dir()}):")
        for (repo, name), (path, size) in sorted(by_file.items()):
            click.echo(f"  {repo}/{name}  {_size(size)}  {path}")


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


@main.command()
@click.argument("model", required=False)
@session_options
@sampling_options
@click.option("-p", "--prompt", default=None, help="The text to continue (default: standard input).")
@resume_option
@friendly_errors
def generate(model, session_args, prompt, resume_path, **sampling):
    """Continue a prompt: plain text, no chat template.

    With --max-tokens -1 it goes on without end, through as many cache evictions as it takes,
    until Ctrl-C. With --resume it continues a stream saved by 'feed --save'; the prompt, if
    any, is fed after it.
    """
    generation = sampling_from(**sampling)
    text = read_prompt(prompt, resuming=resume_path is not None)
    with open_session(model, session_args, resume=resume_path) as session:
        if text:
            session.feed(text)
        stream_out(session.generate(**generation))


def read_prompt(prompt: str | None, resuming: bool) -> str:
    """The prompt from -p or standard input; when resuming a saved stream it may be empty."""
    if prompt is not None:
        text = prompt
    elif sys.stdin.isatty() and resuming:
        text = ""  # continue the saved stream as it is; do not wait for typing
    else:
        if sys.stdin.isatty():
            click.echo("Type the prompt, then Ctrl-D:", err=True)
        text = sys.stdin.read()
    if not text and not resuming:
        raise click.UsageError("nothing to continue: give a prompt with -p or on standard input")
    return text


@main.command()
@click.argument("args", nargs=-1, metavar="[MODEL] [FILE]...")
@session_options
@click.option("--then", "then_prompt", default=None, help="Afterwards, feed this text and generate a continuation.")
@click.option("--save", "save_path", type=click.Path(dir_okay=False, writable=True), callback=check_save_path,
              default=None, help="Save the session to this file at the end (--resume continues it).")
@resume_option
@sampling_options
@friendly_errors
def feed(args, session_args, then_prompt, save_path, resume_path, **sampling):
    """Stream text files through a session and print the stats.

    Any amount of text goes through at constant memory. FILE may be '-' for standard input, which is also read when no FILE is given. The first
    argument is the MODEL when it names one (a .gguf file, a registry name or a Hub spec).
    Progress (tokens, tokens/s, evictions) goes to standard error. --save keeps the session to
    continue later: 'feed --resume' feeds more, 'generate --resume' continues it (so does the
    Python API's Session.restore).
    """
    generation = sampling_from(**sampling)
    model, names = split_model_and_files(args)
    opened = [open_input(name) for name in names if name != "-"]
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    files = [stdin if name == "-" else opened.pop(0) for name in names] or [stdin]
    try:
        with open_session(model, session_args, resume=resume_path) as session:
            feeding.feed_files(session, files, out=sys.stderr)
            if then_prompt:
                session.feed(then_prompt)
                stream_out(session.generate(**generation))
            if save_path:
                save_or_rescue(session, save_path)
    finally:
        for f in files:
            if f is not stdin:
                f.close()


def save_or_rescue(session, path: str) -> None:
    """Save to ``path``; if that fails (the folder went away, the disk is full), save to the temp folder.

    The folder was checked before feeding, but a long feed's work must not be lost to a failure
    at the very end.
    """
    try:
        session.save(path)
    except SessionSaveError as e:
        rescue = Path(tempfile.gettempdir()) / f"edgesink-{os.getpid()}-{Path(path).name}"
        try:
            session.save(rescue)
        except SessionSaveError:
            raise click.ClickException(f"{e}; the session could not be saved to {rescue} either") from e
        raise click.ClickException(f"{e}; saved it to {rescue} instead (continue it with --resume {rescue})") from e
    click.echo(f"saved the session to {path}", err=True)


def looks_like_model(text: str) -> bool:
    """A .gguf path, a registry name or a Hub spec (and not an existing text file)."""

    if text == "-":
        return False
    if Path(text).is_file():
        return text.endswith(".gguf")
    return text.endswith(".gguf") or text in load_registry() or names_hub_model(text)


def looks_like_path(spec: str) -> bool:
    return spec.endswith(".gguf") or os.sep in spec or Path(spec).exists()


def split_model_and_files(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    if args and looks_like_model(args[0]):
        return args[0], list(args[1:])
    return None, list(args)


def open_input(name: str):
    try:
        return open(name, "rb")
    except OSError as e:
        raise click.BadParameter(f"cannot read {name}: {e.strerror}", param_hint="FILE") from e


CHAT_HELP = f"""Chat without end: the cache evicts old messages, the chat goes on.

When the cache is full the oldest turns are evicted whole and the system prompt stays (only
a single turn longer than the cache is cut inside). Replies stream as they are generated.
Ctrl-C stops a reply and keeps the conversation; Ctrl-D or /exit quits. Commands in the chat:

\b
{COMMANDS}

When standard input is not a terminal, each line is a message and the replies are printed
in turn, so a chat can be scripted:

\b
  printf 'Hi\\nWhat did I say?\\n' | edgesink chat
"""


@main.command(help=CHAT_HELP)
@click.argument("model", required=False)
@session_options
@sampling_options
@click.option("--system", default=None, help="System prompt (at most half of --n-ctx); kept in the cache for ever, like the sinks.")
@friendly_errors
def chat(model, session_args, system, **sampling):
    generation = sampling_from(**sampling)
    with open_session(model, session_args) as session:
        run_chat(session, system=system, generation=generation, interactive=sys.stdin.isatty())


SERVE_HELP = """Serve the model over an OpenAI-compatible HTTP API, with conversations that never end.

\b
  POST /v1/chat/completions   chat (stream: true for server-sent events)
  POST /v1/completions        plain text continuation
  GET  /v1/models             the model's id
  GET  /health                whether it can serve; slots, live sessions, queue
  GET/DELETE /v1/sessions/NAME   a named conversation of yours

Name a conversation with the header X-Edgesink-Session: NAME (or the body's "session" field;
OpenAI's "user" field only with --session-from-user): it keeps its cache between requests,
evicts whole turns and keeps its system prompt. A client that re-sends the whole history (as
OpenAI clients do) has the part already fed recognised and skipped; a history that differs
starts the conversation afresh, and the reply says so ("edgesink": {"started_over": ...}).
Each unnamed client gets an anonymous conversation of its own, continued while it re-sends the
same history. With API keys, each key's conversation names are its own. Up to --slots sessions
are live and decode together; the least recently used idle one is saved to --sessions DIR and
freed when another needs its slot. With --sessions, named sessions are saved after every
request and restored after a restart.

Safe by default on a machine with a web browser: the Host header must name this server (DNS
rebinding), a POST must be application/json, and web pages of other origins are refused unless
--cors-origin allows them. A request's prompt work is bounded (--max-prompt-tokens,
--max-messages) and stops within one batch when its client disconnects or the server stops.

Served sessions evict as lone ones do: with the patched libllama the few kept cells move
forward, so sink and window evict one token at a time. With shift_mode window-back (or a stock
libllama, or a sliding-window model such as Gemma 3) every cached cell moves, so they evict 64
tokens at a time unless -o evict_chunk=N says otherwise (a chat evicts whole turns anyway).
"""


@main.command(help=SERVE_HELP)
@click.argument("model", required=False)
@session_options
@serve_options
@friendly_errors
def serve(model, session_args, serve_args):
    from ..serve import run, served_config  # lazy: the HTTP stack (starlette, uvicorn) loads only to serve

    config = _checked(session_args.config)
    kept_forward_mode(config.shift_mode, shared=True)  # a shift mode this libllama cannot run: refused at once
    settings = server_settings(serve_args)  # checked before the model loads
    engine = click.get_current_context().find_object(Engine) or Engine()
    _native.set_verbose(session_args.verbose)
    loaded = engine.load(model, **session_args.load_options())
    config = served_config(loaded, config, evict_chunk_given="evict_chunk" in session_args.settings)
    # Clients name the model by the file's stem, or by the registry or Hub name it was loaded by.
    ids = list(dict.fromkeys([loaded.path.stem] if model is None or looks_like_path(model) else [model, loaded.path.stem]))
    run(loaded, config, model_ids=ids, **settings)


def _add_bench_command() -> None:
    # The context-shift benchmark lives in edgesink.bench; its command imports nothing heavy.
    main.add_command(bench)


_add_bench_command()
