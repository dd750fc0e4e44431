"""Models from the Hugging Face Hub, against a fake Hub on 127.0.0.1 (tests/hub_server.py): no Internet."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from hub_server import FakeHub, split_gguf, write_tiny_gguf

from edgesink.cli import main
from edgesink.errors import ModelLoadError, ModelNotFoundError
from edgesink.fetch.hub import HubSpec, choose_files, hub_cache_dir, parse_spec, pull_model
from edgesink.fetch.resolve import resolve_model

REPO = "acme/tiny-GGUF"
QUANTS = ("Q4_1", "Q4_K_M", "Q4_K_S", "Q8_0")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, Path]:
    """Small real GGUFs, one per quantization name (different bytes each)."""
    folder = tmp_path_factory.mktemp("tiny")
    return {q: write_tiny_gguf(folder / f"tiny-{q}.gguf", n_bytes=1 << 20, seed=i) for i, q in enumerate(QUANTS)}


@pytest.fixture
def online(monkeypatch):
    """huggingface-hub online (whatever the environment says)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(online, monkeypatch, tiny_files, tmp_path):
    """A fake Hub serving REPO (the tiny GGUFs, a README and a projector); HF_ENDPOINT points at it."""
    readme = tmp_path / "README.md"
    readme.write_text("# tiny\n")
    with FakeHub() as server:
        for q, path in tiny_files.items():
            server.add(REPO, f"tiny-{q}.gguf", path)
        server.add(REPO, "mmproj-tiny-Q4_1.gguf", tiny_files["Q8_0"])
        server.add(REPO, "README.md", readme)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


def go_offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface-hub read the variable at import


def test_spec_parsing_and_unsafe_names():
    assert parse_spec("acme/tiny-GGUF:Q4_1") == HubSpec(repo=REPO, quant="Q4_1")
    assert parse_spec("acme/tiny-GGUF") == HubSpec(repo=REPO)
    assert parse_spec("acme/tiny-GGUF/sub/tiny-Q8_0.gguf") == HubSpec(repo=REPO, file="sub/tiny-Q8_0.gguf")
    for bad in ("acme/x/../../etc/passwd.gguf", "acme/x/sub/../../y.gguf"):
        with pytest.raises(ModelLoadError, match="unsafe"):
            parse_spec(bad)
    for not_spec in ("./a/b.gguf", "/abs/a/b.gguf", "a", "a/b/c.txt", "a b/c"):
        with pytest.raises(ValueError):
            parse_spec(not_spec)
    for listing in (["../x-Q4_1.gguf"], ["/abs/x-Q4_1.gguf"], ["sub\\..\\x-Q4_1.gguf"]):
        with pytest.raises(ModelLoadError, match="unsafe"):
            choose_files(listing, HubSpec(REPO, quant="Q4_1"))


def test_quant_choice_from_a_listing():
    files = [f"m-{q}.gguf" for q in QUANTS] + ["mmproj-m-Q4_1.gguf", "m-Q5_0-00002-of-00002.gguf",
                                                 "m-Q5_0-00001-of-00002.gguf", "README.md"]
    assert choose_files(files, HubSpec(REPO, quant="q4_1")) == ["m-Q4_1.gguf"]
    assert choose_files(files, HubSpec(REPO)) == ["m-Q4_K_M.gguf"]  # llama.cpp's default
    assert choose_files(files, HubSpec(REPO, quant="Q4_K_S")) == ["m-Q4_K_S.gguf"]
    assert choose_files(files, HubSpec(REPO, quant="Q5_0")) == ["m-Q5_0-00001-of-00002.gguf", "m-Q5_0-00002-of-00002.gguf"]
    assert choose_files(["only.gguf"], HubSpec(REPO)) == ["only.gguf"]
    with pytest.raises(ModelNotFoundError, match="Q6_K.*m-Q4_1.gguf"):
        choose_files(files, HubSpec(REPO, quant="Q6_K"))


