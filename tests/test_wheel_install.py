"""`pip install .` as a new user types it: pip's isolated build, in a fresh venv, from a copy of the tree.

The isolated build environment holds only what pyproject.toml's [build-system] lists, so this is the
test that the native build (which fetches the pinned llama.cpp source itself) needs nothing from the
developer's venv. The wheel is then installed into the fresh venv and used: `edgesink info` and a
short generate on the default model, run from a neutral folder so the checkout is not on sys.path.

Where ccache is installed, the build compiles through it (CMakeLists.txt hashes paths relative to the
project folder), so the objects `make setup` compiled are reused: the build is still pip's, in its own
environment, from the copy; only identical compiler runs are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PIN = json.loads((REPO / "native" / "upstream.json").read_text())


def _ccache_dir() -> str | None:
    """The user's ccache folder, read now: the tests' isolated HOME would point ccache at an empty one."""
    if shutil.which("ccache") is None:
        return None
    found = subprocess.run(["ccache", "--get-config", "cache_dir"], capture_output=True, text=True)
    return found.stdout.strip() or None


CCACHE_DIR = _ccache_dir()


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args[:3]} failed (rc {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _copy_checkout(dest: Path) -> None:
    """The files a clone would hold (tracked and new, not ignored): what `pip install git+URL` sees."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)


@pytest.mark.slow(seconds=230)  # a whole native build, on one CPU under make test
def test_isolated_pip_build_installs_a_working_package(tmp_path, model_path):
    src, venv, dist, elsewhere = (tmp_path / d for d in ("src", "venv", "dist", "elsewhere"))
    for d in (src, dist, elsewhere):
        d.mkdir()
    _copy_checkout(src)
    _run([sys.executable, "-m", "venv", venv])
    pip = [venv / "bin" / "python", "-m", "pip", "--disable-pip-version-check", "-q"]
    env = dict(os.environ, EDGESINK_CACHE_DIR=str(tmp_path / "sdist-cache"))  # the build fetches the sdist itself
    env.pop("EDGESINK_LIB_PATH", None)
    if CCACHE_DIR:
        env["CCACHE_DIR"] = CCACHE_DIR

    # The bindings without their own llama.cpp (what `make setup` does), so that only edgesink compiles here.
    sdist = REPO / "native" / ".cache" / PIN["sdist"]
    bindings = sdist if sdist.exists() else f"{PIN['package']}=={PIN['version']}"
    _run([*pip, "install", bindings], env=dict(env, CMAKE_ARGS="-DLLAMA_BUILD=OFF"), timeout=1200)

    # The thing under test: pip's default, isolated build of the project.
    _run([*pip, "wheel", "--no-deps", "-w", dist, src], env=env, timeout=2400)
    wheels = list(dist.glob("edgesink-*.whl"))
    assert len(wheels) == 1, wheels
    _run([*pip, "install", wheels[0]], env=env, timeout=1200)

    edgesink = venv / "bin" / "edgesink"
    info = json.loads(_run([edgesink, "info", "--json"], cwd=elsewhere, env=env, timeout=300).stdout)
    assert info["patch_level"] == len(list((REPO / "native" / "patches").glob("[0-9]*.patch")))
    assert Path(info["library"]).is_relative_to(venv), info["library"]

    out = _run([edgesink, "generate", model_path, "-p", "The capital of France is", "--max-tokens", "8",
                "--temp", "0"], cwd=elsewhere, env=env, timeout=300).stdout
    assert len(out.strip()) > 0
