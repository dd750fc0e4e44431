"""One request's work on its conversation: recognise what the cache already holds, feed the rest,
generate. Runs in a worker thread (it calls llama.cpp), inside ``SessionPool.using``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from .pool import Conversation, SessionPool, text_digest
from .requests import ChatRequest, CompletionRequest


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
              stopped: Callable[[], bool]) -> Iterator[str]:
    """The reply's text pieces; ``turn`` is filled in as it goes (complete once exhausted)."""
    session = conversation.session
    messages = list(request.messages)
    turn.started_over, conversation.lost = conversation.lost, None
    held = reusable(conversation, request)
    if held:
        new, turn.reused_messages = messages[held:], held
    else:
        if session.tokens_seen:
            turn.started_over = ("the request's history differs from the conversation's" if session.in_chat
                                 else "the conversation held a completions stream")
            session = pool.start_over(conversation)
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        session.start_chat(system)
        new = messages[1:] if system is not None else messages
    with _counting(session, turn):
        for message in new[:-1]:
            session.add_message(message["content"], message["role"])
        last = new[-1]
        chunks = session.stream_chat(last["content"], last["role"], **request.generation.sampling())
        turn.fed = session.tokens_seen - turn.seen_before
        yield from _pieces(chunks, turn, stopped)


def completion_turn(pool: SessionPool, conversation: Conversation, request: CompletionRequest, turn: Turn,
                    stopped: Callable[[], bool]) -> Iterator[str]:
    """As :func:`chat_turn`, for a plain text stream: a prompt that extends the stream's text feeds
    only what is new."""
    session, prompt = conversation.session, request.prompt
    turn.started_over, conversation.lost = conversation.lost, None
    held = reusable(conversation, request)
    if held:
        new = prompt[held:]
    else:
        if session.tokens_seen:
            turn.started_over = "the prompt does not extend the conversation's text"
            session = pool.start_over(conversation)
        new = prompt
    pieces = []
    with _counting(session, turn):
        if new:
            session.feed(new)
        turn.fed = session.tokens_seen - turn.seen_before
        for piece in _pieces(session.stream_generate(**request.generation.sampling()), turn, stopped):
            pieces.append(piece)
            yield piece
    text = prompt + "".join(pieces)
    conversation.text_digest, conversation.text_length = text_digest(text), len(text)


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


def _pieces(chunks, turn: Turn, stopped: Callable[[], bool]) -> Iterator[str]:
    """Text pieces of generation chunks, ending early (cleanly) when the client went away."""
    try:
        for chunk in chunks:
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
        stats = self.session.stats
        self.turn.generated = stats.tokens_seen - self.turn.seen_before - self.turn.fed
        self.turn.evicted = stats.evictions - self.evicted_before
        self.turn.cached = stats.tokens_in_cache
