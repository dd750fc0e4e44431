"""The context-shift benchmark on a tiny configuration (real model, real prose): it runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgesink.bench import BenchConfig, run_benchmark, worker
from edgesink.bench.config import Variant, plan
from edgesink.bench.corpus import uniform_sample
from edgesink.bench.report import write_all
from edgesink.bench.rerender import load_run
from edgesink.bench.soak import memory_figures
from edgesink.bench.summary import ROW_KEYS
from edgesink.bench.worker import run_in_worker

REPO = Path(__file__).resolve().parents[1]
STOCK_LIB = REPO / "build" / "stock" / "lib"


def tiny_config(out: Path, **changes) -> BenchConfig:
    settings = dict(tokens=192, n_ctx=(64,), sinks=(0, 1, 4), cache_types=("f16", "f32"), evict_chunks=(1, 8),
                    sample=8, segments=4, gen_tokens=4, gen_tokens_recompute=2, feed_tokens=16,
                    overhead_steps=6, overhead_rounds=1, soak=384, soak_segment=256, threads=1,
                    stock_lib=str(STOCK_LIB) if STOCK_LIB.is_dir() else None,
                    isolate=False, plots=True, out=str(out), json_path=str(out / "copy.json"))
    settings.update(changes)
    return BenchConfig(**settings)


def test_plan_covers_every_policy_and_reuses_runs():
    config = BenchConfig(tokens=1000, n_ctx=(256, 512), sinks=(0, 1, 4), sweep_tokens=500)
    jobs = plan(config)
    quality = [j for j in jobs if j.kind == "quality"]
    assert {j.variant.policy for j in quality} == {"dense", "window", "sink", "halve", "recompute"}
    assert {j.variant.evict_chunk for j in quality if j.variant.policy == "sink"} == {1, 64}
    # sinks 0 is window and sinks 4 is the main sink run: neither is run again
    swept = {(j.variant.n_ctx, j.variant.sinks) for j in quality if j.variant.policy == "sink" and j.variant.evict_chunk == 1}
    assert swept == {(256, 1), (256, 4), (512, 1), (512, 4)}
    assert all(j.n_tokens == (1000 if j.variant.n_ctx == 512 else 500) for j in quality
               if j.variant.sinks != 1)
    types = {(j.variant.policy, j.variant.cache_type_k) for j in quality if j.variant.cache_type_k != "f16"}
    assert types == {("sink", "q8_0"), ("sink", "f32"), ("halve", "f32")}
    assert {j.kind for j in jobs} == {"quality", "latency", "overhead"}


def test_soak_alone_plans_no_quality_runs_and_short_streams_are_refused():
    jobs = plan(BenchConfig(tokens=0, n_ctx=(512,), policies=("sink",), evict_chunks=(1,), soak=10_000))
    assert [j.kind for j in jobs] == ["latency", "overhead", "overhead", "soak"]
    with pytest.raises(ValueError, match="longer than the cache"):
        BenchConfig(tokens=400, n_ctx=(256, 512))
    with pytest.raises(ValueError, match="longer than the cache"):
        BenchConfig(tokens=4000, n_ctx=(256, 2048), main_n_ctx=256, sweep_tokens=1000)
    with pytest.raises(ValueError, match="tokens must be 0"):
        BenchConfig(tokens=1)


def test_soak_memory_figures_show_growth_that_single_samples_hide():
    n_ctx = 512
    steady = [(n_ctx + 1000 * i, float(i), 180.0 + (1.5 if i % 7 == 0 else 0.0), 64.0) for i in range(400)]
    figures = memory_figures(steady, n_ctx)
    assert figures["rss_quarter_medians_mb"] == [180.0] * 4 and abs(figures["rss_trend_mb_per_100k"]) < 0.05
    leaking = [(t, sec, rss + 0.001 * i, anon + 0.001 * i) for i, (t, sec, rss, anon) in enumerate(steady)]
    figures = memory_figures(leaking, n_ctx)
    assert figures["anon_swap_trend_mb_per_100k"] == pytest.approx(0.1)
    assert figures["anon_swap_quarter_medians_mb"] == sorted(figures["anon_swap_quarter_medians_mb"])
    assert figures["anon_swap_quarter_medians_mb"][-1] - figures["anon_swap_quarter_medians_mb"][0] > 0.25
    before_fill = [(100, 0.1, 50.0, 20.0)]
    assert memory_figures(before_fill + steady, n_ctx)["rss_after_fill_mb"] == 181.5


def test_uniform_sample_is_spread_and_excludes_position_zero():
    sample = uniform_sample(10_000, 100, seed=3)
    assert len(sample) == 100 and sample.min() >= 1 and sample.max() < 10_000
    assert np.all(np.diff(sample) > 0)
    assert np.histogram(sample, bins=10, range=(0, 10_000))[0].tolist() == [10] * 10


@pytest.mark.slow  # every policy through the real benchmark: about 30 s
def test_tiny_benchmark_end_to_end(tmp_path, monkeypatch):
    # The raw per-token latencies each latency job measured (jobs run in this process: isolate=False).
    latencies: dict[tuple, list[float]] = {}
    measure = worker.measure_generation

    def recording(model, variant, tokens, **options):
        result = measure(model, variant, tokens, **options)
        latencies[(variant.policy, variant.sinks, variant.evict_chunk, variant.cache_type_k)] = list(result["ms"])
        return result

    monkeypatch.setattr(worker, "measure_generation", recording)
    summary = run_benchmark(tiny_config(tmp_path), progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) == {"model", "machine", "results"}
    assert data == json.loads((tmp_path / "copy.json").read_text())
    assert all(tuple(r) == ROW_KEYS for r in data["results"])
    by = {(r["policy"], r["sinks"], r["evict_chunk"], r["cache_type_k"]): r for r in data["results"]}
    for key in [("dense", 0, None, "f16"), ("window", 0, 1, "f16"), ("sink", 4, 1, "f16"), ("sink", 4, 8, "f16"),
                ("halve", 4, None, "f16"), ("recompute", 0, None, "f16")]:
        row = by[key]
        assert row["ppl"] > 1 and row["ms_per_token_median"] > 0 and row["peak_rss_mb"] > 0, key
        # The figures are those of the raw measurements, and as many tokens were timed as asked
        # (gen_tokens, 2 for recompute: each of its tokens re-encodes the window).
        ms = latencies[key]
        assert len(ms) == (2 if key[0] == "recompute" else 4), key
        assert row["ms_per_token_median"] == round(float(np.median(ms)), 3), key
        assert row["ms_per_token_p95"] == round(float(np.percentile(ms, 95)), 3), key
    # every policy on the same positions (dense only up to its full cache)
    scored = {k: r["tokens_scored"] for k, r in by.items() if k[0] != "dense"}
    assert len(set(scored.values())) == 1 and 0 < min(scored.values()) <= 8
    assert by[("dense", 0, None, "f16")]["tokens_scored"] <= min(scored.values())
    assert by[("sink", 4, 1, "f32")]["ppl"] > 1 and by[("sink", 1, 1, "f16")]["ppl"] > 1
    # window loses the first tokens and collapses; sinks keep it sane
    window = next(r for r in summary["rows"] if r["policy"] == "window")["ppl_all"]
    sink = next(r for r in summary["rows"] if r["label"] == "sink(4, chunk 1)" and r["cache_type_k"] == "f16")["ppl_all"]
    assert window > 1.5 * sink
    assert summary["speedup"][0]["speedup"] > 1
    assert {o["library"] for o in summary["overhead"]} == ({"patched", "stock"} if STOCK_LIB.is_dir() else {"patched"})
    soak = summary["soak"]
    assert [s["end"] for s in soak["segments"]] == [256, 384] and all(s["ppl"] for s in soak["segments"])
    assert soak["evictions"] == 384 - 64 and soak["tokens_in_cache"] == 64
    assert abs(soak["rss_end_mb"] / soak["rss_after_fill_mb"] - 1) < 0.05
    assert 0 < soak["anon_swap_after_fill_mb"] < soak["rss_after_fill_mb"]
    assert len(soak["ms_per_token_chunks"]) == len(soak["series"]) and min(soak["ms_per_token_chunks"]) > 0
    report = (tmp_path / "results.md").read_text()
    for heading in ("Quality per policy", "Speed and memory", "Eviction overhead", "number of sinks", "K-cache type",
                    "Soak"):
        assert heading in report
    assert (tmp_path / "results.csv").exists() and (tmp_path / "segments.csv").exists()
    # matplotlib is a test dependency (Makefile, pyproject's test extra): the plots are drawn every run.
    for name in ("logppl_stream.png", "latency_vs_cache.png", "ppl_vs_sinks.png", "soak.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert sorted(summary["header"]["plots"]) == sorted(p.name for p in tmp_path.glob("*.png"))


@pytest.mark.skipif(not STOCK_LIB.is_dir(), reason="no stock library (make stock-lib)")
def test_worker_process_loads_the_stock_library(tmp_path, model_path, model):
    tokens = np.asarray(model.tokenize("It is a truth universally acknowledged. " * 20), dtype=np.int32)
    np.save(tmp_path / "t.npy", tokens)
    job = {"kind": "overhead", "variant": Variant.of("sink", 64).to_dict(), "model": str(model_path),
           "tokens_file": str(tmp_path / "t.npy"), "n_tokens": 0, "threads": 2, "options": {"steps": 4}}
    import os

    env = {**os.environ, "EDGESINK_LIB_PATH": str(STOCK_LIB)}
    seen = []
    result = run_in_worker(job, env=env, progress=seen.append)
    assert result["patch_level"] == 0 and not result["kept_forward"]
    assert len(result["evict_ms"]) == len(result["dense_ms"]) == 4
    assert sum(seen) == 64 + 2 * (8 + 4) and result["peak_rss_mb"] > 0


def test_cli_rejects_bad_flags(tmp_path):
    from edgesink.cli import main

    result = CliRunner().invoke(main, ["bench", "--policies", "sink,nope", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "nope" in result.output
    result = CliRunner().invoke(main, ["bench", "--n-ctx", "4", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "sinks" in result.output
    assert "--soak" in CliRunner().invoke(main, ["bench", "--help"]).output


def test_soak_alone_then_its_report_re_rendered(tmp_path):
    from edgesink.cli import main

    run_benchmark(tiny_config(tmp_path, tokens=0, policies=("sink",), evict_chunks=(1,), stock_lib=None,
                              json_path=None), progress=False)
    report = (tmp_path / "results.md").read_text()
    assert "Soak: 384 tokens" in report and "Eviction overhead" in report
    assert "Quality per policy" not in report and "Perplexity (`ppl`)" not in report
    assert not (tmp_path / "segments.csv").exists()
    details = json.loads((tmp_path / "details.json").read_text())
    assert [r["label"] for r in details["rows"]] == ["sink(4, chunk 1)"]

    result = CliRunner().invoke(main, ["bench", "--report-only", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    again = (tmp_path / "results.md").read_text()
    assert "re-rendered from the run's JSON" in again
    rerendered_line = next(line for line in again.splitlines() if "re-rendered" in line)
    assert again.replace(rerendered_line + "\n", "") == report  # only that line is new

    # A run saved before details.json held its rows gets them from results.csv, as the run wrote them:
    # a figure on a rounding boundary (21.96500001 prints 21.97; rounded first to 21.965, 21.96) too.
    header, summary = load_run(tmp_path)
    summary["rows"][0]["ms_per_token_median"] = summary["rows"][0]["ms_per_token_p95"] = 21.96500001
    write_all(tmp_path, header, summary)
    details = json.loads((tmp_path / "details.json").read_text())
    again = (tmp_path / "results.md").read_text()
    del details["rows"]
    (tmp_path / "details.json").write_text(json.dumps(details))
    assert CliRunner().invoke(main, ["bench", "--report-only", "--out", str(tmp_path)]).exit_code == 0
    assert (tmp_path / "results.md").read_text() == again

    result = CliRunner().invoke(main, ["bench", "--report-only", "--out", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "details.json is missing" in result.output
