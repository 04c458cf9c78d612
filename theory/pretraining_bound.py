"""The generalization of unsupervised pretraining (Deng, Hong, Zhou & Mahdavi, AISTATS 2024), as checkable math.

Deng et al. bound the downstream excess risk of a fine-tuned head on a pretrained representation h by three
kinds of terms: a *transfer* term, controlled by the pretraining excess risk through the representation's
(C_beta, beta)-transferability, a *representation-induced Rademacher complexity* of the head class composed with
the learned h (computed on downstream inputs), and concentration terms (plus a distribution-heterogeneity term
that is zero when the downstream inputs are drawn as in pretraining). RadReg adds that Rademacher term, on
unlabelled downstream inputs, to the pretraining objective. (The search tools reached the paper's abstract and
summaries only, not its theorem statements; the constants below are derived here and said where they are.)

The form implemented, for squared loss on labels y in {0, 1}, heads F_B = {x -> <w, h(x)> : ||w||_2 <= B} and the
clipped predictor clip(<w, h(x)>, 0, 1):

* representation-induced Rademacher complexity (closed form for norm-bounded linear heads, by Cauchy-Schwarz,
  attained at w = B v / ||v||):

      Rad_S(F_B o h) = E_sigma sup_{||w|| <= B} (1/m) sum_j sigma_j <w, h(x_j)>
                     = B E_sigma ||(1/m) sum_j sigma_j h(x_j)||,

  sandwiched by Khintchine-Kahane (Latala & Oleszkiewicz 1994: the constant 1/sqrt(2) is optimal) between
  (B/m) sqrt(sum_j ||h_j||^2) / sqrt(2) and (B/m) sqrt(sum_j ||h_j||^2) (:func:`khintchine_kahane_bounds`);
  estimated by Monte Carlo over sigma with a McDiarmid half-width (:func:`rademacher_linear`), exactly by
  enumerating the 2^(m-1) sign classes for small m (:func:`rademacher_linear_exact`, the oracle).
* transfer term T_B(h) = R(w_bar) - R* for a fixed comparator w_bar in the ball (the population minimiser, or one
  fitted on held-out inputs), R* = E p(1 - p) the Bayes risk, p(x) = P(y = 1 | x); R(w) - R* = E (<w, h> - p)^2.
* the bound (:func:`clipped_square_bound`): with probability >= 1 - delta over n labelled examples and the
  sigma draws of the Rademacher estimate, the ball-constrained least-squares ERM w_hat satisfies

      E (clip(<w_hat, h>) - p)^2 <= T_B(h) + 4 Rad_S^+ + 3 sqrt(log(6/delta) / (2n)) + b_bar sqrt(log(3/delta) / (2n)),

  from (i) uniform convergence for the clipped loss in [0, 1] (Bartlett & Mendelson 2002; Mohri et al. 2018,
  Thm 3.3, empirical-Rademacher form) with (ii) the contraction lemma (the clipped square loss is 2-Lipschitz in
  the score), (iii) clipping never increasing the square loss and w_hat minimising the unclipped empirical risk,
  (iv) Hoeffding for the fixed comparator, whose loss lies in [0, b_bar] (:func:`square_loss_range`), and
  (v) Rad_S^+ = the Monte Carlo estimate plus its McDiarmid half-width; delta is split in thirds.
* transferability, Deng et al.'s Definition in the form T(h) <= C_beta (E_pre(h))^beta, with E_pre the
  pretraining excess risk. For a masked LM whose representation is its predicted distribution q(x) of the
  masked token and a downstream label that is a function of that token, p(x) = <u, G(x)> with G(x) the exact
  conditional, Pinsker's inequality proves it (:func:`pinsker_transfer_constants`): with d = q - G (sum 0),
  |<u, d>| <= span(u)/2 ||d||_1 and ||d||_1^2 <= 2 KL(G || q), so
  squared loss: E (<u, q> - p)^2 <= (span(u)^2 / 2) E_pre  (beta = 1), and 0-1 loss of the plug-in classifier:
  excess <= 2 E|<u, q> - p| <= sqrt(2) span(u) sqrt(E_pre)  (beta = 1/2; Devroye, Gyorfi & Lugosi 1996, Thm 2.2).
  For other representations :func:`fit_transferability` fits (C_beta, beta) across checkpoints.
* RadReg (:func:`radreg_penalty`): lambda * B E_sigma ||(1/m) sum_j sigma_j h(x_j)|| in torch, differentiable in
  h, Monte Carlo over sigma; the min-max form's inner maximisation over a linear head has this closed form
  (:func:`inner_max_projected_ascent` reaches it; by Danskin's theorem the gradients agree).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

__all__ = [
    "RademacherEstimate",
    "rademacher_linear",
    "rademacher_linear_exact",
    "mcdiarmid_halfwidth",
    "khintchine_kahane_bounds",
    "linear_head_sup",
    "inner_max_projected_ascent",
    "BallLeastSquares",
    "ball_least_squares",
    "square_loss_range",
    "BoundTerms",
    "clipped_square_bound",
    "kl_rows",
    "pretraining_excess_risk",
    "squared_excess",
    "zero_one_excess",
    "pinsker_transfer_constants",
    "TransferFit",
    "fit_transferability",
    "envelope_constant",
    "radreg_penalty",
    "MAX_EXACT_M",
]

MAX_EXACT_M = 20  # 2^19 sign classes: the largest m the exact enumeration accepts


def _features(h: Any) -> np.ndarray:
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] < 1:
        raise ValueError(f"features must be (m, d) with m >= 1, got shape {h.shape}")
    if not np.all(np.isfinite(h)):
        raise ValueError("features must be finite")
    return h


def _check_norm(B: float) -> float:
    if not (B > 0 and math.isfinite(B)):
        raise ValueError(f"head norm B must be positive and finite, got {B}")
    return float(B)


# ---------------------------------------------------------------------------------------------------------------
# Representation-induced Rademacher complexity of norm-bounded linear heads
# ---------------------------------------------------------------------------------------------------------------


def linear_head_sup(v: Any, B: float) -> tuple[float, np.ndarray]:
    """sup_{||w|| <= B} <w, v> = B ||v||, attained at w = B v / ||v|| (Cauchy-Schwarz; w = 0 when v = 0)."""
    v = np.asarray(v, dtype=np.float64)
    B = _check_norm(B)
    norm = float(np.linalg.norm(v))
    return B * norm, (B * v / norm if norm > 0 else np.zeros_like(v))


def rademacher_linear_exact(h: Any, B: float) -> float:
    """B E_sigma ||(1/m) sum_j sigma_j h_j|| by enumerating every sign vector (sigma and -sigma give the same norm,
    so 2^(m-1) classes): the oracle for small m.

    Args:
        h: (m, d) features h(x_1..m).
    """
    h = _features(h)
    B = _check_norm(B)
    m = h.shape[0]
    if m > MAX_EXACT_M:
        raise ValueError(f"exact enumeration over 2^{m - 1} sign classes: m = {m} exceeds {MAX_EXACT_M}")
    if m == 1:
        return B * float(np.linalg.norm(h[0]))
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=m - 1)), dtype=np.float64)  # (2^(m-1), m-1)
    signs = np.concatenate([np.ones((len(signs), 1)), signs], axis=1)  # sigma_1 = +1 represents each class
    norms = np.linalg.norm(signs @ h, axis=1) / m
    return B * float(math.fsum(norms) / len(norms))


def mcdiarmid_halfwidth(h: Any, B: float, num_draws: int, delta: float) -> float:
    """Half-width t with P(|estimate - Rad| >= t) <= delta for the mean of ``num_draws`` independent draws of
    Z = B ||(1/m) sum_j sigma_j h_j|| (:func:`rademacher_linear`).

    The estimate is a function of K m independent signs; flipping sigma_{k, j} moves it by at most
    c_j = 2 B ||h_j|| / (m K), so McDiarmid's inequality gives P(|est - E| >= t) <= 2 exp(-2 t^2 / (K sum_j c_j^2)),
    i.e. t = (B / m) sqrt(2 sum_j ||h_j||^2 log(2 / delta) / K).
    """
    h = _features(h)
    if num_draws < 1 or not 0 < delta < 1:
        raise ValueError(f"need num_draws >= 1 and 0 < delta < 1, got {num_draws}, {delta}")
    m = h.shape[0]
    return _check_norm(B) / m * math.sqrt(2.0 * float((h ** 2).sum()) * math.log(2.0 / delta) / num_draws)


@dataclasses.dataclass(frozen=True)
class RademacherEstimate:
    """A Monte Carlo estimate of B E_sigma ||(1/m) sum_j sigma_j h_j||.

    Attributes:
        value: the mean over ``num_draws`` sign vectors.
        std_error: sample s.d. / sqrt(num_draws) (the CLT error; NaN for one draw).
        halfwidth: the McDiarmid half-width at ``delta`` (:func:`mcdiarmid_halfwidth`): |value - Rad| < halfwidth
            with probability >= 1 - delta, for any m and d.
        upper: value + halfwidth, an upper confidence bound used by :func:`clipped_square_bound`.
    """

    value: float
    std_error: float
    halfwidth: float
    num_draws: int
    delta: float

    @property
    def upper(self) -> float:
        return self.value + self.halfwidth

    def row(self, prefix: str = "rad") -> dict[str, float]:
        return {prefix: self.value, f"{prefix}_se": self.std_error, f"{prefix}_halfwidth": self.halfwidth}


def rademacher_linear(h: Any, B: float, num_draws: int = 2000, seed: int | np.random.Generator = 0,
                      delta: float = 0.05, chunk: int = 4096) -> RademacherEstimate:
    """Monte Carlo estimate of the representation-induced Rademacher complexity of {x -> <w, h(x)> : ||w|| <= B}.

    Args:
        h: (m, d) features of m (unlabelled) downstream inputs.
        num_draws: K sign vectors sigma in {-1, +1}^m.
        seed: the sign generator (an int or a numpy Generator).
        delta: confidence of the stated McDiarmid half-width.
    """
    h = _features(h)
    B = _check_norm(B)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    m = h.shape[0]
    vals = []
    for lo in range(0, num_draws, chunk):
        k = min(chunk, num_draws - lo)
        sigma = rng.integers(0, 2, size=(k, m)).astype(np.float64) * 2.0 - 1.0  # (k, m)
        vals.append(B * np.linalg.norm(sigma @ h, axis=1) / m)
    z = np.concatenate(vals)
    se = float(z.std(ddof=1) / math.sqrt(len(z))) if len(z) > 1 else float("nan")
    return RademacherEstimate(float(z.mean()), se, mcdiarmid_halfwidth(h, B, num_draws, delta), num_draws, delta)


def khintchine_kahane_bounds(h: Any, B: float) -> tuple[float, float]:
    """(lower, upper) = (B/m) sqrt(sum_j ||h_j||^2) x (1/sqrt(2), 1).

    Upper: Jensen, E||S|| <= sqrt(E||S||^2) = sqrt(sum_j ||h_j||^2) for S = sum_j sigma_j h_j (cross terms vanish).
    Lower: the Khintchine-Kahane inequality E||S|| >= (E||S||^2)^{1/2} / sqrt(2) (Latala & Oleszkiewicz 1994,
    optimal constant, any normed space).
    """
    h = _features(h)
    top = _check_norm(B) / h.shape[0] * math.sqrt(float((h ** 2).sum()))
    return top / math.sqrt(2.0), top


def inner_max_projected_ascent(h: Any, sigma: Any, B: float, steps: int = 50, lr: float = 1.0,
                               w0: Any = None) -> tuple[float, np.ndarray]:
    """The min-max form's inner problem max_{||w|| <= B} (1/m) sum_j sigma_j <w, h_j>, solved by projected
    gradient ascent (what a RadReg implementation without the closed form does); returns (value, w).

    Its closed form is :func:`linear_head_sup` of v = (1/m) sum_j sigma_j h_j.
    """
    h = _features(h)
    B = _check_norm(B)
    sigma = np.asarray(sigma, dtype=np.float64).reshape(-1)
    v = sigma @ h / h.shape[0]  # the gradient of the linear objective
    w = np.zeros(h.shape[1]) if w0 is None else np.asarray(w0, dtype=np.float64).copy()
    for _ in range(steps):
        w = w + lr * v
        n = float(np.linalg.norm(w))
        if n > B:
            w *= B / n
    return float(v @ w), w


# ---------------------------------------------------------------------------------------------------------------
# Ball-constrained least squares (the downstream ERM and the comparator head)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BallLeastSquares:
    """argmin_{||w|| <= B} (1/N) ||X w - y||^2.

    Attributes:
        w: (d,) the minimiser (the minimum-norm one when the constraint is inactive).
        value: the minimum mean squared residual.
        lagrange: the multiplier lambda >= 0 of the constraint (0 when inactive); w = (G + lambda I)^{-1} b.
        active: True when ||w|| = B binds.
    """

    w: np.ndarray
    value: float
    lagrange: float
    active: bool


def ball_least_squares(X: Any, y: Any, B: float, rtol: float = 1e-12) -> BallLeastSquares:
    """Exact least squares on the ball ||w||_2 <= B (a trust-region subproblem with a PSD Hessian).

    With G = X^T X / N = U diag(e) U^T and b = X^T y / N: if the minimum-norm unconstrained solution has norm <= B
    it is the answer; otherwise w(lambda) = sum_i (u_i^T b) / (e_i + lambda) u_i with ||w(lambda)|| = B, lambda
    found by bracketing root search (||w(lambda)|| is decreasing and <= ||b|| / lambda).
    """
    from scipy.optimize import brentq

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if X.ndim != 2 or X.shape[0] != y.shape[0] or X.shape[0] == 0:
        raise ValueError(f"need X (N, d) and y (N,), got {X.shape} and {y.shape}")
    B = _check_norm(B)
    N = X.shape[0]
    e, U = np.linalg.eigh(X.T @ X / N)
    c = U.T @ (X.T @ y / N)  # coordinates of b in the eigenbasis
    tol = rtol * max(float(e.max(initial=0.0)), 1e-300) * X.shape[1]
    pos = e > tol
    w_free = U[:, pos] @ (c[pos] / e[pos])
    if np.linalg.norm(w_free) <= B:
        w, lam = w_free, 0.0
    else:
        def excess_norm(lam: float) -> float:
            with np.errstate(over="ignore", divide="ignore"):  # near-null directions at lambda ~ 0: norm -> inf
                return float(np.linalg.norm(c / (np.maximum(e, 0.0) + lam))) - B

        hi = float(np.linalg.norm(c)) / B * (1.0 + 1e-9) + 1e-300
        lo = 1e-300
        # excess_norm(lo) <= 0 only when the dropped near-null directions held the excess norm: lambda -> 0
        lam = brentq(excess_norm, lo, hi, xtol=1e-15, rtol=1e-14, maxiter=500) if excess_norm(lo) > 0 else lo
        w = U @ (c / (np.maximum(e, 0.0) + lam))
        w *= min(1.0, B / float(np.linalg.norm(w)))  # land exactly in the ball
    r = X @ w - y
    return BallLeastSquares(w, float(r @ r / N), float(lam), bool(lam > 0))


def square_loss_range(s_min: float, s_max: float) -> float:
    """max (s - y)^2 over scores s in [s_min, s_max] and labels y in {0, 1} (convex in s: the corners)."""
    if s_min > s_max:
        raise ValueError(f"need s_min <= s_max, got {s_min} > {s_max}")
    return float(max(s_min ** 2, s_max ** 2, (1 - s_min) ** 2, (1 - s_max) ** 2))


@dataclasses.dataclass(frozen=True)
class BoundTerms:
    """The terms of :func:`clipped_square_bound`; ``total`` is their sum."""

    transfer: float
    rademacher: float
    uniform: float
    comparator: float
    delta: float

    @property
    def total(self) -> float:
        return self.transfer + self.rademacher + self.uniform + self.comparator

    def row(self, prefix: str = "bound") -> dict[str, float]:
        return {f"{prefix}_transfer": self.transfer, f"{prefix}_rademacher": self.rademacher,
                f"{prefix}_uniform": self.uniform, f"{prefix}_comparator": self.comparator, prefix: self.total}


def clipped_square_bound(transfer: float, rad: RademacherEstimate, n: int, comparator_range: float,
                         delta: float = 0.05) -> BoundTerms:
    """Upper bound on the excess squared risk E (clip(<w_hat, h>, 0, 1) - p)^2 of the ball-constrained ERM on n
    labelled examples (see the module docstring for the derivation), holding with probability >= 1 - delta.

    Args:
        transfer: T_B(h) = R(w_bar) - R* for the fixed comparator w_bar (or an upper bound such as
            C_beta E_pre^beta).
        rad: the Rademacher estimate on the n labelled inputs with ``rad.delta = delta / 3``.
        comparator_range: b_bar, the range of the comparator's square loss (:func:`square_loss_range`).
    """
    if n < 1 or not 0 < delta < 1:
        raise ValueError(f"need n >= 1 and 0 < delta < 1, got {n}, {delta}")
    if not math.isclose(rad.delta, delta / 3, rel_tol=1e-9):
        raise ValueError(f"the Rademacher estimate's delta must be delta / 3 = {delta / 3}, got {rad.delta}")
    return BoundTerms(float(transfer), 4.0 * rad.upper, 3.0 * math.sqrt(math.log(6.0 / delta) / (2 * n)),
                      float(comparator_range) * math.sqrt(math.log(3.0 / delta) / (2 * n)), delta)


# ---------------------------------------------------------------------------------------------------------------
# Pretraining and downstream excess risks, and transferability
# ---------------------------------------------------------------------------------------------------------------


def kl_rows(p: Any, log_q: Any) -> np.ndarray:
    """KL(p_i || q_i) per row in float64, from probabilities p (N, n) and log-probabilities log q (N, n); terms with
    p = 0 contribute 0."""
    p = np.asarray(p, dtype=np.float64)
    log_q = np.asarray(log_q, dtype=np.float64)
    if p.shape != log_q.shape:
        raise ValueError(f"p {p.shape} and log_q {log_q.shape} differ")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0)) - log_q), 0.0)
    return terms.sum(axis=1)


def pretraining_excess_risk(G: Any, log_q: Any) -> tuple[float, float]:
    """A masked LM's excess cross-entropy at the masked position: E_x[-log q(X_0 | x)] - H(X_0 | X) =
    E_x KL(G(x) || q(x)), with G(x) the exact conditional; returns (mean over the rows of x, its standard error)."""
    kl = kl_rows(G, log_q)
    se = float(kl.std(ddof=1) / math.sqrt(len(kl))) if len(kl) > 1 else float("nan")
    return float(kl.mean()), se


def squared_excess(f: Any, p: Any) -> np.ndarray:
    """Per-input excess squared risk of predictions f(x): E[(f - y)^2 | x] - p(1 - p) = (f - p)^2."""
    f = np.asarray(f, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    return (f - p) ** 2


def zero_one_excess(f: Any, p: Any) -> np.ndarray:
    """Per-input excess 0-1 risk of the classifier 1[f >= 1/2] over the Bayes classifier 1[p >= 1/2]:
    |2p - 1| when they disagree, else 0."""
    f = np.asarray(f, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    return np.where((f >= 0.5) != (p >= 0.5), np.abs(2 * p - 1), 0.0)


def pinsker_transfer_constants(u: Any, loss: str = "squared") -> tuple[float, float]:
    """(C_beta, beta) of the proven transferability of the output representation q for the label p = <u, G>
    (see the module docstring): squared loss (span(u)^2 / 2, 1); 0-1 loss of the plug-in classifier
    (sqrt(2) span(u), 1/2)."""
    u = np.asarray(u, dtype=np.float64)
    span = float(u.max() - u.min())
    if loss == "squared":
        return span ** 2 / 2.0, 1.0
    if loss == "zero_one":
        return math.sqrt(2.0) * span, 0.5
    raise ValueError(f"loss must be 'squared' or 'zero_one', got {loss!r}")


@dataclasses.dataclass(frozen=True)
class TransferFit:
    """A fit of T = C E^beta across checkpoints (log-log least squares).

    Attributes:
        beta: the slope of log T on log E.
        c_ls: exp(intercept), the least-squares constant (the curve through the middle of the points).
        c_envelope: max_k T_k / E_k^beta, the smallest C for which the inequality holds at every fitted point.
        r2: coefficient of determination of the log-log fit.
        n: points used (those with T > 0 and E > 0).
    """

    beta: float
    c_ls: float
    c_envelope: float
    r2: float
    n: int

    def predict(self, e: Any, envelope: bool = True) -> np.ndarray:
        return (self.c_envelope if envelope else self.c_ls) * np.asarray(e, dtype=np.float64) ** self.beta


def envelope_constant(e: Any, t: Any, beta: float) -> float:
    """max_k t_k / e_k^beta over points with e_k > 0: the smallest C_beta with t <= C_beta e^beta at every point."""
    e = np.asarray(e, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    ok = e > 0
    if not ok.any():
        raise ValueError("envelope_constant: no point with e > 0")
    return float(np.max(t[ok] / e[ok] ** beta))


def fit_transferability(e: Any, t: Any) -> TransferFit:
    """Fit (C_beta, beta) of T <= C_beta E^beta: beta and c_ls by least squares of log T on log E, c_envelope the
    tightest constant for that beta (:func:`envelope_constant`). Needs two points with distinct E > 0 and T > 0."""
    e = np.asarray(e, dtype=np.float64).reshape(-1)
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    if e.shape != t.shape:
        raise ValueError(f"e {e.shape} and t {t.shape} differ")
    ok = (e > 0) & (t > 0) & np.isfinite(e) & np.isfinite(t)
    x, y = np.log(e[ok]), np.log(t[ok])
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"fit_transferability needs two points with distinct E > 0 and T > 0, got {len(x)}")
    beta, icpt = np.polyfit(x, y, 1)
    resid = y - (beta * x + icpt)
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / ss if ss > 0 else 1.0
    return TransferFit(float(beta), float(math.exp(icpt)), envelope_constant(e[ok], t[ok], float(beta)), r2,
                       int(len(x)))


# ---------------------------------------------------------------------------------------------------------------
# RadReg
# ---------------------------------------------------------------------------------------------------------------


def radreg_penalty(h, B: float, num_draws: int = 8, generator=None):
    """RadReg's penalty for norm-bounded linear heads, B E_sigma ||(1/m) sum_j sigma_j h_j||, as a Monte Carlo mean
    over ``num_draws`` sign vectors (unbiased, differentiable in h; torch).

    Args:
        h: (m, d) tensor, the representation of m unlabelled downstream inputs.
        generator: a torch.Generator on h's device for the signs (the caller seeds it).
    """
    import torch

    if h.ndim != 2:
        raise ValueError(f"h must be (m, d), got shape {tuple(h.shape)}")
    B = _check_norm(B)
    m = h.shape[0]
    sigma = torch.randint(0, 2, (num_draws, m), generator=generator, device=h.device).to(h.dtype) * 2 - 1
    return B * torch.linalg.vector_norm(sigma @ h, dim=1).mean() / m
