"""The unit plans of the synthetic experiments (lpft-synthetic, sparse-synthetic, smart-synthetic, hmm-exactness):
local worker processes give the tables of a serial run byte for byte; once an executor computed the plan, the run
computes nothing itself (a unit missing from the plan would be computed in the run's process); ``--dry-run`` counts
the planned units per kind, dependencies first."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ftsim.app.executors import ExecutorConfig
from ftsim.app.runner import dry_run, run_experiment
from ftsim.core.cache import UnitCache
from ftsim.core.experiment import RunContext


def _lpft():
    from simulate.lpft import EXPERIMENT, LPFTSyntheticConfig

    # two seeds: a worker computes seed 1 without seed 0 before it; kernel_examples > 0 with the LoRA methods
    cfg = LPFTSyntheticConfig(seeds=(0, 1), kumar_seeds=(0,), kumar_feature_errors=(0.1,), num_train=32, num_val=32,
                              num_test=64, pretrain_steps=40, steps=10, batch_size=16, kernel_examples=4,
                              sweep_scales=(1.0,), sweep_optimizers=("adam",), curve_steps=50)
    kinds = {"wei2021.pretrain": 1, "lpft.world-seed": 2, "lpft.sweep": 2, "lpft.curves": 2, "lpft.kumar": 1}
    return EXPERIMENT, cfg, kinds


def _sparse():
    from simulate.sparse import EXPERIMENT, SparseSyntheticConfig

    cfg = SparseSyntheticConfig(ps=(0.0, 1.0), logistic_n=12, logistic_dim=3, net_n=8, net_width=3, mask_seeds=(0,),
                                seeds=(0, 1), ucurve_seeds=(0, 1, 2), ucurve_ps=(0.005, 0.02, 1.0), ranks=(1, 4),
                                lora_seeds=(0,), kernel_inputs=6, klora_train=12, klora_test=20, klora_steps=10,
                                pretrain_steps=20, d_model=16)
    kinds = {"wei2021.pretrain": 1, "sparse.stability": 2, "sparse.ucurve": 1, "sparse.lora-kernel": 1}
    return EXPERIMENT, cfg, kinds


def _smart():
    from simulate.smart import EXPERIMENT, SmartSyntheticConfig

    cfg = SmartSyntheticConfig(vocab_size=30, latent_dim=3, seq_len=4, embed_dim=6, hidden=8, pretrain_outputs=4,
                               pretrain_examples=256, pretrain_steps=40, k=4, test_size=64, seeds=(0, 1),
                               methods=("ft", "ft-rs-mbpp"), steps=8, batch_size=4, eval_every=4, eval_steps=2,
                               eval_size=16)
    return EXPERIMENT, cfg, {"smart-synthetic.pretrain": 1, "smart-synthetic.finetune": 4}


def _exactness():
    from simulate.verify import EXACTNESS, ExactnessConfig

    return EXACTNESS, ExactnessConfig(num_sequences=500), {"hmm.exactness": 1}


CASES = {"lpft-synthetic": _lpft, "sparse-synthetic": _sparse, "smart-synthetic": _smart, "hmm-exactness": _exactness}
SLOW = ("lpft-synthetic", "sparse-synthetic")
# wall-clock measurements in tables: seconds per step and everything aggregated from it
VOLATILE = {"smart-synthetic": ("comparison", "cost")}


def _params():
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES]


def _tables(run_dir, name: str) -> dict[str, bytes]:
    """Every table of a run (.jsonl, .csv, .md), timing rows left out where a table has them."""
    out = {}
    for p in sorted(run_dir.iterdir()):
        if p.suffix not in (".jsonl", ".csv", ".md") or p.stem in VOLATILE.get(name, ()):
            continue
        data = p.read_bytes()
        if name == "smart-synthetic" and p.stem == "results":
            data = b"\n".join(line for line in data.split(b"\n") if b"seconds_per_step" not in line)
        out[p.name] = data
    return out


def _no_compute_here(monkeypatch):
    """Make any unit computed in this process (not in an executor's worker) fail the test."""
    def refuse(self, key, compute, replace, **kw):
        raise AssertionError(f"unit {key.kind} {key.short} computed by the run: it is missing from the plan")

    monkeypatch.setattr(UnitCache, "_compute", refuse)


@pytest.mark.parametrize("name", _params())
def test_local_workers_give_the_serial_tables_and_the_run_computes_nothing(name, tmp_path, monkeypatch):
    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    experiment, cfg, kinds = CASES[name]()
    experiment = dataclasses.replace(experiment, figures=())  # figures are tested elsewhere; the tables here
    tables = {}
    for exe in (ExecutorConfig("serial"), ExecutorConfig("local", jobs=2, threads=1)):
        root = tmp_path / exe.name
        cache = UnitCache(root / "cache")
        if exe.name == "local":
            _no_compute_here(monkeypatch)
        run_dir, summary = run_experiment(experiment, cfg, preset="test", root=root, cache=cache, device="cpu",
                                          progress=False, executor=exe)
        tables[exe.name] = _tables(run_dir, name)
    planned = {u["digest"] for u in json.loads((run_dir / "units_plan.json").read_text())["units"]}
    used = {u["digest"] for u in json.loads((run_dir / "units.json").read_text())}
    assert summary["executor"]["failed"] == [] and summary["executor"]["computed"] == sum(kinds.values())
    assert used <= planned
    assert all(k["cached"] == k["units"] for k in dry_run(experiment, cfg, device="cpu", cache=cache)["kinds"].values())
    assert tables["serial"] == tables["local"]
    assert len(tables["serial"]) >= 2


@pytest.mark.parametrize("name", list(CASES))
def test_dry_run_counts_the_planned_units_per_kind_dependencies_first(name, tmp_path):
    experiment, cfg, kinds = CASES[name]()
    plan = dry_run(experiment, cfg, device="cpu", cache=UnitCache(tmp_path))
    assert {k: v["units"] for k, v in plan["kinds"].items()} == kinds
    assert plan["units"] == sum(kinds.values()) and all(v["cached"] == 0 for v in plan["kinds"].values())
    first = next(iter(kinds))  # the unit the others fetch from the cache is planned first
    ctx = RunContext(out_dir=tmp_path, cache=UnitCache(tmp_path), device="cpu", progress=False)
    assert experiment.plan(cfg, ctx)[0].kind == first


def test_a_unit_missing_from_the_plan_is_caught(tmp_path, monkeypatch):
    """The check above has teeth: with an empty plan the run computes its unit itself, and that fails."""
    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    experiment, cfg, _ = _exactness()
    experiment = dataclasses.replace(experiment, figures=(), plan=lambda cfg, ctx: [])
    _no_compute_here(monkeypatch)
    with pytest.raises(AssertionError, match="hmm.exactness .* missing from the plan"):
        run_experiment(experiment, cfg, preset="test", root=tmp_path, cache=UnitCache(tmp_path / "cache"),
                       device="cpu", progress=False, executor=ExecutorConfig("local", jobs=2, threads=1))
