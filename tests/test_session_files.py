"""Session files as files: memory while saving and restoring, what is not a regular file, payload
lengths no session can hold, temporary files of concurrent saves, and a folder that cannot be synced."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import struct
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path

import pytest

import edgesink
from edgesink import Session
from edgesink.persistence import MAGIC, SessionFileError, SessionSaveError, read_session_header


@pytest.fixture(scope="module")
def saved(model, prose_tokens, tmp_path_factory) -> Path:
    """A small valid session file (n_ctx 64, 100 tokens)."""
    path = tmp_path_factory.mktemp("saved") / "good.session"
    with model.session(n_ctx=64, n_threads=1) as s:
        s.feed_tokens(prose_tokens[:100])
        s.save(path)
    return path


@pytest.fixture
def victim(model, prose_tokens):
    """A live session with the saved file's settings; it must come out of every refused load unchanged."""
    s = model.session(n_ctx=64, n_threads=1)
    s.feed_tokens(prose_tokens[500:590])
    before = s.cached_tokens()
    yield s
    assert s.cached_tokens() == before and s.stats.tokens_seen == 90
    s.close()


def split(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    header_len = struct.unpack_from("<I", data, 12)[0]
    return json.loads(data[16:16 + header_len]), data[16 + header_len + 32:]


def with_header(header: dict) -> bytes:
    """The fixed header, a JSON header and its valid checksum: the start of a crafted file."""
    raw = json.dumps(header).encode()
    return struct.pack("<8sII", MAGIC, 1, len(raw)) + raw + hashlib.sha256(raw).digest()


# -- memory: the state is copied once ------------------------------------------------------------

def test_save_and_restore_hold_the_state_about_once(model, prose_tokens, tmp_path, measured):
    """Python-side peak (tracemalloc) of a save and of a restore, against the size of the state."""
    path = tmp_path / "s.session"
    with model.session(n_ctx=256, type_k="f32", type_v="f32", n_threads=1) as s:
        s.feed_tokens(prose_tokens[:250])
        tracemalloc.start()
        try:
            s.save(path)
            save_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    state = split(path)[0]["payload_length"]
    tracemalloc.start()
    try:
        restored = Session.restore(path, model, n_threads=1)
        restore_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    restored.close()
    measured("Python peak / state size", f"save {save_peak / state:.2f}, restore {restore_peak / state:.2f} "
                                         f"(state {state / 2**20:.1f} MiB)")
    assert save_peak <= 1.2 * state and restore_peak <= 1.2 * state


_RSS_CHILD = r"""
import json, sys, edgesink
model_path, tokens_file, target = sys.argv[1:4]
tokens = [int(t) for t in open(tokens_file).read().split()]

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

def extra_peak_kib(action):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark starts again from the current resident size
    before = rss_kib("VmRSS")
    action()
    return rss_kib("VmHWM") - before

m = edgesink.load(model_path)
options = dict(n_ctx=512, type_k="f32", type_v="f32", n_threads=1)
s = m.session(**options)
s.feed_tokens(tokens)
save = extra_peak_kib(lambda: s.save(target))
s.close()
fresh = m.session(**options)  # allocated before the measurement: the restore proper is measured
load = extra_peak_kib(lambda: fresh.load(target))
print(json.dumps({"save_kib": save, "load_kib": load}))
"""


def test_save_and_load_resident_memory_peak(model_path, prose_tokens, tmp_path, measured):
    """The whole process's resident high-water mark (llama.cpp's allocations too), in a child process."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("this kernel does not let a process reset its resident high-water mark")
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text(" ".join(map(str, prose_tokens[:500])))
    target = tmp_path / "s.session"
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(model_path), str(tokens_file), str(target)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    peaks = json.loads(out.stdout.strip().splitlines()[-1])
    state_kib = split(target)[0]["payload_length"] / 1024
    save, load = peaks["save_kib"] / state_kib, peaks["load_kib"] / state_kib
    measured("resident peak / state size", f"save {save:.2f}, load {load:.2f} (state {state_kib / 1024:.1f} MiB)")
    assert save <= 1.2 and load <= 1.2


# -- only regular files are read ----------------------------------------------------------------------

def test_a_link_to_dev_zero_is_refused(victim, model, tmp_path):
    link = tmp_path / "zero.session"
    link.symlink_to("/dev/zero")
    for attempt in (lambda: victim.load(link), lambda: Session.restore(link, model), lambda: read_session_header(link)):
        with pytest.raises(SessionFileError, match="is a device .*/dev/zero.*not a session file"):
            attempt()


def test_a_fifo_is_refused_without_waiting(victim, tmp_path):
    fifo = tmp_path / "pipe.session"
    os.mkfifo(fifo)
    outcome = []

    def load():
        try:
            victim.load(fifo)
        except Exception as e:  # noqa: BLE001 - the outcome is checked below
            outcome.append(e)

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(120)
    if loader.is_alive():  # waiting for a writer: give it one so the thread can end, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        loader.join(10)
        pytest.fail("loading a FIFO waited for a writer")
    assert len(outcome) == 1 and isinstance(outcome[0], SessionFileError), outcome
    assert "is a FIFO" in str(outcome[0])


def test_a_directory_is_refused(victim, model, tmp_path):
    for attempt in (lambda: victim.load(tmp_path), lambda: Session.restore(tmp_path, model),
                    lambda: read_session_header(tmp_path)):
        with pytest.raises(SessionFileError, match="is a directory"):
            attempt()


def test_a_payload_longer_than_the_session_can_hold_is_refused_first(saved, victim, tmp_path):
    header, _ = split(saved)
    path = tmp_path / "huge.session"
    claimed = 2**40
    path.write_bytes(with_header(dict(header, payload_length=claimed)))
    with pytest.raises(SessionFileError, match=rf"announces a cache state of {claimed} bytes, more than a "
                                               r"session of n_ctx 64 \(f16/f16 cache\) can hold"):
        victim.load(path)


def test_a_huge_sparse_payload_is_refused_without_reading_it(saved, victim, model, tmp_path):
    """A file that really is as long as it claims (sparse: no disk used) is still not read."""
    header, _ = split(saved)
    claimed = 8 << 30
    path = tmp_path / "sparse.session"
    with open(path, "wb") as f:
        f.write(with_header(dict(header, payload_length=claimed)))
        f.truncate(f.tell() + claimed)
    assert read_session_header(path)["payload_length"] == claimed  # the header alone is consistent
    tracemalloc.start()
    try:
        for attempt in (lambda: victim.load(path), lambda: Session.restore(path, model, n_threads=1)):
            with pytest.raises(SessionFileError, match="more than a session of n_ctx 64"):
                attempt()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # nothing near the claimed size was allocated


def test_the_limit_holds_a_full_cache_of_either_model(model, prose_tokens, tmp_path, measured):
    """The upper bound must never refuse a real file: a full cache, f32, on both kinds of model."""
    from edgesink.persistence import _payload_limit
    from edgesink.fetch.registry import load_registry

    with edgesink.load(load_registry()["gemma3-270m"].local_path) as gemma:
        for m, tokens in ((model, prose_tokens[:70]), (gemma, gemma.tokenize(" and the" * 40)[:70])):
            with m.session(n_ctx=64, type_k="f32", type_v="f32", n_threads=1) as s:
                s.feed_tokens(tokens)
                assert s.stats.tokens_in_cache == 64
                s.save(tmp_path / "full.session")
                size = split(tmp_path / "full.session")[0]["payload_length"]
                limit = _payload_limit(s)
                measured(m.architecture, f"full cache state {size} bytes, limit {limit} ({limit / size:.1f}x)")
                assert size < limit < 4 * size + (1 << 20)
                Session.restore(tmp_path / "full.session", m, n_threads=1).close()


# -- temporary files of concurrent saves --------------------------------------------------------------

_BLOCKED_WRITER = r"""
import os, sys
from pathlib import Path
from edgesink import persistence

target = Path(sys.argv[1])
real_fsync = os.fsync

def fsync_when_told(fd):
    os.fsync = real_fsync  # only the temporary file's sync waits; the folder's is the real one
    print("writing", flush=True)
    sys.stdin.readline()  # the parent says when the save may go on
    real_fsync(fd)

os.fsync = fsync_when_told
persistence.atomic_write(target, [b"the other writer's bytes"])
print("saved", flush=True)
"""


def test_a_save_never_removes_a_live_save_of_another_file(model, tmp_path):
    """Saving ``run`` while another process is in the middle of saving ``run.40000``."""
    try:
        os.kill(40000, 0)
        pytest.skip("a process 40000 exists here")
    except ProcessLookupError:
        pass
    except PermissionError:
        pytest.skip("a process 40000 exists here")
    writer = subprocess.Popen([sys.executable, "-c", _BLOCKED_WRITER, str(tmp_path / "run.40000")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        live = [p for p in tmp_path.iterdir() if p.name.startswith(".run.40000.")]
        assert len(live) == 1
        with model.session(n_ctx=64, n_threads=1) as s:
            s.feed("A few words to save.")
            s.save(tmp_path / "run")
        assert live[0].exists(), "the save of run removed the live temporary file of run.40000"
        writer.stdin.write("go on\n")
        writer.stdin.flush()
        assert writer.stdout.readline() == "saved\n"
        assert writer.wait(60) == 0
    finally:
        writer.kill()
        writer.wait()
    assert (tmp_path / "run.40000").read_bytes() == b"the other writer's bytes"
    assert Session.restore(tmp_path / "run", model, n_threads=1).stats.tokens_seen > 0


def test_leftovers_of_dead_saves_are_removed_and_only_those(model, tmp_path):
    with model.session(n_ctx=64, n_threads=1) as s:
        s.feed("A few words to save.")
        s.save(tmp_path / "run")  # the temporary file's name as this version writes it
        dead = tmp_path / ".run.k3j9x_2a.edgesink-tmp"  # a save of run killed midway
        others = [tmp_path / ".run.40000.k3j9x_2a.edgesink-tmp",  # a save of run.40000
                  tmp_path / ".run.notes.txt", tmp_path / ".run.k3j9x_2a.tmp"]  # not edgesink's
        for p in [dead, *others]:
            p.write_bytes(b"x")
        s.save(tmp_path / "run")
    assert not dead.exists()
    assert all(p.exists() for p in others)


# -- syncing the folder ---------------------------------------------------------------------------------

def test_a_failed_folder_sync_says_the_new_file_is_in_place(model, tmp_path, monkeypatch):
    target = tmp_path / "s.session"
    with model.session(n_ctx=64, n_threads=1) as s:
        s.feed("The first words.")
        s.save(target)
        s.feed(" And more words after them.")
        seen = s.stats.tokens_seen
        real_fsync = os.fsync

        def fsync(fd):
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        with pytest.raises(SessionSaveError) as err:
            s.save(target)
        monkeypatch.undo()
    message = str(err.value)
    assert "the new file is in place but may not survive a power cut" in message and "intact" not in message
    assert "Input/output error" in message
    with Session.restore(target, model, n_threads=1) as restored:
        assert restored.stats.tokens_seen == seen  # the new file is the one in place


def test_the_errors_are_exported():
    from edgesink import errors, persistence

    for name in ("SessionFileError", "SessionSaveError"):
        cls = getattr(edgesink, name)
        assert cls is getattr(errors, name) is getattr(persistence, name) and issubclass(cls, edgesink.EdgesinkError)
        assert name in edgesink.__all__


def test_a_header_nested_too_deeply_is_a_session_file_error(victim, tmp_path):
    """JSON nested 100,000 deep (with a valid checksum) makes json.loads recurse out of its stack."""
    header = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "nested.session"
    path.write_bytes(struct.pack("<8sII", MAGIC, 1, len(header)) + header + hashlib.sha256(header).digest())
    with pytest.raises(SessionFileError, match="nests too deeply"):
        victim.load(path)
    with pytest.raises(SessionFileError, match="nests too deeply"):
        read_session_header(path)
