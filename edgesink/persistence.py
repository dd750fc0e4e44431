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
llama.cpp's restore path. Only a regular file is read, the fixed header first, and a payload
larger than the session could hold is refused before it is read. A failed restore leaves the
session as it was.

A save leaves the saver in exactly the state a restore of its file gives, so the two continue
identically (see :func:`_match_a_restore`). The state is copied once on save and read once on
restore: peak extra memory is about the size of the state.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import struct
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from . import _native, seqstate
from ._native import C
from .errors import SessionFileError, SessionSaveError
from .kvcache import deferred_interrupt
from .policies import ContextPolicy, policy_from_dict

__all__ = ["SessionFileError", "SessionSaveError", "load_session", "read_session_file", "read_session_header",
           "save_session"]

MAGIC = b"EDGESINK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")
_DIGEST_SIZE = 32
_MAX_HEADER = 256 << 20  # the bookkeeping (a long chat's messages) is far smaller; a larger one is crafted


# -- saving ---------------------------------------------------------------------------------------

def save_session(session, path: "str | os.PathLike") -> None:
    """Write ``session`` to ``path`` atomically: the old file stays intact until the new one is whole.

    Afterwards ``session`` is in the state a restore of the file gives, so both continue identically.
    """
    payload = _sequence_state(session)
    _match_a_restore(session, payload)
    header = json.dumps(_header(session, payload), separators=(",", ":")).encode()
    if len(header) > _MAX_HEADER:
        raise SessionSaveError(f"could not save the session to {path}: its bookkeeping takes {len(header) >> 20} MiB, "
                               f"more than a session file holds ({_MAX_HEADER >> 20} MiB); start a new conversation")
    blob = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + hashlib.sha256(header).digest()
    atomic_write(Path(path), [blob, payload])


def _match_a_restore(session, payload: bytearray) -> None:
    """Put the saver in the state a restore of ``payload`` produces, so that both continue identically.

    A restore places the cells from cell 0 in their saved order with no free cells between them,
    and it cannot bring back the newest token's logits: it decodes that token again, alone. Both
    change results bitwise: the order of the F16 sums over cells, and kernels that split the work
    of one token between threads otherwise than a batch's (measured: next logits up to 0.68 apart
    at n_ctx 384 with two threads, 0.58 after `halve`, had the saver kept its layout and logits).
    """
    if not C.llama_memory_can_shift(session.cache.mem):
        return  # recurrent memory: no cell layout to match, and the session is left as it was
    with deferred_interrupt():
        try:
            _set_sequence_state(session, payload)
        except SessionFileError as e:  # llama.cpp refusing its own state: nothing was written
            raise SessionSaveError(f"could not save the session: {e}") from e
        session.forget_logits()


# -- restoring ------------------------------------------------------------------------------------

def load_session(session, path: "str | os.PathLike") -> None:
    """Restore ``path`` into ``session`` (same model); on any error the session is unchanged.

    The payload is read once, into the buffer llama.cpp restores from. A session that holds a
    stream keeps a copy of its own state meanwhile, to put it back if llama.cpp refuses the file.
    """
    path = Path(path)
    with _open_regular_file(path) as (f, size):
        header = _read_header(f, path)
        _check_compatible(session, header, path)
        session.check_snapshot(header["state"])
        _check_payload_fits(session, header, path)
        _check_payload_length(header, size - f.tell(), path)
        payload = _read_payload(f, header, path)
    # A plain KV cache: its cell list is checked. (The recompute policy's cache is rebuilt from the
    # token list on restore; the compatibility check made the saved policy the session's own.)
    if C.llama_memory_can_shift(session.cache.mem) and not session.policy.recomputes:
        _check_payload_layout(path, header, payload)
    backup, backup_state = _sequence_state(session), session.snapshot()
    with deferred_interrupt():  # the cache and the bookkeeping change together, or not at all
        try:
            _set_sequence_state(session, payload)
            session.apply(header["state"])
        except BaseException:
            _set_sequence_state(session, backup)
            session.apply(backup_state)
            raise


def saved_settings(path: "str | os.PathLike") -> dict:
    """The settings of the session saved at ``path``, as :class:`~edgesink.Session` takes them:
    ``n_ctx``, the policy and its own settings, the cache types and the saved options."""
    header = read_session_header(path)
    policy = _saved_policy(header, Path(path)).to_dict()
    return {"n_ctx": header["n_ctx"], "policy": policy.pop("name"), **policy,
            "type_k": header["type_k"], "type_v": header["type_v"], **header.get("options", {})}


