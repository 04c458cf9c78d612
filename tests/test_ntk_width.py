"""The eNTK width demonstration: config validation, the experiment and its figure from the command line, and
``ftsim verify ntk``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ftsim.app.cli import main
from ftsim.core.io import read_json, read_jsonl
from simulate.ntk_width import PRESETS, NTKWidthConfig, init_mlp, make_data, mlp, slope

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (see ``tests/conftest.py``)."""


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="widths"):
        NTKWidthConfig(widths=())
    with pytest.raises(ValueError, match="depth"):
        NTKWidthConfig(depth=0)
    with pytest.raises(ValueError, match="lr"):
        NTKWidthConfig(lr=0.0)
    def largest(cfg):  # parameters of the widest network of a preset
        return sum(v.numel() for v in init_mlp(cfg, max(cfg.widths), seed=0).values())

    quick, paper = PRESETS["quick"], PRESETS["paper"]
    assert largest(quick) < largest(paper) and len(quick.seeds) <= len(paper.seeds)


def test_data_and_model_are_reproducible_and_shaped():
    cfg = NTKWidthConfig(widths=(8,), num_train=5, num_test=3, task="classification", num_classes=4)
    a, b = make_data(cfg), make_data(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["x_train"].shape == (5, 8) and a["y_train"].shape == (5, 4)
    assert torch.allclose(a["x_train"].norm(dim=1), torch.full((5,), 8 ** 0.5, dtype=torch.float64))
    assert torch.allclose(a["y_train"].sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    p = init_mlp(cfg, 8, seed=1)
    assert torch.equal(p["W0"], init_mlp(cfg, 8, seed=1)["W0"]) and not torch.equal(p["W0"], init_mlp(cfg, 8, 2)["W0"])
    assert mlp(cfg)(p, a["x_test"]).shape == (3, 4)
    std = dataclasses.replace(cfg, parameterization="standard")
    # the two parameterisations give the same function at initialisation (weights rescaled by 1/sqrt(fan_in))
    assert torch.allclose(mlp(std)(init_mlp(std, 8, 1), a["x_test"]), mlp(cfg)(p, a["x_test"]))
    assert slope([1, 4, 16], [1, 0.5, 0.25]) == pytest.approx(-0.5)


def test_run_ntk_width_from_the_command_line_writes_tables_and_figure(results_tmp, capsys):
    args = ["run", "ntk-width", "--preset", "quick", "--widths", "16,64", "--seeds", "0,1", "--steps", "30",
            "--num-train", "8", "--num-test", "6", "--depth", "1", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "results:" in out and "headline" in out
    run_dir = next(results_tmp.glob("ntk-width/*"))
    rows = read_jsonl(run_dir / "results.jsonl")
    assert {(r["width"], r["seed"]) for r in rows} == {(16, 0), (16, 1), (64, 0), (64, 1)}
    for r in rows:
        assert 0 <= r["dist_gf_test"] < 10 and 0 <= r["kernel_move"] < 10
    preds = read_jsonl(run_dir / "predictions.jsonl")
    assert len(preds) == 2 * 6  # first seed, two widths, six test points, C = 1
    assert (run_dir / "ntk_width.png").stat().st_size > 0 and (run_dir / "ntk_width.pdf").exists()
    assert "slope" in read_json(run_dir / "summary.json")["headline"]
    # figures are redrawn from the tables alone
    assert main(["figures", "--results", str(results_tmp)]) == 0
    assert "ntk_width.png" in capsys.readouterr().out
    # a second run reuses the stored result
    assert main(args) == 0
