"""Parameter-efficient fine-tuning as sparse fine-tuning (Fu, Yang, So, Lam, Bing & Collier, AAAI 2023).

A fine-tuned model with parameters theta is *p-sparse* when ||theta - theta_0||_0 <= p dim(theta) (their
Definition 1). Fine-tuning through a boolean mask M (diagonal, ||M||_0 <= floor(m p)) is theta = theta_0 + M dtheta;
:class:`theory.finetune.Params` ``masks=`` runs exactly that (masked entries stay bit-identical to theta_0). This
module holds the model-agnostic math around it:

* **Mask families** -- functions returning ``{name: bool tensor}`` per parameter tensor: random (Bernoulli(p) or an
  exact count), magnitude (largest |theta_0|), name rules (BitFit), the SAM rule (largest |accumulated gradient| per
  tensor, as the authors' code does, and the exact g_i^2 / h_i rule with a diagonal Hessian estimate), ChildPruning
  (largest empirical Fisher information, Child-Tuning_D of Xu et al. 2021) and DiffPruning (a hard-concrete
  relaxation of the mask trained with an L0 penalty, then projected onto the top-p entries; Guo et al. 2021).
  Mixout (Lee et al. 2019) is not a mask but a dropout towards theta_0: :class:`Mixout` wraps a classifier.
* **The stability and generalisation bounds** (Theorems 1 and 2) and the mask regulariser behind them.
* **Theorem 3 (SAM) on quadratics**: the rule, the loss drop it predicts, and brute force over every mask.
* **Exact leave-one-out stability** of L2-regularised logistic regression (with offsets, so the linearised model
  of a network is the same problem), each problem solved by Newton's method in float64.
* **LoRA's kernel scale** (Malladi et al. 2023, Sec. 7): the factor that makes the eNTK restricted to LoRA's
  parameters at initialisation an unbiased estimate of the eNTK of the adapted weights.

Which form of each theorem (read from the authors' slides and poster, the public repository's code):

* Thm 1 (stability): if the loss l is rho-Lipschitz, A(S^i) is close to A(S) and the Hessian of L at A(S) is PSD
  with smallest eigenvalue Lambda_min, then the expected mask-regularised loss E_M L_R has pointwise hypothesis
  stability E_{S, i} |l(A(S^i), z_i) - l(A(S), z_i)| <= 2 rho^2 / ((Lambda_min + 2 (1 - p)) n), S^i = S without
  z_i. We read L_R(theta) = L(theta) + ||(I - M)(theta - theta_0)||^2 (the masked-out coordinates pulled to
  theta_0), so E_M L_R = L(theta) + (1 - p) ||theta - theta_0||^2 for M_ii ~ Bernoulli(p): its Hessian is
  grad^2 L + 2 (1 - p) I, whose smallest eigenvalue is the theorem's denominator. For a strongly convex objective
  with modulus lambda = Lambda_min + 2 (1 - p) and A(S) the exact minimiser of the *mean* loss over S plus the
  regulariser, the bound follows from ||A(S) - A(S^i)|| <= 2 rho / (lambda n) (the two objectives differ by
  (l_i - mean of the others) / n, whose gradient is at most 2 rho / n).
* Thm 2 (generalisation): with probability 1 - delta, R <= R_hat + sqrt((C^2 + 24 C rho^2 / (Lambda_min +
  2 (1 - p))) / (2 n delta)) -- Bousquet & Elisseeff's (2002) Thm 11 with the stability of Thm 1; C bounds the loss.
* Thm 3 (SAM): for L(theta_0 + M dtheta) replaced by its second-order expansion with a diagonal PSD Hessian
  diag(h), the mask keeping the floor(m p) coordinates with the largest g_i^2 / h_i attains the smallest value,
  and the loss falls by 1/2 sum_{i in M} g_i^2 / h_i. The practical rule replaces h by its largest eigenvalue
  (an upper bound of the expansion), i.e. keeps the largest |g_i|: the authors accumulate mini-batch gradients
  over a burn-in without updating, then keep the top p of |sum of gradients| in every tensor.
"""

from __future__ import annotations

import functools

import dataclasses
import fnmatch
import hashlib
import itertools
import math
from typing import Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "budget", "top_k_masks", "random_masks", "magnitude_masks", "name_masks", "full_masks", "density",
    "accumulated_gradients", "fisher_diagonal", "gauss_newton_diagonal", "hutchinson_diagonal",
    "sam_masks", "sam_exact_masks", "childpruning_masks", "HardConcrete", "DiffPruning", "diffpruning",
    "diffpruning_relax", "diffpruning_project",
    "Mixout", "mask_regularizer", "expected_mask_regularizer", "stability_bound", "generalization_bound",
    "quadratic_drop", "sam_rule", "gradient_rule", "predicted_drop", "upper_bound_drop", "brute_force_drops",
    "LogisticProblem", "fit_logistic", "logistic_losses", "logistic_hessian", "LOOResult", "loo_stability",
    "restrict", "lora_kernel_scale", "lora_target_names", "inject_lora", "lora_parameter_groups", "scaled_lora_kernel",
    "lora_rank_rows",
]

Masks = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Mask families
# ---------------------------------------------------------------------------------------------------------------

