"""The context-shift benchmark: quality, speed and memory of every context policy.

Each measurement runs in its own worker process (:mod:`edgesink.bench.worker`), so its peak
RSS is its own and the stock libllama can be loaded side by side with the patched one. The
policies are the engine's own objects (:func:`edgesink.make_policy`); nothing here evicts.

    from edgesink.bench import BenchConfig, run_benchmark
    run_benchmark(BenchConfig(tokens=3000, n_ctx=(256, 512), out="bench-out"))
"""

from .config import BenchConfig, Variant
from .runner import run_benchmark

__all__ = ["BenchConfig", "Variant", "run_benchmark"]
