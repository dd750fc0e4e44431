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

from ..errors import EdgesinkError, SessionFileError
from .pool import SessionPool
from .requests import SESSION_HEADER, SESSION_NAME, ApiError, chat_request, completion_request, parse_json
from .turns import Turn, chat_turn, completion_turn


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
        name = parsed.session or ""
        lock = await self._admit(name)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        turn = Turn()
        conversation = self.pool.conversation(name)

        def emit(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            with self.pool.shared.busy(), conversation.lock:
                try:
                    self.pool.hold(conversation)
                    try:
                        for piece in turn_fn(self.pool, conversation, parsed, turn, stop.is_set):
                            emit(("piece", piece))
                    finally:
                        self.pool.release(conversation)
                    emit(("done", None))
                except Exception as error:  # to the client as an error; the session stays consistent
                    emit(("error", error))

        self.running += 1
        future = loop.run_in_executor(self.executor, work)
        future.add_done_callback(lambda _: self._finished(lock))
        reply_id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}"
        headers = {"x-edgesink-session": name} if name else {}
        if parsed.generation.stream:
            try:
                first = await queue.get()  # the prompt is fed by then: its errors get their own status
            except BaseException:
                stop.set()
                raise
            if first[0] == "error":
                raise _as_api_error(first[1])
            events = self._events(first, queue, stop, turn, parsed, kind, reply_id, name)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={**headers, "cache-control": "no-cache"})
        pieces = []
        try:
            while (item := await queue.get())[0] == "piece":
                pieces.append(item[1])
        finally:
            stop.set()  # the client went away while waiting: stop generating
        if item[0] == "error":
            raise _as_api_error(item[1])
        body = _response(kind, reply_id, parsed.model, "".join(pieces), turn, name)
        if turn.started_over:
            headers["x-edgesink-started-over"] = "1"
        return JSONResponse(body, headers=headers)

    def _finished(self, lock: asyncio.Lock) -> None:
        """A request's worker is done: its conversation and its slot are free (runs in the event loop)."""
        self.running -= 1
        lock.release()
        self.engine.release()

    async def _events(self, item, queue, stop, turn, parsed, kind, reply_id, name):
        """Server-sent events: a chunk per text piece, a last one with the finish reason, then [DONE]."""
        try:
            if kind == "chat.completion":
                yield _sse(_chunk(kind, reply_id, parsed.model, {"role": "assistant", "content": ""}))
            while item[0] == "piece":
                delta = {"content": item[1]} if kind == "chat.completion" else item[1]
                yield _sse(_chunk(kind, reply_id, parsed.model, delta))
                item = await queue.get()
            if item[0] == "error":
                yield _sse(_as_api_error(item[1]).body())
                return
            last = _chunk(kind, reply_id, parsed.model, {} if kind == "chat.completion" else "", turn.finish_reason)
            last["edgesink"] = turn.extension(name or None)
            yield _sse(last)
            if parsed.generation.include_usage:
                yield _sse({**_chunk(kind, reply_id, parsed.model, None), "choices": [], "usage": turn.usage()})
            yield "data: [DONE]\n\n"
        finally:
            stop.set()  # a client gone mid-stream: the worker stops after the current token


def _session_name(request: Request) -> str:
    name = request.path_params["name"]
    if not SESSION_NAME.match(name):
        raise ApiError(400, "a session name is 1-64 letters, digits, '_', '.' or '-', beginning with a letter or digit")
    return name


def _as_api_error(error: Exception) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, (SessionFileError, EdgesinkError)) and isinstance(error, ValueError):
        return ApiError(400, str(error))
    if isinstance(error, EdgesinkError):
        return ApiError(500, f"{type(error).__name__}: {error}", kind="server_error")
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chunk(kind: str, reply_id: str, model: str, delta, finish_reason: str | None = None) -> dict:
    created = int(time.time())
    if kind == "chat.completion":
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice] if delta is not None else []}
    choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"id": reply_id, "object": "text_completion", "created": created, "model": model,
            "choices": [choice] if delta is not None else []}


def _response(kind: str, reply_id: str, model: str, text: str, turn: Turn, name: str) -> dict:
    if kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": turn.finish_reason,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": turn.finish_reason, "logprobs": None}
    return {"id": reply_id, "object": kind, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": turn.usage(), "edgesink": turn.extension(name or None)}


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
