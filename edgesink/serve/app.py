"""The HTTP side of ``edgesink serve``: an OpenAI-compatible Starlette app over a :class:`SessionPool`.

Requests are checked here (key, size, JSON, fields: each refusal an OpenAI-shaped error; Host,
Origin and Content-Type are checked before, by :mod:`.guard`), then admitted: one request at a
time per conversation, at most ``slots`` at once, at most ``max_queue`` waiting (429 past that),
none waiting longer than ``queue_timeout`` (503). The engine work runs in worker threads; their
decodes meet in the shared context and are batched. Every run has a stop flag: set when its
client disconnects (streaming or not) and when the server shuts down, and checked between the
prompt's batches and between generated tokens.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..errors import Cancelled, ContextFullError, EdgesinkError, TemplateRenderError
from .access import Access
from .api_errors import ApiError, without_paths
from .pool import ANONYMOUS_PREFIX, Conversation, SessionPool
from .requests import SESSION_HEADER, SESSION_NAME_RULE, RequestRules, chat_request, completion_request, parse_json, \
    valid_name
from .turns import PromptLimits, Turn, chat_turn, completion_turn, reusable


@dataclass(frozen=True)
class ServeLimits:
    """How much the server takes on: beyond these a request gets 400, 408, 413, 429 or 503."""

    max_body_bytes: int = 1 << 20
    max_queue: int = 32  # requests waiting for their conversation or a slot (not those that get one at once)
    queue_timeout: float = 120.0  # seconds a request may wait
    max_tokens: int = 4096  # the most a request may ask to generate
    max_prompt_tokens: int = 8192  # the most prompt a request may have fed
    max_messages: int = 256  # the most messages a request may have fed
    body_timeout: float = 30.0  # seconds a client may take to send its body


class Server:
    """The app's state: the pool, the model's ids, the keys, admission counters, the runs in flight."""

    def __init__(self, pool: SessionPool, model_ids: list[str], *, access: Access, limits: ServeLimits,
                 session_from_user: bool = False):
        self.pool, self.model_ids, self.access, self.limits = pool, model_ids, access, limits
        self.rules = RequestRules(max_tokens=limits.max_tokens, session_from_user=session_from_user)
        self.prompt_limits = PromptLimits(limits.max_prompt_tokens, limits.max_messages)
        self.created = int(time.time())
        self.slots = pool.shared.slots
        self.executor = ThreadPoolExecutor(max_workers=self.slots, thread_name_prefix="edgesink-engine")
        self.engine: asyncio.Semaphore | None = None  # made inside the event loop
        self.gates: dict[tuple[str, str], _Gate] = {}  # one request at a time per conversation
        self.runs: set[_Run] = set()  # in flight: their stop flags are set at shutdown
        self.working = threading.Condition()  # turns running in worker threads (in_workers)
        self.in_workers = 0
        self.closing = False
        self.waiting = 0  # requests waiting for their conversation or a slot
        self.running = 0  # requests holding a slot
        self.anonymous_made = 0

    # -- the routes -----------------------------------------------------------------------------

    async def models(self, request: Request):
        self.access.namespace(request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": self.created, "owned_by": "edgesink"} for m in self.model_ids]})

    async def health(self, request: Request):
        """Whether the server can serve: its context open, its sessions folder writable, not shutting down."""
        problems = self.pool.problems() + (["the server is shutting down"] if self.closing else [])
        return JSONResponse({"status": "unavailable" if problems else "ok", "problems": problems,
                             "slots": self.slots, "live_sessions": self.pool.live_count(),
                             "running": self.running, "waiting": self.waiting},
                            status_code=503 if problems else 200)

    async def chat_completions(self, request: Request):
        namespace = self.access.namespace(request.headers.get("authorization"))
        data = await self._json(request)
        parsed = chat_request(data, request.headers.get(SESSION_HEADER), self.rules)
        return await self._serve(request, namespace, parsed, chat_turn, "chat.completion")

    async def completions(self, request: Request):
        namespace = self.access.namespace(request.headers.get("authorization"))
        data = await self._json(request)
        parsed = completion_request(data, request.headers.get(SESSION_HEADER), self.rules)
        return await self._serve(request, namespace, parsed, completion_turn, "text_completion")

    async def session_info(self, request: Request):
        """GET /v1/sessions/NAME: what a named conversation of the caller's holds (its cache as text
        too); never waits for a request running on it."""
        namespace = self.access.namespace(request.headers.get("authorization"))
        info = self.pool.describe(namespace, _session_name(request))
        if info is None:
            raise ApiError(404, f"no session named {_session_name(request)!r}", code="session_not_found")
        return JSONResponse(info)

    async def forget_session(self, request: Request):
        """DELETE /v1/sessions/NAME: forget a conversation of the caller's, its snapshot too."""
        namespace = self.access.namespace(request.headers.get("authorization"))
        name = _session_name(request)
        gate = self._gate((namespace, name))
        try:
            async with gate.lock:  # after a request running on it
                found = await asyncio.get_running_loop().run_in_executor(None, self.pool.forget, namespace, name)
        finally:
            self._leave(gate)
        if not found:
            raise ApiError(404, f"no session named {name!r}", code="session_not_found")
        return JSONResponse({"name": name, "deleted": True})

    # -- checks -----------------------------------------------------------------------------------

    async def _json(self, request: Request) -> dict:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
        body = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_timeout):
                async for part in request.stream():
                    body += part
                    if len(body) > limit:
                        raise ApiError(413, f"the request body exceeds the limit of {limit} bytes",
                                       code="body_too_large")
        except ClientDisconnect:
            raise ApiError(400, "the client went away while sending the request") from None
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.limits.body_timeout:g} s",
                           code="body_timeout") from None
        return parse_json(bytes(body))

    def _check_model(self, model: str) -> None:
        if model not in self.model_ids:
            raise ApiError(404, f"the model {model!r} is not served here; this server serves "
                                f"{', '.join(map(repr, self.model_ids))}", param="model", code="model_not_found")

    # -- admission ----------------------------------------------------------------------------------

    def _gate(self, key: tuple[str, str]) -> "_Gate":
        gate = self.gates.setdefault(key, _Gate(key))
        gate.users += 1
        return gate

    def _leave(self, gate: "_Gate") -> None:
        """A request is done with a conversation's gate; the last one out removes it from the map."""
        gate.users -= 1
        if not gate.users and self.gates.get(gate.key) is gate:
            del self.gates[gate.key]

    async def _admit(self, key: tuple[str, str]) -> "_Gate":
        """Wait for the conversation and a slot; 429 when too many wait, 503 after queue_timeout.

        A request that can have both at once does not count as waiting, so ``max_queue`` 0 still
        serves up to ``slots`` requests at a time."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", kind="server_error", code="shutting_down")
        if self.engine is None:
            self.engine = asyncio.Semaphore(self.slots)
        gate = self.gates.get(key)
        if ((gate is not None and gate.lock.locked()) or self.engine.locked()) and self.waiting >= self.limits.max_queue:
            raise ApiError(429, f"{self.waiting} requests are waiting already; retry later",
                           kind="rate_limit_error", code="queue_full")
        gate = self._gate(key)
        self.waiting += 1
        deadline = time.monotonic() + self.limits.queue_timeout
        try:
            await asyncio.wait_for(gate.lock.acquire(), self.limits.queue_timeout)
            try:
                await asyncio.wait_for(self.engine.acquire(), max(0.0, deadline - time.monotonic()))
            except BaseException:
                gate.lock.release()
                raise
        except asyncio.TimeoutError:
            self._leave(gate)
            raise ApiError(503, f"no slot came free within {self.limits.queue_timeout:g} s; retry later",
                           kind="server_error", code="overloaded") from None
        except BaseException:
            self._leave(gate)
            raise
        finally:
            self.waiting -= 1
        return gate

    # -- serving one request ---------------------------------------------------------------------------

    async def _serve(self, request: Request, namespace: str, parsed, turn_fn, kind: str):
        self._check_model(parsed.model)
        name = parsed.session or self._anonymous_for(namespace, parsed)
        conversation = self.pool.conversation(namespace, name)
        run = _Run(asyncio.Queue(), threading.Event(), Turn())
        watcher = asyncio.create_task(_watch_disconnect(request, run.stop))
        try:
            gate = await self._admit(conversation.key)
            self._start(conversation, parsed, turn_fn, gate, run)
            reply = _Reply(kind, f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                           parsed.model, parsed.session, parsed.generation.include_usage, run.turn)
            if parsed.generation.stream:
                return await self._streamed(run, reply)
            return await self._whole(run, reply)
        finally:
            watcher.cancel()  # a streamed response listens for the disconnect itself

    def _start(self, conversation: Conversation, parsed, turn_fn, gate: "_Gate", run: "_Run") -> None:
        """Run the request's turn in a worker thread; its text pieces arrive on the run's queue."""
        loop = asyncio.get_running_loop()

        def emit(item) -> None:
            loop.call_soon_threadsafe(run.queue.put_nowait, item)

        def work() -> None:
            with self.working:
                self.in_workers += 1
            try:
                with self.pool.using(conversation):
                    for piece in turn_fn(self.pool, conversation, parsed, run.turn, run.stop.is_set,
                                         self.prompt_limits):
                        emit(("piece", piece))
            except Exception as error:  # to the client as an error; the session stays consistent
                emit(("error", error))
            finally:
                with self.working:
                    self.in_workers -= 1
                    self.working.notify_all()

        self.running += 1
        self.runs.add(run)
        run.future = loop.run_in_executor(self.executor, work)
        run.future.add_done_callback(lambda _: self._finished(gate, run))

    async def _whole(self, run: "_Run", reply: "_Reply"):
        pieces = []
        try:
            while (item := await run.queue.get())[0] == "piece":
                pieces.append(item[1])
        finally:
            run.stop.set()  # the handler was cancelled while waiting: stop generating
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

    def _anonymous_for(self, namespace: str, parsed) -> str:
        """The anonymous conversation of the caller's an unnamed request goes to: an idle one holding the
        start of its history (prefix reuse), else a new one while there are slots, else the least
        recently used."""
        anonymous = self.pool.anonymous(namespace)
        idle = [c for c in anonymous if not (c.key in self.gates and self.gates[c.key].lock.locked())]
        held = {c.name: reusable(c, parsed) for c in idle}
        best = max(idle, key=lambda c: held[c.name], default=None)
        if best is not None and held[best.name]:
            return best.name
        if len(anonymous) < self.slots:
            self.anonymous_made += 1
            return f"{ANONYMOUS_PREFIX}{self.anonymous_made}"
        return min(idle or anonymous, key=lambda c: c.last_used).name

    def _finished(self, gate: "_Gate", run: "_Run") -> None:
        """A request's worker is done: its conversation and its slot are free (runs in the event loop).

        "done" is queued only now, so a client that sends its next turn the moment it has its reply
        finds its conversation idle, ready to be continued."""
        self.running -= 1
        self.runs.discard(run)
        gate.lock.release()
        self._leave(gate)
        self.engine.release()
        run.queue.put_nowait(("done", None))

    def begin_shutdown(self) -> None:
        """Refuse new requests and tell every run to stop (between batches or tokens). Safe to call
        from a signal handler."""
        self.closing = True
        for run in list(self.runs):
            run.stop.set()

    def wait_for_runs(self, timeout: float) -> bool:
        """Wait (in the calling thread, after the event loop ended) for the workers' turns to end;
        whether they all did within ``timeout`` seconds. Turns not yet started never start."""
        self.executor.shutdown(wait=False, cancel_futures=True)
        with self.working:
            return self.working.wait_for(lambda: self.in_workers == 0, timeout)

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


async def _watch_disconnect(request: Request, stop: threading.Event) -> None:
    """Set ``stop`` when the client disconnects (the body is read by then: the next message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stop.set()
            return


@dataclass(eq=False)
class _Gate:
    """One conversation's turn-taking: its lock and how many requests hold or wait for it."""

    key: tuple[str, str]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(eq=False)  # kept in a set by identity
class _Run:
    """A request's turn running in a worker: its pieces, its stop flag, what it did."""

    queue: asyncio.Queue
    stop: threading.Event
    turn: Turn
    future: asyncio.Future | None = None


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
    if not valid_name(name):
        raise ApiError(400, SESSION_NAME_RULE, param="name")
    return name


def _as_api_error(error: Exception) -> ApiError:
    """What a client is told of an error its request met: 400 for what its input caused."""
    if isinstance(error, ApiError):
        return error
    message = without_paths(f"{type(error).__name__}: {error}")  # the server's file paths stay its own
    if isinstance(error, Cancelled):
        return ApiError(499, "the request was cancelled (the client went away, or the server is shutting down)",
                        kind="server_error", code="cancelled")
    if isinstance(error, (ValueError, TemplateRenderError, ContextFullError)):
        # A system prompt too long, a message the template refuses, a dense cache full, a bad value...
        return ApiError(400, message)
    if isinstance(error, EdgesinkError):
        return ApiError(500, message, kind="server_error")
    return ApiError(500, f"internal error: {message}", kind="server_error")


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
