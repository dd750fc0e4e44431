"""Context policies: what to evict from a full cache. Shared by the Session, the CLI and the benchmark.

A policy is a small immutable object that only decides *how many* of the oldest window tokens
leave the cache before new tokens come in; the Session carries the decision out on llama.cpp's
memory. The cache is seen as ``kept + window``: ``kept`` are the first tokens of the stream that
never leave (the attention sinks, or a chat's system prompt), ``window`` the most recent tokens.
Policies need no model, so they are unit-tested on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .errors import ContextFullError


@runtime_checkable
class ContextPolicy(Protocol):
    """The protocol every policy follows."""

    name: str
    sinks: int  # first tokens of the stream kept for ever (0: none)
    evicts: bool  # False: the stream may never outgrow the cache
    shifts: bool  # moves cached tokens, so the model's memory must support shifting
    recomputes: bool  # rebuilds the cache from the window before each step instead of shifting

    def evictions(self, capacity: int, n_kept: int, n_window: int, n_incoming: int) -> int:
        """How many of the oldest window tokens to evict so that ``n_incoming`` tokens fit.

        ``capacity`` is n_ctx; ``n_kept + n_window`` tokens are cached now. Never more than
        ``n_window``. Raises :class:`ContextFullError` when the policy does not evict.
        """
        ...

    def validate(self, capacity: int, max_incoming: int) -> None:
        """Raise ValueError if the policy cannot work with this capacity and batch size."""
        ...


def _missing(capacity: int, n_kept: int, n_window: int, n_incoming: int) -> int:
    return max(0, n_kept + n_window + n_incoming - capacity)


def _round_up(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk


def _check_common(name: str, capacity: int, sinks: int, max_incoming: int) -> None:
    if capacity < 2:
        raise ValueError(f"n_ctx must be at least 2, got {capacity}")
    if sinks < 0:
        raise ValueError(f"{name}: sinks must be >= 0, got {sinks}")
    if sinks >= capacity:
        raise ValueError(f"{name}: sinks ({sinks}) must be smaller than n_ctx ({capacity})")
    if max_incoming < 1:
        raise ValueError(f"{name}: the batch size must be >= 1, got {max_incoming}")
    if sinks + max_incoming > capacity:
        raise ValueError(
            f"{name}: a batch of {max_incoming} tokens plus {sinks} sinks does not fit in n_ctx {capacity}; "
            "use a smaller batch"
        )


@dataclass(frozen=True)
class Dense:
    """No eviction: the stream may not outgrow the cache (raises ContextFullError)."""

    name = "dense"
    sinks = 0
    evicts = False
    shifts = False
    recomputes = False

    def evictions(self, capacity, n_kept, n_window, n_incoming):
        if _missing(capacity, n_kept, n_window, n_incoming):
            raise ContextFullError(
                f"the context is full ({n_kept + n_window} of {capacity} tokens cached, {n_incoming} more asked); "
                "the dense policy never evicts: use policy 'sink' for an endless stream, or a larger n_ctx"
            )
        return 0

    def validate(self, capacity, max_incoming):
        _check_common(self.name, capacity, 0, max_incoming)


@dataclass(frozen=True)
class Sink:
    """StreamingLLM: keep the first ``sinks`` tokens and the most recent ones.

    Evicts the oldest window tokens in multiples of ``evict_chunk`` (1 is the paper's setting).
    """

    sinks: int = 4
    evict_chunk: int = 1
    name = "sink"
    evicts = True
    shifts = True
    recomputes = False

    def evictions(self, capacity, n_kept, n_window, n_incoming):
        missing = _missing(capacity, n_kept, n_window, n_incoming)
        return min(n_window, _round_up(missing, self.evict_chunk)) if missing else 0

    def validate(self, capacity, max_incoming):
        _check_common(self.name, capacity, self.sinks, max_incoming)
        if self.evict_chunk < 1:
            raise ValueError(f"{self.name}: evict_chunk must be >= 1, got {self.evict_chunk}")
        if self.evict_chunk > capacity - self.sinks:
            raise ValueError(f"{self.name}: evict_chunk ({self.evict_chunk}) is larger than the window")


@dataclass(frozen=True)
class Window(Sink):
    """Plain window attention: evict the oldest tokens, keep no sinks (the collapsing baseline)."""

    sinks: int = 0
    name = "window"

    def __post_init__(self):
        if self.sinks != 0:
            raise ValueError("window keeps no sinks; use policy 'sink' to keep some")


@dataclass(frozen=True)
class Halve:
    """llama.cpp's own context shift: keep ``sinks`` tokens, discard half of the rest at once."""

    sinks: int = 4
    name = "halve"
    evicts = True
    shifts = True
    recomputes = False

    def evictions(self, capacity, n_kept, n_window, n_incoming):
        missing = _missing(capacity, n_kept, n_window, n_incoming)
        return min(n_window, max(missing, n_window // 2)) if missing else 0

    def validate(self, capacity, max_incoming):
        _check_common(self.name, capacity, self.sinks, max_incoming)


@dataclass(frozen=True)
class Recompute:
    """Sliding window with re-computation: re-encode the last n_ctx tokens before each step.

    The paper's slow, strong baseline: every token sees a freshly computed window, no sinks.
    """

    name = "recompute"
    evicts = True
    sinks = 0
    shifts = False
    recomputes = True

    def evictions(self, capacity, n_kept, n_window, n_incoming):
        missing = _missing(capacity, n_kept, n_window, n_incoming)
        return min(n_window, missing)

    def validate(self, capacity, max_incoming):
        _check_common(self.name, capacity, 0, max_incoming)


POLICY_NAMES = ("sink", "window", "halve", "dense", "recompute")


def make_policy(name: str, *, sinks: int | None = None, evict_chunk: int | None = None) -> ContextPolicy:
    """A policy by name with optional settings; the one place names become policy objects."""
    if name == "sink":
        return Sink(sinks=4 if sinks is None else sinks, evict_chunk=evict_chunk or 1)
    if name == "window":
        return Window(evict_chunk=evict_chunk or 1)
    if name == "halve":
        return Halve(sinks=4 if sinks is None else sinks)
    if name == "dense":
        return Dense()
    if name == "recompute":
        return Recompute()
    raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
