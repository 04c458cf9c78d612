"""SMART (Jiang, He, Chen, Liu, Gao & Zhao, ACL 2020): smoothness-inducing adversarial regularization and Bregman
proximal point optimization, as model-agnostic functions and :mod:`theory.finetune` values.

The objective (paper, Eq. 1-2) is

    min_theta F(theta) = L(theta) + lambda_s R_s(theta),
    R_s(theta) = 1/n sum_i max_{||x~_i - x_i||_p <= eps} l_s(f(x~_i; theta), f(x_i; theta)),

with x the input *embeddings* and l_s(P, Q) = KL(P || Q) + KL(Q || P), the symmetric KL of the output distributions
(the squared error for regression). It is optimised by Bregman proximal point steps (Eq. 3-4)

    theta_{t+1} = argmin_theta F(theta) + mu D_Breg(theta, theta~_t),   D_Breg = 1/n sum_i l_s(f(x_i; theta), f(x_i; theta~_t)),

with the vanilla anchor theta~_t = theta_t (VBPP) or the momentum anchor theta~_t = (1 - beta) theta_t + beta theta~_{t-1}
(MBPP); each argmin is approximated by S optimizer steps with the anchor held.

What this module provides:

* :class:`Perturbation` and :func:`inner_max` -- the inner maximisation by K ascent steps from x + N(0, sigma^2 I):
  ``variant="project"`` is the paper's (normalised ascent step of size eta, then the Euclidean projection onto the
  eps-ball, in the l_inf or l_2 norm, one ball per example or per token); ``variant="normalize"`` is what the public
  codes do instead (namisan/mt-dnn ``SmartPerturbation._norm_grad``, archinetai/smart-pytorch ``SMARTLoss``): the
  perturbation plus eta times the raw gradient is *rescaled to unit norm per token* (l_inf by default, ``+ xi`` in
  the denominator) -- its size is 1 (``radius``) whatever eps is; eps is not used.
* :func:`smoothness_regularizer` -- R_s as a :class:`theory.finetune.Regularizer` for any classifier that can be
  evaluated at given input embeddings (``embed(model, batch)`` and ``forward_embeds(model, batch, x)``).
* :func:`vanilla_bpp` / :func:`momentum_bpp` -- the proximal anchors as :class:`theory.finetune.Proximal` values
  (``update_every`` = S, ``beta``), and :func:`momentum_anchors`, the stated recursion, as a reference.
* The exact linear-softmax facts that ``ftsim verify smart`` checks: the output Fisher G = W^T (diag p - p p^T) W of
  f(x) = W x + b, the small-eps maximum of the inner problem (eps^2 lambda*(G) for the symmetric KL, eps^2/2
  lambda*(G) for one KL, lambda* the maximum of u^T G u over the unit ball of the chosen norm) with a rigorous
  third-order remainder, a 2-D brute force with a rigorous grid error; the closed form of a proximal step on a
  quadratic loss with a quadratic Bregman term and the bound that freezes it as mu -> infinity.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from theory.finetune import Proximal, Regularizer

__all__ = ["Perturbation", "InnerMax", "divergence_rows", "project", "ascend", "inner_max", "local_sensitivity",
           "robust_correct", "smoothness_regularizer",
           "vanilla_bpp", "momentum_bpp", "momentum_anchors", "output_fisher", "unit_ball_quadratic_max",
           "small_eps_maximum", "taylor_remainder_bound", "brute_force_max_2d", "linear_softmax",
           "proximal_step_closed_form", "freeze_bound", "std_ratio_ci", "verdict_of", "compare_to_baseline",
           "S1_EXPECTED", "DIVERGENCES"]

Norm = Literal["linf", "l2"]
Ball = Literal["example", "token"]
Divergence = Literal["skl", "kl", "mse"]
DIVERGENCES = ("skl", "kl", "mse")


# ---------------------------------------------------------------------------------------------------------------
# The divergence l_s
# ---------------------------------------------------------------------------------------------------------------

def divergence_rows(kind: Divergence, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """l_s between the rows of two output matrices (B, C) -> (B,).

    ``skl``: KL(P_a || P_b) + KL(P_b || P_a) of the softmax distributions, computed as
    sum_c (p_c - q_c)(log p_c - log q_c) (SMART's l_s for classification); ``kl``: KL(P_b || P_a), one of the two
    (b is the clean output in :func:`inner_max`); ``mse``: sum_c (a_c - b_c)^2 (SMART's l_s for regression).
    Half-precision inputs are computed in float32; float64 stays float64.
    """
    if a.dtype in (torch.float16, torch.bfloat16):
        a, b = a.float(), b.float()
    if kind == "mse":
        return ((a - b) ** 2).sum(-1)
    la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    if kind == "skl":
        return ((la.exp() - lb.exp()) * (la - lb)).sum(-1)
    if kind == "kl":
        return (lb.exp() * (lb - la)).sum(-1)
    raise ValueError(f"divergence: choose skl, kl or mse, not {kind!r}")


# ---------------------------------------------------------------------------------------------------------------
# The inner maximisation
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Perturbation:
    """How the inner maximum of R_s is approximated (SMART's Algorithm 1 and the public codes' variant).

    Attributes:
        eps: radius of the ball (``variant="project"``).
        steps: K, the ascent steps (SMART: T_x~ = 1).
        step_size: eta, the ascent step.
        init_std: sigma of the random start x + N(0, sigma^2 I) (the gradient of l_s vanishes at x~ = x).
        norm: ``linf`` (Algorithm 1) or ``l2``: the ball's norm and the norm the ascent direction is normalised in.
        ball: ``example`` (one ball over all of an example's token embeddings) or ``token`` (one per token). For
            ``linf`` projection the two balls are the same box; the direction is normalised per ball.
        variant: ``project`` -- x~ <- Pi_ball(x~ + eta g / ||g||), the paper's; ``normalize`` -- the public
            codes': delta <- radius (delta + eta g) / (||delta + eta g|| + xi) per ball (per token in both codes),
            so the perturbation has norm ~``radius`` and eps plays no part.
        radius: size of the normalised perturbation (1 in both public codes).
        xi: the public codes' stabiliser in the denominator (their ``epsilon``, 1e-6).
    """

    eps: float = 1e-5
    steps: int = 1
    step_size: float = 1e-3
    init_std: float = 1e-5
    norm: Norm = "linf"
    ball: Ball = "example"
    variant: Literal["project", "normalize"] = "project"
    radius: float = 1.0
    xi: float = 1e-6

    def __post_init__(self) -> None:
        if self.norm not in ("linf", "l2") or self.ball not in ("example", "token"):
            raise ValueError(f"perturbation: norm must be linf/l2 and ball example/token, got {self.norm}/{self.ball}")
        if self.variant not in ("project", "normalize"):
            raise ValueError(f"perturbation: variant must be project or normalize, not {self.variant!r}")
        if self.steps < 0 or not self.eps > 0 or not self.step_size > 0 or self.init_std < 0 or not self.radius > 0:
            raise ValueError(f"perturbation: need steps >= 0, eps > 0, step_size > 0, init_std >= 0, radius > 0: "
                             f"{self}")

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def _reduce_dims(x: torch.Tensor, ball: Ball) -> tuple[int, ...]:
    """Dimensions a ball spans: all but the batch (``example``) or the last (``token``)."""
    return tuple(range(1, x.ndim)) if ball == "example" else (x.ndim - 1,)


def _norm(x: torch.Tensor, norm: Norm, dims: tuple[int, ...]) -> torch.Tensor:
    if norm == "linf":
        return x.abs().amax(dim=dims, keepdim=True)
    return x.pow(2).sum(dim=dims, keepdim=True).sqrt()


def project(delta: torch.Tensor, eps: float, norm: Norm = "linf", ball: Ball = "example") -> torch.Tensor:
    """Euclidean projection of ``delta`` (B, ..., d) onto {||delta|| <= eps} per ball: clipping for l_inf,
    rescaling of the points outside for l_2."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _norm(delta, "l2", _reduce_dims(delta, ball))
    return delta * torch.clamp(eps / n.clamp_min(torch.finfo(delta.dtype).tiny), max=1.0)


@dataclasses.dataclass
class InnerMax:
    """Result of :func:`inner_max`: the perturbation (detached, the shape of x), l_s at each visited iterate
    (``values[k]`` (B,) after k steps; the last one only with ``final_value=True``)."""

    delta: torch.Tensor
    values: list[torch.Tensor]


def _mask_like(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    m = mask.to(x.dtype)
    while m.ndim < x.ndim:
        m = m.unsqueeze(-1)
    return m


def ascend(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
           objective: Callable[[torch.Tensor], torch.Tensor], perturbation: Perturbation, *,
           mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
           final_value: bool = False) -> InnerMax:
    """Approximately maximise ``objective(forward(x + delta))`` (B,) per example over the perturbation ball by K
    ascent steps from delta ~ N(0, sigma^2 I) (the steps of :class:`Perturbation`).

    Args:
        forward: x~ (the shape of x) -> outputs (B, C); gradients flow to x~ only (``torch.autograd.grad`` is taken
            with respect to the perturbation: parameters' ``.grad`` are not touched).
        x: the clean inputs (B, ..., d), e.g. token embeddings (B, T, d); used detached.
        objective: outputs (B, C) -> (B,) values to maximise.
        perturbation: :class:`Perturbation`.
        mask: (B, T) (or x.shape[:-1]) -- 1 where a token may be perturbed (padding: 0).
        generator: for the random start (default: torch's global generator, which :func:`theory.finetune.finetune`
            seeds from its ``seed``).
        final_value: also evaluate the objective at the returned perturbation (one more forward pass).
    """
    p = perturbation
    x = x.detach()
    m = _mask_like(mask, x)
    dims = _reduce_dims(x, p.ball)
    if generator is not None and generator.device != x.device:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    else:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    delta = noise * p.init_std
    if m is not None:
        delta = delta * m
    values: list[torch.Tensor] = []
    tiny = torch.finfo(x.dtype).tiny
    for _ in range(p.steps):
        delta = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            v = objective(forward(x + delta))
            (g,) = torch.autograd.grad(v.sum(), delta)
        values.append(v.detach())
        if m is not None:
            g = g * m
        with torch.no_grad():
            if p.variant == "project":
                step = g / _norm(g, p.norm, dims).clamp_min(tiny)
                delta = project(delta + p.step_size * step, p.eps, p.norm, p.ball)
            else:  # the public codes: rescale (delta + eta g) to unit norm per ball (per token there)
                s = delta + p.step_size * g
                delta = p.radius * s / (_norm(s, p.norm, dims) + p.xi)
            if m is not None:
                delta = delta * m
    delta = delta.detach()
    if final_value:
        with torch.no_grad():
            values.append(objective(forward(x + delta)).detach())
    return InnerMax(delta, values)


def inner_max(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, perturbation: Perturbation, *,
              target: torch.Tensor | None = None, divergence: Divergence = "skl", mask: torch.Tensor | None = None,
              generator: torch.Generator | None = None, final_value: bool = False) -> InnerMax:
    """SMART's inner problem: approximate max_{x~ in ball(x)} l_s(f(x~), f(x)) per example by K ascent steps
    (:func:`ascend`); ``target`` = f(x) (B, C) (default: computed without gradient), used detached."""
    if target is None:
        with torch.no_grad():
            target = forward(x.detach())
    target = target.detach()
    return ascend(forward, x, lambda out: divergence_rows(divergence, out, target), perturbation, mask=mask,
                  generator=generator, final_value=final_value)


def local_sensitivity(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, perturbation: Perturbation,
                      *, divergence: Divergence = "skl", mask: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) l_s(f(x~), f(x)) at the perturbation the K-step ascent finds: the model's local sensitivity (a lower
    bound on the maximum over the ball)."""
    return inner_max(forward, x, perturbation, divergence=divergence, mask=mask, generator=generator,
                     final_value=True).values[-1]


def robust_correct(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, labels: torch.Tensor,
                   perturbation: Perturbation, *, mask: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) bool: still classified correctly after projected gradient ascent on the cross-entropy of the true label
    (PGD, Madry et al. 2018) in the perturbation ball -- robust accuracy is its mean (an upper bound on the true
    robust accuracy, as for any attack). The prediction is :func:`theory.metrics.predict`'s (one tie rule)."""
    from theory.metrics import predict

    labels = labels.to(x.device)

    def ce(out):
        return torch.nn.functional.cross_entropy(out if out.dtype == torch.float64 else out.float(), labels,
                                                 reduction="none")

    res = ascend(forward, x, ce, perturbation, mask=mask, generator=generator)
    with torch.no_grad():
        out = forward(x.detach() + res.delta)
    return torch.as_tensor(predict(out.double().cpu()) == labels.cpu().numpy())


def smoothness_regularizer(perturbation: Perturbation, *, weight: float,
                           embed: Callable[[torch.nn.Module, object], torch.Tensor],
                           forward_embeds: Callable[[torch.nn.Module, object, torch.Tensor], torch.Tensor],
                           mask: Callable[[object], torch.Tensor] | None = None, divergence: Divergence = "skl",
                           name: str = "smart-rs") -> Regularizer:
    """SMART's R_s as a :class:`theory.finetune.Regularizer` (added as ``weight * R_s`` = lambda_s R_s).

    On each batch: x = ``embed(model, batch)`` (B, ..., d), the input embeddings (a function of theta through the
    embedding table); x~ = x + delta with delta from :func:`inner_max` (computed on x detached, the clean outputs
    detached); R_s = mean_i l_s(f(x~_i; theta), f(x_i; theta)) with gradients through both outputs and through
    x(theta) + delta, as the paper's gradient of F (the perturbation itself is held fixed, Danskin).

    Args:
        perturbation: :class:`Perturbation`.
        weight: lambda_s.
        embed: (model, batch) -> input embeddings.
        forward_embeds: (model, batch, x) -> outputs (B, C) at input embeddings x; must equal ``model(batch)``
            at x = embed(model, batch).
        mask: batch -> (B, T) perturbable tokens (e.g. the attention mask), or None.
        divergence: l_s.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: choose skl, kl or mse, not {divergence!r}")

    def fn(model, batch, outputs, labels):
        x = embed(model, batch)
        res = inner_max(lambda e: forward_embeds(model, batch, e), x, perturbation, target=outputs,
                        divergence=divergence, mask=None if mask is None else mask(batch))
        adv = forward_embeds(model, batch, x + res.delta)
        return divergence_rows(divergence, adv, outputs).mean()

    return Regularizer(name, weight, fn, {"perturbation": perturbation.describe(), "divergence": divergence})


# ---------------------------------------------------------------------------------------------------------------
# Bregman proximal point anchors
# ---------------------------------------------------------------------------------------------------------------

def vanilla_bpp(mu: float = 1.0, every: int = 1, divergence: Literal["skl", "mse"] = "skl") -> Proximal:
    """VBPP: the anchor is the iterate theta_t, renewed every ``every`` (S) steps; the S steps in between
    approximate argmin F + mu D_Breg(., theta_t). With S = 1 and a deterministic model the term's gradient at
    theta = theta~ is exactly zero (D_Breg has a minimum there): VBPP is then plain training."""
    return Proximal("bregman", mu, anchor="moving", beta=0.0, update_every=every, divergence=divergence)


def momentum_bpp(mu: float = 1.0, beta: float = 0.99, every: int = 1,
                 divergence: Literal["skl", "mse"] = "skl") -> Proximal:
    """MBPP: every ``every`` (S) steps the anchor becomes (1 - beta) theta_t + beta theta~ (SMART: beta = 0.99)."""
    return Proximal("bregman", mu, anchor="moving", beta=beta, update_every=every, divergence=divergence)


def momentum_anchors(iterates: Sequence[Mapping[str, torch.Tensor]], beta: float, every: int
                     ) -> list[dict[str, torch.Tensor]]:
    """The stated anchor recursion, for reference: ``iterates[t]`` = theta_t (t = 0..T); returns the anchors in force
    for the steps theta_t -> theta_{t+1}, t = 0..T-1: theta~ = theta_0 at first, and after step s (s = 1..T) with
    s % every == 0, theta~ <- (1 - beta) theta_s + beta theta~."""
    anchor = {k: v.clone() for k, v in iterates[0].items()}
    out = []
    for s in range(1, len(iterates)):
        out.append({k: v.clone() for k, v in anchor.items()})
        if s % every == 0:
            anchor = {k: (1 - beta) * iterates[s][k] + beta * anchor[k] for k in anchor}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Exact facts: linear-softmax model f(x) = W x + b
# ---------------------------------------------------------------------------------------------------------------

def linear_softmax(W: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model x (B, d) -> W x + b (B, C)."""
    return lambda x: x @ W.T + b


def output_fisher(W: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    """G = W^T (diag p - p p^T) W (d, d), the Fisher information of the output distribution p = softmax(W x + b) with
    respect to the input x: KL(p_x || p_{x+delta}) = delta^T G delta / 2 + O(||delta||^3)."""
    W, b, x = (np.asarray(a, np.float64) for a in (W, b, x))
    z = W @ x + b
    p = np.exp(z - z.max())
    p /= p.sum()
    return W.T @ (np.diag(p) - np.outer(p, p)) @ W


def unit_ball_quadratic_max(G: np.ndarray, norm: Norm) -> float:
    """lambda*(G) = max_{||u|| <= 1} u^T G u for PSD G: the top eigenvalue (l_2), or the maximum over the vertices
    {-1, 1}^d of the cube (l_inf: a convex function attains its maximum over a polytope at a vertex); exhaustive,
    for d <= 20."""
    G = np.asarray(G, np.float64)
    if norm == "l2":
        return float(np.linalg.eigvalsh((G + G.T) / 2)[-1])
    d = G.shape[0]
    if d > 20:
        raise ValueError(f"unit_ball_quadratic_max: l_inf enumerates 2^d vertices; d = {d} > 20")
    # s and -s give the same value: fix the first sign.
    signs = np.array([(1.0,) + s for s in itertools.product((-1.0, 1.0), repeat=d - 1)])  # (2^(d-1), d)
    return float(np.max(np.einsum("vi,ij,vj->v", signs, G, signs)))


def small_eps_maximum(G: np.ndarray, eps: float, norm: Norm, divergence: Literal["skl", "kl"] = "skl") -> float:
    """The second-order value of max_{||delta|| <= eps} l_s(f(x + delta), f(x)) for a linear-softmax model:
    eps^2 lambda*(G) for the symmetric KL (each KL contributes half), eps^2/2 lambda*(G) for one KL."""
    q = eps ** 2 * unit_ball_quadratic_max(G, norm)
    return q if divergence == "skl" else q / 2


def _rho(W: np.ndarray, norm: Norm) -> float:
    """max_{c, c'} ||w_c - w_c'||_* (dual norm: l_2 for the l_2 ball, l_1 for the l_inf ball): the largest range of
    the logit change W delta over the unit ball."""
    W = np.asarray(W, np.float64)
    diff = W[:, None, :] - W[None, :, :]
    dual = np.abs(diff).sum(-1) if norm == "linf" else np.sqrt((diff ** 2).sum(-1))
    return float(dual.max())


def taylor_remainder_bound(W: np.ndarray, eps: float, norm: Norm, divergence: Literal["skl", "kl"] = "skl") -> float:
    """A rigorous bound on |l_s(f(x + delta), f(x)) - (second-order term)| over the eps-ball, hence on
    |max l_s - :func:`small_eps_maximum`|.

    With A = logsumexp and Delta = W delta the logit change, SKL = (grad A(z + Delta) - grad A(z)) . Delta
    = Delta^T Hbar Delta, Hbar the mean Hessian of A on the segment; the third derivative D^3 A[Delta^3] is the third
    central moment of Delta_c under a softmax distribution, at most range^3 / 4 (E|X - m|^3 <= range Var X and
    Popoviciu's Var X <= range^2 / 4), so |SKL - Delta^T H(z) Delta| <= range^3 / 8. One KL is a Bregman divergence of
    A: the integral remainder gives range^3 / 24. range <= eps max_{c,c'} ||w_c - w_c'||_*.
    """
    r = eps * _rho(W, norm)
    return r ** 3 / 8 if divergence == "skl" else r ** 3 / 24


def brute_force_max_2d(W: np.ndarray, b: np.ndarray, x: np.ndarray, eps: float, norm: Norm,
                       divergence: Literal["skl", "kl"] = "skl", n: int = 400) -> tuple[float, float, np.ndarray]:
    """max over the eps-ball (a disc or a square) of l_s(f(x + delta), f(x)) for d = 2, by a grid.

    l_2: a polar grid of n radii (the circle included) and 10 n angles; l_inf: an (n + 1) x (n + 1) grid of the
    square, corners included. Every point of the ball lies within h of a grid point (h <= eps (1 / (2(n-1)) +
    pi / (10 n)) for the disc, eps sqrt(2) / n for the square), and |grad_delta l_s| <= L = 2 ||W||_2^2 r (r the
    largest ||delta||_2; softmax and its Jacobian are 1-Lipschitz / bounded by 1), so the true maximum is at most the
    grid maximum + L h.

    Returns:
        (grid maximum, error bound L h, the maximising delta (2,)).
    """
    W, b, x = (np.asarray(a, np.float64) for a in (W, b, x))
    if W.shape[1] != 2:
        raise ValueError(f"brute_force_max_2d: d must be 2, got {W.shape[1]}")
    if norm == "l2":
        r = np.linspace(0.0, eps, n)
        a = np.linspace(0.0, 2 * np.pi, 10 * n, endpoint=False)
        pts = np.stack([np.outer(r, np.cos(a)).ravel(), np.outer(r, np.sin(a)).ravel()], 1)
        # a denser circle as well (for small eps the maximum lies on it; the bound does not rely on this)
        c = np.linspace(0.0, 2 * np.pi, 100 * n, endpoint=False)
        pts = np.concatenate([pts, eps * np.stack([np.cos(c), np.sin(c)], 1)])
        h = eps * (1 / (2 * (n - 1)) + np.pi / (10 * n))
        rmax = eps
    else:
        g = np.linspace(-eps, eps, n + 1)
        pts = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
        h = eps * np.sqrt(2) / n
        rmax = eps * np.sqrt(2)
    z0 = W @ x + b
    z = z0[None, :] + pts @ W.T  # (P, C)
    lq = z0 - z0.max()
    lq = lq - np.log(np.exp(lq).sum())
    lp = z - z.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    if divergence == "skl":
        vals = ((np.exp(lp) - np.exp(lq)[None]) * (lp - lq[None])).sum(1)
    else:
        vals = (np.exp(lq)[None] * (lq[None] - lp)).sum(1)
    i = int(np.argmax(vals))
    L = 2 * np.linalg.norm(W, 2) ** 2 * rmax
    return float(vals[i]), float(L * h), pts[i]


# ---------------------------------------------------------------------------------------------------------------
# Exact facts: the proximal step on a quadratic
# ---------------------------------------------------------------------------------------------------------------

def proximal_step_closed_form(A: np.ndarray, b: np.ndarray, B: np.ndarray, anchor: np.ndarray, mu: float
                              ) -> np.ndarray:
    """argmin_theta 1/2 theta^T A theta - b^T theta + mu/2 (theta - theta~)^T B (theta - theta~)
    = (A + mu B)^{-1} (b + mu B theta~), for A + mu B positive definite."""
    A, b, B, anchor = (np.asarray(a, np.float64) for a in (A, b, B, anchor))
    return np.linalg.solve(A + mu * B, b + mu * B @ anchor)


def freeze_bound(grad_at_anchor: np.ndarray, B: np.ndarray, mu: float) -> float:
    """||theta*(mu) - theta~|| <= ||grad F(theta~)|| / (mu lambda_min(B)) for convex F and a quadratic Bregman term
    mu/2 (theta - theta~)^T B (theta - theta~) with B positive definite (optimality: grad F(theta*) + mu B e = 0,
    e = theta* - theta~; monotonicity of grad F: mu e^T B e <= -grad F(theta~) . e). mu -> infinity freezes the
    iterate at the anchor at rate 1/mu."""
    lam = float(np.linalg.eigvalsh(np.asarray(B, np.float64))[0])
    if lam <= 0:
        raise ValueError("freeze_bound: B must be positive definite")
    return float(np.linalg.norm(grad_at_anchor)) / (mu * lam)


# ---------------------------------------------------------------------------------------------------------------
# Seed stability
# ---------------------------------------------------------------------------------------------------------------

def std_ratio_ci(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> dict:
    """The ratio s_a / s_b of the sample standard deviations (ddof = 1) of two *paired* samples (the same seeds)
    with the Pitman-Morgan interval (exact for bivariate normal pairs; Pitman 1939, Morgan 1939): for a variance
    ratio psi, X + sqrt(psi) Y and X - sqrt(psi) Y are uncorrelated, so the interval is the set of psi whose sample
    correlation passes the t test with n - 2 degrees of freedom. With F = s_a^2 / s_b^2, r = corr(a, b) and
    c = t^2 / (n - 2 + t^2) it is F [(1 + c - 2 c r^2) -+ sqrt((1 + c - 2 c r^2)^2 - (1 - c)^2)] / (1 - c); the
    std ratio's interval is its square root. Returns ratio, ci_low, ci_high, n, r."""
    from scipy import stats

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"std_ratio_ci: need paired 1-D samples, got shapes {a.shape} and {b.shape}")
    n = a.shape[0]
    nan = float("nan")
    sa2, sb2 = (a.var(ddof=1), b.var(ddof=1)) if n >= 2 else (nan, nan)
    if n < 3 or not sb2 > 0 or not sa2 > 0:
        ratio = math.sqrt(sa2 / sb2) if n >= 2 and sb2 > 0 else nan
        return {"ratio": ratio, "ci_low": nan, "ci_high": nan, "n": int(n), "r": nan}
    r = float(np.corrcoef(a, b)[0, 1])
    F = sa2 / sb2
    t = float(stats.t.ppf((1 + level) / 2, n - 2))
    c = t * t / (n - 2 + t * t)
    k = 1 + c - 2 * c * r * r
    root = math.sqrt(max(k * k - (1 - c) ** 2, 0.0))
    lo, hi = F * (k - root) / (1 - c), F * (k + root) / (1 - c)
    return {"ratio": math.sqrt(F), "ci_low": math.sqrt(lo), "ci_high": math.sqrt(hi), "n": int(n), "r": r}


# ---------------------------------------------------------------------------------------------------------------
# The measured claims (S1): each method against plain fine-tuning on the same seeds
# ---------------------------------------------------------------------------------------------------------------

# metric -> the direction SMART's claim predicts for (method - FT): -1 lower, +1 higher.
S1_EXPECTED = {"dist_init": -1, "sensitivity": -1, "accuracy": +1, "robust_accuracy": +1}


def verdict_of(ci_low: float, ci_high: float, direction: int) -> str:
    """``supported`` when the 95% interval of (method - baseline) lies on the predicted side of 0, ``contradicted``
    when it lies on the other side, else ``inconclusive``."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "inconclusive"
    if (direction > 0 and ci_low > 0) or (direction < 0 and ci_high < 0):
        return "supported"
    if (direction > 0 and ci_high < 0) or (direction < 0 and ci_low > 0):
        return "contradicted"
    return "inconclusive"


def compare_to_baseline(rows: Sequence[Mapping], baseline: str, *, group: Sequence[str] = (),
                        expected: Mapping[str, int] = S1_EXPECTED, pair_by: Sequence[str] = ("seed",)) -> list[dict]:
    """For every group (e.g. task), method other than ``baseline`` and metric of ``expected``: the paired difference
    (method - baseline) over seeds, mean, sample std and 95% t interval (:func:`ftsim.core.tables.paired_difference`),
    and its verdict; plus, for ``accuracy``, the seed-stability row: s_method / s_baseline with the Pitman-Morgan
    interval for paired samples (:func:`std_ratio_ci`; SMART's claim: < 1). ``rows`` are tidy (method, metric,
    value, seed, ...)."""
    from ftsim.core.tables import paired_difference

    out = []
    keys = sorted({tuple(r.get(g) for g in group) for r in rows}, key=str)
    for key in keys:
        sub = [r for r in rows if tuple(r.get(g) for g in group) == key]
        methods = list(dict.fromkeys(r["method"] for r in sub if r["method"] != baseline))
        for m in methods:
            for metric, direction in expected.items():
                mrows = [r for r in sub if r["metric"] == metric]
                if not any(r["method"] == m for r in mrows):
                    continue
                st = paired_difference(mrows, "method", m, baseline, pair_by)
                out.append({**dict(zip(group, key)), "method": m, "baseline": baseline, "metric": metric,
                            "statistic": "mean difference", "value": st.mean, "std": st.std, "n": st.n,
                            "ci_low": st.ci_low, "ci_high": st.ci_high, "expected": "lower" if direction < 0 else
                            "higher", "verdict": verdict_of(st.ci_low, st.ci_high, direction)})
            acc = {r["method"]: {} for r in sub}
            for r in sub:
                if r["metric"] == "accuracy" and r.get("value") is not None:
                    acc[r["method"]][tuple(r.get(k) for k in pair_by)] = float(r["value"])
            common = sorted(set(acc.get(m, {})) & set(acc.get(baseline, {})), key=str)
            if len(common) >= 3:
                ci = std_ratio_ci([acc[m][c] for c in common], [acc[baseline][c] for c in common])
                v = "inconclusive"
                if math.isfinite(ci["ci_high"]) and ci["ci_high"] < 1:
                    v = "supported"
                elif math.isfinite(ci["ci_low"]) and ci["ci_low"] > 1:
                    v = "contradicted"
                out.append({**dict(zip(group, key)), "method": m, "baseline": baseline, "metric": "accuracy spread",
                            "statistic": "std ratio", "value": ci["ratio"], "std": float("nan"), "n": ci["n"],
                            "ci_low": ci["ci_low"], "ci_high": ci["ci_high"], "expected": "lower (ratio < 1)",
                            "verdict": v})
    return out