def test_quant_selection_fetches_only_that_file(hub, tiny_files, tmp_path):
    path = pull_model(f"{REPO}:Q4_1")
    assert path.name == "tiny-Q4_1.gguf"
    assert sha256(path) == sha256(tiny_files["Q4_1"])
    assert path.is_relative_to(hub_cache_dir()) and str(hub_cache_dir()).startswith(str(Path.home()))  # HF_HOME
    fetched = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    assert fetched == {"tiny-Q4_1.gguf"}
    # The default quantization, and a named file, through the same path as every command.
    assert resolve_model(REPO).name == "tiny-Q4_K_M.gguf"
    assert resolve_model(f"{REPO}/tiny-Q8_0.gguf").name == "tiny-Q8_0.gguf"
    with pytest.raises(ModelNotFoundError, match="Q6_K"):
        pull_model(f"{REPO}:Q6_K")
    with pytest.raises(ModelNotFoundError, match="not on the Hub"):
        pull_model("acme/nothing-here:Q4_1")


def test_split_files_fetched_whole(hub, tmp_path):
    parts = [write_tiny_gguf(tmp_path / f"big-Q4_1-0000{i}-of-00003.gguf", seed=10 + i) for i in (1, 2, 3)]
    for p in parts:
        hub.add("acme/big-GGUF", p.name, p)
    path = pull_model("acme/big-GGUF:Q4_1")
    assert path.name == "big-Q4_1-00001-of-00003.gguf"
    for p in parts:  # every part sits next to the first, where llama.cpp looks for them
        assert sha256(path.parent / p.name) == sha256(p)


def test_split_real_model_loads_from_the_first_part(online, monkeypatch, model_path, tmp_path):
    """A split GGUF of the default model, served by the fake Hub, runs through the CLI."""
    greedy = ["-p", "The capital of France is", "--n-ctx", "64", "--max-tokens", "4", "--top-k", "1", "--threads", "1"]
    parts = split_gguf(model_path, tmp_path / "SmolLM2-135M-Instruct-Q4_1.gguf")
    assert [p.name[-20:] for p in parts] == ["-00001-of-00002.gguf", "-00002-of-00002.gguf"]
    with FakeHub() as server:
        for p in parts:
            server.add("acme/smol-split-GGUF", p.name, p)
        server.add("acme/smol-split-GGUF", "SmolLM2-135M-Instruct-Q8_0.gguf", write_tiny_gguf(tmp_path / "q8.gguf"))
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        result = CliRunner().invoke(main, ["generate", "acme/smol-split-GGUF:Q4_1", *greedy])
    assert result.exit_code == 0, result.output
    # Greedy: the same text as the whole file gives, so the parts were put back together whole.
    whole = CliRunner().invoke(main, ["generate", str(model_path), *greedy])
    assert whole.exit_code == 0 and whole.output.strip(), whole.output
    assert result.output == whole.output


def test_resume_after_a_cut_connection(hub, model_path):
    """The first transfer of the default model stops half-way; the pull resumes it with a Range
    request (huggingface-hub keeps what it received in 10 MiB pieces) and the file is whole."""
    hub.add("acme/smol-GGUF", "smol-Q4_1.gguf", model_path)
    hub.cut["smol-Q4_1.gguf"] = 1
    path = pull_model("acme/smol-GGUF:Q4_1")
    assert sha256(path) == sha256(model_path)
    first, second = hub.gets("smol-Q4_1.gguf")
    assert first is None
    assert second is not None and second.startswith("bytes=")
    resumed_at = int(second.removeprefix("bytes=").split("-")[0])
    assert 0 < resumed_at <= model_path.stat().st_size // 2  # where the cut left it, not from the start
    assert not list(path.resolve().parent.glob("*.incomplete"))


def test_sha256_mismatch_is_refused_and_removed(hub, tiny_files, tmp_path):
    lying = tmp_path / "lying.gguf"
    lying.write_bytes(tiny_files["Q4_1"].read_bytes())
    hub.add("acme/lying-GGUF", "lying-Q4_1.gguf", lying, claimed_sha256="ab" * 32)
    for _ in range(2):  # and the second try does not find a bad file in the cache
        with pytest.raises(ModelLoadError, match="sha256 does not match"):
            pull_model("acme/lying-GGUF:Q4_1")
    assert not [p for p in hub_cache_dir().rglob("*lying*") if p.is_file() or p.is_symlink()]
    assert not [p for p in hub_cache_dir().rglob("blobs/*") if p.is_file()]
    assert len(hub.gets("lying-Q4_1.gguf")) == 2


