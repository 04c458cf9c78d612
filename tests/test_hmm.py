"""HMM value objects and presets: validation names field, row and problem; presets have their stated
structure."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulate.hmm import (
    HMM,
    HMMValidationError,
    MemoryHMM,
    make_preset,
    memory_hmm,
    permutation_mixture,
    random_hmm,
    wei2021_hmm,
)
from tests.strategies import hmms, memory_hmms


def good():
    return np.array([0.5, 0.5]), np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])


@pytest.mark.parametrize(
    "field, row, value, pattern",
    [
        ("trans", 1, [0.5, -0.1], r"HMM\.trans row 1: entry 1 is negative"),
        ("trans", 0, [0.5, np.nan], r"HMM\.trans row 0: entry 1 is nan"),
        ("emit", 1, [0.1, 0.1, 0.7], r"HMM\.emit row 1: sums to 0\.9, off by -0\.1"),
        ("start", None, [0.6, 0.6], r"HMM\.start: sums to 1\.2, off by \+0\.2"),
        ("emit", 0, [np.inf, 0.0, 0.0], r"HMM\.emit row 0: entry 0 is inf"),
    ],
)
def test_validation_names_field_row_and_problem(field, row, value, pattern):
    start, trans, emit = good()
    arrays = {"start": start, "trans": trans, "emit": emit}
    if row is None:
        arrays[field] = np.array(value)
    else:
        arrays[field] = arrays[field].copy()
        arrays[field][row] = value
    with pytest.raises(HMMValidationError, match=pattern):
        HMM(**arrays)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"trans": np.eye(3)}, r"HMM\.trans: shape \(3, 3\) does not match num_states=2"),
        ({"emit": np.full((3, 2), 0.5)}, r"HMM\.emit: shape \(3, 2\) has 3 rows; expected num_states=2"),
        ({"start": np.ones((1, 2)) / 2}, r"HMM\.start: expected a 1-d array, got shape \(1, 2\)"),
        ({"start": np.array([])}, r"HMM\.start: has no states"),
        ({"emit": np.zeros((2, 0))}, r"HMM\.emit.*no columns"),
        ({"trans": "abc"}, r"HMM\.trans: cannot be read as a float array"),
    ],
)
def test_shape_errors(kwargs, pattern):
    start, trans, emit = good()
    arrays = {"start": start, "trans": trans, "emit": emit, **kwargs}
    with pytest.raises(HMMValidationError, match=pattern):
        HMM(**arrays)


def test_memory_hmm_validation_names_memory_value():
    emit = np.full((2, 3, 4), 0.25)
    emit[1, 2] = [0.5, 0.5, 0.5, 0.5]
    with pytest.raises(HMMValidationError, match=r"MemoryHMM\.emit\[memory=1\] row 2: sums to 2"):
        MemoryHMM(np.array([0.5, 0.5]), np.ones(3) / 3, np.eye(3), emit)
    with pytest.raises(HMMValidationError, match=r"MemoryHMM\.syntax_trans: shape \(2, 2\); expected \(3, 3\)"):
        MemoryHMM(np.array([0.5, 0.5]), np.ones(3) / 3, np.eye(2), np.full((2, 3, 4), 0.25))
    with pytest.raises(HMMValidationError, match=r"MemoryHMM\.emit: shape \(3, 3, 4\); expected \(2, 3, vocab_size\)"):
        MemoryHMM(np.array([0.5, 0.5]), np.ones(3) / 3, np.eye(3), np.full((3, 3, 4), 0.25))


def test_frozen_and_read_only():
    hmm = HMM(*good())
    with pytest.raises(dataclasses.FrozenInstanceError):
        hmm.start = np.array([1.0, 0.0])  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        hmm.trans[0, 0] = 0.3
    src = good()[1].copy()
    h2 = HMM(good()[0], src, good()[2])
    src[0, 0] = 123.0  # the object owns a copy: mutating the input does not change it
    assert h2.trans[0, 0] == 0.9


@given(hmms(max_states=8, max_vocab=8))
def test_dict_round_trip(hmm):
    back = HMM.from_dict(hmm.to_dict())
    assert np.array_equal(back.start, hmm.start) and np.array_equal(back.trans, hmm.trans)
    assert np.array_equal(back.emit, hmm.emit)


@given(memory_hmms())
def test_memory_joint_view_structure(mh):
    joint = mh.as_hmm()
    N, S = mh.num_memory, mh.num_syntax
    assert joint.num_states == N * S
    # Memory never changes: no transition mass between different memory blocks.
    blocks = joint.trans.reshape(N, S, N, S)
    for a in range(N):
        for b in range(N):
            if a != b:
                assert np.all(blocks[a, :, b, :] == 0)
    mem, syn = mh.split_state(np.arange(N * S))
    assert np.array_equal(mem * S + syn, np.arange(N * S))
    np.testing.assert_allclose(joint.start.reshape(N, S).sum(1), mh.memory_prior, atol=1e-15)
    back = MemoryHMM.from_dict(mh.to_dict())
    assert np.array_equal(back.emit, mh.emit)


@given(st.integers(2, 30), st.integers(1, 12), st.integers(0, 10_000))
def test_wei2021_transitions_doubly_stochastic(m, K, seed):
    trans = permutation_mixture(m, K, 0.1, np.random.default_rng(seed))
    np.testing.assert_allclose(trans.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(trans.sum(1), 1.0, atol=1e-12)


def test_wei2021_temperatures_behave_as_documented():
    cold = wei2021_hmm(10, 10, seed=0, trans_temp=1e-3)
    warm = wei2021_hmm(10, 10, seed=0, trans_temp=10.0)
    # Low temperature: one permutation dominates (near-deterministic rows); high: mass spreads.
    assert cold.trans.max(1).min() > 0.99
    assert warm.trans.max(1).max() < 0.5
    # Start is near-uniform at the default start_temp = 10.
    h = wei2021_hmm(10, 10, seed=3)
    assert np.abs(h.start - 0.1).max() < 0.01
    # Each state emits mostly a few symbols at the default emit_temp = 0.1: the top symbol carries far more
    # than the uniform 1/n.
    assert np.median(h.emit.max(1)) > 0.3


@pytest.mark.parametrize("m, n, full", [(4, 10, True), (10, 10, True), (15, 10, False), (30, 10, False)])
def test_wei2021_emission_rank(m, n, full):
    emit = wei2021_hmm(m, n, seed=1).emit
    rank = np.linalg.matrix_rank(emit)
    assert (rank == m) == full
    assert rank == min(m, n)


def test_memory_preset_with_one_memory_value_has_plain_structure():
    mh = memory_hmm(num_memory=1, num_syntax=5, vocab_size=7, seed=2)
    joint = mh.as_hmm()
    assert np.array_equal(joint.trans, mh.syntax_trans)
    assert np.array_equal(joint.emit, mh.emit[0])
    assert np.array_equal(joint.start, mh.syntax_start)


@pytest.mark.parametrize("concentration", [0.05, 1.0, 100.0])
def test_random_preset_rows_have_dirichlet_moments(concentration):
    """Entries of Dirichlet(c, ..., c) rows over n outcomes have mean 1/n and variance
    (1/n)(1 - 1/n)/(n c + 1). With 200 x 50 entries the sample variance is within 25% of that (its relative
    standard error is below 10% even for the heavy-tailed c = 0.05 case); a wrong concentration (say c
    ignored, i.e. 1.0) is off by a factor of 3 or more for the other two values."""
    n = 50
    emit = random_hmm(200, n, seed=0, concentration=concentration).emit
    exact_var = (1 / n) * (1 - 1 / n) / (n * concentration + 1)
    assert abs(emit.mean() - 1 / n) < 1e-12
    assert 0.75 < emit.var() / exact_var < 1.25


def test_make_preset_errors():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        make_preset("nope")
    with pytest.raises(TypeError):
        make_preset("wei2021", concentration=1.0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        wei2021_hmm(4, 4, emit_temp=0.0)
