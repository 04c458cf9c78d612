"""Exact inference against independent oracles: enumeration of all state paths (T <= 5, m <= 3) and
hmmlearn's CategoricalHMM (float64, to 1e-10)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulate import inference
from simulate.hmm import HMM, MemoryHMM, memory_hmm, wei2021_hmm
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


# --- chunks and threads (issue 11) ---------------------------------------------------------------------------
# The chunk grid depends only on (B, m), so ``workers`` cannot change a bit by construction; these tests check
# the part that is an empirical property of BLAS: a sequence's result does not depend on which rows share its
# chunk. They compare a fine grid (2-5 rows per chunk, threads) with one chunk for the whole batch, bit for bit.

ONE_CHUNK = 1 << 40  # CHUNK_STEP_FLOATS / VITERBI_STEP_FLOATS large enough for any batch to be one chunk


def _all_outputs(hmm, tokens, workers):
    res = infer(hmm, tokens, workers=workers)
    filt, log_c = forward(hmm, tokens, workers=workers)
    path, logp = viterbi(hmm, tokens, workers=workers)
    return {"posteriors": res.posteriors, "log_likelihood": res.log_likelihood, "filtered": res.filtered,
            "forward": filt, "log_c": log_c, "backward": backward(hmm, tokens, workers=workers),
            "log_likelihood_fn": log_likelihood(hmm, tokens, workers=workers), "path": path, "log_prob": logp}


def _with_grid(hmm, tokens, workers, fb_floats, viterbi_floats):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "CHUNK_STEP_FLOATS", fb_floats)
        mp.setattr(inference, "VITERBI_STEP_FLOATS", viterbi_floats)
        return _all_outputs(hmm, tokens, workers)


def _assert_bitwise(a, b):
    for name in a:
        # assert_array_equal treats NaN as equal to NaN (impossible sequences) and checks dtype-independent
        # values exactly: not a tolerance.
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert a[name].shape == b[name].shape, name


@st.composite
def chunked_case(draw):
    hmm = draw(hmms(max_states=3, max_vocab=4))
    tokens = draw(token_batches(hmm.vocab_size, max_batch=13, max_length=5))
    rows = draw(st.integers(2, 5))
    workers = draw(st.sampled_from([1, 2, 3]))
    return hmm, tokens, rows, workers


@given(chunked_case())
def test_chunked_threaded_equals_one_chunk_bitwise_and_enumeration(case):
    hmm, tokens, rows, workers = case
    m = hmm.num_states
    one = _with_grid(hmm, tokens, 1, ONE_CHUNK, ONE_CHUNK)
    many = _with_grid(hmm, tokens, workers, rows * m, rows * m * m)
    assert len(inference.chunk_slices(len(tokens), rows)) >= min(2, len(tokens) // rows)
    _assert_bitwise(many, one)
    for b, row in enumerate(tokens):  # and the chunked answer is the right one
        if not _possible(hmm, row):
            continue
        ll = brute_force_log_likelihood(hmm, row)
        assert abs(many["log_likelihood"][b] - ll) <= TOL * max(1.0, abs(ll))
        np.testing.assert_allclose(many["posteriors"][b], brute_force_posteriors(hmm, row), atol=TOL)
        _, best_logp = brute_force_viterbi(hmm, row)
        assert abs(many["log_prob"][b] - best_logp) <= TOL * max(1.0, abs(best_logp))


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_default_and_fine_grids_equal_one_chunk_bitwise_and_hmmlearn(workers):
    """A realistic size: m = 32 (the benchmark's), 301 sequences so the default grid has two chunks of 150
    and 151 rows and a 7-row grid ends in a short chunk; masked positions included."""
    hmm = wei2021_hmm(32, 64, seed=7)
    tokens = sample(hmm, 301, 40, seed=8).tokens.astype(np.int64)
    tokens[::5, 3] = MASK
    one = _with_grid(hmm, tokens, 1, ONE_CHUNK, ONE_CHUNK)
    default = _all_outputs(hmm, tokens, workers)
    assert len(inference.chunk_slices(301, inference.CHUNK_STEP_FLOATS // 32)) == 2
    _assert_bitwise(default, one)
    _assert_bitwise(_with_grid(hmm, tokens, workers, 7 * 32, 7 * 32 * 32), one)
    unmasked = tokens[1:40].copy()
    unmasked[unmasked < 0] = 0
    ll_ref, post_ref = hmmlearn_posteriors(hmm, unmasked)
    ours = infer(hmm, unmasked, workers=workers)
    np.testing.assert_allclose(ours.log_likelihood, ll_ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(ours.posteriors, post_ref, atol=1e-10)


def test_memory_posterior_is_the_same_for_any_grid_and_workers():
    mh = memory_hmm(num_memory=3, num_syntax=4, vocab_size=6, seed=2)
    tokens = sample(mh, 57, 15, seed=3).tokens
    ref = memory_posterior(mh, tokens)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "CHUNK_STEP_FLOATS", 3 * mh.num_states)
        np.testing.assert_array_equal(memory_posterior(mh, tokens, workers=3), ref)
    np.testing.assert_allclose(ref.sum(-1), 1.0, atol=1e-12)


@given(st.integers(1, 3000), st.integers(1, 400))
def test_chunk_grid_covers_the_batch_evenly_without_one_row_chunks(num, rows):
    chunks = inference.chunk_slices(num, rows)
    bounds = [c.start for c in chunks] + [chunks[-1].stop]
    assert bounds[0] == 0 and bounds[-1] == num and all(c.step is None for c in chunks)
    sizes = np.diff(bounds)
    assert np.all(sizes >= 1) and (num == 1 or np.all(sizes >= 2))
    assert sizes.max() <= max(2, rows) + 1  # +1: no one-row chunk (B = 3, rows = 2 is one chunk of 3)
    assert len(chunks) <= -(-num // max(2, rows))
    assert sizes.max() - sizes.min() <= 1  # even work for threads


def test_loop_runs_with_one_blas_thread_and_restores_the_pool():
    """The forward-backward loop of a large call runs with BLAS held to one thread, whatever the caller set;
    the caller's setting is back afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    if not blas_threads():
        pytest.skip("numpy reports no BLAS library to threadpoolctl")
    hmm = wei2021_hmm(32, 64, seed=0)
    tokens = sample(hmm, 512, 16, seed=1).tokens  # B * T * m^2 = 2^23 = LIMIT_MIN_WORK
    assert 512 * 16 * 32 * 32 >= inference.LIMIT_MIN_WORK
    seen = []
    original = inference._forward_chunk

    def spy(*args):
        seen.append(blas_threads())
        return original(*args)

    with threadpool_limits(limits=2, user_api="blas"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(inference, "_forward_chunk", spy)
        before = blas_threads()
        infer(hmm, tokens)
        after = blas_threads()
    assert seen and all(s == {1} for s in seen)
    assert after == before


def test_workers_must_be_a_positive_integer():
    hmm = wei2021_hmm(3, 4, seed=0)
    tokens = sample(hmm, 4, 5, seed=0).tokens
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="workers must be an integer >= 1"):
            infer(hmm, tokens, workers=bad)
        with pytest.raises(ValueError, match="workers must be an integer >= 1"):
            viterbi(hmm, tokens, workers=bad)
