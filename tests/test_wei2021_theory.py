"""The linear algebra of head and prompt tuning (theory/wei2021.py) against independent oracles: the theorems
as hypothesis properties over random HMMs, brute-force enumeration for the prompt derivation, scikit-learn
for the logistic head, and hand-checkable cases for the LP and the Bayes ceiling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from simulate.hmm import HMM
from simulate.inference import MASK, infer
from simulate.sampling import sample
from simulate.wei2021.oracles import (
    brute_force_prompted_posterior,
    head_ceiling,
    identical_twins_hmm,
    mask_posteriors,
    mirror_twins_hmm,
)
from tests.strategies import hmms, stochastic_matrices
from theory.wei2021 import (
    accuracy,
    bayes_ceiling,
    fit_logistic_head,
    hard_margin,
    head_certificate,
    nondegeneracy,
    prompt_certificate,
    prompted_features,
    reversal_kernel,
    reweight,
    stationary_distribution,
    token_prompt_oracle,
)


@st.composite
def hmm_and_inputs(draw, min_states=2, max_states=6, min_vocab=2, max_vocab=8, full_rank_emit=True):
    """A random HMM with an emission matrix whose rows are well conditioned enough for a pseudo-inverse
    (sigma_min >= 1e-3, so the float64 identities below hold to ~1e-9), and 40 masked inputs of length 6."""
    m = draw(st.integers(min_states, max_states))
    n = draw(st.integers(max(min_vocab, m) if full_rank_emit else min_vocab, max_vocab))
    start = draw(stochastic_matrices(1, m, allow_near_zero=False))[0]
    hmm = HMM(start, draw(stochastic_matrices(m, m)), draw(stochastic_matrices(m, n, allow_near_zero=False)))
    seed = draw(st.integers(0, 2**31 - 1))
    observed = sample(hmm, 40, 7, seed).tokens[:, 1:].astype(np.int64)
    return hmm, observed, seed


@given(hmm_and_inputs())
def test_head_certificate_recovers_mu_dot_posterior_when_W_has_full_column_rank(case):
    hmm, observed, seed = case
    diag = nondegeneracy(hmm.emit)
    assume(diag.head_condition and diag.sigma_min_W > 1e-3)
    mu = np.random.default_rng(seed).standard_normal(hmm.num_states)
    post = mask_posteriors(hmm, observed)
    G0 = post @ hmm.emit
    # Theorem: G_0 W^+T mu = mu^T P exactly; float64 rounding is amplified by cond(W) <= 1/sigma_min.
    tol = 1e-12 / diag.sigma_min_W
    np.testing.assert_allclose(G0 @ head_certificate(hmm.emit, mu), post @ mu, atol=tol)


@given(hmm_and_inputs(min_states=4, max_states=8, min_vocab=2, max_vocab=4, full_rank_emit=False),
       st.integers(1, 3))
def test_prompt_certificate_is_exact_when_only_W_A_has_full_column_rank(case, support_size):
    hmm, observed, seed = case
    m, n = hmm.num_states, hmm.vocab_size
    assume(support_size <= n and m > n)  # W cannot have full column rank; W_A can
    rng = np.random.default_rng(seed)
    mu = np.zeros(m)
    mu[rng.choice(m, support_size, replace=False)] = rng.standard_normal(support_size)
    diag = nondegeneracy(hmm.emit, mu)
    assume(diag.prompt_condition and diag.sigma_min_WA > 1e-3)
    assert not diag.head_condition
    post = mask_posteriors(hmm, observed)
    u, b = prompt_certificate(hmm.emit, mu)
    scores = prompted_features(post, hmm.emit, np.eye(m), u) @ b
    # Theorem: the prompted head scores mu^T P / <1, P_A>, a positive rescaling of mu^T P.
    A = np.flatnonzero(mu)
    np.testing.assert_allclose(scores, (post @ mu) / post[:, A].sum(1), atol=1e-12 / diag.sigma_min_WA)


@given(hmms(max_states=5, max_vocab=5), st.integers(0, 2**31 - 1))
def test_constant_prompt_is_head_tuning(hmm, seed):
    """R is row-stochastic, so u = c 1 gives w = c 1 and P_u = P: prompt tuning contains head tuning."""
    rng = np.random.default_rng(seed)
    post = rng.dirichlet(np.ones(hmm.num_states), size=10)
    R = reversal_kernel(hmm.trans)
    np.testing.assert_allclose(R.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(reweight(post, R @ np.full(hmm.num_states, 3.7)), post, atol=1e-12)


@given(hmms(max_states=3, max_vocab=3, min_states=1), st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_reweighting_equals_enumeration_with_an_explicit_prompt_position(hmm, seed, length):
    """The derivation in reversal_kernel: a prompt at position -1 in a stationary chain reweights P(H_0 | x)
    by R u. Brute force enumerates every path h_-1..h_T with the prompt likelihood at h_-1."""
    rng = np.random.default_rng(seed)
    pi = stationary_distribution(hmm.trans)
    chain = HMM(pi, hmm.trans, hmm.emit)
    np.testing.assert_allclose(pi @ hmm.trans, pi, atol=1e-10)
    observed = rng.integers(0, hmm.vocab_size, size=length)
    u = rng.random(hmm.num_states) + 0.05
    full = np.concatenate([[MASK], observed])[None]
    res = infer(chain, full)
    assume(np.isfinite(res.log_likelihood[0]) and res.log_likelihood[0] > -200)
    brute = brute_force_prompted_posterior(hmm.trans, hmm.emit, pi, u, observed)
    ours = reweight(res.posteriors[0, 0], reversal_kernel(hmm.trans, pi) @ u)
    # Both are sums of <= 3^5 products of <= 11 factors; 1e-9 absolute covers the rounding (a wrong
    # transpose in R shows up at 1e-2).
    np.testing.assert_allclose(ours, brute, atol=1e-9)


@given(hmms(max_states=5, max_vocab=4), st.integers(0, 2**31 - 1))
def test_token_prompt_is_an_observed_token_one_step_before_H0(hmm, seed):
    """u = W^T e_v is what observing x_{-1} = v does: reweighting by R u equals forward-backward on
    [v, MASK, x_1..T] in the chain started at pi (an independent code path: simulate.inference).

    The unprompted posterior is the one under H_0's own marginal q = pi T. With pi the computed stationary
    distribution q = pi only up to the eigen-solver's error, which is *relative* 1e-6 or worse on entries of
    1e-10 (near-absorbing chains): the plain chain therefore starts at q, which makes the identity exact."""
    pi = stationary_distribution(hmm.trans)
    chain = HMM(pi, hmm.trans, hmm.emit)
    q = pi @ hmm.trans
    rng = np.random.default_rng(seed)
    observed = rng.integers(0, hmm.vocab_size, size=(8, 4))
    v = int(rng.integers(hmm.vocab_size))
    plain = infer(HMM(q / q.sum(), hmm.trans, hmm.emit), np.concatenate([np.full((8, 1), MASK), observed], 1))
    prompted = infer(chain, np.concatenate([np.full((8, 1), v), np.full((8, 1), MASK), observed], 1))
    ok = np.isfinite(prompted.log_likelihood) & (prompted.log_likelihood > -200)
    assume(ok.any())
    ours = reweight(plain.posteriors[ok, 0], reversal_kernel(hmm.trans, pi) @ hmm.emit[:, v])
    # Ratios of sums of <= m^6 positive products: 1e-9 absolute is rounding (a wrong row/column of emit
    # gives errors of order 1e-1).
    np.testing.assert_allclose(ours, prompted.posteriors[ok, 1], atol=1e-9)


def test_token_prompt_oracle_is_weaker_than_a_soft_prompt_and_contains_head_tuning():
    """Mirror twins (R = I): the soft prompt u = 1_{A,B} is exact, but no real token is. Token 2 has
    u = 1_{A,B'} and token 3 u = 1_{B,A'}: either leaves two states that emit the *same* token, so G_0^u
    is constant; tokens 0, 1 (emitted only by the signal states) rule out every H_0 state. So the oracle
    stays at the share of the majority class of a fair-coin label. Then a generic HMM: the oracle's train
    accuracy is at least the plain head's (u = const is a candidate), and its test accuracy is the chosen
    token's, refitted."""
    from simulate.wei2021.oracles import downstream_data, wei2021_task

    hmm, mu = mirror_twins_hmm()
    x = sample(hmm, 600, 4, 0).tokens.astype(np.int64)
    post = mask_posteriors(hmm, x[:, 1:])
    y = (post @ mu >= 0).astype(np.int64)
    res = token_prompt_oracle(post[:400], y[:400], post[400:], y[400:], hmm.emit, np.eye(6))
    # 200 test labels of a fair coin: 0.62 is 3.4 standard errors above 1/2.
    assert res.test_accuracy <= 0.62
    u_c, b_c = prompt_certificate(hmm.emit, mu)
    assert accuracy(prompted_features(post[400:], hmm.emit, np.eye(6), u_c) @ b_c, y[400:]) == 1.0

    g, gmu = wei2021_task(15, 10, 0, 0, length=8)
    d = downstream_data(g, gmu, 900, 8, seed=1)
    R = reversal_kernel(g.trans)
    res = token_prompt_oracle(d.post0[:600], d.labels[:600], d.post0[600:], d.labels[600:], g.emit, R)
    plain = fit_logistic_head(d.G0[:600], d.labels[:600], l2=1e-6)
    assert res.train_accuracy >= accuracy(plain.scores(d.G0[:600]), d.labels[:600])
    u = np.ones(15) if res.token is None else g.emit[:, res.token]
    refit = fit_logistic_head(prompted_features(d.post0[:600], g.emit, R, u), d.labels[:600], l2=1e-6)
    assert res.test_accuracy == accuracy(refit.scores(prompted_features(d.post0[600:], g.emit, R, u)),
                                         d.labels[600:])


