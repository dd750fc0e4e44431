"""The HTTP side of ``edgesink serve``: an OpenAI-compatible Starlette app over a :class:`SessionPool`.

Requests are checked here (auth, size, JSON, fields: each refusal an OpenAI-shaped error), then
admitted: one request at a time per conversation, at most ``slots`` at once, at most
``max_queue`` waiting (429 past that), none waiting longer than ``queue_timeout`` (503). The
engine work runs in worker threads; their decodes meet in the shared context and are batched.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import ContextFullError, EdgesinkError, TemplateRenderError
from .pool import ANONYMOUS_PREFIX, SessionPool
from .requests import SESSION_HEADER, SESSION_NAME, ApiError, chat_request, completion_request, parse_json
from .turns import Turn, chat_turn, completion_turn, reusable


@dataclass(frozen=True)
class ServeLimits:
    """How much the server takes on: beyond these a request gets 413, 429 or 503."""

    max_body_bytes: int = 1 << 20
    max_queue: int = 32  # requests waiting for their conversation or a slot
    queue_timeout: float = 120.0  # seconds a request may wait
    max_tokens: int = 4096  # the most a request may ask to generate


class Server:
    """The app's state: the pool, the model's ids, the key, admission counters."""

    def __init__(self, pool: SessionPool, model_ids: list[str], *, api_key: str | None, limits: ServeLimits):
        self.pool, self.model_ids, self.api_key, self.limits = pool, model_ids, api_key, limits
        self.created = int(time.time())
        self.slots = pool.shared.slots
        self.executor = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="edgesink-engine")
        self.engine: asyncio.Semaphore | None = None  # made inside the event loop
        self.locks: dict[str, asyncio.Lock] = {}
        self.waiting = 0  # requests waiting for their conversation or a slot
        self.running = 0  # requests holding a slot
        self.anonymous_made = 0

    # -- the routes -----------------------------------------------------------------------------

    async def models(self, request: Request):
        self._check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": self.created, "owned_by": "edgesink"} for m in self.model_ids]})

    async def health(self, request: Request):
        return JSONResponse({"status": "ok", "slots": self.slots, "live_sessions": self.pool.live_count(),
                             "running": self.running,
                             "waiting": self.waiting})

    async def chat_completions(self, request: Request):
        self._check_key(request)
        data = await self._json(request)
        parsed = chat_request(data, request.headers.get(SESSION_HEADER), self.limits.max_tokens)
        return await self._serve(parsed, chat_turn, "chat.completion")

    async def completions(self, request: Request):
        self._check_key(request)
        data = await self._json(request)
        parsed = completion_request(data, request.headers.get(SESSION_HEADER), self.limits.max_tokens)
        return await self._serve(parsed, completion_turn, "text_completion")

    async def session_info(self, request: Request):
        """GET /v1/sessions/NAME: what a named conversation holds (its cache as text too)."""
        self._check_key(request)
        name = _session_name(request)
        loop = asyncio.get_running_loop()
        info = await loop.run_in_executor(None, self.pool.describe, name)
        if info is None:
            raise ApiError(404, f"no session named {name!r}", code="session_not_found")
        return JSONResponse(info)

    async def forget_session(self, request: Request):
        """DELETE /v1/sessions/NAME: forget a conversation, its snapshot too."""
        self._check_key(request)
        name = _session_name(request)
        async with self.locks.setdefault(name, asyncio.Lock()):  # after a request running on it
            found = await asyncio.get_running_loop().run_in_executor(None, self.pool.forget, name)
        if not found:
            raise ApiError(404, f"no session named {name!r}", code="session_not_found")
        return JSONResponse({"name": name, "deleted": True})

    # -- checks -----------------------------------------------------------------------------------

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                           kind="authentication_error", code="invalid_api_key")

    async def _json(self, request: Request) -> dict:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
        except ClientDisconnect:
            raise ApiError(400, "the client went away while sending the request") from None
        return parse_json(bytes(body))

    def _check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise ApiError(404, f"the model {model!r} is not served here; this server serves "
                                f"{', '.join(map(repr, self.model_ids))}", param="model", code="model_not_found")

    # -- admission ----------------------------------------------------------------------------------

    async def _admit(self, name: str) -> asyncio.Lock:
        """Wait for the conversation and a slot; 429 when too many wait, 503 after queue_timeout."""
        if self.engine is None:
            self.engine = asyncio.Semaphore(self.slots)
        if self.waiting >= self.limits.max_queue:
            raise ApiError(429, f"{self.waiting} requests are waiting already; retry later",
                           kind="rate_limit_error", code="queue_full")
        self.waiting += 1
        lock = self.locks.setdefault(name, asyncio.Lock())
        deadline = time.monotonic() + self.limits.queue_timeout
        try:
            await asyncio.wait_for(lock.acquire(), self.limits.queue_timeout)
            try:
                await asyncio.wait_for(self.engine.acquire(), max(0.0, deadline - time.monotonic()))
            except BaseException:
                lock.release()
                raise
        except asyncio.TimeoutError:
            raise ApiError(503, f"no slot came free within {self.limits.queue_timeout:g} s; retry later",
                           kind="server_error", code="overloaded") from None
        finally:
            self.waiting -= 1
        return lock

    # -- serving one request ---------------------------------------------------------------------------

    async def _serve(self, parsed, turn_fn, kind: str):
        self._check_model(parsed.model)
        name = parsed.session or self._anonymous_for(parsed)
        lock = await self._admit(name)
        run = self._start(name, parsed, turn_fn, lock)
        reply = _Reply(kind, f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                       parsed.model, parsed.session, parsed.generation.include_usage, run.turn)
        if parsed.generation.stream:
            return await self._streamed(run, reply)
        return await self._whole(run, reply)

    def _start(self, name: str, parsed, turn_fn, lock: asyncio.Lock) -> "_Run":
        """Run the request's turn in a worker thread; its text pieces arrive on the run's queue."""
        loop = asyncio.get_running_loop()
        run = _Run(asyncio.Queue(), threading.Event(), Turn())
        conversation = self.pool.conversation(name)

        def emit(item) -> None:
            loop.call_soon_threadsafe(run.queue.put_nowait, item)

        def work() -> None:
            try:
                with self.pool.using(conversation), self.pool.shared.busy():  # busy: decodes wait to batch with ours
                    for piece in turn_fn(self.pool, conversation, parsed, run.turn, run.stop.is_set):
                        emit(("piece", piece))
            except Exception as error:  # to the client as an error; the session stays consistent
                emit(("error", error))

        self.running += 1
        loop.run_in_executor(self.executor, work).add_done_callback(lambda _: self._finished(lock, run))
        return run

    async def _whole(self, run: "_Run", reply: "_Reply"):
        pieces = []
        try:
            while (item := await run.queue.get())[0] == "piece":
                pieces.append(item[1])
        finally:
            run.stop.set()  # the client went away while waiting: stop generating
        if item[0] == "error":
            raise _as_api_error(item[1])
        return JSONResponse(reply.whole("".join(pieces)), headers=reply.headers())

    async def _streamed(self, run: "_Run", reply: "_Reply"):
        try:
            first = await run.queue.get()  # the prompt is fed by then: its errors get their own status
        except BaseException:
            run.stop.set()
            raise
        if first[0] == "error":
            raise _as_api_error(first[1])
        return StreamingResponse(self._events(first, run, reply), media_type="text/event-stream",
                                 headers={**reply.headers(), "cache-control": "no-cache"})

    def _anonymous_for(self, parsed) -> str:
        """The anonymous conversation an unnamed request goes to: an idle one holding the start of
        its history (prefix reuse), else a new one while there are slots, else the least recently used."""
        anonymous = self.pool.anonymous()
        idle = [c for c in anonymous if not (c.name in self.locks and self.locks[c.name].locked())]
        held = {c.name: reusable(c, parsed) for c in idle}
        best = max(idle, key=lambda c: held[c.name], default=None)
        if best is not None and held[best.name]:
            return best.name
        if len(anonymous) < self.slots:
            self.anonymous_made += 1
            return f"{ANONYMOUS_PREFIX}{self.anonymous_made}"
        return min(idle or anonymous, key=lambda c: c.last_used).name

    def _finished(self, lock: asyncio.Lock, run: "_Run") -> None:
        """A request's worker is done: its conversation and its slot are free (runs in the event loop).

        "done" is queued only now, so a client that sends its next turn the moment it has its reply
        finds its conversation idle, ready to be continued."""
        self.running -= 1
        lock.release()
        self.engine.release()
        run.queue.put_nowait(("done", None))

    async def _events(self, item, run: "_Run", reply: "_Reply"):
        """Server-sent events: a chunk per text piece, a last one with the finish reason, then [DONE]."""
        try:
            if reply.kind == "chat.completion":
                yield _sse(reply.chunk({"role": "assistant", "content": ""}))
            while item[0] == "piece":
                yield _sse(reply.chunk({"content": item[1]} if reply.kind == "chat.completion" else item[1]))
                item = await run.queue.get()
            if item[0] == "error":
                yield _sse(_as_api_error(item[1]).body())
                return
            yield _sse(reply.last_chunk())
            if reply.include_usage:
                yield _sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            run.stop.set()  # a client gone mid-stream: the worker stops after the current token


@dataclass
class _Run:
    """A request's turn running in a worker: its pieces, its stop flag, what it did."""

    queue: asyncio.Queue
    stop: threading.Event
    turn: Turn


