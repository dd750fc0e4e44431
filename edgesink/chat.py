"""Chat on top of a Session: the model's own template, only new turns fed, the system prompt kept.

Messages are rendered with the chat template from the GGUF metadata in a sandboxed Jinja
environment. Message contents are rendered as placeholders and tokenized separately, without
special-token parsing, so a user typing ``<|im_start|>system`` gets those characters, not a role
switch. Only the part of the rendering that the cache has not seen is fed: history is never
re-processed.

What is guaranteed after evictions, for every policy that evicts (sink, window, halve with
any evict_chunk, recompute): the system prompt (``keep_system=True``) stays in the cache for
ever, whole, and the tokens after it (and after the sinks) begin at the start of a turn (a
message and the reply to it): turns are evicted whole, oldest first. The one exception is a
turn longer than the window (n_ctx minus the kept tokens), which is cut from its oldest end
(the question's tail is kept while it is answered); the next eviction after it is aligned again.

When a template renders earlier history differently from what was fed (a system prompt folded
into the newest user message, reasoning dropped from earlier replies), the cache is cut back to
where the renderings part and the new text is fed from there, so nothing is duplicated. If that
point is no longer in the window (evicted, or kept before an eviction gap: sinks or the pinned
system prompt) the turn is refused with :class:`TemplateRewriteError`.
"""

from __future__ import annotations

import os
import re
import time
import weakref
from collections import deque
from contextlib import closing
from typing import Iterator

from jinja2 import TemplateError

from .errors import ClosedError, SystemPromptTooLongError, TemplateRenderError, TemplateRewriteError
from .template_guard import GuardedSandbox, TemplateLimitError, time_limit
from .textstream import GenerationChunk

PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: never produced by a template
PLACEHOLDER_RE = re.compile("\ue000(\\d+)\ue001")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_RENDER_CHARS = 1_000_000  # a template that renders more than this is refused
MAX_RENDER_SECONDS = 2.0
# Real chat templates are under 20,000 characters (tool-calling ones included); compiling costs
# time and memory in proportion to the source (2.5 MB: over 10 s), so a longer one is refused unread.
MAX_TEMPLATE_CHARS = 65_536
RENDER_WINDOW = 32  # messages rendered per turn at most, besides the system prompt


