"""Count-sketch: unbiased inner products and the stated error, by exact enumeration of the hash randomness, by
statistics over seeds, and inside the eNTK engine (sign applied before sketching for the SignGD kernels)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from theory.ntk import empirical_ntk
from theory.oracles import explicit_jacobian, sign_tau
from theory.sketch import CountSketch, count_sketch, count_sketch_std_bound, count_sketch_variance


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs on one torch thread (see ``tests/conftest.py``)."""


# zeros and entries of magnitude >= 1e-3: products of two sub-1e-150 entries would underflow the tolerances
finite = st.one_of(st.just(0.0), st.floats(1e-3, 10), st.floats(-10, -1e-3))


@settings(max_examples=25)
@given(data=st.data(), P=st.integers(1, 4), k=st.integers(1, 3))
def test_exact_mean_and_variance_over_every_hash_function(data, P, k):
    """Enumerate all k^P bucket maps and 2^P sign maps (each equally likely): the sketched inner product's
    mean is exactly <g, h> and its variance is exactly the stated formula, which is below the stated bound."""
    g = torch.tensor(data.draw(hnp.arrays(np.float64, P, elements=finite)))
    h = torch.tensor(data.draw(hnp.arrays(np.float64, P, elements=finite)))
    values = []
    for buckets in itertools.product(range(k), repeat=P):
        for signs in itertools.product((-1.0, 1.0), repeat=P):
            b, s = torch.tensor(buckets), torch.tensor(signs, dtype=torch.float64)
            S = count_sketch(torch.stack([g, h]), b, s, k)
            # the definition, entry by entry: (S g)_j = sum_{p: h(p)=j} s(p) g_p
            manual = torch.zeros(2, k, dtype=torch.float64)
            for p in range(P):
                manual[0, buckets[p]] += signs[p] * g[p]
                manual[1, buckets[p]] += signs[p] * h[p]
            assert torch.allclose(S, manual, atol=1e-12)
            values.append(float(S[0] @ S[1]))
    values = np.array(values)
    scale = float(g.norm() * h.norm()) + 1e-300
    assert abs(values.mean() - float(g @ h)) <= 1e-10 * scale
    exact_var = float(count_sketch_variance(g, h, k))
    assert abs(values.var() - exact_var) <= 1e-9 * scale ** 2
    bound = float(count_sketch_std_bound(g.pow(2).sum().reshape(1), h.pow(2).sum().reshape(1), k)[0, 0])
    assert values.std() <= bound * (1 + 1e-9) + 1e-12


@settings(max_examples=8)
@given(seed=st.integers(0, 2**31 - 1), corr=st.floats(-1, 1), k=st.sampled_from([16, 64, 256]))
def test_statistics_over_seeds_match_the_formula(seed, corr, k):
    """Dense vectors, R = 300 independent sketches: the mean error is within 5 standard errors of 0 and the
    sample variance within 40% of the exact variance (the sample variance of R near-Gaussian draws has relative
    standard error sqrt(2/R) = 8%, so 40% is 5 standard errors)."""
    gen = torch.Generator().manual_seed(seed)
    P, R = 3000, 300
    g = torch.randn(P, generator=gen, dtype=torch.float64)
    h = corr * g + math.sqrt(1 - corr ** 2) * torch.randn(P, generator=gen, dtype=torch.float64)
    est = []
    for r in range(R):
        sk = CountSketch(k, seed=seed + r)
        out = torch.zeros(2, k, dtype=torch.float64)
        sk.sketch(0, torch.stack([g, h]), out)
        est.append(float(out[0] @ out[1]))
    est = np.array(est)
    var = float(count_sketch_variance(g, h, k))
    assert abs(est.mean() - float(g @ h)) <= 5 * math.sqrt(var / R)
    assert abs(est.var(ddof=1) / var - 1) <= 0.4


def test_sketch_hashes_are_reproducible():
    a = CountSketch(64, seed=3).hashes(2, 1000)
    b = CountSketch(64, seed=3).hashes(2, 1000)
    c = CountSketch(64, seed=4).hashes(2, 1000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert set(a[1].unique().tolist()) == {-1.0, 1.0} and int(a[0].max()) < 64
    with pytest.raises(ValueError, match="sketch_dim"):
        CountSketch(0)


def _mlp(seed=0, d=6, width=40, C=2):
    gen = torch.Generator().manual_seed(seed)
    p = {"W0": torch.randn(width, d, generator=gen, dtype=torch.float64) / math.sqrt(d),
         "b0": torch.randn(width, generator=gen, dtype=torch.float64),
         "W1": torch.randn(C, width, generator=gen, dtype=torch.float64) / math.sqrt(width)}

    def f(q, x):
        return torch.tanh(x @ q["W0"].T + q["b0"]) @ q["W1"].T

    return f, p


@pytest.mark.parametrize("kernel", ["sgd", "signgd", "asigngd"])
def test_engine_sketch_is_unbiased_with_the_stated_bound(kernel):
    f, p = _mlp()
    gen = torch.Generator().manual_seed(1)
    x1 = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    x2 = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    J1, J2 = explicit_jacobian(f, p, x1), explicit_jacobian(f, p, x2)
    A = sign_tau(J1) if kernel == "signgd" else J1
    B = J2 if kernel == "sgd" else sign_tau(J2)
    exact = A @ B.T
    k, R = 32, 40
    runs = [empirical_ntk(f, p, x1, x2, kernel=kernel, implementation="sketch", sketch_dim=k, seed=s)
            for s in range(R)]
    # The bound is sqrt(2/k) times the norms of the (signed) gradients that were sketched.
    bound = math.sqrt(2 / k) * torch.outer(A.norm(dim=1), B.norm(dim=1))
    assert torch.allclose(runs[0].error_bound.reshape(bound.shape), bound, rtol=1e-10)
    assert "count-sketch" in runs[0].plan.error and runs[0].plan.sketch_dim == k
    est = torch.stack([r.matrix() for r in runs])  # (R, N1*C, N2*C)
    # Unbiased: every entry's mean over R seeds lies within 5 of its own standard errors (bound / sqrt(R)) --
    # Bonferroni over 40 entries keeps the chance of a false alarm (CLT) below 1e-4.
    assert torch.all((est.mean(0) - exact).abs() <= 5 * bound / math.sqrt(R) + 1e-12)
    # Mean squared error is at most the summed variance bounds (slack 1.5 for R = 40 seeds).
    mse = float(((est - exact) ** 2).mean(0).sum())
    assert mse <= 1.5 * float((bound ** 2).sum())
    # Signing *after* sketching would give +-1 entries of a k-dim vector, nothing like the exact scale.
    assert float(est.mean(0).abs().max()) > 0.5 * float(exact.abs().max())


def test_symmetric_asigngd_sketch_uses_raw_and_signed_sides():
    f, p = _mlp(seed=2)
    x = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    J = explicit_jacobian(f, p, x)
    exact = J @ sign_tau(J).T
    est = torch.stack([empirical_ntk(f, p, x, kernel="asigngd", implementation="sketch", sketch_dim=64,
                                     seed=s).matrix() for s in range(30)])
    bound = math.sqrt(2 / 64) * torch.outer(J.norm(dim=1), sign_tau(J).norm(dim=1))
    assert torch.all((est.mean(0) - exact).abs() <= 5 * bound / math.sqrt(30) + 1e-12)
    # not symmetric: the engine must not have mirrored one triangle
    assert not torch.allclose(exact, exact.T)
