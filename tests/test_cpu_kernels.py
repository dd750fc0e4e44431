"""ggml's extra CPU kernels (AMX on Intel Xeons that have it, weight repacking elsewhere) run and agree.

On a CPU with AMX, a native build multiplies batches of 16 or more rows of a quantized model with ggml's
AMX kernels. With GCC 12 those raised SIGILL on the first such batch (native/patches/0004), killing the
process on its first prompt. Each load runs in a child process, so a crash fails this test instead of
ending the test run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = """
import json, sys
import edgesink
from edgesink._native import C

if sys.argv[2] == "plain":  # no extra buffer types: ggml's ordinary CPU kernels only
    default_params = C.llama_model_default_params
    def plain_params():
        params = default_params()
        params.use_extra_bufts = False
        return params
    C.llama_model_default_params = plain_params
model = edgesink.load(sys.argv[1])
tokens = model.tokenize(sys.argv[3])[:64]
with model.session(n_ctx=128, policy="dense", batch_size=64) as s:
    nll = s.score_tokens(tokens)
print(json.dumps([float(x) for x in nll[1:]]))
"""

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
        "in want of a wife. However little known the feelings or views of such a man may be on his first "
        "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families.")


def _nll(model_path: Path, kernels: str) -> np.ndarray:
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", SCRIPT, str(model_path), kernels, TEXT],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{kernels} kernels: rc {result.returncode}\n{result.stderr[-2000:]}"
    return np.array(json.loads(result.stdout.splitlines()[-1]))


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_a_full_batch_runs_with_the_extra_cpu_kernels_and_agrees_with_the_plain_ones(model_path, measured):
    extra, plain = _nll(model_path, "extra"), _nll(model_path, "plain")
    assert len(extra) == len(plain) >= 40
    # Different kernels quantize the activations and sum in other orders: per token they differ (measured
    # on AMX: mean |dNLL| 0.07, max 0.39), but they track each other closely, as a wrong kernel would not.
    mean_delta = float(np.abs(extra - plain).mean())
    correlation = float(np.corrcoef(extra, plain)[0, 1])
    measured("extra vs plain kernels", f"mean |dNLL| {mean_delta:.4f}, max {np.abs(extra - plain).max():.4f}, "
             f"correlation {correlation:.5f}, mean NLL {plain.mean():.3f}; AMX on this CPU: {'amx_int8' in cpu_flags()}")
    assert mean_delta < 0.05 * float(plain.mean())
    assert correlation > 0.99
