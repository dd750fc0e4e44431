"""Time and size limits for chat templates, which come from model files and are not trusted.

Jinja's sandbox stops a template from reaching Python internals, but not from running away: a
loop or a recursive macro that produces no output, or a string doubled forty times, never lets
the caller check a clock or a size between output pieces. This module closes both:

* time: while a template renders, a trace function checks a deadline on every line executed in
  any Python frame (template code, macros, Jinja's runtime), so nested silent loops and
  exponential macros stop within milliseconds of the deadline;
* size: every string concatenation (``~``), repetition (``*``), power (``**``), ``%`` and
  ``format`` width, filter result and call result is bounded before or right after it is built.
"""

from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from functools import wraps

from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

_WIDTH = re.compile(r"\d{7,}")  # a field width or precision of a million or more


class TemplateLimitError(SecurityError):
    """A template exceeded the time or size limit."""


class GuardedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every value a template builds bounded by ``max_chars``."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *args, max_chars: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_chars = max_chars
        self.globals.pop("lipsum", None)  # generates text in a loop of its own; no template needs it
        self.filters = {name: self._bounded(f) for name, f in self.filters.items()}

    def from_string(self, source, *args, **kwargs):
        template = super().from_string(source, *args, **kwargs)
        namespace = template.root_render_func.__globals__  # the compiled module: `~` calls these
        namespace["str_join"] = self._bounded(str_join)
        namespace["markup_join"] = self._bounded(markup_join)
        return template

    def check_size(self, value):
        if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > self.max_chars:
            raise TemplateLimitError(f"the template built a value of {len(value)} items (limit {self.max_chars})")
        return value

    def _bounded(self, func):
        @wraps(func)
        def bounded(*args, **kwargs):
            if func.__name__ == "do_replace" and len(args) >= 4 and isinstance(args[1], str):
                # replace(s, old, new): the result can be len(s) * len(new) long; check first
                if len(args[1]) * max(1, len(str(args[3]))) > self.max_chars * 4:
                    raise TemplateLimitError("the template's replace() would build too long a string")
            return self.check_size(func(*args, **kwargs))
        return bounded

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > self.max_chars:
                raise TemplateLimitError(f"the template repeats a value {n} times (limit {self.max_chars} items)")
        elif operator == "**":
            numbers = isinstance(right, (int, float)) and isinstance(left, (int, float))
            if numbers and abs(right) > 256 and abs(left) > 1:
                raise TemplateLimitError(f"the template raises to the power {right}")
        elif operator == "%" and isinstance(left, str) and _WIDTH.search(left):
            raise TemplateLimitError("the template formats with a huge field width")
        return self.check_size(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is not None and isinstance(value.__self__, str) and _WIDTH.search(value.__self__):
            raise TemplateLimitError("the template formats with a huge field width")
        return wrapped

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        return __self.check_size(super().call(__context, __obj, *args, **kwargs))


@contextmanager
def time_limit(seconds: float):
    """Raise TemplateLimitError in whatever Python code runs in this thread after ``seconds``."""
    deadline = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"the template ran for more than {seconds:g} s")
        return on_line

    previous = sys.gettrace()
    sys.settrace(on_line)
    try:
        yield
    finally:
        sys.settrace(previous)
