"""Kernel solvers against oracles: primal ridge regression, scikit-learn's logistic regression, ODE integration of
gradient flow, and the primal stationary point of the asymmetric LS-SVM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from tests.strategies import psd_kernels
from theory.solvers import (
    as_matrix,
    asymmetric_lssvm,
    gradient_flow,
    kernel_logistic_regression,
    kernel_regression,
    targets_from_labels,
)


def _class_kernel(A: np.ndarray, B: np.ndarray, C: int) -> np.ndarray:
    """The class-coupled linear kernel (A B^T) (x) I_C as an (N, C, M, C) array."""
    return np.einsum("id,jd,ab->iajb", A, B, np.eye(C))


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), ridge=st.floats(1e-3, 10), C=st.integers(1, 3))
def test_kernel_regression_equals_primal_ridge_regression_with_f0(seed, ridge, C):
    rng = np.random.default_rng(seed)
    N, M, d = 12, 5, 4
    X, Xt = rng.standard_normal((N, d)), rng.standard_normal((M, d))
    Y, F0, F0t = rng.standard_normal((N, C)), rng.standard_normal((N, C)), rng.standard_normal((M, C))
    pred = kernel_regression(_class_kernel(X, X, C), Y, _class_kernel(Xt, X, C), f0_train=F0, f0_test=F0t,
                             ridge=ridge)
    W = np.linalg.solve(X.T @ X + ridge * np.eye(d), X.T @ (Y - F0))  # primal: one ridge problem per output
    np.testing.assert_allclose(pred.numpy(), F0t + Xt @ W, rtol=1e-8, atol=1e-9)


def test_ridgeless_regression_is_the_minimum_norm_interpolant():
    rng = np.random.default_rng(0)
    X, Xt, y = rng.standard_normal((6, 20)), rng.standard_normal((3, 20)), rng.standard_normal((6, 1))
    pred = kernel_regression(X @ X.T, y, Xt @ X.T)
    np.testing.assert_allclose(pred.numpy(), Xt @ np.linalg.pinv(X) @ y, rtol=1e-9, atol=1e-10)
    # and it interpolates the training targets
    np.testing.assert_allclose(kernel_regression(X @ X.T, y, X @ X.T).numpy(), y, atol=1e-9)


def test_ridge_scales_and_asymmetric_kernels():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((8, 3))
    K, y = X @ X.T, rng.standard_normal((8, 1))
    a = kernel_regression(K, y, K, ridge=0.1, ridge_scale="trace")
    b = kernel_regression(K, y, K, ridge=0.1 * np.trace(K) / 8)
    c = kernel_regression(K, y, K, ridge=0.1, ridge_scale="operator_norm")
    d = kernel_regression(K, y, K, ridge=0.1 * np.linalg.norm(K, 2))
    assert torch.allclose(a, b) and torch.allclose(c, d)
    A = K + rng.standard_normal((8, 8))  # an asymmetric (A-SignGD-like) kernel goes through least squares
    np.testing.assert_allclose(kernel_regression(A, y, A, ridge=0.3).numpy(),
                               A @ np.linalg.solve(A + 0.3 * np.eye(8), y), rtol=1e-8)
    with pytest.raises(ValueError, match="ridge_scale"):
        kernel_regression(K, y, K, ridge=1, ridge_scale="bogus")
    with pytest.raises(ValueError, match="square"):
        kernel_regression(K[:, :5], y, K)


@settings(max_examples=15)
@given(K=psd_kernels(max_n=8), seed=st.integers(0, 2**31 - 1), t=st.floats(0.01, 3), lr=st.floats(0.1, 2))
def test_gradient_flow_matches_ode_integration(K, seed, t, lr):
    """The closed form against solve_ivp on the joint ODE of training and test outputs:
    d f(X)/dt = -lr K (f(X) - y), d f(x)/dt = -lr K_xX (f(X) - y)."""
    rng = np.random.default_rng(seed)
    n = K.shape[0]
    m = 3
    G = np.linalg.cholesky(K + 1e-9 * np.eye(n))  # features so that the test kernel is consistent with K
    Gt = rng.standard_normal((m, n))
    Kx = Gt @ G.T
    y, f0, f0t = rng.standard_normal(n), rng.standard_normal(n), rng.standard_normal(m)

    def rhs(_, z):
        r = z[:n] - y
        return np.concatenate([-lr * K @ r, -lr * Kx @ r])

    sol = solve_ivp(rhs, (0, t), np.concatenate([f0, f0t]), method="DOP853", rtol=1e-11, atol=1e-12)
    z = sol.y[:, -1]
    train = gradient_flow(K, y[:, None], t, f0_train=f0[:, None], lr=lr).numpy()[:, 0]
    test = gradient_flow(K, y[:, None], t, k_test_train=Kx, f0_train=f0[:, None], f0_test=f0t[:, None],
                         lr=lr).numpy()[:, 0]
    scale = 1 + np.abs(z).max()
    np.testing.assert_allclose(train, z[:n], atol=1e-7 * scale)
    np.testing.assert_allclose(test, z[n:], atol=1e-7 * scale)
    # matrix-exponential oracle for the training outputs
    np.testing.assert_allclose(train, y + expm(-lr * t * K) @ (f0 - y), atol=1e-8 * scale)


def test_gradient_flow_limits():
    rng = np.random.default_rng(2)
    G = rng.standard_normal((10, 4))  # rank 4 < 10: a singular kernel
    K, Kx = G @ G.T, rng.standard_normal((3, 4)) @ G.T
    y, f0, f0t = rng.standard_normal((10, 1)), rng.standard_normal((10, 1)), rng.standard_normal((3, 1))
    kw = dict(k_test_train=Kx, f0_train=f0, f0_test=f0t)
    # t = 0: nothing moved
    np.testing.assert_allclose(gradient_flow(K, y, 0.0, **kw).numpy(), f0t, atol=1e-12)
    np.testing.assert_allclose(gradient_flow(K, y, 0.0, f0_train=f0).numpy(), f0, atol=1e-12)
    # t = inf: the ridgeless kernel regression; large t approaches it
    inf = gradient_flow(K, y, None, **kw)
    np.testing.assert_allclose(inf.numpy(), kernel_regression(K, y, Kx, f0_train=f0, f0_test=f0t).numpy(),
                               atol=1e-9)
    np.testing.assert_allclose(gradient_flow(K, y, 1e7, **kw).numpy(), inf.numpy(), atol=1e-6)
    # training outputs at t = inf: y projected on range(K), the rest keeps f0
    P = G @ np.linalg.pinv(G)
    np.testing.assert_allclose(gradient_flow(K, y, None, f0_train=f0).numpy(), f0 + P @ (y - f0), atol=1e-9)
    # a sequence of times stacks
    traj = gradient_flow(K, y, [0.0, 1.0, None], **kw)
    assert traj.shape == (3, 3, 1) and torch.allclose(traj[2], inf)
    with pytest.raises(ValueError, match="t must be >= 0"):
        gradient_flow(K, y, -1.0)


@pytest.mark.parametrize("C", [1, 3])
def test_kernel_logistic_regression_equals_sklearn(C):
    """For the linear kernel X X^T (x) I_C, kernel logistic regression is logistic regression on X."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(C)
    N, M, d, lam = 40, 10, 5, 0.7
    X, Xt = rng.standard_normal((N, d)), rng.standard_normal((M, d))
    y = rng.integers(0, max(C, 2), N)
    kernel_c = max(C, 1)
    logits = kernel_logistic_regression(_class_kernel(X, X, kernel_c), y, _class_kernel(Xt, X, kernel_c),
                                        ridge=lam, ridge_scale="absolute", tol=1e-12)
    ref = LogisticRegression(C=1 / lam, fit_intercept=False, tol=1e-12, max_iter=10_000).fit(X, y)
    if C == 1:
        np.testing.assert_allclose(logits.numpy()[:, 0], Xt @ ref.coef_[0], atol=2e-6)
    else:
        np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), ref.predict_proba(Xt), atol=2e-6)


