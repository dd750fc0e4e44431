"""Session snapshots: exact continuation, atomic saves that survive SIGKILL, full disks and
read-only folders, and typed errors for every kind of damaged file. Real model throughout."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import edgesink
from edgesink import Session
from edgesink.persistence import MAGIC, SessionFileError, SessionSaveError, read_session_file
from craft_gguf import write_valid

N_CTX = 128


@pytest.fixture(scope="module")
def tokens(prose_tokens):
    return prose_tokens[:2000]


def fed(model, tokens, n, **options) -> Session:
    s = model.session(n_ctx=options.pop("n_ctx", N_CTX), n_threads=1, **options)
    s.feed_tokens(tokens[:n])
    return s


def assert_same_stream(a: Session, b: Session) -> None:
    assert b.cached_tokens() == a.cached_tokens()
    sa, sb = a.stats, b.stats
    for field in ("tokens_seen", "tokens_in_cache", "tokens_kept", "evictions", "first_position", "last_position"):
        assert getattr(sb, field) == getattr(sa, field), field
    assert b.cache.llama_pos_range() == a.cache.llama_pos_range()


# -- exact continuation ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["sink", *(pytest.param(p, marks=pytest.mark.slow)  # 6-9 s each
                                             for p in ("window", "halve", "recompute"))])
def test_restore_continues_exactly(model, tokens, tmp_path, policy):
    a = fed(model, tokens, 5 * N_CTX + 17, policy=policy)  # many evictions, odd offset
    path = tmp_path / "a.session"
    a.save(path)
    b = Session.restore(path, model, n_threads=1)
    assert_same_stream(a, b)
    la, lb = a.next_logits(), b.next_logits()
    assert np.abs(la - lb).max() <= 1e-4  # measured: 0.0 (the same computation)
    assert la.argmax() == lb.argmax()
    # The same seed gives the same text, far enough to evict again.
    n = 6 if policy == "recompute" else 60  # recompute re-encodes the window for every token
    assert a.generate_text(n, seed=11) == b.generate_text(n, seed=11)
    assert_same_stream(a, b)
    a.close(), b.close()


def test_restore_carries_pending_utf8_and_counters(model, tokens, tmp_path):
    text = "Caf\u00e9 \u6771\u4eac \U0001F600 end"
    data = text.encode()
    cut = data.index("\U0001F600".encode()) + 2  # in the middle of the emoji
    a = fed(model, tokens, 300)
    b_ref = fed(model, tokens, 300)
    a.feed(data[:cut])
    a.save(tmp_path / "s")
    restored = Session.restore(tmp_path / "s", model, n_threads=1)
    restored.feed(data[cut:])
    b_ref.feed(data[:cut])  # the same two calls, without the restore in between
    b_ref.feed(data[cut:])
    assert restored.cached_tokens() == b_ref.cached_tokens()
    assert restored.stats.evictions == b_ref.stats.evictions
    for s in (a, restored, b_ref):
        s.close()


def test_load_into_a_live_session_replaces_its_stream(model, tokens, tmp_path):
    a = fed(model, tokens, 400)
    a.save(tmp_path / "a")
    other = fed(model, tokens[1000:], 250)
    other.load(tmp_path / "a")
    assert_same_stream(a, other)
    assert np.abs(a.next_logits() - other.next_logits()).max() <= 1e-4
    a.close(), other.close()


def test_restore_continues_a_conversation(model, tmp_path):
    a = model.session(n_ctx=256, n_threads=1)
    a.start_chat(system="You answer in one short sentence.")
    "".join(a.chat("What is the capital of France?", max_tokens=8, seed=3))
    a.save(tmp_path / "chat.session")
    b = Session.restore(tmp_path / "chat.session", model, n_threads=1)
    assert b.messages == a.messages
    assert_same_stream(a, b)
    ask = "And of Italy?"
    assert "".join(a.chat(ask, max_tokens=8, seed=4)) == "".join(b.chat(ask, max_tokens=8, seed=4))
    assert b.messages == a.messages
    a.close(), b.close()


# -- atomic saves -----------------------------------------------------------------------------------

KILL_ROUNDS = int(os.environ.get("EDGESINK_KILL_ROUNDS", "12"))
# Kills that must land while a save's temporary file exists, the moment an atomic save is for.
# Where they land depends on the machine's speed and load, so rounds go on past KILL_ROUNDS
# (up to 3x) until this many have; measured here: 7 of 20 rounds (saves of 22 ms) landed there.
MID_SAVE_KILLS = 3

_SAVER = r"""
import sys, edgesink
model_path, tokens_file, target = sys.argv[1:4]
tokens = [int(t) for t in open(tokens_file).read().split()]
m = edgesink.load(model_path)
s = m.session(n_ctx=128, n_threads=1)
s.feed_tokens(tokens[:140])  # past n_ctx: the saved state holds evictions
i = 140
while True:
    s.feed_tokens(tokens[i:i + 7]); i += 7
    print("saving", s.stats.tokens_seen, flush=True)
    s.save(target)
    print("saved", s.stats.tokens_seen, flush=True)
