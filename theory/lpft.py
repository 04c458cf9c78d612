"""LP-FT through the NTK (Tomihari & Sato 2024) and Kumar et al.'s (2022) two-layer linear model: model-agnostic math.

A classifier ``f(x) = V phi(x; theta) + b`` with a linear head (V: (C, H), b: (C,)) on features phi of a backbone.
Linear probing (LP) fits V, b on frozen features; fine-tuning (FT) trains everything; LP-FT runs FT from the probed
head. This module holds what the theory talks about, for any model:

* **The eNTK decomposition** (Tomihari & Sato 2024, Sec. 4, the decomposition of the NTK matrix into the part of the
  head parameters and the part of the backbone parameters). The head and backbone parameters are disjoint, so the
  eNTK is the sum of their kernels, and both have closed forms:

      K_head[i, c, j, c']     = delta_{cc'} (phi(x_i)^T phi(x_j) + 1)                 (head_kernel)
      K_backbone[i, c, j, c'] = (V J_phi(x_i) J_phi(x_j)^T V^T)_{cc'}                  (backbone_kernel)

  with J_phi the (H, P) Jacobian of the features in the backbone parameters. The backbone part is quadratic in V:
  scaling the head by s scales it by s^2 and leaves the head part alone. :func:`head_backbone_kernels` computes the
  parts with :func:`theory.ntk.empirical_ntk`'s ``params_subset`` (the engine; the closed forms are the oracle), also
  for LoRA parameters in place of the backbone's. The paper calls the head part the "pre-train-effective"
  component (it depends on pretrained features only) and the backbone part the "FT-effective" one.
* **Head-norm dynamics of LP** (T2). Full-batch gradient descent on the head over fixed features
  (:func:`probe_gradient_descent`). Under squared loss from a zero head with ``lr <= 1 / lambda_max`` every
  eigen-coordinate of the head grows monotonically to the minimum-norm least-squares solution, so
  ``||V_t|| <= ||V_LS||`` for all t (:func:`least_squares_head`). Under cross-entropy on linearly separable data
  the head norm grows without bound, like ``||w_hat|| log t`` with ``w_hat`` the hard-margin SVM direction
  (Soudry et al. 2018, "The Implicit Bias of Gradient Descent on Separable Data", Thm. 3).
* **Feature change** ``||phi_FT(x) - phi_0(x)||`` (T3; :func:`feature_change`).
* **Calibration** (T4): top-label expected calibration error with 15 equal-width bins ``(lo, hi]`` as the authors'
  ``calibration_error`` (:func:`expected_calibration_error`, :func:`reliability_bins`), the negative
  log-likelihood (:func:`nll`), and temperature scaling fitted on validation logits (:func:`fit_temperature`, Guo et
  al. 2017): NLL(z / T) is convex in beta = 1 / T, so a bounded scalar search finds the global minimum.
* **Kumar et al.'s two-layer linear model** (T5; :class:`LinearWorld`): ``f(x) = v^T B x``, B: (k, d) features,
  v: (k,) head, targets ``y = v*^T B* x``, ID inputs in an m-dimensional subspace S of R^d, OOD inputs isotropic.
  Gradient flow on the ID squared loss L = 1/(2n) ||X B^T v - y||^2 (:func:`two_layer_gradient_flow`, an adaptive
  ODE solve to tight tolerance) has exact invariants that are the heart of Kumar et al.'s Thm. 3.2: the gradient in B
  is ``-v r^T X / n``, whose rows lie in S, so ``B_t = B_0`` on S^perp (features of OOD directions never change) and
  ``v v^T - B B^T`` is conserved. The OOD error of any (v, B) is ``||B^T v - B*^T v*||^2`` (isotropic OOD inputs),
  which on S^perp is ``||P_perp (B_0^T v_t - B*^T v*)||^2``: a head fitted to distorted ID features, applied to
  undistorted OOD features. LP's head is the least-squares solution in closed form (:func:`lp_head`).

Shapes: kernels are (N1, C, N2, C) like the engine's; features (N, H); logits (N, C); labels (N,) int.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "KernelParts", "head_backbone_kernels", "head_kernel", "backbone_kernel", "kernel_trace", "kernel_shares",
    "head_norm", "feature_change", "softmax", "expected_calibration_error", "reliability_bins", "nll",
    "fit_temperature", "probe_gradient_descent", "least_squares_head", "LinearWorld", "linear_world", "lp_head",
    "two_layer_gradient_flow", "id_loss", "ood_error", "ood_error_split", "balancedness", "ECE_BINS",
]

ECE_BINS = 15  # the authors' calibration_error default


# ---------------------------------------------------------------------------------------------------------------
# The eNTK decomposition
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelParts:
    """The eNTK of a classifier split by parameter group: (N1, C, N2, C) tensors, ``total`` over the union."""

    head: torch.Tensor
    backbone: torch.Tensor
    total: torch.Tensor

    def shares(self) -> dict[str, float]:
        return kernel_shares(self.head, self.backbone)


def _as_predicate(names) -> Callable[[str], bool]:
    if callable(names):
        return names
    wanted = {names} if isinstance(names, str) else set(names)
    return lambda n: n in wanted


def head_backbone_kernels(f, params: Mapping[str, torch.Tensor], x1, x2=None, *, head, backbone=None,
                          total: bool = True, **engine) -> KernelParts:
    """The head and backbone parts of the eNTK of ``f(params, x) -> (N, C)`` through the engine's parameter subsets.

    Args:
        f, params, x1, x2: as :func:`theory.ntk.empirical_ntk`.
        head: names of (or a predicate on) the head's parameters.
        backbone: names / predicate of the backbone's (default: every parameter not in the head; pass the LoRA
            factors' names for the LoRA decomposition).
        total: also compute the kernel of the union in one engine call (its difference from head + backbone is
            the additivity check); otherwise ``total = head + backbone``.
        engine: passed to :func:`theory.ntk.empirical_ntk` (implementation, dtype, device, ...).
    """
    from theory.ntk import empirical_ntk

    is_head = _as_predicate(head)
    is_back = (lambda n: not is_head(n)) if backbone is None else _as_predicate(backbone)
    overlap = [n for n in params if is_head(n) and is_back(n)]
    if overlap:
        raise ValueError(f"head and backbone share parameters {overlap[:3]}: the decomposition needs disjoint groups")
    kh = empirical_ntk(f, params, x1, x2, params_subset=is_head, **engine).kernel
    kb = empirical_ntk(f, params, x1, x2, params_subset=is_back, **engine).kernel
    kt = (empirical_ntk(f, params, x1, x2, params_subset=lambda n: is_head(n) or is_back(n), **engine).kernel
          if total else kh + kb)
    return KernelParts(kh, kb, kt)


def head_kernel(phi1: torch.Tensor, phi2: torch.Tensor | None = None, num_classes: int = 2,
                bias: bool = True) -> torch.Tensor:
    """Closed form of the head part: delta_{cc'} (phi(x_i)^T phi(x_j) + [bias]), (N1, C, N2, C) float64."""
    phi1 = torch.as_tensor(phi1).double()
    phi2 = phi1 if phi2 is None else torch.as_tensor(phi2).double()
    gram = phi1 @ phi2.T + (1.0 if bias else 0.0)  # (N1, N2)
    eye = torch.eye(num_classes, dtype=torch.float64)
    return torch.einsum("ij,ab->iajb", gram, eye)


def backbone_kernel(V: torch.Tensor, J1: torch.Tensor, J2: torch.Tensor | None = None) -> torch.Tensor:
    """Closed form of the backbone part: (V J_phi(x_i) J_phi(x_j)^T V^T)_{cc'}, (N1, C, N2, C) float64.

    Args:
        V: (C, H) head weights.
        J1, J2: (N, H, P) Jacobians of the features in the backbone parameters (J2 = J1 when None).
    """
    V = torch.as_tensor(V).double()
    J1 = torch.as_tensor(J1).double()
    J2 = J1 if J2 is None else torch.as_tensor(J2).double()
    G1 = torch.einsum("ch,nhp->ncp", V, J1)  # (N1, C, P): gradients of the logits through the features
    G2 = torch.einsum("ch,nhp->ncp", V, J2)
    return torch.einsum("ncp,mdp->ncmd", G1, G2)


def kernel_trace(K: torch.Tensor | np.ndarray) -> float:
    """Trace of a square (N, C, N, C) kernel: sum_i sum_c K[i, c, i, c]."""
    K = torch.as_tensor(K).double()
    n, c = K.shape[0], K.shape[1]
    return float(K.reshape(n * c, n * c).diagonal().sum())


def kernel_shares(k_head, k_backbone) -> dict[str, float]:
    """Traces and Frobenius norms of the two parts and the share of each in the trace of their sum."""
    th, tb = kernel_trace(k_head), kernel_trace(k_backbone)
    fh = float(torch.linalg.vector_norm(torch.as_tensor(k_head).double()))
    fb = float(torch.linalg.vector_norm(torch.as_tensor(k_backbone).double()))
    tot = th + tb
    return {"trace_head": th, "trace_backbone": tb, "fro_head": fh, "fro_backbone": fb,
            "share_head": th / tot if tot > 0 else float("nan"),
            "share_backbone": tb / tot if tot > 0 else float("nan")}


def head_norm(weight) -> float:
    """Frobenius norm of the head's weight matrix V (the bias is not part of the norm, as in the paper)."""
    return float(np.linalg.norm(np.asarray(_np(weight), dtype=np.float64)))


def feature_change(phi_new, phi_0) -> dict[str, float]:
    """Mean over examples of ||phi_FT(x) - phi_0(x)||_2, and that mean relative to the mean ||phi_0(x)||_2."""
    a, b = np.asarray(_np(phi_new), np.float64), np.asarray(_np(phi_0), np.float64)
    if a.shape != b.shape:
        raise ValueError(f"feature_change: shapes {a.shape} and {b.shape} differ")
    d = np.linalg.norm(a - b, axis=1)
    base = float(np.linalg.norm(b, axis=1).mean())
    return {"feature_change": float(d.mean()), "feature_change_rel": float(d.mean()) / base if base > 0 else math.nan}


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------------------------

def softmax(logits) -> np.ndarray:
    """Row-wise softmax in float64 (max-shifted)."""
    z = np.asarray(_np(logits), np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def reliability_bins(probs, labels, n_bins: int = ECE_BINS) -> list[dict]:
    """Top-label reliability table: per equal-width confidence bin (lo, hi] its count, share of examples, mean
    confidence and accuracy (NaN for an empty bin). The predicted class is the first maximum (theory.metrics'
    tie rule)."""
    p = np.asarray(_np(probs), np.float64)
    y = np.asarray(_np(labels)).reshape(-1).astype(np.int64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"reliability_bins: probs {p.shape} and labels {y.shape} do not match")
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        n = int(inside.sum())
        rows.append({"lo": float(lo), "hi": float(hi), "count": n, "share": n / len(y) if len(y) else math.nan,
                     "confidence": float(conf[inside].mean()) if n else math.nan,
                     "accuracy": float(correct[inside].mean()) if n else math.nan})
    return rows


def expected_calibration_error(probs, labels, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE = sum_bins share * |accuracy - confidence| over equal-width bins (lo, hi] (the authors'
    ``calibration_error``; torchmetrics' binary/multiclass ``calibration_error`` with ``norm="l1"`` agrees)."""
    return float(sum(r["share"] * abs(r["accuracy"] - r["confidence"]) for r in reliability_bins(probs, labels,
                                                                                               n_bins)
                     if r["count"]))


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood -log softmax(z / T)_y, float64 (log-sum-exp shifted)."""
    z = np.asarray(_np(logits), np.float64) / temperature
    y = np.asarray(_np(labels)).reshape(-1).astype(np.int64)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def fit_temperature(logits, labels, bounds: tuple[float, float] = (1e-3, 1e3)) -> float:
    """Temperature T minimising the NLL of softmax(z / T) on (validation) logits (Guo et al. 2017).

    NLL is convex in beta = 1 / T (a log-sum-exp of linear functions of beta minus a linear one), so the bounded
    Brent search over log beta on [1/bounds[1], 1/bounds[0]] finds the global minimum (to ~1e-10 in log beta).
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(_np(logits), np.float64)
    y = np.asarray(_np(labels)).reshape(-1).astype(np.int64)
    if z.ndim != 2 or z.shape[0] != y.shape[0] or not len(y):
        raise ValueError(f"fit_temperature: logits {z.shape} and labels {y.shape} do not match")
    lo, hi = math.log(1.0 / bounds[1]), math.log(1.0 / bounds[0])
    res = minimize_scalar(lambda lb: nll(z * math.exp(lb), y), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-10, "maxiter": 500})
    return float(math.exp(-res.x))


# ---------------------------------------------------------------------------------------------------------------
# Head-norm dynamics of linear probing
# ---------------------------------------------------------------------------------------------------------------

def probe_gradient_descent(features, labels, num_classes: int, *, loss: str = "ce", lr: float = 0.1,
                           steps: int = 1000, record: Sequence[int] | None = None, bias: bool = True
                           ) -> list[dict]:
    """Full-batch gradient descent on a linear head over fixed features, from V = 0, b = 0.

    The losses are :func:`theory.finetune.finetune`'s: ``ce`` = mean cross-entropy of softmax(V phi + b),
    ``mse`` = 1/(2N) sum ||V phi + b - onehot(y)||^2. Float64 numpy.

    Returns:
        rows {"step", "head_norm" (||V||_F), "param_norm" (||[V b]||_F), "train_loss", "train_acc"} at the steps
        in ``record`` (default: 0 and ~50 log-spaced steps up to ``steps``).
    """
    X = np.asarray(_np(features), np.float64)
    y = np.asarray(_np(labels)).reshape(-1).astype(np.int64)
    N = X.shape[0]
    Y = np.eye(num_classes)[y]
    V = np.zeros((num_classes, X.shape[1]))
    b = np.zeros(num_classes)
    if record is None:
        record = sorted({0, *np.unique(np.geomspace(1, steps, 50).astype(int)).tolist()})
    want = set(int(s) for s in record)
    rows = []

    def row(step, Z):
        if loss == "ce":
            P = softmax(Z)
            val = float(-np.mean(np.log(np.maximum(P[np.arange(N), y], 1e-300))))
        else:
            val = float(0.5 * ((Z - Y) ** 2).sum() / N)
        return {"step": step, "head_norm": float(np.linalg.norm(V)),
                "param_norm": float(math.sqrt(np.linalg.norm(V) ** 2 + (np.linalg.norm(b) ** 2 if bias else 0.0))),
                "train_loss": val,
                "train_acc": float(np.mean(Z.argmax(1) == y))}

    for step in range(steps + 1):
        Z = X @ V.T + b
        if step in want:
            rows.append(row(step, Z))
        if step == steps:
            break
        R = (softmax(Z) - Y) if loss == "ce" else (Z - Y)  # dL/dZ * N
        V -= lr * (R.T @ X) / N
        if bias:
            b -= lr * R.mean(axis=0)
    return rows


def least_squares_head(features, labels, num_classes: int, bias: bool = True) -> tuple[np.ndarray, float, float]:
    """The minimum-norm least-squares head [V b] (the limit of GD on the squared loss from zero): returns V, the
    norm ||[V b]||_F, and the step size 1 / lambda_max(A^T A / N) (A the bias-augmented features) up to which GD
    is monotone in every eigen-coordinate of [V b] -- so ||[V_t b_t]|| <= ||[V_LS b_LS]|| for all t. (The bound is
    on the joint vector; ||V_t|| alone obeys it when the features are centred, so that V and b decouple.)"""
    X = np.asarray(_np(features), np.float64)
    y = np.asarray(_np(labels)).reshape(-1).astype(np.int64)
    A = np.hstack([X, np.ones((X.shape[0], 1))]) if bias else X
    W, *_ = np.linalg.lstsq(A, np.eye(num_classes)[y], rcond=None)  # (H[+1], C), minimum norm
    V = W[: X.shape[1]].T
    lam = float(np.linalg.eigvalsh(A.T @ A / A.shape[0]).max())
    return V, float(np.linalg.norm(W)), 1.0 / lam


# ---------------------------------------------------------------------------------------------------------------
# Kumar et al.'s two-layer linear model
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LinearWorld:
    """Kumar et al.'s (2022) setting.

    Attributes:
        B_star: (k, d) true features (orthonormal rows); v_star: (k,) true head; y = v*^T B* x.
        B0: (k, d) pretrained features, B* plus a perturbation of Frobenius norm ``feature_error``.
        S: (d, m) orthonormal basis of the ID subspace; X: (n, m)-Gaussian ID inputs mapped into S, (n, d).
        feature_error: ||B0 - B*||_F.
    OOD inputs are N(0, I_d), so the OOD error of a model w = B^T v is ||w - B*^T v*||^2.
    """

    B_star: np.ndarray
    v_star: np.ndarray
    B0: np.ndarray
    S: np.ndarray
    X: np.ndarray
    feature_error: float

    @property
    def y(self) -> np.ndarray:
        return self.X @ self.B_star.T @ self.v_star

    @property
    def w_star(self) -> np.ndarray:
        return self.B_star.T @ self.v_star

    @property
    def P_perp(self) -> np.ndarray:
        d = self.S.shape[0]
        return np.eye(d) - self.S @ self.S.T


def linear_world(d: int = 20, k: int = 5, m: int = 10, n: int = 40, feature_error: float = 0.1,
                 seed: int = 0) -> LinearWorld:
    """A random instance: B* with orthonormal rows, v* ~ N(0, I_k), S a uniformly random m-dim subspace, n ID
    inputs N(0, I_m) in S, B0 = B* + feature_error * E / ||E||_F (E Gaussian)."""
    if not (1 <= k <= d and 1 <= m < d and n >= m):
        raise ValueError(f"linear_world: need 1 <= k <= d, 1 <= m < d, n >= m; got d={d}, k={k}, m={m}, n={n}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, d, k, m, n]))
    B_star = np.linalg.qr(rng.standard_normal((d, k)))[0].T  # (k, d), orthonormal rows
    v_star = rng.standard_normal(k)
    S = np.linalg.qr(rng.standard_normal((d, m)))[0]  # (d, m)
    X = rng.standard_normal((n, m)) @ S.T
    E = rng.standard_normal((k, d))
    B0 = B_star + feature_error * E / np.linalg.norm(E)
    return LinearWorld(B_star, v_star, B0, S, X, float(feature_error))


def id_loss(v, B, world: LinearWorld) -> float:
    """1/(2n) ||X B^T v - y||^2."""
    r = world.X @ B.T @ v - world.y
    return float(0.5 * r @ r / len(r))


def ood_error(v, B, world: LinearWorld) -> float:
    """E_{x ~ N(0, I_d)} (v^T B x - v*^T B* x)^2 = ||B^T v - B*^T v*||^2."""
    e = B.T @ v - world.w_star
    return float(e @ e)


def ood_error_split(v, B, world: LinearWorld) -> dict[str, float]:
    """The OOD error split into its S and S^perp parts (they add up to :func:`ood_error`)."""
    e = B.T @ v - world.w_star
    es = world.S.T @ e
    ep = world.P_perp @ e
    return {"in_S": float(es @ es), "perp": float(ep @ ep)}


def lp_head(B, world: LinearWorld) -> np.ndarray:
    """Linear probing: the minimum-norm least-squares head on frozen features, argmin_v ||X B^T v - y||^2."""
    return np.linalg.lstsq(world.X @ B.T, world.y, rcond=None)[0]


def balancedness(v, B) -> np.ndarray:
    """v v^T - B B^T (k, k), conserved by gradient flow of a two-layer linear network (scalar output)."""
    return np.outer(v, v) - B @ B.T


def two_layer_gradient_flow(v0, B0, world: LinearWorld, t: float | None = None, *, rtol: float = 1e-11,
                            atol: float = 1e-13, grad_tol: float = 1e-10, max_time: float = 1e7
                            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Gradient flow of L(v, B) = 1/(2n) ||X B^T v - y||^2 from (v0, B0), solved by an adaptive 8th-order
    Runge-Kutta method (scipy's DOP853) at tight tolerances.

    dv/dt = -B X^T r / n,  dB/dt = -v r^T X / n,  r = X B^T v - y.

    Args:
        t: the time to stop at; ``None``: run until the gradient norm is below ``grad_tol`` (the ID loss's
            stationary point the flow converges to), doubling the horizon up to ``max_time``.

    Returns:
        (v_t, B_t, the time reached).
    """
    from scipy.integrate import solve_ivp

    X, y = world.X, world.y
    n = X.shape[0]
    k, d = np.shape(B0)

    def rhs(_, z):
        v, B = z[:k], z[k:].reshape(k, d)
        r = X @ (B.T @ v) - y
        g = X.T @ r / n  # (d,)
        return np.concatenate([-B @ g, -np.outer(v, g).reshape(-1)])

    z = np.concatenate([np.asarray(v0, np.float64), np.asarray(B0, np.float64).reshape(-1)])
    if t is not None:
        sol = solve_ivp(rhs, (0.0, t), z, method="DOP853", rtol=rtol, atol=atol)
        return sol.y[:k, -1], sol.y[k:, -1].reshape(k, d), float(t)
    now, horizon = 0.0, 10.0
    while True:
        sol = solve_ivp(rhs, (now, now + horizon), z, method="DOP853", rtol=rtol, atol=atol)
        z, now = sol.y[:, -1], now + horizon
        if np.linalg.norm(rhs(now, z)) < grad_tol or now >= max_time:
            return z[:k], z[k:].reshape(k, d), now
        horizon *= 2


# ---------------------------------------------------------------------------------------------------------------
# Linear probing and the fine-tuning methods as values
# ---------------------------------------------------------------------------------------------------------------

METHODS = ("LP", "FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT")


@dataclasses.dataclass(frozen=True)
class Probe:
    """A fitted linear probe: head weights V (C, H), bias b (C,), the L2 strength chosen (sklearn's C, the inverse
    regularisation) and the cross-validation folds used."""

    weight: np.ndarray
    bias: np.ndarray
    C: float
    folds: int

    def logits(self, features) -> np.ndarray:
        return np.asarray(_np(features), np.float64) @ self.weight.T + self.bias

    def head_weights(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """``{"weight", "bias"}`` tensors for :class:`theory.finetune.Head` ``init="given"``."""
        return {"weight": torch.as_tensor(self.weight, dtype=dtype), "bias": torch.as_tensor(self.bias, dtype=dtype)}


def fit_linear_probe(features, labels, num_classes: int, *, Cs: int | Sequence[float] = 10, folds: int = 5,
                     max_iter: int = 5000, seed: int = 0) -> Probe:
    """LP as the authors run it: scikit-learn's multinomial ``LogisticRegressionCV`` (L2, lbfgs, tol 1e-4,
    ``Cs`` strengths chosen by stratified ``folds``-fold cross-validation, at most the smallest class count), with
    an intercept. A binary fit's single coefficient row w becomes the two-class head [-w/2, w/2] (same
    probabilities: the logit difference is w^T phi + b)."""
    from sklearn.linear_model import LogisticRegressionCV

    X = np.asarray(_np(features), np.float64)
    y = np.asarray(_np(labels)).reshape(-1).astype(np.int64)
    counts = np.bincount(y, minlength=num_classes)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2:
        raise ValueError(f"fit_linear_probe: a class has {counts.min()} examples; cross-validation needs >= 2")
    # sklearn >= 1.8 names the penalty by l1_ratios (0: pure L2) and warns unless scoring is given; accuracy is
    # the scoring the authors' sklearn version used by default.
    reg = LogisticRegressionCV(Cs=Cs, cv=k, l1_ratios=(0.0,), scoring="accuracy", max_iter=max_iter, tol=1e-4,
                               random_state=seed, use_legacy_attributes=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings on near-separable folds; the fit is still used
        reg.fit(X, y)
    W, b = reg.coef_.astype(np.float64), reg.intercept_.astype(np.float64)
    if num_classes == 2 and W.shape[0] == 1:
        W, b = np.vstack([-W / 2, W / 2]), np.concatenate([-b / 2, b / 2])
    return Probe(W, b, float(np.atleast_1d(reg.C_)[0]), k)


def calibration_report(val_logits, val_labels, test_logits, test_labels, n_bins: int = ECE_BINS) -> dict:
    """Accuracy, ECE and NLL of test logits before and after temperature scaling fitted on the validation logits."""
    from theory.metrics import accuracy

    T = fit_temperature(val_logits, val_labels)
    z = np.asarray(_np(test_logits), np.float64)
    return {"accuracy": accuracy(z, test_labels), "temperature": T,
            "ece": expected_calibration_error(softmax(z), test_labels, n_bins),
            "ece_ts": expected_calibration_error(softmax(z / T), test_labels, n_bins),
            "nll": nll(z, test_labels), "nll_ts": nll(z, test_labels, T)}


def method_values(*, ft, lora_ft, steps: int, batch_size: int, probe: Probe | None, lora_config=None,
                  backbone: str = "backbone", head: str = "head", random_head_seed: int = 0,
                  random_head_std: float = 0.02, loss: str = "ce", max_grad_norm: float | None = 1.0,
                  lora_steps: int | None = None) -> dict[str, Any]:
    """The four fine-tuning methods as :class:`theory.finetune.Method` values.

    * ``FT``: every parameter moves, the head starts random (N(0, std^2), zero bias: a new classifier layer);
    * ``LP-FT``: every parameter moves, the head starts at the probe;
    * ``LoRA-FT``: peft LoRA factors in ``backbone`` and the head move, the head starts random;
    * ``LP-LoRA-FT``: the same from the probe.

    Args:
        ft, lora_ft: :class:`theory.finetune.Optimizer` values of full and LoRA fine-tuning.
        probe: the fitted probe (None: the LP methods are left out).
        lora_config: a peft ``LoraConfig`` (None: the LoRA methods are left out).
    """
    from theory.finetune import Head, Method, Params

    rand = Head("random", module=head, seed=random_head_seed, std=random_head_std)
    lp = None if probe is None else Head("given", module=head, weights=probe.head_weights())
    common = dict(batch_size=batch_size, loss=loss, max_grad_norm=max_grad_norm, select_best=False)
    out: dict[str, Any] = {"FT": Method("FT", ft, steps, head=rand, **common)}
    if lp is not None:
        out["LP-FT"] = Method("LP-FT", ft, steps, head=lp, **common)
    if lora_config is not None:
        params = Params.lora(lora_config, scope=backbone, also=(f"{head}.*",))
        out["LoRA-FT"] = Method("LoRA-FT", lora_ft, lora_steps or steps, head=rand, params=params, **common)
        if lp is not None:
            out["LP-LoRA-FT"] = Method("LP-LoRA-FT", lora_ft, lora_steps or steps, head=lp, params=params, **common)
    return out
