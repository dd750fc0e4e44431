"""The options of ``edgesink serve`` beyond the session's: where it listens, who may reach it, how
much one request may cost. Kept here so the command itself stays a few lines."""

from __future__ import annotations

import functools
from pathlib import Path

import click

LISTENING = ("host", "port", "allow_host", "cors_origin", "max_connections", "header_timeout", "shutdown_timeout")
LIMITS = ("max_body", "max_queue", "queue_timeout", "max_tokens_limit", "max_prompt_tokens", "max_messages",
          "body_timeout")

_OPTIONS = [
    click.option("--host", default="127.0.0.1", show_default=True,
                 help="Address to listen on (0.0.0.0 exposes the server to the network: add --allow-host and keys)."),
    click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to listen on."),
    click.option("--allow-host", multiple=True, metavar="NAME",
                 help="Accept this name in the Host header besides localhost, 127.0.0.1, [::1] and --host "
                      "(repeatable; '*' accepts any: DNS rebinding is then possible)."),
    click.option("--cors-origin", multiple=True, metavar="ORIGIN",
                 help="Let pages of this web origin (https://app.example) call the server, with CORS (repeatable). "
                      "Other origins are refused."),
    click.option("--api-key", "api_keys", multiple=True, envvar="EDGESINK_API_KEY",
                 help="Require 'Authorization: Bearer KEY' (repeatable; or EDGESINK_API_KEY). Each key's "
                      "conversations are its own. Visible in ps: prefer --api-keys-file."),
    click.option("--api-keys-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="A file of API keys, one per line ('#' comments)."),
    click.option("--sessions", "sessions_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                 help="Folder for session snapshots: named sessions survive restarts."),
    click.option("--sessions-max-bytes", type=click.IntRange(min=1), default=None,
                 help="Most bytes the snapshots may take; the oldest idle ones are removed past it."),
    click.option("--session-from-user", is_flag=True,
                 help="Let OpenAI's 'user' field name the conversation (by default it is ignored)."),
    click.option("--slots", type=click.IntRange(1, 64), default=4, show_default=True,
                 help="Sessions live at once (one llama.cpp sequence each, decoded together)."),
    click.option("--max-queue", type=click.IntRange(min=0), default=32, show_default=True,
                 help="Requests that may wait for their conversation or a slot; more get 429."),
    click.option("--queue-timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
                 help="Seconds a request may wait before a 503."),
    click.option("--max-body", type=click.IntRange(min=1024), default=1 << 20, show_default=True,
                 help="Largest request body in bytes; larger get 413."),
    click.option("--max-tokens", "max_tokens_limit", type=click.IntRange(min=1), default=4096, show_default=True,
                 help="The most tokens one request may ask to generate."),
    click.option("--max-prompt-tokens", type=click.IntRange(min=1), default=8192, show_default=True,
                 help="The most prompt tokens one request may have fed (what the session does not hold yet)."),
    click.option("--max-messages", type=click.IntRange(min=1), default=256, show_default=True,
                 help="The most messages one request may have fed."),
    click.option("--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
                 help="Open connections at most; a request on one more gets 503."),
    click.option("--header-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
                 help="Seconds a connection may take to send its request headers."),
    click.option("--body-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
                 help="Seconds a client may take to send its request body (408 after)."),
    click.option("--shutdown-timeout", type=click.FloatRange(min=1.0), default=10.0, show_default=True,
                 help="Seconds from SIGTERM or Ctrl-C to exit: requests stop, consistent sessions are saved."),
]


def serve_options(fn):
    """The serve command's own options, gathered into one ``serve_args`` dict."""
    for option in reversed(_OPTIONS):
        fn = option(fn)
    names = [*LISTENING, *LIMITS, "api_keys", "api_keys_file", "sessions_dir", "sessions_max_bytes",
             "session_from_user", "slots"]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        serve_args = {name: kwargs.pop(name) for name in names if name in kwargs}
        return fn(*args, serve_args=serve_args, **kwargs)

    return wrapper


def server_settings(serve_args: dict) -> dict:
    """Keywords for ``edgesink.serve.run`` from the command's options (the HTTP stack loads here)."""
    from ..serve import Access, Listening, ServeLimits  # lazy: starlette and uvicorn load only to serve

    a = serve_args
    try:
        access = Access.from_options(tuple(a["api_keys"]), a["api_keys_file"])
    except (ValueError, OSError) as error:
        raise click.BadParameter(str(error), param_hint="'--api-key' / '--api-keys-file'") from error
    listening = Listening(a["host"], a["port"], tuple(a["allow_host"]), tuple(a["cors_origin"]), a["max_connections"],
                          a["header_timeout"], a["shutdown_timeout"])
    limits = ServeLimits(a["max_body"], a["max_queue"], a["queue_timeout"], a["max_tokens_limit"],
                         a["max_prompt_tokens"], a["max_messages"], a["body_timeout"])
    if a["sessions_dir"]:
        a["sessions_dir"].mkdir(parents=True, exist_ok=True)
    return {"listening": listening, "slots": a["slots"], "sessions_dir": a["sessions_dir"],
            "sessions_max_bytes": a["sessions_max_bytes"], "access": access, "limits": limits,
            "session_from_user": a["session_from_user"]}