def _saved_policy(header: dict, path: Path) -> ContextPolicy:
    try:
        return policy_from_dict(header["policy"])
    except ValueError as e:
        raise SessionFileError(f"{path} names a policy this edgesink does not know ({e})") from None


def read_session_header(path: "str | os.PathLike", *, check_payload: bool = False) -> dict:
    """The checked header of a session file, reading no more than the header.

    With ``check_payload`` the payload's length and checksum are checked too, reading it in small
    pieces. SessionFileError naming the cause otherwise.
    """
    path = Path(path)
    with _open_regular_file(path) as (f, size):
        header = _read_header(f, path)
        _check_payload_length(header, size - f.tell(), path)
        if check_payload:
            digest = hashlib.sha256()
            for piece in iter(lambda: f.read(1 << 20), b""):
                digest.update(piece)
            _check_payload_digest(digest, header, path)
    return header


def read_session_file(path: "str | os.PathLike") -> tuple[dict, bytearray]:
    """The checked header and the whole payload of a session file; SessionFileError naming the cause otherwise."""
    path = Path(path)
    with _open_regular_file(path) as (f, size):
        header = _read_header(f, path)
        _check_payload_length(header, size - f.tell(), path)
        return header, _read_payload(f, header, path)


@contextmanager
def _open_regular_file(path: Path):
    """``path`` open for reading, and its size; SessionFileError unless it is a regular file.

    A FIFO blocks a read for ever and a device (a link to /dev/zero) never ends: both are refused
    before a byte is read. The check comes before opening (opening some devices acts on them) and
    again on what was opened; O_NONBLOCK keeps the open itself from waiting for a FIFO's writer.
    """
    try:
        _check_regular(path, os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise SessionFileError(f"no session file at {path}") from None
    except OSError as e:
        raise SessionFileError(f"cannot read {path}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb", buffering=0) as f:
        st = os.fstat(fd)
        _check_regular(path, st)
        yield f, st.st_size


def _check_regular(path: Path, st: os.stat_result) -> None:
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise SessionFileError(f"{path} is a directory, not a session file")
    kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
    target = os.path.realpath(path)
    via = f" (it leads to {target})" if target != os.path.abspath(path) else ""
    raise SessionFileError(f"{path} is {kind}{via}, not a session file: give the path of a file saved by edgesink")


def _read_header(f, path: Path) -> dict:
    """The fixed header and the JSON header, checked; the file is left at the start of the payload."""
    prefix = _read_up_to(f, _PREFIX.size)
    if len(prefix) < len(MAGIC) and MAGIC.startswith(prefix):
        raise SessionFileError(f"{path} is {'empty' if not prefix else 'truncated (in the magic)'}")
    if prefix[:len(MAGIC)] != MAGIC:
        raise SessionFileError(f"{path} is not an edgesink session file (bad magic)")
    if len(prefix) < _PREFIX.size:
        raise SessionFileError(f"{path} is truncated (in the fixed header)")
    _, version, header_len = _PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise SessionFileError(
            f"{path} has session format version {version}; this edgesink reads version {FORMAT_VERSION}")
    size = os.fstat(f.fileno()).st_size
    if _PREFIX.size + header_len + _DIGEST_SIZE > size:
        raise SessionFileError(f"{path} is truncated (header)")
    if header_len > _MAX_HEADER:
        raise SessionFileError(f"{path} is corrupt (a header of {header_len} bytes; edgesink writes at most "
                               f"{_MAX_HEADER})")
    raw = _read_up_to(f, header_len + _DIGEST_SIZE)
    if len(raw) < header_len + _DIGEST_SIZE:
        raise SessionFileError(f"{path} is truncated (header)")
    header_bytes = raw[:header_len]
    if hashlib.sha256(header_bytes).digest() != raw[header_len:]:
        raise SessionFileError(f"{path} is corrupt (header checksum mismatch)")
    return _parse_header(path, header_bytes)


def _check_payload_length(header: dict, n_file: int, path: Path) -> None:
    """The payload the header announces must be exactly the ``n_file`` bytes that follow the header."""
    expected = header["payload_length"]
    if n_file != expected:
        what = "truncated" if n_file < expected else "corrupt (trailing bytes)"
        raise SessionFileError(f"{path} is {what}: payload of {n_file} bytes, expected {expected}")


def _check_payload_fits(session, header: dict, path: Path) -> None:
    """Refuse, before reading it, a payload larger than this session's cache could ever have written."""
    limit = _payload_limit(session)
    if header["payload_length"] > limit:
        raise SessionFileError(
            f"{path} is corrupt: it announces a cache state of {header['payload_length']} bytes, more than a "
            f"session of n_ctx {session.n_ctx} ({session.type_k}/{session.type_v} cache) can hold ({limit} bytes)")


_BYTES_PER_VALUE = {"f32": 4}  # every other cache type takes at most 2 bytes a value (f16, bf16, quantized)


def _payload_limit(session) -> int:
    """The most bytes the sequence state of a full cache of this session's settings can take, with room to spare.

    K and V rows of n_ctx cells in every layer plus the cells' metadata, doubled for the layers
    that have more KV heads than the first (the only count llama.cpp reports), plus the headers.
    """
    bytes_k, bytes_v = (_BYTES_PER_VALUE.get(t, 2) for t in (session.type_k, session.type_v))
    per_cell = seqstate.kv_bytes_per_cell(session.model, bytes_k, bytes_v) + 64
    return int(2 * session.n_ctx * per_cell) + (1 << 20)


def _read_payload(f, header: dict, path: Path) -> bytearray:
    """The payload, read straight into the one buffer llama.cpp restores from, and its checksum checked."""
    expected = header["payload_length"]
    payload = bytearray(expected)
    with memoryview(payload) as view:
        got = 0
        while got < expected:
            n = f.readinto(view[got:])
            if not n:  # the file shrank while it was read
                raise SessionFileError(f"{path} is truncated: payload of {got} bytes, expected {expected}")
            got += n
    _check_payload_digest(hashlib.sha256(payload), header, path)
    return payload


def _check_payload_digest(digest, header: dict, path: Path) -> None:
    if digest.hexdigest() != header["payload_sha256"]:
        raise SessionFileError(f"{path} is corrupt (payload checksum mismatch)")


def _read_up_to(f, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at the end of the file."""
    chunks, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


_HEADER_FIELDS = {"edgesink_format": int, "model_sha256": str, "n_ctx": int, "type_k": str, "type_v": str,
                  "policy": dict, "payload_length": int, "payload_sha256": str, "state": dict}


def _parse_header(path: Path, header_bytes: bytes) -> dict:
    """The header's JSON, with the fields restore relies on present and of the right type."""
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, ValueError):
        raise SessionFileError(f"{path} is corrupt (the header is not JSON)") from None
    except RecursionError:  # JSON nested thousands deep: no header of ours
        raise SessionFileError(f"{path} is corrupt (the header nests too deeply)") from None
    if not isinstance(header, dict):
        raise SessionFileError(f"{path} is corrupt (the header is not a JSON object)")
    for key, kind in _HEADER_FIELDS.items():
        if not isinstance(header.get(key), kind):
            raise SessionFileError(f"{path} is corrupt (header field {key!r} is missing or not a {kind.__name__})")
    policy = header["policy"]
    if not isinstance(policy.get("name"), str) or not isinstance(policy.get("sinks"), int):
        raise SessionFileError(f"{path} is corrupt (header field 'policy' is incomplete)")
    if _options_problem(header.get("options", {}), header["n_ctx"]):
        raise SessionFileError(f"{path} is corrupt (header field 'options' is not a set of session options)")
    return header


_INT_OPTIONS = ("batch_size", "refresh_every", "rebase_every")


def _options_problem(options, n_ctx: int) -> bool:
    """Whether the saved session options (absent in older files) are not ones a session could have had."""
    if not isinstance(options, dict) or not set(options) <= {*_INT_OPTIONS, "shift_mode"}:
        return True
    if options.get("shift_mode", "kept-forward") not in ("kept-forward", "window-back"):
        return True
    if not all(type(options.get(key, 1)) is int and options.get(key, 1) >= 1 for key in _INT_OPTIONS):
        return True
    return options.get("batch_size", 1) > n_ctx


def _check_payload_layout(path: Path, header: dict, payload) -> None:
    """The cell list at the start of llama.cpp's sequence state must match edgesink's bookkeeping."""
    try:
        state = header["state"]
        n_kept, w0 = len(state["kept"]), int(state["w0"])
        positions = set(range(w0 - n_kept, w0 + len(state["window"])))
    except (KeyError, TypeError, ValueError):
        raise SessionFileError(f"{path} is corrupt (its bookkeeping does not describe a cache)") from None
    seqstate.check_cell_list(payload, positions, str(path))


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
        "policy": {"sinks": policy.sinks, **policy.to_dict()},  # sinks always there: older readers want it
        "payload_length": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "options": {**session.config.saved_options(),
                    "shift_mode": "kept-forward" if session.kept_forward else "window-back"},
        "state": session.snapshot(),
    }


