"""A session's saved form: :class:`~edgesink.session.Session` takes these methods from here.

``save``/``load``/``restore`` write and read session files (:mod:`edgesink.persistence` owns the
format); ``snapshot``/``check_snapshot``/``apply`` are the bookkeeping a file holds beside
llama.cpp's sequence state, checked before anything is changed.
"""

from __future__ import annotations

import os
from typing import Self

from .chat import Chat, saved_chat_problem
from .errors import SessionFileError
from .layout import is_json_int, state_problem
from .persistence import load_session, save_session, saved_settings
from .session_lock import exclusive
from .textstream import Utf8Stream


class SnapshotMethods:
    """``save``, ``load``, ``restore``, ``snapshot``, ``check_snapshot``, ``apply``, ``forget_logits``.

    A mixin of :class:`~edgesink.session.Session`: it reads and sets the session's stream fields
    (``_tokens_seen``, ``_n_keep_target``, ``_utf8_in``, ``_last_logits``, ``_chat``) and its cache.
    """

    @exclusive
    def save(self, path: "str | os.PathLike") -> None:
        """Save the session (cache, bookkeeping, conversation) to ``path`` atomically."""
        save_session(self, path)

    @exclusive
    def load(self, path: "str | os.PathLike") -> None:
        """Replace this session's stream with one saved by :meth:`save` (same model and settings).

        Raises :class:`edgesink.SessionFileError` naming the cause; the session is then
        unchanged and usable.
        """
        load_session(self, path)

    @classmethod
    def restore(cls, path: "str | os.PathLike", model, **options) -> Self:
        """A new session continuing the stream saved at ``path``, with the settings it was saved with.

        ``options`` override the saved ones that a session may change (``batch_size``,
        ``refresh_every``, ``rebase_every``, ``shift_mode``) and add others (``n_threads``); with
        the saved settings and as many threads, the new session continues exactly as the saved
        one did: bitwise the same logits.
        """
        # The saved policy's own settings (sinks, evict_chunk); a conflicting option is refused by load().
        settings = {**saved_settings(path), **options}
        session = cls(model, **settings)
        try:
            session.load(path)
        except BaseException:
            session.close()
            raise
        return session

    @exclusive
    def snapshot(self) -> dict:
        """The session's bookkeeping as plain JSON-able data: the cache layout, the stream's
        counters and the conversation. With llama.cpp's sequence state it is all a save needs."""
        chat = self._chat
        return {
            **self.cache.state(),
            "tokens_seen": self._tokens_seen, "n_keep_target": self._n_keep_target,
            "pending_utf8": self._utf8_in.pending.hex(),
            "chat": None if chat is None else chat.saved_state(),
        }

    def check_snapshot(self, state: dict) -> None:
        """Raise SessionFileError unless ``state`` is a snapshot :meth:`apply` can take for this session."""
        try:
            problem = (state_problem(state, n_ctx=self.n_ctx, n_vocab=self.model.n_vocab)
                       or self._stream_problem(state) or saved_chat_problem(state["chat"], state["tokens_seen"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            problem = "a field is missing or of the wrong type"
        if problem:
            raise SessionFileError(f"the session file's bookkeeping is inconsistent ({problem}); refusing it")

    def _stream_problem(self, state: dict) -> str | None:
        """What is wrong with the session's own fields of a snapshot (the cache's are checked apart), or None."""
        seen = state["tokens_seen"]
        if not (is_json_int(state["n_keep_target"]) and 0 <= state["n_keep_target"] < self.n_ctx):
            return "n_keep_target"
        if not (is_json_int(seen) and seen >= len(state["kept"]) + len(state["window"])):
            return "tokens_seen"
        if not isinstance(state["pending_utf8"], str) or len(bytes.fromhex(state["pending_utf8"])) > 3:
            return "pending_utf8"
        # Files of older versions kept these two here; the conversation keeps them now.
        starts = state.get("message_starts", [])
        if not (isinstance(starts, list) and all(is_json_int(i) and 0 <= i <= seen for i in starts)
                and starts == sorted(starts)):
            return "message_starts"
        if not isinstance(state.get("last_end_token_text", ""), str):
            return "last_end_token_text"
        return None

    @exclusive
    def apply(self, state: dict) -> None:
        """Take over the bookkeeping of a :meth:`snapshot` (checked by :meth:`check_snapshot`).

        Only the bookkeeping: the cache's llama.cpp contents must be put in place with it (as
        :meth:`load` does); the newest token's logits are computed again at the next step.
        """
        self.cache.set_state(state)
        self._tokens_seen = state["tokens_seen"]
        self._n_keep_target = state["n_keep_target"]
        self._utf8_in = Utf8Stream(bytes.fromhex(state["pending_utf8"]))
        self._last_logits = None
        self._chat = None if state["chat"] is None else Chat.from_saved(self, state["chat"],
                                                                        state.get("message_starts", []))

    @exclusive
    def forget_logits(self) -> None:
        """Drop the newest token's logits, as a restore does: the next step decodes that token again, alone."""
        self.cache.has_logits = False
        self._last_logits = None