def test_kernel_logistic_regression_f0_and_errors():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((20, 3))
    y = rng.integers(0, 2, 20)
    K = _class_kernel(X, X, 2)
    big = np.where(np.eye(2)[y] > 0, 30.0, -30.0)  # f0 that already classifies perfectly with huge margin
    z = kernel_logistic_regression(K, y, K, f0_train=big, f0_test=big, ridge=1.0)
    assert np.array_equal(z.argmax(1).numpy(), y)
    with pytest.raises(ValueError, match="ridge > 0"):
        kernel_logistic_regression(K, y, K, ridge=0.0)


def _primal_asymmetric(Fs, Ft, t, gamma):
    """Stationary point of J(w, v) = w^T v + gamma/2 ||t - Fs w||^2 + gamma/2 ||t - Ft v||^2 (the AsK-LS primal
    with the equality constraints substituted)."""
    d = Fs.shape[1]
    A = np.block([[gamma * Fs.T @ Fs, np.eye(d)], [np.eye(d), gamma * Ft.T @ Ft]])
    b = np.concatenate([gamma * Fs.T @ t, gamma * Ft.T @ t])
    wv = np.linalg.solve(A, b)
    return wv[:d], wv[d:]


@pytest.mark.parametrize("C", [1, 2])
def test_asymmetric_lssvm_equals_its_primal(C):
    rng = np.random.default_rng(10 + C)
    N, M, d, gamma, lam = 9, 4, 30, 1.7, 0.3
    # feature maps of (example, output) pairs: phi_t = "gradient", phi_s = "sign of gradient"
    Gt_tr, Gt_te = rng.standard_normal((N * C, d)), rng.standard_normal((M * C, d))
    Gs_tr, Gs_te = np.sign(Gt_tr + 0.3 * rng.standard_normal(Gt_tr.shape)), np.sign(Gt_te)
    A = Gt_tr @ Gs_tr.T  # A_ij = <phi_t(x_i), phi_s(x_j)> = K(x_i, x_j)
    k_test_train = Gt_te @ Gs_tr.T  # K(x_test, x_train) = <g(x_test), sign g(x_train)>
    k_train_test = Gt_tr @ Gs_te.T  # <g(x_train), sign g(x_test)>
    labels = rng.integers(0, 2, N) if C == 1 else rng.integers(0, C, N)
    f0, f0t = 0.1 * rng.standard_normal((N, C)), 0.1 * rng.standard_normal((M, C))
    T = targets_from_labels(labels, C).numpy() - f0
    w, v = _primal_asymmetric(Gs_tr, Gt_tr, T.reshape(-1), gamma)
    f_s, f_t = Gs_te @ w, Gt_te @ v
    # class-coupled (N, C, M, C) layout: rows of the flat matrices are (example, output)
    A, k_test_train = A.reshape(N, C, N, C), k_test_train.reshape(M, C, N, C)
    k_train_test = k_train_test.reshape(N, C, M, C)
    pred = asymmetric_lssvm(k_test_train, A, labels, k_train_test_asym=k_train_test, gamma=gamma, lam=lam,
                            f0_train=f0, f0_test=f0t)
    np.testing.assert_allclose(pred.numpy(), f0t + (lam * f_t + (1 - lam) * f_s).reshape(M, C), rtol=1e-7,
                               atol=1e-8)
    only_t = asymmetric_lssvm(k_test_train, A, labels, gamma=gamma, f0_train=f0, f0_test=f0t)
    np.testing.assert_allclose(only_t.numpy(), f0t + f_t.reshape(M, C), rtol=1e-7, atol=1e-8)
    with pytest.raises(ValueError, match="k_train_test_asym"):
        asymmetric_lssvm(k_test_train, A, labels, lam=0.5)


