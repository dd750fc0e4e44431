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
from .kvcache import STREAM_SEQ, deferred_interrupt

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
    if C.llama_memory_can_shift(session._cache.mem):
        # A restore packs the cells in order with no free cells between them, and the CPU's flash
        # attention (F16 accumulation) depends on that order: give the saver the same layout, so
        # both continue identically (measured: max |logit difference| 0.58 after `halve` otherwise).
        with deferred_interrupt():
            try:
                _set_sequence_state(session, payload)
            except SessionFileError as e:  # llama.cpp refusing its own state: nothing was written
                raise SessionSaveError(f"could not save the session: {e}") from e
    header = json.dumps(_header(session, payload), separators=(",", ":")).encode()
    blob = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + hashlib.sha256(header).digest()
    _atomic_write(Path(path), [blob, payload])


def load_session(session, path: "str | os.PathLike") -> None:
    """Restore ``path`` into ``session`` (same model); on any error the session is unchanged."""
    header, payload = read_session_file(path)
    _check_compatible(session, header)
    session._validate_saved_state(header["state"])
    if C.llama_memory_can_shift(session._cache.mem):  # a plain KV cache: its cell list is checked
        _check_payload_layout(Path(path), header, payload)
    backup, backup_state = _sequence_state(session), session._saved_state()
    with deferred_interrupt():  # the cache and the bookkeeping change together, or not at all
        try:
            _set_sequence_state(session, payload)
            session._apply_saved_state(header["state"])
        except BaseException:
            _set_sequence_state(session, backup)
            session._apply_saved_state(backup_state)
            raise


def read_session_file(path: "str | os.PathLike") -> tuple[dict, bytes]:
    """The checked header and payload of a session file; SessionFileError naming the cause otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise SessionFileError(f"{path} is a directory, not a session file") from None
    except FileNotFoundError:
        raise SessionFileError(f"no session file at {path}") from None
    except OSError as e:
        raise SessionFileError(f"cannot read {path}: {e.strerror or e}") from e
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        raise SessionFileError(f"{path} is {'empty' if not data else 'truncated (in the magic)'}")
    if data[:8] != MAGIC:
        raise SessionFileError(f"{path} is not an edgesink session file (bad magic)")
    if len(data) < _PREFIX.size:
        raise SessionFileError(f"{path} is truncated (in the fixed header)")
    _, version, header_len = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SessionFileError(
            f"{path} has session format version {version}; this edgesink reads version {FORMAT_VERSION}")
    header_end = _PREFIX.size + header_len
    if header_end + 32 > len(data):
        raise SessionFileError(f"{path} is truncated (header)")
    header_bytes = data[_PREFIX.size:header_end]
    if hashlib.sha256(header_bytes).digest() != data[header_end:header_end + 32]:
        raise SessionFileError(f"{path} is corrupt (header checksum mismatch)")
    header = _parse_header(path, header_bytes)
    payload = memoryview(data)[header_end + 32:]
    if len(payload) != header["payload_length"]:
        what = "truncated" if len(payload) < header["payload_length"] else "corrupt (trailing bytes)"
        raise SessionFileError(
            f"{path} is {what}: payload of {len(payload)} bytes, expected {header['payload_length']}")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise SessionFileError(f"{path} is corrupt (payload checksum mismatch)")
    return header, payload


_HEADER_FIELDS = {"edgesink_format": int, "model_sha256": str, "n_ctx": int, "type_k": str, "type_v": str,
                  "policy": dict, "payload_length": int, "payload_sha256": str, "state": dict}


def _parse_header(path: Path, header_bytes: bytes) -> dict:
    """The header's JSON, with the fields restore relies on present and of the right type."""
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, ValueError):
        raise SessionFileError(f"{path} is corrupt (the header is not JSON)") from None
    if not isinstance(header, dict):
        raise SessionFileError(f"{path} is corrupt (the header is not a JSON object)")
    for key, kind in _HEADER_FIELDS.items():
        if not isinstance(header.get(key), kind):
            raise SessionFileError(f"{path} is corrupt (header field {key!r} is missing or not a {kind.__name__})")
    policy = header["policy"]
    if not isinstance(policy.get("name"), str) or not isinstance(policy.get("sinks"), int):
        raise SessionFileError(f"{path} is corrupt (header field 'policy' is incomplete)")
    return header


