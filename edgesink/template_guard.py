"""Time and size limits for chat templates, which come from model files and are not trusted.

Jinja's sandbox stops a template from reaching Python internals, but not from running away: a
loop or a recursive macro that produces no output, or a string doubled forty times, never lets
the caller check a clock or a size between output pieces; and one C-level operation (a huge
power, a string padded to three billion characters) cannot be interrupted at all. This module
closes both:

* time: while a template renders, a trace function checks a deadline on every line executed in
  any Python frame (template code, macros, Jinja's runtime), so nested silent loops and
  exponential macros stop within milliseconds of the deadline;
* size: every operation that can build something big in one C call is measured *before* it
  runs: ``*``, ``**``, ``+``, ``%``, ``str.format``, the growing string methods (center, ljust,
  rjust, zfill, expandtabs, replace, join, translate) and filters (center, indent, wordwrap,
  replace, join, format, batch, slice, tojson, urlize, sum); every argument, filter result, call
  result and printed value is measured too, counting nested containers whole (a list holding one
  long string a million times is as big as the text it would print). Integers stay below
  ``MAX_INT_BITS`` bits;
* memory: what one render builds is also counted in all (``BUILT_FACTOR`` times the size limit),
  so a generator of big strings collected into a list is stopped after a few of them.
"""

from __future__ import annotations

import inspect
import re
import sys
import time
import types
from contextlib import contextmanager
from functools import wraps
from itertools import repeat
from string import Formatter

from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_INT_BITS = 1 << 16  # about 20,000 digits: far past any date, count or id a template needs
BUILT_FACTOR = 16  # a render may build this many times the size limit in all (real ones: a few kB)
_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_NUMBER = re.compile(r"\d+")


class TemplateLimitError(SecurityError):
    """A template exceeded the time or size limit."""


def measure(value, limit: int) -> tuple[int, int]:
    """(size, depth) of ``value``: characters and items, nested containers counted whole.

    The walk stops once the size passes ``limit``, so it visits about ``limit`` values at most.
    """
    size, depth, stack = 0, 0, [(value, 1)]
    while stack and size <= limit:
        item, level = stack.pop()
        depth = max(depth, level)
        if isinstance(item, (str, bytes)):
            size += len(item)
        elif isinstance(item, (list, tuple, set, frozenset, dict)):
            size += len(item)
            if size > limit:
                break
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            if children and set(map(type, children)) <= {str}:  # the common case, added up in C
                size += sum(map(len, children))
                depth = max(depth, level + 1)
            else:
                stack.extend(zip(children, repeat(level + 1)))
        elif isinstance(item, int):
            size += item.bit_length() // 3  # about its number of digits
        else:
            size += 1
    return size, depth


_MEASURE_CODE = measure.__code__


def size_of(value, limit: int) -> int:
    """The size part of :func:`measure`."""
    return measure(value, limit)[0]


class GuardedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox with every value a template builds bounded by ``max_chars``."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self, *args, max_chars: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_chars = max_chars
        self.built = 0  # characters and items built since begin_render()
        self.finalize = self.check_size  # every printed value is measured before it becomes text
        self.concat = self._bounded_concat  # the output of a macro, a {% set %} or {% filter %} block
        self.globals.pop("lipsum", None)  # generates text in a loop of its own; no template needs it
        self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

    def from_string(self, source, *args, **kwargs):
        template = super().from_string(source, *args, **kwargs)
        namespace = template.root_render_func.__globals__  # the compiled module: `~` calls these
        namespace["str_join"] = self._bounded_join(str_join)
        namespace["markup_join"] = self._bounded_join(markup_join)
        return template

    # -- measuring ----------------------------------------------------------------------------

    def begin_render(self) -> None:
        """Start counting what a render builds afresh."""
        self.built = 0

    def check_built(self, value):
        """``value``, just built by the template: measured, and counted against the render's total."""
        self.built += self._size(value)
        if self.built > BUILT_FACTOR * self.max_chars:
            raise TemplateLimitError(f"the template built over {BUILT_FACTOR * self.max_chars:,} characters or "
                                     "items in all")
        return value

    def check_size(self, value):
        """``value``, or TemplateLimitError if it (nested containers included) exceeds the limit."""
        self._size(value)
        return value

    def _size(self, value) -> int:
        size = size_of(value, self.max_chars)
        if size > self.max_chars:
            raise TemplateLimitError(f"the template built a value of over {self.max_chars:,} characters or items")
        return size

    def check_planned(self, size: int, what: str) -> None:
        """Refuse an operation whose result would exceed the limit, before it runs."""
        if size > self.max_chars:
            raise TemplateLimitError(
                f"the template's {what} would build about {size:,} characters or items (limit {self.max_chars:,})")

    def check_arguments(self, args, kwargs) -> None:
        for value in (*args, *kwargs.values()):
            self.check_size(value)

    def _bounded_concat(self, pieces) -> str:
        pieces = list(pieces)
        self.check_planned(sum(size_of(p, self.max_chars) for p in pieces), "block")
        return self.check_built("".join(pieces))

    def _bounded_join(self, func):
        @wraps(func)
        def bounded(seq):
            seq = list(seq)
            self.check_planned(sum(size_of(v, self.max_chars) for v in seq), "~")
            return self.check_built(func(seq))
        return bounded

    def _bounded_filter(self, name: str, func):
        plan = FILTER_PLANS.get(name)
        try:
            signature = inspect.signature(func) if plan else None
        except (TypeError, ValueError):
            signature = None

        @wraps(func)
        def bounded(*args, **kwargs):
            self.check_arguments(args, kwargs)
            if signature is not None:
                try:
                    bound = signature.bind(*args, **kwargs)
                except TypeError:
                    pass  # wrong arguments: the filter itself says so
                else:
                    bound.apply_defaults()
                    self.check_planned(plan(bound.arguments, self.max_chars), f"{name} filter")
                    args, kwargs = bound.args, bound.kwargs  # a plan may have materialized an iterable
            return self.check_built(func(*args, **kwargs))
        return bounded

    # -- the sandbox's hooks ------------------------------------------------------------------

    def call_binop(self, context, operator, left, right):
        if operator in ("*", "**") and _is_int(left) and _is_int(right):
            bits = left.bit_length() * right if operator == "**" else left.bit_length() + right.bit_length()
            if bits > MAX_INT_BITS:
                raise TemplateLimitError(f"the template's {operator!r} would build an integer of about {bits:,} "
                                         f"bits (limit {MAX_INT_BITS:,})")
        else:
            self.check_planned(_binop_size(operator, left, right, self.max_chars), f"{operator!r} operator")
        return self.check_built(super().call_binop(context, operator, left, right))

    def wrap_str_format(self, value):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        text, is_map = value.__self__, value.__name__ == "format_map"

        @wraps(wrapped)
        def planned(*args, **kwargs):
            values = [*args, *kwargs.values()]
            if is_map and args and isinstance(args[0], dict):
                values = list(args[0].values())
            self.check_arguments(values, {})
            self.check_planned(_format_size(text, values, self.max_chars), "format()")
            return wrapped(*args, **kwargs)
        return planned

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's own signature)
        __self.check_arguments(args, kwargs)
        owner = getattr(__obj, "__self__", None)
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(owner, str) and __obj.__name__ in STR_PLANS:
            args = __self._check_str_method(owner, __obj.__name__, args, kwargs)
        return __self.check_built(super().call(__context, __obj, *args, **kwargs))

    def _check_str_method(self, text: str, name: str, args: tuple, kwargs: dict) -> tuple:
        """Refuse a growing str method whose result would be too big; its arguments, an iterator joined listed."""
        if name == "join" and args and not isinstance(args[0], (str, list, tuple)):
            args = (list(args[0]), *args[1:])  # an iterator: materialized once, measured, then joined
        try:
            size = STR_PLANS[name](text, args, kwargs, self.max_chars)
        except (TypeError, ValueError, IndexError):
            size = 0  # wrong arguments: the method itself says so
        self.check_planned(size, f"str.{name}()")
        return args


# -- result sizes, worked out before the operation -------------------------------------------------

def _binop_size(operator: str, left, right, limit: int) -> int:
    """About how big ``left <operator> right`` will be; 0 when it cannot grow much."""
    if operator == "*":
        seq, n = (left, right) if _is_int(right) else (right, left)
        if _is_int(n) and isinstance(seq, (str, bytes, list, tuple)):
            return size_of(seq, limit) * max(n, 0)
    if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        return size_of(left, limit) + size_of(right, limit)
    if operator == "%" and isinstance(left, str):
        return _percent_size(left, _percent_values(right), limit)
    return 0


def _percent_values(right) -> list:
    """The values ``text % right`` formats."""
    if isinstance(right, dict):
        return list(right.values())
    return list(right) if isinstance(right, tuple) else [right]


def _percent_size(text: str, values: list, limit: int) -> int:
    """An upper bound of ``text % values``: each field as wide as its width, precision and biggest value."""
    biggest = max((size_of(v, limit) for v in values), default=0)
    star = max((v for v in values if _is_int(v)), default=0)  # a `*` width or precision comes from the values
    size = len(text)
    for match in _PERCENT_FIELD.finditer(text):
        size += biggest + sum(star if g == "*" else int(g) for g in match.groups() if g)
    return size