def budget(numel: int, p: float) -> int:
    """floor(numel * p), the number of entries a p-sparse mask keeps (the authors' ``int(p * numel)``)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    return min(numel, int(math.floor(numel * p + 1e-12)))


def _top_k_flat(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of a flat score (ranked in its own dtype: float32 scores stay float32,
    which halves the work of ``kthvalue`` on 10^8 entries); ties go to the lower index, NaN counts as -inf
    (deterministic, unlike ``torch.topk``)."""
    n = score.numel()
    out = torch.zeros(n, dtype=torch.bool)
    if k <= 0:
        return out
    if k >= n:
        return ~out
    s = score if score.is_floating_point() else score.double()
    if torch.isnan(s).any():
        s = torch.nan_to_num(s, nan=-math.inf)
    thresh = torch.kthvalue(-s, k).values.neg()  # the k-th largest value
    above = s > thresh
    out |= above
    need = k - int(above.sum())
    if need > 0:
        ties = (s == thresh).nonzero().flatten()[:need]
        out[ties] = True
    return out


def top_k_masks(scores: Mapping[str, torch.Tensor], p: float, scope: Literal["tensor", "global"] = "tensor"
                ) -> Masks:
    """Keep the largest scores: floor(p * numel) entries of every tensor (``scope="tensor"``, the authors' SAM and
    MagPruning) or floor(p * total) entries over all tensors together (``"global"``, Theorem 3 as stated and
    Child-Tuning_D). Ties go to the earlier entry (tensors in the mapping's order)."""
    if scope not in ("tensor", "global"):
        raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
    if scope == "tensor":
        return {n: _top_k_flat(s.detach().cpu().reshape(-1), budget(s.numel(), p)).reshape(s.shape)
                for n, s in scores.items()}
    names = list(scores)
    dtype = functools.reduce(torch.promote_types, (scores[n].dtype for n in names))
    flat = torch.cat([scores[n].detach().cpu().reshape(-1).to(dtype) for n in names])
    keep = _top_k_flat(flat, budget(flat.numel(), p))
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].reshape(scores[n].shape)
        start += size
    return out


def _name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, tensor name): a tensor's random mask does not depend on which others exist."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def random_masks(params: Mapping[str, torch.Tensor], p: float, seed: int, exact: bool = False) -> Masks:
    """Random masks: every entry kept independently with probability p (M_ii ~ Bernoulli(p), the Random model and
    the masks of Theorem 1), or, with ``exact``, exactly floor(p * numel) entries per tensor drawn uniformly."""
    budget(1, p)  # validates p
    out = {}
    for n, t in params.items():
        gen = torch.Generator().manual_seed(_name_seed(seed, n))
        u = torch.rand(t.shape, generator=gen, dtype=torch.float64)
        out[n] = top_k_masks({n: u}, p)[n] if exact else (u < p)
    return out


def magnitude_masks(params: Mapping[str, torch.Tensor], p: float, scope: str = "tensor") -> Masks:
    """MagPruning: keep the entries of largest |theta_0| (Han et al. 2015), per tensor by default."""
    return top_k_masks({n: t.detach().abs() for n, t in params.items()}, p, scope)


def name_masks(params: Mapping[str, torch.Tensor], patterns: Sequence[str]) -> Masks:
    """Whole tensors whose name matches a glob pattern move (BitFit: ``("*bias",)``), the others stay."""
    return {n: torch.full(t.shape, any(fnmatch.fnmatchcase(n, pat) for pat in patterns), dtype=torch.bool)
            for n, t in params.items()}


def full_masks(params: Mapping[str, torch.Tensor]) -> Masks:
    """Every entry moves (full fine-tuning as a mask)."""
    return {n: torch.ones(t.shape, dtype=torch.bool) for n, t in params.items()}


