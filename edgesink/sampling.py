"""Sampling settings and the llama.cpp sampler chain built from them."""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, fields

import numpy as np

from ._native import C
from .errors import SettingsError


DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed each time
GRAMMAR_ROOT = "root"  # the GBNF rule a grammar setting starts from
# struct llama_token_data { llama_token id; float logit; float p; }
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn. ``temperature=0`` (or ``top_k=1``) gives greedy decoding.

    ``grammar`` is GBNF text (llama.cpp's grammar format, starting at the rule ``root``) that the
    output must follow; generation ends once the grammar is complete. Every value is checked here,
    once: wrong types and ranges are a :class:`SettingsError` (a grammar llama.cpp cannot parse is
    one too, when a :class:`Sampler` is built from it).
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    grammar: str | None = None

    def __post_init__(self):
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if not self.temperature >= 0:
            raise SettingsError(f"temperature must be >= 0 (0: greedy decoding), got {self.temperature}")
        if self.top_k < 0:
            raise SettingsError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SettingsError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise SettingsError(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repeat_penalty > 0:
            raise SettingsError(f"repeat_penalty must be > 0 (1 disables it), got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise SettingsError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise SettingsError(f"seed must be in [0, 2**32), got {self.seed}")
        if self.grammar is not None and (not self.grammar.strip() or "\0" in self.grammar):
            # C reads the text up to its first NUL: a grammar with one would be cut short silently.
            raise SettingsError("grammar must be non-empty GBNF text without NUL characters (or None for none)")

    @classmethod
    def of(cls, **settings) -> "SamplingParams":
        """Sampling settings from keyword arguments; an unknown name is a :class:`SettingsError` too."""
        known = [f.name for f in fields(cls)]
        unknown = set(settings) - set(known)
        if unknown:
            raise SettingsError(f"unknown sampling setting(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
        return cls(**settings)


def _check_type(name: str, value, annotation: str) -> None:
    """Integers where the field is an int (never a bool), finite numbers where it is a float, text where a str."""
    if value is None and "None" in annotation:
        return
    if annotation.startswith("str"):
        if not isinstance(value, str):
            raise SettingsError(f"{name} must be a string, got {value!r}")
    elif annotation.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SettingsError(f"{name} must be an integer, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {value!r}")


def _grammar_sampler(grammar: str, model):
    """A llama.cpp grammar sampler for GBNF text over ``model``'s vocabulary (not yet in a chain)."""
    # LLAMA_API struct llama_sampler * llama_sampler_init_grammar(
    #         const struct llama_vocab * vocab, const char * grammar_str, const char * grammar_root);
    sampler = C.llama_sampler_init_grammar(C.llama_model_get_vocab(model.handle), grammar.encode(),
                                           GRAMMAR_ROOT.encode())
    if not sampler:  # llama.cpp logs the parse error and returns NULL
        raise SettingsError(f"llama.cpp cannot parse the grammar (GBNF text starting at rule {GRAMMAR_ROOT!r}): "
                            f"{grammar[:200]!r}")
    return sampler


class Sampler:
    """A llama.cpp sampler chain; free it with :meth:`close` (or use ``with``).

    ``model`` supplies the vocabulary that a grammar is matched against and a repeat penalty is
    sized for: it is needed only when ``params`` sets one of them, and must stay open while the
    sampler is used.
    """

    def __init__(self, params: SamplingParams, model=None):
        penalized = params.repeat_penalty != 1.0 and params.repeat_last_n > 0
        if model is None and (penalized or params.grammar is not None):
            raise ValueError("a Sampler with a grammar or a repeat penalty needs the model (for its vocabulary)")
        grammar = None if params.grammar is None else _grammar_sampler(params.grammar, model)
        self._constrained = grammar is not None
        # Greedy alone is an argmax (the first largest logit, as llama.cpp's greedy sampler picks), taken
        # without copying the vocabulary into llama.cpp's token array: a served step's largest cost in Python.
        self._argmax_only = params.temperature == 0 and not penalized and grammar is None
        self._data: np.ndarray | None = None  # llama.cpp's token array, made on first use and reused
        self._ids: np.ndarray | None = None  # 0..n-1, copied into the array before each use
        self._chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        add = lambda s: C.llama_sampler_chain_add(self._chain, s)  # noqa: E731  (the chain then owns s)
        if grammar is not None:
            # First: the samplers after it then choose only among the tokens the grammar allows.
            add(grammar)
        if penalized:
            # LLAMA_API struct llama_sampler * llama_sampler_init_penalties(int32_t n_vocab,
            #         int32_t penalty_last_n, float penalty_repeat, float penalty_freq, float penalty_present);
            add(C.llama_sampler_init_penalties(model.n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        if params.temperature == 0:
            # Greedy, as in llama.cpp's common sampler: the filters below never drop the likeliest
            # token, so they cannot change the argmax, and the seed does not matter.
            add(C.llama_sampler_init_greedy())
            return
        if params.top_k:
            add(C.llama_sampler_init_top_k(params.top_k))
        add(C.llama_sampler_init_top_p(params.top_p, 1))
        add(C.llama_sampler_init_min_p(params.min_p, 1))
        add(C.llama_sampler_init_temp(params.temperature))
        add(C.llama_sampler_init_dist(DEFAULT_SEED if params.seed is None else params.seed))

    def sample(self, ctx) -> int:
        """Draw a token from the logits of the last token decoded in ``ctx`` (and accept it).

        With a grammar, prefer :meth:`sample_logits`: where the grammar allows no token, llama.cpp
        aborts here, while that raises :class:`SettingsError`."""
        return int(C.llama_sampler_sample(self._chain, ctx, -1))

    def sample_logits(self, logits: np.ndarray) -> int:
        """Draw a token from one row of logits (and accept it), as :meth:`sample` does from a context."""
        n = len(logits)
        if self._argmax_only:
            token = int(np.argmax(logits))
            C.llama_sampler_accept(self._chain, token)
            return token
        if self._data is None or len(self._data) != n:
            self._data = np.empty(n, dtype=_TOKEN_DATA)
            self._ids = np.arange(n, dtype=np.int32)
        data = self._data
        data["id"] = self._ids  # copied in every time: the samplers may have reordered the array
        data["logit"] = logits
        data["p"] = 0.0
        array = C.llama_token_data_array(data=data.ctypes.data_as(C.llama_token_data_p), size=n,
                                         selected=-1, sorted=False)
        C.llama_sampler_apply(self._chain, ctypes.byref(array))
        chosen = array.data[array.selected]  # the samplers may point data elsewhere
        if self._constrained and chosen.logit == -math.inf:
            # The grammar ruled out every token; accepting one it rejects would abort the process.
            raise SettingsError("the grammar allows no token of this model's vocabulary here")
        token = int(chosen.id)
        C.llama_sampler_accept(self._chain, token)
        return token

    def close(self) -> None:
        if self._chain:
            C.llama_sampler_free(self._chain)
            self._chain = None

    def __enter__(self) -> "Sampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
