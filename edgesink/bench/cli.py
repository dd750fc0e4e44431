"""The ``edgesink bench`` command (also ``benchmarks/context_shift.py``)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from .._native import PACKAGE_DIR
from ..policies import POLICY_NAMES
from .config import BenchConfig
from .rerender import rerender
from .runner import run_benchmark

DEFAULTS = BenchConfig()


def _default_stock_lib() -> str | None:
    folder = PACKAGE_DIR.parent / "build" / "stock" / "lib"  # 'make stock-lib' in a source checkout
    return str(folder) if folder.is_dir() else None


def _ints(ctx, param, value):
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None


def _names(allowed):
    def parse(ctx, param, value):
        names = tuple(v.strip() for v in value.split(",") if v.strip())
        bad = [n for n in names if allowed and n not in allowed]
        if bad or not names:
            raise click.BadParameter(f"choose from {', '.join(allowed)}; got {value!r}")
        return names

    return parse


def _csv(values) -> str:
    return ",".join(str(v) for v in values)


@click.command()
@click.option("--model", default=None, help="GGUF path or registry name [default: the built-in SmolLM2-135M].")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Any UTF-8 text to stream [default: Jane Austen's novels].")
@click.option("--tokens", default=DEFAULTS.tokens, show_default=True,
              help="Length of the long quality streams (longer than every n_ctx; 0: no quality runs).")
@click.option("--n-ctx", "n_ctx", default=_csv(DEFAULTS.n_ctx), show_default=True, callback=_ints,
              help="Cache sizes.")
@click.option("--sinks", default=_csv(DEFAULTS.sinks), show_default=True, callback=_ints,
              help="Numbers of sinks for the sinks sweep.")
@click.option("--cache-type-k", "cache_types", default=_csv(DEFAULTS.cache_types), show_default=True,
              callback=_names(("f16", "q8_0", "f32", "bf16", "q5_1", "q5_0", "q4_1", "q4_0")),
              help="K-cache types; the first is used everywhere, the others for the shifting policies.")
@click.option("--policies", default=_csv(DEFAULTS.policies), show_default=True, callback=_names(POLICY_NAMES),
              help="Policies to run, comma-separated.")
@click.option("--evict-chunk", "evict_chunks", default=_csv(DEFAULTS.evict_chunks), show_default=True,
              callback=_ints, help="Eviction chunks of sink.")
@click.option("--main-n-ctx", default=DEFAULTS.main_n_ctx, show_default=True,
              help="The n_ctx of the long quality runs, the K-cache types and the soak (if not in --n-ctx: the first).")
@click.option("--sweep-tokens", type=int, default=DEFAULTS.sweep_tokens, show_default=True,
              help="Stream length at the other n_ctx and in the sinks sweep (at most --tokens).")
@click.option("--sample", default=DEFAULTS.sample, show_default=True,
              help="Positions recompute scores (every policy is compared on them).")
@click.option("--soak", default=0, show_default=True, help="Tokens streamed through sink in a soak (0: none).")
@click.option("--threads", type=int, default=None, help="CPU threads [default: every CPU this process may use].")
@click.option("--stock-lib", default=None,
              help="Folder of the unpatched libllama for the overhead comparison [default: build/stock/lib if built]; "
                   "'none' to skip.")
@click.option("--out", default=DEFAULTS.out, show_default=True, help="Folder for the tables and plots.")
@click.option("--json", "json_path", default=None, help="Also write the JSON results here.")
@click.option("--report-only", is_flag=True,
              help="Measure nothing: re-write the report and plots in --out from the JSON a run saved there.")
def bench(n_ctx, stock_lib, report_only, **options):
    """Measure every context policy: perplexity, per-token latency, feed speed, memory.

    Streams one long text through dense, window, sink (each eviction chunk), halve and
    recompute on the same tokens, times eviction against a dense step with the patched and the
    stock libllama, and writes a Markdown table, CSV/JSON and PNG plots into --out.
    """
    if report_only:
        _rerender(Path(options["out"]))
        return
    if stock_lib is None:
        stock_lib = _default_stock_lib()
    elif stock_lib.lower() == "none":
        stock_lib = None
    try:
        config = BenchConfig(n_ctx=n_ctx, stock_lib=stock_lib, command=shlex.join(sys.argv), **options)
    except ValueError as e:
        raise click.UsageError(str(e)) from e
    summary = run_benchmark(config)
    click.echo(f"results in {Path(config.out) / 'results.md'} ({summary['header']['run_seconds'] / 60:.1f} min)")


def _rerender(out: Path) -> None:
    try:
        rerender(out, shlex.join(sys.argv))
    except (FileNotFoundError, KeyError, ValueError) as e:
        raise click.UsageError(f"cannot re-render {out}: {e}") from e
    click.echo(f"results in {out / 'results.md'} (re-rendered)")
