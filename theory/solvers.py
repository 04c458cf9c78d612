"""Kernel solvers for eNTK predictions: kernel regression, kernel logistic regression, the asymmetric LS-SVM of
A-SignGD, and closed-form MSE gradient flow.

Kernels are class-coupled: ``(N, C, M, C)`` tensors K[i, c, j, c'] (as returned by
:func:`theory.ntk.empirical_ntk`) or their ``(N*C, M*C)`` flattenings, rows ordered (example, output); for a flat
training kernel C is the number of rows over the number of training labels. Targets and outputs are ``(N, C)``.
Everything is solved in float64 on CPU; inputs may be numpy arrays or tensors on any device.

The f_0 correction (Malladi et al. 2023, "A Kernel-Based View of Language Model Fine-Tuning", Sec. 6 and
Appendix; Arora et al. 2019): the linearised model is f(x) = f_0(x) + <grad f_0(x), theta - theta_0>, so the
kernel machine is fit to the residual y - f_0(X) and its prediction is added to f_0(x).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = [
    "as_matrix", "kernel_regression", "kernel_logistic_regression", "asymmetric_lssvm", "gradient_flow",
    "targets_from_labels",
]

_F64 = torch.float64


def _t(x, name: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"{name} is required")
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x.detach().to("cpu", _F64)


def as_matrix(k, name: str = "kernel", num_outputs: int | None = None) -> tuple[torch.Tensor, int]:
    """Flatten a class-coupled kernel to (N*C, M*C); return it and C.

    A 2-D input is taken as already flat; its C is ``num_outputs`` (default 1).
    """
    k = _t(k, name)
    if k.ndim == 4:
        n, c, m, c2 = k.shape
        if c != c2:
            raise ValueError(f"{name}: class dims differ: shape {tuple(k.shape)}")
        return k.reshape(n * c, m * c2), c
    if k.ndim == 2:
        return k, (num_outputs or 1)
    raise ValueError(f"{name}: expected (N, C, M, C) or (N*C, M*C), got shape {tuple(k.shape)}")


def _train_kernel(k, labels, name: str) -> tuple[torch.Tensor, int]:
    """The flat training kernel and C. A 4-D kernel carries C; for a flat (R, R) kernel C = R / N, with N the
    number of labels (rows of the targets), so flat class-coupled kernels need no extra argument."""
    k = _t(k, name)
    if k.ndim != 2:
        k, C = as_matrix(k, name)
        _check_square(k, name)
        return k, C
    _check_square(k, name)
    y = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    n = int(y.shape[0])
    if n == 0 or k.shape[0] % n:
        raise ValueError(f"{name}: {k.shape[0]} rows are not a multiple of the {n} training labels")
    C = k.shape[0] // n
    if y.ndim == 2 and y.shape[1] != C:
        raise ValueError(f"{name}: {k.shape[0]} rows for {n} examples means C={C}, but targets have {y.shape[1]}")
    return k, C


def targets_from_labels(labels, num_outputs: int) -> torch.Tensor:
    """(N, C) regression targets from labels.

    Integer class labels (N,) become one-hot rows for C > 1 and +-1 for C = 1 (labels {0, 1} or {-1, +1},
    the binary single-logit convention of Malladi et al.); float (N, C) arrays are returned as they are.
    """
    y = labels.detach().cpu() if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    if y.ndim == 2:
        if y.shape[1] != num_outputs:
            raise ValueError(f"targets have {y.shape[1]} columns but the kernel has C={num_outputs} outputs")
        return y.to(_F64)
    if y.ndim != 1:
        raise ValueError(f"labels must be (N,) class indices or (N, C) targets, got shape {tuple(y.shape)}")
    if y.is_floating_point() and not torch.all(y == y.round()):
        if num_outputs != 1:
            raise ValueError("float labels of shape (N,) are only allowed with C = 1 output")
        return y.to(_F64).reshape(-1, 1)
    y = y.long()
    if num_outputs == 1:
        vals = set(y.unique().tolist())
        if not vals <= {0, 1} and not vals <= {-1, 1}:
            raise ValueError(f"binary labels must be in {{0, 1}} or {{-1, +1}}, got {sorted(vals)}")
        return torch.where(y > 0, 1.0, -1.0).to(_F64).reshape(-1, 1)
    if y.min() < 0 or y.max() >= num_outputs:
        raise ValueError(f"class labels must be in [0, {num_outputs}), got range [{int(y.min())}, {int(y.max())}]")
    return torch.nn.functional.one_hot(y, num_outputs).to(_F64)


def _outputs(x, n: int, c: int, name: str) -> torch.Tensor:
    if x is None:
        return torch.zeros(n, c, dtype=_F64)
    x = _t(x, name)
    if x.numel() != n * c:
        raise ValueError(f"{name}: expected {n} x {c} outputs, got shape {tuple(x.shape)}")
    return x.reshape(n, c)


def _ridge_value(k: torch.Tensor, ridge: float, ridge_scale: str) -> float:
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    if ridge_scale == "absolute":
        return float(ridge)
    if ridge_scale == "trace":  # relative to the mean eigenvalue
        return float(ridge * k.diagonal().mean().abs())
    if ridge_scale == "operator_norm":  # as LM-Kernel-FT's kernel_regularization
        return float(ridge * torch.linalg.matrix_norm(k, ord=2))
    raise ValueError(f"ridge_scale must be 'absolute', 'trace' or 'operator_norm', got {ridge_scale!r}")


def _check_square(k: torch.Tensor, name: str) -> None:
    if k.shape[0] != k.shape[1]:
        raise ValueError(f"{name}: a training kernel must be square, got {tuple(k.shape)}")


def _test_kernel(k, name: str, C: int, k_train: torch.Tensor, train_name: str) -> torch.Tensor:
    """The flat (M*C, N*C) test-by-train kernel, checked against the flat training kernel's size."""
    kx, _ = as_matrix(k, name, C)
    if kx.shape[1] != k_train.shape[0]:
        raise ValueError(f"{name} has {kx.shape[1]} columns but {train_name} has {k_train.shape[0]} rows")
    return kx


