"""One request's work on its conversation: recognise what the cache already holds, check what is left
to feed against the limits, feed it (cancellable between batches), generate. Runs in a worker
thread (it calls llama.cpp), inside ``SessionPool.using``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import Cancelled, SettingsError
from ..sampling import Sampler, SamplingParams
from .api_errors import ApiError
from .pool import Conversation, SessionPool, text_digest
from .requests import ChatRequest, CompletionRequest


@dataclass(frozen=True)
class PromptLimits:
    """How much prompt one request may have fed: checked before anything is fed or discarded."""

    max_tokens: int = 8192  # tokens of message contents (or of a completions prompt) to feed
    max_messages: int = 256  # messages to feed


@dataclass
class Turn:
    """What a request did to its conversation: the response's ``usage`` and ``edgesink`` fields."""

    fed: int = 0  # tokens fed for this request (the new part of the prompt)
    generated: int = 0
    evicted: int = 0  # tokens evicted during this request
    cached: int = 0  # tokens in the cache afterwards
    reused_messages: int = 0  # messages of the request the conversation already held (not fed again)
    started_over: str | None = None  # why the conversation started afresh, if it did
    finish_reason: str | None = None
    seen_before: int = 0  # the stream's length when the request began

    def usage(self) -> dict:
        return {"prompt_tokens": self.fed, "completion_tokens": self.generated,
                "total_tokens": self.fed + self.generated,
                "evicted_tokens": self.evicted, "cached_tokens": self.cached}

    def extension(self, name: str | None) -> dict:
        return {"session": name, "reused_messages": self.reused_messages, "started_over": self.started_over}


def chat_turn(pool: SessionPool, conversation: Conversation, request: ChatRequest, turn: Turn,
              stopped: Callable[[], bool], limits: PromptLimits) -> Iterator[str]:
    """The reply's text pieces; ``turn`` is filled in as it goes (complete once exhausted)."""
    if stopped():  # the client left while the request waited: nothing was touched
        turn.finish_reason = "cancelled"
        return
    session = conversation.session
    messages = list(request.messages)
    held = reusable(conversation, request)
    system = None
    if held:
        new = messages[held:]
    else:
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        new = messages[1:] if system is not None else messages
    _check_prompt(pool.model, [m["content"] for m in new] + ([system] if system else []), limits)
    _check_grammar(pool.model, request.generation.grammar)
    turn.started_over, conversation.lost = conversation.lost, None
    turn.reused_messages = held
    if not held and session.tokens_seen:
        turn.started_over = ("the request's history differs from the conversation's" if session.in_chat
                             else "the conversation held a completions stream")
        session = pool.start_over(conversation)
    with _counting(session, turn):
        with session.cancel_when(stopped):
            if not held:
                session.start_chat(system)
            for message in new[:-1]:
                session.add_message(message["content"], message["role"])
            last = new[-1]
            chunks = session.stream_chat(last["content"], last["role"], **request.generation.sampling())
        turn.fed = session.tokens_seen - turn.seen_before
        yield from _pieces(chunks, turn, stopped)


def completion_turn(pool: SessionPool, conversation: Conversation, request: CompletionRequest, turn: Turn,
                    stopped: Callable[[], bool], limits: PromptLimits) -> Iterator[str]:
    """As :func:`chat_turn`, for a plain text stream: a prompt that extends the stream's text feeds
    only what is new."""
    if stopped():
        turn.finish_reason = "cancelled"
        return
    session, prompt = conversation.session, request.prompt
    held = reusable(conversation, request)
    new = prompt[held:]
    _check_prompt(pool.model, [new], limits)
    _check_grammar(pool.model, request.generation.grammar)
    turn.started_over, conversation.lost = conversation.lost, None
    if not held and session.tokens_seen:
        turn.started_over = "the prompt does not extend the conversation's text"
        session = pool.start_over(conversation)
    chunks = []
    with _counting(session, turn):
        if new:
            with session.cancel_when(stopped):
                session.feed(new)
        turn.fed = session.tokens_seen - turn.seen_before
        for piece in _pieces(session.stream_generate(**request.generation.sampling()), turn, stopped, chunks):
            yield piece
    held_text = _hold_only_returned(session, chunks)
    turn.cached = session.stats.tokens_in_cache
    if held_text is None:  # the unseen tokens could not be taken back: the next prompt starts afresh
        conversation.text_digest, conversation.text_length = None, 0
    else:
        text = prompt + held_text
        conversation.text_digest, conversation.text_length = text_digest(text), len(text)


