"""llama.cpp's sequence-state bytes and the KV cache's size: the one module that knows either.

``llama_state_seq_get_data`` writes a uint32 magic and an int32 seq_id, then a *section* per KV cache
(one; two for a sliding-window model, the full cache then the SWA one): a uint32 n_stream, then per
stream a uint32 cell count and, when not 0, that many cells (int32 pos, uint32 n_seq_id, the seq_ids)
and the K and V rows. A shared context has a stream per sequence, all but one empty (count 0); a
lone context has one stream. Session files always hold the one-stream form, with seq_id 0.
"""

from __future__ import annotations

import struct

import numpy as np

from ._native import C
from .errors import SessionFileError

MAGIC = 0xAF143CD8  # llama.cpp's io_magic at the start of a sequence state
ONE_STREAM_SEQ = 0  # the seq_id of the one-stream form (an own context's stream)
_HEAD = struct.Struct("<Ii")  # magic, seq_id
_COUNT = struct.Struct("<I")  # n_stream, and each stream's cell count
_CELL = struct.Struct("<iIi")  # pos, n_seq_id, seq_id (cells of one sequence have one seq_id)


def one_stream(state: bytearray, seq: int, n_stream: int, *, caches: int = 1) -> bytearray:
    """The one-stream form of the state of sequence ``seq`` of a context of ``n_stream`` streams, whose
    memory has ``caches`` KV caches (2: a sliding-window model's)."""
    head = state[:_HEAD.size]
    struct.pack_into("<i", head, 4, ONE_STREAM_SEQ)
    return head + b"".join(_one_stream_section(s, seq, n_stream) for s in _sections(state, caches))


def all_streams(payload: bytearray, seq: int, n_stream: int, *, caches: int = 1) -> bytearray:
    """The one-stream ``payload`` as the state of sequence ``seq`` of a context of ``n_stream`` streams,
    whose memory has ``caches`` KV caches."""
    head = bytearray(payload[:_HEAD.size])
    struct.pack_into("<i", head, 4, seq)
    return head + b"".join(_all_streams_section(s, seq, n_stream) for s in _sections(payload, caches))


def _one_stream_section(section, seq: int, n_stream: int) -> bytes:
    body = section[_COUNT.size:]
    before, after = _COUNT.size * seq, _COUNT.size * (n_stream - 1 - seq)
    if any(body[:before]) or (after and any(body[len(body) - after:])):
        raise SessionFileError("llama.cpp wrote a sequence state with cells in another sequence's stream")
    return _COUNT.pack(1) + bytes(body[before:len(body) - after])


def _all_streams_section(section, seq: int, n_stream: int) -> bytes:
    if len(section) < _COUNT.size or _COUNT.unpack_from(section, 0)[0] != 1:
        raise SessionFileError("the saved cache state is not that of one stream")
    empty = _COUNT.pack(0)
    return _COUNT.pack(n_stream) + empty * seq + bytes(section[_COUNT.size:]) + empty * (n_stream - 1 - seq)


def _sections(state, caches: int) -> list[memoryview]:
    """The state's sections, one per KV cache; a sliding-window model's two split where the first ends."""
    view = memoryview(state)
    if len(view) < _HEAD.size + _COUNT.size:
        raise SessionFileError("the cache state is too short to hold a cell list")
    if caches == 1:
        return [view[_HEAD.size:]]
    try:
        middle = _section_end(view, _HEAD.size)
    except struct.error:
        middle = len(view) + 1
    if middle >= len(view):
        raise SessionFileError("the cache state does not hold the two caches of a sliding-window model")
    return [view[_HEAD.size:middle], view[middle:]]


def _section_end(buf, at: int) -> int:
    """Where the section starting at ``at`` ends: its streams' cells, then their K rows and V rows per layer
    (llama_kv_cache::state_write; every layer has V rows, as in the sliding-window models)."""
    (n_stream,) = _COUNT.unpack_from(buf, at)
    at += _COUNT.size
    for _ in range(n_stream):
        (n_cells,) = _COUNT.unpack_from(buf, at)
        at += _COUNT.size
        if n_cells == 0:
            continue
        _, at = _cells(buf, at, n_cells)
        v_trans, n_layer = struct.unpack_from("<II", buf, at)
        at = _skip_k_rows(buf, at + 8, n_layer, n_cells)
        for _ in range(n_layer):
            _, _, at = _v_block(buf, at, v_trans, n_cells)
    return at


def _cells(buf, at: int, n_cells: int) -> tuple[list[int], int]:
    """A stream's cell list at ``at``: the cells' positions, and where the list ends."""
    positions = []
    for _ in range(n_cells):
        pos, n_seq_id = struct.unpack_from("<iI", buf, at)
        positions.append(pos)
        at += 8 + 4 * n_seq_id
    return positions, at


