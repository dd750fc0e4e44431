"""Small caches under ``~/.cache/edgesink``: file hashes remembered per file version.

Shared by the model loader (which hashes every file it loads) and the fetchers (which check
downloads against the registry), so neither depends on the other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    """The folder of edgesink's small caches (read from ``$HOME`` at each call, so tests can move it)."""
    return Path.home() / ".cache" / "edgesink"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cached_sha256(path: Path) -> str:
    """sha256 of a file, remembered in a small JSON cache keyed by the file's identity.

    The key is the path, device, inode, size, modification and change time: new bytes written in
    place change the change time, which (unlike the modification time) no user can set back.
    """
    stat = path.stat()
    where = f"{path.resolve()}|"
    key = f"{where}{stat.st_dev}|{stat.st_ino}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}"
    cache_file = cache_dir() / "sha256.json"
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if key not in known:
        digest = sha256_file(path)
        known = {k: v for k, v in known.items() if not k.startswith(where)}  # one version per path
        known[key] = digest
        write_json_cache(cache_file, known)
    return known[key]


def write_json_cache(cache_file: Path, data) -> None:
    """Replace a small JSON cache file atomically; an unwritable cache only costs recomputing later."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, cache_file)
    except OSError:
        pass