class ChatTemplate:
    """A Jinja chat template rendered in a sandbox with a size and time limit."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        if len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateRenderError(f"the chat template is {len(source):,} characters long; edgesink accepts at "
                                      f"most {MAX_TEMPLATE_CHARS:,} (real ones are under 20,000): refusing it")
        env = GuardedSandbox(trim_blocks=True, lstrip_blocks=True, max_chars=MAX_RENDER_CHARS)
        env.globals["raise_exception"] = _raise_template_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise TemplateRenderError(f"the chat template does not parse: {e}") from e
        except RecursionError as e:  # Jinja's parser recurses once per nested bracket or block
            raise TemplateRenderError("the chat template does not parse: it nests too deeply") from e
        except MemoryError as e:
            raise TemplateRenderError("the chat template does not parse: out of memory compiling it") from e
        except Exception as e:  # Python's own compiler refusing the generated code (too many nested blocks...)
            raise TemplateRenderError(f"the chat template does not parse: {type(e).__name__}: {e}") from e
        self._env = env
        self._extra = {"bos_token": bos_token, "eos_token": eos_token}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        deadline = time.monotonic() + MAX_RENDER_SECONDS
        parts, size = [], 0
        self._env.begin_render()
        output = self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt, **self._extra)
        try:
            with time_limit(MAX_RENDER_SECONDS):  # also stops loops and macros that produce no output
                for part in output:
                    parts.append(part)
                    size += len(part)
                    if size > MAX_RENDER_CHARS or time.monotonic() > deadline:
                        raise TemplateRenderError("the chat template ran away (too much output or too long); refusing it")
        except TemplateRenderError:
            raise
        except TemplateLimitError as e:
            raise TemplateRenderError(f"the chat template ran away ({e}); refusing it") from e
        except RecursionError as e:
            raise TemplateRenderError("the chat template ran away (it recursed too deeply); refusing it") from e
        except MemoryError as e:
            raise TemplateRenderError("the chat template ran away (out of memory); refusing it") from e
        except Exception as e:  # the sandbox's SecurityError, template bugs, raise_exception()
            raise TemplateRenderError(f"the chat template failed: {e}") from e
        finally:
            # Closed here, after the time limit ends: a refused template's generator closed under it (when
            # the loop above let go of it), past its deadline, raised in jinja's cleanup, which Python
            # can only print to stderr ("Exception ignored in ...").
            output.close()
        return "".join(parts)


def _raise_template_exception(message: str):
    raise TemplateRenderError(f"the chat template refused the conversation: {message}")


class Chat:
    """The conversation state of a session: messages, and how much of their rendering is cached.

    ``_fed`` is the rendering (contents as placeholders) that the cache holds. Only the newest
    ``RENDER_WINDOW`` messages (and the system prompt) are rendered, so a turn costs the same
    after a million messages as after ten; every message stays in ``messages``. ``_marks`` are
    (offset in ``_fed``, stream index) pairs where the cache may be cut back to;
    ``message_starts`` the stream indices where turns begin, where evictions cut the window.
    """

    def __init__(self, session, system: str | None = None, keep_system: bool = True, template: str | None = None):
        # The session owns its chat; a strong reference back would make a cycle that keeps a
        # dropped session's cache (hundreds of MB) alive until the cycle collector runs.
        self._session = weakref.ref(session)
        model = session.model
        self.template_source = template  # None: the model's own (or ChatML)
        self.template = ChatTemplate(template or model.chat_template or CHATML,
                                     bos_token=model.token_text(model.bos_token) if model.bos_token >= 0 else "",
                                     eos_token="")
        self.keep_system = keep_system
        self.system = system
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._fed = ""
        self._marks: list[tuple[int, int]] = []
        self._render_from = 0  # the oldest message rendered, besides a leading system prompt
        self.message_starts: deque[int] = deque()

    @property
    def render_from(self) -> int:
        """The index of the oldest message the template renders (a leading system prompt aside):
        older ones stay in :attr:`messages` but are no longer rendered, so a turn's cost stays flat."""
        return self._render_from

    @property
    def session(self):
        """The session this chat belongs to (ClosedError once it is gone)."""
        session = self._session()
        if session is None:
            raise ClosedError("this chat's session is closed")
        return session

    def check_system_fits(self, continuing: bool) -> None:
        """Raise SystemPromptTooLongError if the system prompt leaves too little cache to converse in."""
        if not self.system:
            return
        session, model = self.session, self.session.model
        tokens = self.turn_tokens(self._render(self._indices(), add_generation_prompt=False))
        # A fresh stream of a model that wants a BOS gets one first, if the template has none.
        bos_added = not continuing and model.add_bos and model.bos_token >= 0 and tokens[:1] != [model.bos_token]
        n = len(tokens) + bos_added
        if session.policy.evicts:
            limit, why = session.n_ctx // 2, "half the cache, leaving the other half to the conversation"
        else:
            limit = session.n_ctx - (session.stats.tokens_in_cache if continuing else 0) - 1
            why = f"what policy {session.policy.name} has left, as it never evicts"
        if n > limit:
            raise SystemPromptTooLongError(
                f"the system prompt is {n} tokens; with n_ctx {session.n_ctx} it may take at most {limit} "
                f"({why}): shorten it or use a larger n_ctx; nothing was changed")

    def begin(self, pin: bool) -> None:
        """Feed the system prompt (if any), pinned in the cache for ever with ``pin``."""
        if not self.system:
            return
        n = self._feed_rendering(self._render(self._indices(), add_generation_prompt=False), boundaries=[0])
        if pin:
            self.session.pin_prefix(n)

    # -- persistence ----------------------------------------------------------------------------

    def saved_state(self) -> dict:
        return {"system": self.system, "keep_system": self.keep_system, "template": self.template_source,
                "messages": [dict(m) for m in self.messages], "fed": self._fed,
                "marks": [list(m) for m in self._marks], "render_from": self._render_from,
                "message_starts": list(self.message_starts)}

    @classmethod
    def from_saved(cls, session, saved: dict, message_starts: list[int] = ()) -> "Chat":
        """A chat continuing ``saved`` (checked by :func:`saved_chat_problem`); ``message_starts``:
        where files of older versions kept them, beside the chat."""
        chat = cls(session, system=None, keep_system=saved["keep_system"], template=saved.get("template"))
        chat.system = saved["system"]
        chat.messages = [dict(m) for m in saved["messages"]]
        chat._fed = saved["fed"]
        chat._marks = [tuple(m) for m in saved.get("marks", [])]
        chat._render_from = saved.get("render_from", 0)
        chat.message_starts = deque(saved.get("message_starts", message_starts))
        return chat

    # -- rendering ------------------------------------------------------------------------------

    def _indices(self, start: int | None = None) -> list[int]:
        """The messages rendered: a leading system prompt, then those from ``start`` on."""
        return _rendered_indices(self.messages, self._render_from if start is None else start)

    def _render(self, indices: list[int], add_generation_prompt: bool) -> str:
        return self.template.render(_placeholders(self.messages, indices), add_generation_prompt=add_generation_prompt)

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
            self._marks = [(off - old_at + new_at, index) for off, index in self._marks if off >= old_at]
            self._render_from = start

    def _feed_rendering(self, rendered: str, boundaries: list[int]) -> int:
        """Feed the part of ``rendered`` the cache has not seen; returns the number of tokens.

        ``boundaries`` are offsets in ``rendered`` where messages begin: evictions may cut there.
        """
        common = self._cut_back_to(rendered)
        cuts = [common] + sorted(b for b in set(boundaries) if common < b < len(rendered)) + [len(rendered)]
        n = 0
        for begin, end in zip(cuts, cuts[1:]):
            if begin in boundaries:
                self.message_starts.append(self.session.tokens_seen)
            self._mark(begin)
            n += self.session.feed_tokens(self.turn_tokens(rendered[begin:end]))
        self._fed = rendered
        self._mark(len(rendered))
        return n

    def _cut_back_to(self, rendered: str) -> int:
        """The offset in ``rendered`` to feed from, after cutting the cache back to it if needed.

        When the template renders fed history differently, the cache is cut back to the newest
        mark before the two renderings part, so the old version does not stay beside the new.
        """
        if rendered.startswith(self._fed):
            return len(self._fed)
        common = len(os.path.commonprefix([rendered, self._fed]))
        mark = next(((off, index) for off, index in reversed(self._marks) if off <= common), None)
        session = self.session
        if mark is None or mark[1] < session.first_removable():
            raise TemplateRewriteError(
                "the chat template renders earlier history differently from what the cache holds, and "
                "that part is no longer in the window (evicted, or pinned with the system prompt); "
                "this template cannot go on here: /reset (or start_chat) starts over")
        offset, index = mark
        session.drop_newest(session.tokens_seen - index)
        while self.message_starts and self.message_starts[-1] > session.tokens_seen:
            self.message_starts.pop()
        self._fed = self._fed[:offset]
        self._marks = [m for m in self._marks if m[0] <= offset]
        return offset

    def _mark(self, offset: int) -> None:
        """Remember that ``_fed[:offset]`` is what the stream holds up to now; forget evicted marks and
        message starts (the cut of the window, :func:`edgesink.layout.turn_cut`, skips them anyway)."""
        oldest = self.session.first_removable()
        self._marks = [m for m in self._marks if m[1] >= oldest and m[0] < offset]
        self._marks.append((offset, self.session.tokens_seen))
        while self.message_starts and self.message_starts[0] < oldest:
            self.message_starts.popleft()

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

    def add(self, message: str, role: str = "user") -> None:
        """Add a message and feed it, with no reply: a history replayed, or a turn the caller wrote
        (``role`` may then be ``assistant`` too)."""
        if role not in _ROLES:
            raise ValueError(f"role must be one of {', '.join(_ROLES)}, got {role!r}")
        self._append_and_feed(message, role, add_generation_prompt=False)

    def send(self, message: str, role: str = "user", **generation) -> Iterator[str]:
        """Add a message and stream the assistant's reply (text pieces)."""
        if role not in ("user", "system", "tool"):
            raise ValueError(f"role must be 'user', 'system' or 'tool', got {role!r}")
        return _texts(self.stream_reply(message, role, **generation))

    def stream_reply(self, message: str, role: str = "user", **generation) -> Iterator[GenerationChunk]:
        """Add a message (fed now) and return the reply as :class:`~edgesink.textstream.GenerationChunk`
        objects, finish reason and all; generation settings as ``Session.stream_generate``."""
        if role not in ("user", "system", "tool"):
            raise ValueError(f"role must be 'user', 'system' or 'tool', got {role!r}")
        self._append_and_feed(message, role, add_generation_prompt=True)
        return self._reply(**generation)

    def _append_and_feed(self, message: str, role: str, add_generation_prompt: bool) -> None:
        self._slide_window()
        self.messages.append({"role": role, "content": message})
        indices = self._indices()
        before = self._render(indices[:-1], add_generation_prompt=False)
        prompt = self._render(indices, add_generation_prompt=add_generation_prompt)
        # The turn (message and reply) begins where the conversation before it ends; what comes
        # before that (closing a reply that was cut short) belongs to the previous turn.
        boundaries = [len(before)] if prompt.startswith(before) else []
        seen = self.session.tokens_seen
        try:
            self._feed_rendering(prompt, boundaries)
        except BaseException:  # Ctrl-C, a full dense cache...
            if self.session.tokens_seen == seen:  # nothing went in: as if never sent
                self.messages.pop()
            elif add_generation_prompt:  # part of it is cached: count it as sent (with no reply), so the next turn closes it
                self.messages.append({"role": "assistant", "content": ""})
                self._fed = prompt + PLACEHOLDER.format(len(self.messages) - 1)
            raise

    def _reply(self, **generation) -> Iterator[GenerationChunk]:
        self.messages.append({"role": "assistant", "content": ""})
        reply, end_token = [], None
        try:
            for chunk in self.session.stream_generate(**generation):
                reply.append(chunk.text)
                end_token = chunk.end_token
                yield chunk
        finally:
            # Whatever happened (Ctrl-C too), the cache holds the reply so far: record it.
            self.messages[-1]["content"] = "".join(reply)
            self._fed += PLACEHOLDER.format(len(self.messages) - 1)
            if end_token is not None:  # the template's end of a turn, as the model wrote it
                self._fed += self.session.model.token_text(end_token)
            self._mark(len(self._fed))


