"""A session's settings: one frozen object, checked once, shared by the Session, the CLI, restore and
the benchmark.

Everything that can be judged from the values alone is checked here, before a model loads; what
needs the model (n_ctx against its training length, the memory the cache takes) is checked by the
Session. Every bad value is a :class:`SettingsError` naming the setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import SettingsError
from .options import CACHE_TYPES, MAX_THREADS, SHIFT_MODES, check_int
from .policies import ContextPolicy, default_batch_size, make_policy


@dataclass(frozen=True)
class SessionConfig:
    """How a session runs (see :class:`edgesink.Session` for what each setting does).

    Make one with :meth:`of`, which takes a policy by name with its ``sinks`` / ``evict_chunk``,
    fills in the defaults that depend on n_ctx and checks everything; ``dataclasses.replace``
    of a checked config is checked again.
    """

    n_ctx: int = 2048
    policy: ContextPolicy = dataclasses.field(default_factory=lambda: make_policy("sink"))
    batch_size: int = 128
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool | None = None
    n_threads: int | None = None  # None: every CPU this process may run on
    shift_mode: str = "auto"
    refresh_every: int = 128
    rebase_every: int = 2048

    def __post_init__(self):
        check_int("n_ctx", self.n_ctx, 2)
        if not isinstance(self.policy, ContextPolicy):
            raise SettingsError(f"policy must be a policy name or a ContextPolicy object, got {self.policy!r}")
        check_int("batch_size", self.batch_size, 1)
        for name in ("type_k", "type_v"):
            if getattr(self, name) not in CACHE_TYPES:
                raise SettingsError(f"unknown cache type {getattr(self, name)!r} for {name}; "
                                    f"choose one of {', '.join(CACHE_TYPES)}")
        if self.flash_attn not in (None, True, False):
            raise SettingsError(f"flash_attn must be True, False or None (llama.cpp decides), got {self.flash_attn!r}")
        check_int("n_threads", self.n_threads, 1, MAX_THREADS)
        if self.shift_mode not in SHIFT_MODES:
            raise SettingsError(f"shift_mode must be one of {', '.join(map(repr, SHIFT_MODES))}, "
                                f"got {self.shift_mode!r}")
        check_int("refresh_every", self.refresh_every, 1)
        check_int("rebase_every", self.rebase_every, 1)
        self.policy.validate(self.n_ctx, self.batch_size)

    @classmethod
    def of(cls, *, n_ctx: int = 2048, policy: "str | ContextPolicy" = "sink", sinks: int | None = None,
           evict_chunk: int | None = None, batch_size: int | None = None, rebase_every: int | None = None,
           **settings) -> "SessionConfig":
        """A checked config from keyword settings, as :class:`edgesink.Session` takes them.

        ``batch_size`` defaults to n_ctx/16 (at most 64) and ``rebase_every`` to n_ctx.
        """
        unknown = set(settings) - set(SETTING_NAMES)
        if unknown:
            raise SettingsError(f"unknown session setting(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(SETTING_NAMES)}")
        check_int("n_ctx", n_ctx, 2)
        check_int("sinks", sinks, 0)
        check_int("evict_chunk", evict_chunk, 1)
        if isinstance(policy, str):
            policy = make_policy(policy, sinks=sinks, evict_chunk=evict_chunk)
        elif sinks is not None or evict_chunk is not None:
            raise SettingsError("sinks and evict_chunk go with a policy name; a policy object carries its own")
        return cls(n_ctx=n_ctx, policy=policy,
                   batch_size=default_batch_size(n_ctx) if batch_size is None else batch_size,
                   rebase_every=n_ctx if rebase_every is None else rebase_every, **settings)

    def saved_options(self) -> dict:
        """The settings a saved session keeps beside n_ctx, the cache types and the policy."""
        return {"batch_size": self.batch_size, "refresh_every": self.refresh_every,
                "rebase_every": self.rebase_every}


# Every keyword SessionConfig.of takes: the CLI's generic "-o KEY=VALUE" reaches each of them.
SETTING_NAMES = ("n_ctx", "policy", "sinks", "evict_chunk", "batch_size", "type_k", "type_v", "flash_attn",
                 "n_threads", "shift_mode", "refresh_every", "rebase_every")
