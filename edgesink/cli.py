"""The ``edgesink`` command line: a thin layer over the public API."""

from __future__ import annotations

import functools
import json
import sys

import click

from . import __version__, _native
from .errors import EdgesinkError
from .policies import POLICY_NAMES


def session_options(fn):
    """Options shared by every command that opens a session."""
    options = [
        click.argument("model", required=False),
        click.option("--n-ctx", default=2048, show_default=True, help="Cache size in tokens (the stream is unbounded)."),
        click.option("--policy", type=click.Choice(POLICY_NAMES), default="sink", show_default=True,
                     help="What to evict when the cache is full."),
        click.option("--sinks", type=int, default=None, help="Attention sinks kept (sink, halve) [default: 4]."),
        click.option("--threads", type=int, default=None, help="CPU threads [default: all cores]."),
        click.option("--n-gpu-layers", type=int, default=-1, show_default=True,
                     help="Layers offloaded to the GPU in GPU builds (-1: all)."),
        click.option("--verbose", is_flag=True, help="Show llama.cpp's log."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def sampling_options(fn):
    """Options shared by every command that generates."""
    options = [
        click.option("--temp", default=0.8, show_default=True, help="Sampling temperature (> 0)."),
        click.option("--top-k", default=40, show_default=True, help="Top-k (1: greedy, 0: off)."),
        click.option("--top-p", default=0.95, show_default=True),
        click.option("--min-p", default=0.05, show_default=True),
        click.option("--repeat-penalty", default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Random seed [default: random]."),
        click.option("--max-tokens", type=int, default=512, show_default=True,
                     help="Tokens per reply; -1: without end (until Ctrl-C)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def friendly_errors(fn):
    """Turn edgesink's and the user's errors into a message and exit status 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (EdgesinkError, ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper


def open_session(model, n_ctx, policy, sinks, threads, n_gpu_layers, verbose, **extra):
    from .model import load
    from .session import Session

    _native.set_verbose(verbose)
    return Session(load(model, n_gpu_layers=n_gpu_layers), n_ctx=n_ctx, policy=policy, sinks=sinks,
                   n_threads=threads, **extra)


def sampling_from(temp, top_k, top_p, min_p, repeat_penalty, seed, max_tokens) -> dict:
    if max_tokens == 0 or max_tokens < -1:
        raise click.BadParameter("must be >= 1, or -1 for no limit", param_hint="--max-tokens")
    return {"temperature": temp, "top_k": top_k, "top_p": top_p, "min_p": min_p,
            "repeat_penalty": repeat_penalty, "seed": seed, "max_tokens": None if max_tokens == -1 else max_tokens}


@click.group()
@click.version_option(__version__, prog_name="edgesink")
def main():
    """edgesink: run a GGUF model on an endless stream of text, with attention sinks.

    MODEL is a .gguf path, a registry name (see 'edgesink models') or a Hugging Face spec
    (owner/repo:QUANT or owner/repo/file.gguf); it defaults to the built-in SmolLM2-135M.
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def info(as_json):
    """Versions, the loaded libllama (patched or not), backends, devices, the default model."""
    from .info import format_info, system_info

    data = system_info()
    click.echo(json.dumps(data, indent=2) if as_json else format_info(data))


@main.command()
@click.argument("spec")
@friendly_errors
def pull(spec):
    """Fetch a model (registry name or Hub spec) into the local cache and print its path."""
    from .hub import pull_model

    click.echo(pull_model(spec))


@main.command()
def models():
    """The registry of known models, and which are fetched here (with sizes)."""
    from .registry import load_registry

    for entry in load_registry().values():
        path = entry.local_path
        where = f"{path} ({path.stat().st_size / 1e6:.0f} MB)" if path.exists() else "not fetched"
        click.echo(f"{entry.name:16s} {entry.description}\n{'':16s} {entry.repo}/{entry.file} - {where}")


@main.command()
@session_options
@sampling_options
@click.option("-p", "--prompt", default=None, help="The text to continue [default: standard input].")
@friendly_errors
def generate(model, n_ctx, policy, sinks, threads, n_gpu_layers, verbose, prompt, **sampling):
    """Continue a prompt (plain text, no chat template)."""
    generation = sampling_from(**sampling)
    text = prompt if prompt is not None else sys.stdin.read()
    with open_session(model, n_ctx, policy, sinks, threads, n_gpu_layers, verbose) as session:
        session.feed(text)
        try:
            for piece in session.generate(**generation):
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            pass
        click.echo()


@main.command()
@session_options
@click.argument("files", nargs=-1, type=click.File("rb"))
@click.option("--save", "save_path", default=None, help="Save the session here afterwards.")
@click.option("--then", "then_prompt", default=None, help="Generate after feeding, from this prompt.")
@sampling_options
@friendly_errors
def feed(model, n_ctx, policy, sinks, threads, n_gpu_layers, verbose, files, save_path, then_prompt, **sampling):
    """Stream FILES (or '-' for standard input) through a session and print its stats."""
    from .feeding import feed_files

    generation = sampling_from(**sampling)
    with open_session(model, n_ctx, policy, sinks, threads, n_gpu_layers, verbose) as session:
        feed_files(session, files or [click.get_binary_stream("stdin")])
        if then_prompt:
            session.feed(then_prompt)
            for piece in session.generate(**generation):
                click.echo(piece, nl=False)
            click.echo()
        if save_path:
            session.save(save_path)
            click.echo(f"saved to {save_path}", err=True)


@main.command()
@session_options
@sampling_options
@click.option("--system", default=None, help="System prompt (kept in the cache for ever).")
@friendly_errors
def chat(model, n_ctx, policy, sinks, threads, n_gpu_layers, verbose, system, **sampling):
    """Chat with MODEL without end: the cache evicts, the chat never stops.

    In the chat: /reset, /stats, /save FILE, /load FILE, /system TEXT, /help, /exit (or Ctrl-D).
    Ctrl-C stops a reply and keeps the session. With standard input not a terminal, each line
    is a message and each reply is printed on its own.
    """
    from .chat_cli import run_chat

    generation = sampling_from(**sampling)
    session = open_session(model, n_ctx, policy, sinks, threads, n_gpu_layers, verbose)
    with session:
        run_chat(session, system=system, generation=generation, interactive=sys.stdin.isatty())
