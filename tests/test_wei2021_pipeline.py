"""The learned pipeline: transformer masking semantics, cached pretraining (safetensors, weights reused),
head/prompt/attention tuning, and the ``ftsim run``/``ftsim verify``/figure entry points on tiny configs."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from ftsim.core.io import read_json, read_jsonl
from simulate.wei2021.models import SmallTransformer, TransformerConfig, leave_one_out_probs, mask_logits
from simulate.wei2021.oracles import downstream_data, wei2021_task
from simulate.wei2021.pretrain import HMMSpec, PretrainConfig, pretrain
from simulate.wei2021.tuning import TuningConfig, fit_attention_head, head_tuning, prompt_tuning

TINY = PretrainConfig(d_model=16, num_layers=1, num_heads=2, steps=30, batch_size=16, corpus_sequences=480,
                      eval_every=10, eval_sequences=64, prompt_slots=1)


def _model(causal: bool) -> SmallTransformer:
    torch.manual_seed(0)
    return SmallTransformer(TransformerConfig(5, 9, 16, 2, 2, causal=causal, prompt_slots=1)).eval()


def test_causal_model_ignores_the_future_and_mlm_does_not():
    x = torch.randint(0, 5, (3, 8))
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 5
    with torch.no_grad():
        c = _model(True)
        torch.testing.assert_close(c(x)[:, :5], c(y)[:, :5])
        mlm = _model(False)
        assert not torch.allclose(mlm(x)[:, :5], mlm(y)[:, :5])


def test_prompt_slots_hold_mask_by_default():
    model = _model(False)
    x = torch.randint(0, 5, (4, 6))
    mask_vec = model.tok.weight[model.config.mask_id].detach()[None]
    with torch.no_grad():
        torch.testing.assert_close(mask_logits(model, x), mask_logits(model, x, mask_vec))
        # Input layout [slot, MASK, x_1..T]: the output is read at the mask, after the slot.
        full = torch.cat([torch.full((4, 2), model.config.mask_id), x], dim=1)
        torch.testing.assert_close(mask_logits(model, x), model(full)[:, 1])
        assert not torch.allclose(mask_logits(model, x), mask_logits(model, x, mask_vec + torch.randn(1, 16)))
    with pytest.raises(ValueError, match="prompt_slots"):
        mask_logits(model, x, torch.zeros(2, 16))


def test_leave_one_out_probs_mask_one_position_at_a_time():
    model = _model(False)
    x = torch.randint(0, 5, (3, 6))
    out = leave_one_out_probs(model, x, positions=[0, 4])
    xm = model.with_slots(x)
    xm[:, 1 + 4] = model.config.mask_id
    with torch.no_grad():
        torch.testing.assert_close(out[:, 1], torch.softmax(model(xm)[:, 1 + 4], -1))
    assert out.shape == (3, 2, 5)


def test_pretraining_is_cached_and_reloaded(tmp_path):
    from ftsim.core.cache import UnitCache

    cache = UnitCache(tmp_path)
    spec = HMMSpec.make("wei2021", 3, num_states=4, vocab_size=5)
    first = pretrain(spec, 7, TINY, cache, eval_length=6)
    assert not first.reused and (first.path / "model.safetensors").exists()
    assert [r["step"] for r in first.curve] == [0, 10, 20, 30]
    assert all(0.0 <= r["tv_mean"] <= 1.0 for r in first.curve)
    second = pretrain(spec, 7, TINY, cache, eval_length=6)
    assert second.reused and second.curve == first.curve
    for (k, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), k
    # The weights are a function of the unit's inputs, not of what ran before in the process.
    torch.manual_seed(12345)
    torch.rand(100)
    fresh = pretrain(spec, 7, TINY, UnitCache(tmp_path / "other"), eval_length=6)
    for (k, a), (_, b) in zip(first.model.state_dict().items(), fresh.model.state_dict().items()):
        assert torch.equal(a, b), k
    # Another seed is another checkpoint; the corpus of the same spec is shared.
    third = pretrain(spec, 7, PretrainConfig(**{**TINY.__dict__, "seed": 1}), cache, eval_length=6)
    assert third.path != first.path and not third.reused
    assert len(list((tmp_path / "corpus").glob("*/*/record.json"))) == 2  # corpus seed follows cfg.seed


def test_head_and_prompt_tuning_on_a_tiny_model(tmp_path):
    spec = HMMSpec.make("wei2021", 0, num_states=4, vocab_size=5)
    from ftsim.core.cache import UnitCache

    pre = pretrain(spec, 7, TINY, UnitCache(tmp_path), eval_length=6)
    hmm, mu = wei2021_task(4, 5, 0, 0, length=6)
    tr, va, te = downstream_data(hmm, mu, 700, 6, seed=2).split((400, 100, 200))
    cfg = TuningConfig(prompt_steps=0, prompt_batch=32)
    head = head_tuning(pre.model, tr, va, te, cfg)
    assert 0.5 <= head["test_accuracy"] <= 1.0
    # With no steps the prompt is the [MASK] embedding (+1% noise) and the head the head-tuning head:
    # prompt tuning starts from head tuning (up to predictions flipped by the noise).
    start = prompt_tuning(pre.model, tr, va, te, cfg, seed=0, head_init=head)
    assert abs(start["val_accuracy"] - head["val_accuracy"]) <= 0.02
    trained = prompt_tuning(pre.model, tr, va, te, TuningConfig(prompt_steps=20, prompt_batch=32, eval_every=5),
                            seed=0, head_init=head)
    assert trained["val_accuracy"] >= start["val_accuracy"] - 1e-9  # best validation state is kept


def test_token_start_is_the_best_real_token_on_validation():
    """``prompt_init="token"`` starts from the real token (in the slot next to x_0) whose head has the best
    validation accuracy. Oracle: each token fed as an ordinary input id, not as a prompt embedding.

    The model is a random (untrained) one: what is tested is the selection, and a random network's output
    depends on the slot token, whereas a 30-step model ignores the slot and every token ties with [MASK]."""
    from theory.wei2021 import accuracy, fit_logistic_head

    model = _model(False)
    hmm, mu = wei2021_task(6, 5, 0, 0, length=6)
    tr, va, te = downstream_data(hmm, mu, 700, 6, seed=2).split((400, 100, 200))
    cfg = TuningConfig(prompt_steps=0, prompt_batch=32, prompt_init="token")
    head = head_tuning(model, tr, va, te, cfg)
    res = prompt_tuning(model, tr, va, te, cfg, seed=0, head_init=head)

    def feats(d, v):
        ids = torch.as_tensor(d.observed)
        lead = torch.tensor([[v, model.config.mask_id]]).expand(len(ids), -1)
        with torch.no_grad():
            return torch.softmax(model(torch.cat([lead, ids], dim=1))[:, 1], -1).double().numpy()

    val_acc = {v: accuracy(fit_logistic_head(feats(tr, v), tr.labels, l2=head["l2"]).scores(feats(va, v)), va.labels)
               for v in range(5)}
    best = max(val_acc.values())
    if best > head["val_accuracy"]:
        assert res["init_token"] == min(v for v, a in val_acc.items() if a == best)
        assert res["init_val_accuracy"] == pytest.approx(best, abs=1e-9)
    else:
        assert res["init_token"] == -1 and res["init_val_accuracy"] == head["val_accuracy"]
    # With no steps the kept state is the start (up to the 1% symmetry-breaking noise).
    assert abs(res["val_accuracy"] - res["init_val_accuracy"]) <= 0.02
    with pytest.raises(ValueError, match="prompt_init"):
        TuningConfig(prompt_init="random")


def test_attention_head_finds_the_informative_position():
    rng = np.random.default_rng(0)
    B, T, n = 600, 8, 4
    F = rng.dirichlet(np.ones(n), size=(B, T))
    y = rng.integers(0, 2, B)
    pos = rng.integers(0, T, B)
    # One position per input carries the label (a peaked distribution on token 0 or 1); the others are noise.
    F[np.arange(B), pos] = np.where(y[:, None] == 1, [0.97, 0.01, 0.01, 0.01], [0.01, 0.97, 0.01, 0.01])
    fit = fit_attention_head(F[:400], y[:400], F[400:], y[400:], steps=300, num_heads=2)
    assert fit["test_accuracy"] >= 0.95


def _ftsim(*args: str) -> subprocess.CompletedProcess:
    """``ftsim ARGS`` in this process (the command line's main), as a completed process."""
    import contextlib
    import io

    from ftsim.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["ftsim", *args], code, out.getvalue(), err.getvalue())


