"""GINC (Xie et al. 2021), issue 15: the value/slot product structure, the delimiter slot, ID/OOD concepts, exact
concept inference against enumeration of every hidden path, in-context prompts, and the ``ginc`` corpus preset
through the format-2 writer and ``ftsim generate``.

The oracle (:func:`_enumerate`) works from the raw parameters -- prior, start, value and slot chains, memory --
path by path, never through ``kron``, the joint HMM or a forward recursion, so it checks the construction and
all three inference implementations. Tolerance 1e-12 (float64): the enumerations sum at most ~8,000 products of
at most 11 factors, each bounded below by 1e-3 where it is not exactly zero, so rounding stays near 1e-15."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftsim.app.cli import main
from ftsim.core.errors import InputError
from simulate.corpus import CorpusSpec, load_corpus, write_corpus
from simulate.ginc import (
    DELIMITER,
    GINC,
    IMPLEMENTATIONS,
    bayes_accuracy,
    concept_log_likelihoods,
    concept_posterior,
    ginc_from_corpus,
    ginc_model,
    icl_prompts,
    ood_hmm,
    predictive,
)
from simulate.hmm import HMMValidationError, make_preset, preset_size, validate_preset_params
from simulate.sampling import sample
from simulate.verify import clt_threshold
from tests.strategies import token_batches

TOL = 1e-12
SMALL = dict(num_values=2, num_slots=3, vocab_size=5, num_id_concepts=2, num_ood_concepts=1)


# ----------------------------------------------------------------------------------------------------------
# The oracle: every hidden path
# ----------------------------------------------------------------------------------------------------------


def _enumerate(model: GINC, x: np.ndarray, prior=None, next_token: bool = False) -> np.ndarray:
    """P(x, c) for every concept (C,), summing the probability of every hidden path (v_0..T-1, s_0..T-1) that
    emits x (a negative token is missing), each path's probability the product of its factors. With
    ``next_token``: (C, vocab_size) P(x, x_T = k, c), over paths one step longer."""
    prior = model.concept_prior if prior is None else np.asarray(prior)
    S = model.num_slots
    T = len(x) + (1 if next_token else 0)
    h = np.array(list(itertools.product(range(model.num_hidden), repeat=T)))  # (P, T) every path, h = v * S + s
    v, s = h // S, h % S
    toks = model.memory[v, s]  # (P, T)
    w = prior[:, None] * model.start[:, h[:, 0]]  # (C, P)
    for t in range(1, T):
        w = w * model.value_trans[v[:, t - 1], v[:, t]] * model.slot_trans[:, s[:, t - 1], s[:, t]]
    x = np.asarray(x)
    match = np.all((toks[:, :len(x)] == x) | (x < 0), axis=1)
    if not next_token:
        return w[:, match].sum(axis=1)
    out = np.zeros((model.num_concepts, model.vocab_size))
    for k in range(model.vocab_size):
        out[:, k] = w[:, match & (toks[:, -1] == k)].sum(axis=1)
    return out


def _sparse_rows(rng, rows, cols, zero_frac):
    """Dirichlet rows floored at 1e-3 (no underflow in the oracle), some entries exactly zero (impossible
    transitions), at least one non-zero entry per row."""
    x = np.maximum(rng.dirichlet(np.full(cols, 0.7), size=rows), 1e-3)
    zero = rng.random((rows, cols)) < zero_frac
    zero[np.arange(rows), rng.integers(0, cols, size=rows)] = False
    x = np.where(zero, 0.0, x)
    return x / x.sum(axis=1, keepdims=True)


@st.composite
def gincs(draw, max_values: int = 2, max_slots: int = 3) -> GINC:
    V = draw(st.integers(1, max_values))
    S = draw(st.integers(2, max_slots))
    n_id, n_ood = draw(st.integers(1, 2)), draw(st.integers(0, 1))
    vocab = draw(st.integers(2, 5))
    zero_frac = draw(st.sampled_from([0.0, 0.3, 0.6]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    C = n_id + n_ood
    memory = rng.integers(1, vocab, size=(V, S))
    memory[:, 0] = DELIMITER
    prior = np.concatenate([rng.dirichlet(np.ones(n_id)) * 0.999 + 0.001 / n_id, np.zeros(n_ood)])
    return GINC(prior / prior.sum(), _sparse_rows(rng, C, V * S, zero_frac), _sparse_rows(rng, V, V, zero_frac),
                np.stack([_sparse_rows(rng, S, S, zero_frac) for _ in range(C)]), memory, vocab)


def _tokens_for(model: GINC, draw) -> np.ndarray:
    """A batch of random token rows (often impossible, some masked) and sequences sampled from the mixture
    (always possible)."""
    rand = draw(token_batches(model.vocab_size, max_batch=3, max_length=4))
    T = rand.shape[1]
    sampled = sample(model.as_hmm(), 2, T, draw(st.integers(0, 1000))).tokens.astype(np.int64)
    return np.concatenate([rand, sampled])


# ----------------------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------------------


def test_preset_draws_the_structured_model_bit_for_bit():
    for seed in (0, 3):
        hmm = make_preset("ginc", seed=seed, **SMALL)
        joint = ginc_model(seed=seed, **SMALL).as_hmm()
        for name in ("start", "trans", "emit"):
            assert np.array_equal(getattr(hmm, name), getattr(joint, name)), name
    assert preset_size("ginc", {}) == (1000, 50)  # GINC's dataset: 10 concepts x 10 values x 10 slots, 50 symbols
    assert preset_size("ginc", SMALL) == (18, 5)
    m = ginc_model(seed=0)
    assert m.id_concepts.tolist() == [0, 1, 2, 3, 4] and m.ood_concepts.tolist() == [5, 6, 7, 8, 9]
    assert np.allclose(m.concept_prior[:5], 0.2) and np.all(m.concept_prior[5:] == 0)


def test_concept_transitions_are_the_kronecker_product_and_emissions_the_memory():
    m = ginc_model(seed=1, **SMALL)
    V, S, VS = m.num_values, m.num_slots, m.num_hidden
    joint = m.as_hmm()
    for c in range(m.num_concepts):
        T = m.concept_hmm(c).trans
        for v, s, w, t in itertools.product(range(V), range(S), range(V), range(S)):
            assert T[v * S + s, w * S + t] == m.value_trans[v, w] * m.slot_trans[c, s, t]
        block = joint.trans[c * VS:(c + 1) * VS]
        assert np.array_equal(block[:, c * VS:(c + 1) * VS], T)
        assert not np.any(np.delete(block, np.s_[c * VS:(c + 1) * VS], axis=1))  # block diagonal: c never changes
        assert np.array_equal(joint.start[c * VS:(c + 1) * VS], m.concept_prior[c] * m.start[c])
        assert np.array_equal(joint.emit[c * VS:(c + 1) * VS], m.emit())  # one memory for every concept
    for v, s in itertools.product(range(V), range(S)):
        row = m.emit()[v * S + s]
        assert row[m.memory[v, s]] == 1.0 and row.sum() == 1.0  # deterministic emission
        assert (m.memory[v, s] == DELIMITER) == (s == 0)  # the delimiter comes from slot 0 and only from it
    c, v, s = m.split_state(np.arange(m.num_states))
    assert np.array_equal(c * VS + v * S + s, np.arange(m.num_states))


def test_value_objects_name_field_and_row():
    m = ginc_model(seed=0, **SMALL)
    good = m.arrays()

    def build(**changes):
        return GINC(**{**good, **changes})

    bad_slot = np.array(m.slot_trans)
    bad_slot[1, 2] = [0.5, 0.5, 0.5]
    cases = [
        (dict(slot_trans=bad_slot), r"^GINC\.slot_trans\[concept=1\] row 2: sums to 1\.5", "slot_trans"),
        (dict(memory=np.array([[0, 1, 2], [1, 2, 3]])), r"^GINC\.memory row 1: entry 0 \(the delimiter slot\)",
         "memory"),
        (dict(memory=np.array([[0, 0, 2], [0, 2, 3]])), r"^GINC\.memory row 0: entry 1 is the delimiter", "memory"),
        (dict(memory=np.array([[0, 1, 9], [0, 2, 3]])), r"^GINC\.memory row 0: entry 2 is 9, outside \[0, 5\)",
         "memory"),
        (dict(memory=np.zeros((2, 3))), r"^GINC\.memory: expected a 2-d integer array", "memory"),
        (dict(start=good["start"][:, :5]), r"^GINC\.start: shape \(3, 5\); expected \(3, 6\)", "start"),
        (dict(concept_prior=[0.5, 0.6, -0.1]), r"^GINC\.concept_prior: entry 2 is negative", "concept_prior"),
        (dict(vocab_size=1), r"^GINC\.vocab_size: must be an integer >= 2", "vocab_size"),
    ]
    for changes, pattern, field in cases:
        with pytest.raises(HMMValidationError, match=pattern) as exc:
            build(**changes)
        assert exc.value.field == field
    with pytest.raises(HMMValidationError, match=r"^GINC\.prior: shape \(2,\); expected \(3,\)"):
        m.with_prior([0.5, 0.5])
    with pytest.raises(InputError, match=r"^concept: must be a concept index in \[0, 3\), got 3"):
        m.concept_hmm(3)
    with pytest.raises(InputError, match=r"^implementation: is 'fast'"):
        concept_posterior(m, [1, 2], implementation="fast")


@pytest.mark.parametrize("params, field, pattern", [
    ({"vocab_size": 1}, "vocab_size", r"must be >= 2 for ginc"),
    ({"num_slots": 1}, "num_slots", r"must be >= 2 for ginc \(slot 0 is the delimiter slot\)"),
    ({"num_values": 0}, "num_values", r"must be an integer >= 1, got 0"),
    ({"num_id_concepts": 0}, "num_id_concepts", r"must be an integer >= 1, got 0"),
    ({"num_ood_concepts": -1}, "num_ood_concepts", r"must be an integer >= 0, got -1"),
    ({"num_ood_concepts": 1.5}, "num_ood_concepts", r"must be an integer >= 0, got 1\.5"),
    ({"value_identity": 1.5}, "value_identity", r"must be a number in \[0, 1\], got 1\.5"),
    ({"value_identity": float("nan")}, "value_identity", r"got nan"),
    ({"trans_temp": 0.0}, "trans_temp", r"positive and finite, got 0\.0"),
    ({"num_values": 100, "num_slots": 100}, "num_values", r"100,000 joint states"),
    ({"emit_temp": 0.1}, "emit_temp", r"does not apply to preset 'ginc'"),
])
def test_preset_parameters_are_validated_before_drawing(params, field, pattern):
    with pytest.raises(InputError, match=rf"^{field}: .*{pattern}") as exc:
        validate_preset_params("ginc", params)
    assert exc.value.field == field
    with pytest.raises(InputError, match=pattern):
        make_preset("ginc", seed=0, **params)
    if field != "emit_temp":  # ginc_model takes the preset's parameters only
        with pytest.raises(InputError, match=pattern):
            ginc_model(**params)


# ----------------------------------------------------------------------------------------------------------
# Exact inference against enumeration
# ----------------------------------------------------------------------------------------------------------


def test_posterior_loglik_and_predictive_match_enumeration():
    """Fixed cases, every implementation; the measured worst errors are printed (pytest -s) for the notes."""
    worst = {"posterior": 0.0, "loglik": 0.0, "predictive": 0.0}
    for seed in range(3):
        m = ginc_model(seed=seed, **SMALL, trans_temp=0.5, value_identity=0.5)
        x = sample(m.as_hmm(), 6, 4, seed).tokens.astype(np.int64)
        x[0, 1] = -1  # a missing observation
        prior = np.array([0.2, 0.3, 0.5])  # puts weight on the OOD concept too
        for p in (None, prior):
            joint = np.stack([_enumerate(m, row, p) for row in x])  # (B, C) P(x, c)
            ref = joint / joint.sum(axis=1, keepdims=True)
            for impl in IMPLEMENTATIONS:
                got = concept_posterior(m, x, prior=p, implementation=impl)
                worst["posterior"] = max(worst["posterior"], float(np.abs(got - ref).max()))
            nxt = np.stack([_enumerate(m, row, p, next_token=True).sum(axis=0) for row in x])  # (B, n)
            ref_pred = nxt / nxt.sum(axis=1, keepdims=True)
            worst["predictive"] = max(worst["predictive"], float(np.abs(predictive(m, x, prior=p) - ref_pred).max()))
        given_c = np.stack([_enumerate(m, row, np.ones(m.num_concepts)) for row in x])  # P(x | c)
        with np.errstate(divide="ignore"):
            ref_ll = np.log(given_c)
        for impl in ("factored", "hmm"):
            ll = concept_log_likelihoods(m, x, implementation=impl)
            assert np.array_equal(np.isneginf(ll), np.isneginf(ref_ll))
            fin = np.isfinite(ref_ll)
            worst["loglik"] = max(worst["loglik"], float(np.abs(ll[fin] - ref_ll[fin]).max()))
    print(f"GINC vs enumeration, max abs error: {worst}")
    assert all(v <= TOL for v in worst.values()), worst


@given(st.data())
def test_properties_against_enumeration(data):
    m = data.draw(gincs())
    x = _tokens_for(m, data.draw)
    joint = np.stack([_enumerate(m, row) for row in x])  # (B, C) P(x, c) under the pretraining prior
    given_c = np.stack([_enumerate(m, row, np.ones(m.num_concepts)) for row in x])  # (B, C) P(x | c)
    possible = joint.sum(axis=1) > 0
    assert possible[-2:].all()  # sampled sequences always are
    ll = concept_log_likelihoods(m, x)
    # Deterministic emissions: log P(x | c) is -inf exactly where no path of c emits x, for every concept (OOD
    # included), and finite and right elsewhere.
    assert np.array_equal(np.isneginf(ll), given_c == 0)
    with np.errstate(divide="ignore"):
        assert np.allclose(ll[given_c > 0], np.log(given_c[given_c > 0]), rtol=0, atol=TOL)
    for impl in IMPLEMENTATIONS:
        post = concept_posterior(m, x, implementation=impl)
        assert np.all(np.isnan(post[~possible]))  # impossible under the prior: NaN rows, as simulate.inference
        post = post[possible]
        ref = joint[possible] / joint[possible].sum(axis=1, keepdims=True)
        assert np.allclose(post, ref, rtol=0, atol=TOL), impl
        assert np.allclose(post.sum(axis=1), 1.0, rtol=0, atol=TOL) and np.all(post >= 0)
        assert np.all(post[:, m.ood_concepts] == 0)  # prior 0 stays 0, exactly
        assert np.all(post[given_c[possible] == 0] == 0)  # a concept that cannot emit x gets exactly 0
    pred = predictive(m, x)
    assert np.all(np.isnan(pred[~possible]))
    nxt = np.stack([_enumerate(m, row, next_token=True).sum(axis=0) for row in x[possible]])
    ref_pred = nxt / nxt.sum(axis=1, keepdims=True)
    assert np.allclose(pred[possible], ref_pred, rtol=0, atol=TOL)
    assert np.allclose(pred[possible].sum(axis=1), 1.0, rtol=0, atol=TOL)
    assert np.all(pred[possible][:, np.setdiff1d(np.arange(m.vocab_size), m.memory)] == 0)  # never emitted


def test_implementations_agree_on_longer_sequences_and_hmmlearn():
    m = ginc_model(seed=2, num_values=3, num_slots=4, vocab_size=9, num_id_concepts=3, num_ood_concepts=2,
                   trans_temp=0.3)
    x = sample(m.as_hmm(), 40, 120, 5).tokens.astype(np.int64)
    posts = [concept_posterior(m, x, implementation=impl) for impl in IMPLEMENTATIONS]
    for p in posts[1:]:
        assert np.abs(p - posts[0]).max() <= 1e-10
    ll = concept_log_likelihoods(m, x)
    fin = np.isfinite(ll)
    assert fin[:, m.id_concepts].any(axis=1).all()  # sampled from the mixture: possible under some ID concept
    assert np.abs(concept_log_likelihoods(m, x, implementation="hmm")[fin] - ll[fin]).max() <= 1e-9
    # hmmlearn as a peer for the concept likelihoods (log-space forward), where the sequence is possible.
    import warnings

    for c in (0, 3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hmmlearn warns about log(0) of the zero transitions
            ref = m.concept_hmm(c).to_hmmlearn()
            theirs = np.array([ref.score(row.reshape(-1, 1)) for row in x[:8]])
        fin = np.isfinite(ll[:8, c])
        assert fin.any() or c != 0
        assert np.allclose(ll[:8, c][fin], theirs[fin], rtol=1e-12, atol=1e-9)


# ----------------------------------------------------------------------------------------------------------
# Sampling, OOD concepts, prompts
# ----------------------------------------------------------------------------------------------------------


def test_pretraining_samples_stay_in_one_id_concept_with_the_prior_frequencies():
    m = ginc_model(seed=4, **SMALL, trans_temp=0.5)
    N, T = 4000, 8
    s = sample(m.as_hmm(), N, T, 11)
    concept, _, slot = m.split_state(s.states.astype(np.int64))
    assert np.all(concept == concept[:, :1])  # the concept is drawn once per sequence
    assert set(np.unique(concept)) <= set(m.id_concepts.tolist())
    z_max = clt_threshold(m.num_concepts + T)  # Bonferroni over every cell below, alpha = 1e-3
    counts = np.bincount(concept[:, 0], minlength=m.num_concepts)
    p = m.concept_prior
    ok = p > 0
    assert np.all(np.abs(counts[ok] - N * p[ok]) / np.sqrt(N * p[ok] * (1 - p[ok])) < z_max)
    # The delimiter at position t has the exact marginal P(s_t = 0) = (start @ trans^t) . 1[memory = 0].
    joint = m.as_hmm()
    dist, delim = joint.start.copy(), joint.emit[:, DELIMITER]
    for t in range(T):
        q = float(dist @ delim)
        freq = float(np.mean(s.tokens[:, t] == DELIMITER))
        assert np.array_equal(s.tokens[:, t] == DELIMITER, slot[:, t] == 0)
        assert abs(freq - q) * np.sqrt(N) / np.sqrt(q * (1 - q)) < z_max, (t, freq, q)
        dist = dist @ joint.trans
    post = concept_posterior(m, s.tokens[:200])
    assert np.all(post[:, m.ood_concepts] == 0) and np.allclose(post.sum(axis=1), 1.0)


def test_ood_concepts_keep_their_parameters_and_build_hmms():
    m = ginc_model(seed=5, **SMALL)
    c = int(m.ood_concepts[0])
    h = ood_hmm(m, c)
    assert np.array_equal(h.trans, m.concept_trans(c)) and np.array_equal(h.start, m.start[c])
    assert np.array_equal(m.as_hmm().trans[c * 6:(c + 1) * 6, c * 6:(c + 1) * 6], h.trans)  # kept, never entered
    s = sample(ood_hmm(m), 50, 6, 0)
    assert np.all(m.split_state(s.states.astype(np.int64))[0] == c)
    assert np.all(concept_posterior(m, s.tokens, prior=np.eye(3)[c])[:, c] == 1.0)
    with pytest.raises(InputError, match=r"^concept: concept 0 is in distribution"):
        ood_hmm(m, 0)
    with pytest.raises(InputError, match=r"^concept: the model has no out-of-distribution concept"):
        ood_hmm(ginc_model(seed=0, **{**SMALL, "num_ood_concepts": 0}))
    uniform = m.with_prior(np.full(3, 1 / 3))
    assert uniform.ood_concepts.size == 0 and np.array_equal(uniform.slot_trans, m.slot_trans)


def test_prompts_have_the_ginc_layout():
    m = ginc_model(seed=6, num_values=4, num_slots=5, vocab_size=12, num_id_concepts=2, num_ood_concepts=2)
    n, k = 3, 4
    for concept in (0, int(m.ood_concepts[0]), None):
        pr = icl_prompts(m, concept, num_prompts=20, num_examples=n, example_length=k, seed=1)
        assert pr.tokens.shape == (20, n * (k + 1) + k - 1) and pr.labels.shape == (20,)
        assert np.all(pr.slots[:, -1] == 0) and np.all(pr.slots[:, 0] != 0)
        if concept is None:
            assert np.all(pr.slots[:, :-1] != 0)
        else:
            best = np.argmax(m.slot_trans[concept], axis=1)
            assert np.array_equal(pr.slots[:, 1:k], best[pr.slots[:, :k - 1]])
        for i in range(20):
            full = np.concatenate([m.memory[pr.values[i, j], pr.slots[i]] for j in range(n + 1)])
            assert np.array_equal(pr.tokens[i], full[:-2]) and pr.labels[i] == full[-2]
            assert np.all(pr.tokens[i, k::k + 1] == DELIMITER)  # one delimiter after every example
        again = icl_prompts(m, concept, num_prompts=20, num_examples=n, example_length=k, seed=1)
        assert np.array_equal(again.tokens, pr.tokens)
    zero_shot = icl_prompts(m, 0, num_prompts=5, num_examples=0, example_length=2, seed=0)
    assert zero_shot.tokens.shape == (5, 1)
    acc = bayes_accuracy(m, zero_shot)
    assert 0.0 <= acc <= 1.0
    # The Bayes predictor on a short prompt against enumeration (the prompt may put weight on a value change
    # across the delimiter: the exact posterior handles it or the prompt is impossible, NaN).
    pr = icl_prompts(m, 1, num_prompts=3, num_examples=1, example_length=2, seed=3)
    for row in pr.tokens:
        nxt = _enumerate(m, row, next_token=True).sum(axis=0)
        got = predictive(m, row)
        assert np.all(np.isnan(got)) if nxt.sum() == 0 else np.allclose(got, nxt / nxt.sum(), rtol=0, atol=TOL)
    for kw, field in ((dict(num_prompts=0), "num_prompts"), (dict(num_examples=-1), "num_examples"),
                      (dict(example_length=1), "example_length")):
        args = dict(num_prompts=2, num_examples=1, example_length=3) | kw
        with pytest.raises(InputError, match=rf"^{field}: must be an integer"):
            icl_prompts(m, 0, **args)


# ----------------------------------------------------------------------------------------------------------
# The corpus and the command line
# ----------------------------------------------------------------------------------------------------------


def test_corpus_round_trip_resume_and_rebuilt_model(tmp_path):
    params = dict(SMALL, trans_temp=0.5)
    spec = CorpusSpec("ginc", params, num_sequences=300, length=10, seed=2, states=True, shard_tokens=10 * 70)
    manifest = write_corpus(tmp_path / "g", spec, progress=False)
    corpus = load_corpus(tmp_path / "g")
    assert manifest["preset"] == "ginc" and manifest["num_states"] == 18 and manifest["model"]["kind"] == "HMM"
    ref = sample(corpus.model, 300, 10, 2)
    assert np.array_equal(corpus.tokens(), ref.tokens) and np.array_equal(corpus.states(), ref.states)
    model = ginc_from_corpus(corpus)
    assert np.array_equal(model.as_hmm().trans, corpus.model.trans)
    concept = model.split_state(corpus.states().astype(np.int64))[0]
    assert set(np.unique(concept)) <= set(model.id_concepts.tolist())
    assert np.all(concept_posterior(model, corpus.tokens())[:, model.ood_concepts] == 0)
    # Resume: a run killed while writing shard 3 keeps shards 0-2 and finishes byte-identical to this one.
    import simulate.corpus as corpus_mod

    original, calls = corpus_mod._NpyStream.close, {"n": 0}

    def close_then_die(self):
        calls["n"] += 1
        if calls["n"] == 7:  # tokens and states of shards 0-2, then the tokens of shard 3
            raise KeyboardInterrupt
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(corpus_mod._NpyStream, "close", close_then_die)
        with pytest.raises(KeyboardInterrupt):
            write_corpus(tmp_path / "r", spec, progress=False)
    assert (tmp_path / "r" / "progress.jsonl").exists() and not (tmp_path / "r" / "manifest.json").exists()
    write_corpus(tmp_path / "r", spec, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == \
        {p.name: p.read_bytes() for p in (tmp_path / "g").iterdir()}
    # Another spec into the same directory is refused, naming the differing parameter.
    other = CorpusSpec("ginc", dict(params, value_identity=0.5), num_sequences=300, length=10, seed=2, states=True,
                       shard_tokens=10 * 70)
    with pytest.raises(InputError, match=r"params\.value_identity: 0\.9 there, 0\.5 asked"):
        write_corpus(tmp_path / "g", other, progress=False)
    wei = write_corpus(tmp_path / "w", CorpusSpec("wei2021", {"num_states": 3, "vocab_size": 4}, num_sequences=4,
                                                  length=3), progress=False)
    assert wei["preset"] == "wei2021"
    with pytest.raises(InputError, match=r"preset: is 'wei2021'; not a ginc corpus"):
        ginc_from_corpus(load_corpus(tmp_path / "w"))


def test_cli_generates_a_ginc_corpus_and_lists_its_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--num-values", "--num-slots", "--num-id-concepts", "--num-ood-concepts", "--value-identity"):
        assert sum(ln.strip().startswith(flag) for ln in out.splitlines()) == 1, flag
    assert "ginc: 50" in out and "ginc     Xie et al. 2021 GINC" in out
    rc = main(["generate", "--preset", "ginc", "--num-values", "2", "--num-slots", "3", "--vocab-size", "6",
               "--num-id-concepts", "2", "--num-ood-concepts", "1", "--value-identity", "0.5", "--sequences", "40",
               "--length", "12", "--seed", "3", "--out", str(tmp_path / "g"), "--states", "--no-progress"])
    assert rc == 0 and "wrote 480 tokens (uint8)" in capsys.readouterr().out
    corpus = load_corpus(tmp_path / "g")
    assert corpus.manifest["params"]["value_identity"] == 0.5 and corpus.manifest["params"]["trans_temp"] == 0.1
    assert ginc_from_corpus(corpus).num_concepts == 3


@pytest.mark.parametrize("extra, expected", [
    (["--value-identity", "1.5"], "--value-identity: must be a number in [0, 1], got 1.5"),
    (["--num-slots", "1"], "--num-slots: must be >= 2 for ginc"),
    (["--vocab-size", "1"], "--vocab-size: must be >= 2 for ginc"),
    (["--num-ood-concepts", "-1"], "--num-ood-concepts: must be an integer >= 0, got -1"),
    (["--num-id-concepts", "0"], "--num-id-concepts: must be an integer >= 1, got 0"),
    (["--num-values", "two"], "--num-values: 'two' is not a valid int"),
    (["--emit-temp", "0.2"], "--emit-temp: does not apply to preset 'ginc'"),
])
def test_cli_bad_ginc_parameters_get_one_line(extra, expected, tmp_path, capsys):
    out = tmp_path / "c"
    code = main(["generate", "--preset", "ginc", "--sequences", "4", "--length", "4", "--out", str(out),
                 "--no-progress", *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ftsim generate: error: ") and expected in lines[0], lines[0]
    assert not out.exists()
    assert main(["generate", "--preset", "wei2021", "--num-values", "3", "--sequences", "4", "--length", "4",
                 "--out", str(out), "--no-progress"]) == 2
    assert "--num-values: does not apply to preset 'wei2021'" in capsys.readouterr().err
