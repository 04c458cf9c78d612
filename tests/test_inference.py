"""Exact inference against independent oracles: enumeration of all state paths (T <= 5, m <= 3) and
hmmlearn's CategoricalHMM (float64, to 1e-10)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulate.hmm import HMM, MemoryHMM, wei2021_hmm
from simulate.inference import (
    MASK,
    backward,
    forward,
    infer,
    log_likelihood,
    memory_posterior,
    posteriors,
    viterbi,
)
from simulate.oracles import (
    brute_force_log_likelihood,
    brute_force_memory_posterior,
    brute_force_posteriors,
    brute_force_viterbi,
    enumerate_joint,
)
from simulate.sampling import sample
from simulate.verify import hmmlearn_posteriors
from tests.strategies import hmms, memory_hmms, token_batches

# Enumeration sums at most 3^5 = 243 products of <= 11 factors each in float64; the scaled recursion
# reorders the same arithmetic. Relative rounding is a few ulps per factor, so 1e-12 absolute on
# probabilities and on log-likelihoods of order 10 is a generous but meaningful bound (a wrong transition
# index or scaling error shows up at 1e-2).
TOL = 1e-12


@st.composite
def small_case(draw):
    hmm = draw(hmms(max_states=3, max_vocab=4))
    tokens = draw(token_batches(hmm.vocab_size, max_batch=3, max_length=5))
    return hmm, tokens


def _possible(hmm, row):
    _, joint = enumerate_joint(hmm, row)
    return joint.sum() > 1e-280


@given(small_case())
def test_posteriors_and_loglik_match_enumeration(case):
    hmm, tokens = case
    res = infer(hmm, tokens)
    for b, row in enumerate(tokens):
        if not _possible(hmm, row):
            continue
        ll = brute_force_log_likelihood(hmm, row)
        assert abs(res.log_likelihood[b] - ll) <= TOL * max(1.0, abs(ll))
        np.testing.assert_allclose(res.posteriors[b], brute_force_posteriors(hmm, row), atol=TOL)


@given(small_case())
def test_filtered_and_backward_compose_to_posteriors(case):
    hmm, tokens = case
    filt, log_c = forward(hmm, tokens)
    beta = backward(hmm, tokens)
    for b, row in enumerate(tokens):
        if not _possible(hmm, row):
            continue
        # filtered[t] = P(H_t | x_<=t): compare with enumeration of the prefix.
        for t in range(len(row)):
            np.testing.assert_allclose(filt[b, t], brute_force_posteriors(hmm, row[: t + 1])[t], atol=TOL)
        np.testing.assert_allclose(filt[b] * beta[b], brute_force_posteriors(hmm, row), atol=TOL)
        ll = brute_force_log_likelihood(hmm, row)
        assert abs(log_c[b].sum() - ll) <= TOL * max(1.0, abs(ll))


@given(small_case())
def test_viterbi_matches_enumeration(case):
    hmm, tokens = case
    path, logp = viterbi(hmm, tokens)
    for b, row in enumerate(tokens):
        if not _possible(hmm, row):
            continue
        best_path, best_logp = brute_force_viterbi(hmm, row)
        assert abs(logp[b] - best_logp) <= TOL * max(1.0, abs(best_logp))
        # The returned path attains the maximum (ties may pick a different but equally good path).
        paths, joint = enumerate_joint(hmm, row)
        idx = int(np.flatnonzero((paths == path[b]).all(1))[0])
        assert abs(np.log(joint[idx]) - best_logp) <= TOL * max(1.0, abs(best_logp))


@settings(max_examples=15)
@given(hmms(max_states=64, max_vocab=64, min_states=2), st.integers(0, 2**31 - 1))
def test_matches_hmmlearn(hmm, seed):
    tokens = sample(hmm, 4, 30, seed).tokens.astype(np.int64)
    ours = infer(hmm, tokens)
    ll_ref, post_ref = hmmlearn_posteriors(hmm, tokens)
    np.testing.assert_allclose(ours.log_likelihood, ll_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours.posteriors, post_ref, atol=1e-10)
    np.testing.assert_allclose(log_likelihood(hmm, tokens), ll_ref, rtol=1e-10, atol=1e-10)


def test_long_sequences_are_stable():
    hmm = wei2021_hmm(16, 32, seed=4)
    tokens = sample(hmm, 2, 10_000, seed=5).tokens
    res = infer(hmm, tokens)
    assert np.all(np.isfinite(res.log_likelihood)) and np.all(res.log_likelihood < -1000)
    np.testing.assert_allclose(res.posteriors.sum(-1), 1.0, atol=1e-10)
    ll_ref, post_ref = hmmlearn_posteriors(hmm, tokens)
    np.testing.assert_allclose(res.log_likelihood, ll_ref, rtol=1e-10)
    np.testing.assert_allclose(res.posteriors, post_ref, atol=1e-8)


def test_single_sequence_shapes():
    hmm = wei2021_hmm(5, 6, seed=0)
    x = sample(hmm, 1, 12, 0).tokens[0]
    assert posteriors(hmm, x).shape == (12, 5)
    assert np.ndim(log_likelihood(hmm, x)) == 0
    path, lp = viterbi(hmm, x)
    assert path.shape == (12,) and np.ndim(lp) == 0


def test_masked_position_gives_predictive_distribution():
    """With position 0 masked, P(x_0 = v | x_1..T) = sum_h P(H_0 = h | x_1..T) emit[h, v] (the G_0 of Wei et
    al.), which must equal the ratio of joint likelihoods P(x_0 = v, x_1..T) / P(x_1..T)."""
    hmm = wei2021_hmm(4, 5, seed=2)
    x = sample(hmm, 1, 6, 1).tokens[0].astype(np.int64)
    masked = x.copy()
    masked[0] = MASK
    g0 = posteriors(hmm, masked)[0] @ hmm.emit
    denom = np.exp(log_likelihood(hmm, masked))
    for v in range(hmm.vocab_size):
        full = x.copy()
        full[0] = v
        assert abs(g0[v] - np.exp(log_likelihood(hmm, full)) / denom) < 1e-12


def test_impossible_sequence_is_minus_inf_with_nan_posteriors():
    hmm = HMM(np.array([1.0, 0.0]), np.eye(2), np.array([[1.0, 0.0], [0.0, 1.0]]))
    tokens = np.array([[0, 0, 0], [0, 1, 0]])  # second: state 0 can never emit 1
    res = infer(hmm, tokens)
    assert res.log_likelihood[0] == 0.0 and res.log_likelihood[1] == -np.inf
    assert np.all(np.isnan(res.posteriors[1])) and not np.any(np.isnan(res.posteriors[0]))
    assert log_likelihood(hmm, tokens)[1] == -np.inf


def test_bad_tokens_are_errors():
    hmm = wei2021_hmm(3, 4, seed=0)
    with pytest.raises(ValueError, match=r"tokens\[1, 2\] = 4 is outside the vocabulary \(size 4\)"):
        infer(hmm, np.array([[0, 1, 2], [3, 3, 4]]))
    with pytest.raises(TypeError, match="integer array"):
        infer(hmm, np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        infer(hmm, np.zeros((2, 0), dtype=int))


@given(memory_hmms(max_memory=3, max_syntax=2, max_vocab=4), st.lists(st.integers(0, 3), min_size=1, max_size=4))
def test_memory_posterior_matches_enumeration(mh, xs):
    x = np.array(xs) % mh.vocab_size
    _, joint = enumerate_joint(mh, x)
    if joint.sum() < 1e-280:
        return
    post = memory_posterior(mh, x[None])[0]
    assert abs(post.sum() - 1) < 1e-12
    np.testing.assert_allclose(post, brute_force_memory_posterior(mh, x), atol=1e-12)
    # The smoothed joint posterior at any position, summed over syntax, gives the same answer.
    gamma = posteriors(mh, x[None])[0].reshape(len(x), mh.num_memory, mh.num_syntax).sum(-1)
    np.testing.assert_allclose(gamma, np.broadcast_to(post, gamma.shape), atol=1e-12)


@given(hmms(max_states=6, max_vocab=6), st.integers(0, 1000))
def test_memory_hmm_with_one_value_reduces_to_plain(hmm, seed):
    mh = MemoryHMM(np.ones(1), hmm.start, hmm.trans, hmm.emit[None])
    tokens = sample(hmm, 3, 8, seed).tokens
    a, b = infer(hmm, tokens), infer(mh, tokens)
    assert np.array_equal(a.log_likelihood, b.log_likelihood)
    np.testing.assert_array_equal(a.posteriors, b.posteriors)
    np.testing.assert_allclose(memory_posterior(mh, tokens), 1.0)
    assert np.array_equal(sample(mh, 5, 7, seed).tokens, sample(hmm, 5, 7, seed).tokens)
