"""theory.lpft against independent oracles, and its theorems as hypothesis properties.

Oracles: explicit Jacobians (torch.autograd.functional.jacobian) for the eNTK parts; torchmetrics' calibration error
for the ECE; torch's cross-entropy for the NLL; a dense grid for the fitted temperature; scikit-learn's own
predict_proba for the probe; small-step gradient descent for the gradient-flow solver.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftsim.core.errors import InputError
from theory import lpft as L


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one torch/BLAS thread for the whole module (a function-scoped fixture would not be reset
    between hypothesis examples)."""
    from ftsim.core.threads import limit_threads

    with limit_threads(1):
        yield


# ------------------------------------------------------------------------------------------- eNTK decomposition

@given(seed=st.integers(0, 10_000), hidden=st.integers(2, 9), classes=st.integers(2, 4), n=st.integers(1, 5))
@settings(max_examples=15)
def test_decomposition_matches_closed_forms(seed, hidden, classes, n):
    """Theorem (Tomihari & Sato 2024, Sec. 4): eNTK = delta (phi^T phi' + 1) + V J J^T V^T, exactly.
    Slack 1e-10 relative: float64 products over <= a few hundred terms (rounding ~1e-15)."""
    from simulate.lpft import Classifier, MLPBackbone, _decomposition_errors

    g = torch.Generator().manual_seed(seed)
    module = Classifier(MLPBackbone(3, hidden, seed), hidden, classes)
    with torch.no_grad():
        module.head.weight.copy_(torch.randn(module.head.weight.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    names = [k for k, _ in module.named_parameters() if k.startswith("backbone.")]
    e = _decomposition_errors(module, x, names)
    assert e["head"] <= 1e-10 and e["backbone"] <= 1e-10 and e["additivity"] <= 1e-10, e


def test_backbone_part_is_quadratic_in_the_head():
    g = torch.Generator().manual_seed(0)
    V = torch.randn(3, 4, generator=g, dtype=torch.float64)
    J = torch.randn(5, 4, 7, generator=g, dtype=torch.float64)
    K = L.backbone_kernel(V, J)
    assert torch.allclose(L.backbone_kernel(2.5 * V, J), 6.25 * K, rtol=1e-13, atol=0)
    # explicit sum over parameters, the definition
    ref = torch.einsum("ch,nhp,dk,mkp->ncmd", V, J, V, J)
    assert torch.allclose(K, ref, rtol=1e-12, atol=1e-12)


def test_kernel_trace_and_shares():
    kh = L.head_kernel(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), num_classes=2)
    # trace = C * sum_i (||phi_i||^2 + 1) = 2 * (2 + 5)
    assert L.kernel_trace(kh) == pytest.approx(14.0)
    s = L.kernel_shares(kh, 3 * kh)
    assert s["share_head"] == pytest.approx(0.25) and s["share_backbone"] == pytest.approx(0.75)


def test_overlapping_groups_are_refused():
    f = lambda p, x: x @ p["w"].T  # noqa: E731
    with pytest.raises(ValueError, match="disjoint"):
        L.head_backbone_kernels(f, {"w": torch.ones(2, 3)}, torch.ones(1, 3), head=["w"], backbone=["w"])


# ------------------------------------------------------------------------------------------------- calibration

@given(seed=st.integers(0, 10_000), n=st.integers(1, 300), classes=st.integers(2, 5), scale=st.floats(0.1, 8.0))
@settings(max_examples=30)
def test_ece_equals_torchmetrics(seed, n, classes, scale):
    """torchmetrics' top-label L1 calibration error with 15 bins is the oracle. Slack 1e-6: torchmetrics works in
    float32 (confidences rounded at ~6e-8, times at most 1 per bin)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    rng = np.random.default_rng(seed)
    probs = L.softmax(scale * rng.standard_normal((n, classes)))
    y = rng.integers(0, classes, n)
    ours = L.expected_calibration_error(probs, y)
    ref = float(multiclass_calibration_error(torch.as_tensor(probs, dtype=torch.float32), torch.as_tensor(y),
                                             classes, n_bins=15, norm="l1"))
    assert abs(ours - ref) <= 1e-6


def test_reliability_bins_are_left_open():
    # a confidence of exactly 0.6 falls into the bin (8/15, 9/15] = (0.533, 0.6], as in the authors' code
    rows = L.reliability_bins(np.array([[0.6, 0.4]]), np.array([0]))
    hit = [r for r in rows if r["count"]]
    assert len(hit) == 1 and hit[0]["hi"] == pytest.approx(0.6) and hit[0]["accuracy"] == 1.0


@given(seed=st.integers(0, 10_000), T=st.floats(0.2, 5.0))
@settings(max_examples=20)
def test_nll_equals_torch_cross_entropy(seed, T):
    rng = np.random.default_rng(seed)
    z = 5 * rng.standard_normal((40, 3))
    y = rng.integers(0, 3, 40)
    ref = float(torch.nn.functional.cross_entropy(torch.as_tensor(z / T), torch.as_tensor(y)))
    assert L.nll(z, y, T) == pytest.approx(ref, rel=1e-12, abs=1e-14)


@given(seed=st.integers(0, 10_000), scale=st.floats(0.2, 10.0))
@settings(max_examples=20)
def test_fitted_temperature_minimises_nll(seed, scale):
    """The bounded search finds the global minimum of the (convex in 1/T) NLL: no point of a dense grid over
    [1e-2, 1e2] does better. Slack 1e-9: Brent's xatol 1e-10 in log(1/T) moves the NLL by O(1e-20) near a minimum."""
    rng = np.random.default_rng(seed)
    z = scale * rng.standard_normal((60, 3))
    y = np.where(rng.random(60) < 0.7, z.argmax(1), rng.integers(0, 3, 60))
    T = L.fit_temperature(z, y)
    best = L.nll(z, y, T)
    grid = np.geomspace(1e-2, 1e2, 2001)
    assert best <= min(L.nll(z, y, t) for t in grid) + 1e-9


def test_temperature_scaling_recovers_a_known_temperature():
    # logits z / 3 are calibrated by construction (labels drawn from softmax(z / 3)); the fit must find T near 3
    rng = np.random.default_rng(0)
    z = 4 * rng.standard_normal((20_000, 3))
    p = L.softmax(z / 3)
    y = (rng.random((20_000, 1)) > p.cumsum(1)).sum(1)
    assert L.fit_temperature(z, y) == pytest.approx(3.0, rel=0.05)  # ~1/sqrt(N) relative error, 5% is >10 s.e.


# ------------------------------------------------------------------------------------------------ linear probe

def test_probe_reproduces_sklearn_probabilities():
    from sklearn.linear_model import LogisticRegressionCV

    rng = np.random.default_rng(1)
    X = rng.standard_normal((60, 4))
    y = (X[:, 0] + 0.5 * rng.standard_normal(60) > 0).astype(int)
    probe = L.fit_linear_probe(X, y, 2, seed=0)
    ref = LogisticRegressionCV(Cs=10, cv=5, l1_ratios=(0.0,), scoring="accuracy", max_iter=5000, tol=1e-4,
                               random_state=0, use_legacy_attributes=False).fit(X, y)
    assert np.allclose(L.softmax(probe.logits(X)), ref.predict_proba(X), atol=1e-12)
    assert probe.folds == 5 and probe.weight.shape == (2, 4)


def test_probe_needs_two_examples_per_class():
    with pytest.raises(ValueError, match="cross-validation"):
        L.fit_linear_probe(np.eye(3), np.array([0, 0, 1]), 2)


@given(seed=st.integers(0, 10_000), n=st.integers(3, 40), d=st.integers(1, 12), classes=st.integers(2, 4))
@settings(max_examples=25)
def test_mse_probe_norm_never_exceeds_least_squares(seed, n, d, classes):
    """Squared loss, GD from zero with lr = 1/lambda_max: every eigen-coordinate of the head [V b] rises
    monotonically to the least-squares solution's, so ||[V_t b_t]|| <= ||[V_LS b_LS]|| at every step. Slack 1e-9
    relative: rounding of the iteration, far below the O(1) gap the bound would need to fail. (hypothesis found
    that ||V_t|| alone can exceed ||V_LS|| when the features are not centred: the bound is on the joint vector.)"""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = rng.integers(0, classes, n)
    _, w_norm, lr = L.least_squares_head(X, y, classes)
    rows = L.probe_gradient_descent(X, y, classes, loss="mse", lr=lr, steps=300, record=range(301))
    assert max(r["param_norm"] for r in rows) <= w_norm * (1 + 1e-9) + 1e-12
    Xc = X - X.mean(0)  # centred features: V and b decouple, the bound holds for ||V|| too
    V_c, _, lr_c = L.least_squares_head(Xc, y, classes)
    rows = L.probe_gradient_descent(Xc, y, classes, loss="mse", lr=lr_c, steps=300, record=range(301))
    assert max(r["head_norm"] for r in rows) <= L.head_norm(V_c) * (1 + 1e-9) + 1e-12


def test_ce_probe_norm_grows_on_separable_data():
    from simulate.lpft import _separable_symmetric

    X, ypm = _separable_symmetric(3)
    rows = L.probe_gradient_descent(X, (ypm > 0).astype(int), 2, loss="ce", lr=1.0, steps=3000,
                                    record=[10, 100, 1000, 3000])
    norms = [r["head_norm"] for r in rows]
    assert all(b > a for a, b in zip(norms, norms[1:])) and rows[-1]["train_acc"] == 1.0


# ----------------------------------------------------------------------------------- Kumar's linear model

@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.0, 0.05, 0.3]), m=st.integers(2, 6))
@settings(max_examples=12)
def test_gradient_flow_invariants(seed, eps, m):
    """Kumar et al. 2022 (Sec. 3): the B-gradient -v r^T X / n has rows in S, so B_t = B_0 on S^perp; and
    v v^T - B B^T is conserved. Slack: the ODE solver's tolerance (rtol 1e-11) over O(10) units of norm."""
    w = L.linear_world(d=8, k=3, m=m, n=12, feature_error=eps, seed=seed)
    v0 = 0.3 * np.random.default_rng(seed).standard_normal(3)
    v, B, _ = L.two_layer_gradient_flow(v0, w.B0, w)
    assert np.abs((B - w.B0) @ w.P_perp).max() <= 1e-9
    assert np.abs(L.balancedness(v, B) - L.balancedness(v0, w.B0)).max() <= 1e-7
    assert L.id_loss(v, B, w) <= 1e-12  # n >= m: the ID data are fitted
    split = L.ood_error_split(v, B, w)
    assert split["in_S"] + split["perp"] == pytest.approx(L.ood_error(v, B, w), rel=1e-10, abs=1e-14)