"""


@pytest.mark.slow(seconds=35)  # a fresh child process per kill
def test_sigkill_in_the_middle_of_saves_never_loses_the_snapshot(model, model_path, tokens, tmp_path):
    """A child saves over and over; it is SIGKILLed at random points during a save, many times,
    and some of the kills are seen to land while the save's temporary file existed."""
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text(" ".join(map(str, tokens)))
    target = tmp_path / "stream.session"
    rng = random.Random(1234)
    seen_states: set[int] = set()
    durations: list[float] = []
    killed_during_save = killed_with_temporary = round_ = 0
    while round_ < KILL_ROUNDS or (killed_with_temporary < MID_SAVE_KILLS and round_ < 3 * KILL_ROUNDS):
        round_ += 1
        child = subprocess.Popen([sys.executable, "-c", _SAVER, str(model_path), str(tokens_file), str(target)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            completed = []  # snapshots this child finished
            started = time.perf_counter()
            saves_before_kill = rng.randint(1, 3)
            while True:
                line = child.stdout.readline()
                assert line, "the saver died by itself"
                kind, n = line.split()
                if kind == "saved":
                    completed.append(int(n))
                    durations.append(time.perf_counter() - started)
                    continue
                started = time.perf_counter()
                in_flight = int(n)
                if len(completed) >= saves_before_kill:
                    # Somewhere inside the save (or just after it): typical saves take `mean` seconds.
                    mean = sum(durations) / len(durations) if durations else 0.05
                    time.sleep(rng.uniform(0, mean))
                    child.send_signal(signal.SIGKILL)
                    break
        finally:
            child.kill()
            child.wait()
        killed_during_save += child.stdout.read().count("saved") == 0
        child.stdout.close()
        # The snapshot on disk is whole: the last one finished, or the one in flight if its rename happened.
        restored = Session.restore(target, model, n_threads=1)
        n = restored.stats.tokens_seen
        assert n in (completed[-1], in_flight, in_flight + 7), (round_, n, completed, in_flight)
        seen_states.add(n == in_flight)
        assert np.isfinite(restored.next_logits()).all()
        restored.close()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".stream.session.")]
        # A save first removes what killed saves left behind (this child saved before its kill), so a
        # temporary file here is this round's: the kill landed between its creation and the rename.
        assert len(leftovers) <= 1, leftovers
        killed_with_temporary += len(leftovers)
    print(f"\n{round_} kills; {killed_during_save} before the in-flight save ended, {killed_with_temporary} of "
          f"them while its temporary file existed; mean save {1000 * sum(durations) / len(durations):.0f} ms; "
          f"outcomes (new snapshot won?) {seen_states}")
    assert killed_with_temporary >= MID_SAVE_KILLS, "too few kills landed in the middle of a save to prove anything"


