"""Chat on top of a Session: the model's own template, only new turns fed, the system prompt kept.

Messages are rendered with the chat template from the GGUF metadata in a sandboxed Jinja
environment. Message contents are rendered as placeholders and tokenized separately, without
special-token parsing, so a user typing ``<|im_start|>system`` gets those characters, not a role
switch. Only the part of the rendering that the cache has not seen is fed: history is never
re-processed.

What is guaranteed after evictions: the system prompt (``keep_system=True``) stays in the cache
for ever, whole, and the tokens after it begin at the start of a turn (a message and the reply
to it): turns are evicted whole, oldest first. The one exception is a turn longer than the
whole window, which is cut from its oldest end (the question's tail is kept while it is answered).
"""

from __future__ import annotations

import os
import re
import time
from typing import Iterator

from jinja2 import TemplateError

from .errors import EdgesinkError
from .template_guard import GuardedSandbox, TemplateLimitError, time_limit

PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: never produced by a template
PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_RENDER_CHARS = 1_000_000  # a template that renders more than this is refused
MAX_RENDER_SECONDS = 2.0
RENDER_WINDOW = 32  # messages rendered per turn at most, besides the system prompt


class TemplateRenderError(EdgesinkError):
    """The chat template failed, tried something the sandbox forbids, or ran away."""