@given(seed=st.integers(0, 10_000))
@settings(max_examples=10)
def test_lpft_with_exact_features_does_not_move(seed):
    w = L.linear_world(d=10, k=3, m=5, n=15, feature_error=0.0, seed=seed)
    v_lp = L.lp_head(w.B0, w)
    v, B, _ = L.two_layer_gradient_flow(v_lp, w.B0, w, t=50.0)
    # slack: LP's least-squares residual is ~1e-15 (rounding), driving B by ~t ||X||^2 1e-15 ~ 1e-12 over t = 50
    assert L.ood_error(v, B, w) <= 1e-18 and np.abs(B - w.B0).max() <= 1e-10


def test_gradient_flow_agrees_with_small_step_gradient_descent():
    """Oracle: explicit Euler (GD) with step h converges to the flow at rate O(h)."""
    w = L.linear_world(d=6, k=2, m=3, n=10, feature_error=0.2, seed=4)
    v0, B0, t = np.array([0.3, -0.2]), w.B0.copy(), 5.0
    v_f, B_f, _ = L.two_layer_gradient_flow(v0, B0, w, t=t)
    errs = []
    for h in (1e-2, 1e-3):
        v, B = v0.copy(), B0.copy()
        for _ in range(int(round(t / h))):
            r = w.X @ B.T @ v - w.y
            g = w.X.T @ r / len(r)
            v, B = v - h * B @ g, B - h * np.outer(v, g)
        errs.append(np.abs(v - v_f).max() + np.abs(B - B_f).max())
    assert errs[1] < errs[0] / 5 and errs[1] < 1e-3


