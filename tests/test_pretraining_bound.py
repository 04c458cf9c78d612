"""theory.pretraining_bound against oracles: enumeration, scipy, closed forms; theorems as hypothesis properties.

Slack conventions: exact identities are compared at float64 rounding (1e-12 relative unless said); inequalities that
are theorems get a relative slack of 1e-12 for rounding; statistical statements use a binomial or concentration
threshold whose false-alarm probability (if the theorem holds) is stated next to it.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import minimize
from scipy.special import rel_entr
from scipy.stats import binom

from theory.pretraining_bound import (
    ball_least_squares,
    clipped_square_bound,
    envelope_constant,
    fit_transferability,
    inner_max_projected_ascent,
    khintchine_kahane_bounds,
    kl_rows,
    linear_head_sup,
    mcdiarmid_halfwidth,
    pinsker_transfer_constants,
    pretraining_excess_risk,
    rademacher_linear,
    rademacher_linear_exact,
    radreg_penalty,
    square_loss_range,
    squared_excess,
    zero_one_excess,
)

seeds = st.integers(0, 2**31 - 1)


def _features(seed: int, m: int, d: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, d)) * rng.uniform(0.1, 3.0, size=(m, 1))


def _brute_rademacher(h: np.ndarray, B: float) -> float:
    """Every one of the 2^m sign vectors (no symmetry trick), sup by the closed form of each."""
    m = h.shape[0]
    vals = [B * np.linalg.norm(np.asarray(s) @ h / m) for s in itertools.product((1.0, -1.0), repeat=m)]
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------- Rademacher complexity

@given(seeds, st.integers(1, 9), st.integers(1, 4), st.floats(0.1, 10.0))
def test_exact_rademacher_equals_full_enumeration(seed, m, d, B):
    h = _features(seed, m, d)
    assert rademacher_linear_exact(h, B) == pytest.approx(_brute_rademacher(h, B), rel=1e-12)


@given(seeds, st.integers(1, 6), st.integers(1, 4), st.floats(0.1, 5.0))
def test_linear_head_sup_is_the_supremum(seed, m, d, B):
    """Cauchy-Schwarz: no head in the ball beats B ||v||, and B v / ||v|| attains it."""
    rng = np.random.default_rng(seed)
    v = rng.normal(size=d)
    top, w_star = linear_head_sup(v, B)
    assert float(w_star @ v) == pytest.approx(top, rel=1e-12)
    assert np.linalg.norm(w_star) <= B * (1 + 1e-12)
    w = rng.normal(size=(500, d))
    w *= (B * rng.uniform(0, 1, size=(500, 1)) ** (1 / d)) / np.linalg.norm(w, axis=1, keepdims=True)
    assert np.all(w @ v <= top * (1 + 1e-12) + 1e-15)


@given(seeds, st.integers(1, 12), st.integers(1, 5))
def test_khintchine_kahane_sandwich(seed, m, d):
    """(B/m) sqrt(sum||h||^2) / sqrt(2) <= Rad <= (B/m) sqrt(sum||h||^2): a theorem, slack 1e-12 for rounding."""
    h = _features(seed, m, d)
    lo, hi = khintchine_kahane_bounds(h, 1.7)
    ex = rademacher_linear_exact(h, 1.7)
    assert lo * (1 - 1e-12) <= ex <= hi * (1 + 1e-12)


def test_khintchine_lower_constant_is_attained():
    """m = 2 identical vectors: E||s1 h + s2 h|| = ||h|| = sqrt(2 ||h||^2) / sqrt(2): the constant is sharp."""
    h = np.array([[3.0, 4.0], [3.0, 4.0]])
    lo, _ = khintchine_kahane_bounds(h, 1.0)
    assert rademacher_linear_exact(h, 1.0) == pytest.approx(lo, rel=1e-14)


@given(seeds, st.integers(2, 10), st.integers(1, 4))
def test_monte_carlo_within_mcdiarmid_halfwidth(seed, m, d):
    """At delta = 1e-9 the McDiarmid half-width fails with probability <= 1e-9 per example."""
    h = _features(seed, m, d)
    est = rademacher_linear(h, 2.0, 300, seed, delta=1e-9)
    assert abs(est.value - rademacher_linear_exact(h, 2.0)) < est.halfwidth


def test_mcdiarmid_and_clt_coverage_at_fixed_seed():
    """Over 400 repetitions the 5% McDiarmid half-width misses at most the binomial 1 - 1e-6 quantile of 5% (it is
    conservative, so usually never), and the CLT 95% interval covers at least the 1e-6 quantile of 95%."""
    h = _features(3, 11, 4)
    exact = rademacher_linear_exact(h, 1.0)
    rng = np.random.default_rng(0)
    ests = [rademacher_linear(h, 1.0, 100, rng, delta=0.05) for _ in range(400)]
    miss = sum(abs(e.value - exact) >= e.halfwidth for e in ests)
    clt = sum(abs(e.value - exact) <= 1.959964 * e.std_error for e in ests)
    assert miss <= binom.ppf(1 - 1e-6, 400, 0.05)
    assert clt >= binom.ppf(1e-6, 400, 0.95)


def test_mcdiarmid_halfwidth_formula():
    h = np.ones((4, 1))
    # (B/m) sqrt(2 S log(2/delta) / K) with S = 4, B = 1, m = 4, K = 8, delta = e^-1 * 2
    assert mcdiarmid_halfwidth(h, 1.0, 8, 2 * math.exp(-1)) == pytest.approx(0.25 * math.sqrt(2 * 4 / 8))


def test_exact_enumeration_refuses_large_m():
    with pytest.raises(ValueError, match="exceeds"):
        rademacher_linear_exact(np.ones((21, 2)), 1.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf")])
def test_bad_head_norm_is_an_error(bad):
    with pytest.raises(ValueError, match="head norm B"):
        rademacher_linear(np.ones((3, 2)), bad)


@given(seeds, st.integers(2, 8), st.integers(1, 4), st.floats(0.2, 3.0))
def test_projected_ascent_reaches_the_closed_form(seed, m, d, B):
    h = _features(seed, m, d)
    sigma = np.where(np.random.default_rng(seed).uniform(size=m) < 0.5, -1.0, 1.0)
    v = sigma @ h / m
    val, w = inner_max_projected_ascent(h, sigma, B, steps=2000)
    # a linear objective: ascent reaches the sphere once 2000 ||v|| >= B, after which it is exact
    if 2000 * np.linalg.norm(v) >= B:
        assert val == pytest.approx(B * np.linalg.norm(v), rel=1e-10)
    assert np.linalg.norm(w) <= B * (1 + 1e-12)


# --------------------------------------------------------------------------------------- ball least squares

@given(seeds, st.integers(3, 30), st.integers(1, 5), st.sampled_from([0.01, 0.3, 3.0, 100.0]))
def test_ball_least_squares_matches_slsqp(seed, N, d, B):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(N, d))
    y = rng.normal(size=N)
    got = ball_least_squares(X, y, B)
    ref = minimize(lambda w: np.mean((X @ w - y) ** 2), np.zeros(d), method="SLSQP",
                   constraints=[{"type": "ineq", "fun": lambda w: B ** 2 - w @ w}],
                   options={"ftol": 1e-15, "maxiter": 2000})
    assert np.linalg.norm(got.w) <= B * (1 + 1e-12)
    # ours is the exact optimum: never worse than SLSQP beyond its tolerance
    assert got.value <= ref.fun * (1 + 1e-9) + 1e-14
    # KKT: w = (G + lambda I)^{-1} b with lambda >= 0, complementary slackness
    G, b = X.T @ X / N, X.T @ y / N
    assert got.lagrange >= 0
    if got.active:
        assert np.linalg.norm(got.w) == pytest.approx(B, rel=1e-9)
        np.testing.assert_allclose((G + got.lagrange * np.eye(d)) @ got.w, b, atol=1e-8 * max(1, np.abs(b).max()))


def test_ball_least_squares_rank_deficient_inactive_is_min_norm():
    X = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    y = np.array([1.0, 2.0, 3.0])
    got = ball_least_squares(X, y, 10.0)
    np.testing.assert_allclose(got.w, [0.5, 0.5], atol=1e-12)
    assert got.value == pytest.approx(0.0, abs=1e-20) and not got.active


# ------------------------------------------------------------------------------------- risks and transferability

@given(seeds, st.integers(1, 20), st.integers(2, 8))
def test_kl_rows_matches_scipy(seed, N, n):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(n, 0.5), size=N)
    p[0, 0] = 0.0
    p[0] /= p[0].sum()
    q = rng.dirichlet(np.ones(n), size=N)
    np.testing.assert_allclose(kl_rows(p, np.log(q)), rel_entr(p, q).sum(axis=1), rtol=1e-12, atol=1e-15)


def test_pretraining_excess_risk_is_zero_at_the_truth():
    G = np.random.default_rng(0).dirichlet(np.ones(5), size=50)
    mean, se = pretraining_excess_risk(G, np.log(G))
    assert abs(mean) < 1e-15 and se < 1e-15


@given(seeds, st.integers(1, 30), st.integers(2, 8), st.floats(0.0, 3.0))
def test_pinsker_transferability_is_a_theorem(seed, N, n, temp):
    """For any exact conditionals G, any model q, any u in [0, 1]^n and any input weights: E(<u, q> - p)^2 <=
    span(u)^2 / 2 E KL(G || q) and the plug-in 0-1 excess <= sqrt(2) span(u) sqrt(E KL) (slack 1e-12 relative)."""
    rng = np.random.default_rng(seed)
    G = rng.dirichlet(np.full(n, 0.7), size=N)
    log_q = torch.log_softmax(torch.as_tensor(np.log(G) + temp * rng.normal(size=G.shape)), -1).numpy()
    q = np.exp(log_q)
    u = rng.uniform(0, 1, size=n)
    px = rng.dirichlet(np.ones(N))
    p = G @ u
    ekl = max(float(px @ kl_rows(G, log_q)), 0.0)  # at temp = 0, q = G up to rounding: KL ~ +-1e-16
    c2, b2 = pinsker_transfer_constants(u, "squared")
    c01, b01 = pinsker_transfer_constants(u, "zero_one")
    assert (b2, b01) == (1.0, 0.5)
    # absolute slack: the KL of q = G (rounded through log-softmax) is ~1e-16, and a prediction within 1e-16 of
    # p = 1/2 may flip sides at an excess |2p - 1| ~ 1e-16
    assert float(px @ squared_excess(q @ u, p)) <= c2 * ekl * (1 + 1e-12) + 1e-14
    assert float(px @ zero_one_excess(q @ u, p)) <= c01 * math.sqrt(ekl) * (1 + 1e-12) + 1e-12


def test_zero_one_excess_oracle():
    p = np.array([0.9, 0.2, 0.5, 0.6])
    f = np.array([0.1, 0.1, 0.4, 0.7])
    # disagreements: x0 (|2p-1| = 0.8), x2 (Bayes 1[0.5 >= 0.5] = 1 vs 0: |2p-1| = 0)
    np.testing.assert_allclose(zero_one_excess(f, p), [0.8, 0.0, 0.0, 0.0])


@given(st.floats(-3, 3), st.floats(0, 3))
def test_square_loss_range_against_a_grid(s_min, width):
    s_max = s_min + width
    s = np.linspace(s_min, s_max, 2001)
    brute = max(float((s ** 2).max()), float(((s - 1) ** 2).max()))
    assert square_loss_range(s_min, s_max) == pytest.approx(brute, rel=1e-12)


@given(seeds, st.floats(0.05, 10.0), st.floats(0.2, 2.0))
def test_fit_recovers_a_power_law_and_the_envelope_holds(seed, C, beta):
    rng = np.random.default_rng(seed)
    e = np.exp(rng.uniform(-5, 1, size=10))
    fit = fit_transferability(e, C * e ** beta)
    assert fit.beta == pytest.approx(beta, rel=1e-9, abs=1e-9)
    assert fit.c_ls == pytest.approx(C, rel=1e-8)
    assert fit.c_envelope == pytest.approx(C, rel=1e-8)
    t = C * e ** beta * np.exp(rng.normal(size=10))
    noisy = fit_transferability(e, t)
    assert np.all(t <= noisy.predict(e) * (1 + 1e-12))
    assert noisy.c_envelope == pytest.approx(envelope_constant(e, t, noisy.beta))
    assert noisy.c_envelope >= noisy.c_ls * (1 - 1e-12)  # the envelope sits above the middle


def test_fit_needs_two_distinct_points():
    with pytest.raises(ValueError, match="two points"):
        fit_transferability([0.1, 0.1], [0.2, 0.3])


# ------------------------------------------------------------------------------------------------ the bound

def _finite_world(rng, M=60, d=3):
    Hx = rng.normal(size=(M, d)) / math.sqrt(d)
    p = 1 / (1 + np.exp(-(Hx @ rng.normal(size=d)) * 2 - rng.normal(size=M) * 0.5))
    return Hx, p


def test_bound_holds_with_the_stated_probability():
    """A finite input distribution with exact p: over 300 labelled samples the bound may fail in at most the binomial
    1 - 1e-6 quantile of delta = 0.1 (false alarm <= 1e-6 if the theorem holds)."""
    rng = np.random.default_rng(11)
    Hx, p = _finite_world(rng)
    B, n, delta, reps = 2.0, 24, 0.1, 300
    comp = ball_least_squares(Hx, p, B)
    transfer = float(squared_excess(Hx @ comp.w, p).mean())
    r = float(np.linalg.norm(comp.w) * np.linalg.norm(Hx, axis=1).max())
    b_bar = square_loss_range(-r, r)
    fails, tight = 0, []
    for _ in range(reps):
        idx = rng.integers(0, len(p), size=n)
        y = (rng.uniform(size=n) < p[idx]).astype(float)
        w_hat = ball_least_squares(Hx[idx], y, B).w
        excess = float(squared_excess(np.clip(Hx @ w_hat, 0, 1), p).mean())
        terms = clipped_square_bound(transfer, rademacher_linear(Hx[idx], B, 300, rng, delta / 3), n, b_bar, delta)
        fails += excess > terms.total
        tight.append(terms.total / excess)
        assert excess >= 0
    assert fails <= binom.ppf(1 - 1e-6, reps, delta)


def test_bound_terms_and_their_errors():
    rad = rademacher_linear(np.ones((4, 2)), 1.0, 10, 0, delta=0.05 / 3)
    t = clipped_square_bound(0.1, rad, 100, 2.0, 0.05)
    assert t.total == pytest.approx(0.1 + 4 * rad.upper + 3 * math.sqrt(math.log(120) / 200)
                                    + 2 * math.sqrt(math.log(60) / 200))
    with pytest.raises(ValueError, match="delta / 3"):
        clipped_square_bound(0.1, rademacher_linear(np.ones((4, 2)), 1.0, 10, 0, delta=0.05), 100, 2.0, 0.05)
    more = clipped_square_bound(0.1, rad, 1000, 2.0, 0.05)
    assert more.uniform < t.uniform and more.comparator < t.comparator


# ------------------------------------------------------------------------------------------------- RadReg

def test_radreg_penalty_gradient_is_danskins(one_torch_thread):
    rng = np.random.default_rng(5)
    h = torch.tensor(rng.normal(size=(7, 3)), dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(9)
    radreg_penalty(h, 2.0, num_draws=1, generator=g).backward()
    sigma = (torch.randint(0, 2, (1, 7), generator=torch.Generator().manual_seed(9)).double() * 2 - 1).numpy()[0]
    _, w = linear_head_sup(sigma @ h.detach().numpy() / 7, 2.0)
    np.testing.assert_allclose(h.grad.numpy(), np.outer(sigma, w) / 7, atol=1e-14)


def test_radreg_penalty_is_unbiased(one_torch_thread):
    """The mean of 200 penalties of 32 draws is within 4 standard errors of the exact value (false alarm ~6e-5)."""
    h = torch.tensor(_features(2, 9, 3))
    g = torch.Generator().manual_seed(0)
    vals = torch.stack([radreg_penalty(h, 1.5, 32, generator=g) for _ in range(200)]).numpy()
    exact = rademacher_linear_exact(h.numpy(), 1.5)
    assert abs(vals.mean() - exact) <= 4 * vals.std(ddof=1) / math.sqrt(len(vals))