def test_nondegeneracy_matches_numpy():
    rng = np.random.default_rng(0)
    emit = rng.dirichlet(np.ones(5), size=7)  # m = 7 > n = 5
    mu = np.zeros(7)
    mu[[1, 4]] = [1.0, -2.0]
    d = nondegeneracy(emit, mu)
    assert d.rank_W == np.linalg.matrix_rank(emit) == 5 and not d.head_condition
    assert d.sigma_min_W == 0.0
    assert d.rank_WA == 2 and d.prompt_condition
    assert d.sigma_min_WA == pytest.approx(np.linalg.svd(emit[[1, 4]], compute_uv=False)[-1], rel=1e-12)
    twins = emit.copy()
    twins[4] = twins[1]
    assert not nondegeneracy(twins, mu).prompt_condition


def test_logistic_head_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    X = rng.standard_normal((400, 4)) * [1.0, 3.0, 0.2, 1.0] + 0.5
    y = (X @ [1.0, -0.5, 2.0, 0.3] + 0.5 * rng.standard_normal(400) > 0.3).astype(int)
    l2 = 1e-2
    ours = fit_logistic_head(X, y, l2=l2)
    # Same objective: sklearn minimises C * sum log-loss + |w|^2 / 2 on the same standardised features.
    mean, std = X.mean(0), X.std(0)
    ref = LogisticRegression(C=1.0 / (len(y) * l2), tol=1e-12, max_iter=10_000).fit((X - mean) / std, y)
    np.testing.assert_allclose(ours.weight, ref.coef_[0] / std, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ours.bias, ref.intercept_[0] - (ref.coef_[0] / std) @ mean, rtol=1e-4, atol=1e-6)