def test_linear_world_validates_sizes():
    with pytest.raises(ValueError, match="m < d"):
        L.linear_world(d=4, k=2, m=4, n=10)


# ----------------------------------------------------------------------------------------------- configs

def test_config_errors_name_the_field():
    from real_tasks.lpft import LPFTConfig
    from simulate.lpft import LPFTSyntheticConfig

    with pytest.raises(InputError) as e:
        LPFTSyntheticConfig(steps=0)
    assert e.value.field == "steps"
    with pytest.raises(InputError) as e:
        LPFTConfig(methods=("LP", "nope"))
    assert e.value.field == "methods"
    with pytest.raises(InputError) as e:
        LPFTConfig(k=1)
    assert e.value.field == "k"


def test_method_values():
    from theory.finetune import Optimizer

    probe = L.Probe(np.ones((2, 3)), np.zeros(2), 1.0, 5)
    from peft import LoraConfig

    m = L.method_values(ft=Optimizer("adam", lr=1e-3), lora_ft=Optimizer("adam", lr=1e-2), steps=5, batch_size=4,
                        probe=probe, lora_config=LoraConfig(r=2, target_modules=["fc1"]))
    assert list(m) == ["FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT"]
    assert m["LP-FT"].head.init == "given" and m["FT"].head.init == "random"
    assert m["LoRA-FT"].params.moves("backbone.fc1.lora_A.default.weight") and m["LoRA-FT"].params.moves("head.weight")
    assert not m["LoRA-FT"].params.moves("backbone.fc1.weight")
    assert math.isclose(m["LoRA-FT"].optimizer.lr, 1e-2)