TINY_FLAGS = ["--pretrain-steps", "20", "--eval-every", "10", "--batch-size", "16", "--corpus-sequences", "320",
              "--d-model", "16", "--num-layers", "1", "--num-heads", "2", "--length", "6", "--num-train", "200",
              "--num-val", "60", "--num-test", "120", "--oracle-train", "150", "--eval-sequences", "64",
              "--task-seeds", "0", "--oracle-steps", "20", "--oracle-restarts", "1", "--no-progress"]


@pytest.mark.slow
def test_ftsim_run_exp1_and_exp2_tiny_then_resume_and_redraw(results_tmp):
    from figures.wei2021 import redraw

    r1 = _ftsim("run", "wei2021-exp1", "--preset", "quick", "--num-states", "4,12", "--causal-num-states", "4",
                "--prompt-steps", "10", *TINY_FLAGS)
    assert r1.returncode == 0, r1.stderr[-2000:]
    run1 = next((results_tmp / "wei2021-exp1").iterdir())
    rows = read_jsonl(run1 / "results.jsonl")
    got = {(r["num_states"], r["model"], r["method"]) for r in rows}
    assert {(4, "mlm", "prompt"), (4, "causal", "head"), (12, "exact", "prompt_certificate")} <= got
    assert (12, "causal", "head") not in got
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    certs = [r["accuracy"] for r in rows if r["method"] == "prompt_certificate"]
    assert certs and all(a == 1.0 for a in certs)
    assert (run1 / "wei2021_exp1.png").stat().st_size > 10_000
    summary = read_json(run1 / "summary.json")
    assert "m=4: prompt" in summary["headline"]

    r2 = _ftsim("run", "wei2021-exp2", "--preset", "quick", "--num-memory", "2", "--attention-steps", "30",
                *TINY_FLAGS)
    assert r2.returncode == 0, r2.stderr[-2000:]
    run2 = next((results_tmp / "wei2021-exp2").iterdir())
    methods = {(r["hmm"], r["model"], r["method"]) for r in read_jsonl(run2 / "results.jsonl")}
    assert {("memory", "mlm", "attention"), ("vanilla", "mlm", "head"), ("memory", "exact", "attention")} <= methods

    # Killed-run resume: drop the summary and one tuning unit; the rerun recomputes only that unit and reads
    # the cached checkpoints (their records are not rewritten).
    (run1 / "summary.json").unlink()
    units = results_tmp.parent / "cache" / "units"
    tuning = {p: json.loads(p.read_text()) for p in (units / "wei2021.tuning").glob("*/*/record.json")}
    victim = next(p for p, r in tuning.items() if r["inputs"].get("num_states") == 4
                  and r["inputs"].get("model") == "mlm" and r["inputs"].get("experiment") == 1)
    before = tuning[victim]["result"]
    import shutil

    shutil.rmtree(victim.parent)
    metas = sorted((units / "wei2021.pretrain").glob("*/*/record.json"))
    stamps = [p.stat().st_mtime_ns for p in metas]
    r3 = _ftsim("run", "wei2021-exp1", "--preset", "quick", "--num-states", "4,12", "--causal-num-states", "4",
                "--prompt-steps", "10", *TINY_FLAGS)
    assert r3.returncode == 0, r3.stderr[-2000:]
    assert [p.stat().st_mtime_ns for p in metas] == stamps
    after = json.loads(victim.read_text())["result"]
    assert {k: v["test_accuracy"] for k, v in after.items()} == {k: v["test_accuracy"] for k, v in before.items()}
    assert read_jsonl(run1 / "results.jsonl") == rows  # same seed, same bytes

    for run, stem in ((run1, "wei2021_exp1"), (run2, "wei2021_exp2")):
        (run / f"{stem}.png").unlink()
        assert run / f"{stem}.png" in redraw(run)


def test_run_help_lists_the_config_fields():
    r = _ftsim("run", "wei2021-exp2", "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--num-memory" in r.stdout and "--attention-steps" in r.stdout