def density(masks: Mapping[str, torch.Tensor]) -> float:
    """The share of entries a mask set keeps: ||M||_0 / m."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# Scores that need the model: gradients, Fisher information, diagonal Hessians
# ---------------------------------------------------------------------------------------------------------------

def _named(module: nn.Module, names: Iterable[str] | None) -> dict[str, nn.Parameter]:
    params = dict(module.named_parameters())
    if names is None:
        return params
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"no parameter named {unknown[:3]}")
    return {n: params[n] for n in names}


def _loss_of(scores: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    from theory.finetune import _loss  # the one definition of the fine-tuning losses

    return _loss(scores, y, loss)


def _grads(loss_value: torch.Tensor, params: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    got = torch.autograd.grad(loss_value, list(params.values()), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params.values())]


def accumulated_gradients(module: nn.Module, data, *, steps: int, batch_size: int, seed: int, loss: str = "ce",
                          device: str | torch.device = "cpu", names: Iterable[str] | None = None,
                          train_mode: bool = True) -> Masks:
    """The SAM burn-in of the authors' code: the sum of ``steps`` mini-batch gradients at theta_0, no update in
    between. Mini-batches are drawn as :func:`theory.finetune.finetune` draws them (per-epoch permutations from a
    generator seeded with ``seed``); dropout noise comes from the torch RNG seeded with ``seed``.

    Returns:
        name -> (float64, CPU) sum of gradients of the mean mini-batch loss.
    """
    from theory.batching import batch_to

    params = _named(module, names)
    was = module.training
    module.train(train_mode)
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    perm, cursor = torch.randperm(n, generator=gen), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            if cursor >= n:
                perm, cursor = torch.randperm(n, generator=gen), 0
            idx = perm[cursor:cursor + batch_size]
            cursor += batch_size
            scores = module(batch_to(data.select(idx), device))
            for (name, _), g in zip(params.items(), _grads(_loss_of(scores, data.labels[idx].to(device), loss),
                                                           params)):
                acc[name] += g.detach().double().cpu()
    module.train(was)
    return acc


def fisher_diagonal(module: nn.Module, data, *, loss: str = "ce", device: str | torch.device = "cpu",
                    names: Iterable[str] | None = None) -> Masks:
    """The empirical Fisher information diag F = (1/n) sum_i (d l(z_i) / d theta)^2, one backward pass per
    example (Child-Tuning_D's score; eval mode)."""
    from theory.batching import batch_to

    params = _named(module, names)
    was = module.training
    module.eval()
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    for i in range(len(data)):
        idx = torch.tensor([i])
        scores = module(batch_to(data.select(idx), device))
        for (name, _), g in zip(params.items(), _grads(_loss_of(scores, data.labels[idx].to(device), loss), params)):
            acc[name] += g.detach().double().cpu() ** 2 / len(data)
    module.train(was)
    return acc


def gauss_newton_diagonal(module: nn.Module, data, *, device: str | torch.device = "cpu",
                          names: Iterable[str] | None = None) -> Masks:
    """Diagonal of the Gauss-Newton matrix (1/n) sum_i J_i^T H_i J_i of the cross-entropy loss, a PSD estimate of the
    Hessian diagonal (for softmax cross-entropy it equals the Fisher information of the model's own predictive
    distribution).

    With p = softmax(f) and H = diag(p) - p p^T = sum_c p_c (e_c - p)(e_c - p)^T, the diagonal is
    sum_c p_c (d <e_c - p, f> / d theta)^2 (p held fixed): one backward pass per class and example; two classes
    need one, (e_1 - p) = p_0 (e_1 - e_0). A single output s (the logistic loss) gives sigma(s)(1 - sigma(s))
    (ds/dtheta)^2.
    """
    from theory.batching import batch_to

    params = _named(module, names)
    was = module.training
    module.eval()
    acc = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    for i in range(len(data)):
        scores = module(batch_to(data.select(torch.tensor([i])), device))[0]  # (C,)
        if scores.numel() == 1:
            s = torch.sigmoid(scores.detach().double())[0]
            terms = [(float(s * (1 - s)), scores[0])]
        else:
            prob = torch.softmax(scores.detach().double(), -1)
            if scores.numel() == 2:
                terms = [(float(prob[0] * prob[1]), scores[1] - scores[0])]
            else:
                terms = [(float(prob[c]), ((torch.eye(len(prob), dtype=prob.dtype)[c] - prob).to(scores.dtype)
                                           * scores).sum()) for c in range(len(prob))]
        for j, (weight, out) in enumerate(terms):
            got = torch.autograd.grad(out, list(params.values()), allow_unused=True,
                                      retain_graph=j < len(terms) - 1)
            for (name, p), g in zip(params.items(), got):
                if g is not None:
                    acc[name] += weight * g.detach().double().cpu() ** 2 / len(data)
    module.train(was)
    return acc


def hutchinson_diagonal(loss_fn: Callable[[], torch.Tensor], params: Mapping[str, torch.Tensor], samples: int,
                        seed: int) -> Masks:
    """Hutchinson's estimate of diag(H), H the Hessian of ``loss_fn()`` in ``params``: the mean over ``samples``
    Rademacher vectors v of v * (H v) (unbiased; exact when H is diagonal, since v_i^2 = 1)."""
    gen = torch.Generator().manual_seed(seed)
    plist = list(params.values())
    acc = [torch.zeros(p.shape, dtype=torch.float64) for p in plist]
    for _ in range(samples):
        value = loss_fn()
        grads = torch.autograd.grad(value, plist, create_graph=True)
        vs = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.dtype).to(p.device) for p in plist]
        hv = torch.autograd.grad(grads, plist, grad_outputs=vs, allow_unused=True)
        for a, v, h in zip(acc, vs, hv):
            if h is not None:
                a += (v * h).detach().double().cpu() / samples
    return dict(zip(params, acc))


def sam_masks(gradient_sum: Mapping[str, torch.Tensor], p: float, scope: str = "tensor") -> Masks:
    """The practical SAM rule: keep the largest |g_i| (g the burn-in's accumulated gradient), per tensor as the
    authors' code does (Theorem 3 with h bounded by its largest value)."""
    return top_k_masks({n: g.abs() for n, g in gradient_sum.items()}, p, scope)


def sam_exact_masks(gradient: Mapping[str, torch.Tensor], hessian_diag: Mapping[str, torch.Tensor], p: float,
                    scope: str = "tensor", floor: float = 1e-8) -> Masks:
    """Theorem 3's rule: keep the largest g_i^2 / h_i. The theorem assumes h_i > 0; an estimate may give h_i <= 0
    (non-convex loss, or a noisy estimate): |h_i| is used, floored at ``floor`` times the largest |h| of the
    tensor (or of all tensors with ``scope="global"``), so no coordinate gets an infinite score."""
    if scope == "global":
        hmax = max(float(h.abs().max()) for h in hessian_diag.values())
        floors = {n: floor * hmax for n in gradient}
    else:
        floors = {n: floor * float(hessian_diag[n].abs().max()) for n in gradient}
    scores = {}
    for n, g in gradient.items():
        h = hessian_diag[n].double().abs().clamp_min(max(floors[n], 1e-300))
        scores[n] = g.double() ** 2 / h
    return top_k_masks(scores, p, scope)


