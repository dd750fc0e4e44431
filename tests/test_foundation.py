"""Set-up facts: the pinned upstream and its patches, and the default model's failure modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgesink
from edgesink.cli import main
from edgesink.errors import ModelLoadError, ModelNotFoundError
from edgesink.fetch.registry import load_registry
from edgesink.filecache import sha256_file

REPO = Path(__file__).resolve().parents[1]


def test_patches_apply_on_the_pinned_tree(tmp_path):
    """native/upstream.py turns the verified sdist into a git tree with one commit per patch."""
    dest = tmp_path / "llama.cpp"
    subprocess.run([sys.executable, str(REPO / "native" / "upstream.py"), "prepare", "--dest", str(dest)], check=True)
    log = subprocess.run(["git", "-C", str(dest), "log", "--format=%s"], capture_output=True, text=True, check=True)
    subjects = log.stdout.splitlines()
    patches = sorted((REPO / "native" / "patches").glob("*.patch"))
    assert len(subjects) == len(patches) + 1
    assert "rotate only the cells that moved" in subjects[-2]
    # A second run sees the stamp and does nothing.
    before = (dest / "src" / "llama-kv-cache.cpp").stat().st_mtime_ns
    subprocess.run([sys.executable, str(REPO / "native" / "upstream.py"), "prepare", "--dest", str(dest)], check=True)
    assert (dest / "src" / "llama-kv-cache.cpp").stat().st_mtime_ns == before


def test_the_pin_is_in_one_place():
    pin = json.loads((REPO / "native" / "upstream.json").read_text())
    assert pin["version"] == "0.3.36" and len(pin["sha256"]) == 64
    for path in [REPO / "CMakeLists.txt", REPO / "Makefile", REPO / "pyproject.toml"]:
        assert pin["sha256"] not in path.read_text()
        assert pin["llama_cpp_commit"] not in path.read_text()


def test_the_build_refuses_bindings_other_than_the_pin(tmp_path):
    """pyproject.toml must repeat the pinned bindings exactly; upstream.py refuses anything else."""
    copy = tmp_path / "native"
    copy.mkdir()
    for name in ("upstream.py", "upstream.json"):
        (copy / name).write_bytes((REPO / "native" / name).read_bytes())
    pyproject = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(pyproject)
    env = {**os.environ, "EDGESINK_CACHE_DIR": str(REPO / "native" / ".cache")}  # set-up fetched the sdist there
    ok = subprocess.run([sys.executable, str(copy / "upstream.py"), "sdist"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("llama_cpp_python-0.3.36.tar.gz")
    (tmp_path / "pyproject.toml").write_text(pyproject.replace("llama-cpp-python==0.3.36", "llama-cpp-python==0.3.20"))
    refused = subprocess.run([sys.executable, str(copy / "upstream.py"), "sdist"], capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "native/upstream.json pins llama-cpp-python==0.3.36" in refused.stderr


def test_missing_default_model_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESINK_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="edgesink pull smollm2-135m"):
        edgesink.load(None)
    result = CliRunner().invoke(main, ["generate", "-p", "Hello", "--max-tokens", "2"])
    assert result.exit_code == 1 and "edgesink pull smollm2-135m" in result.output


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_corrupt_default_model_says_how_to_fetch_it(tmp_path, monkeypatch, model_path, damage):
    corrupt = tmp_path / model_path.name
    data = bytearray(model_path.read_bytes())
    if damage == "truncated":
        del data[len(data) // 2:]
    else:  # one byte inside the weights: the GGUF still parses and loads, only the sha256 tells
        data[len(data) - 4096] ^= 0xFF
    corrupt.write_bytes(data)
    monkeypatch.setenv("EDGESINK_MODELS_DIR", str(tmp_path))
    for spec in (None, "smollm2-135m"):
        with pytest.raises(ModelLoadError, match="corrupt.*edgesink pull smollm2-135m"):
            edgesink.load(spec)
    result = CliRunner().invoke(main, ["generate", "-p", "Hello", "--max-tokens", "2"])
    assert result.exit_code == 1 and "corrupt" in result.output and "edgesink pull smollm2-135m" in result.output


def test_the_default_model_is_the_pinned_file(model_path):
    assert sha256_file(model_path) == load_registry()["smollm2-135m"].sha256


def test_a_session_really_generates(model):
    with model.session(n_ctx=128) as s:
        s.feed("The capital of France is")
        assert s.generate_text(8, top_k=1, seed=1).strip()


@pytest.mark.skipif(sys.platform != "linux", reason="ELF shared-library names")
def test_each_native_library_is_installed_once():
    """A wheel cannot hold symlinks: versioned aliases (libllama.so.0, .so.0.5.0) would be full copies."""
    from edgesink._native import installed_path

    folder = installed_path("lib")
    assert folder is not None, "the package's lib folder is missing: pip install -e . (or make setup)"
    names = sorted(p.name for p in folder.iterdir() if ".so" in p.name)
    assert "libllama.so" in names and "libggml-base.so" in names
    assert all(name.endswith(".so") for name in names), names
