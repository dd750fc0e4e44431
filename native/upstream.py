#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source and apply edgesink's patches to it.

The pin lives in ``native/upstream.json``: llama.cpp is taken from the source
distribution of the pinned llama-cpp-python release on PyPI (fetched by name
with pip and checked against its sha256), never from this repository.

Commands:
  prepare --dest DIR [--stock]        extract the pristine tree into DIR as a git
                                      repository and ``git am`` native/patches/*.patch
                                      (--stock: only the patches upstream.json lists in
                                      "stock_patches", fixes that are not about the K-shift)
  sdist                               print the path of the verified sdist (fetching it)
  regenerate --dest DIR               rewrite native/patches/ from the commits made
                                      on top of the pristine tree in DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent
PIN = json.loads((NATIVE_DIR / "upstream.json").read_text())
PATCH_DIR = NATIVE_DIR / "patches"
CACHE_DIR = Path(os.environ.get("EDGESINK_CACHE_DIR", NATIVE_DIR / ".cache"))
PRISTINE_TAG = "upstream"
# Fixed identity and dates so that applying the same patches twice gives the same tree.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "edgesink build",
    "GIT_AUTHOR_EMAIL": "build@edgesink.invalid",
    "GIT_COMMITTER_NAME": "edgesink build",
    "GIT_COMMITTER_EMAIL": "build@edgesink.invalid",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z",
}


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fetch_sdist() -> Path:
    """Return the verified sdist, downloading it with pip when it is not cached."""
    target = CACHE_DIR / PIN["sdist"]
    if target.exists() and sha256_of(target) == PIN["sha256"]:
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    spec = f"{PIN['package']}=={PIN['version']}"
    print(f"edgesink: downloading {spec} source distribution", file=sys.stderr)
    subprocess.run(
        # --no-binary names the package alone: with ":all:" pip would also build the sdist's
        # build requirements (cmake among them) from source just to read its metadata.
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PIN["package"],
         "--disable-pip-version-check", "-d", str(CACHE_DIR), spec],
        check=True, stdout=sys.stderr,
    )
    actual = sha256_of(target)
    if actual != PIN["sha256"]:
        target.unlink()
        sys.exit(f"edgesink: {target.name} has sha256 {actual}, expected {PIN['sha256']}")
    return target


def check_bindings_requirement() -> None:
    """Refuse to build when pyproject.toml asks for other bindings than the pin.

    Package metadata cannot read this file, so pyproject.toml repeats the requirement; this check
    keeps upstream.json the one place that decides it (bindings and library must share the ABI).
    """
    pyproject = NATIVE_DIR.parent / "pyproject.toml"
    if not pyproject.exists():  # an unpacked sdist of this script alone
        return
    wanted = f"{PIN['package']}=={PIN['version']}"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    found = [d for d in dependencies if d.replace("_", "-").startswith(PIN["package"])]
    if found != [wanted]:
        sys.exit(f"edgesink: pyproject.toml requires {found or 'no bindings'}, but native/upstream.json pins "
                 f"{wanted}; make them agree (the pin decides)")


def patch_files(stock: bool = False) -> list[Path]:
    """The patches to apply: all of them, or for the stock build only those in "stock_patches".

    The stock build is the side-by-side reference for the K-shift patches, so it must differ from the
    patched build in those alone: fixes of upstream bugs that would stop it from running at all (on
    some CPUs) apply to both.
    """
    patches = sorted(PATCH_DIR.glob("[0-9][0-9][0-9][0-9]-*.patch"))
    if stock:
        patches = [p for p in patches if p.name[:4] in PIN.get("stock_patches", [])]
    return patches


def tree_fingerprint(stock: bool) -> str:
    """What the prepared tree is made of; a changed fingerprint means re-extract."""
    return "\n".join([PIN["sha256"], *(f"{p.name}:{sha256_of(p)}" for p in patch_files(stock))])


def extract_vendored(sdist: Path, dest: Path) -> None:
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/{PIN['vendored_path']}/"
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(prefix):
                continue
            relative = member.name[len(prefix):]
            parts = Path(relative).parts
            # ".git" is the submodule's pointer to a repository that is not shipped.
            if not relative or relative.startswith("/") or ".." in parts or parts[0] == ".git":
                continue
            member.name = relative
            members.append(member)
        tar.extractall(dest, members=members, filter="data")


def git(dest: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(dest), *args], check=True,
                   env={**os.environ, **GIT_ENV}, stdout=subprocess.DEVNULL)


def extract_pristine(sdist: Path, dest: Path) -> None:
    """Extract the vendored tree into a fresh git repository tagged PRISTINE_TAG."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    extract_vendored(sdist, dest)
    git(dest, "init", "-q")
    git(dest, "add", "-A", "-f")
    git(dest, "commit", "-q", "--no-verify", "-m",
        f"llama.cpp {PIN['llama_cpp_commit']} as vendored by {PIN['package']} {PIN['version']}")
    git(dest, "tag", PRISTINE_TAG)


def prepare(dest: Path, stock: bool) -> None:
    """Make DEST a git repository holding the pinned tree plus patches, unless it already is."""
    stamp = dest / ".git" / "edgesink-stamp"
    fingerprint = tree_fingerprint(stock)
    if stamp.exists() and stamp.read_text() == fingerprint:
        return
    pristine = dest / ".git" / "edgesink-pristine"
    if pristine.exists() and pristine.read_text() == PIN["sha256"]:
        # Same upstream, other patches: reset in place so that unchanged files keep their
        # timestamps and an incremental build recompiles only what the patches touch.
        subprocess.run(["git", "-C", str(dest), "am", "--abort"], capture_output=True)
        git(dest, "reset", "-q", "--hard", PRISTINE_TAG)
        git(dest, "clean", "-q", "-f", "-d", "-x")
    else:
        extract_pristine(fetch_sdist(), dest)
        pristine.write_text(PIN["sha256"])
    for patch in patch_files(stock):
        git(dest, "am", "-q", "--keep-cr", "--committer-date-is-author-date", str(patch))
    stamp.write_text(fingerprint)


def regenerate(dest: Path) -> None:
    """Write the commits on top of the pristine tree back to native/patches/."""
    for old in patch_files():
        old.unlink()
    subprocess.run(
        ["git", "-C", str(dest), "format-patch", "--quiet", "--no-signature", "--zero-commit",
         "--no-stat", "-o", str(PATCH_DIR), f"{PRISTINE_TAG}..HEAD"],
        check=True,
    )
    (dest / ".git" / "edgesink-stamp").write_text(tree_fingerprint(stock=False))
    for patch in patch_files():
        print(patch.relative_to(NATIVE_DIR.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--stock", action="store_true")
    sub.add_parser("sdist")
    r = sub.add_parser("regenerate")
    r.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args()
    check_bindings_requirement()
    if args.command == "prepare":
        prepare(args.dest.resolve(), stock=args.stock)
    elif args.command == "sdist":
        print(fetch_sdist())
    else:
        regenerate(args.dest.resolve())


if __name__ == "__main__":
    main()
