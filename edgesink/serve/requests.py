"""The OpenAI-style requests the server takes, checked field by field into small dataclasses.

Every problem is an :class:`ApiError`: the HTTP status and the OpenAI-shaped error body a client
gets. Unknown fields are ignored (clients send many optional ones); known fields of the wrong
type or range are refused, naming the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

SESSION_HEADER = "x-edgesink-session"  # or the body's "session" field (also "user", as OpenAI names it)
SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    """A request the server refuses: ``status`` and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


@dataclass(frozen=True)
class Generation:
    """What a request asks of the generation (shared by chat and completions)."""

    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool

    def sampling(self) -> dict:
        """Keywords for ``Session.stream_generate``."""
        return {"max_tokens": self.max_tokens, "stop": self.stop, "temperature": self.temperature,
                "top_p": self.top_p, "seed": self.seed}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict, ...]  # {"role", "content"} with text content
    generation: Generation
    session: str | None


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str
    generation: Generation
    session: str | None


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad(f"the request body is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise bad("the request body must be a JSON object")
    return data


def chat_request(data: dict, header_session: str | None, max_tokens_limit: int) -> ChatRequest:
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    checked = tuple(_message(m, i) for i, m in enumerate(messages))
    if checked[-1]["role"] == "assistant":
        raise bad("the last message must not be the assistant's: there is nothing to reply to", "messages")
    return ChatRequest(_model(data), checked, _generation(data, max_tokens_limit), _session(data, header_session))


def completion_request(data: dict, header_session: str | None, max_tokens_limit: int) -> CompletionRequest:
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be a non-empty string (one prompt per request)", "prompt")
    if data.get("echo") or data.get("suffix") or data.get("logprobs"):
        raise bad("echo, suffix and logprobs are not supported")
    return CompletionRequest(_model(data), prompt, _generation(data, max_tokens_limit, default_max=16),
                             _session(data, header_session))


def _model(data: dict) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model must be a string: the id GET /v1/models lists", "model")
    return model


def _message(message, index: int) -> dict:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad(f"{param} must be an object with role and content", param)
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise bad(f"{param}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{param}.role")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad(f"{param}.content: only text parts are supported", f"{param}.content")
        content = "".join(p["text"] for p in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise bad(f"{param}.content must be a string", f"{param}.content")
    return {"role": role, "content": content}


def _generation(data: dict, limit: int, default_max: int = 512) -> Generation:
    n = data.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise bad(f"n must be 1: a session has one stream, so one reply per request (got {n!r})", "n")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    max_tokens = min(default_max, limit) if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= limit:
        raise bad(f"max_tokens must be an integer in [1, {limit}], got {max_tokens!r}", "max_tokens")
    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    stop = data.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not (isinstance(stop, (list, tuple)) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise bad("stop must be a non-empty string or a list of at most 4 of them", "stop")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32):
        raise bad(f"seed must be an integer in [0, 2**32), got {seed!r}", "seed")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    return Generation(max_tokens, temperature, top_p, tuple(stop), seed, stream, bool(options.get("include_usage")))


def _number(data: dict, key: str, default: float, low: float, high: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise bad(f"{key} must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)


def _session(data: dict, header: str | None) -> str | None:
    """The conversation's name: the header, else the body's "session" (or "user") field; None: unnamed."""
    name = header or data.get("session") or data.get("user")
    if name is None:
        return None
    if not isinstance(name, str) or not SESSION_NAME.match(name):
        raise bad("a session name is 1-64 letters, digits, '_', '.' or '-', beginning with a letter or digit",
                  "session")
    return name