def _check_compatible(session, header: dict, path: Path) -> None:
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
    saved_policy = _saved_policy(header, path)
    if saved_policy != session.policy:
        raise SessionFileError(f"the session was saved with policy {saved_policy.label}, "
                               f"this session uses {session.policy.label}")


def _sequence_state(session) -> bytearray:
    """llama.cpp's state of the stream's sequence, in the one-stream form every session loads."""
    return session.cache.slot.state_get()


def _set_sequence_state(session, payload: bytearray) -> None:
    """Make ``payload`` (from llama_state_seq_get_data) the cache's contents.

    An own context's whole memory is cleared first, not only the stream's cells: that also sends
    llama.cpp's search for free cells back to cell 0, so the cells land where a fresh session's
    restore puts them. Between steps only the stream's sequence holds cells.
    """
    if payload:
        n_read = session.cache.slot.state_set(payload)
        if n_read == 0:
            raise SessionFileError("llama.cpp refused the saved cache state (other llama.cpp version or settings)")
        if n_read != len(payload):
            raise SessionFileError(f"llama.cpp refused the saved cache state: it holds {len(payload)} bytes, "
                                   f"llama.cpp read {n_read}")
    else:
        session.cache.slot.clear()


# -- atomic writes --------------------------------------------------------------------------------