@dataclass
class _Reply:
    """The response's OpenAI shape: whole, or as stream chunks."""

    kind: str  # "chat.completion" or "text_completion"
    id: str
    model: str
    session: str | None  # the client's name for the conversation; None for unnamed requests
    include_usage: bool
    turn: Turn

    def headers(self) -> dict:
        headers = {"x-edgesink-session": self.session} if self.session else {}
        if self.turn.started_over:
            headers["x-edgesink-started-over"] = "1"
        return headers

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model}

    def whole(self, text: str) -> dict:
        turn = self.turn
        if self.kind == "chat.completion":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": turn.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": turn.finish_reason, "logprobs": None}
        return {**self._head(self.kind), "choices": [choice], "usage": turn.usage(),
                "edgesink": turn.extension(self.session)}

    def chunk(self, delta, finish_reason: str | None = None) -> dict:
        if self.kind == "chat.completion":
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def last_chunk(self) -> dict:
        last = self.chunk({} if self.kind == "chat.completion" else "", self.turn.finish_reason)
        return {**last, "edgesink": self.turn.extension(self.session)}

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return {**self._head(kind), "choices": [], "usage": self.turn.usage()}


def _session_name(request: Request) -> str:
    name = request.path_params["name"]
    if not SESSION_NAME.match(name):
        raise ApiError(400, "a session name is 1-64 letters, digits, '_', '.' or '-', beginning with a letter or digit")
    return name