def _skip_k_rows(buf, at: int, n_layer: int, n_cells: int) -> int:
    """Past every layer's K block (type, bytes per row, the rows)."""
    for _ in range(n_layer):
        _, row = struct.unpack_from("<iQ", buf, at)
        at += 12 + row * n_cells
    return at


def _v_block(buf, at: int, v_trans: int, n_cells: int) -> tuple[int, int, int]:
    """One layer's V block at ``at``: its ggml type, where its values start and where it ends. Transposed:
    type, bytes per value, values per cell, then value j of every cell for each j; else type, bytes
    per row, then each cell's row."""
    if v_trans:
        v_type, value, n_embd = struct.unpack_from("<iII", buf, at)
        size = value * n_embd * n_cells
    else:
        v_type, row = struct.unpack_from("<iQ", buf, at)
        size = row * n_cells
    return v_type, at + 12, at + 12 + size


def first_layer_values(payload) -> tuple[np.ndarray, np.ndarray]:
    """The cells of a one-stream ``payload`` (f16 or f32 V cache): their positions, shape (n_cells,),
    and their first layer's V rows, shape (n_cells, n_embd_v), as float32.

    A first layer's V row depends only on its cell's token (no position, no other token), so it
    names the token a cell holds: a check of llama.cpp's cells, not of edgesink's bookkeeping.
    """
    view = memoryview(payload)
    n_stream, n_cells = struct.unpack_from("<II", view, _HEAD.size)
    if n_stream != 1:
        raise ValueError(f"not a one-stream state ({n_stream} streams)")
    positions, at = _cells(view, _HEAD.size + 2 * _COUNT.size, n_cells)
    if n_cells == 0:
        return np.array(positions, dtype=np.int64), np.empty((0, 0), dtype=np.float32)
    v_trans, n_layer = struct.unpack_from("<II", view, at)
    v_type, start, end = _v_block(view, _skip_k_rows(view, at + 8, n_layer, n_cells), v_trans, n_cells)
    dtype = {0: np.float32, 1: np.float16}.get(v_type)
    if dtype is None:
        raise ValueError(f"V cache type {v_type} is not f16 or f32")
    values = np.frombuffer(view[start:end], dtype=dtype).astype(np.float32)
    return (np.array(positions, dtype=np.int64),
            values.reshape(-1, n_cells).T if v_trans else values.reshape(n_cells, -1))


def check_cell_list(payload, positions: set[int], where: str) -> None:
    """A one-stream ``payload`` must hold exactly one cell at each of ``positions``, of one sequence.

    A checksum only catches accidents; this catches a payload that does not describe the stream its
    bookkeeping describes (llama.cpp asserts on some inconsistent cell lists) before llama.cpp reads it.
    ``where`` names the payload in the errors (a file).
    """
    try:
        magic, seq_id = _HEAD.unpack_from(payload, 0)
        n_stream, n_cells = struct.unpack_from("<II", payload, _HEAD.size)
        first = _HEAD.size + 2 * _COUNT.size
        cells = [_CELL.unpack_from(payload, first + i * _CELL.size) for i in range(min(n_cells, len(positions) + 1))]
    except struct.error:
        raise SessionFileError(f"{where} is corrupt (the cache state does not start with a cell list)") from None
    if magic != MAGIC or seq_id != ONE_STREAM_SEQ or n_stream != 1:
        raise SessionFileError(f"{where} holds a cache state this llama.cpp does not write "
                               f"(magic {magic:#x}, sequence {seq_id}, {n_stream} streams)")
    if n_cells != len(positions) or {pos for pos, _, _ in cells} != positions or any(n != 1 for _, n, _ in cells):
        raise SessionFileError(f"{where} is inconsistent: its cache state holds {n_cells} cells that do not "
                               f"match the {len(positions)} tokens of its bookkeeping")


def kv_bytes_per_cell(model, bytes_k: float, bytes_v: float) -> float:
    """Bytes of one cell's K and V rows over every layer of ``model`` (a loaded
    :class:`~edgesink.model.Model`; not imported, so this module stays below it), at
    ``bytes_k``/``bytes_v`` per value.

    Layers with more KV heads than the first (the only count llama.cpp reports) are not counted.
    """
    n_head = max(1, C.llama_model_n_head(model.handle))
    n_head_kv = C.llama_model_n_head_kv(model.handle) or n_head
    head_dim = C.llama_model_n_embd(model.handle) // n_head
    key = _metadata_int(model, "attention.key_length", head_dim)
    value = _metadata_int(model, "attention.value_length", head_dim)
    return model.n_layer * n_head_kv * (key * bytes_k + value * bytes_v)


def _metadata_int(model, key: str, default: int) -> int:
    try:
        return int(model.metadata(f"{model.architecture}.{key}"))
    except (TypeError, ValueError):
        return default