def test_offline_with_a_warm_cache(hub, monkeypatch):
    path = pull_model(f"{REPO}:Q4_1")
    hub.requests.clear()
    go_offline(monkeypatch)
    assert resolve_model(f"{REPO}:Q4_1") == path
    assert pull_model(f"{REPO}/tiny-Q4_1.gguf") == path
    assert hub.requests == []  # offline means no request at all


def test_hub_unreachable_falls_back_to_the_cache(hub, monkeypatch):
    path = pull_model(f"{REPO}:Q4_1")
    hub.stop()  # nothing listens any more: connection refused
    assert resolve_model(f"{REPO}:Q4_1") == path
    with pytest.raises(ModelNotFoundError, match=r"cannot be reached.*edgesink pull acme/tiny-GGUF:Q8_0"):
        resolve_model(f"{REPO}:Q8_0")


def test_offline_with_an_empty_cache_names_the_fetch_command(online, monkeypatch):
    go_offline(monkeypatch)
    with pytest.raises(ModelNotFoundError, match=r"acme/tiny-GGUF:Q4_1.*'edgesink pull acme/tiny-GGUF:Q4_1'"):
        resolve_model(f"{REPO}:Q4_1")
    result = CliRunner().invoke(main, ["generate", f"{REPO}:Q4_1", "-p", "x"])
    assert result.exit_code == 1
    assert "edgesink pull acme/tiny-GGUF:Q4_1" in result.output and "Traceback" not in result.output


def test_unsafe_names_from_the_repo_are_refused(hub, tiny_files, tmp_path):
    for name in ("../escape-Q4_1.gguf", "/abs/escape-Q4_1.gguf"):
        hub.repos.pop("acme/evil-GGUF", None)
        hub.add("acme/evil-GGUF", name, tiny_files["Q4_1"])
        with pytest.raises(ModelLoadError, match="unsafe"):
            pull_model("acme/evil-GGUF:Q4_1")
    assert hub.gets("escape-Q4_1.gguf") == []
    assert not list(Path(tmp_path.anchor).glob("escape*")) and not list(hub_cache_dir().parent.rglob("escape*"))