def test_asymmetric_lssvm_matches_the_lm_kernel_ft_formulation_for_pm1_labels():
    """LM-Kernel-FT solves [[I/gamma, H], [H^T, I/gamma]] [a; b] = 1 with H = Y K_code Y, K_code[i, j] =
    <sign g_i, g_j>, and predicts sum_i a_i y_i <sign g_i, g(x)>. Re-derived here from that description."""
    rng = np.random.default_rng(3)
    N, M, d, gamma = 10, 5, 25, 0.8
    G, Gte = rng.standard_normal((N, d)), rng.standard_normal((M, d))
    y = np.where(rng.random(N) > 0.5, 1.0, -1.0)
    K_code = np.sign(G) @ G.T
    H = y[:, None] * K_code * y[None, :]
    system = np.block([[np.eye(N) / gamma, H], [H.T, np.eye(N) / gamma]])
    ab = np.linalg.solve(system, np.ones(2 * N))
    omega = (Gte @ np.sign(G).T) @ (ab[:N] * y)
    ours = asymmetric_lssvm(Gte @ np.sign(G).T, G @ np.sign(G).T, (y > 0).astype(int), gamma=gamma)
    np.testing.assert_allclose(ours.numpy()[:, 0], omega, rtol=1e-8, atol=1e-10)