# -- full disk, read-only folder ------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextlib.contextmanager
def file_size_limit(limit: int):
    """The fallback when mounting is not allowed: RLIMIT_FSIZE makes big writes fail with EFBIG."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def _check_still_usable(s: Session, tmp_path: Path) -> None:
    before = s.stats.tokens_seen
    s.feed(" And so the story went on.")
    assert s.generate_text(5, seed=1)
    assert s.stats.tokens_seen > before
    s.save(tmp_path / "elsewhere.session")
    Session.restore(tmp_path / "elsewhere.session", s.model, n_threads=1).close()


def test_disk_full_gives_a_clear_error_and_keeps_the_old_snapshot(model, tokens, tmp_path):
    s = fed(model, tokens, 10)  # about 0.25 MB
    with tmpfs(tmp_path / "small", "1m") as folder:
        if folder is not None:
            how = "ENOSPC"
            target = folder / "s.session"
            s.save(target)
            old = target.read_bytes()
            s.feed_tokens(tokens[10:120])  # now about 2.6 MB: the disk is too small
            with pytest.raises(SessionSaveError, match="No space left on device") as err:
                s.save(target)
        else:  # mounting is not permitted here
            how = "EFBIG"
            target = tmp_path / "small" / "s.session"  # the folder tmpfs() made, left unmounted
            s.save(target)
            old = target.read_bytes()
            s.feed_tokens(tokens[10:120])
            with file_size_limit(1 << 20):
                with pytest.raises(SessionSaveError, match="File too large") as err:
                    s.save(target)
        assert "intact" in str(err.value)
        assert target.read_bytes() == old
        assert sorted(p.name for p in target.parent.iterdir()) == ["s.session"]  # no temporary left
        assert Session.restore(target, model, n_threads=1).stats.tokens_seen == 10
    print(f"\ndisk full simulated with {how}")
    _check_still_usable(s, tmp_path)
    s.close()


def fail_like_a_read_only_mount(folder: Path):
    """A stand-in for ``tempfile.mkstemp`` that fails in ``folder`` as the kernel fails a file
    creation on a read-only mount (EROFS); elsewhere the real one."""
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
        return real(*args, dir=dir, **kwargs)

    return mkstemp


def test_read_only_folder_gives_a_clear_error_and_keeps_the_old_snapshot(model, tokens, tmp_path, monkeypatch):
    """A real read-only mount where this process may mount; elsewhere (root without mount
    privileges ignores folder permissions, so chmod cannot stand in) the kernel's answer to
    creating a file on one, EROFS, at the call that creates the save's temporary file."""
    s = fed(model, tokens, 40)
    with tmpfs(tmp_path / "ro", "8m") as mounted:
        folder = mounted or tmp_path / "ro"
        target = folder / "s.session"
        s.save(target)
        old = target.read_bytes()
        s.feed_tokens(tokens[40:60])
        remounted = mounted is not None and subprocess.run(["mount", "-o", "remount,ro", str(folder)],
                                                           capture_output=True).returncode == 0
        with monkeypatch.context() as patch:
            if not remounted:
                patch.setattr(tempfile, "mkstemp", fail_like_a_read_only_mount(folder))
            with pytest.raises(SessionSaveError, match="Read-only file system") as err:
                s.save(target)
        assert "intact" in str(err.value)
        assert target.read_bytes() == old
        assert sorted(p.name for p in folder.iterdir()) == ["s.session"]  # no temporary left
        assert Session.restore(target, model, n_threads=1).stats.tokens_seen == 40
    print(f"\nread-only folder: {'a tmpfs remounted read-only' if remounted else 'EROFS at file creation'}")
    _check_still_usable(s, tmp_path)
    s.close()


# -- damaged files ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def snapshot(model, tokens, tmp_path_factory):
    """A small valid snapshot (n_ctx 64, 100 tokens) and its bytes."""
    folder = tmp_path_factory.mktemp("snap")
    s = fed(model, tokens, 100, n_ctx=64)
    path = folder / "good.session"
    s.save(path)
    s.close()
    return path, path.read_bytes()


@pytest.fixture
def victim(model, tokens):
    """A live session (same settings as the snapshot) that tries to load damaged files."""
    s = fed(model, tokens[500:], 90, n_ctx=64)
    before = (s.cached_tokens(), s.stats.tokens_seen, s.cache.llama_pos_range(), s.next_logits())
    yield s
    # After every failed load: unchanged and still usable.
    assert s.cached_tokens() == before[0] and s.stats.tokens_seen == before[1]
    assert s.cache.llama_pos_range() == before[2]
    assert np.abs(s.next_logits() - before[3]).max() <= 1e-4
    assert s.generate_text(3, seed=2)
    s.close()


def _write(tmp_path, data: bytes, name="bad.session") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _split(data: bytes):
    _, version, header_len = struct.unpack_from("<8sII", data)
    header_end = 16 + header_len
    return json.loads(data[16:header_end]), data[header_end + 32:]


