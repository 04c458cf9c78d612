"""Exact oracles of simulate/wei2021/oracles.py: labels against the foundation's task definitions (an
independent code path), leave-one-out outputs against masked forward-backward, the memory theorem's
known-syntax identity as a property, and the oracle bundle's certificates."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from simulate.hmm import MemoryHMM
from simulate.oracles import masked_memory_posterior, masked_outputs
from simulate.sampling import sample
from simulate.tasks import linear_posterior_task, memory_linear_task
from simulate.wei2021.oracles import (
    BALANCE,
    downstream_data,
    exact_exp1_oracles,
    leave_one_out_outputs,
    memory_task,
    wei2021_task,
)
from tests.strategies import memory_hmms, stochastic_matrices


def test_downstream_labels_match_the_task_definitions():
    hmm, mu = wei2021_task(6, 5, hmm_seed=1, task_seed=2, length=8)
    d = downstream_data(hmm, mu, 300, 8, seed=3)
    assert d.observed.shape == (300, 8) and d.post0.shape == (300, 6) and d.G0.shape == (300, 5)
    np.testing.assert_array_equal(d.labels, linear_posterior_task(mu).labels(hmm, d.observed))
    np.testing.assert_allclose(d.G0.sum(1), 1.0, atol=1e-12)
    mem, mmu = memory_task(3, 4, 10, hmm_seed=0, task_seed=1, length=8)
    md = downstream_data(mem, mmu, 300, 8, seed=4)
    np.testing.assert_array_equal(md.labels, memory_linear_task(mem, mmu).labels(mem, md.observed))


def test_balanced_mu_gives_both_classes():
    for m in (4, 10, 30):
        hmm, mu = wei2021_task(m, 10, hmm_seed=0, task_seed=0, length=12)
        assert np.count_nonzero(mu) == min(6, m)
        rate = downstream_data(hmm, mu, 2000, 12, seed=9).labels.mean()
        # The probe that accepted mu had 1000 other inputs; 3 binomial standard errors (<= 0.05) of slack.
        assert BALANCE[0] - 0.05 <= rate <= BALANCE[1] + 0.05


@st.composite
def positive_memory_hmms(draw):
    model = draw(memory_hmms(max_memory=3, max_syntax=3, max_vocab=5))
    emit = np.stack([draw(stochastic_matrices(model.num_syntax, model.vocab_size, allow_near_zero=False))
                     for _ in range(model.num_memory)])
    return MemoryHMM(model.memory_prior, model.syntax_start, model.syntax_trans, emit)


@given(positive_memory_hmms(), st.integers(0, 2**31 - 1))
def test_leave_one_out_outputs_equal_masked_inference(model, seed):
    x = sample(model, 3, 5, seed).tokens.astype(np.int64)
    ours = leave_one_out_outputs(model, x)
    ref = masked_outputs(model, x)
    # One division by E[h, x_t] >= ~1e-3 per entry after a float64 forward-backward: 1e-9 is generous.
    np.testing.assert_allclose(ours, ref, atol=1e-9)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_known_syntax_memory_identity(num_memory, num_syntax, seed):
    """Memory-HMM theorem, the linear step: when S_t is known from the rest of the input (deterministic
    syntax chain), G_t(x) = P(M | x_-t) E_{s_t}, so P(M | x_-t) = G_t E_{s_t}^+ whenever rank E_s = N <= n."""
    rng = np.random.default_rng(seed)
    n = num_memory + int(rng.integers(0, 3))
    emit = rng.dirichlet(np.ones(n), size=(num_memory, num_syntax))
    model = MemoryHMM(rng.dirichlet(np.ones(num_memory)), np.eye(num_syntax)[0],
                      np.roll(np.eye(num_syntax), 1, axis=1), emit)
    x = sample(model, 4, 6, seed).tokens.astype(np.int64)
    G = leave_one_out_outputs(model, x)
    for t in range(x.shape[1]):
        s_t = t % num_syntax
        sv = np.linalg.svd(emit[:, s_t, :], compute_uv=False)
        if sv[-1] < 1e-3:
            continue  # ill-conditioned draw: the identity holds but not to the tolerance below
        pm = masked_memory_posterior(model, x, t)
        np.testing.assert_allclose(G[:, t] @ np.linalg.pinv(emit[:, s_t, :]), pm, atol=1e-10 / sv[-1])


def test_exact_exp1_oracles_certificates_and_ordering():
    hmm, mu = wei2021_task(15, 10, hmm_seed=0, task_seed=0, length=10)
    d = downstream_data(hmm, mu, 1200, 10, seed=1)
    tr, te = d.split((600, 600))
    r = exact_exp1_oracles(hmm, mu, tr, te, restarts=1, steps=60, margin_rows=300)
    assert not r["head_condition"] and r["prompt_condition"]
    assert r["prompt_certificate"] == 1.0
    assert r["head_hard_margin"] <= 1e-7  # m > n: no linear head on G_0 is exact
    # The prompt search starts at the head solution; 2 points of slack for test-split noise (600 rows).
    assert r["prompt_oracle_identity"] >= r["head_oracle"] - 0.02
    assert 0.0 < r["label_balance"] < 1.0
