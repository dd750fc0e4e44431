"""Shared fixtures: the real default model, a real long text, and an isolated user world."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per CPU), each worker gets its own share of
    the CPUs. llama.cpp starts a thread per usable CPU and its threads spin-wait for each other:
    two workers each spinning on every CPU would slow each other down many times over, while a
    worker on its own CPU runs as on a smaller machine (its child processes inherit the share)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and count > 1 and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        index = int(worker[2:])
        share = cpus[index::count] or [cpus[index % len(cpus)]]  # more workers than CPUs: they share
        os.sched_setaffinity(0, share)


def pytest_collection_modifyitems(items):
    """The long tests first, the longest (``slow(seconds=N)``, measured under make test) first of all,
    so that workers finish together instead of one waiting on the last."""

    def order(item):
        slow = item.get_closest_marker("slow")
        return (slow is None, -(slow.kwargs.get("seconds", 0) if slow else 0))

    items.sort(key=order)


@pytest.fixture(autouse=True)
def isolated_world(tmp_path_factory, monkeypatch):
    """Caches and the Hub point into a temporary folder; the network is never used."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no accidental network
    # The default model and the corpus stay where set-up put them (git-ignored folders of the checkout).
    monkeypatch.setenv("EDGESINK_MODELS_DIR", str(REPO / "models" / "cache"))
    monkeypatch.setenv("EDGESINK_CORPUS_DIR", os.environ.get("EDGESINK_CORPUS_DIR", str(REPO / "benchmarks" / ".cache")))


@pytest.fixture(scope="session")
def model_path() -> Path:
    from edgesink.fetch.registry import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def model(model_path):
    import edgesink

    m = edgesink.load(model_path)
    yield m
    m.close()


@pytest.fixture(scope="session")
def random_model(tmp_path_factory, model_path):
    """A random-weight F32 llama (tests/random_model.py) with the default model's vocabulary.

    Nothing in it is quantized, so two equal computations agree to float precision, and an error
    such as a key one position off stands far above the noise: on the real (quantized) model the
    same error hides in ~0.5 of logit noise. Tests that must see such errors use this model.
    """
    import edgesink
    from random_model import write_random_llama

    path = write_random_llama(tmp_path_factory.mktemp("rand") / "rand.gguf", model_path)
    with edgesink.load(path) as m:
        yield m


@pytest.fixture(scope="session")
def gemma():
    """Gemma 3 270M, a real sliding-window (iSWA) model; `make test` fetches it, so it is never skipped."""
    import edgesink
    from edgesink.fetch.registry import load_registry

    path = load_registry()["gemma3-270m"].local_path
    assert path.exists(), "set-up fetches it: edgesink pull gemma3-270m"
    with edgesink.load(path) as m:
        yield m


@pytest.fixture(scope="session")
def prose() -> str:
    """Real long English prose (Jane Austen's novels), fetched by set-up."""
    from edgesink.corpus import austen_text

    return austen_text()


@pytest.fixture(scope="session")
def prose_tokens(model, prose) -> list[int]:
    """The first ~260,000 tokens of the prose."""
    return model.tokenize(prose[:1_100_000])


# Figures a test measures and the run should show (e.g. how far two equal computations' logits
# differ): collected by the `measured` fixture, printed after the test summary.
MEASURED: list[str] = []


@pytest.fixture
def measured(request):
    """Call with (label, text) to print a measured figure in this run's summary."""
    return lambda label, text: MEASURED.append(f"{request.node.name}: {label}: {text}")


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured")
        for line in MEASURED:
            terminalreporter.write_line(line)