def _eigh_psd(k: torch.Tensor, rcond: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the symmetric part of k, eigenvalues below rcond * max clipped to 0."""
    lam, V = torch.linalg.eigh((k + k.T) / 2)
    cut = (rcond if rcond is not None else k.shape[0] * torch.finfo(_F64).eps) * lam.abs().max().clamp_min(1e-300)
    lam = torch.where(lam > cut, lam, torch.zeros_like(lam))
    return lam, V


# ---------------------------------------------------------------------------------------------------------------
# Kernel regression and gradient flow
# ---------------------------------------------------------------------------------------------------------------

def kernel_regression(k_train, y_train, k_test_train, *, f0_train=None, f0_test=None, ridge: float = 0.0,
                      ridge_scale: str = "absolute", rcond: float | None = None) -> torch.Tensor:
    """Kernel (ridge) regression with the f_0 correction.

        pred = f0_test + K_xX (K_XX + ridge I)^+ (y - f0_train)

    With ``ridge = 0`` the pseudo-inverse gives the minimum-norm interpolant, the infinite-time limit of gradient
    flow (:func:`gradient_flow` with ``t=None``).

    Args:
        k_train: (N, C, N, C) or (N*C, N*C) training kernel K_XX.
        y_train: (N, C) targets (e.g. one-hot, or +-1 for C = 1); (N,) class labels are converted by
            :func:`targets_from_labels`.
        k_test_train: (M, C, N, C) or (M*C, N*C) kernel K_xX between test and training inputs.
        f0_train: (N, C) initial outputs f_0(X) (default 0).
        f0_test: (M, C) initial outputs f_0(x) (default 0).
        ridge: the ridge lambda (see ``ridge_scale``).
        ridge_scale: ``"absolute"`` (lambda as given), ``"trace"`` (lambda * mean diag K) or ``"operator_norm"``
            (lambda * ||K||_2, as LM-Kernel-FT's ``kernel_regularization``).
        rcond: relative eigenvalue cut-off of the pseudo-inverse (default N*C*eps).

    Returns:
        (M, C) predictions.
    """
    K, C = _train_kernel(k_train, y_train, "k_train")
    Kx = _test_kernel(k_test_train, "k_test_train", C, K, "k_train")
    n, m = K.shape[0] // C, Kx.shape[0] // C
    y = targets_from_labels(y_train, C)
    r = (y - _outputs(f0_train, n, C, "f0_train")).reshape(-1)
    lam = _ridge_value(K, ridge, ridge_scale)
    if torch.allclose(K, K.T, rtol=1e-10, atol=1e-12 * float(K.abs().max().clamp_min(1e-300))):
        ev, V = _eigh_psd(K + lam * torch.eye(K.shape[0], dtype=_F64), rcond)
        inv = torch.where(ev > 0, 1.0 / ev.clamp_min(1e-300), torch.zeros_like(ev))
        alpha = V @ (inv * (V.T @ r))
    else:  # an asymmetric kernel (A-SignGD) by least squares, as LM-Kernel-FT's lstsq solver
        alpha = torch.linalg.lstsq(K + lam * torch.eye(K.shape[0], dtype=_F64), r.unsqueeze(1),
                                   rcond=rcond, driver="gelsd").solution.squeeze(1)
    return _outputs(f0_test, m, C, "f0_test") + (Kx @ alpha).reshape(m, C)


def gradient_flow(k_train, y_train, t=None, *, k_test_train=None, f0_train=None, f0_test=None, lr: float = 1.0,
                  rcond: float | None = None) -> torch.Tensor:
    """Closed-form outputs of MSE gradient flow of the linearised model at time t (neural-tangents'
    ``gradient_descent_mse``).

    For the loss L = 1/2 ||f(X) - y||^2 (a sum over examples and outputs; for a mean over N examples pass
    ``lr / N``) and kernel K = K_XX, gradient flow d theta/dt = -lr grad L of the linearised model gives

        f_t(X) = y + exp(-lr K t) (f_0(X) - y),
        f_t(x) = f_0(x) + K_xX K^{-1} (I - exp(-lr K t)) (y - f_0(X)),

    evaluated through the eigen-decomposition K = V diag(lambda) V^T with (1 - e^{-lr lambda t}) / lambda -> lr t as
    lambda -> 0 (so null directions of K never move). ``t = None`` is the t -> infinity limit K^+ (the
    minimum-norm interpolant, identical to :func:`kernel_regression` with ridge 0).

    Args:
        k_train: (N, C, N, C) or (N*C, N*C) symmetric PSD kernel.
        y_train: (N, C) targets (or labels, see :func:`targets_from_labels`).
        t: a time, ``None`` (infinity), or a sequence of times (then the result gets a leading time axis).
        k_test_train: (M, C, N, C) or flat; if given, test outputs are returned, else training outputs.
        f0_train, f0_test: initial outputs (default 0).
        lr: learning rate of the flow.
        rcond: relative eigenvalue cut-off for t = None.

    Returns:
        (M, C) test or (N, C) training outputs; (T, ., C) for a sequence of times.
    """
    K, C = _train_kernel(k_train, y_train, "k_train")
    n = K.shape[0] // C
    y = targets_from_labels(y_train, C)
    f0 = _outputs(f0_train, n, C, "f0_train")
    r = (y - f0).reshape(-1)  # (N*C,)
    lam, V = _eigh_psd(K, rcond)
    r_eig = V.T @ r
    if k_test_train is not None:
        Kx = _test_kernel(k_test_train, "k_test_train", C, K, "k_train")
        m = Kx.shape[0] // C
        KxV = Kx @ V
        base = _outputs(f0_test, m, C, "f0_test")
    if isinstance(t, (np.ndarray, torch.Tensor)) and t.ndim == 0:
        t = float(t)
    many = isinstance(t, (Sequence, np.ndarray, torch.Tensor)) and not isinstance(t, str)
    times = list(t) if many else [t]
    outs = []
    for ti in times:
        if ti is not None and float(ti) < 0:
            raise ValueError(f"time t must be >= 0, got {ti}")
        if k_test_train is None:
            if ti is None:  # projection of y onto range(K); null directions keep f_0
                decay = torch.where(lam > 0, torch.zeros_like(lam), torch.ones_like(lam))
            else:
                decay = torch.exp(-lr * lam * float(ti))
            outs.append((y.reshape(-1) - V @ (decay * r_eig)).reshape(n, C))
        else:
            if ti is None:
                g = torch.where(lam > 0, 1.0 / lam.clamp_min(1e-300), torch.zeros_like(lam))
            else:
                x = lr * float(ti)
                g = torch.where(lam > 0, -torch.expm1(-x * lam) / lam.clamp_min(1e-300), torch.full_like(lam, x))
            outs.append(base + (KxV @ (g * r_eig)).reshape(m, C))
    return torch.stack(outs) if many else outs[0]


# ---------------------------------------------------------------------------------------------------------------
# Kernel logistic regression
# ---------------------------------------------------------------------------------------------------------------

def kernel_logistic_regression(k_train, labels, k_test_train, *, f0_train=None, f0_test=None, ridge: float = 1e-3,
                               ridge_scale: str = "trace", max_iter: int = 100, tol: float = 1e-10,
                               rcond: float | None = None) -> torch.Tensor:
    """Multi-class kernel logistic regression with the class-coupled kernel; returns test logits.

    The function f(x)_c = f_0(x)_c + sum_{j, c'} K[(x, c), (x_j, c')] alpha_{j c'} minimises

        sum_i CE(softmax(f(x_i)), y_i) + (lambda / 2) ||f - f_0||_K^2

    (for C = 1, the binary logistic loss log(1 + exp(-y f)) with y in {-1, +1}). Writing K = L L^T (L = V
    Lambda^{1/2} from the eigen-decomposition) makes it an ordinary L2-regularised logistic regression on the
    rows of L, solved by Newton's method with backtracking. For the linear kernel X X^T (x) I_C and no f_0 this
    is scikit-learn's multinomial ``LogisticRegression(C=1/lambda, fit_intercept=False)`` on X.

    Args:
        k_train: (N, C, N, C) or flat symmetric PSD kernel.
        labels: (N,) integer classes (C > 1: 0..C-1; C = 1: {0, 1} or {-1, +1}).
        k_test_train: (M, C, N, C) or flat.
        f0_train, f0_test: initial logits (default 0).
        ridge: lambda (must be > 0), scaled by ``ridge_scale`` (default: relative to the mean diagonal of K).
        ridge_scale: see :func:`kernel_regression`.
        max_iter, tol: Newton iterations and tolerance on the gradient norm.
        rcond: relative eigenvalue cut-off of the factorisation.

    Returns:
        (M, C) test logits.
    """
    K, C = _train_kernel(k_train, labels, "k_train")
    Kx = _test_kernel(k_test_train, "k_test_train", C, K, "k_train")
    n, m = K.shape[0] // C, Kx.shape[0] // C
    lam_reg = _ridge_value(K, ridge, ridge_scale)
    if lam_reg <= 0:
        raise ValueError("kernel_logistic_regression needs ridge > 0 (the loss has no minimiser on separable data)")
    y = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)).long().reshape(-1)
    if y.numel() != n:
        raise ValueError(f"labels: expected {n} labels, got {y.numel()}")
    ev, V = _eigh_psd(K, rcond)
    keep = ev > 0
    L = V[:, keep] * ev[keep].sqrt()  # (N*C, r): K = L L^T
    f0 = _outputs(f0_train, n, C, "f0_train")
    r = L.shape[1]
    w = torch.zeros(r, dtype=_F64)
    if C == 1:
        ys = targets_from_labels(y, 1).reshape(-1)  # +-1
    else:
        if y.min() < 0 or y.max() >= C:
            raise ValueError(f"labels must be in [0, {C})")
        Y = torch.nn.functional.one_hot(y, C).to(_F64)

    def objective(w):
        z = f0 + (L @ w).reshape(n, C)
        if C == 1:
            return torch.nn.functional.softplus(-ys * z[:, 0]).sum() + 0.5 * lam_reg * (w @ w)
        return -(Y * torch.log_softmax(z, 1)).sum() + 0.5 * lam_reg * (w @ w)

    for _ in range(max_iter):
        z = f0 + (L @ w).reshape(n, C)
        if C == 1:
            s = torch.sigmoid(-ys * z[:, 0])
            grad_z = (-ys * s).reshape(-1, 1)
            Hz = (s * (1 - s)).reshape(-1, 1, 1)  # (N, 1, 1)
        else:
            p = torch.softmax(z, 1)
            grad_z = p - Y
            Hz = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # (N, C, C) softmax Hessians
        g = L.T @ grad_z.reshape(-1) + lam_reg * w
        if float(g.norm()) <= tol * max(1.0, float(w.norm())):
            break
        Lb = L.reshape(n, C, r)
        H = torch.einsum("nck,ncd,ndr->kr", Lb, Hz, Lb) + lam_reg * torch.eye(r, dtype=_F64)
        step = torch.linalg.solve(H, g)
        f_old, a = objective(w), 1.0
        while a > 1e-10 and objective(w - a * step) > f_old - 1e-4 * a * (g @ step):
            a *= 0.5
        w = w - a * step
    alpha_coef = V[:, keep] @ (w / ev[keep].sqrt())  # K alpha = L w
    return _outputs(f0_test, m, C, "f0_test") + (Kx @ alpha_coef).reshape(m, C)


# ---------------------------------------------------------------------------------------------------------------
# Asymmetric least-squares SVM (A-SignGD)
# ---------------------------------------------------------------------------------------------------------------

def asymmetric_lssvm(k_test_train_asym, k_train_asym, labels, *, k_train_test_asym=None, gamma: float = 1.0,
                     lam: float = 1.0, f0_train=None, f0_test=None) -> torch.Tensor:
    """The asymmetric kernel least-squares SVM (He, Suykens et al., AsK-LS) used by Malladi et al. (2023) to
    solve with the A-SignGD kernel K(x, x') = <grad f(x), sign grad f(x')>.

    With two feature maps phi_t(x) = grad f(x) and phi_s(x) = sign grad f(x), and targets t_i = y_i - f_0(x_i),
    the primal problem

        min_{w, v, e, r}  w^T v + (gamma/2) sum_i e_i^2 + (gamma/2) sum_i r_i^2
        s.t.  w^T phi_s(x_i) = t_i - e_i,   v^T phi_t(x_i) = t_i - r_i

    has the dual linear system (A = k_train_asym, A_ij = K(x_i, x_j))

        [ I/gamma   A^T    ] [alpha]   [t]
        [ A         I/gamma] [beta ] = [t],

    and the two predictors f_t(x) = v^T phi_t(x) = sum_j alpha_j K(x, x_j) (the natural A-SignGD direction: the
    change of f(x) under sign-gradient steps on the training points) and f_s(x) = w^T phi_s(x) = sum_j beta_j
    <phi_t(x_j), phi_s(x)>. The prediction is f_0(x) + lam f_t(x) + (1 - lam) f_s(x). For +-1 labels and no f_0
    this is LM-Kernel-FT's ``AsymmetricLstsqKernelSolver`` (whose alpha, beta are ours times y); with f_0 it
    differs: LM-Kernel-FT keeps the right-hand side 1 and puts y - f_0 into H = Y K Y, which no longer fits
    y - f_0, whereas this regression form fits the residual. Multi-class problems use the class-coupled kernel
    (rows (example, output)).

    Args:
        k_test_train_asym: (M, C, N, C) or flat, K(x_test, x_train) = <g(x_test), sign g(x_train)>, i.e.
            ``empirical_ntk(f, p, x_test, x_train, kernel="asigngd")``.
        k_train_asym: (N, C, N, C) or flat, K(x_i, x_j) on the training set.
        labels: (N,) classes (C = 1: {0, 1} or {-1, +1}) or (N, C) float targets.
        k_train_test_asym: (N, C, M, C) or flat, <g(x_train), sign g(x_test)> = ``empirical_ntk(f, p, x_train,
            x_test, kernel="asigngd")``; needed only when ``lam != 1``.
        gamma: the LS-SVM regularisation (LM-Kernel-FT's ``kernel_gamma``, default 1).
        lam: weight of f_t (LM-Kernel-FT's ``kernel_lambda``).
        f0_train, f0_test: initial outputs (default 0).

    Returns:
        (M, C) predictions.
    """
    A, C = _train_kernel(k_train_asym, labels, "k_train_asym")
    Kx = _test_kernel(k_test_train_asym, "k_test_train_asym", C, A, "k_train_asym")
    n, m = A.shape[0] // C, Kx.shape[0] // C
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    t = (targets_from_labels(labels, C) - _outputs(f0_train, n, C, "f0_train")).reshape(-1)
    nc = A.shape[0]
    eye = torch.eye(nc, dtype=_F64) / gamma
    system = torch.cat([torch.cat([eye, A.T], 1), torch.cat([A, eye], 1)], 0)
    sol = torch.linalg.lstsq(system, torch.cat([t, t]).unsqueeze(1), driver="gelsd").solution.squeeze(1)
    alpha, beta = sol[:nc], sol[nc:]
    pred = lam * (Kx @ alpha)
    if lam != 1.0:
        if k_train_test_asym is None:
            raise ValueError("asymmetric_lssvm: lam != 1 needs k_train_test_asym = <g(x_train), sign g(x_test)>")
        Kf, _ = as_matrix(k_train_test_asym, "k_train_test_asym", C)
        if Kf.shape != (nc, m * C):
            raise ValueError(f"k_train_test_asym: expected shape ({nc}, {m * C}), got {tuple(Kf.shape)}")
        pred = pred + (1 - lam) * (Kf.T @ beta)
    return _outputs(f0_test, m, C, "f0_test") + pred.reshape(m, C)

