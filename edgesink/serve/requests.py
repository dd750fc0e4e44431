"""The OpenAI-style requests the server takes, checked field by field into small dataclasses.

Every problem is an :class:`ApiError`: the HTTP status and the OpenAI-shaped error body a client
gets. Unknown fields are ignored (clients send many optional ones); known fields of the wrong
type or range are refused, naming the field, and so are fields the server does not implement
(``tools``, ``logit_bias``...): ignoring them would let a client believe they took effect.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .api_errors import ApiError, bad
from .structured import grammar_for

SESSION_HEADER = "x-edgesink-session"  # or the body's "session" field (also "user", as OpenAI names it)
SESSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch: no trailing newline
SESSION_NAME_RULE = "a session name is 1-64 letters, digits, '_', '.' or '-', beginning with a letter or digit"
ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
# Fields a client may send expecting an effect the server does not have: refused, never ignored.
UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "logit_bias", "logprobs", "top_logprobs",
               "parallel_tool_calls", "audio", "modalities", "prediction")


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
    grammar: str | None = None  # GBNF from response_format (JSON mode); None: free text

    def sampling(self) -> dict:
        """Keywords for ``Session.stream_generate``."""
        sampling = {"max_tokens": self.max_tokens, "stop": self.stop, "temperature": self.temperature,
                    "top_p": self.top_p, "seed": self.seed}
        if self.grammar is not None:
            sampling["grammar"] = self.grammar
        return sampling


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


MAX_JSON_DEPTH = 32  # no OpenAI request nests deeper; json.loads would recurse further


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise bad(f"the request body is not valid JSON ({error})") from None
    except RecursionError:
        raise bad(f"the request body's JSON nests deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise bad(f"the request body's JSON nests deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(data, dict):
        raise bad("the request body must be a JSON object")
    return data


def _depth(value) -> int:
    """How deeply ``value`` nests lists and objects (iteratively: a deep one cannot overflow the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


@dataclass(frozen=True)
class RequestRules:
    """What the server's settings say about requests: generation and prompt limits, names."""

    max_tokens: int = 4096  # the most a request may ask to generate
    session_from_user: bool = False  # OpenAI's ``user`` field names the conversation (off: it is ignored)


def chat_request(data: dict, header_session: str | None, rules: RequestRules) -> ChatRequest:
    _refuse_unsupported(data)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    checked = tuple(_message(m, i) for i, m in enumerate(messages))
    if checked[-1]["role"] == "assistant":
        raise bad("the last message must not be the assistant's: there is nothing to reply to", "messages")
    if all(m["role"] == "system" for m in checked):
        raise bad("messages hold only system messages: add a user message to reply to", "messages")
    generation = _generation(data, rules.max_tokens, grammar=_grammar(data))
    return ChatRequest(_model(data), checked, generation, _session(data, header_session, rules))


def completion_request(data: dict, header_session: str | None, rules: RequestRules) -> CompletionRequest:
    _refuse_unsupported(data)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad("prompt must be a non-empty string (one prompt per request)", "prompt")
    for field in ("echo", "suffix"):
        if data.get(field):
            raise bad(f"{field} is not supported by this server", field)
    generation = _generation(data, rules.max_tokens, default_max=16, grammar=_grammar(data))
    return CompletionRequest(_model(data), prompt, generation, _session(data, header_session, rules))


def _refuse_unsupported(data: dict) -> None:
    """A 400 naming the first field the server would otherwise ignore while the client counts on it."""
    for field in UNSUPPORTED:
        value = data.get(field)
        if value not in (None, False, "none", [], {}):
            raise bad(f"{field} is not supported by this server (it would be ignored): leave it out", field)


def _grammar(data: dict) -> str | None:
    """GBNF for the request's ``response_format`` (JSON mode, a JSON schema); None for free text."""
    response_format = data.get("response_format")
    return None if response_format is None else grammar_for(response_format)


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
    role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
    if role not in ROLES:
        raise bad(f"{param}.role must be one of {', '.join(ROLES)} (or developer), got {role!r}", f"{param}.role")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad(f"{param}.content: only text parts are supported", f"{param}.content")
        content = "".join(p["text"] for p in content)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise bad(f"{param}.content must be a string", f"{param}.content")
    return {"role": role, "content": content}


def _generation(data: dict, limit: int, default_max: int = 512, grammar: str | None = None) -> Generation:
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
    return Generation(max_tokens, temperature, top_p, tuple(stop), seed, stream, bool(options.get("include_usage")),
                      grammar)


def _number(data: dict, key: str, default: float, low: float, high: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise bad(f"{key} must be a number in [{low}, {high}], got {value!r}", key)
    return float(value)


def _session(data: dict, header: str | None, rules: RequestRules) -> str | None:
    """The conversation's name: the header, else the body's "session" field (or "user", only when the
    server was told so: OpenAI clients send it to identify a person, not to name a stored conversation);
    None: unnamed."""
    name = header or data.get("session") or (data.get("user") if rules.session_from_user else None)
    if name is None:
        return None
    if not valid_name(name):
        raise bad(SESSION_NAME_RULE, "session")
    return name


def valid_name(name) -> bool:
    """Whether ``name`` may name a conversation (and so a file in the sessions folder)."""
    return isinstance(name, str) and SESSION_NAME.fullmatch(name) is not None
