"""What a benchmark run measures: its settings, the policy variants, and the plan of jobs."""

from __future__ import annotations

from dataclasses import dataclass

from ..policies import DEFAULT_SINKS, POLICY_NAMES, ContextPolicy, default_batch_size, make_policy, settings_of
# The K-cache type dimension: sink (chunk 1), whose few kept cells are shifted again and again,
# runs with every type; halve, which shifts rarely, only with f32 as the reference for its drift.
TYPE_POLICIES = {"sink": None, "halve": ("f32",)}


def feed_batch(n_ctx: int) -> int:
    """Tokens per feed batch: the engine's default, passed explicitly.

    A batch of b tokens evicts b first, so while feeding, sink with an evict_chunk that divides
    b computes exactly what chunk 1 does.
    """
    return default_batch_size(n_ctx)


@dataclass(frozen=True)
class Variant:
    """One policy with its settings: a row of the results."""

    policy: str
    n_ctx: int
    sinks: int = 0
    evict_chunk: int | None = None  # sink / window only
    cache_type_k: str = "f16"

    @classmethod
    def of(cls, policy: str, n_ctx: int, cache_type_k: str = "f16", *, sinks: int = DEFAULT_SINKS,
           evict_chunk: int = 1) -> "Variant":
        """The variant of ``policy`` with the settings that apply to it (others normalised away)."""
        takes = settings_of(policy)
        made = make_policy(policy, sinks=sinks if "sinks" in takes and policy != "window" else None,
                           evict_chunk=evict_chunk if "evict_chunk" in takes else None)
        return cls(policy, n_ctx, made.sinks, getattr(made, "evict_chunk", None), cache_type_k)

    @property
    def context_policy(self) -> ContextPolicy:
        return make_policy(self.policy, sinks=self.sinks, evict_chunk=self.evict_chunk)

    @property
    def label(self) -> str:
        return self.context_policy.label

    def session_options(self) -> dict:
        """Keyword arguments of :class:`edgesink.Session` for this variant."""
        return {"n_ctx": self.n_ctx, "policy": self.context_policy, "type_k": self.cache_type_k,
                "batch_size": feed_batch(self.n_ctx)}

    def to_dict(self) -> dict:
        return {"policy": self.policy, "n_ctx": self.n_ctx, "sinks": self.sinks,
                "evict_chunk": self.evict_chunk, "cache_type_k": self.cache_type_k}


@dataclass(frozen=True)
class BenchConfig:
    """Settings of a run (the ``edgesink bench`` flags).

    The long quality runs (``tokens``, every policy, every K-cache type) are made at
    ``main_n_ctx``; the other cache sizes and the sinks sweep use the first ``sweep_tokens``.
    The stream is causal, so a shorter run is exactly a prefix of a longer one.
    """

    model: str | None = None  # path or registry name; None: the default model
    text: str | None = None  # UTF-8 file; None: Jane Austen's novels
    tokens: int = 20_000  # 0: no quality runs (e.g. a soak alone)
    n_ctx: tuple[int, ...] = (256, 512, 1024, 2048)
    sinks: tuple[int, ...] = (0, 1, 2, 4, 8)
    cache_types: tuple[str, ...] = ("f16", "q8_0", "f32")
    policies: tuple[str, ...] = ("dense", "window", "sink", "halve", "recompute")
    evict_chunks: tuple[int, ...] = (1, 64)
    main_n_ctx: int = 512
    sweep_tokens: int | None = 3_072  # None: the same as tokens
    sample: int = 128  # positions scored by recompute (and on which every policy is compared)
    segments: int = 10  # per-segment perplexity along the quality streams
    gen_tokens: int = 32  # tokens generated per latency measurement
    gen_tokens_recompute: int = 4  # each one re-encodes the whole window
    feed_tokens: int = 256  # tokens fed at a full cache to measure feed tokens/s
    overhead_steps: int = 150  # eviction / dense step pairs per round
    overhead_rounds: int = 2  # patched and stock rounds, alternated
    soak: int = 0  # tokens streamed through sink in the soak (0: no soak)
    soak_segment: int = 65_536
    soak_sample_every: int = 8  # the soak scores one position in each block of this many
    threads: int | None = None
    stock_lib: str | None = None  # folder of the unpatched libllama; None: none compared
    out: str = "edgesink-bench"
    json_path: str | None = None
    plots: bool = True
    isolate: bool = True  # each job in its own process (own peak RSS); False: in this one (tests)
    seed: int = 0
    command: str = ""  # the command line, written into the results

    def __post_init__(self):
        unknown = [p for p in self.policies if p not in POLICY_NAMES]
        if unknown:
            raise ValueError(f"unknown policies {', '.join(unknown)}; choose from {', '.join(POLICY_NAMES)}")
        if not self.n_ctx:
            raise ValueError("give at least one n_ctx")
        if self.tokens < 0 or self.tokens == 1 or (self.tokens and self.sample < 1):
            raise ValueError("tokens must be 0 (no quality runs) or >= 2, and sample >= 1")
        if min(self.n_ctx) <= max(self.sinks + (DEFAULT_SINKS,)) + 1:
            raise ValueError("every n_ctx must be larger than the sinks")
        if self.main_n_ctx not in self.n_ctx:
            object.__setattr__(self, "main_n_ctx", self.n_ctx[0])
        short = [n for n in self.n_ctx if self.tokens and self.tokens_for(n) <= n]
        if short:
            raise ValueError(f"the quality streams must be longer than the cache (n_ctx {short[0]}) or nothing "
                             "is evicted: raise tokens / sweep_tokens, or use tokens 0 for no quality runs")

    @property
    def base_type(self) -> str:
        return self.cache_types[0]

    def tokens_for(self, n_ctx: int) -> int:
        """Quality-stream length at this cache size."""
        sweep = self.sweep_tokens or self.tokens
        return self.tokens if n_ctx == self.main_n_ctx else min(sweep, self.tokens)

    @property
    def sweep_length(self) -> int:
        return min(self.sweep_tokens or self.tokens, self.tokens)

    def policy_variants(self, n_ctx: int, cache_type_k: str | None = None) -> list[Variant]:
        """Every asked policy at this cache size (sink once per eviction chunk that fits)."""
        t = cache_type_k or self.base_type
        found = []
        for policy in self.policies:
            if policy == "sink":
                found += [Variant.of("sink", n_ctx, t, evict_chunk=c) for c in self.evict_chunks
                          if c <= n_ctx - DEFAULT_SINKS]
            else:
                found.append(Variant.of(policy, n_ctx, t))
        return found


