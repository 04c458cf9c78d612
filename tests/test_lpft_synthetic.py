"""The synthetic LP-FT worlds and the ``lpft-synthetic`` experiment end to end (a small config), and every claim of
``ftsim verify lpft`` (the same functions the verifier runs)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from ftsim.core.io import read_jsonl


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    from ftsim.core.threads import limit_threads

    with limit_threads(1):
        yield


def test_tilted_start_moves_mass_to_one_half():
    from simulate.lpft import _tilted_start

    start = np.full(10, 0.1)
    a, b = _tilted_start(start, 0, 3.0), _tilted_start(start, 1, 3.0)
    assert a.sum() == pytest.approx(1.0) and b.sum() == pytest.approx(1.0)
    # e^3 / (e^3 + 1) of the mass on the favoured half
    assert a[:5].sum() == pytest.approx(np.exp(3) / (np.exp(3) + 1)) and b[5:].sum() == pytest.approx(a[:5].sum())


SMALL = dict(seeds=(0,), kumar_seeds=(0, 1), kumar_feature_errors=(0.1,), num_train=64, num_val=64, num_test=128,
             pretrain_steps=60, steps=20, batch_size=16, kernel_examples=4, sweep_scales=(1.0,),
             sweep_optimizers=("adam",), curve_steps=100)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from ftsim.app.runner import run_experiment
    from ftsim.core.cache import UnitCache
    from simulate.lpft import EXPERIMENT, LPFTSyntheticConfig

    root = tmp_path_factory.mktemp("lpft-synthetic")
    cache = UnitCache(root / "cache" / "units")
    cfg = LPFTSyntheticConfig(**SMALL)
    run_dir, summary = run_experiment(EXPERIMENT, cfg, root=root, cache=cache, progress=False, device="cpu")
    return run_dir, summary, cfg, root, cache


def _value(rows, method, metric):
    got = [r["value"] for r in rows if r["method"] == method and r["metric"] == metric]
    assert got, (method, metric)
    return got[0]


@pytest.mark.slow
def test_synthetic_run_writes_every_table(small_run):
    run_dir, summary, *_ = small_run
    for name in ("results", "head_norm_history", "reliability", "head_scale_sweep", "head_norm_curves", "kumar"):
        assert read_jsonl(run_dir / f"{name}.jsonl"), name
    assert summary["figure_errors"] == [] and (run_dir / "lpft.png").is_file()
    assert "LP-FT" in (run_dir / "comparison.md").read_text()


@pytest.mark.slow
def test_synthetic_run_relations_that_must_hold(small_run):
    run_dir, *_ = small_run
    rows = read_jsonl(run_dir / "results.jsonl")
    # LP-FT starts from the probe: its head norm at the start is the probe's (float32 copy of a float64 fit)
    assert _value(rows, "LP-FT", "head_norm_start") == pytest.approx(_value(rows, "LP", "head_norm_end"), rel=1e-6)
    # the head part of the eNTK, delta (phi^T phi' + 1), depends on the features at theta_0 only: equal for every
    # method whatever its head or adapter
    traces = {m: _value(rows, m, "kernel_trace_head") for m in ("FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT")}
    assert max(traces.values()) == pytest.approx(min(traces.values()), rel=1e-9)
    # the backbone part scales with the head norm squared: LP-FT's over FT's is (||V_LP|| / ||V_rand||)^2 only if
    # J were shared; here we check the weaker, exact consequence that a zero-norm head has no backbone part
    assert _value(rows, "LP", "feature_change_test") == 0.0
    assert _value(rows, "Bayes", "id_acc") == 1.0 and _value(rows, "Bayes", "ood_acc") == 1.0
    for m in ("FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT"):
        assert _value(rows, m, "ece_ts") >= 0 and _value(rows, m, "temperature") > 0
    kumar = read_jsonl(run_dir / "kumar.jsonl")
    assert max(r["perp_feature_change"] for r in kumar) <= 1e-10


@pytest.mark.slow
def test_synthetic_rerun_is_cached_and_identical(small_run):
    from ftsim.app.runner import run_experiment
    from simulate.lpft import EXPERIMENT

    run_dir, summary, cfg, root, cache = small_run
    before = (run_dir / "results.jsonl").read_bytes()
    run_dir2, summary2 = run_experiment(EXPERIMENT, cfg, root=root, cache=cache, progress=False, device="cpu")
    assert run_dir2 == run_dir and (run_dir / "results.jsonl").read_bytes() == before
    used = json.loads((run_dir / "units.json").read_text())
    assert all(u["read_seconds"] < 5 for u in used)  # every unit read back, none recomputed


def test_zero_head_has_no_backbone_kernel():
    """With V = 0 the backbone part V J J^T V^T vanishes exactly (the engine, not the closed form)."""
    import torch

    from simulate.lpft import _decomposition_errors, mlp_world

    module = mlp_world(0, hidden=6).make()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    names = [n for n, _ in module.named_parameters() if n.startswith("backbone.")]
    e = _decomposition_errors(module, x, names)
    assert float(e["kernel"].backbone.abs().max()) == 0.0


def test_config_validation():
    from ftsim.core.errors import InputError
    from simulate.lpft import LPFTSyntheticConfig

    with pytest.raises(InputError) as e:
        LPFTSyntheticConfig(sweep_optimizers=("rmsprop",))
    assert e.value.field == "sweep_optimizers"
    assert dataclasses.replace(LPFTSyntheticConfig(), steps=3).steps == 3


def _claims():
    from simulate.lpft import VERIFIER

    return VERIFIER.claims


@pytest.mark.slow
@pytest.mark.parametrize("claim", _claims(), ids=lambda f: f.__name__)
def test_verifier_claim_holds(claim):
    got = claim(True, 0)
    for c in [got] if hasattr(got, "passed") else got:
        assert c.passed, f"{c.claim}: {c.measured}"
        assert c.setting and c.measured and c.source
