"""Shared test configuration: hypothesis profiles, and the rule for tests that need real models or data.

Profiles: ``dev`` (random examples) and ``ci`` (derandomized: the same examples on every run, so a red CI is
reproducible). ``HYPOTHESIS_PROFILE`` picks one; without it, ``CI=true`` (and ``make test``, which sets the
profile itself) means ``ci``, so ``CI=true make test`` runs exactly what CI runs.

Real-model and real-data tests never skip silently in CI: with ``CI=true`` a missing model or data
directory is a failure that says what is missing; elsewhere it is a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

settings.register_profile("dev", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=30, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if IN_CI else "dev"))
REPO = Path(__file__).resolve().parents[1]


def require(condition: bool, what: str) -> None:
    """Skip when ``what`` is missing, except in CI, where it is a failure."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"CI=true but {what} is missing: this test must run in CI (see README, Set-up)")
    pytest.skip(f"{what} is missing")


def shared_data_dir() -> Path:
    """The real text-classification data: $FTSIM_DATA or ../shared/data/text_classification."""
    env = os.environ.get("FTSIM_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "text_classification"


@pytest.fixture
def real_data_dir() -> Path:
    path = shared_data_dir()
    require(path.is_dir() and any(path.iterdir()), f"the real data directory {path}")
    return path


# A tiny sent-conv style SST-2 for the real-task pipelines on tiny models (malladi, sparse, smart).
POS = ["a fun and moving film", "I liked it a lot", "great acting and a sharp plot", "warm , funny and smart",
       "the best film of the year", "a delight from start to end", "moving and fun", "sharp and warm"]
NEG = ["a dull and boring movie", "the plot was thin", "boring , slow and flat", "a mess of a film",
       "the worst film of the year", "flat acting and a dull plot", "slow and dull", "thin and flat"]


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """A sent-conv style SST-2 with 16 training and 8 test sentences (:data:`POS`, :data:`NEG`)."""
    d = tmp_path / "data"
    d.mkdir()
    lines = [f"1 {s} .\n" for s in POS] + [f"0 {s} .\n" for s in NEG]
    (d / "stsa.binary.train").write_text("".join(lines))
    (d / "stsa.binary.dev").write_text("".join(lines[::2]))
    return d


@pytest.fixture
def results_tmp(tmp_path, monkeypatch) -> Path:
    """Point $FTSIM_RESULTS and $FTSIM_CACHE at a temporary directory for the test."""
    monkeypatch.setenv("FTSIM_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("FTSIM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "results"


@pytest.fixture
def one_torch_thread():
    """Run a test with one torch and one BLAS thread (ftsim.core.threads): tiny tensors gain nothing from threads,
    and on the shared 2-core machine spinning OpenMP workers only add synchronisation."""
    import torch  # noqa: F401 -- limit_threads sets torch's pool only if torch is imported

    from ftsim.core.threads import limit_threads

    with limit_threads(1):
        yield


@pytest.fixture(autouse=True)
def _progress_defaults():
    """Commands run in-process may switch progress bars off (``--no-progress``): restore the default after each
    test."""
    from ftsim.core import progress

    yield
    progress.configure(None)
