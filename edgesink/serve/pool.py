"""The server's conversations: sessions on one shared context, live or snapshotted to disk.

A :class:`Conversation` is known by its owner's namespace (see :mod:`.access`) and its name: the
client's, or ``~N`` for the anonymous ones unnamed requests use (never saved). At most ``slots``
are live (each a sequence of the shared context); when another is needed, the least recently
used idle one is saved to the sessions folder and freed, and restored from there on its next
request, after a restart too. Conversations that are neither live nor in use leave the maps; their
snapshots stay on disk, within ``max_bytes``. The methods that may call llama.cpp run in worker
threads; :meth:`SessionPool.describe` never waits for a conversation in use.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..contexts import SharedContext
from ..errors import Cancelled, EdgesinkError
from ..session import Session
from .access import LOCAL
from .api_errors import without_paths

SNAPSHOT_SUFFIX = ".session"
ANONYMOUS_PREFIX = "~"  # client names cannot begin with it
log = logging.getLogger("edgesink.serve")


@dataclass
class Conversation:
    """One conversation (named by a client, or anonymous) and what the server knows of it."""

    namespace: str  # whose it is: LOCAL without keys, else the key's namespace
    name: str
    session: Session | None = None  # None: not live (on disk, or never started)
    text_digest: str | None = None  # completions: sha256 of the text the stream holds, and its length
                                    # (kept in memory only: a restored text stream starts its next prompt afresh)
    text_length: int = 0
    last_used: float = 0.0
    users: int = 0  # requests (and a slot's eviction) using it now: it is not evicted meanwhile
    lost: str | None = None  # why its stream was started afresh, until a request reports it
    summary: dict | None = None  # what GET shows while a request runs on it (its state after the last one)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

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
        config: every session's :class:`SessionConfig` (the same n_ctx, cache types and threads).
        slots: live sessions at most (sequences of the shared context).
        sessions_dir: where snapshots go; named sessions are saved there after every request, so
            they survive a crash, and restored on their next request. None: a private temporary
            folder, gone when the server stops.
        max_bytes: the most the snapshots may take on disk; past it the oldest idle ones are
            removed (and logged). None: no limit.
    """

    def __init__(self, model, config, *, slots: int, sessions_dir: Path | None, max_bytes: int | None = None):
        self.model = model
        self.config = config
        self.shared = SharedContext(model, config, slots=slots)
        self._temporary = None if sessions_dir else tempfile.TemporaryDirectory(prefix="edgesink-sessions-")
        self.sessions_dir = Path(sessions_dir or self._temporary.name)
        self.durable = sessions_dir is not None
        self.max_bytes = max_bytes
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self._conversations: dict[tuple[str, str], Conversation] = {}
        self._guard = threading.Lock()  # the dict and who is live
        self._claiming = threading.Lock()  # one thread at a time frees and takes slots

    # -- finding and holding a conversation ------------------------------------------------

    def conversation(self, namespace: str, name: str) -> Conversation:
        with self._guard:
            return self._conversations.setdefault((namespace, name), Conversation(namespace, name))

    @contextmanager
    def using(self, conversation: Conversation) -> Iterator[Session]:
        """Hold a conversation for one request: live (restored or started), locked, and with a durable
        folder saved afterwards. A request cancelled while its prompt was fed leaves a stream the
        client never saw answered: it is dropped, not saved (the snapshot before it stays)."""
        self._count_user(conversation, +1)  # before waiting for its lock: no eviction picks it meanwhile
        try:
            with conversation.lock:
                if conversation.session is None:
                    with self._claiming:
                        self._make_room()
                        conversation.session = self._restore(conversation) or self._new_session()
                try:
                    yield conversation.session
                except Cancelled:
                    self._drop(conversation, "the previous request was cancelled while its prompt was fed")
                    raise
                finally:
                    if conversation.session is not None:
                        conversation.summary = self._summary(conversation)
                        if self.durable and conversation.named:
                            self._save(conversation)
        finally:
            self._count_user(conversation, -1)
            self._forget_if_idle(conversation)

    def _count_user(self, conversation: Conversation, change: int) -> None:
        with self._guard:
            conversation.users += change
            conversation.last_used = time.monotonic()

    def _forget_if_idle(self, conversation: Conversation) -> None:
        """Drop a conversation from the map once it is neither live nor in use (its snapshot stays)."""
        with self._guard:
            if conversation.session is None and not conversation.users and conversation.lost is None:
                if self._conversations.get(conversation.key) is conversation:
                    del self._conversations[conversation.key]

    def start_over(self, conversation: Conversation) -> Session:
        """Forget the conversation's stream: a fresh session in its slot."""
        with self._claiming:  # the slot freed here is the one taken back
            conversation.session.close()
            conversation.text_digest, conversation.text_length = None, 0
            conversation.session = self._new_session()
        return conversation.session

    def _drop(self, conversation: Conversation, why: str) -> None:
        """Close a conversation's live session unsaved. Its next request restores the last snapshot,
        or, without one, starts afresh and reports ``why``."""
        conversation.session.close()
        conversation.session = None
        conversation.text_digest, conversation.text_length = None, 0
        if not (self.durable and conversation.named and self.path_of(conversation).exists()):
            conversation.lost = why

    def _new_session(self) -> Session:
        return Session(self.model, self.config, context=self.shared)

    def _make_room(self, patience: float = 60.0) -> None:
        """Free a slot if none is free: snapshot the least recently used idle live session."""
        deadline = time.monotonic() + patience
        while not self.shared.free_slots:
            victim = self._idle_victim()
            if victim is not None and self._free(victim):
                continue
            if time.monotonic() > deadline:  # requests are at most the slots: this means a bug
                raise RuntimeError("no live session became idle to free a slot")
            time.sleep(0.01)  # every live session is in use this instant (or just taken): wait, not spin

    def _idle_victim(self) -> Conversation | None:
        with self._guard:
            idle = [c for c in self._conversations.values() if c.session is not None and not c.users]
            victim = min(idle, key=lambda c: c.last_used, default=None)
            if victim is not None:
                victim.users += 1
            return victim

    def _free(self, victim: Conversation) -> bool:
        """Save and close an idle conversation's session; whether its slot was freed."""
        # Never wait for its lock while holding _claiming: whoever holds it may need _claiming too.
        freed = False
        try:
            if victim.lock.acquire(blocking=False):
                try:
                    if victim.session is not None:
                        if victim.named:
                            self._save(victim)
                        victim.session.close()
                        victim.session = None
                        freed = True
                finally:
                    victim.lock.release()
        finally:
            with self._guard:
                victim.users -= 1
            self._forget_if_idle(victim)
        return freed

    # -- snapshots ----------------------------------------------------------------------------

    def path_of(self, conversation: Conversation) -> Path:
        """Where a conversation's snapshot lives: its owner's folder (the sessions folder itself for
        the local user), its name."""
        folder = self.sessions_dir / conversation.namespace if conversation.namespace != LOCAL else self.sessions_dir
        return folder / f"{conversation.name}{SNAPSHOT_SUFFIX}"

    def _save(self, conversation: Conversation) -> None:
        # A completions stream's text digest is not saved: restored, it answers its next prompt afresh.
        path = self.path_of(conversation)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        conversation.session.save(path)
        self._enforce_quota()

    def _restore(self, conversation: Conversation) -> Session | None:
        path = self.path_of(conversation)
        if not conversation.named or not path.exists():
            return None
        try:
            session = Session.restore(path, self.model, context=self.shared, n_threads=self.config.n_threads)
        except EdgesinkError as error:  # unreadable, or saved under other settings: start over, say why
            conversation.lost = without_paths(f"its saved session could not be restored here "
                                              f"({type(error).__name__}: {error})")
            return None
        if not self.durable:
            path.unlink(missing_ok=True)  # taken back into a slot: the live session is the only copy now
        return session

    def _enforce_quota(self) -> None:
        """Remove the oldest snapshots of conversations not in use until they fit in ``max_bytes``."""
        if self.max_bytes is None:
            return
        stats = [(p.stat(), p) for p in self.sessions_dir.rglob(f"*{SNAPSHOT_SUFFIX}")]
        files = [(st.st_mtime, st.st_size, p) for st, p in stats]
        total = sum(size for _, size, _ in files)
        with self._guard:
            busy = {self.path_of(c) for c in self._conversations.values() if c.session is not None or c.users}
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                return
            if path not in busy:
                path.unlink(missing_ok=True)
                total -= size
                log.warning("removed the snapshot %s (%d bytes): the sessions folder is over --sessions-max-bytes",
                            path.relative_to(self.sessions_dir), size)
        if total > self.max_bytes:
            log.warning("the sessions folder holds %d bytes, over --sessions-max-bytes, all of live sessions", total)

    # -- reading and forgetting ------------------------------------------------------------------------

    def describe(self, namespace: str, name: str) -> dict | None:
        """What a conversation holds (None: unknown here and not on disk). Never waits: while a
        request runs on it, its state after the previous request is shown, marked busy."""
        probe = Conversation(namespace, name)
        with self._guard:
            conversation = self._conversations.get(probe.key)
        if conversation is None or conversation.session is None:
            return {"name": name, "live": False, "saved": True} if self.path_of(probe).exists() else None
        if not conversation.lock.acquire(blocking=False):
            return {**(conversation.summary or {"name": name}), "busy": True}
        try:
            if conversation.session is None:
                return {"name": name, "live": False, "saved": self.path_of(conversation).exists()}
            return {**self._summary(conversation), "busy": False}
        finally:
            conversation.lock.release()

    def _summary(self, conversation: Conversation) -> dict:
        session = conversation.session
        tokens = session.cached_tokens()
        return {"name": conversation.name, "live": True, "saved": self.path_of(conversation).exists(),
                "mode": conversation.mode, "messages": len(session.messages), "tokens_seen": session.tokens_seen,
                "cached_tokens": len(tokens), "cached_text": self.model.detokenize(tokens),
                "shift_mode": "kept-forward" if session.kept_forward else "window-back", **session.stats.shift_counts()}

    def forget(self, namespace: str, name: str) -> bool:
        """Close a conversation and delete its snapshot; whether there was one."""
        probe = Conversation(namespace, name)
        with self._guard:
            conversation = self._conversations.pop(probe.key, None)
        found = False
        if conversation is not None:
            with conversation.lock:
                if conversation.session is not None:
                    conversation.session.close()
                    conversation.session = None
                    found = True
        path = self.path_of(probe)
        if path.exists():
            path.unlink()
            found = True
        return found

    def anonymous(self, namespace: str) -> list[Conversation]:
        """The conversations that serve a namespace's unnamed requests."""
        with self._guard:
            return [c for c in self._conversations.values() if not c.named and c.namespace == namespace]

    def live_count(self) -> int:
        with self._guard:
            return sum(c.session is not None for c in self._conversations.values())

    def problems(self) -> list[str]:
        """What keeps the pool from serving (for /health): a closed context, a sessions folder that
        cannot be written."""
        found = []
        if self.shared.ctx is None:
            found.append("the shared llama.cpp context is closed")
        try:
            with tempfile.NamedTemporaryFile(dir=self.sessions_dir, prefix=".health-"):
                pass
        except OSError as error:
            found.append(f"the sessions folder cannot be written ({error.strerror or error})")
        return found

    def close(self, timeout: float | None = None) -> bool:
        """Save every live named session (durable folder) whose request is done within ``timeout``
        seconds, then free everything; False (and the context left alone) when a request still ran."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._guard:
            conversations = list(self._conversations.values())
        all_done = True
        for c in conversations:
            wait = -1 if deadline is None else max(0.0, deadline - time.monotonic())
            if not c.lock.acquire(timeout=wait):
                all_done = False  # still running: its last snapshot (before this request) stays
                continue
            try:
                if c.session is not None:
                    if self.durable and c.named:
                        self._save(c)
                    c.session.close()
                    c.session = None
            finally:
                c.lock.release()
        if not all_done:
            return False
        self.shared.close()
        if self._temporary is not None:
            self._temporary.cleanup()
        return True


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()
