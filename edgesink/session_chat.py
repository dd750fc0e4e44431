"""A session's conversation methods: :class:`~edgesink.session.Session` takes them from here.

They turn messages into the stream through :class:`~edgesink.chat.Chat` (templates, turns, what
was fed) and tell eviction where a message begins, so a window starts at a turn. The stream
itself (feeding, generation, the cache) is the session's.
"""

from __future__ import annotations

from typing import Iterator

from .chat import Chat
from .layout import turn_cut
from .session_lock import exclusive
from .textstream import GenerationChunk


class ChatMethods:
    """``start_chat``, ``chat``, ``stream_chat``, ``add_message`` and the conversation's read-outs.

    A mixin of :class:`~edgesink.session.Session`: it uses the session's ``_chat`` (the
    :class:`Chat` or None), ``_lock``, ``reset``, ``cache`` and ``_tokens_seen``.
    """

    @exclusive
    def start_chat(self, system: str | None = None, *, keep_system: bool = True, template: str | None = None,
                   continue_stream: bool = False) -> None:
        """Begin a conversation.

        By default the stream is reset first; with ``keep_system`` the whole system prompt is then
        kept in the cache for ever, like the sinks. ``continue_stream=True`` keeps what the stream
        holds (a document fed or loaded) and starts the conversation after it; a system prompt is
        then fed once and leaves the cache like any message. ``template``: a Jinja chat template
        to use instead of the model's own.

        Raises :class:`SystemPromptTooLongError` when the system prompt takes more than half the
        cache (all of it for ``dense``); nothing is changed then.
        """
        self._check_open()
        continuing = continue_stream and self.cache.n_cached > 0
        chat = Chat(self, system=system, keep_system=keep_system, template=template)
        chat.check_system_fits(continuing)  # before the old conversation is touched
        if self.cache.n_cached and not continuing:
            self._chat = None
            self.reset()
        self._chat = chat
        chat.begin(pin=keep_system and not continuing)

    def chat(self, message: str, role: str = "user", **generation) -> Iterator[str]:
        """Send a message and stream the reply (text pieces).

        Outside a conversation, one starts after whatever the stream holds (see
        :meth:`start_chat` with ``continue_stream``). Generation settings as
        :meth:`stream_generate`; ``max_tokens`` defaults to 512.
        """
        self._check_open()
        if self._chat is None:
            self.start_chat(continue_stream=True)
        generation.setdefault("max_tokens", 512)
        return self._chat.send(message, role=role, **generation)

    def stream_chat(self, message: str, role: str = "user", **generation) -> Iterator[GenerationChunk]:
        """As :meth:`chat`, but the message is fed at once and the reply comes as
        :class:`GenerationChunk` objects (with its finish reason)."""
        self._check_open()
        if self._chat is None:
            self.start_chat(continue_stream=True)
        generation.setdefault("max_tokens", 512)
        return self._chat.stream_reply(message, role=role, **generation)

    def add_message(self, message: str, role: str = "user") -> None:
        """Feed a message into the conversation with no reply (replaying a history; ``role`` may be
        ``assistant``). Outside a conversation, one starts after whatever the stream holds."""
        self._check_open()
        if self._chat is None:
            self.start_chat(continue_stream=True)
        self._chat.add(message, role=role)

    @property
    def conversation(self) -> Chat | None:
        """The conversation (:class:`edgesink.chat.Chat`: messages, template, what it fed), or None
        outside chat. For reading: :meth:`chat` and :meth:`start_chat` change it."""
        return self._chat

    @property
    def in_chat(self) -> bool:
        """Whether the stream is a conversation (:meth:`start_chat`, :meth:`chat`, or a loaded chat)."""
        return self._chat is not None

    @property
    def system_prompt(self) -> str | None:
        """The conversation's system prompt (None outside chat or without one)."""
        return self._chat.system if self._chat else None

    @property
    def messages(self) -> list[dict]:
        """The conversation so far (empty outside chat)."""
        return [dict(m) for m in self._chat.messages] if self._chat else []

    def _aligned_eviction(self, n: int, needed: int) -> int:
        """How many window tokens to evict: the policy's ``n``, or where the conversation says a
        message begins (:func:`~edgesink.layout.turn_cut`); at least ``needed``, which makes room."""
        if not n or self._chat is None:
            return n
        return turn_cut(n, needed, self._chat.message_starts, window_start=self._tokens_seen - self.cache.n_window,
                        n_window=self.cache.n_window)
