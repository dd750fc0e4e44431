"""Set-up facts: the pinned upstream and its patches, and the default model's failure modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import edgesink
from edgesink.cli import main
from edgesink.errors import ModelLoadError, ModelNotFoundError
from edgesink.registry import verify_default_model

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


def test_missing_default_model_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESINK_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="edgesink pull smollm2-135m"):
        edgesink.load(None)
    result = CliRunner().invoke(main, ["generate", "-p", "Hello", "--max-tokens", "2"])
    assert result.exit_code == 1 and "edgesink pull smollm2-135m" in result.output


def test_corrupt_default_model_is_detected(tmp_path, monkeypatch, model_path):
    corrupt = tmp_path / model_path.name
    with open(model_path, "rb") as src, open(corrupt, "wb") as dst:
        dst.write(src.read(model_path.stat().st_size // 2))  # truncated half-way
    monkeypatch.setenv("EDGESINK_MODELS_DIR", str(tmp_path))
    with pytest.raises(ModelLoadError, match="corrupt.*edgesink pull"):
        verify_default_model()
    with pytest.raises(ModelLoadError):
        edgesink.load(corrupt)


def test_the_default_model_is_the_pinned_file(model_path):
    assert verify_default_model() == model_path


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
