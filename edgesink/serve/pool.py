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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..contexts import SharedContext
from ..errors import SessionFileError
from ..session import Session

SNAPSHOT_SUFFIX = ".session"
ANONYMOUS_PREFIX = "~"  # client names cannot begin with it


@dataclass
class Conversation:
    """One conversation (named by a client, or anonymous) and what the server knows of it."""

    name: str
    session: Session | None = None  # None: not live (on disk, or never started)
    text_digest: str | None = None  # completions: sha256 of the text the stream holds, and its length
                                    # (kept in memory only: a restored text stream starts its next prompt afresh)
    text_length: int = 0
    last_used: float = 0.0
    users: int = 0  # requests (and a slot's eviction) using it now: it is not evicted meanwhile
    lost: str | None = None  # why its snapshot could not be restored, until a request reports it
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

    @contextmanager
    def using(self, conversation: Conversation) -> Iterator[Session]:
        """Hold a conversation for one request: live (restored or started), locked, and with a durable
        folder saved afterwards."""
        self._count_user(conversation, +1)  # before waiting for its lock: no eviction picks it meanwhile
        try:
            with conversation.lock:
                if conversation.session is None:
                    with self._claiming:
                        self._make_room()
                        conversation.session = self._restore(conversation) or self._new_session()
                try:
                    yield conversation.session
                finally:
                    if self.durable and conversation.named and conversation.session is not None:
                        self._save(conversation)
        finally:
            self._count_user(conversation, -1)

    def _count_user(self, conversation: Conversation, change: int) -> None:
        with self._guard:
            conversation.users += change
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

    def _make_room(self, patience: float = 60.0) -> None:
        """Free a slot if none is free: snapshot the least recently used idle live session."""
        deadline = time.monotonic() + patience
        while not self.shared.free_slots:
            victim = self._idle_victim()
            if victim is not None:
                self._free(victim)
            elif time.monotonic() > deadline:  # requests are at most the slots: this means a bug
                raise RuntimeError("no live session became idle to free a slot")
            else:
                time.sleep(0.01)  # every live session is in use this instant

    def _idle_victim(self) -> Conversation | None:
        with self._guard:
            idle = [c for c in self._conversations.values() if c.session is not None and not c.users]
            victim = min(idle, key=lambda c: c.last_used, default=None)
            if victim is not None:
                victim.users += 1
            return victim

    def _free(self, victim: Conversation) -> None:
        # Never wait for its lock while holding _claiming: whoever holds it may need _claiming too.
        try:
            if victim.lock.acquire(blocking=False):
                try:
                    if victim.session is not None:
                        if victim.named:
                            self._save(victim)
                        victim.session.close()
                        victim.session = None
                finally:
                    victim.lock.release()
        finally:
            with self._guard:
                victim.users -= 1

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
            return Session.restore(path, self.model, context=self.shared, n_threads=self.config.n_threads)
        except SessionFileError as error:  # unreadable, or of other settings: the conversation starts over
            conversation.lost = f"its saved session could not be restored ({error})"
            return None

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
