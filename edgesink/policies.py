"""Context policies: what to evict from a full cache. Shared by the Session, the CLI and the benchmark.

A policy is a small immutable object that only decides *how many* of the oldest window tokens
leave the cache before new tokens come in; the Session carries the decision out on llama.cpp's
memory. The cache is seen as ``kept + window``: ``kept`` are the first tokens of the stream that
never leave (the attention sinks, or a chat's system prompt), ``window`` the most recent tokens.
Policies need no model, so they are unit-tested on their own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Protocol, runtime_checkable

from .errors import ContextFullError, SettingsError

DEFAULT_SINKS = 4  # StreamingLLM's setting: four initial tokens are enough for the models it studied


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

    def to_dict(self) -> dict:
        """The policy's name and settings, as :func:`policy_from_dict` takes them back."""
        ...

    @property
    def label(self) -> str:
        """A short human name with the settings that matter, for tables and plots."""
        ...


def default_batch_size(n_ctx: int) -> int:
    """Tokens decoded per step while feeding when not told: n_ctx/16, at most 64.

    A batch of b tokens needs b evictions first, so its first token sees only n_ctx - b older
    tokens; a small fraction of the window keeps that loss small while batching still pays.
    """
    return max(1, min(64, n_ctx // 16))


class _Settings:
    """What every policy shares: its settings are its dataclass fields."""

    def to_dict(self) -> dict:
        return {"name": self.name, **asdict(self)}

    @property
    def label(self) -> str:
        return self.name


def _missing(capacity: int, n_kept: int, n_window: int, n_incoming: int) -> int:
    return max(0, n_kept + n_window + n_incoming - capacity)


def _round_up(n: int, chunk: int) -> int:
    return -(-n // chunk) * chunk


def _check_common(name: str, capacity: int, sinks: int, max_incoming: int) -> None:
    if capacity < 2:
        raise SettingsError(f"n_ctx must be at least 2, got {capacity}")
    if sinks < 0:
        raise SettingsError(f"{name}: sinks must be >= 0, got {sinks}")
    if sinks >= capacity:
        raise SettingsError(f"{name}: sinks ({sinks}) must be smaller than n_ctx ({capacity})")
    if max_incoming < 1:
        raise SettingsError(f"{name}: the batch size must be >= 1, got {max_incoming}")
    if sinks + max_incoming > capacity:
        raise SettingsError(
            f"{name}: a batch of {max_incoming} tokens plus {sinks} sinks does not fit in n_ctx {capacity}; "
            "use a smaller batch"
        )


@dataclass(frozen=True)
class Dense(_Settings):
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
class Sink(_Settings):
    """StreamingLLM: keep the first ``sinks`` tokens and the most recent ones.

    Evicts the oldest window tokens in multiples of ``evict_chunk`` (1 is the paper's setting).
    """

    sinks: int = DEFAULT_SINKS
    evict_chunk: int = 1
    name = "sink"
    evicts = True
    shifts = True
    recomputes = False

    def evictions(self, capacity, n_kept, n_window, n_incoming):
        missing = _missing(capacity, n_kept, n_window, n_incoming)
        return min(n_window, _round_up(missing, self.evict_chunk)) if missing else 0

    @property
    def label(self) -> str:
        return f"sink({self.sinks}, chunk {self.evict_chunk})"

    def validate(self, capacity, max_incoming):
        _check_common(self.name, capacity, self.sinks, max_incoming)
        if self.evict_chunk < 1:
            raise SettingsError(f"{self.name}: evict_chunk must be >= 1, got {self.evict_chunk}")
        if self.evict_chunk > capacity - self.sinks:
            raise SettingsError(f"{self.name}: evict_chunk ({self.evict_chunk}) is larger than the window")


@dataclass(frozen=True)
class Window(Sink):
    """Plain window attention: evict the oldest tokens, keep no sinks (the collapsing baseline)."""

    sinks: int = 0
    name = "window"

    def __post_init__(self):
        if self.sinks != 0:
            raise SettingsError(f"policy 'window' keeps no sinks; use policy 'sink' (or 'halve') to keep {self.sinks}")

    @property
    def label(self) -> str:
        return "window" if self.evict_chunk == 1 else f"window(chunk {self.evict_chunk})"


@dataclass(frozen=True)
class Halve(_Settings):
    """llama.cpp's own context shift: keep ``sinks`` tokens, discard half of the rest at once."""

    sinks: int = DEFAULT_SINKS
    name = "halve"
    evicts = True
    shifts = True
    recomputes = False

    @property
    def label(self) -> str:
        return f"halve({self.sinks})"

    def evictions(self, capacity, n_kept, n_window, n_incoming):
        missing = _missing(capacity, n_kept, n_window, n_incoming)
        return min(n_window, max(missing, n_window // 2)) if missing else 0

    def validate(self, capacity, max_incoming):
        _check_common(self.name, capacity, self.sinks, max_incoming)


@dataclass(frozen=True)
class Recompute(_Settings):
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


POLICIES = {"sink": Sink, "window": Window, "halve": Halve, "dense": Dense, "recompute": Recompute}
POLICY_NAMES = tuple(POLICIES)


def settings_of(name: str) -> tuple[str, ...]:
    """The settings policy ``name`` takes (``sinks``, ``evict_chunk``); ValueError for an unknown name."""
    return tuple(f.name for f in fields(_policy_class(name)))


def make_policy(name: str, *, sinks: int | None = None, evict_chunk: int | None = None) -> ContextPolicy:
    """A policy by name; settings left None take the policy's defaults. The one place names become policies.

    A setting the policy does not have is refused (sinks 0 and evict_chunk 1 are what those
    policies do anyway, so they pass).
    """
    cls = _policy_class(name)
    given = {key: value for key, value in (("sinks", sinks), ("evict_chunk", evict_chunk)) if value is not None}
    accepted = settings_of(name)
    if "sinks" not in accepted and given.pop("sinks", 0):
        raise SettingsError(f"policy {name!r} keeps no sinks; use policy 'sink' (or 'halve') to keep {sinks}")
    if "evict_chunk" not in accepted and given.pop("evict_chunk", 1) != 1:
        raise SettingsError(f"policy {name!r} has no evict_chunk; it belongs to 'sink' and 'window'")
    return cls(**given)


def policy_from_dict(data: dict) -> ContextPolicy:
    """The policy :meth:`ContextPolicy.to_dict` described (settings it lacks may be None: older files)."""
    return make_policy(data["name"], sinks=data.get("sinks"), evict_chunk=data.get("evict_chunk"))


def _policy_class(name: str) -> type:
    try:
        return POLICIES[name]
    except (KeyError, TypeError):
        raise SettingsError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
