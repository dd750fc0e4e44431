"""The server's conversations: sessions on one shared context, live or snapshotted to disk.

Each conversation is a :class:`Conversation` with a name: the client's, or ``~N`` for the
anonymous ones that unnamed requests use (never saved). At most ``slots`` are live (each a sequence of the shared context); when another is
needed, the least recently used idle one is saved to the sessions folder and freed, and restored
from there on its next request, after a restart too. Every method here runs in a worker thread:
each may call llama.cpp.
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..contexts import SharedContext
from ..errors import SessionFileError
from ..session import Session

SNAPSHOT_SUFFIX = ".session"
ANONYMOUS_PREFIX = "~"  # client names cannot begin with it


@dataclass
class Conversation:
    """One named conversation (or the unnamed one) and what the server knows of it."""

    name: str
    session: Session | None = None  # None: not live (on disk, or never started)
    text_digest: str | None = None  # completions: sha256 of the text the stream holds, and its length
                                    # (kept in memory only: a restored text stream starts its next prompt afresh)
    text_length: int = 0
    last_used: float = 0.0
    running: bool = False  # a request works on it now: it must not be snapshotted
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def named(self) -> bool:
        """Named by a client (saved, restored); anonymous ones (``~N``) serve unnamed requests."""
        return not self.name.startswith(ANONYMOUS_PREFIX)

    @property
    def mode(self) -> str | None:
        """"chat", "text" (completions) or None (empty)."""
        if self.session is None:
            return None
        return "chat" if self.session.in_chat else "text" if self.text_digest else None


class SessionPool:
    """Live conversations on one :class:`SharedContext`, the rest in ``sessions_dir``.

    Args:
        model: the loaded model.
        config: every session's :class:`SessionConfig` (shift mode window-back: shared streams).
        slots: live sessions at most (sequences of the shared context).
        sessions_dir: where snapshots go; named sessions are saved there after every request, so
            they survive a crash, and restored on their next request. None: a private temporary
            folder, gone when the server stops.
    """

    def __init__(self, model, config, *, slots: int, sessions_dir: Path | None):
        self.model = model
        self.config = config
        self.shared = SharedContext(model, config, slots=slots)
        self._temporary = None if sessions_dir else tempfile.TemporaryDirectory(prefix="edgesink-sessions-")
        self.sessions_dir = Path(sessions_dir or self._temporary.name)
        self.durable = sessions_dir is not None
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self._conversations: dict[str, Conversation] = {}
        self._guard = threading.Lock()  # the dict and who is live
        self._claiming = threading.Lock()  # one thread at a time frees and takes slots

    # -- finding and holding a conversation ------------------------------------------------

    def conversation(self, name: str) -> Conversation:
        with self._guard:
            return self._conversations.setdefault(name, Conversation(name))

    def hold(self, conversation: Conversation) -> Session:
        """Make the conversation live (restoring or starting its session) for a request; call
        :meth:`release` after. The caller holds ``conversation.lock``."""
        with self._guard:
            conversation.running = True
            conversation.last_used = time.monotonic()
        if conversation.session is None:
            with self._claiming:
                self._make_room()
                conversation.session = self._restore(conversation) or self._new_session()
        return conversation.session

    def release(self, conversation: Conversation) -> None:
        """End a request: a named session is saved (durable folder), then may be freed for another."""
        try:
            if self.durable and conversation.named and conversation.session is not None:
                self._save(conversation)
        finally:
            with self._guard:
                conversation.running = False
                conversation.last_used = time.monotonic()

    def start_over(self, conversation: Conversation) -> Session:
        """Forget the conversation's stream: a fresh session in its slot."""
        with self._claiming:  # the slot freed here is the one taken back
            conversation.session.close()
            conversation.text_digest, conversation.text_length = None, 0
            conversation.session = self._new_session()
        return conversation.session

    def _new_session(self) -> Session:
        return Session(self.model, self.config, context=self.shared)

    def _make_room(self) -> None:
        """Free a slot if none is free: snapshot the least recently used idle live session."""
        if self.shared.free_slots:
            return
        with self._guard:
            idle = [c for c in self._conversations.values() if c.session is not None and not c.running]
            victim = min(idle, key=lambda c: c.last_used, default=None)
            if victim is None:  # cannot happen: requests running are at most the slots
                raise RuntimeError("every slot is in use by a running request")
            victim.running = True  # nobody else takes it meanwhile
        try:
            with victim.lock:
                if victim.named:
                    self._save(victim)
                victim.session.close()
                victim.session = None
        finally:
            with self._guard:
                victim.running = False

    # -- snapshots ----------------------------------------------------------------------------

    def path_of(self, name: str) -> Path:
        return self.sessions_dir / f"{name}{SNAPSHOT_SUFFIX}"

    def _save(self, conversation: Conversation) -> None:
        # A completions stream's text digest is not saved: restored, it answers its next prompt afresh.
        conversation.session.save(self.path_of(conversation.name))

    def _restore(self, conversation: Conversation) -> Session | None:
        path = self.path_of(conversation.name)
        if not conversation.named or not path.exists():
            return None
        try:
            session = Session.restore(path, self.model, context=self.shared, n_threads=self.config.n_threads)
        except SessionFileError:
            return None  # unreadable or of other settings: the conversation starts over (the reply says so)
        return session

    def describe(self, name: str) -> dict | None:
        """What a conversation holds (None: unknown here and not on disk); its caller holds no lock
        of it, so a request running on it is waited for."""
        with self._guard:
            conversation = self._conversations.get(name)
        if conversation is None or conversation.session is None:
            saved = self.path_of(name).exists()
            return {"name": name, "live": False, "saved": True} if saved else None
        with conversation.lock:
            session = conversation.session
            if session is None:
                return {"name": name, "live": False, "saved": self.path_of(name).exists()}
            tokens = session.cached_tokens()
            return {"name": name, "live": True, "saved": self.path_of(name).exists(), "mode": conversation.mode,
                    "messages": len(session.messages), "tokens_seen": session.tokens_seen,
                    "cached_tokens": len(tokens), "cached_text": self.model.detokenize(tokens)}

    def forget(self, name: str) -> bool:
        """Close a conversation and delete its snapshot; whether there was one."""
        with self._guard:
            conversation = self._conversations.pop(name, None)
        found = False
        if conversation is not None:
            with conversation.lock:
                if conversation.session is not None:
                    conversation.session.close()
                    conversation.session = None
                    found = True
        path = self.path_of(name)
        if path.exists():
            path.unlink()
            found = True
        return found

    def anonymous(self) -> list[Conversation]:
        """The conversations that serve unnamed requests."""
        with self._guard:
            return [c for c in self._conversations.values() if not c.named]

    def live_count(self) -> int:
        with self._guard:
            return sum(c.session is not None for c in self._conversations.values())

    def close(self) -> None:
        """Save every live named session (durable folder), then free everything."""
        with self._guard:
            conversations = list(self._conversations.values())
        for c in conversations:
            with c.lock:
                if c.session is not None:
                    if self.durable and c.named:
                        self._save(c)
                    c.session.close()
                    c.session = None
        self.shared.close()
        if self._temporary is not None:
            self._temporary.cleanup()


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