_TEMP_SUFFIX = ".edgesink-tmp"
_TEMP_RANDOM = re.compile(r"[a-z0-9_]+")  # tempfile's random part: never a dot


def atomic_write(path: Path, parts: list) -> None:
    """Write ``parts`` to a temporary file beside ``path``, sync it, rename it over ``path``, sync the folder."""
    folder = path.parent
    tmp_name = None
    try:
        with _saving_into(folder, path.name):
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=folder)
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
            tmp_name = None
    except OSError as e:
        raise SessionSaveError(f"could not save the session to {path}: {e.strerror or e}; "
                               "any earlier file there is intact") from e
    finally:
        if tmp_name:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    try:
        _sync_folder(folder)
    except OSError as e:
        raise SessionSaveError(f"saved the session to {path}, but syncing its folder failed ({e.strerror or e}): "
                               "the new file is in place but may not survive a power cut") from e


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _saving_into(folder: Path, name: str):
    """Held while a save's temporary file exists; first removes dead saves' leftovers when no save runs.

    Every save holds a shared flock on the folder while its temporary file exists, so a save that
    gets the lock exclusively knows that no other save into this folder is running, in any process,
    PID namespace or container on this machine (flock is the kernel's), and every temporary file of
    ``name`` there is a dead save's leftover. Process ids in file names could not tell: another
    namespace's or host's pid, or a recycled one, looks alive or dead at random. Where flock is not
    supported (some network filesystems) leftovers stay.
    """
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        fd = None  # an unreadable folder: no lock, no clean-up; writing into it says what is wrong
    try:
        if fd is not None:
            if _try_flock(fd, fcntl.LOCK_EX):
                _remove_temporaries(folder, name)
            _take_shared_lock(fd)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _try_flock(fd: int, operation: int) -> bool:
    """Whether the lock was taken without waiting (False also where the filesystem has no locks)."""
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _take_shared_lock(fd: int, patience_s: float = 10.0) -> None:
    """Take the shared lock, waiting while another save cleans up (milliseconds).

    Another program's exclusive lock on the folder is waited out only ``patience_s`` seconds: no
    save cleans up while it holds it, so writing unlocked is safe then.
    """
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        except OSError:
            return  # no locks on this filesystem: nobody cleans up either


def _is_temporary_of(entry: str, name: str) -> bool:
    """Whether ``entry`` is a temporary file of a save to ``name``: ``.{name}.{random}.edgesink-tmp``.

    The random part has no dot, so the name is split from the right: ``.run.40000.k3j9x_2a.edgesink-tmp``
    belongs to ``run.40000``, never to ``run``.
    """
    if not entry.endswith(_TEMP_SUFFIX):
        return False
    head, dot, random_part = entry[:-len(_TEMP_SUFFIX)].rpartition(".")
    return bool(dot) and head == f".{name}" and _TEMP_RANDOM.fullmatch(random_part) is not None


def _remove_temporaries(folder: Path, name: str) -> None:
    """Delete the temporary files of saves to ``name`` (only called while no save into ``folder`` runs)."""
    try:
        entries = [entry.path for entry in os.scandir(folder) if _is_temporary_of(entry.name, name)]
    except OSError:
        return
    for entry in entries:
        try:
            os.unlink(entry)
        except OSError:
            pass