def _check_prompt(model, contents: list[str], limits: PromptLimits) -> None:
    """A 400 before anything is fed or discarded when the prompt to feed is over the limits."""
    if len(contents) > limits.max_messages:
        raise ApiError(400, f"the request would feed {len(contents)} messages; the limit is {limits.max_messages} "
                            "(--max-messages)", param="messages", code="too_many_messages")
    total = 0
    for text in contents:
        total += len(model.tokenize(text))
        if total > limits.max_tokens:
            raise ApiError(400, f"the prompt to feed is over {limits.max_tokens} tokens (--max-prompt-tokens); "
                                "send less, or continue a named session that already holds the rest",
                           code="prompt_too_long")


def _check_grammar(model, grammar: str | None) -> None:
    """A 400 before anything is fed when llama.cpp cannot build the response format's grammar."""
    if grammar is None:
        return
    try:
        Sampler(SamplingParams(grammar=grammar), model).close()
    except SettingsError as error:
        raise ApiError(400, f"response_format: {error}", param="response_format") from None


def _hold_only_returned(session, chunks) -> str | None:
    """Take back the newest tokens the client was not shown (an end token, a stop string), so the
    stream's text is exactly the prompt and what was returned; that returned text, or None when the
    tokens can no longer be taken back."""
    model = session.model
    tokens = [c.token for c in chunks if c.token is not None] + [c.end_token for c in chunks if c.end_token is not None]
    returned = "".join(c.text for c in chunks).encode("utf-8", errors="surrogatepass")
    kept, length = 0, 0
    for token in tokens:
        piece = model.token_bytes(token) if not model.is_end_of_generation(token) else None
        if piece is None or returned[length:length + len(piece)] != piece:
            break
        kept, length = kept + 1, length + len(piece)
    unseen = len(tokens) - kept
    if unseen:
        if session.tokens_seen - unseen < session.first_removable():
            return None
        session.drop_newest(unseen)
    return returned[:length].decode("utf-8", errors="replace")


def reusable(conversation: Conversation, request) -> int:
    """How much of ``request`` the conversation holds already: messages of a chat, characters of a
    prompt; 0 when it holds none of it (or another kind of stream, or is not live)."""
    session = conversation.session
    if session is None:
        return 0
    if isinstance(request, ChatRequest):
        known = session.messages if conversation.mode == "chat" else []
        return len(known) if known and _extends(list(request.messages), known) else 0
    held = conversation.text_length if conversation.mode == "text" else 0
    prompt = request.prompt
    return held if held and len(prompt) >= held and text_digest(prompt[:held]) == conversation.text_digest else 0


def _extends(messages: list[dict], known: list[dict]) -> bool:
    """Whether the request repeats the conversation so far and adds to it (replies compared without
    the whitespace around them, which clients trim)."""
    if len(messages) <= len(known):
        return False
    for sent, held in zip(messages, known):
        if sent["role"] != held["role"]:
            return False
        same = (sent["content"].strip() == held["content"].strip() if held["role"] == "assistant"
                else sent["content"] == held["content"])
        if not same:
            return False
    return True


def _pieces(chunks, turn: Turn, stopped: Callable[[], bool], seen: list | None = None) -> Iterator[str]:
    """Text pieces of generation chunks, ending early (cleanly) when the client went away;
    ``seen`` collects the chunks."""
    try:
        for chunk in chunks:
            if seen is not None:
                seen.append(chunk)
            if chunk.finish_reason:
                turn.finish_reason = "stop" if chunk.finish_reason in ("stop", "stop_string") else "length"
            if chunk.text:
                yield chunk.text
            if stopped():
                turn.finish_reason = "cancelled"
                return
    finally:
        chunks.close()  # the reply so far is recorded in the conversation


class _counting:
    """Fills in a turn's token counts from the session's stats around the work."""

    def __init__(self, session, turn: Turn):
        self.session, self.turn = session, turn

    def __enter__(self):
        stats = self.session.stats
        self.turn.seen_before, self.evicted_before = stats.tokens_seen, stats.evictions

    def __exit__(self, *exc):
        if exc[0] is Cancelled:
            return  # the pool drops the session: its stats are no longer the conversation's
        stats = self.session.stats
        self.turn.generated = stats.tokens_seen - self.turn.seen_before - self.turn.fed
        self.turn.evicted = stats.evictions - self.evicted_before
        self.turn.cached = stats.tokens_in_cache