def _rebuild(header: dict, payload: bytes, version: int = 1) -> bytes:
    """A file with valid checksums around whatever header and payload: what a crafted file looks like."""
    header = dict(header, payload_length=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    raw = json.dumps(header).encode()
    return struct.pack("<8sII", MAGIC, version, len(raw)) + raw + hashlib.sha256(raw).digest() + payload


def test_the_good_snapshot_loads(snapshot, victim, model):
    restored = Session.restore(snapshot[0], model, n_threads=1)
    assert restored.stats.tokens_seen == 100
    restored.close()


def test_wrong_model(snapshot, tmp_path):
    with edgesink.load(write_valid(tmp_path)) as tiny:
        with pytest.raises(SessionFileError, match="another model"):
            Session.restore(snapshot[0], tiny)
        with tiny.session(n_ctx=64, n_threads=1) as s, tiny.session(n_ctx=64, n_threads=1) as twin:
            s.feed("the and of")
            twin.feed("the and of")
            with pytest.raises(SessionFileError, match="another model"):
                s.load(snapshot[0])
            # Unchanged: it goes on exactly as a twin that never tried the load.
            assert s.cached_tokens() == twin.cached_tokens() and s.stats.tokens_seen > 0
            assert s.generate_text(2, seed=1) == twin.generate_text(2, seed=1)
            assert s.cached_tokens() == twin.cached_tokens() and s.stats.tokens_seen == twin.stats.tokens_seen


def test_other_format_version(snapshot, victim, tmp_path):
    data = bytearray(snapshot[1])
    data[8:12] = struct.pack("<I", 2)
    with pytest.raises(SessionFileError, match="format version 2"):
        victim.load(_write(tmp_path, bytes(data)))


def test_other_settings_are_named(snapshot, model, tmp_path):
    with model.session(n_ctx=96, n_threads=1) as s:
        s.feed("Hello")
        with pytest.raises(SessionFileError, match="n_ctx=64"):
            s.load(snapshot[0])
    with model.session(n_ctx=64, policy="window", n_threads=1) as s:
        s.feed("Hello")
        with pytest.raises(SessionFileError, match="policy sink"):
            s.load(snapshot[0])


def test_other_llama_cpp(snapshot, victim, tmp_path):
    header, payload = _split(snapshot[1])
    header["llama_cpp_commit"] = "deadbeef0"
    with pytest.raises(SessionFileError, match="llama.cpp deadbeef0"):
        victim.load(_write(tmp_path, _rebuild(header, payload)))


def test_truncated_anywhere(snapshot, victim, tmp_path):
    data = snapshot[1]
    header_end = 16 + struct.unpack_from("<I", data, 12)[0]
    cuts = [0, 3, 8, 13, 16, 100, header_end - 1, header_end, header_end + 31, header_end + 32,
            header_end + 1000, len(data) // 2, len(data) - 1]
    for cut in cuts:
        with pytest.raises(SessionFileError, match="truncated|empty") as err:
            victim.load(_write(tmp_path, data[:cut]))
        assert str(tmp_path) in str(err.value)


def test_flipped_byte_anywhere(snapshot, victim, tmp_path):
    """Every byte of the header region, and a sample of the payload, flipped one at a time."""
    data = snapshot[1]
    header_end = 16 + struct.unpack_from("<I", data, 12)[0] + 32
    rng = random.Random(7)
    positions = list(range(header_end)) + rng.sample(range(header_end, len(data)), 150) + [len(data) - 1]
    causes: dict[str, int] = {}
    kinds = ("bad magic", "format version", "truncated", "header checksum", "payload checksum", "corrupt")
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(SessionFileError) as err:
            victim.load(_write(tmp_path, bytes(damaged)))
        kind = next((k for k in kinds if k in str(err.value)), str(err.value))
        causes[kind] = causes.get(kind, 0) + 1
    print(f"\n{len(positions)} flips: {causes}")
    assert set(causes) <= set(kinds), causes


def test_crafted_header_with_valid_checksums(snapshot, victim, tmp_path):
    header, payload = _split(snapshot[1])
    for damage, match in [
        (lambda h: h.pop("state"), "state"),
        (lambda h: h.update(n_ctx="64"), "n_ctx"),
        (lambda h: h.update(policy={"name": 3}), "policy"),
        (lambda h: h["state"].update(kept=[10**9]), "bookkeeping"),
        (lambda h: h["state"].update(window=h["state"]["window"][:-1]), "inconsistent"),
        (lambda h: h["state"].update(w0=h["state"]["w0"] + 5), "inconsistent"),
    ]:
        h = json.loads(json.dumps(header))
        damage(h)
        with pytest.raises(SessionFileError, match=match):
            victim.load(_write(tmp_path, _rebuild(h, payload)))
    raw = b"[1, 2, 3]"
    not_object = struct.pack("<8sII", MAGIC, 1, len(raw)) + raw + hashlib.sha256(raw).digest()
    with pytest.raises(SessionFileError, match="not a JSON object"):
        victim.load(_write(tmp_path, not_object))


def test_crafted_payload_with_valid_checksums(snapshot, victim, tmp_path):
    """Cell lists that do not match the bookkeeping never reach llama.cpp."""
    header, payload = _split(snapshot[1])
    bad_cells = bytearray(payload)
    struct.pack_into("<i", bad_cells, 16, 10**6)  # the first cell's position
    bad_count = bytearray(payload)
    struct.pack_into("<I", bad_count, 12, 2**31)  # the cell count
    bad_seq = bytearray(payload)
    struct.pack_into("<I", bad_seq, 16 + 4, 3)  # a cell in 3 sequences
    for bad, match in [(bad_cells, "inconsistent"), (bad_count, "inconsistent"), (bad_seq, "inconsistent"),
                       (b"\0" * 8, "cache state"), (b"", "cache state")]:
        with pytest.raises(SessionFileError, match=match):
            victim.load(_write(tmp_path, _rebuild(header, bytes(bad))))
    # A payload whose cell list is right but whose tensors are garbage: llama.cpp's own checks.
    garbage = bytearray(payload)
    struct.pack_into("<I", garbage, 16 + 12 * 64 + 4, 99)  # n_layer, after the 64 cells and v_trans
    with pytest.raises(SessionFileError, match="refused"):
        victim.load(_write(tmp_path, _rebuild(header, bytes(garbage))))


def test_crafted_tensor_section_with_valid_checksums(snapshot, victim, tmp_path):
    """Past the cell list it is llama.cpp's own format: wrong types, row sizes, layer counts and
    lengths must be refused by llama.cpp, not read out of bounds (``make asan`` runs this too)."""
    header, payload = _split(snapshot[1])
    n_cells = struct.unpack_from("<I", payload, 12)[0]
    layers = 16 + 12 * n_cells + 8  # after the cells, v_trans and n_layer: layer 0's key type
    row = struct.unpack_from("<Q", payload, layers + 4)[0]
    layer1 = layers + 12 + n_cells * row
    mutations = {
        "key type": lambda p: struct.pack_into("<i", p, layers, 0),
        "key row size": lambda p: struct.pack_into("<Q", p, layers + 4, row * 4),
        "huge key row size": lambda p: struct.pack_into("<Q", p, layers + 4, 2**62),
        "second layer type": lambda p: struct.pack_into("<i", p, layer1, 30),
        "v_trans": lambda p: struct.pack_into("<I", p, layers - 8, 1),
        "n_layer": lambda p: struct.pack_into("<I", p, layers - 4, 2**31),
    }
    for name, mutate in mutations.items():
        damaged = bytearray(payload)
        mutate(damaged)
        with pytest.raises(SessionFileError, match="refused"):
            victim.load(_write(tmp_path, _rebuild(header, bytes(damaged))))
    for cut in (len(payload) - 1, len(payload) // 2, layers + 6):
        with pytest.raises(SessionFileError, match="refused"):
            victim.load(_write(tmp_path, _rebuild(header, payload[:cut])))
    with pytest.raises(SessionFileError, match="refused"):  # trailing bytes
        victim.load(_write(tmp_path, _rebuild(header, payload + b"\0" * 64)))


def test_not_a_session_file(victim, tmp_path, model_path):
    for path, match in [(tmp_path, "directory"), (tmp_path / "missing", "no session file"),
                        (model_path, "bad magic"), (_write(tmp_path, b""), "empty")]:
        with pytest.raises(SessionFileError, match=match):
            victim.load(path)


def test_read_session_file_reports_the_header(snapshot):
    header, payload = read_session_file(snapshot[0])
    assert header["n_ctx"] == 64 and len(payload) == header["payload_length"]


# -- crafted bookkeeping: every field restore reads is checked -------------------------------------

@pytest.fixture(scope="module")
def chat_snapshot(model, tmp_path_factory):
    """A small chat (n_ctx 64, the victim's settings), saved."""
    s = model.session(n_ctx=64, n_threads=1)
    s.start_chat("Be brief.")
    "".join(s.chat("Hi", max_tokens=6, seed=1))
    path = tmp_path_factory.mktemp("chat") / "chat.session"
    s.save(path)
    s.close()
    return path, path.read_bytes()


_BAD_STATE = {
    "counters not numbers": lambda st: st.update(counters={"evicted": "x"}),
    "unknown counter": lambda st: st.update(counters={"bogus": 1}),
    "counters not an object": lambda st: st.update(counters=[1, 2]),
    "negative counter": lambda st: st.update(counters={"evicted": -1}),
    "bool counter": lambda st: st.update(counters={"evicted": True}),
    "message start not a number": lambda st: st.update(message_starts=[None]),
    "message start past the stream": lambda st: st.update(message_starts=[10**9]),
    "message starts not a list": lambda st: st.update(message_starts=5),
    "message starts out of order": lambda st: st.update(message_starts=[3, 1]),
    "end token text": lambda st: st.update(last_end_token_text=3),
    "pending bytes": lambda st: st.update(pending_utf8="zz"),
    "chat not an object": lambda st: st.update(chat=[1]),
    "messages not a list": lambda st: st["chat"].update(messages="hi"),
    "message not an object": lambda st: st["chat"].update(messages=[["user", "hi"]]),
    "message without content": lambda st: st["chat"].update(messages=[{"role": "user"}]),
    "unknown role": lambda st: st["chat"].update(messages=[{"role": "wizard", "content": "x"}]),
    "content not text": lambda st: st["chat"].update(messages=[{"role": "user", "content": 5}]),
    "messages missing": lambda st: st["chat"].pop("messages"),
    "placeholder past the messages": lambda st: st["chat"].update(fed="\ue0009\ue001"),
    "rendering not text": lambda st: st["chat"].update(fed=7),
    "keep_system not a bool": lambda st: st["chat"].update(keep_system="yes"),
    "system not text": lambda st: st["chat"].update(system=["x"]),
    "mark past the stream": lambda st: st["chat"].update(marks=[[0, 10**9]]),
    "render_from past the messages": lambda st: st["chat"].update(render_from=99),
    "template does not parse": lambda st: st["chat"].update(template="{% for %}"),
}


def chat_hello(model):
    """A chat session (the victim's settings) with one exchange."""
    s = model.session(n_ctx=64, n_threads=1)
    s.start_chat("You are kind.")
    "".join(s.chat("Hello", max_tokens=4, seed=2))
    return s


@pytest.fixture(scope="module")
def chat_hello_goes_on(model):
    """The reply to a second message, and the cache after it, of a chat that no failed load touched."""
    with chat_hello(model) as s:
        reply = "".join(s.chat("Again", max_tokens=2, seed=3))
        return reply, s.cached_tokens()


@pytest.mark.parametrize("damage", list(_BAD_STATE), ids=list(_BAD_STATE))
def test_crafted_bookkeeping_fields_are_refused(chat_snapshot, victim, model, tmp_path, damage, capsys,
                                                chat_hello_goes_on):
    from edgesink.cli.chat import run_command

    header, payload = _split(chat_snapshot[1])
    _BAD_STATE[damage](header["state"])
    path = _write(tmp_path, _rebuild(header, payload))
    with pytest.raises(SessionFileError, match="bookkeeping is inconsistent"):
        victim.load(path)
    # In chat: an error line, the conversation as it was, going on as if no load had been tried.
    with chat_hello(model) as s:
        before = (s.messages, s.cached_tokens())
        run_command(s, f"/load {path}")
        assert capsys.readouterr().out.startswith("error: the session file's bookkeeping is inconsistent")
        assert (s.messages, s.cached_tokens()) == before
        assert ("".join(s.chat("Again", max_tokens=2, seed=3)), s.cached_tokens()) == chat_hello_goes_on


def test_a_chat_saved_without_the_newer_fields_still_loads(chat_snapshot, model, tmp_path):
    header, payload = _split(chat_snapshot[1])
    for key in ("marks", "template", "render_from"):
        header["state"]["chat"].pop(key)
    path = _write(tmp_path, _rebuild(header, payload))
    with model.session(n_ctx=64, n_threads=1) as s:
        s.load(path)
        assert s.system_prompt == "Be brief." and len(s.messages) == 3
        "".join(s.chat("More?", max_tokens=2, seed=1))
