"""Chat on top of a Session: the model's own template, only new turns fed, the system prompt kept.

Messages are rendered with the chat template from the GGUF metadata in a sandboxed Jinja
environment. Message contents are rendered as placeholders and tokenized separately, without
special-token parsing, so a user typing ``<|im_start|>system`` gets those characters, not a role
switch. Only the part of the rendering that the cache has not seen is fed: history is never
re-processed.

What is guaranteed after evictions: the system prompt (``keep_system=True``) stays in the cache
for ever, and the window after it always begins at the start of a message, unless one message
is longer than the whole window (then it is cut from its oldest end).
"""

from __future__ import annotations

import re
import time
from typing import Iterator

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import EdgesinkError

PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: never produced by a template
PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_RENDER_CHARS = 1_000_000  # a template that renders more than this is refused
MAX_RENDER_SECONDS = 2.0


class TemplateRenderError(EdgesinkError):
    """The chat template failed, tried something the sandbox forbids, or ran away."""


class ChatTemplate:
    """A Jinja chat template rendered in a sandbox with a size and time limit."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
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
            for part in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **self._extra):
                parts.append(part)
                size += len(part)
                if size > MAX_RENDER_CHARS or time.monotonic() > deadline:
                    raise TemplateRenderError("the chat template ran away (too much output or too long); refusing it")
        except TemplateRenderError:
            raise
        except Exception as e:  # the sandbox's SecurityError, template bugs, raise_exception()
            raise TemplateRenderError(f"the chat template failed: {e}") from e
        return "".join(parts)


def _raise_template_exception(message: str):
    raise TemplateRenderError(f"the chat template refused the conversation: {message}")


class Chat:
    """The conversation state of a session: messages, and how much of their rendering is cached."""

    def __init__(self, session, system: str | None = None, keep_system: bool = True):
        self.session = session
        model = session.model
        self.template = ChatTemplate(model.chat_template or CHATML,
                                     bos_token=model.token_text(model.bos_token) if model.bos_token >= 0 else "",
                                     eos_token="")
        self.keep_system = keep_system
        self.messages: list[dict] = []
        self._fed = ""  # the rendering (with placeholders) that the cache holds
        self.system = system
        if system:
            self._start_with_system(system)

    def _start_with_system(self, system: str) -> None:
        self.messages = [{"role": "system", "content": system}]
        rendered = self.template.render(self._placeholder_messages(), add_generation_prompt=False)
        n = self._feed_rendering(rendered)
        if self.keep_system:
            self.session.pin_prefix(n)

    def _placeholder_messages(self) -> list[dict]:
        return [{"role": m["role"], "content": PLACEHOLDER.format(i)} for i, m in enumerate(self.messages)]

    def _feed_rendering(self, rendered: str) -> int:
        """Feed the part of ``rendered`` the cache has not seen; returns the number of tokens."""
        if rendered.startswith(self._fed):
            delta = rendered[len(self._fed):]
        else:  # the template re-rendered history differently: feed from where they part
            common = 0
            while common < min(len(rendered), len(self._fed)) and rendered[common] == self._fed[common]:
                common += 1
            delta = rendered[common:]
        tokens = self.turn_tokens(delta)
        self.session.mark_message_start()
        self.session.feed_tokens(tokens)
        self._fed = rendered
        return len(tokens)

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

    def send(self, message: str, role: str = "user", **generation) -> Iterator[str]:
        """Add a message and stream the assistant's reply (text pieces)."""
        if role not in ("user", "system", "tool"):
            raise ValueError(f"role must be 'user', 'system' or 'tool', got {role!r}")
        self.messages.append({"role": role, "content": message})
        rendered = self.template.render(self._placeholder_messages(), add_generation_prompt=True)
        self._feed_rendering(rendered)
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
