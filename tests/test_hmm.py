"""HMM value objects and presets: validation names field, row and problem; presets have their stated
structure."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftsim.core.errors import InputError
from simulate.hmm import (
    HMM,
    HMMValidationError,
    MemoryHMM,
    make_preset,
    memory_hmm,
    permutation_mixture,
    preset_defaults,
    preset_size,
    random_hmm,
    validate_preset_params,
    wei2021_hmm,
)
from simulate.inference import infer, viterbi
from simulate.sampling import sample
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
    with pytest.raises(InputError, match=r"^concentration: does not apply to preset 'wei2021'") as exc:
        make_preset("wei2021", concentration=1.0)
    assert exc.value.field == "concentration"
    with pytest.raises(ValueError, match="emit_temp: temperature must be positive"):
        wei2021_hmm(4, 4, emit_temp=0.0)


# --------------------------------------------------------------------------------------------------------
# Bad input is refused, naming the field (issue 11)
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["start", "trans", "emit"])
@pytest.mark.parametrize("imag", [0.5, 0.0])
def test_complex_entries_are_refused(field, imag):
    """numpy would drop the imaginary part with a ComplexWarning; a probability is real, so even a zero
    imaginary part (a complex dtype) is refused, naming the field."""
    start, trans, emit = good()
    arrays = {"start": start, "trans": trans, "emit": emit}
    arrays[field] = arrays[field].astype(complex)
    arrays[field].flat[0] += 1j * imag
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning on the way
        with pytest.raises(HMMValidationError, match=rf"HMM\.{field}: has complex entries") as exc:
            HMM(**arrays)
    assert exc.value.field == field


def test_strings_and_objects_are_refused():
    start, trans, emit = good()
    with pytest.raises(HMMValidationError, match=r"HMM\.start: cannot be read as a float array \(dtype <U3\)"):
        HMM(np.array(["0.5", "0.5"]), trans, emit)
    with pytest.raises(HMMValidationError, match=r"HMM\.trans: cannot be read as a float array"):
        HMM(start, np.array([[1j, 0], [0, 1]], dtype=object), emit)


def test_memory_hmm_errors_carry_field_and_row():
    emit = np.full((2, 3, 4), 0.25)
    emit[1, 2] = [0.5, 0.5, 0.5, 0.5]
    with pytest.raises(HMMValidationError) as exc:
        MemoryHMM(np.array([0.5, 0.5]), np.ones(3) / 3, np.eye(3), emit)
    assert exc.value.field == "emit" and exc.value.row == 2
    # The message already names owner, field and row; describe() adds no flag.
    assert exc.value.describe(flag_style=True).startswith("MemoryHMM.emit[memory=1] row 2: sums to 2")


@pytest.mark.parametrize(
    "preset, params, field, pattern",
    [
        ("wei2021", {"num_permutations": 0}, "num_permutations", r"must be an integer >= 1 \(or None\), got 0"),
        ("wei2021", {"num_permutations": -3}, "num_permutations", r"got -3"),
        ("wei2021", {"num_states": 0}, "num_states", r"must be an integer >= 1, got 0"),
        ("wei2021", {"vocab_size": 0}, "vocab_size", r"must be an integer >= 1, got 0"),
        ("wei2021", {"num_states": 2.5}, "num_states", r"must be an integer >= 1, got 2\.5"),
        ("wei2021", {"num_states": True}, "num_states", r"got True"),
        ("wei2021", {"trans_temp": float("nan")}, "trans_temp", r"temperature must be positive and finite, got nan"),
        ("wei2021", {"emit_temp": float("inf")}, "emit_temp", r"positive and finite, got inf"),
        ("wei2021", {"start_temp": -1.0}, "start_temp", r"positive and finite, got -1\.0"),
        ("wei2021", {"trans_temp": 1e-320}, "trans_temp", r"too small"),
        ("wei2021", {"emit_temp": "hot"}, "emit_temp", r"a positive finite number, got 'hot'"),
        ("memory", {"num_memory": 0}, "num_memory", r"must be an integer >= 1, got 0"),
        ("memory", {"num_syntax": -1}, "num_syntax", r"got -1"),
        ("memory", {"memory_temp": 0.0}, "memory_temp", r"positive and finite, got 0\.0"),
        ("random", {"concentration": 0.0}, "concentration", r"must be positive and finite, got 0\.0"),
        ("random", {"concentration": float("nan")}, "concentration", r"got nan"),
        ("random", {"trans_temp": 0.1}, "trans_temp", r"does not apply to preset 'random'"),
        ("nope", {}, "preset", r"unknown preset 'nope'"),
    ],
)
def test_preset_parameters_are_validated_before_drawing(preset, params, field, pattern):
    with pytest.raises(InputError, match=rf"^{field}: .*{pattern}") as exc:
        make_preset(preset, seed=0, **params)
    assert exc.value.field == field
    if preset != "nope":
        with pytest.raises(InputError, match=pattern):
            validate_preset_params(preset, params)


def test_preset_helpers():
    assert preset_defaults("random") == {"num_states": 4, "vocab_size": 6, "concentration": 1.0}
    assert validate_preset_params("random", {"num_states": 3})["vocab_size"] == 6
    assert preset_size("memory", {"num_memory": 2, "num_syntax": 5, "vocab_size": 7}) == (10, 7)
    assert preset_size("wei2021", {}) == (10, 10)


# --------------------------------------------------------------------------------------------------------
# hmmlearn interop (issue 11): a user's fitted CategoricalHMM runs through every exact routine
# --------------------------------------------------------------------------------------------------------


@given(hmms(max_states=6, max_vocab=6))
def test_hmmlearn_round_trip(hmm):
    ref = hmm.to_hmmlearn()
    assert ref.n_components == hmm.num_states and ref.n_features == hmm.vocab_size
    back = HMM.from_hmmlearn(ref)
    assert np.array_equal(back.start, hmm.start) and np.array_equal(back.trans, hmm.trans)
    assert np.array_equal(back.emit, hmm.emit)
    ref.transmat_[0, 0] = 123.0  # hmmlearn got writable copies, not our read-only arrays
    assert hmm.trans[0, 0] != 123.0


def _fitted_categorical(seed=0):
    from hmmlearn.hmm import CategoricalHMM

    truth = random_hmm(3, 5, seed=seed)
    x = sample(truth, 40, 30, seed=seed).tokens.astype(np.int64)
    model = CategoricalHMM(n_components=3, n_features=5, n_iter=20, random_state=seed)
    model.fit(x.reshape(-1, 1), lengths=[30] * 40)
    return model, x


def test_fitted_hmmlearn_model_runs_through_every_exact_routine():
    """Our posteriors, log-likelihoods and Viterbi paths on a user's *fitted* model agree with hmmlearn's own
    (float64 forward-backward on both sides: 1e-10 is loose by orders of magnitude; tests/test_inference.py
    holds the same bound on constructed models)."""
    fitted, x = _fitted_categorical()
    hmm = HMM.from_hmmlearn(fitted)
    inf = infer(hmm, x[:6])
    for b in range(6):
        row = x[b].reshape(-1, 1)
        np.testing.assert_allclose(inf.posteriors[b], fitted.predict_proba(row), atol=1e-10)
        np.testing.assert_allclose(inf.log_likelihood[b], fitted.score(row), rtol=1e-10)
        logp, path = fitted.decode(row, algorithm="viterbi")
        our_path, our_logp = viterbi(hmm, x[b])
        np.testing.assert_allclose(our_logp, logp, rtol=1e-10)
        # Fitted models have ties (equally likely paths); each side's path must reach the optimum.
        for p in (np.asarray(our_path).reshape(-1), path):
            joint = (np.log(hmm.start[p[0]]) + np.log(hmm.trans[p[:-1], p[1:]]).sum()
                     + np.log(hmm.emit[p, x[b]]).sum())
            np.testing.assert_allclose(joint, logp, rtol=1e-10)
    # And back: the exported model gives hmmlearn the same numbers as the fitted one.
    again = hmm.to_hmmlearn()
    np.testing.assert_allclose(again.score(x[0].reshape(-1, 1)), fitted.score(x[0].reshape(-1, 1)), rtol=1e-12)
    # Sampling from the imported model is our exact sampler.
    assert sample(hmm, 4, 7, seed=1).tokens.shape == (4, 7)


def test_memory_hmm_exports_its_joint_view():
    mh = memory_hmm(2, 3, 4, seed=0)
    ref = mh.to_hmmlearn()
    assert ref.n_components == 6
    assert np.array_equal(HMM.from_hmmlearn(ref).trans, mh.as_hmm().trans)


def test_from_hmmlearn_errors_name_the_attribute():
    from hmmlearn.hmm import CategoricalHMM, GaussianHMM

    with pytest.raises(InputError, match=r"^startprob_: the hmmlearn model has no startprob_: fit it") as exc:
        HMM.from_hmmlearn(CategoricalHMM(n_components=2, n_features=3))
    assert exc.value.field == "startprob_"
    with pytest.raises(InputError, match=r"^model: expected an hmmlearn CategoricalHMM, got .*GaussianHMM"):
        HMM.from_hmmlearn(GaussianHMM(n_components=2))
    ref = HMM(*good()).to_hmmlearn()
    ref.transmat_ = np.array([[0.0, 0.0], [0.2, 0.8]])  # a state fitting never left: an all-zero row
    with pytest.raises(HMMValidationError, match=r"HMM\.trans row 0: sums to 0.*\(from the hmmlearn model's transmat_\)"):
        HMM.from_hmmlearn(ref)
    ref = HMM(*good()).to_hmmlearn()
    ref.n_features = 4
    with pytest.raises(InputError, match=r"^emissionprob_: has 3 columns but the model's n_features is 4"):
        HMM.from_hmmlearn(ref)