_SEQ_STATE_MAGIC = 0xAF143CD8  # llama.cpp's io_magic at the start of a sequence state
_SEQ_STATE_HEAD = struct.Struct("<IiII")  # magic, seq_id, n_stream, cell_count
_SEQ_STATE_CELL = struct.Struct("<iIi")  # pos, n_seq_id, seq_id


def _check_payload_layout(path: Path, header: dict, payload) -> None:
    """The cell list at the start of llama.cpp's sequence state must match edgesink's bookkeeping.

    A checksum only catches accidents; this catches a payload that does not describe this stream
    (llama.cpp asserts on some inconsistent cell lists) before llama.cpp parses it.
    """
    if header["policy"].get("name") == "recompute":
        return  # the recompute policy's cache is rebuilt from the token list on restore
    try:
        state = header["state"]
        n_kept, w0 = len(state["kept"]), int(state["w0"])
        expected = set(range(w0 - n_kept, w0 + len(state["window"])))
        magic, seq_id, n_stream, n_cells = _SEQ_STATE_HEAD.unpack_from(payload, 0)
        cells = [_SEQ_STATE_CELL.unpack_from(payload, _SEQ_STATE_HEAD.size + i * _SEQ_STATE_CELL.size)
                 for i in range(min(n_cells, len(expected) + 1))]
    except (KeyError, TypeError, ValueError, struct.error):
        raise SessionFileError(f"{path} is corrupt (the cache state does not start with a cell list)") from None
    if magic != _SEQ_STATE_MAGIC or seq_id != STREAM_SEQ or n_stream != 1:
        raise SessionFileError(f"{path} holds a cache state this llama.cpp does not write "
                               f"(magic {magic:#x}, sequence {seq_id}, {n_stream} streams)")
    if n_cells != len(expected) or {pos for pos, _, _ in cells} != expected or any(n != 1 for _, n, _ in cells):
        raise SessionFileError(f"{path} is inconsistent: its cache state holds {n_cells} cells that do not "
                               f"match the {len(expected)} tokens of its bookkeeping")


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
    ours = _native.upstream_commit()
    if header.get("llama_cpp_commit") != ours:
        raise SessionFileError(f"the session was saved by llama.cpp {header.get('llama_cpp_commit')}, this is "
                               f"{ours}: its cache state format may differ; start a new session")
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


def _set_sequence_state(session, payload: "bytes | memoryview") -> None:
    cache = session._cache
    C.llama_memory_seq_rm(cache.mem, STREAM_SEQ, -1, -1)
    if payload:
        buf = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
        n_read = C.llama_state_seq_set_data(cache.ctx, buf, len(payload), STREAM_SEQ)
        if n_read == 0:
            raise SessionFileError("llama.cpp refused the saved cache state (other llama.cpp version or settings)")
        if n_read != len(payload):
            raise SessionFileError(f"llama.cpp refused the saved cache state: it holds {len(payload)} bytes, "
                                   f"llama.cpp read {n_read}")


def _atomic_write(path: Path, parts: list[bytes]) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    tmp_name = None
    try:
        _remove_stale_temporaries(folder, path.name)
        fd, tmp_name = tempfile.mkstemp(prefix=f"{_temp_prefix(path.name)}{os.getpid()}.", suffix=".tmp", dir=folder)
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


def _temp_prefix(name: str) -> str:
    return f".{name}."


def _remove_stale_temporaries(folder: Path, name: str) -> None:
    """Delete temporary files left by saves whose process died (power cut, SIGKILL)."""
    prefix = _temp_prefix(name)
    for entry in os.scandir(folder):
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