def childpruning_masks(fisher: Mapping[str, torch.Tensor], p: float, scope: str = "global") -> Masks:
    """ChildPruning (Child-Tuning_D, Xu et al. 2021): the child network is the entries of largest Fisher
    information, over all tensors together by default."""
    return top_k_masks(fisher, p, scope)


# ---------------------------------------------------------------------------------------------------------------
# DiffPruning: a hard-concrete relaxation of the mask, then projection
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HardConcrete:
    """The stretched hard-concrete gate of Louizos et al. (2018) as DiffPruning uses it:
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta), z = min(1, max(0, s (r - l) + l)), u ~ U(0, 1);
    P(z != 0) = sigmoid(log_alpha - beta log(-l / r)). The authors' code stretches to (l, r) = (-3, 3), beta = 1."""

    left: float = -3.0
    right: float = 3.0
    beta: float = 1.0

    def __post_init__(self) -> None:
        if not self.left < 0 < 1 < self.right or self.beta <= 0:
            raise ValueError(f"hard concrete: need left < 0, right > 1, beta > 0, got {self}")

    def sample(self, log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.beta)
        return (s * (self.right - self.left) + self.left).clamp(0.0, 1.0)

    def open_probability(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(log_alpha - self.beta * math.log(-self.left / self.right))


@dataclasses.dataclass(frozen=True)
class DiffPruning:
    """Settings of the relaxed stage of DiffPruning (Guo et al. 2021; the authors' ``diffprun`` mode).

    theta = theta_0 + z(log_alpha) * w with w and log_alpha trained by Adam for ``steps`` mini-batches on the
    task loss plus ``l0_weight`` times the mean gate-open probability; then the mask keeps the p largest
    log_alpha of every tensor, and the moving entries start from theta_0 + w there (the projection).
    """

    steps: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    alpha_lr: float = 0.1
    l0_weight: float = 1.0
    init_log_alpha: float = 0.0
    gate: HardConcrete = HardConcrete()

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.alpha_lr <= 0 or self.l0_weight < 0:
            raise ValueError(f"diffpruning: need steps, batch_size >= 1, lr, alpha_lr > 0, l0_weight >= 0: {self}")


def diffpruning_relax(module: nn.Module, data, cfg: DiffPruning, *, seed: int, loss: str = "ce",
                      device: str | torch.device = "cpu", names: Iterable[str] | None = None
                      ) -> tuple[Masks, Masks, list[float]]:
    """The relaxed stage of :class:`DiffPruning` (it does not depend on p): theta = theta_0 + z(log_alpha) * w
    through ``torch.func.functional_call`` (``module`` itself is not changed).

    Returns:
        (log_alpha, w, losses): the gate logits and the diff vector per tensor, and the task loss of every step.
    """
    from torch.func import functional_call

    from theory.batching import batch_to

    params = _named(module, names)
    theta0 = {n: p_.detach() for n, p_ in params.items()}
    w = {n: torch.zeros_like(t, requires_grad=True) for n, t in theta0.items()}
    log_alpha = {n: torch.full_like(t, cfg.init_log_alpha, requires_grad=True) for n, t in theta0.items()}
    opt = torch.optim.Adam([{"params": list(w.values()), "lr": cfg.lr},
                            {"params": list(log_alpha.values()), "lr": cfg.alpha_lr}])
    gen = torch.Generator().manual_seed(seed)
    total = sum(t.numel() for t in theta0.values())
    n = len(data)
    perm, cursor = torch.randperm(n, generator=gen), 0
    losses = []
    was = module.training
    module.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(cfg.steps):
            if cursor >= n:
                perm, cursor = torch.randperm(n, generator=gen), 0
            idx = perm[cursor:cursor + cfg.batch_size]
            cursor += cfg.batch_size
            moved = {}
            for name, t in theta0.items():
                u = torch.rand(t.shape, generator=gen, dtype=torch.float32).clamp(1e-6, 1 - 1e-6).to(t)
                moved[name] = t + cfg.gate.sample(log_alpha[name], u) * w[name]
            scores = functional_call(module, moved, (batch_to(data.select(idx), device),), strict=False)
            task = _loss_of(scores, data.labels[idx].to(device), loss)
            l0 = sum(cfg.gate.open_probability(a).sum() for a in log_alpha.values()) / total
            opt.zero_grad(set_to_none=True)
            (task + cfg.l0_weight * l0).backward()
            opt.step()
            losses.append(float(task.detach()))
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"diffpruning: loss became {losses[-1]} (lr {cfg.lr} too large?)")
    module.train(was)
    return ({k: v.detach() for k, v in log_alpha.items()}, {k: v.detach() for k, v in w.items()}, losses)


def diffpruning_project(theta0: Mapping[str, torch.Tensor], log_alpha: Mapping[str, torch.Tensor],
                        w: Mapping[str, torch.Tensor], p: float) -> tuple[Masks, Masks]:
    """The projection of :class:`DiffPruning`: masks of the top floor(p numel) log_alpha per tensor, and the start
    theta_0 + M * w (exactly theta_0 where M is False)."""
    masks = top_k_masks(log_alpha, p)
    start = {k: torch.where(masks[k].to(t.device), t + w[k].to(t), t) for k, t in theta0.items()}
    return masks, start


