"""The GPU check: edgesink's patched K-shift on a GPU build, every layer offloaded (`make gpu-check`).

Run by `make gpu-check` after it has built the CUDA configuration twice: patched (build/gpu/lib) and a
stock libllama against the same ggml (build/gpu-stock/lib). Each step runs in its own process, with a
time limit, and writes what it found to OUT/gpu.json as it goes, so a crash or a hang in one step
still leaves the others' results:

1. info      `edgesink info --json` with the patched library: backends, devices, patch level;
   load      a small model loaded and streamed a few times with each library (the load that crashed on
             an H200), with a native backtrace of a crash when gdb or cuda-gdb is there;
2. tests     the shift tests (patched against stock logits bitwise, sinks forward against window back
             for K f16/q8_0/f32 with flash attention on and off, a shift against a fresh decode),
             streams of many times n_ctx with every policy, and save/restore - the suite's own
             tests, run against the GPU libraries on the real default model and random-weight models;
3. latency   a dense step against one-token eviction (sinks forward, window back) on a 1B-class F16
             random-weight model at each n_ctx, for the patched and the stock library, and for the
             patched one again with CUDA graphs off (GGML_CUDA_DISABLE_GRAPHS) - with llama.cpp's count
             of reused compute graphs, to see what a K-shift per token does to graph reuse;
4. report    OUT/results.md (tables) and OUT/eviction_cost.png (eviction cost against n_ctx).

    .venv/bin/python benchmarks/gpu/check.py --patched-lib build/gpu/lib --stock-lib build/gpu-stock/lib \\
        --out benchmarks/results/gpu [--n-ctx 4096,32768,131072] [--small] [--allow-cpu]

`--small --allow-cpu` with the CPU libraries rehearses the whole check on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable

# The tests that prove the patch and the engine on the GPU (all layers are offloaded by default).
GPU_TESTS = ["tests/test_patch.py", "tests/test_sink_equivalence.py", "tests/test_session.py",
             "tests/test_restore_exact.py", "tests/test_persistence.py"]

# Llama 3.2 1B's attention and MLP shape (16 layers, 32 heads, 8 KV heads, head size 64), F16 weights,
# with the default model's 49,152-token vocabulary.
BIG_SHAPE = dict(n_embd=2048, n_head=32, n_head_kv=8, n_layer=16, n_ff=8192, n_ctx_train=131072, dtype="f16")
SMALL_SHAPE = dict(n_embd=256, n_head=4, n_head_kv=2, n_layer=4, n_ff=512, n_ctx_train=131072, dtype="f16")


class Results:
    """OUT/gpu.json, rewritten after every step so that a later crash loses nothing recorded."""

    def __init__(self, out: Path):
        self.path = out / "gpu.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def record(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)
        print(f"== {key}: {json.dumps(value)[-400:]}", flush=True)


def run_step(args: list[str], env: dict, timeout: float, log: Path) -> dict:
    """Run one step in a child process; its rc, duration and output tail, whatever happens to it."""
    start = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(args, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text(errors="replace")[-4000:]
    return {"rc": rc, "seconds": round(time.time() - start, 1), "log": log.name, "tail": tail}


def lib_env(lib: Path, **extra) -> dict:
    """The environment of a child that loads the libllama in ``lib`` (CUDA graphs on unless ``extra`` says)."""
    env = {k: v for k, v in os.environ.items() if k != "GGML_CUDA_DISABLE_GRAPHS"}
    env.update(EDGESINK_LIB_PATH=str(lib.resolve()), PYTHONFAULTHANDLER="1", **extra)
    return env


def step_info(args, results: Results) -> None:
    r = subprocess.run([str(Path(PY).parent / "edgesink"), "info", "--json"], env=lib_env(args.patched_lib),
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    if r.returncode:
        results.record("info", {"rc": r.returncode, "stderr": r.stderr[-3000:]})
        return
    info = json.loads(r.stdout)
    results.record("info", info)
    gpus = [d for d in info["devices"] if not d["name"].startswith("CPU")]
    if not gpus and not args.allow_cpu:
        sys.exit("gpu-check: the patched library sees no GPU device (edgesink info); is this a GPU build?")


LOAD_SCRIPT = """
import sys, edgesink
m = edgesink.load(sys.argv[1])
with m.session(n_ctx=128) as s:
    s.feed("hello world " * 100)
    print("ok", s.stats.evictions, flush=True)
