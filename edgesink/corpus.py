"""The default long-text corpus: Jane Austen's six novels (public domain, about 720,000 words).

They are shipped by Debian's ``r-cran-janeaustenr`` package as an R lazy-load database. The
package is fetched by name with ``apt-get download`` (nothing is installed), the novels are read
out of R's serialization format (character vectors of lines, nothing else), joined in order of
publication and cached as UTF-8 text. The text is never committed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

from .errors import CorpusError
from .filecache import cache_dir

DEBIAN_PACKAGE = "r-cran-janeaustenr"
DEBIAN_VERSION = "1.0.0-1"
RDB_MEMBER = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
PUBLICATION_ORDER = ["SENSE AND SENSIBILITY", "PRIDE AND PREJUDICE", "MANSFIELD PARK", "EMMA",
                     "NORTHANGER ABBEY", "PERSUASION"]
CORPUS_SHA256 = "32432b75ad045648fc586b923f9d38cddee6ecfa14cfe8968b9a028c36a19c23"  # 717,537 words
CACHE_ENV = "EDGESINK_CORPUS_DIR"


def corpus_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    source = Path(__file__).resolve().parent.parent / "benchmarks"
    return source / ".cache" if source.exists() else cache_dir() / "corpus"


def austen_path() -> Path:
    """The cached corpus, fetching and extracting it on first use."""
    target = corpus_dir() / "austen.txt"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        text = extract_novels(_download_deb(target.parent))
        if sha256_text(text) != CORPUS_SHA256:
            raise CorpusError(f"the text extracted from {DEBIAN_PACKAGE} {DEBIAN_VERSION} is not the expected one")
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    return target


def austen_text() -> str:
    return austen_path().read_text(encoding="utf-8")


def _download_deb(folder: Path) -> Path:
    spec = f"{DEBIAN_PACKAGE}={DEBIAN_VERSION}"
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        for attempt in range(2):
            result = subprocess.run(["apt-get", "download", "-q", spec], cwd=tmp, capture_output=True, text=True)
            if result.returncode == 0:
                break
            if attempt == 0:  # a fresh machine may have no package lists yet
                subprocess.run(["apt-get", "update", "-q"], capture_output=True)
        else:
            raise CorpusError(f"apt-get download {spec} failed: {result.stderr.strip()}")
        deb = next(Path(tmp).glob("*.deb"))
        extracted = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(extracted)], check=True)
        rdb = folder / "janeaustenr.rdb"
        shutil.copyfile(extracted / RDB_MEMBER, rdb)
    return rdb


def extract_novels(rdb: Path) -> str:
    """The novels in a janeaustenr lazy-load database, in order of publication, as one text."""
    books = {}
    for vector in _character_vectors(rdb.read_bytes()):
        title = vector[0].strip().upper()
        books[title] = "\n".join(vector)
    missing = [t for t in PUBLICATION_ORDER if t not in books]
    if missing:
        raise CorpusError(f"{rdb} lacks {', '.join(missing)}")
    return "\n\n\n".join(books[t] for t in PUBLICATION_ORDER) + "\n"


def _character_vectors(data: bytes):
    """Each object of an R lazy-load database that is a character vector, as a list of str."""
    offset = 0
    while offset < len(data):
        inflater = zlib.decompressobj()
        blob = inflater.decompress(data[offset + 4:])
        offset = len(data) - len(inflater.unused_data)
        vector = _read_strsxp(blob)
        if vector is not None:
            yield vector


def _read_strsxp(blob: bytes) -> list[str] | None:
    # R's XDR serialization: "X\n", version, R version, min version [, native encoding], item.
    if blob[:2] != b"X\n":
        raise CorpusError("not an R serialization in XDR format")
    version = struct.unpack_from(">i", blob, 2)[0]
    pos = 14
    if version == 3:
        pos += 4 + struct.unpack_from(">i", blob, pos)[0]
    flags, length = struct.unpack_from(">ii", blob, pos)
    if flags & 0xFF != 16:  # STRSXP
        return None
    pos += 8
    lines = []
    for _ in range(length):
        _, n = struct.unpack_from(">ii", blob, pos)
        pos += 8
        if n < 0:  # NA_character_
            lines.append("")
            continue
        lines.append(blob[pos:pos + n].decode("utf-8", errors="replace"))
        pos += n
    return lines


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
