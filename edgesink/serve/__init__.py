"""``edgesink serve``: an OpenAI-compatible HTTP server whose conversations never end.

Named conversations keep their cache between requests; a client that re-sends its whole history
has the part already fed recognised and skipped; sessions decoding at the same moment share one
``llama_decode``. :func:`run` starts it; :mod:`.app` is the HTTP side, :mod:`.guard` what a web
page may not do, :mod:`.access` the keys and whose conversations are whose, :mod:`.pool` the
sessions, :mod:`.turns` one request's work, :mod:`.requests` the checked request fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from ..config import SessionConfig
from ..options import kept_forward_mode
from ..policies import Sink
from .access import Access
from .app import ServeLimits, Server, create_app
from .connections import with_header_timeout
from .guard import RequestGuard
from .pool import SessionPool

__all__ = ["EVICT_CHUNK", "Access", "Listening", "ServeLimits", "Server", "SessionPool", "create_app", "run",
           "served_config"]

EVICT_CHUNK = 64  # served sink/window sessions that move the window back evict this many tokens at a time


def served_config(model, config: SessionConfig, *, evict_chunk_given: bool = False) -> SessionConfig:
    """``config`` as served sessions run it on ``model`` (loaded).

    Served sessions share a context. Where they cannot move their kept tokens forward (shift_mode
    window-back, a libllama without patch 0007, a sliding-window model) every eviction moves every
    cell, so sink and window evict :data:`EVICT_CHUNK` tokens at a time and pay that once per chunk,
    unless ``evict_chunk_given`` (a chat evicts whole turns anyway).
    """
    if evict_chunk_given or kept_forward_mode(config.shift_mode, shared=True, sliding_window=model.n_swa > 0):
        return config
    if not isinstance(config.policy, Sink):
        return config
    return dataclasses.replace(config, policy=dataclasses.replace(config.policy, evict_chunk=EVICT_CHUNK))


@dataclass(frozen=True)
class Listening:
    """Where and how the server listens, and who may reach it."""

    host: str = "127.0.0.1"
    port: int = 8080
    allowed_hosts: tuple[str, ...] = ()  # Host header names accepted besides loopback and ``host``
    cors_origins: tuple[str, ...] = ()  # web origins whose pages may call the server
    max_connections: int = 64  # open connections at most; a request on one more gets 503
    header_timeout: float = 10.0  # seconds a connection may take to send its request headers
    shutdown_timeout: float = 10.0  # seconds from SIGTERM (or Ctrl-C) to exit


def run(model, config, *, listening: Listening, slots: int, sessions_dir: Path | None, sessions_max_bytes: int | None,
        access: Access, limits: ServeLimits, model_ids: list[str], session_from_user: bool = False) -> None:
    """Serve ``model`` until interrupted (Ctrl-C / SIGTERM). Shutting down stops every request between two
    batches or tokens, saves the named sessions that are consistent and exits within ``shutdown_timeout``."""
    pool = SessionPool(model, config, slots=slots, sessions_dir=sessions_dir, max_bytes=sessions_max_bytes)
    server = Server(pool, model_ids, access=access, limits=limits, session_from_user=session_from_user)

    @contextlib.asynccontextmanager
    async def announce(app):
        where = f"http://{listening.host}:{listening.port}"
        print(f"edgesink serve: {model_ids[0]} on {where}/v1 ({slots} slots, n_ctx {config.n_ctx}"
              f"{f', sessions in {sessions_dir}' if sessions_dir else ''}"
              f"{', API keys required' if access.required else ''})", file=sys.stderr, flush=True)
        yield

    app = RequestGuard(create_app(server, lifespan=announce), bind=listening.host,
                       allowed_hosts=listening.allowed_hosts, cors_origins=listening.cors_origins)
    uvicorn_config = uvicorn.Config(
        app, host=listening.host, port=listening.port, log_level="warning",
        http=with_header_timeout(listening.header_timeout),
        limit_concurrency=listening.max_connections, timeout_keep_alive=5,
        timeout_graceful_shutdown=listening.shutdown_timeout / 2)
    http = _StoppingServer(uvicorn_config, server)
    http.run()
    # The event loop has ended (gracefully, or after half the deadline). The workers were told to stop
    # when the signal came; what they hold is saved when they let go of it in time.
    deadline = (http.exit_requested_at or time.monotonic()) + listening.shutdown_timeout
    workers_done = server.wait_for_runs(max(0.0, deadline - time.monotonic() - 1.0))
    closed = pool.close(timeout=max(0.0, deadline - time.monotonic() - 0.5))
    sys.stderr.flush()
    if not (workers_done and closed):
        # A worker is still inside llama.cpp: freeing the context under it would crash, and waiting would
        # break the deadline. Its session's last snapshot (from before this request) is what stays.
        print("edgesink serve: a request did not stop in time; exiting without it", file=sys.stderr, flush=True)
        os._exit(0)


class _StoppingServer(uvicorn.Server):
    """uvicorn's server, which on the first SIGTERM / SIGINT also tells every request to stop, and
    on the second stops waiting for them. A signal's exit status is a clean 0: stopping was asked for."""

    def __init__(self, config, server: Server):
        super().__init__(config)
        self.app_server = server
        self.exit_requested_at: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.exit_requested_at is None:
            self.exit_requested_at = time.monotonic()
        else:
            self.force_exit = True  # a second signal: no more graceful waiting
        self.app_server.begin_shutdown()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()  # not raised again on the way out: the stop was orderly