def test_hard_margin_detects_separability():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 3))
    y = (X @ [1.0, 2.0, -1.0] > 0.1).astype(int)
    t, head = hard_margin(X, y)
    assert t > 0 and accuracy(head.scores(X), y) == 1.0
    # XOR is not linearly separable: the LP optimum is t <= 0.
    Xx = np.array([[0, 0], [1, 1], [0, 1], [1, 0]], dtype=float)
    t_xor, _ = hard_margin(Xx, np.array([0, 0, 1, 1]))
    assert t_xor <= 1e-9


def test_bayes_ceiling_by_hand():
    feats = np.array([[0.0], [0.0], [1.0], [1.0]])
    probs = np.array([0.3, 0.2, 0.4, 0.1])
    labels = np.array([1, 0, 1, 1])
    # group 0: max(0.3, 0.2) = 0.3; group 1: 0.5 -> 0.8
    assert bayes_ceiling(feats, probs, labels) == pytest.approx(0.8)


@pytest.mark.parametrize("length", [1, 3, 4])
def test_mirror_twins_defeat_every_head_but_not_the_prompt(length):
    hmm, mu = mirror_twins_hmm()
    u, _ = prompt_certificate(hmm.emit, mu)
    assert head_ceiling(hmm, mu, length) == pytest.approx(0.5, abs=1e-12)
    assert head_ceiling(hmm, mu, length, u=u) == pytest.approx(1.0, abs=1e-12)
    twins, mu2 = identical_twins_hmm()
    assert head_ceiling(twins, mu2, length, u=prompt_certificate(twins.emit, mu2)[0]) == pytest.approx(0.5, abs=1e-12)


def test_reweight_flags_impossible_prompts():
    post = np.array([[0.5, 0.5, 0.0]])
    out = reweight(post, np.array([0.0, 0.0, 1.0]))
    assert np.isnan(out).all()
