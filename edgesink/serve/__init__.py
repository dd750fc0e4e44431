"""``edgesink serve``: an OpenAI-compatible HTTP server whose conversations never end.

Named conversations keep their cache between requests; a client that re-sends its whole history
has the part already fed recognised and skipped; sessions decoding at the same moment share one
``llama_decode``. :func:`run` starts it; :mod:`.app` is the HTTP side, :mod:`.pool` the sessions,
:mod:`.turns` one request's work, :mod:`.requests` the checked request fields.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path

from .app import ServeLimits, Server, create_app
from .pool import SessionPool

__all__ = ["EVICT_CHUNK", "ServeLimits", "Server", "SessionPool", "create_app", "run"]

EVICT_CHUNK = 64  # served sink/window sessions evict this many tokens at a time unless told otherwise


def run(model, config, *, host: str, port: int, slots: int, sessions_dir: Path | None, api_key: str | None,
        limits: ServeLimits, model_ids: list[str]) -> None:
    """Serve ``model`` until interrupted (Ctrl-C / SIGTERM); named sessions are saved on the way out."""
    import uvicorn  # the server's own dependency, imported when serving

    pool = SessionPool(model, config, slots=slots, sessions_dir=sessions_dir)
    server = Server(pool, model_ids, api_key=api_key, limits=limits)

    @contextlib.asynccontextmanager
    async def announce(app):
        where = f"http://{host}:{port}"
        print(f"edgesink serve: {model_ids[0]} on {where}/v1 ({slots} slots, n_ctx {config.n_ctx}"
              f"{f', sessions in {sessions_dir}' if sessions_dir else ''})", file=sys.stderr, flush=True)
        yield

    app = create_app(server, lifespan=announce)
    # uvicorn shuts down gracefully on SIGTERM, then raises it again under the handler it found:
    # this one, so the sessions below are saved and the exit status says all went well.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()
    finally:
        server.executor.shutdown(wait=True)
        pool.close()
