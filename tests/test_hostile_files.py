"""Hostile files end in a typed edgesink error, in bounded time and memory, never in a crash.

Each crafted file is opened in a child process of its own, through the public API (and a few through
the ``edgesink`` command), under an address-space cap (RLIMIT_AS) and a CPU-time cap: crafted GGUF
models (``craft_gguf.py``), session files and chat templates. The child must end with an edgesink
error on one line: no traceback, no signal, no hitting a cap (a MemoryError turned into an error
message is luck, not a defence, and is refused too).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import edgesink
from edgesink.persistence import MAGIC
from craft_gguf import CASES, write_valid

MEMORY_CAP = 1 << 30  # address space; a child that behaves needs about 200 MB of it
MAX_RSS = 512 << 20  # resident memory a child may reach
CPU_SECONDS = 20  # RLIMIT_CPU: past it the child dies of SIGXCPU
WALL_SECONDS = 90  # generous for a busy machine; the CPU cap is the real bound
CHILDREN_AT_ONCE = 4
EDGESINK = Path(sys.executable).with_name("edgesink")

# The child: open one hostile file through the public API; print the error's class, its cause's
# class and its message, and exit 3. Any other exception ends in a traceback and exit status 1.
DRIVER = r"""
import sys
import edgesink

kind, path, model = sys.argv[1:4]
try:
    if kind == "gguf":
        edgesink.load(path).close()
    elif kind == "session":
        with edgesink.load(model) as m:
            edgesink.Session.restore(path, m, n_threads=1).close()
    elif kind == "template":
        with edgesink.load(model) as m, m.session(n_ctx=64, n_threads=1) as s:
            s.start_chat(template=open(path, encoding="utf-8").read())
            for _ in s.chat("hi", max_tokens=1):
                pass
except edgesink.EdgesinkError as e:
    cause = type(e.__cause__).__name__ if e.__cause__ is not None else "-"
    print(f"{type(e).__name__} {cause} {e}")
    sys.exit(3)
print("accepted")
"""


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    max_rss: int  # bytes

    def describe(self) -> str:
        return (f"exit {self.returncode} after {self.seconds:.1f} s, max RSS {self.max_rss >> 20} MiB\n"
                f"stdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-2000:]}")


# Forks the command under the caps and reports the command's own resident peak. The command cannot
# be this launcher's first child directly: Linux folds the forking process's peak RSS into the
# child's at exec, so a child of the (large) test process would report the test process's peak.
# A grandchild forked from this small launcher starts from the launcher's few MiB instead.
LAUNCHER = """
import os, resource, signal, sys
memory, cpu, rss_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.execv(sys.argv[4], sys.argv[4:])
_, status, usage = os.wait4(pid, 0)
with open(rss_file, "w") as out:
    out.write(str(usage.ru_maxrss * 1024))