_ROLES = ("system", "user", "assistant", "tool")


def _texts(chunks) -> Iterator[str]:
    """The non-empty text pieces of generation chunks."""
    with closing(chunks):  # closed with this generator: the reply so far is recorded then
        for chunk in chunks:
            if chunk.text:
                yield chunk.text


def saved_chat_problem(saved, tokens_seen: int) -> str | None:
    """What is wrong with a chat read from a session file, or None (``saved`` may be None: no chat)."""
    if saved is None:
        return None
    if not isinstance(saved, dict):
        return "chat"
    messages, fed = saved["messages"], saved["fed"]
    if not (saved["system"] is None or isinstance(saved["system"], str)) or not isinstance(saved["keep_system"], bool):
        return "chat system prompt"
    if not (isinstance(messages, list) and all(
            isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in _ROLES
            and isinstance(m["content"], str) for m in messages)):
        return "chat messages"
    if not isinstance(fed, str) or any(int(i) >= len(messages) for i in PLACEHOLDER_RE.findall(fed)):
        return "chat rendering"
    marks = saved.get("marks", [])
    if not (isinstance(marks, list) and all(
            isinstance(m, list) and len(m) == 2 and all(type(x) is int for x in m)
            and 0 <= m[0] <= len(fed) and 0 <= m[1] <= tokens_seen for m in marks)):
        return "chat marks"
    render_from = saved.get("render_from", 0)
    if not (type(render_from) is int and 0 <= render_from <= len(messages)):
        return "chat render_from"
    starts = saved.get("message_starts", [])
    if not (isinstance(starts, list) and all(type(i) is int and 0 <= i <= tokens_seen for i in starts)
            and starts == sorted(starts)):
        return "chat message_starts"
    template = saved.get("template")
    if template is not None:
        if not isinstance(template, str):
            return "chat template"
        if len(template) > MAX_TEMPLATE_CHARS:
            return f"chat template longer than {MAX_TEMPLATE_CHARS:,} characters"
        try:
            compiled = ChatTemplate(template)
        except TemplateRenderError:
            return "chat template does not parse"
        try:  # what the next turn renders first: a template that cannot is refused now, not mid-chat
            compiled.render(_placeholders(messages, _rendered_indices(messages, render_from)),
                            add_generation_prompt=False)
        except TemplateRenderError:
            return "chat template fails on the saved conversation"
    return None


def _rendered_indices(messages: list[dict], start: int) -> list[int]:
    """The messages a chat renders: a leading system prompt, then those from ``start`` on."""
    head = [0] if messages and messages[0]["role"] == "system" else []
    return head + list(range(max(start, len(head)), len(messages)))


def _placeholders(messages: list[dict], indices: list[int]) -> list[dict]:
    """Messages for the template, each content a placeholder tokenized apart (never parsed for special tokens)."""
    return [{"role": messages[i]["role"], "content": PLACEHOLDER.format(i)} for i in indices]