def test_pull_and_models_commands(hub):
    runner = CliRunner()
    result = runner.invoke(main, ["pull", f"{REPO}:Q4_K_S"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("tiny-Q4_K_S.gguf")
    result = runner.invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    assert re.search(r"acme/tiny-GGUF/tiny-Q4_K_S.gguf +1\.0 MB", result.output)
    result = runner.invoke(main, ["pull", "acme/nothing-here"])
    assert result.exit_code == 1 and "not on the Hub" in result.output


def test_registry_models_come_from_the_hub_and_are_checked(hub, tiny_files, monkeypatch):
    from edgesink.fetch import hub as hub_module
    from edgesink.fetch import resolve
    from edgesink.fetch.registry import RegistryEntry

    good = sha256(tiny_files["Q4_1"])
    entries = {name: RegistryEntry(name=name, description="test", repo=REPO, file="tiny-Q4_1.gguf", sha256=sha,
                                   license="MIT", n_ctx_train=2048)
               for name, sha in (("tiny", good), ("tiny-wrong", "cd" * 32))}
    for module in (hub_module, resolve):
        monkeypatch.setattr(module, "load_registry", lambda: entries)
    with pytest.raises(ModelLoadError, match="sha256"):
        pull_model("tiny-wrong")  # the registry's sha256 is checked too
    assert sha256(resolve_model("tiny")) == good
    go_offline(monkeypatch)
    assert sha256(resolve_model("tiny")) == good
    monkeypatch.setenv("HF_HOME", str(Path.home() / "empty"))
    with pytest.raises(ModelNotFoundError, match="'edgesink pull tiny'"):
        resolve_model("tiny")


def test_a_mismatch_never_deletes_a_file_outside_the_cache(hub, tmp_path):
    """A cache entry that links to a file elsewhere: only the link goes, never the file it names."""
    path = pull_model(f"{REPO}:Q4_1")
    precious = tmp_path / "precious.gguf"
    precious.write_bytes(b"not the Hub's file" * 100)
    path.unlink()
    path.symlink_to(precious)
    with pytest.raises(ModelLoadError, match="sha256 does not match"):
        pull_model(f"{REPO}:Q4_1")
    assert precious.read_bytes() == b"not the Hub's file" * 100
    assert not path.is_symlink() and not path.exists()
    assert pull_model(f"{REPO}:Q4_1") == path and path.exists()  # the next pull fetches it again


@pytest.mark.parametrize("files, spec, message", [
    (["m-Q4_1-00001-of-00000.gguf"], HubSpec(REPO, quant="Q4_1"), r"m-Q4_1-00001-of-00000.gguf.*part 1 of 0"),
    (["m-Q4_1-00002-of-00001.gguf"], HubSpec(REPO, file="m-Q4_1-00002-of-00001.gguf"), r"part 2 of 1"),
    (["m-Q4_1-00000-of-00002.gguf", "m-Q4_1-00002-of-00002.gguf"], HubSpec(REPO, file="m-Q4_1-00000-of-00002.gguf"),
     r"part 0 of 2"),
    (["m-Q4_1-00001-of-00003.gguf", "m-Q4_1-00003-of-00003.gguf"], HubSpec(REPO, quant="Q4_1"),
     r"lacks m-Q4_1-00002-of-00003.gguf"),
    (["m-Q4_1-00003-of-00003.gguf"], HubSpec(REPO, file="m-Q4_1-00003-of-00003.gguf"),
     r"lacks m-Q4_1-00001-of-00003.gguf, m-Q4_1-00002-of-00003.gguf"),
])
def test_malformed_split_names_are_refused(files, spec, message):
    with pytest.raises(ModelNotFoundError, match=message):
        choose_files(files, spec)


def test_pull_of_a_malformed_split_says_why(hub, tiny_files):
    hub.add("acme/zero-GGUF", "tiny-Q4_1-00001-of-00000.gguf", tiny_files["Q4_1"])
    hub.add("acme/gap-GGUF", "tiny-Q4_1-00001-of-00003.gguf", tiny_files["Q4_1"])
    hub.add("acme/gap-GGUF", "tiny-Q4_1-00003-of-00003.gguf", tiny_files["Q8_0"])
    for spec, message in (("acme/zero-GGUF:Q4_1", "part 1 of 0"), ("acme/gap-GGUF:Q4_1", "lacks tiny-Q4_1-00002")):
        result = CliRunner().invoke(main, ["pull", spec])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
        assert message in result.output and "Traceback" not in result.output
        assert result.output.count("\n") == 1
    assert not [m for m, p, _ in hub.requests if "/resolve/" in p]  # refused before any transfer


def test_models_lists_a_split_whose_cached_parts_are_incomplete(hub, tmp_path):
    parts = [write_tiny_gguf(tmp_path / f"big-Q4_1-0000{i}-of-00003.gguf", seed=10 + i) for i in (1, 2, 3)]
    for p in parts:
        hub.add("acme/big-GGUF", p.name, p)
    path = pull_model("acme/big-GGUF:Q4_1")
    (path.parent / parts[1].name).unlink()
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    assert f"acme/big-GGUF/{parts[0].name}" in result.output


def test_a_relative_model_path_comes_back_absolute(tmp_path, monkeypatch):
    """A path typed relative to the user's folder keeps naming the file where the benchmark's worker
    processes run (another folder): it is made absolute where it enters."""
    (tmp_path / "models").mkdir()
    model_file = tmp_path / "models" / "mine.gguf"
    model_file.write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    resolved = resolve_model("models/mine.gguf")
    assert resolved.is_absolute() and resolved == model_file.resolve()
    monkeypatch.chdir("/")
    assert resolved.exists()