def test_asymmetric_lssvm_with_a_symmetric_kernel_is_kernel_ridge_regression():
    rng = np.random.default_rng(4)
    X, Xt = rng.standard_normal((12, 4)), rng.standard_normal((6, 4))
    y = rng.integers(0, 3, 12)
    K, Kx = _class_kernel(X, X, 3), _class_kernel(Xt, X, 3)
    np.testing.assert_allclose(asymmetric_lssvm(Kx, K, y, gamma=4.0).numpy(),
                               kernel_regression(K, y, Kx, ridge=0.25).numpy(), rtol=1e-8, atol=1e-10)


def test_targets_and_shapes():
    assert torch.equal(targets_from_labels(np.array([0, 1, 1]), 1), torch.tensor([[-1.0], [1.0], [1.0]]))
    assert torch.equal(targets_from_labels(np.array([-1, 1]), 1), torch.tensor([[-1.0], [1.0]]))
    assert torch.equal(targets_from_labels(torch.tensor([2, 0]), 3), torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    with pytest.raises(ValueError, match="binary labels"):
        targets_from_labels(np.array([0, 2]), 1)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        targets_from_labels(np.array([0, 3]), 3)
    K4 = torch.randn(2, 3, 4, 3)
    M, C = as_matrix(K4)
    assert M.shape == (6, 12) and C == 3 and M[1 * 3 + 2, 3 * 3 + 1] == K4[1, 2, 3, 1].double()
    with pytest.raises(ValueError, match="class dims differ"):
        as_matrix(torch.randn(2, 3, 2, 2))


def test_flat_class_coupled_kernels_infer_c_from_the_labels():
    """(N*C, N*C) matrices work like (N, C, N, C) tensors: C = rows / number of training labels."""
    rng = np.random.default_rng(6)
    N, M, C = 10, 4, 3
    G, Gt = rng.standard_normal((N * C, 40)), rng.standard_normal((M * C, 40))
    K, Kx = G @ G.T, Gt @ G.T
    y = rng.integers(0, C, N)
    f0, f0t = rng.standard_normal((N, C)), rng.standard_normal((M, C))
    K4, Kx4 = K.reshape(N, C, N, C), Kx.reshape(M, C, N, C)
    for fn, kw in ((kernel_regression, dict(ridge=0.1)), (kernel_logistic_regression, dict(ridge=0.1)),
                   (asymmetric_lssvm, dict(gamma=2.0))):
        if fn is asymmetric_lssvm:
            flat, full = fn(Kx, K, y, f0_train=f0, f0_test=f0t, **kw), fn(Kx4, K4, y, f0_train=f0, f0_test=f0t, **kw)
        else:
            flat, full = fn(K, y, Kx, f0_train=f0, f0_test=f0t, **kw), fn(K4, y, Kx4, f0_train=f0, f0_test=f0t, **kw)
        assert flat.shape == (M, C) and torch.allclose(flat, full, atol=1e-10)
    np.testing.assert_allclose(gradient_flow(K, np.eye(C)[y], 2.0, k_test_train=Kx).numpy(),
                               gradient_flow(K4, np.eye(C)[y], 2.0, k_test_train=Kx4).numpy(), atol=1e-10)
    with pytest.raises(ValueError, match="not a multiple"):
        kernel_regression(K, y[:7], Kx)


@pytest.mark.parametrize("solver", ["regression", "logistic", "flow", "asym"])
def test_every_solver_names_a_test_kernel_of_the_wrong_width(solver):
    """A (M, N') test kernel with N' != N is rejected before any algebra, naming both kernels, by all four
    solvers (kernel logistic regression used to fail later inside a matmul)."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((5, 3))
    k_train, labels = g @ g.T, np.array([0, 1, 0, 1, 1])
    bad = rng.standard_normal((2, 4))  # 4 columns for 5 training examples
    call = {"regression": lambda: kernel_regression(k_train, labels, bad),
            "logistic": lambda: kernel_logistic_regression(k_train, labels, bad, ridge=1e-3),
            "flow": lambda: gradient_flow(k_train, labels, [1.0], k_test_train=bad),
            "asym": lambda: asymmetric_lssvm(bad, k_train, labels)}[solver]
    with pytest.raises(ValueError, match=r"has 4 columns but k_train(_asym)? has 5 rows"):
        call()