def diffpruning(module: nn.Module, data, p: float, cfg: DiffPruning, *, seed: int, loss: str = "ce",
                device: str | torch.device = "cpu", names: Iterable[str] | None = None
                ) -> tuple[Masks, dict[str, torch.Tensor], list[float]]:
    """:func:`diffpruning_relax` then :func:`diffpruning_project`: (masks, start, losses)."""
    theta0 = {n: p_.detach().clone() for n, p_ in _named(module, names).items()}
    log_alpha, w, losses = diffpruning_relax(module, data, cfg, seed=seed, loss=loss, device=device, names=names)
    masks, start = diffpruning_project(theta0, log_alpha, w, p)
    return masks, start, losses


# ---------------------------------------------------------------------------------------------------------------
# Mixout
# ---------------------------------------------------------------------------------------------------------------

class Mixout(nn.Module):
    """Mixout (Lee, Cho & Kang 2019) around a classifier: in training mode every forward pass uses
    theta_0 + B * (theta - theta_0) / (1 - q), B_i ~ Bernoulli(1 - q) drawn afresh (from the torch RNG, which
    :func:`theory.finetune.finetune` seeds), so E[theta_mix] = theta and a share q of the entries is reset to
    theta_0 in each pass (a (1 - q)-sparse model per pass, in expectation). Eval mode uses theta.

    Fine-tune the wrapper: its parameters are the inner module's, named ``inner.<name>``.

    Args:
        module: the classifier; its current parameters are theta_0.
        mix_prob: q in [0, 1).
        names: the parameters that mix (default: all).
    """

    def __init__(self, module: nn.Module, mix_prob: float, names: Iterable[str] | None = None):
        super().__init__()
        if not 0.0 <= mix_prob < 1.0:
            raise ValueError(f"mixout: mix_prob must lie in [0, 1), got {mix_prob}")
        self.inner = module
        self.mix_prob = float(mix_prob)
        self._anchor = {n: p.detach().clone() for n, p in _named(module, names).items()}

    def forward(self, batch):
        if not self.training or self.mix_prob == 0.0:
            return self.inner(batch)
        from torch.func import functional_call

        q = self.mix_prob
        mixed = {}
        for name, p in self.inner.named_parameters():
            if name in self._anchor:
                anchor = self._anchor[name].to(p.device, p.dtype)
                keep = torch.rand(p.shape, device=p.device) >= q
                mixed[name] = anchor + keep * (p - anchor) / (1.0 - q)
        return functional_call(self.inner, mixed, (batch,), strict=False)


# ---------------------------------------------------------------------------------------------------------------
# Theorems 1 and 2
# ---------------------------------------------------------------------------------------------------------------