def _format_size(text: str, values: list, limit: int) -> int:
    """An upper bound of ``text.format(...)``: each field as wide as its spec's numbers and biggest value."""
    biggest = max((size_of(v, limit) for v in values), default=0)
    nested = max((v for v in values if _is_int(v)), default=0)  # `{:>{}}`: a width taken from the values
    size = len(text)
    try:
        fields = list(Formatter().parse(text))
    except ValueError:
        return 0  # malformed: format() itself says so
    for _, name, spec, _ in fields:
        if name is not None:
            spec = spec or ""
            size += biggest + sum(int(n) for n in _NUMBER.findall(spec)) + (nested if "{" in spec else 0)
    return size


def _replaced_size(text, old, new, count) -> int:
    text, old, new = str(text), str(old), str(new)
    n = text.count(old)
    if _is_int(count) and count >= 0:
        n = min(n, count)
    return len(text) + n * max(0, len(new) - len(old))


def _join_plan(arguments: dict, limit: int) -> int:
    value = arguments["value"]
    if not isinstance(value, (str, list, tuple)):
        value = arguments["value"] = list(value)  # an iterator: materialized once, measured, then joined
    return size_of(value, limit) + size_of(arguments["d"], limit) * len(value)


def _tojson_plan(arguments: dict, limit: int) -> int:
    indent = arguments["indent"]
    if indent is None:
        return 0
    size, depth = measure(arguments["value"], limit)
    width = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 0
    return size * (1 + max(width, 0) * depth)


def _sum_plan(arguments: dict, limit: int) -> int:
    """Summing lists copies the total so far at every step: the work is quadratic."""
    iterable, start = arguments["iterable"], arguments["start"]
    if isinstance(start, (list, tuple)) and isinstance(iterable, (list, tuple)):
        return len(iterable) * size_of(iterable, limit) // 2
    return 0


def _urlize_plan(arguments: dict, limit: int) -> int:
    n = size_of(arguments["value"], limit)  # a link per 4 characters at most, each with its attributes
    extra = size_of(arguments["target"], limit) + size_of(arguments["rel"], limit)
    return 3 * n + (n // 4 + 1) * (40 + extra)


def _width(value) -> int:
    return value if _is_int(value) else 0


FILTER_PLANS = {
    "center": lambda a, limit: max(size_of(a["value"], limit), _width(a["width"])),
    "indent": lambda a, limit: size_of(a["s"], limit) + (str(a["s"]).count("\n") + 1) * (
        _width(a["width"]) if _is_int(a["width"]) else size_of(a["width"], limit)),
    "wordwrap": lambda a, limit: size_of(a["s"], limit) * (1 + size_of(a["wrapstring"] or "\n", limit)),
    "replace": lambda a, limit: _replaced_size(a["s"], a["old"], a["new"], a["count"]),
    "join": _join_plan,
    "format": lambda a, limit: _percent_size(str(a["value"]), [*a["args"], *a["kwargs"].values()], limit),
    "batch": lambda a, limit: size_of(a["value"], limit) + _width(a["linecount"]),
    "slice": lambda a, limit: size_of(a["value"], limit) + 2 * _width(a["slices"]),
    "tojson": _tojson_plan,
    "urlize": _urlize_plan,
    "sum": _sum_plan,
}

STR_PLANS = {  # (the string, positional args, keyword args, limit) -> the result's size
    "center": lambda s, a, k, limit: max(len(s), _width(a[0])),
    "ljust": lambda s, a, k, limit: max(len(s), _width(a[0])),
    "rjust": lambda s, a, k, limit: max(len(s), _width(a[0])),
    "zfill": lambda s, a, k, limit: max(len(s), _width(a[0])),
    "expandtabs": lambda s, a, k, limit: len(s) * max(1, _width(a[0] if a else k.get("tabsize", 8))),
    "replace": lambda s, a, k, limit: _replaced_size(s, a[0], a[1], a[2] if len(a) > 2 else k.get("count", -1)),
    "join": lambda s, a, k, limit: size_of(a[0], limit) + len(s) * len(a[0]),
    "translate": lambda s, a, k, limit: len(s) * (1 + max(
        (size_of(v, limit) for v in a[0].values()), default=0) if isinstance(a[0], dict) else 1),
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@contextmanager
def time_limit(seconds: float):
    """Raise TemplateLimitError in whatever Python code runs in this thread after ``seconds``."""
    deadline = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateLimitError(f"the template ran for more than {seconds:g} s")
        # measure() visits at most about a million values: fast untraced, twenty times slower traced
        return None if frame.f_code is _MEASURE_CODE else on_line

    previous = sys.gettrace()
    sys.settrace(on_line)
    try:
        yield
    finally:
        sys.settrace(previous)
