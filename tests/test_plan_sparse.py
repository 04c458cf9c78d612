"""``ftsim run sparse`` through its unit plan (real_tasks/sparse.py) on the tiny causal LM: local worker processes
give the serial run's tables byte for byte, the run gathers exactly the units the executor computed, and
``--dry-run`` counts the planned units per kind."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from ftsim.app.cli import main
from ftsim.app.runner import status
from ftsim.core.io import read_jsonl
from tests.conftest import NEG, POS
from tests.test_sparse_real import TINY

# Every table the run writes (<name>.jsonl and <name>.csv), besides comparison.md and splits.json.
TABLES = ("results", "comparison", "stability", "kernel_rank", "klora")
# With TINY on the quick preset: 12 (family, p) per whole training set -- the 7 swept families at p = 0.1 (p = 1 is
# FullTuning) and full, bitfit, adapter, lora, lora-sgd once -- on 2 seeds, plus quick's 6 perturbed families
# (full, random, bitfit, sam, diffpruning, lora at p = 0.1) on seed 13's one perturbed set; K-LoRA per seed; one
# kernel-distance curve.
UNITS = {"sparse.finetune": 2 * 12 + 6, "sparse.klora": 2, "sparse.kernel-rank": 1}


def _data(folder: Path) -> Path:
    """The ``task_dir`` fixture's data (tests/conftest.py), for a module-scoped fixture."""
    folder.mkdir()
    lines = [f"1 {s} .\n" for s in POS] + [f"0 {s} .\n" for s in NEG]
    (folder / "stsa.binary.train").write_text("".join(lines))
    (folder / "stsa.binary.dev").write_text("".join(lines[::2]))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The run directory of the serial run and of the run on two local workers, each with a cache of its own (so
    the workers compute every unit), one torch thread per unit (float32 reductions depend on the thread count)."""
    tmp = tmp_path_factory.mktemp("plan-sparse")
    args = ["run", "sparse", "--preset", "quick", "--data-dir", str(_data(tmp / "data")), *TINY, "--threads", "1"]
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("FTSIM_CACHE", raising=False)
        for name, flags in (("serial", ["--executor", "serial"]), ("local", ["--executor", "local", "--jobs", "2"])):
            assert main([*args, "--out", str(tmp / name), *flags]) == 0
            out[name] = next((tmp / name / "sparse").glob("*/summary.json")).parent
    return out


def _without(text: str, column: str, fmt: str) -> list[dict]:
    """The rows of a table's text (JSONL or CSV) without ``column``."""
    rows = [json.loads(line) for line in text.splitlines()] if fmt == "jsonl" else csv.DictReader(io.StringIO(text))
    return [{k: v for k, v in r.items() if k != column} for r in rows]


@pytest.mark.slow
def test_local_workers_give_the_serial_tables_byte_for_byte(runs):
    serial, local = runs["serial"], runs["local"]
    assert {p.stem for p in serial.glob("*.jsonl")} == set(TABLES)  # a new table must join the comparison
    for name in [f"{t}.{ext}" for t in TABLES if t != "klora" for ext in ("jsonl", "csv")] + ["comparison.md",
                                                                                             "splits.json"]:
        assert (serial / name).read_bytes() == (local / name).read_bytes(), name
    # klora's per-seed compute time is the one column that differs between two computations of the same unit
    for ext in ("jsonl", "csv"):
        a, b = ((d / f"klora.{ext}").read_text() for d in (serial, local))
        assert _without(a, "seconds", ext) == _without(b, "seconds", ext) and len(a.splitlines()) > 1
    assert len(read_jsonl(serial / "results.jsonl")) > 0


@pytest.mark.slow
def test_the_run_gathers_exactly_the_units_the_executor_computed(runs):
    """A unit the run asked for but the plan lacks would be computed by ``run`` itself after the executor: its
    digest would be in units.json (what the run used) and not in units_plan.json (what the executor computed)."""
    local = runs["local"]
    planned = [u["digest"] for u in json.loads((local / "units_plan.json").read_text())["units"]]
    used = {u["digest"] for u in json.loads((local / "units.json").read_text())}
    assert used == set(planned) and len(planned) == len(set(planned)) == sum(UNITS.values())
    executor = json.loads((local / "summary.json").read_text())["executor"]
    assert (executor["planned"], executor["cached"], executor["computed"], executor["failed"]) == (33, 0, 33, [])
    st = status(local)
    assert (st["done"], st["pending"], st["running"], st["failed"]) == (33, 0, 0, [])
    # the serial run (no plan: run computes its units itself) uses the same keys
    assert {u["digest"] for u in json.loads((runs["serial"] / "units.json").read_text())} == used


@pytest.mark.parametrize("flags, expected", [
    ([], UNITS),
    # sam at p = 0.01, 0.1, mixout at 0.1 (not below), lora: 4 per whole set on 2 seeds; seed 13's two perturbed
    # sets for sam at 0.1 and lora: 4 more
    (["--methods", "sam,mixout,lora,kernel-rank", "--perturb-methods", "sam,lora", "--p", "0.01,0.1,1",
      "--perturbations", "2"], {"sparse.finetune": 8 + 4, "sparse.kernel-rank": 1}),
])
def test_dry_run_counts_the_units_per_kind(flags, expected, task_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("FTSIM_CACHE", raising=False)
    assert main(["run", "sparse", "--preset", "quick", "--data-dir", str(task_dir), *TINY, *flags, "--out",
                 str(tmp_path), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {kind: k["units"] for kind, k in plan["kinds"].items()} == expected
    assert plan["units"] == sum(expected.values()) and all(k["cached"] == 0 for k in plan["kinds"].values())
    assert not (tmp_path / "sparse").exists()  # a dry run writes no run directory