@dataclass
class Job:
    """One measurement, run in a worker process."""

    kind: str  # "quality", "latency", "overhead", "soak"
    variant: Variant
    n_tokens: int = 0  # tokens streamed (quality, soak); 0: as many as the job needs
    stock: bool = False  # run against the unpatched libllama

    @property
    def label(self) -> str:
        lib = " stock" if self.stock else ""
        return f"{self.kind}{lib} {self.variant.label} n_ctx={self.variant.n_ctx} K={self.variant.cache_type_k}"


def plan(config: BenchConfig) -> list[Job]:
    """Every job of a run, in the order they run."""
    jobs = _quality_jobs(config) if config.tokens else []
    base = config.base_type
    for n_ctx in config.n_ctx:
        for v in config.policy_variants(n_ctx):
            jobs.append(Job("latency", v))
    if "sink" in config.policies:
        for n_ctx in config.n_ctx:
            v = Variant.of("sink", n_ctx, base)
            for _ in range(config.overhead_rounds):
                jobs.append(Job("overhead", v))
                if config.stock_lib:
                    jobs.append(Job("overhead", v, stock=True))
    if config.soak:
        jobs.append(Job("soak", Variant.of("sink", config.main_n_ctx, base), config.soak))
    return jobs


def _quality_jobs(config: BenchConfig) -> list[Job]:
    """The perplexity streams: every policy per n_ctx, the K-cache types, then the sinks sweep."""
    jobs: list[Job] = []
    base = config.base_type
    for n_ctx in config.n_ctx:
        for v in config.policy_variants(n_ctx):
            if not same_quality_as_chunk_1(v):
                jobs.append(Job("quality", v, config.tokens_for(n_ctx)))
    for t in config.cache_types[1:]:
        for policy, types in TYPE_POLICIES.items():
            if policy in config.policies and (types is None or t in types):
                jobs.append(Job("quality", Variant.of(policy, config.main_n_ctx, t), config.tokens))
    if "sink" in config.policies:
        done = {j.variant for j in jobs}
        for n_ctx in config.n_ctx:
            for s in config.sinks:
                v = Variant.of("sink", n_ctx, base, sinks=s)
                # sink with no sinks is window; each run covers the sweep's prefix of the stream
                if v not in done and not (s == 0 and Variant.of("window", n_ctx, base) in done):
                    jobs.append(Job("quality", v, config.sweep_length))
                    done.add(v)
    return jobs


def same_quality_as_chunk_1(v: Variant) -> bool:
    """Feeding sink in batches that its evict_chunk divides computes exactly what chunk 1 does."""
    return v.policy == "sink" and v.evict_chunk != 1 and feed_batch(v.n_ctx) % v.evict_chunk == 0
