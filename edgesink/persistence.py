"""Saving and restoring sessions: a checked header, llama.cpp's sequence state, atomic writes.

File layout (all integers little-endian)::

    8 bytes   magic b"EDGESINK"
    u32       format version
    u32       header length H
    H bytes   header, UTF-8 JSON (no pickle): versions, model sha256, n_ctx, cache types,
              policy, payload length and sha256, and edgesink's own bookkeeping
    32 bytes  sha256 of the header bytes
    payload   llama_state_seq_get_data() of the stream's sequence

Everything is checked (magic, version, header checksum, model, settings, payload length and
sha256) before a single payload byte reaches llama.cpp: crafted state files have overflowed
llama.cpp's restore path. A failed restore leaves the session as it was.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from . import _native
from ._native import C
from .errors import EdgesinkError
from .kvcache import STREAM_SEQ

MAGIC = b"EDGESINK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")


class SessionFileError(EdgesinkError):
    """A session file that cannot be restored here; the message names the cause."""


class SessionSaveError(EdgesinkError, OSError):
    """A session could not be saved; any previous file at that path is intact."""


def save_session(session, path: "str | os.PathLike") -> None:
    """Write ``session`` to ``path`` atomically: the old file stays intact until the new one is whole."""
    payload = _sequence_state(session)
    header = json.dumps(_header(session, payload), separators=(",", ":")).encode()
    blob = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + hashlib.sha256(header).digest()
    _atomic_write(Path(path), [blob, payload])


def load_session(session, path: "str | os.PathLike") -> None:
    """Restore ``path`` into ``session`` (same model); on any error the session is unchanged."""
    header, payload = read_session_file(path)
    _check_compatible(session, header)
    session._validate_saved_state(header["state"])
    backup = _sequence_state(session)
    try:
        _set_sequence_state(session, payload)
    except SessionFileError:
        _set_sequence_state(session, backup)
        raise
    session._apply_saved_state(header["state"])


def read_session_file(path: "str | os.PathLike") -> tuple[dict, bytes]:
    """The checked header and payload of a session file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise SessionFileError(f"{path} is a directory, not a session file") from None
    except FileNotFoundError:
        raise SessionFileError(f"no session file at {path}") from None
    if len(data) < _PREFIX.size or data[:8] != MAGIC:
        raise SessionFileError(f"{path} is not an edgesink session file (bad magic)")
    _, version, header_len = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SessionFileError(f"{path} has session format version {version}; this edgesink reads version {FORMAT_VERSION}")
    header_end = _PREFIX.size + header_len
    if header_end + 32 > len(data):
        raise SessionFileError(f"{path} is truncated (header)")
    header_bytes = data[_PREFIX.size:header_end]
    if hashlib.sha256(header_bytes).digest() != data[header_end:header_end + 32]:
        raise SessionFileError(f"{path} is corrupt (header checksum mismatch)")
    header = json.loads(header_bytes)
    payload = data[header_end + 32:]
    if len(payload) != header["payload_length"]:
        raise SessionFileError(f"{path} is truncated: payload of {len(payload)} bytes, expected {header['payload_length']}")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise SessionFileError(f"{path} is corrupt (payload checksum mismatch)")
    return header, payload


def _header(session, payload: bytes) -> dict:
    policy = session.policy
    return {
        "edgesink_format": FORMAT_VERSION,
        "llama_cpp_commit": _native.upstream_commit(),
        "llama_cpp_python": _native.llama_cpp.__version__,
        "model_sha256": session.model.sha256,
        "model_name": session.model.path.name,
        "n_ctx": session.n_ctx,
        "type_k": session.type_k,
        "type_v": session.type_v,
        "policy": {"name": policy.name, "sinks": policy.sinks, "evict_chunk": getattr(policy, "evict_chunk", None)},
        "payload_length": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "state": session._saved_state(),
    }


def _check_compatible(session, header: dict) -> None:
    if header.get("model_sha256") != session.model.sha256:
        raise SessionFileError(
            f"the session was saved with another model ({header.get('model_name')}); load it with that model")
    for key, mine in (("n_ctx", session.n_ctx), ("type_k", session.type_k), ("type_v", session.type_v)):
        if header.get(key) != mine:
            raise SessionFileError(f"the session was saved with {key}={header.get(key)}, this session has {mine}")
    saved_policy = header["policy"]
    if saved_policy["name"] != session.policy.name or saved_policy["sinks"] != session.policy.sinks:
        raise SessionFileError(
            f"the session was saved with policy {saved_policy['name']} (sinks {saved_policy['sinks']}), "
            f"this session uses {session.policy.name} (sinks {session.policy.sinks})")


def _sequence_state(session) -> bytes:
    ctx = session._cache.ctx
    size = C.llama_state_seq_get_size(ctx, STREAM_SEQ)
    buf = (ctypes.c_uint8 * size)()
    written = C.llama_state_seq_get_data(ctx, buf, size, STREAM_SEQ)
    return bytes(buf[:written])


def _set_sequence_state(session, payload: bytes) -> None:
    cache = session._cache
    C.llama_memory_seq_rm(cache.mem, STREAM_SEQ, -1, -1)
    if payload:
        buf = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
        if C.llama_state_seq_set_data(cache.ctx, buf, len(payload), STREAM_SEQ) == 0:
            raise SessionFileError("llama.cpp refused the saved cache state (other llama.cpp version or settings)")


def _atomic_write(path: Path, parts: list[bytes]) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        raise SessionSaveError(f"could not save the session to {path}: {e.strerror or e}; "
                               "any earlier file there is intact") from e
    finally:
        if tmp_name:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
