"""One measurement in its own process: ``python -m edgesink.bench.worker < job.json``.

A process per job gives each its own peak RSS and lets the stock libllama be loaded
(``EDGESINK_LIB_PATH``) side by side with the patched one. The worker writes JSON lines to its
standard output: ``{"progress": n}`` as it goes, then ``{"result": {...}}``; anything the
native code prints goes to standard error.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from ..child import CWD, child_env, isolated_python
from ..loading import load
from .config import Variant
from .latency import measure_eviction_overhead, measure_generation
from .memory import kv_cache_bytes, peak_rss_mb
from .quality import measure_quality
from .soak import run_soak


def run_job(job: dict, progress: Callable[[int], None] = lambda n: None) -> dict:
    """Run one job (a dict made by :mod:`edgesink.bench.runner`) in this process."""

    variant = Variant(**job["variant"])
    tokens = np.load(job["tokens_file"])[: job.get("n_tokens") or None]
    threads = job.get("threads")
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    with load(job["model"]) as model:
        kind = job["kind"]
        if kind == "quality":
            result = measure_quality(model, variant, tokens, np.asarray(job["positions"], dtype=np.int64),
                                     threads=threads, progress=progress)
            np.save(job["nll_file"], result.pop("nll"))
        elif kind == "latency":
            result = measure_generation(model, variant, tokens, threads=threads, progress=progress, **job["options"])
        elif kind == "overhead":
            result = measure_eviction_overhead(model, variant, tokens, threads=threads, progress=progress, **job["options"])
        elif kind == "soak":
            result = run_soak(model, variant, tokens, threads=threads, progress=progress, **job["options"])
        else:
            raise ValueError(f"unknown job kind {kind!r}")
        result["kv_cache_bytes"] = kv_cache_bytes(model, variant.n_ctx, variant.cache_type_k)
    result.update(peak_rss_mb=peak_rss_mb(), wall_seconds=time.perf_counter() - start,
                  cpu_seconds=_cpu_seconds() - cpu_start)
    return result


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _progress_writer(channel) -> Callable[[int], None]:
    def write(n: int) -> None:
        if n:
            channel.write(json.dumps({"progress": int(n)}) + "\n")
            channel.flush()

    return write


def main() -> None:
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever native code prints must not mix with the protocol
    warnings.simplefilter("ignore", RuntimeWarning)  # the stock-library warning is expected here
    result = run_job(json.load(sys.stdin), _progress_writer(channel))
    channel.write(json.dumps({"result": result}) + "\n")
    channel.close()


class WorkerError(RuntimeError):
    """A worker process failed."""


# Isolated (edgesink.child): nothing in the folder the benchmark is started from is imported.
_WORKER_PROGRAM = "import sys; sys.path[:0] = sys.argv[1:]; from edgesink.bench.worker import main; main()"


def run_in_worker(job: dict, *, env: dict | None = None, log: Path | None = None,
                  progress: Callable[[int], None] = lambda n: None) -> dict:
    """Run ``job`` in a fresh process; ``progress`` gets the worker's progress increments."""
    log_file = open(log, "a") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(isolated_python(_WORKER_PROGRAM), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=log_file, text=True, env=child_env(env), cwd=CWD)
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        result = None
        for line in proc.stdout:
            message = json.loads(line)
            if "progress" in message:
                progress(message["progress"])
            else:
                result = message["result"]
        code = proc.wait()
    finally:
        if log:
            log_file.close()
    if code != 0 or result is None:
        tail = log.read_text()[-2000:] if log and log.exists() else ""
        raise WorkerError(f"benchmark worker for {job['kind']} {job['variant']} failed (exit {code})\n{tail}")
    return result


if __name__ == "__main__":
    main()