if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
os._exit(os.waitstatus_to_exitcode(status))
"""
_run_ids = itertools.count()


def run_capped(command: list[str], folder: Path, env: dict) -> Outcome:
    """Run ``command`` under the caps, in a process group of its own; report its own resident peak."""
    run = next(_run_ids)
    rss_file = folder / f"{run}.rss"
    capped = [sys.executable, "-c", LAUNCHER, str(MEMORY_CAP), str(CPU_SECONDS), str(rss_file), *command]
    start = time.monotonic()
    with open(folder / f"{run}.out", "w+") as stdout, open(folder / f"{run}.err", "w+") as stderr:
        proc = subprocess.Popen(capped, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=folder,
                                env=env, start_new_session=True)
        try:
            proc.wait(timeout=WALL_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        stdout.seek(0)
        stderr.seek(0)
        max_rss = int(rss_file.read_text()) if rss_file.exists() else -1
        return Outcome(proc.returncode, stdout.read(), stderr.read(), time.monotonic() - start, max_rss)


def assert_typed_error(outcome: Outcome, error: str | tuple[str, ...], expect: str = "") -> None:
    """The child printed one line naming an edgesink error (not caused by hitting the memory cap)."""
    assert outcome.returncode == 3, outcome.describe()
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome.describe()
    assert outcome.stdout.count("\n") == 1, outcome.describe()
    name, cause, message = outcome.stdout.strip().split(" ", 2)
    assert name in ((error,) if isinstance(error, str) else error), outcome.describe()
    assert cause != "MemoryError", outcome.describe()
    assert expect.lower() in message.lower(), outcome.describe()
    assert 0 < outcome.max_rss < MAX_RSS, outcome.describe()


# -- the hostile files -------------------------------------------------------------------------

def session_files(folder: Path, model: Path) -> dict[str, Path]:
    """A real session file of the tiny model, then crafted ones built from it."""
    valid = folder / "valid.state"
    with edgesink.load(model) as m, m.session(n_ctx=64, n_threads=1) as s:
        s.feed("the and of the")
        s.save(valid)
    data = valid.read_bytes()
    _, version, header_len = struct.unpack_from("<8sII", data)
    header = json.loads(data[16:16 + header_len])
    payload = data[16 + header_len + 32:]

    def with_header(changed: dict, new_payload: bytes = payload) -> bytes:
        raw = json.dumps({**header, **changed}).encode()
        return struct.pack("<8sII", MAGIC, version, len(raw)) + raw + hashlib.sha256(raw).digest() + new_payload

    garbage = bytes(range(256)) * (len(payload) // 256 + 1)
    crafted = {
        "bad_magic": b"NOTASESS" + data[8:],
        "truncated": data[: len(data) // 2],
        "huge_header_length": struct.pack("<8sII", MAGIC, version, 0xFFFFFFFF) + data[16:],
        "huge_payload_length": with_header({"payload_length": 2**62}),
        "garbage_payload": with_header({"payload_sha256": hashlib.sha256(garbage[:len(payload)]).hexdigest()},
                                       garbage[:len(payload)]),
    }
    paths = {}
    for name, blob in crafted.items():
        paths[name] = folder / f"{name}.state"
        paths[name].write_bytes(blob)
    paths["dev_zero"] = folder / "dev_zero.state"
    paths["dev_zero"].symlink_to("/dev/zero")
    return paths


TEMPLATES = {
    "huge_source": "{{ messages[0]['content'] }}" * 90_000,  # 2.5 MB of template
    "center_3e9": "{{ 'a'|center(3*10**9) }}",
    "power_tower": "{% set c=((7**256)**256)**6 %}{{ c**128>0 }}",
    "nested_parentheses": "{{ " + "(" * 300 + "1" + ")" * 300 + " }}",
    "silent_loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
}


def template_files(folder: Path) -> dict[str, Path]:
    paths = {}
    for name, source in TEMPLATES.items():
        paths[name] = folder / f"{name}.jinja"
        paths[name].write_text(source, encoding="utf-8")
    return paths


# -- running every child once, a few at a time ---------------------------------------------------

# The crafted models that could cost memory or time, or that only llama.cpp judges (through the
# probe's own child); test_model_files.py loads every case in-process.
GGUF_CASES = (
    "string_absurd_length", "key_absurd_length", "array_absurd_length", "absurd_tensor_count",
    "absurd_kv_count", "negative_tensor_count", "dims_overflow", "tensor_past_end", "offset_past_end",
    "alignment_huge", "empty_file", "not_gguf", "directory", "truncated_header", "truncated_metadata",
    "truncated_tensor_data", "unknown_architecture", "zero_heads", "context_length_wrong_type",
    "wrong_tensor_shape", "missing_tensor",
)
# The ones that abort a raw llama.cpp, through the command a user types.
CLI_GGUF_CASES = ("zero_layers", "absurd_layers", "nextn_above_layers", "absurd_experts",
                  "experts_used_without_experts", "bad_rope_scaling")
SESSION_CASES = ("bad_magic", "truncated", "huge_header_length", "huge_payload_length", "garbage_payload", "dev_zero")


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[tuple[str, str], Outcome]:
    """Every hostile file's child, run once, a few at a time."""
    folder = tmp_path_factory.mktemp("hostile")
    home = folder / "home"  # shared by the children: the valid model is hashed and probed once
    env = dict(os.environ, HOME=str(home), GGML_NO_BACKTRACE="1", EDGESINK_VERBOSE="0")
    model = write_valid(folder)
    ggufs = {name: CASES[name].make(folder) for name in GGUF_CASES + CLI_GGUF_CASES}

    def api(kind: str, path: Path) -> list[str]:
        return [sys.executable, "-c", DRIVER, kind, str(path), str(model)]

    commands = {("gguf", name): api("gguf", ggufs[name]) for name in GGUF_CASES}
    commands |= {("cli", name): [str(EDGESINK), "generate", str(ggufs[name]), "-p", "x", "--max-tokens", "1",
                                 "--n-ctx", "64", "--threads", "1"] for name in CLI_GGUF_CASES}
    commands |= {("session", name): api("session", path) for name, path in session_files(folder, model).items()}
    commands |= {("template", name): api("template", path) for name, path in template_files(folder).items()}
    first = ("template", "silent_loops")  # alone first: it fills the shared caches the others then read
    results = {first: run_capped(commands.pop(first), folder, env)}
    with ThreadPoolExecutor(CHILDREN_AT_ONCE) as pool:
        futures = {key: pool.submit(run_capped, command, folder, env) for key, command in commands.items()}
        results |= {key: future.result() for key, future in futures.items()}
    return results


@pytest.mark.parametrize("name", GGUF_CASES)
def test_crafted_gguf(outcomes, name):
    assert_typed_error(outcomes[("gguf", name)], ("ModelLoadError", "ModelNotFoundError"), CASES[name].expect)


@pytest.mark.parametrize("name", CLI_GGUF_CASES)
def test_crafted_gguf_through_the_command_line(outcomes, name):
    outcome = outcomes[("cli", name)]
    assert outcome.returncode == 1, outcome.describe()
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome.describe()
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), outcome.describe()
    assert CASES[name].expect.lower() in lines[0].lower(), outcome.describe()


@pytest.mark.parametrize("name", SESSION_CASES)
def test_crafted_session_file(outcomes, name):
    assert_typed_error(outcomes[("session", name)], "SessionFileError")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_crafted_chat_template(outcomes, name):
    assert_typed_error(outcomes[("template", name)], ("TemplateRenderError", "TemplateRewriteError"))
