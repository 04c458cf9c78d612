"""Sparse fine-tuning math (theory/sparse.py), each piece against an independent oracle: brute force over every mask
(Theorem 3), scikit-learn's logistic regression and scipy's L-BFGS (the exact fits behind leave-one-out), explicit
Hessians and Jacobians from ``torch.autograd.functional`` (diagonal Hessian estimates, Fisher information), Monte
Carlo frequencies with CLT tolerances (random masks, hard-concrete gates, Mixout), and bit-identity of every entry a
mask freezes after fine-tuning with each family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from theory import sparse as sp
from theory.finetune import Method, Optimizer, Params, TensorData, finetune, snapshot


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one torch thread (see ``tests/conftest.py``)."""


class Net(nn.Module):
    def __init__(self, d=5, h=6, C=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Linear(d, h)
        self.head = nn.Linear(h, C)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _data(n=24, d=5, C=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = (x[:, 0] > 0).long() + ((x[:, 1] > 0.5).long() if C > 2 else 0)
    return TensorData(x, y)


# ------------------------------------------------------------------------------------------------- mask families

@given(st.integers(1, 60), st.floats(0.0, 1.0), st.integers(0, 2 ** 31 - 1), st.booleans())
def test_top_k_keeps_exactly_the_budget_and_only_the_largest(numel, p, seed, ties):
    g = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 4, (numel,), generator=g).double() if ties else torch.randn(numel, generator=g).double()
    mask = sp.top_k_masks({"w": score}, p)["w"]
    k = int(math.floor(numel * p + 1e-12))
    assert int(mask.sum()) == k
    if 0 < k < numel:
        assert score[mask].min() >= score[~mask].max()
        # ties go to the lower index: among equal scores at the threshold, kept ones come first
        t = score[mask].min()
        tied = (score == t).nonzero().flatten()
        kept = mask[tied]
        assert not (kept[1:] & ~kept[:-1]).any()


def test_global_scope_and_per_tensor_scope_differ_as_stated():
    scores = {"a": torch.tensor([10.0, 9.0, 8.0, 7.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    per = sp.top_k_masks(scores, 0.5)
    glob = sp.top_k_masks(scores, 0.5, scope="global")
    assert per["a"].tolist() == [True, True, False, False] and per["b"].tolist() == [False, False, True, True]
    assert glob["a"].all() and not glob["b"].any()
    with pytest.raises(ValueError, match="p must lie"):
        sp.top_k_masks(scores, 1.5)


def test_random_masks_are_bernoulli_seeded_and_per_name():
    params = {"w": torch.zeros(200, 100), "v": torch.zeros(50)}
    a = sp.random_masks(params, 0.3, seed=4)
    assert torch.equal(a["w"], sp.random_masks(params, 0.3, seed=4)["w"])
    assert torch.equal(a["w"], sp.random_masks({"w": params["w"]}, 0.3, seed=4)["w"])  # other tensors don't matter
    assert not torch.equal(a["w"], sp.random_masks(params, 0.3, seed=5)["w"])
    n = a["w"].numel()
    z = (float(a["w"].sum()) - 0.3 * n) / math.sqrt(0.3 * 0.7 * n)
    assert abs(z) < 4.5  # Bernoulli(p) count: |z| < 4.5 fails with probability < 1e-5
    exact = sp.random_masks(params, 0.3, seed=4, exact=True)
    assert int(exact["w"].sum()) == 6000 and int(exact["v"].sum()) == 15


def test_magnitude_name_and_full_masks():
    params = {"w": torch.tensor([[0.1, -5.0], [2.0, 0.0]]), "b.bias": torch.ones(3)}
    assert sp.magnitude_masks(params, 0.5)["w"].tolist() == [[False, True], [True, False]]
    bit = sp.name_masks(params, ("*bias",))
    assert bit["b.bias"].all() and not bit["w"].any()
    assert sp.density(bit) == pytest.approx(3 / 7)
    assert sp.density(sp.full_masks(params)) == 1.0


# -------------------------------------------------------------------------------------- Theorem 3 on quadratics

def _quadratic(seed: int, m: int, diagonal: bool):
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(m)
    h = rng.uniform(0.1, 3.0, m)
    if diagonal:
        return g, np.diag(h)
    Q, _ = np.linalg.qr(rng.standard_normal((m, m)))
    return g, Q @ np.diag(h) @ Q.T


@given(st.integers(0, 2 ** 31 - 1), st.integers(1, 10), st.floats(0.05, 1.0))
def test_sam_rule_is_optimal_and_its_drop_exact_on_diagonal_quadratics(seed, m, p):
    g, H = _quadratic(seed, m, True)
    k = max(1, sp.budget(m, p))
    _, drops = sp.brute_force_drops(g, H, k)
    rule = sp.sam_rule(g, np.diag(H), k)
    got = sp.quadratic_drop(g, H, rule)
    # exact statements; 1e-12 relative covers float64 rounding of sums of <= 10 terms
    assert got >= drops.max() * (1 - 1e-12)
    assert sp.predicted_drop(g, np.diag(H), rule) == pytest.approx(got, rel=1e-12)


@given(st.integers(0, 2 ** 31 - 1), st.integers(1, 8), st.floats(0.05, 1.0))
def test_gradient_rule_beats_its_upper_bound_problem_on_any_pd_quadratic(seed, m, p):
    """H <= lambda_max I, so the true drop of any mask is at least the upper-bound problem's; slack 1e-12 relative."""
    g, H = _quadratic(seed, m, False)
    k = max(1, sp.budget(m, p))
    rule = sp.gradient_rule(g, k)
    assert sp.quadratic_drop(g, H, rule) >= sp.upper_bound_drop(g, np.linalg.eigvalsh(H)[-1], rule) * (1 - 1e-12)


def test_quadratic_drop_equals_direct_minimisation():
    """Oracle: minimise L_0 + g^T M d + 1/2 d^T M H M d over d by least squares on the full (singular) system."""
    g, H = _quadratic(3, 7, False)
    support = [0, 2, 5]
    M = np.zeros((7, 7))
    M[support, support] = 1
    d = -np.linalg.pinv(M @ H @ M) @ (M @ g)
    direct = -(g @ M @ d + 0.5 * d @ M @ H @ M @ d)
    assert sp.quadratic_drop(g, H, support) == pytest.approx(direct, rel=1e-10)
    supports, drops = sp.brute_force_drops(g, H, 3)
    assert len(drops) == math.comb(7, 3)
    i = [tuple(s) for s in supports].index((0, 2, 5))
    assert drops[i] == pytest.approx(direct, rel=1e-10)


# ---------------------------------------------------------------------------------------- logistic and stability

def _problem(seed, n=30, d=5, ridge=0.05, penalty=0.0, offset=False):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    y = np.where(X @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n) > 0, 1.0, -1.0)
    theta0 = 0.3 * rng.standard_normal(d)
    b = 0.5 * rng.standard_normal(n) if offset else None
    return sp.LogisticProblem.make(X, y, ridge=ridge, penalty=penalty, theta0=theta0, offset=b)


def test_fit_logistic_equals_scikit_learn():
    """With theta_0 = 0 and no offset, ridge + penalty is one L2 term: sklearn minimises C sum l_i + ||w||^2 / 2,
    i.e. our mean loss + (lam / 2)||w||^2 with C = 1 / (n lam), lam = ridge + 2 penalty."""
    from sklearn.linear_model import LogisticRegression

    prob = _problem(1, ridge=0.02, penalty=0.04)
    prob = sp.LogisticProblem.make(prob.X, prob.y, ridge=0.02, penalty=0.04)
    theta = sp.fit_logistic(prob)
    lam = 0.02 + 2 * 0.04
    ref = LogisticRegression(C=1.0 / (len(prob.y) * lam), fit_intercept=False, tol=1e-14, max_iter=100000)
    ref.fit(prob.X, prob.y)
    np.testing.assert_allclose(theta, ref.coef_[0], atol=1e-7)


def test_fit_logistic_with_offset_and_anchor_equals_scipy():
    from scipy.optimize import minimize

    prob = _problem(2, ridge=0.01, penalty=np.linspace(0.0, 0.5, 5), offset=True)
    rows = np.arange(3, 30)
    theta = sp.fit_logistic(prob, rows)

    def fun(t):
        X, y, b = prob.X[rows], prob.y[rows], prob.offset[rows]
        return (np.logaddexp(0, -y * (X @ t + b)).mean() + 0.5 * prob.ridge * t @ t
                + prob.penalty @ (t - prob.theta0) ** 2)

    ref = minimize(fun, np.zeros(5), method="BFGS", options={"gtol": 1e-12})
    np.testing.assert_allclose(theta, ref.x, atol=1e-6)
    assert fun(theta) <= ref.fun + 1e-14


def test_hessian_and_lipschitz_constant():
    prob = _problem(3, offset=True)
    theta = sp.fit_logistic(prob)

    def L(t):
        t = torch.as_tensor(t)
        X, y, b = (torch.as_tensor(a) for a in (prob.X, prob.y, prob.offset))
        return nn.functional.softplus(-y * (X @ t + b)).mean() + 0.5 * prob.ridge * t @ t

    ref = torch.autograd.functional.hessian(L, torch.as_tensor(theta)).numpy()
    np.testing.assert_allclose(sp.logistic_hessian(prob, theta), ref, atol=1e-12)
    # rho: the per-example gradient norm |x_i| sigma(-margin) never exceeds max |x_i|
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = rng.standard_normal(5) * 3
        s = 1 / (1 + np.exp(prob.y * (prob.X @ t + prob.offset)))
        assert (np.linalg.norm(prob.X, axis=1) * s).max() <= prob.lipschitz + 1e-12


@settings(max_examples=15)
@given(st.integers(0, 2 ** 31 - 1), st.floats(0.0, 1.0), st.floats(1e-3, 0.5))
def test_loo_stability_obeys_the_strong_convexity_bound(seed, p, ridge):
    """The rigorous form of Thm 1: F_S is (ridge + 2(1 - p))-strongly convex everywhere, so
    |l(A(S^i), z_i) - l(A(S), z_i)| <= 2 rho^2 / ((ridge + 2(1 - p)) n) for every i (no slack: a theorem; the fits
    are exact to a Newton decrement of 1e-24). The paper's form with Lambda_min at A(S) is at least as tight and is
    measured by ``ftsim verify sparse``."""
    prob = _problem(seed, n=20, d=4, ridge=ridge, penalty=1 - p, offset=True)
    res = sp.loo_stability(prob)
    bound = 2 * res.rho ** 2 / ((ridge + 2 * (1 - p)) * res.n)
    assert res.per_point.max() <= bound
    assert res.lambda_min >= ridge - 1e-12  # the data term is PSD
    assert sp.stability_bound(res.rho, res.lambda_min, p, res.n) <= bound * (1 + 1e-12)


def test_loo_refits_are_exact_leave_one_out():
    prob = _problem(4)
    res = sp.loo_stability(prob)
    i = 7
    fresh = sp.fit_logistic(prob, np.delete(np.arange(30), i))  # started from theta_0, not warm
    full = sp.fit_logistic(prob)
    assert res.per_point[i] == pytest.approx(abs(sp.logistic_losses(prob, fresh)[i] - sp.logistic_losses(prob, full)[i]),
                                             rel=1e-8)


def test_restrict_is_the_hard_mask():
    prob = _problem(5, penalty=0.1)
    keep = np.array([True, False, True, False, True])
    sub = sp.fit_logistic(sp.restrict(prob, keep))
    # oracle: the full problem with a huge penalty on the frozen coordinates (and none on the kept ones... plus 0.1)
    pen = np.where(keep, 0.1, 1e9)
    big = sp.fit_logistic(prob.with_penalty(pen))
    np.testing.assert_allclose(big[keep], sub, atol=1e-6)
    np.testing.assert_allclose(big[~keep], prob.theta0[~keep], atol=1e-8)


def test_bounds_closed_forms():
    assert sp.stability_bound(2.0, 0.5, 0.75, 10) == pytest.approx(2 * 4 / (1.0 * 10))
    assert sp.stability_bound(1.0, -1.0, 0.9, 10) == math.inf  # the PSD assumption fails: no bound
    C, rho, lam, p, n, delta = 2.0, 1.5, 0.3, 0.4, 50, 0.05
    assert sp.generalization_bound(0.1, C, rho, lam, p, n, delta) == pytest.approx(
        0.1 + math.sqrt((C ** 2 + 24 * C * rho ** 2 / (lam + 2 * (1 - p))) / (2 * n * delta)))
    th, th0 = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)
    assert float(sp.mask_regularizer(th, th0, torch.tensor([True, False, False]))) == 13.0
    # E_M over all 2^3 masks with Bernoulli(p) weights equals (1 - p) ||theta - theta_0||^2
    p = 0.3
    total = 0.0
    for bits in range(8):
        m = torch.tensor([(bits >> j) & 1 == 1 for j in range(3)])
        total += p ** int(m.sum()) * (1 - p) ** int((~m).sum()) * float(sp.mask_regularizer(th, th0, m))
    assert total == pytest.approx(float(sp.expected_mask_regularizer(th, th0, p)))


# ------------------------------------------------------------------------------------ scores that need the model

def _explicit_per_example_grads(net, data, loss="ce"):
    from theory.finetune import _loss

    names = [n for n, _ in net.named_parameters()]
    out = []
    for i in range(len(data)):
        net.zero_grad()
        _loss(net(data.inputs[i:i + 1]), data.labels[i:i + 1], loss).backward()
        out.append({n: p.grad.detach().double().clone() for n, p in net.named_parameters()})
    return names, out


def test_fisher_diagonal_is_the_mean_squared_per_example_gradient():
    net = Net(seed=1).double()
    data = _data(n=9, dtype=torch.float64)
    got = sp.fisher_diagonal(net, data)
    names, grads = _explicit_per_example_grads(net, data)
    for n in names:
        torch.testing.assert_close(got[n], sum(g[n] ** 2 for g in grads) / 9, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("C", [1, 2, 3])
def test_gauss_newton_diagonal_equals_explicit_jacobians(C):
    """Oracle: diag(J^T H J) with J = d f / d theta from ``torch.autograd.functional.jacobian`` and H the Hessian of
    the loss in the outputs (softmax: diag(p) - p p^T; one output: sigma(1 - sigma))."""
    from theory.oracles import explicit_jacobian
    from torch.func import functional_call

    net = Net(C=C, seed=2).double()
    data = _data(n=6, C=max(C, 2), dtype=torch.float64)
    got = sp.gauss_newton_diagonal(net, data)
    params = {k: v.detach() for k, v in net.named_parameters()}
    names = list(params)
    f = lambda ps, x: functional_call(net, ps, (x,))  # noqa: E731
    ref = torch.zeros(sum(v.numel() for v in params.values()), dtype=torch.float64)
    for i in range(len(data)):
        x = data.inputs[i:i + 1]
        J = explicit_jacobian(f, params, x, names)  # (C, P)
        out = f(params, x)[0]
        if C == 1:
            s = torch.sigmoid(out)
            H = (s * (1 - s)).reshape(1, 1)
        else:
            pr = torch.softmax(out, -1)
            H = torch.diag(pr) - torch.outer(pr, pr)
        ref += torch.einsum("cp,cd,dp->p", J, H, J) / len(data)
    flat = torch.cat([got[n].reshape(-1) for n in names])
    torch.testing.assert_close(flat, ref, rtol=1e-10, atol=1e-14)


def test_hutchinson_is_exact_for_a_diagonal_hessian_and_unbiased_otherwise():
    w = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    est = sp.hutchinson_diagonal(lambda: (c * w ** 4).sum(), {"w": w}, samples=3, seed=0)["w"]
    torch.testing.assert_close(est, 12 * c * w.detach() ** 2)  # diagonal: v_i^2 = 1 makes every sample exact
    net = Net(d=3, h=3, C=2, seed=3).double()
    data = _data(n=8, d=3, C=2, dtype=torch.float64)
    params = dict(net.named_parameters())

    def loss():
        return nn.functional.cross_entropy(net(data.inputs), data.labels)

    from torch.func import functional_call

    names = list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def flat_loss(v):
        sub = {n: t.reshape(s) for n, t, s in zip(names, torch.split(v, sizes), shapes)}
        return nn.functional.cross_entropy(functional_call(net, sub, (data.inputs,)), data.labels)

    H = torch.autograd.functional.hessian(flat_loss, torch.cat([params[n].detach().reshape(-1) for n in names]))
    S = 400
    est = sp.hutchinson_diagonal(loss, params, samples=S, seed=1)
    flat = torch.cat([est[n].reshape(-1) for n in names])
    # per-sample variance of v_i (Hv)_i is sum_{j != i} H_ij^2: 5 standard errors of the mean, every coordinate
    se = torch.sqrt(((H ** 2).sum(1) - torch.diag(H) ** 2) / S)
    assert ((flat - torch.diag(H)).abs() <= 5 * se + 1e-12).all()


def test_accumulated_gradients_equal_a_hand_written_burn_in():
    net = Net(seed=4).double()
    data = _data(n=10, dtype=torch.float64)
    got = sp.accumulated_gradients(net, data, steps=5, batch_size=4, seed=3)
    gen = torch.Generator().manual_seed(3)
    perm, cursor, ref = torch.randperm(10, generator=gen), 0, None
    for _ in range(5):
        if cursor >= 10:
            perm, cursor = torch.randperm(10, generator=gen), 0
        idx = perm[cursor:cursor + 4]
        cursor += 4
        net.zero_grad()
        # the fine-tuning loss: cross-entropy of float32 scores (theory.finetune)
        nn.functional.cross_entropy(net(data.inputs[idx]).float(), data.labels[idx]).backward()
        step = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        ref = step if ref is None else {n: ref[n] + step[n] for n in ref}
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-15)
    masks = sp.sam_masks(got, 0.25)
    assert int(masks["body.weight"].sum()) == sp.budget(30, 0.25)


def test_sam_exact_rule_uses_g2_over_h_and_guards_nonpositive_h():
    g = {"w": torch.tensor([1.0, 2.0, 3.0, 0.5])}
    h = {"w": torch.tensor([1.0, 8.0, 100.0, 0.01])}
    assert sp.sam_exact_masks(g, h, 0.5)["w"].tolist() == [True, False, False, True]  # 1, 0.5, 0.09, 25
    h_bad = {"w": torch.tensor([1.0, -8.0, 0.0, 1.0])}
    m = sp.sam_exact_masks(g, h_bad, 0.5)["w"]
    assert int(m.sum()) == 2 and m[2]  # h = 0 floored (not an infinite score for free), |h| used for h < 0


# ------------------------------------------------------------------------------------- DiffPruning and Mixout

def test_hard_concrete_open_probability_matches_sampling():
    gate = sp.HardConcrete()
    gen = torch.Generator().manual_seed(0)
    for la in (-2.0, 0.0, 1.5):
        u = torch.rand(200_000, generator=gen, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
        z = gate.sample(torch.full_like(u, la), u)
        freq = float((z > 0).double().mean())
        p = float(gate.open_probability(torch.tensor(la)))
        assert abs(freq - p) <= 5 * math.sqrt(p * (1 - p) / u.numel())  # CLT, 5 s.e.
        assert float(z.min()) >= 0 and float(z.max()) <= 1
    with pytest.raises(ValueError):
        sp.HardConcrete(left=0.5)


def test_diffpruning_projects_onto_p_per_tensor_and_starts_at_theta0_elsewhere():
    net = Net(seed=5)
    theta0 = snapshot(net)
    masks, start, losses = sp.diffpruning(net, _data(), 0.3, sp.DiffPruning(steps=8, batch_size=6), seed=1)
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    for n, m in masks.items():
        assert int(m.sum()) == sp.budget(m.numel(), 0.3)
        assert torch.equal(start[n][~m], theta0[n][~m])
    assert any(not torch.equal(start[n][m], theta0[n][m]) for n, m in masks.items())
    assert all(torch.equal(p.detach(), theta0[n]) for n, p in net.named_parameters())  # the module is untouched


def test_mixout_mixes_towards_theta0_with_the_stated_scaling():
    net = Net(seed=6)
    theta0 = snapshot(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)  # theta = theta_0 + 1 everywhere
    mix = sp.Mixout(net, 0.6)
    # its anchor is the module's parameters at wrapping time
    assert all(torch.equal(mix._anchor[n], p.detach()) for n, p in net.named_parameters())
    mix._anchor = {n: v.clone() for n, v in theta0.items()}
    x = _data(n=4).inputs
    mix.eval()
    assert torch.equal(mix(x), net(x))  # eval: theta itself
    mix.train()
    torch.manual_seed(0)
    got = mix(x)
    torch.manual_seed(0)  # oracle: the same Bernoulli draws, written out
    keep = {n: torch.rand(p.shape) >= 0.6 for n, p in net.named_parameters()}
    w = {n: theta0[n] + keep[n] * 1.0 / 0.4 for n in theta0}
    ref = torch.tanh(x @ w["body.weight"].T + w["body.bias"]) @ w["head.weight"].T + w["head.bias"]
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="mix_prob"):
        sp.Mixout(net, 1.0)


def test_lora_kernel_scale_matches_peft_initialisation():
    from peft import LoraConfig, inject_adapter_in_model

    lin = nn.Sequential(nn.Linear(40, 10))
    torch.manual_seed(0)
    inject_adapter_in_model(LoraConfig(r=50, lora_alpha=10, target_modules=["0"]), lin)
    A = lin[0].lora_A["default"].weight.detach().double()  # (r, fan_in)
    s = lin[0].scaling["default"]
    emp = s * s * float((A ** 2).sum(0).mean())  # the diagonal of s^2 A^T A, averaged
    want = sp.lora_kernel_scale(50, 10, 40)
    # 2000 entries of U(-a, a)^2: the mean has relative s.e. sqrt(4/5 / 2000) ~ 0.02; 5 s.e.
    assert emp == pytest.approx(want, rel=0.1)
    assert sp.lora_kernel_scale(4, 8, 10, init="gaussian") == pytest.approx((8 / 4) ** 2 * 4 / 4 ** 2)  # s^2 r sigma^2


# ----------------------------------------------------------------------- every family through finetune, bit-exact

def _family_masks(net, data):
    params = {n: p.detach() for n, p in net.named_parameters()}
    g = sp.accumulated_gradients(net, data, steps=3, batch_size=8, seed=0)
    return {
        "random": sp.random_masks(params, 0.3, seed=1),
        "magnitude": sp.magnitude_masks(params, 0.3),
        "bitfit": sp.name_masks(params, ("*bias",)),
        "sam": sp.sam_masks(g, 0.3),
        "sam-exact": sp.sam_exact_masks(g, sp.gauss_newton_diagonal(net, data), 0.3),
        "childpruning": sp.childpruning_masks(sp.fisher_diagonal(net, data), 0.3),
        "diffpruning": sp.diffpruning(net, data, 0.3, sp.DiffPruning(steps=4), seed=0)[0],
    }


def test_every_mask_family_leaves_masked_entries_bit_identical():
    data = _data()
    base = Net(seed=7)
    theta0 = snapshot(base)
    for family, masks in _family_masks(base, data).items():
        net = Net(seed=7)
        method = Method(family, Optimizer("adamw", lr=0.05, weight_decay=0.5), steps=6, batch_size=8,
                        params=Params(masks=masks), max_grad_norm=1.0)
        finetune(net, data, method, seed=0)
        for n, p in net.named_parameters():
            assert torch.equal(p.detach()[~masks[n]], theta0[n][~masks[n]]), (family, n)
        assert any(not torch.equal(p.detach(), theta0[n]) for n, p in net.named_parameters()), family
