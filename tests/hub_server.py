"""A small stand-in for the Hugging Face Hub on 127.0.0.1, for tests without Internet.

It speaks the parts of the Hub protocol that huggingface-hub uses to fetch a file:

* ``GET /api/models/{repo}[/revision/{rev}]``: the repo's file list (``siblings``), with sizes and
  LFS sha256 when ``blobs=true`` is asked (``files_metadata=True``);
* ``HEAD /{repo}/resolve/{rev}/{file}``: ETag, X-Linked-Etag, X-Linked-Size, X-Repo-Commit,
  Content-Length; ``GET`` of the same URL serves the bytes, honouring ``Range: bytes=a-[b]``.

Errors carry the ``X-Error-Code`` header the real Hub sends (RepoNotFound, EntryNotFound).
``cut[name] = n`` makes the next n transfers of a file stop half-way by closing the connection.
Every request is recorded in ``requests`` as (method, path, Range header or None).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

API_RE = re.compile(r"^/api/models/([^/]+/[^/]+?)(?:/revision/([^/]+))?$")
RESOLVE_RE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class HubFile:
    source: Path  # the bytes served
    size: int
    sha256: str  # what the Hub claims (the real one unless a test lies)


class FakeHub:
    """The fake Hub's content and its HTTP server; use as a context manager."""

    def __init__(self):
        self.repos: dict[str, dict[str, HubFile]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- content ---------------------------------------------------------------------------

    def add(self, repo: str, name: str, source: Path, claimed_sha256: str | None = None) -> HubFile:
        """Serve ``source`` as ``name`` in ``repo`` (claiming another sha256 if asked)."""
        sha = claimed_sha256 or hashlib.sha256(source.read_bytes()).hexdigest()
        entry = HubFile(source=source, size=source.stat().st_size, sha256=sha)
        self.repos.setdefault(repo, {})[name] = entry
        return entry

    def commit(self, repo: str) -> str:
        listing = json.dumps(sorted((n, f.sha256) for n, f in self.repos[repo].items()))
        return hashlib.sha1(f"{repo}\n{listing}".encode()).hexdigest()

    def gets(self, name: str) -> list[str | None]:
        """The Range headers of the GETs of a file, in order (None: the whole file)."""
        return [rng for method, path, rng in self.requests if method == "GET" and unquote(path).endswith("/" + name)]

    # -- server ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: once stopped, the fake Hub is unreachable
    fake: FakeHub

    def log_message(self, format, *args):  # quiet
        pass

    def do_HEAD(self):
        self._handle(body=False)

    def do_GET(self):
        self._handle(body=True)

    def _handle(self, body: bool) -> None:
        url = urlsplit(self.path)
        with self.fake._lock:
            self.fake.requests.append((self.command, url.path, self.headers.get("Range")))
        if match := API_RE.match(url.path):
            self._model_info(unquote(match.group(1)), parse_qs(url.query), body)
        elif match := RESOLVE_RE.match(url.path):
            self._resolve(unquote(match.group(1)), unquote(match.group(3)), body)
        else:
            self._error(404, "RepoNotFound", "no such page")

    def _model_info(self, repo: str, query: dict, body: bool) -> None:
        files = self.fake.repos.get(repo)
        if files is None:
            return self._error(404, "RepoNotFound", f"Repository {repo} not found")
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for name, f in sorted(files.items()):
            sibling = {"rfilename": name}
            if blobs:
                sibling.update(size=f.size, blobId=hashlib.sha1(f.sha256.encode()).hexdigest(),
                               lfs={"size": f.size, "sha256": f.sha256, "pointerSize": 134})
            siblings.append(sibling)
        data = json.dumps({"_id": "0" * 24, "id": repo, "modelId": repo, "sha": self.fake.commit(repo),
                           "private": False, "tags": ["gguf"], "siblings": siblings}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _resolve(self, repo: str, name: str, body: bool) -> None:
        files = self.fake.repos.get(repo)
        if files is None:
            return self._error(404, "RepoNotFound", f"Repository {repo} not found")
        f = files.get(name)
        if f is None:
            return self._error(404, "EntryNotFound", f"{name} not in {repo}", commit=self.fake.commit(repo))
        start, end = 0, f.size - 1
        rng = self.headers.get("Range")
        if rng and (m := RANGE_RE.match(rng.strip())):
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else f.size - 1
            if start >= f.size:
                return self._error(416, None, "range not satisfiable")
            end = min(end, f.size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
        else:
            rng = None
            self.send_response(200)
        length = end - start + 1
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{f.sha256}"')
        self.send_header("X-Linked-Etag", f'"{f.sha256}"')
        self.send_header("X-Linked-Size", str(f.size))
        self.send_header("X-Repo-Commit", self.fake.commit(repo))
        self.end_headers()
        if not body:
            return
        with self.fake._lock:
            cut = self.fake.cut.get(name, 0) > 0
            if cut:
                self.fake.cut[name] -= 1
        to_send = length // 2 if cut else length
        with open(f.source, "rb") as src:
            src.seek(start)
            while to_send > 0:
                chunk = src.read(min(1 << 20, to_send))
                if not chunk:
                    break
                self.wfile.write(chunk)
                to_send -= len(chunk)
        self.wfile.flush()
        if cut:  # drop the connection mid-body, as a broken network does
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


# -- GGUF files to serve -----------------------------------------------------------------------

def write_tiny_gguf(path: Path, n_bytes: int = 1 << 16, seed: int = 0) -> Path:
    """A small valid GGUF (metadata and one int8 tensor of random bytes); not a runnable model."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(path.stem)
    writer.add_tensor("data", np.random.default_rng(seed).integers(-128, 128, n_bytes, dtype=np.int8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def split_gguf(source: Path, first_part: Path, n_parts: int = 2) -> list[Path]:
    """Write ``source`` as a split GGUF (``first_part`` names ...-00001-of-0000N.gguf's stem) that
    llama.cpp loads from its first part."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(first_part, arch, split_max_tensors=-(-len(reader.tensors) // n_parts))
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return sorted(first_part.parent.glob(f"{first_part.stem}-*-of-*.gguf"))