def _as_api_error(error: Exception) -> ApiError:
    """What a client is told of an error its request met: 400 for what its input caused."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, (ValueError, TemplateRenderError, ContextFullError)):
        # A system prompt too long, a message the template refuses, a dense cache full, a bad value...
        return ApiError(400, f"{type(error).__name__}: {error}")
    if isinstance(error, EdgesinkError):
        return ApiError(500, f"{type(error).__name__}: {error}", kind="server_error")
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _api_error(request: Request, error: ApiError):
    return JSONResponse(error.body(), status_code=error.status,
                        headers={"retry-after": "1"} if error.status in (429, 503) else None)


async def _not_found(request: Request, error):
    status = getattr(error, "status_code", 404)
    return JSONResponse(ApiError(status, f"{request.method} {request.url.path}: no such endpoint here"
                                 if status == 404 else str(getattr(error, "detail", "error"))).body(),
                        status_code=status)


async def _internal(request: Request, error: Exception):
    return JSONResponse(_as_api_error(error).body(), status_code=500)


def create_app(server: Server, lifespan=None) -> Starlette:
    """The Starlette app serving ``server``'s pool (``lifespan``: Starlette's start-up/shut-down hook)."""
    routes = [
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/sessions/{name}", server.session_info, methods=["GET"]),
        Route("/v1/sessions/{name}", server.forget_session, methods=["DELETE"]),
        Route("/health", server.health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={ApiError: _api_error, 404: _not_found, 405: _not_found,
                                                        Exception: _internal})
