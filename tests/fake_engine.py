"""A scripted stand-in for the engine, for tests of the command line itself (as simonw/llm's MockModel).

Nothing is computed and no model is read: a token is a word, a reply is scripted. The commands run
on it through their public seam, ``main(obj=Engine(...))``, so what is tested here is the command
line's own work (options, the chat loop and its commands, progress, messages) in milliseconds.
The engine itself, and every command end to end, are tested on the real model elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from edgesink.cli.commands import Engine
from edgesink.errors import ContextFullError, SessionFileError, SystemPromptTooLongError
from edgesink.session import SessionStats

NO_STATS = SessionStats(tokens_seen=0, tokens_in_cache=0, tokens_kept=0, evictions=0, shifts=0, rebases=0,
                        refreshes=0, first_position=0, last_position=0, decode_seconds=0.0, tokens_decoded=0,
                        feed_tokens_per_s=0.0, generate_tokens_per_s=0.0)


class FakeModel:
    """A "loaded model": its name, and a 512-token sliding window when the name says "swa"."""

    def __init__(self, spec, **options):
        self.path = Path(str(spec or "fake-default.gguf"))
        self.options = options
        self.n_swa = 512 if "swa" in self.path.name else 0

    def close(self) -> None:
        pass


class FakeSession:
    """What the commands use of :class:`edgesink.Session`, scripted.

    A reply is "you said: MESSAGE" word by word; a message containing "overflow" raises
    ContextFullError after its first word, one containing "ctrl-c" a KeyboardInterrupt. Sessions
    made are kept in ``FakeSession.made`` for the test to inspect.
    """

    made: list["FakeSession"] = []

    def __init__(self, model: FakeModel, config):
        self.model, self.config = model, config
        self.n_ctx, self.policy = config.n_ctx, config.policy
        self.fed: list[str] = []
        self.system_prompt: str | None = None
        self.messages: list[dict] = []
        self.in_chat = False
        self.closed = False
        self._seen = 0
        FakeSession.made.append(self)

    @classmethod
    def restore(cls, path, model, **options):
        raise AssertionError("the fake has no saved streams: test --resume on the real model")

    # -- the stream -----------------------------------------------------------------------------

    def feed(self, text) -> int:
        text = text.decode() if isinstance(text, bytes) else text
        self.fed.append(text)
        n = len(text.split())
        self._seen += n
        return n

    def generate(self, max_tokens=None, **sampling):
        for word in ["and", "so", "on"][:max_tokens]:
            self._seen += 1
            yield " " + word

    @property
    def stats(self) -> SessionStats:
        in_cache = min(self._seen, self.n_ctx)
        return replace(NO_STATS, tokens_seen=self._seen, tokens_in_cache=in_cache, evictions=self._seen - in_cache,
                       last_position=max(in_cache - 1, 0))

    # -- chat -------------------------------------------------------------------------------------

    def start_chat(self, system=None, *, continue_stream=False) -> None:
        room = self.n_ctx // 2 - (self.stats.tokens_in_cache if continue_stream else 0)
        if system and len(system.split()) > room:
            raise SystemPromptTooLongError(f"the system prompt is {len(system.split())} tokens; too long")
        if not continue_stream:
            self._seen = 0
        self.in_chat, self.system_prompt = True, system
        self.messages = [{"role": "system", "content": system}] if system else []
        self._seen += len((system or "").split())

    def chat(self, message: str, **generation):
        self.messages.append({"role": "user", "content": message})
        reply = []
        try:
            for i, word in enumerate(f"you said: {message}".split()):
                if i == 1 and "overflow" in message:
                    raise ContextFullError("the cache is full")
                if i == 1 and "ctrl-c" in message:
                    raise KeyboardInterrupt
                reply.append(word)
                self._seen += 1
                yield (" " if i else "") + word
        finally:
            self.messages.append({"role": "assistant", "content": " ".join(reply)})

    def reset(self) -> None:
        self.start_chat(self.system_prompt)

    # -- files ------------------------------------------------------------------------------------

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"messages": self.messages, "in_chat": self.in_chat, "seen": self._seen}))

    def load(self, path) -> None:
        try:
            saved = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SessionFileError(f"no session file at {path}") from None
        self.messages, self.in_chat, self._seen = saved["messages"], saved["in_chat"], saved["seen"]

    # -- lifetime ---------------------------------------------------------------------------------

    def close(self) -> None:
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def fake_engine() -> Engine:
    """The command line's engine, scripted; ``FakeSession.made`` starts empty."""
    FakeSession.made = []
    return Engine(load=FakeModel, session=FakeSession)