"""


def step_load(args, results: Results, model: Path) -> None:
    """Load a small model, all layers offloaded, several times with each library; a native backtrace of
    the first patched load that dies, when a debugger is at hand. Patched and stock are built by the same
    compiler against the same ggml here, so only the patches differ between them."""
    found = {}
    for name, lib in (("patched", args.patched_lib), ("stock", args.stock_lib)):
        found[name] = []
        for i in range(args.load_repeats):
            summary = run_step([PY, "-X", "faulthandler", "-c", LOAD_SCRIPT, str(model)], lib_env(lib), 300,
                               args.out / f"load-{name}-{i}.log")
            found[name].append(summary["rc"])
            if summary["rc"] != 0 and name == "patched" and "backtrace" not in found:
                found["backtrace"] = native_backtrace(lib, model)
        results.record("load", found)


def native_backtrace(lib: Path, model: Path) -> str:
    debugger = next((d for d in ("cuda-gdb", "gdb") if shutil.which(d)), None)
    if debugger is None:
        return "no gdb or cuda-gdb on this machine"
    r = subprocess.run([debugger, "-batch", "-ex", "run", "-ex", "bt", "--args", PY, "-c", LOAD_SCRIPT, str(model)],
                       env=lib_env(lib), capture_output=True, text=True, timeout=600)
    return (r.stdout + r.stderr)[-6000:]


def step_tests(args, results: Results) -> None:
    env = lib_env(args.patched_lib, EDGESINK_STOCK_LIB_PATH=str(args.stock_lib.resolve()))
    tests = [t for t in GPU_TESTS if (REPO / t).exists()]
    marks = ["-m", "not slow"] if args.small else []
    summary = run_step([PY, "-m", "pytest", "-p", "no:cacheprovider", "-q", *marks, *tests], env, args.tests_timeout,
                       args.out / "tests.log")
    results.record("tests", summary)


def step_latency(args, results: Results, model: Path) -> None:
    runs = {"patched": lib_env(args.patched_lib), "stock": lib_env(args.stock_lib),
            "patched, CUDA graphs off": lib_env(args.patched_lib, GGML_CUDA_DISABLE_GRAPHS="1")}
    for name, env in runs.items():
        log = args.out / f"latency-{name.split(',')[0]}{'-nographs' if ',' in name else ''}.log"
        json_out = log.with_suffix(".json")
        summary = run_step([PY, str(REPO / "benchmarks" / "headline.py"), "latency", "--model", str(model),
                            "--n-ctx", args.n_ctx, "--steps", str(args.steps), "--json", str(json_out)],
                           env, args.latency_timeout, log)
        if json_out.exists():
            summary["result"] = json.loads(json_out.read_text())
        results.record(f"latency {name}", summary)


def random_model(path: Path, **shape) -> Path:
    """A random-weight llama with the default model's vocabulary (tests/random_model.py), written once."""
    sys.path.insert(0, str(REPO / "tests"))
    from random_model import write_random_llama

    from edgesink.fetch.registry import default_model_path  # lazy: the check must start where importing edgesink crashes

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_random_llama(path, default_model_path(), **shape)
    return path


def make_tiny_model(args) -> Path:
    return random_model(args.models / "tiny-f32.gguf")


def make_big_model(args) -> Path:
    name = "small-f16.gguf" if args.small else "llama1b-shape-f16.gguf"
    return random_model(args.models / name, **(SMALL_SHAPE if args.small else BIG_SHAPE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patched-lib", type=Path, default=REPO / "build" / "gpu" / "lib")
    parser.add_argument("--stock-lib", type=Path, default=REPO / "build" / "gpu-stock" / "lib")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu")
    parser.add_argument("--models", type=Path, default=REPO / "build" / "gpu-models")
    parser.add_argument("--n-ctx", default=None, help="comma-separated (default 4096,32768,131072; --small: 256,1024)")
    parser.add_argument("--steps", type=int, default=None, help="interleaved steps per measurement (default 40)")
    parser.add_argument("--small", action="store_true", help="a small model and sizes: a rehearsal on the CPU")
    parser.add_argument("--allow-cpu", action="store_true", help="go on when the library sees no GPU")
    parser.add_argument("--only", default="info,load,tests,latency", help="steps to run (default: all)")
    parser.add_argument("--load-repeats", type=int, default=3)
    parser.add_argument("--tests-timeout", type=float, default=3600)
    parser.add_argument("--latency-timeout", type=float, default=1800)
    args = parser.parse_args()
    args.n_ctx = args.n_ctx or ("256,1024" if args.small else "4096,32768,131072")
    args.steps = args.steps or (12 if args.small else 40)
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out)
    results.record("command", "python benchmarks/gpu/check.py " + " ".join(sys.argv[1:]))
    steps = args.only.split(",")
    if "info" in steps:
        step_info(args, results)
    if "load" in steps:
        step_load(args, results, make_tiny_model(args))
    if "tests" in steps:
        step_tests(args, results)
    if "latency" in steps:
        start = time.time()
        model = make_big_model(args)
        results.record("latency model", {"path": model.name, "bytes": model.stat().st_size,
                                         "shape": SMALL_SHAPE if args.small else BIG_SHAPE,
                                         "seconds_to_write": round(time.time() - start, 1)})
        step_latency(args, results, model)
    from report import write_report

    write_report(results.data, args.out)


if __name__ == "__main__":
    main()