class ChatTemplate:
    """A Jinja chat template rendered in a sandbox with a size and time limit."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = GuardedSandbox(trim_blocks=True, lstrip_blocks=True, max_chars=MAX_RENDER_CHARS)
        env.globals["raise_exception"] = _raise_template_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise TemplateRenderError(f"the chat template does not parse: {e}") from e
        self._extra = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        deadline = time.monotonic() + MAX_RENDER_SECONDS
        parts, size = [], 0
        try:
            with time_limit(MAX_RENDER_SECONDS):  # also stops loops and macros that produce no output
                for part in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                    **self._extra):
                    parts.append(part)
                    size += len(part)
                    if size > MAX_RENDER_CHARS or time.monotonic() > deadline:
                        raise TemplateRenderError("the chat template ran away (too much output or too long); refusing it")
        except TemplateRenderError:
            raise
        except TemplateLimitError as e:
            raise TemplateRenderError(f"the chat template ran away ({e}); refusing it") from e
        except Exception as e:  # the sandbox's SecurityError, template bugs, raise_exception()
            raise TemplateRenderError(f"the chat template failed: {e}") from e
        return "".join(parts)


def _raise_template_exception(message: str):
    raise TemplateRenderError(f"the chat template refused the conversation: {message}")


class Chat:
    """The conversation state of a session: messages, and how much of their rendering is cached.

    ``_fed`` is the rendering (contents as placeholders) that the cache holds. Only the newest
    ``RENDER_WINDOW`` messages (and the system prompt) are rendered, so a turn costs the same
    after a million messages as after ten; every message stays in ``messages``.
    """

    def __init__(self, session, system: str | None = None, keep_system: bool = True):
        self.session = session
        model = session.model
        self.template = ChatTemplate(model.chat_template or CHATML,
                                     bos_token=model.token_text(model.bos_token) if model.bos_token >= 0 else "",
                                     eos_token="")
        self.keep_system = keep_system
        self.messages: list[dict] = []
        self._fed = ""
        self._render_from = 0  # the oldest message rendered, besides a leading system prompt
        self.system = system
        if system:
            self._start_with_system(system)

    def _start_with_system(self, system: str) -> None:
        self.messages = [{"role": "system", "content": system}]
        rendered = self._render(self._indices(), add_generation_prompt=False)
        n = self._feed_rendering(rendered, boundaries=[0])
        if self.keep_system:
            self.session.pin_prefix(n)

    # -- rendering ------------------------------------------------------------------------------

    def _indices(self, start: int | None = None) -> list[int]:
        """The messages rendered: a leading system prompt, then those from ``start`` on."""
        head = [0] if self.messages and self.messages[0]["role"] == "system" else []
        first = max(self._render_from if start is None else start, len(head))
        return head + list(range(first, len(self.messages)))

    def _render(self, indices: list[int], add_generation_prompt: bool) -> str:
        messages = [{"role": self.messages[i]["role"], "content": PLACEHOLDER.format(i)} for i in indices]
        return self.template.render(messages, add_generation_prompt=add_generation_prompt)

    def _slide_window(self) -> None:
        """Stop rendering the oldest messages once there are more than RENDER_WINDOW of them.

        The cached rendering's prefix up to the first message still rendered is replaced by the
        new rendering's prefix; nothing is fed, only later deltas depend on it.
        """
        if len(self._indices()) <= RENDER_WINDOW:
            return
        start = next((i for i in range(len(self.messages) - RENDER_WINDOW // 2, len(self.messages))
                      if self.messages[i]["role"] == "user"), None)
        if start is None:
            return
        marker = PLACEHOLDER.format(start)
        rendered = self._render(self._indices(start), add_generation_prompt=False)
        old_at, new_at = self._fed.find(marker), rendered.find(marker)
        if old_at >= 0 and new_at >= 0:
            self._fed = rendered[:new_at] + self._fed[old_at:]
            self._render_from = start

    def _feed_rendering(self, rendered: str, boundaries: list[int]) -> int:
        """Feed the part of ``rendered`` the cache has not seen; returns the number of tokens.

        ``boundaries`` are offsets in ``rendered`` where messages begin: evictions may cut there.
        """
        if rendered.startswith(self._fed):
            common = len(self._fed)
        else:  # the template re-rendered history differently: feed from where they part
            common = len(os.path.commonprefix([rendered, self._fed]))
            open_placeholder = rendered.rfind("\ue000", 0, common)
            if open_placeholder > rendered.rfind("\ue001", 0, common):
                common = open_placeholder  # never start inside a placeholder
        cuts = [common] + sorted(b for b in set(boundaries) if common < b < len(rendered)) + [len(rendered)]
        n = 0
        for begin, end in zip(cuts, cuts[1:]):
            if begin in boundaries:
                self.session.mark_message_start()
            tokens = self.turn_tokens(rendered[begin:end])
            self.session.feed_tokens(tokens)
            n += len(tokens)
        self._fed = rendered
        return n

    def turn_tokens(self, rendered: str) -> list[int]:
        """Tokens of a rendered piece: template text with special tokens, contents literal."""
        model = self.session.model
        tokens: list[int] = []
        pos = 0
        for match in PLACEHOLDER_RE.finditer(rendered):
            tokens += model.tokenize(rendered[pos:match.start()], special=True)
            tokens += model.tokenize(self.messages[int(match.group(1))]["content"], special=False)
            pos = match.end()
        tokens += model.tokenize(rendered[pos:], special=True)
        return tokens

    # -- a turn ---------------------------------------------------------------------------------

    def send(self, message: str, role: str = "user", **generation) -> Iterator[str]:
        """Add a message and stream the assistant's reply (text pieces)."""
        if role not in ("user", "system", "tool"):
            raise ValueError(f"role must be 'user', 'system' or 'tool', got {role!r}")
        self._slide_window()
        self.messages.append({"role": role, "content": message})
        indices = self._indices()
        before = self._render(indices[:-1], add_generation_prompt=False)
        prompt = self._render(indices, add_generation_prompt=True)
        # The turn (message and reply) begins where the conversation before it ends; what comes
        # before that (closing a reply that was cut short) belongs to the previous turn.
        boundaries = [len(before)] if prompt.startswith(before) else []
        seen = self.session.stats.tokens_seen
        try:
            self._feed_rendering(prompt, boundaries)
        except BaseException:  # Ctrl-C, a full dense cache...
            if self.session.stats.tokens_seen == seen:  # nothing went in: as if never sent
                self.messages.pop()
            else:  # part of it is cached: count it as sent (with no reply), so the next turn closes it
                self.messages.append({"role": "assistant", "content": ""})
                self._fed = prompt + PLACEHOLDER.format(len(self.messages) - 1)
            raise
        self.messages.append({"role": "assistant", "content": ""})
        reply, ended_by_eog = [], False
        try:
            for chunk in self.session.stream_generate(**generation):
                reply.append(chunk.text)
                ended_by_eog = chunk.finish_reason == "stop"
                if chunk.text:
                    yield chunk.text
        finally:
            # Whatever happened (Ctrl-C too), the cache holds the reply so far: record it.
            self.messages[-1]["content"] = "".join(reply)
            self._fed += PLACEHOLDER.format(len(self.messages) - 1)
            if ended_by_eog:
                self._fed += self.session.last_end_token_text
