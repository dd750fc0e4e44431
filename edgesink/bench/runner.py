"""Running a benchmark: tokenize once, run every job in a worker with a progress bar, report."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .. import _native
from ..loading import load
from ..fetch.resolve import resolve_model
from .config import BenchConfig, Job, plan
from .corpus import stream_tokens, uniform_sample
from .latency import WARMUP_STEPS
from .machine import describe_machine
from .plots import plot_all
from .quality import recompute_cost
from .report import write_all
from .summary import Measured, summarize
from .worker import run_in_worker, run_job


def job_cost(job: Job, config: BenchConfig, sample: np.ndarray) -> int:
    """Work of a job in token-equivalents (tokens decoded), for the progress bar."""
    n_ctx, policy = job.variant.n_ctx, job.variant.context_policy
    if job.kind == "quality":
        if policy.recomputes:
            return recompute_cost(sample[sample < job.n_tokens], n_ctx)
        return job.n_tokens if policy.evicts else min(job.n_tokens, n_ctx)
    if job.kind == "latency":
        if policy.recomputes:
            return config.gen_tokens_recompute * n_ctx
        return n_ctx + config.feed_tokens + config.gen_tokens if policy.evicts else n_ctx + config.gen_tokens
    if job.kind == "overhead":
        return n_ctx + 2 * (WARMUP_STEPS + config.overhead_steps)
    return job.n_tokens


def _job_spec(job: Job, config: BenchConfig, model_path: Path, tokens_file: Path, sample: np.ndarray,
              work: Path, index: int) -> dict:
    spec = {"kind": job.kind, "variant": job.variant.to_dict(), "model": str(model_path),
            "tokens_file": str(tokens_file), "n_tokens": job.n_tokens, "threads": config.threads}
    if job.kind == "quality":
        spec["positions"] = sample[sample < job.n_tokens].tolist()
        spec["nll_file"] = str(work / f"nll-{index}.npy")
    elif job.kind == "latency":
        gen = config.gen_tokens_recompute if job.variant.context_policy.recomputes else config.gen_tokens
        spec["options"] = {"gen_tokens": gen, "feed_tokens": config.feed_tokens}
    elif job.kind == "overhead":
        spec["options"] = {"steps": config.overhead_steps}
    elif job.kind == "soak":
        spec["options"] = {"segment": config.soak_segment, "sample_every": config.soak_sample_every,
                           "seed": config.seed}
    return spec


def _worker_env(stock_lib: str | None) -> dict:
    env = dict(os.environ)
    env.pop("LLAMA_CPP_LIB_PATH", None)  # each worker chooses its library afresh
    if stock_lib:
        env["EDGESINK_LIB_PATH"] = str(Path(stock_lib).resolve())
    return env


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    interval = 0.5 if sys.stderr.isatty() else 30  # a log file gets a line every 30 s, not a flood
    return tqdm(total=total, unit="tok", unit_scale=True, disable=not enabled, dynamic_ncols=True, mininterval=interval,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} token-steps [{elapsed}<{remaining}]")


def run_benchmark(config: BenchConfig, *, progress: bool = True) -> dict:
    """Run every job of ``config``, write the reports into ``config.out`` and return the summary."""

    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(config.model)
    machine = describe_machine(config.threads)
    # absolute: the workers that load it run in another folder
    stock_lib = str(Path(config.stock_lib).resolve()) if config.stock_lib and Path(config.stock_lib).is_dir() else None
    config = dataclasses.replace(config, stock_lib=stock_lib)
    jobs = plan(config)
    needed = max(config.tokens, config.soak, max(config.n_ctx) + config.feed_tokens + config.gen_tokens + 1)
    with load(model_path) as model:
        text_name, tokens = stream_tokens(model, config.text, needed)
        model_name = model_path.name
        model_desc = f"{model_path.name} ({model.architecture}, {model.n_layer} layers, {model.size_bytes / 1e6:.0f} MB)"
    sample = uniform_sample(config.tokens, config.sample, config.seed) if config.tokens else np.zeros(0, np.int64)
    measured: list[Measured] = []
    with tempfile.TemporaryDirectory(prefix="edgesink-bench-") as tmp:
        work = Path(tmp)
        tokens_file = work / "tokens.npy"
        np.save(tokens_file, tokens)
        bar = _progress_bar(sum(job_cost(j, config, sample) for j in jobs), progress)
        try:
            for i, job in enumerate(jobs):
                bar.set_description_str(job.label, refresh=True)
                spec = _job_spec(job, config, model_path, tokens_file, sample, work, i)
                if config.isolate or job.stock:
                    result = run_in_worker(spec, env=_worker_env(stock_lib if job.stock else None),
                                           log=work / "worker.log", progress=bar.update)
                else:
                    result = run_job(spec, bar.update)
                nll = np.load(spec["nll_file"]) if job.kind == "quality" else None
                measured.append(Measured(job, result, nll))
        finally:
            bar.close()
    summary = summarize(config, measured, sample)
    header = {
        "model": model_desc, "model_name": model_name, "machine": machine, "text": text_name,
        "command": config.command, "stock_lib": _shown(stock_lib), "patch_level": _native.patch_level(),
        "config": {k: v for k, v in dataclasses.asdict(config).items()
                   if k not in ("command", "out", "json_path", "stock_lib")},
        "sample_positions": sample.tolist(),
    }
    header["plots"] = draw_plots(out, summary, header) if config.plots else []
    header["run_seconds"] = time.perf_counter() - started
    write_all(out, header, summary, config.json_path)
    summary["header"] = header
    return summary


def draw_plots(out: Path, summary: dict, header: dict) -> list[str]:
    """The PNG plots of a run into ``out`` (none without matplotlib); returns their names."""

    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn("no plots: matplotlib is missing (pip install 'edgesink[bench]')", RuntimeWarning, stacklevel=2)
        return []
    return plot_all(out, summary, header)


def _shown(path: str | None) -> str | None:
    """A path as the results show it: relative to the working folder when inside it."""
    if path is None:
        return None
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
