"""The sampler: alias tables are exact, draws match exact marginals within a CLT tolerance, and the same
seed gives the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulate.hmm import memory_hmm, random_hmm, wei2021_hmm
from simulate.oracles import state_marginals, token_marginals
from simulate.sampling import BLOCK_TOKENS, alias_table, block_sequences, sample, smallest_uint
from simulate.verify import clt_threshold, marginal_z_scores
from tests.strategies import stochastic_matrices


def implied_distribution(table) -> np.ndarray:
    """The exact distribution an alias table samples: outcome v gets (prob[v] + sum of (1 - prob[k]) over
    columns k aliased to v) / d, row by row."""
    d = table.num_outcomes
    prob = table.prob.reshape(-1, d)
    alias = table.alias.reshape(-1, d)
    out = prob.copy()
    for r in range(prob.shape[0]):
        np.add.at(out[r], alias[r], 1.0 - prob[r])
    return out / d


@given(st.integers(1, 8), st.integers(1, 300).flatmap(lambda d: stochastic_matrices(3, d)))
def test_alias_table_is_exact(_, probs):
    table = alias_table(probs)
    np.testing.assert_allclose(implied_distribution(table), probs, atol=1e-14)
    assert np.all(table.prob >= 0) and np.all(table.prob <= 1 + 1e-12)


@pytest.mark.parametrize("model_seed, sample_seed", [(0, 11), (1, 12), (2, 13)])
def test_marginals_match_exact_within_clt_tolerance(model_seed, sample_seed):
    """Each cell's count is Binomial(N, p) under an exact sampler; a Bonferroni bound over all cells at
    alpha = 1e-3 makes a false failure at most 1e-3 likely per seed, while a sampler off by 1% in any
    cell with p ~ 0.1 is caught (N = 40000 gives a z of ~6 for that shift)."""
    hmm = wei2021_hmm(6, 9, seed=model_seed, trans_temp=1.0)
    zs = marginal_z_scores(hmm, 40_000, 12, sample_seed)
    for name, z in zs.items():
        assert np.abs(z).max() < clt_threshold(len(z)), name


def test_memory_values_are_fixed_per_sequence_and_match_the_prior():
    mh = memory_hmm(num_memory=4, num_syntax=3, vocab_size=6, seed=3)
    s = sample(mh, 20_000, 10, seed=9)
    memory, syntax = mh.split_state(s.states.astype(np.int64))
    assert np.all(memory == memory[:, :1])  # drawn once per sequence, never changes
    freq = np.bincount(memory[:, 0], minlength=4) / 20_000
    p = mh.memory_prior
    z = (freq - p) / np.sqrt(p * (1 - p) / 20_000)
    assert np.abs(z).max() < clt_threshold(4)
    # Syntax chain marginals are those of the syntax HMM alone.
    exact = state_marginals(mh, 10).reshape(10, 4, 3).sum(1)
    counts = np.stack([np.bincount(syntax[:, t], minlength=3) for t in range(10)]) / 20_000
    assert np.abs((counts - exact) / np.sqrt(exact * (1 - exact) / 20_000)).max() < clt_threshold(30)


def test_same_seed_same_bytes_and_prefix_stability():
    hmm = random_hmm(7, 300, seed=0)
    a = sample(hmm, 50, 17, seed=5)
    b = sample(hmm, 50, 17, seed=5)
    assert a.tokens.tobytes() == b.tokens.tobytes() and a.states.tobytes() == b.states.tobytes()
    assert a.tokens.dtype == np.uint16 and a.states.dtype == np.uint8
    c = sample(hmm, 20, 17, seed=5)
    assert np.array_equal(c.tokens, a.tokens[:20])
    assert not np.array_equal(sample(hmm, 50, 17, seed=6).tokens, a.tokens)


def test_blocks_do_not_change_the_stream_shape():
    hmm = wei2021_hmm(3, 4, seed=0)
    T = 1000
    n = block_sequences(T) + 5  # spans two blocks
    s = sample(hmm, n, T, seed=1)
    assert s.tokens.shape == (n, T) and block_sequences(T) == BLOCK_TOKENS // T
    # The second block's first rows are not a copy of the first block's (independent streams).
    assert not np.array_equal(s.tokens[block_sequences(T)], s.tokens[0])


def test_token_marginals_oracle_sums_to_one():
    hmm = wei2021_hmm(5, 7, seed=0)
    np.testing.assert_allclose(token_marginals(hmm, 9).sum(1), 1.0, atol=1e-12)


def test_smallest_uint_and_empty_sample():
    assert smallest_uint(255) == np.uint8 and smallest_uint(256) == np.uint16
    assert smallest_uint(70_000) == np.uint32
    s = sample(wei2021_hmm(3, 4, seed=0), 0, 5, seed=0)
    assert s.tokens.shape == (0, 5)
    with pytest.raises(ValueError, match="length must be >= 1"):
        sample(wei2021_hmm(3, 4, seed=0), 2, 0, seed=0)


def test_threaded_blocks_are_byte_identical():
    from simulate.sampling import iter_sample_blocks

    hmm = wei2021_hmm(4, 5, seed=0)
    T = 1 << 15  # 32 sequences per block: 70 sequences span 3 blocks
    serial = list(iter_sample_blocks(hmm, 70, T, seed=3, workers=1))
    threaded = list(iter_sample_blocks(hmm, 70, T, seed=3, workers=2))
    assert len(serial) == len(threaded) == 3
    for a, b in zip(serial, threaded):
        assert a.tokens.tobytes() == b.tokens.tobytes() and a.states.tobytes() == b.states.tobytes()


def test_bytes_are_pinned_for_a_fixed_seed():
    """Same seed, same bytes, across versions: corpora on disk are checked against ``sample(hmm, N, T, seed)``,
    so any change to the sampler's stream (alias tables, uniform layout, block seeding) must fail here. The
    model has dyadic probabilities, so its alias tables are exact on every platform; 3000 x 700 spans two
    blocks. The digest was recorded from the sampler of issue 2 (unchanged since)."""
    import hashlib

    from simulate.hmm import HMM

    hmm = HMM(np.array([0.5, 0.25, 0.25]),
              np.array([[0.5, 0.25, 0.25], [0.125, 0.75, 0.125], [0.25, 0.25, 0.5]]),
              np.array([[0.5, 0.5, 0, 0, 0], [0, 0.25, 0.25, 0.25, 0.25], [0.0625, 0.0625, 0.125, 0.25, 0.5]]))
    s = sample(hmm, 3000, 700, seed=2026)
    assert block_sequences(700) < 3000
    assert s.tokens.dtype == np.uint8 and s.states.dtype == np.uint8
    digest = hashlib.sha256(s.tokens.tobytes() + s.states.tobytes()).hexdigest()
    assert digest == "24bb82226247cf28ce1d0a5725ef9910c89d77b11b929104406b5c985dee4cdf"