def mask_regularizer(theta: torch.Tensor, theta0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """||(I - M)(theta - theta_0)||^2: the masked-out coordinates pulled to theta_0 (our reading of L_R - L)."""
    return (((~mask.bool()).to(theta.dtype) * (theta - theta0)) ** 2).sum()


def expected_mask_regularizer(theta: torch.Tensor, theta0: torch.Tensor, p: float) -> torch.Tensor:
    """E_M ||(I - M)(theta - theta_0)||^2 = (1 - p) ||theta - theta_0||^2 for M_ii ~ Bernoulli(p)."""
    return (1.0 - p) * ((theta - theta0) ** 2).sum()


def stability_bound(rho: float, lambda_min: float, p: float, n: int) -> float:
    """Thm 1: 2 rho^2 / ((Lambda_min + 2 (1 - p)) n); ``inf`` when the denominator is not positive (the theorem's
    PSD assumption fails and the bound says nothing)."""
    den = (lambda_min + 2.0 * (1.0 - p)) * n
    return 2.0 * rho ** 2 / den if den > 0 else math.inf


def generalization_bound(empirical_risk: float, loss_bound: float, rho: float, lambda_min: float, p: float, n: int,
                         delta: float) -> float:
    """Thm 2: R_hat + sqrt((C^2 + 24 C rho^2 / (Lambda_min + 2 (1 - p))) / (2 n delta)), C the loss bound; equal to
    Bousquet & Elisseeff's R_hat + sqrt((C^2 + 12 C n beta) / (2 n delta)) with beta the bound of Thm 1."""
    beta = stability_bound(rho, lambda_min, p, n)
    if not math.isfinite(beta):
        return math.inf
    return empirical_risk + math.sqrt((loss_bound ** 2 + 12.0 * loss_bound * n * beta) / (2.0 * n * delta))


# ---------------------------------------------------------------------------------------------------------------
# Theorem 3 on quadratics L(theta_0 + M d) = L_0 + g^T M d + 1/2 d^T M H M d
# ---------------------------------------------------------------------------------------------------------------

def quadratic_drop(g: np.ndarray, H: np.ndarray, support: Sequence[int]) -> float:
    """L_0 - inf_d L(theta_0 + M d) = 1/2 g_S^T H_SS^{-1} g_S for the mask on ``support`` (H positive definite)."""
    S = np.asarray(support, dtype=np.int64)
    if S.size == 0:
        return 0.0
    gs = np.asarray(g, float)[S]
    return 0.5 * float(gs @ np.linalg.solve(np.asarray(H, float)[np.ix_(S, S)], gs))


def _top(score: np.ndarray, k: int) -> np.ndarray:
    order = np.argsort(-np.asarray(score, float), kind="stable")  # ties: the lower index first
    return np.sort(order[:k])


def sam_rule(g: np.ndarray, h: np.ndarray, k: int) -> np.ndarray:
    """Theorem 3: the k coordinates with the largest g_i^2 / h_i (sorted indices)."""
    return _top(np.asarray(g, float) ** 2 / np.asarray(h, float), k)


def gradient_rule(g: np.ndarray, k: int) -> np.ndarray:
    """The practical rule: the k coordinates with the largest |g_i|."""
    return _top(np.abs(np.asarray(g, float)), k)


def predicted_drop(g: np.ndarray, h: np.ndarray, support: Sequence[int]) -> float:
    """The drop Theorem 3 predicts for a diagonal Hessian: 1/2 sum_{i in S} g_i^2 / h_i."""
    S = np.asarray(support, dtype=np.int64)
    return 0.5 * float(np.sum(np.asarray(g, float)[S] ** 2 / np.asarray(h, float)[S]))


def upper_bound_drop(g: np.ndarray, lambda_max: float, support: Sequence[int]) -> float:
    """The drop of the upper-bound problem (H replaced by lambda_max I): sum_{i in S} g_i^2 / (2 lambda_max); the
    true drop of the same mask is at least this (H <= lambda_max I)."""
    S = np.asarray(support, dtype=np.int64)
    return float(np.sum(np.asarray(g, float)[S] ** 2)) / (2.0 * lambda_max)


def brute_force_drops(g: np.ndarray, H: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every mask of size k: (supports (C(m, k), k), drops (C(m, k),)), each drop 1/2 g_S^T H_SS^{-1} g_S from one
    batched solve."""
    g, H = np.asarray(g, float), np.asarray(H, float)
    m = g.shape[0]
    if not 0 <= k <= m or m > 20:
        raise ValueError(f"brute force needs 0 <= k <= m <= 20, got k={k}, m={m}")
    supports = np.array(list(itertools.combinations(range(m), k)), dtype=np.int64).reshape(-1, k)
    if k == 0:
        return supports, np.zeros(1)
    gs = g[supports]  # (C, k)
    Hs = H[supports[:, :, None], supports[:, None, :]]  # (C, k, k)
    sol = np.linalg.solve(Hs, gs[:, :, None])[:, :, 0]
    return supports, 0.5 * np.einsum("ck,ck->c", gs, sol)


# ---------------------------------------------------------------------------------------------------------------
# Exact leave-one-out stability of L2-regularised logistic regression
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LogisticProblem:
    """F_S(theta) = (1/|S|) sum_{i in S} log(1 + exp(-y_i (x_i . theta + b_i))) + (ridge/2) ||theta||^2
    + sum_j c_j (theta_j - theta0_j)^2.

    Attributes:
        X: (n, d) features; y: (n,) labels in {-1, +1}; offset: (n,) b (the linearised model's f_0; zeros).
        ridge: the L2 strength (part of L, the loss whose Hessian Theorem 1 talks about).
        penalty: (d,) c, the mask regulariser's weights: 1 - p everywhere for E_M L_R, 1 - M_jj for one mask.
        theta0: (d,) the anchor theta_0.
    """

    X: np.ndarray
    y: np.ndarray
    offset: np.ndarray
    ridge: float
    penalty: np.ndarray
    theta0: np.ndarray

    @classmethod
    def make(cls, X, y, *, ridge: float, penalty=0.0, theta0=None, offset=None) -> "LogisticProblem":
        X = np.asarray(X, dtype=np.float64)
        n, d = X.shape
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if y.shape != (n,) or not np.isin(y, (-1.0, 1.0)).all():
            raise ValueError("LogisticProblem: y must be (n,) in {-1, +1}")
        pen = np.broadcast_to(np.asarray(penalty, np.float64), (d,)).copy()
        t0 = np.zeros(d) if theta0 is None else np.asarray(theta0, np.float64).reshape(d)
        b = np.zeros(n) if offset is None else np.asarray(offset, np.float64).reshape(n)
        if ridge < 0 or (pen < 0).any():
            raise ValueError("LogisticProblem: ridge and penalty must be >= 0")
        return cls(X, y, b, float(ridge), pen, t0)

    def with_penalty(self, penalty) -> "LogisticProblem":
        return dataclasses.replace(self, penalty=np.broadcast_to(np.asarray(penalty, np.float64),
                                                                 self.theta0.shape).copy())

    @property
    def lipschitz(self) -> float:
        """rho = max_i ||x_i||: |d l / d theta| = |x_i| sigma(-margin) <= ||x_i|| for every theta."""
        return float(np.linalg.norm(self.X, axis=1).max())


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def logistic_losses(problem: LogisticProblem, theta: np.ndarray) -> np.ndarray:
    """(n,) per-example losses log(1 + exp(-y_i (x_i . theta + b_i)))."""
    margin = problem.y * (problem.X @ theta + problem.offset)
    return np.logaddexp(0.0, -margin)


def _objective(problem: LogisticProblem, theta: np.ndarray, rows: np.ndarray):
    X, y, b = problem.X[rows], problem.y[rows], problem.offset[rows]
    margin = y * (X @ theta + b)
    diff = theta - problem.theta0
    value = (np.logaddexp(0.0, -margin).mean() + 0.5 * problem.ridge * theta @ theta
             + float(problem.penalty @ diff ** 2))
    s = _sigmoid(-margin)
    grad = -(X.T @ (y * s)) / len(rows) + problem.ridge * theta + 2.0 * problem.penalty * diff
    w = s * (1.0 - s)
    hess = (X.T * w) @ X / len(rows) + np.diag(problem.ridge + 2.0 * problem.penalty)
    return value, grad, hess


def fit_logistic(problem: LogisticProblem, rows: Sequence[int] | None = None, start: np.ndarray | None = None,
                 tol: float = 1e-12, max_iter: int = 200) -> np.ndarray:
    """The exact minimiser of F over the examples ``rows`` (default all): damped Newton steps with a backtracking
    line search until the gradient's norm is below ``tol`` or the Newton decrement g^T H^{-1} g (twice the
    remaining suboptimality, to second order) is below 1e-24 (float64). The objective must be strongly convex
    (ridge + 2 min(penalty) > 0, or data that pin every direction)."""
    rows = np.arange(problem.X.shape[0]) if rows is None else np.asarray(rows, dtype=np.int64)
    theta = problem.theta0.copy() if start is None else np.asarray(start, np.float64).copy()
    value, grad, hess = _objective(problem, theta, rows)
    for _ in range(max_iter):
        step = np.linalg.solve(hess, grad)
        decrement = float(grad @ step)  # lambda^2: F(theta) - min F is about lambda^2 / 2 near the optimum
        if np.linalg.norm(grad) <= tol or decrement <= 1e-24:
            return theta
        t = 1.0
        while True:
            cand = theta - t * step
            v2, g2, h2 = _objective(problem, cand, rows)
            # Armijo, with room for rounding: near the optimum the full Newton step is right even when F cannot
            # resolve the decrease (F ~ 1 carries 1e-16 relative error; the decrement is below that).
            if v2 <= value - 1e-4 * t * decrement + 1e-14 * abs(value) or t < 1e-10:
                break
            t *= 0.5
        theta, value, grad, hess = cand, v2, g2, h2
    raise RuntimeError(f"fit_logistic: no convergence in {max_iter} Newton steps (|grad| = "
                       f"{np.linalg.norm(grad):.2e})")


def logistic_hessian(problem: LogisticProblem, theta: np.ndarray, with_penalty: bool = False) -> np.ndarray:
    """The Hessian at theta of L = mean loss + (ridge/2)||theta||^2 (and of the mask regulariser with
    ``with_penalty``)."""
    rows = np.arange(problem.X.shape[0])
    target = problem if with_penalty else problem.with_penalty(0.0)
    return _objective(target, theta, rows)[2]


@dataclasses.dataclass(frozen=True)
class LOOResult:
    """Exact leave-one-out stability of one problem.

    Attributes:
        per_point: (n,) |l(A(S^i), z_i) - l(A(S), z_i)|; ``stability``: their mean (E_i; one S).
        theta: A(S). lambda_min: smallest eigenvalue of the Hessian of L at A(S) (ridge included, mask
            regulariser not). rho: the Lipschitz constant max_i ||x_i||. n: examples.
    """

    per_point: np.ndarray
    theta: np.ndarray
    lambda_min: float
    rho: float
    n: int

    @property
    def stability(self) -> float:
        return float(self.per_point.mean())


def loo_stability(problem: LogisticProblem) -> LOOResult:
    """Retrain without each example (n exact fits warm-started from A(S), which does not change the minimiser of a
    strictly convex objective) and measure |l(A(S^i), z_i) - l(A(S), z_i)| for every i."""
    n = problem.X.shape[0]
    theta = fit_logistic(problem)
    base = logistic_losses(problem, theta)
    per = np.empty(n)
    for i in range(n):
        rows = np.delete(np.arange(n), i)
        th_i = fit_logistic(problem, rows, start=theta)
        per[i] = abs(logistic_losses(problem, th_i)[i] - base[i])
    lam = float(np.linalg.eigvalsh(logistic_hessian(problem, theta))[0])
    return LOOResult(per, theta, lam, problem.lipschitz, n)


def restrict(problem: LogisticProblem, keep: np.ndarray) -> LogisticProblem:
    """The hard-masked problem: coordinates outside ``keep`` fixed at theta_0 (true sparse fine-tuning), as a
    problem over the kept coordinates with their contribution moved into the offset. The ridge on the fixed
    coordinates is a constant and drops out."""
    keep = np.asarray(keep, bool)
    fixed = problem.theta0[~keep]
    return LogisticProblem(problem.X[:, keep], problem.y, problem.offset + problem.X[:, ~keep] @ fixed, problem.ridge,
                           problem.penalty[keep], problem.theta0[keep])


# ---------------------------------------------------------------------------------------------------------------
# LoRA's kernel (Malladi et al. 2023, Sec. 7)
# ---------------------------------------------------------------------------------------------------------------

def lora_kernel_scale(r: int, alpha: float, fan_in: int, init: str | bool = True, rslora: bool = False) -> float:
    """E[K_LoRA] / K_W for one adapted matrix W at LoRA's initialisation (B = 0).

    The output changes by s B A x with s = alpha / r (alpha / sqrt(r) with rsLoRA), so d f / d B = s G A^T with
    G = d f / d W, d f / d A = s B^T G = 0, and K_LoRA(x, x') = s^2 tr(G A^T A G'^T). With i.i.d. entries of
    variance sigma^2, E[A^T A] = r sigma^2 I, so E[K_LoRA] = s^2 r sigma^2 K_W, and by Johnson-Lindenstrauss the
    scaled kernel concentrates around K_W with relative error O(r^{-1/2}). peft's default A is
    kaiming_uniform(a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), sigma^2 = 1 / (3 fan_in); ``"gaussian"``:
    N(0, 1/r^2), sigma^2 = 1/r^2.
    """
    if r < 1 or fan_in < 1:
        raise ValueError(f"lora_kernel_scale: need r, fan_in >= 1, got {r}, {fan_in}")
    s = alpha / math.sqrt(r) if rslora else alpha / r
    if init is True or init == "kaiming":
        var = 1.0 / (3.0 * fan_in)
    elif init == "gaussian":
        var = 1.0 / r ** 2
    else:
        raise ValueError(f"lora_kernel_scale: unknown init {init!r} (True/'kaiming' or 'gaussian')")
    return s * s * r * var


def lora_target_names(module: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` sub-modules of ``module`` that peft's LoRA adapts (its suffix matching)."""
    return [n for n, m in module.named_modules()
            if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]


def inject_lora(module: nn.Module, rank: int, alpha: float, targets: Sequence[str], seed: int, scope: str = ""
                ) -> nn.Module:
    """A deep copy of ``module`` with peft's LoRA (``inject_adapter_in_model``, no dropout) in its sub-module
    ``scope``; A is drawn from the torch RNG seeded with ``seed`` -- the draws :func:`theory.finetune.finetune`
    makes when it injects the same config with the same seed (it seeds the RNG, then injects first)."""
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    out = copy.deepcopy(module)
    inner = out.get_submodule(scope) if scope else out
    dtype = next(inner.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0),
                                inner)
    with torch.no_grad():  # the adapter in the base model's dtype (values exact: A was drawn in float32)
        for name, p in out.named_parameters():
            if "lora_" in name and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return out.eval()


def lora_parameter_groups(module: nn.Module) -> dict[int, list[str]]:
    """LoRA's parameter names of an injected module, grouped by the fan-in of the adapted matrix (the kernel scale
    of :func:`lora_kernel_scale` depends on it)."""
    groups: dict[int, list[str]] = {}
    for name, layer in module.named_modules():
        if hasattr(layer, "lora_B") and hasattr(layer, "base_layer") and isinstance(layer.base_layer, nn.Linear):
            for key in layer.lora_A:
                groups.setdefault(layer.base_layer.in_features, []).extend(
                    [f"{name}.lora_A.{key}.weight", f"{name}.lora_B.{key}.weight"])
    return groups


def scaled_lora_kernel(f, module: nn.Module, x, rank: int, alpha: float, **ntk_options) -> torch.Tensor:
    """sum over adapted matrices m of K_LoRA,m / (s^2 r sigma_m^2) (:func:`lora_kernel_scale`) at LoRA's
    initialisation, as a flat (N*C, N*C) float64 matrix; ``f(params, x)`` is the model function of ``module``
    (LoRA injected), ``ntk_options`` go to :func:`theory.ntk.empirical_ntk`."""
    from theory.ntk import empirical_ntk

    params = {k: v.detach() for k, v in module.named_parameters()}
    total = None
    for fan_in, names in sorted(lora_parameter_groups(module).items()):
        k = empirical_ntk(f, params, x, params_subset=names, **ntk_options).matrix()
        k = k / lora_kernel_scale(rank, alpha, fan_in)
        total = k if total is None else total + k
    if total is None:
        raise ValueError("scaled_lora_kernel: the module has no LoRA layer")
    return total


def lora_rank_rows(f_of: Callable[[nn.Module], Callable], module: nn.Module, x, ranks: Sequence[int],
                   seeds: Sequence[int], targets: Sequence[str], alpha: float = 16.0, scope: str = "",
                   **ntk_options) -> list[dict]:
    """Per (rank, seed): the scaled LoRA kernel against the eNTK of the adapted weights (relative Frobenius error
    and Fort et al.'s scale-free distance) and against the eNTK of all parameters (Malladi et al. 2023, Sec. 7).

    Args:
        f_of: ``module -> f(params, x)``, the model function of a module (e.g. a functional call of it).
        module: the classifier at theta_0 (no LoRA); ``scope``: the sub-module LoRA goes into.
    """
    from theory.metrics import kernel_distance, relative_distance
    from theory.ntk import empirical_ntk

    params = {k: v.detach() for k, v in module.named_parameters()}
    inner = module.get_submodule(scope) if scope else module
    prefix = f"{scope}." if scope else ""
    weights = [f"{prefix}{n}.weight" for n in lora_target_names(inner, targets)]
    if not weights:
        raise ValueError(f"lora_rank_rows: no nn.Linear matches {list(targets)}")
    f = f_of(module)
    k_w = empirical_ntk(f, params, x, params_subset=weights, **ntk_options).matrix()
    k_all = empirical_ntk(f, params, x, **ntk_options).matrix()
    rows = []
    for r in ranks:
        for s in seeds:
            lora = inject_lora(module, r, alpha, targets, s, scope)
            k = scaled_lora_kernel(f_of(lora), lora, x, r, alpha, **ntk_options)
            rows.append({"rank": r, "seed": s, "rel_error": relative_distance(k, k_w),
                         "kernel_distance": kernel_distance(k, k_w), "kernel_distance_full": kernel_distance(k, k_all),
                         "weights_share": float(torch.trace(k_w) / torch.trace(k_all))})
    return rows