@given(seed=st.integers(0, 10_000), rank=st.integers(1, 4), randomise_b=st.booleans())
@settings(max_examples=10)
def test_lora_decomposition(seed, rank, randomise_b):
    """With peft LoRA on the backbone: eNTK over (LoRA factors, head) = head part + V J_lora J_lora^T V^T exactly
    (slack 1e-10, float64), and at peft's init (B = 0) the A factors' kernel is exactly zero."""
    from peft import LoraConfig

    from simulate.lpft import _decomposition_errors, _functional, mlp_world
    from theory.finetune import Head, Method, Optimizer, Params, prepare
    from theory.ntk import empirical_ntk

    module = mlp_world(seed, hidden=6).make()
    prepare(module, Method("lora", Optimizer("sgd", lr=0.1), 1, head=Head("random", seed=seed, std=1.0),
                           params=Params.lora(LoraConfig(r=rank, lora_alpha=rank, target_modules=["fc1", "fc2"]),
                                              "backbone", ("head.*",))))
    module.double()
    g = torch.Generator().manual_seed(seed)
    if randomise_b:
        with torch.no_grad():
            for n, p in module.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(4, 8, generator=g, dtype=torch.float64)
    lora = [n for n, _ in module.named_parameters() if "lora_" in n]
    e = _decomposition_errors(module, x, lora)
    assert max(e["head"], e["backbone"], e["additivity"]) <= 1e-10
    params = {k: v.detach() for k, v in module.named_parameters()}
    k_a = empirical_ntk(_functional(module), params, x, params_subset=lambda n: "lora_A" in n).kernel
    assert (float(k_a.abs().max()) > 0) == randomise_b
