"""Linear algebra of head and prompt tuning on top of exact conditional probabilities (Wei, Xie & Ma 2021,
"Why Do Pretrained Language Models Help in Downstream Tasks? An Analysis of Head and Prompt Tuning").

Notation. ``emit`` is the (m, n) emission matrix E = W^T of an HMM with m hidden states and n tokens (the paper
writes W in R^{n x m}). A pretrained masked LM's output at a masked position 0 is

    G_0(x) = W P(H_0 | x)            (ours: ``G = P @ emit``, shapes (N, m) @ (m, n) -> (N, n)),

and the downstream label is y = 1[mu^T P(H_0 | x) >= 0] for a sparse mu in R^m.

* Head tuning fits a linear head on G_0. If W has full column rank (``rank(emit) == m``, needs m <= n), then
  P = G_0 W^{+T} and the head b = W^{+T} mu scores exactly mu^T P: 100% accuracy (:func:`head_certificate`).
  Any head computes b^T W^T P = (E b)^T P, a functional in range(E); if mu has a component in null(E^T) the
  head can fail.
* Prompt tuning adds a prompt whose likelihood vector u >= 0 reweights the posterior (:func:`reweight`):
  P_u = (P * w) / <P, w> with w = R u, R a row-stochastic *prompt kernel* (m, k). With R = I (the prompt is a
  second, soft observation of H_0) and u = 1_A, A = supp(mu), the reweighted posterior lives on A, and if W_A
  (the columns of W in A; ours ``emit[A]``) has full column rank the head b = W_A^{+T} mu_A recovers the sign
  of mu^T P (:func:`prompt_certificate`), even when W itself is rank deficient. With the prompt one position
  before H_0 in a stationary chain, R is the time reversal of the transition matrix
  (:func:`reversal_kernel`), which can only reweight through the transitions.
* u = const gives w = const (R is row-stochastic), so prompt tuning contains head tuning.

Everything here is model-agnostic (numpy, scipy, torch); nothing imports the rest of the project.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import optimize

__all__ = [
    "NonDegeneracy",
    "nondegeneracy",
    "support",
    "head_certificate",
    "prompt_certificate",
    "reweight",
    "stationary_distribution",
    "reversal_kernel",
    "LinearHead",
    "fit_logistic_head",
    "hard_margin",
    "accuracy",
    "bayes_ceiling",
    "PromptOracleResult",
    "prompt_oracle",
    "TokenPromptResult",
    "token_prompt_oracle",
    "prompted_features",
    "head_oracle",
    "total_variation",
    "summarize",
]


# ---------------------------------------------------------------------------------------------------------
# Non-degeneracy diagnostics
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NonDegeneracy:
    """Rank diagnostics of W (the paper's non-degeneracy conditions).

    Attributes:
        num_states, vocab_size: m and n.
        support: indices of supp(mu) (sorted).
        rank_W: numerical rank of W (= of ``emit``), at most min(m, n).
        sigma_min_W: the m-th largest singular value of W (0 when m > n): W has full column rank iff > 0.
        rank_WA, sigma_min_WA: the same for W restricted to the columns in supp(mu) (ours: ``emit[A]``).
    """

    num_states: int
    vocab_size: int
    support: tuple[int, ...]
    rank_W: int
    sigma_min_W: float
    rank_WA: int
    sigma_min_WA: float

    @property
    def head_condition(self) -> bool:
        """W has full column rank (the head-tuning non-degeneracy condition)."""
        return self.rank_W == self.num_states

    @property
    def prompt_condition(self) -> bool:
        """W restricted to supp(mu) has full column rank (the weaker prompt-tuning condition)."""
        return self.rank_WA == len(self.support)

    def row(self) -> dict:
        return {**dataclasses.asdict(self), "support": list(self.support),
                "head_condition": self.head_condition, "prompt_condition": self.prompt_condition}


def support(mu: np.ndarray, atol: float = 0.0) -> np.ndarray:
    """Indices of the non-zero entries of mu."""
    return np.flatnonzero(np.abs(np.asarray(mu)) > atol)


def _rank_and_sigma_min(mat: np.ndarray, cols: int, rtol: float) -> tuple[int, float]:
    """Rank of ``mat`` (rows = the m columns of W) and its ``cols``-th singular value (0 if fewer)."""
    if mat.size == 0:
        return 0, 0.0
    s = np.linalg.svd(mat, compute_uv=False)
    rank = int(np.sum(s > rtol * max(mat.shape) * s[0])) if s[0] > 0 else 0
    return rank, float(s[cols - 1]) if cols <= len(s) else 0.0


def nondegeneracy(emit: np.ndarray, mu: np.ndarray | None = None, rtol: float = 1e-10) -> NonDegeneracy:
    """Rank and smallest singular value of W and of W restricted to supp(mu).

    Args:
        emit: (m, n) emission matrix (W^T).
        mu: (m,) task vector; None means supp(mu) = all states.
        rtol: singular values below ``rtol * max(m, n) * sigma_max`` count as zero (numpy's matrix_rank rule).
    """
    emit = np.asarray(emit, dtype=np.float64)
    m, n = emit.shape
    A = np.arange(m) if mu is None else support(mu)
    rank_W, smin_W = _rank_and_sigma_min(emit, m, rtol)
    rank_A, smin_A = _rank_and_sigma_min(emit[A], len(A), rtol)
    return NonDegeneracy(m, n, tuple(int(a) for a in A), rank_W, smin_W, rank_A, smin_A)


# ---------------------------------------------------------------------------------------------------------
# Constructive heads (the theorems' certificates)
# ---------------------------------------------------------------------------------------------------------


def head_certificate(emit: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """The head b = W^{+T} mu (ours ``pinv(emit) @ mu``, shape (n,)) of the head-tuning theorem.

    If ``rank(emit) == m`` then ``emit @ pinv(emit) = I_m`` so ``G_0 @ b = P @ emit @ pinv(emit) @ mu =
    mu^T P`` for every input: the head scores exactly the label's linear function.
    """
    return np.linalg.pinv(np.asarray(emit, dtype=np.float64)) @ np.asarray(mu, dtype=np.float64)


def prompt_certificate(emit: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The prompt u = 1_A and head b = W_A^{+T} mu_A of the prompt-tuning theorem (kernel R = I).

    With u = 1_A the reweighted posterior is P_u = P_A / <1, P_A> on A (zero elsewhere), so
    ``G_0^u @ b = P_u,A @ emit[A] @ pinv(emit[A]) @ mu_A = mu^T P / <1, P_A>`` when ``emit[A]`` has full row
    rank |A| (W_A full column rank): the same sign as mu^T P.

    Returns:
        u: (m,) the indicator of supp(mu).
        b: (n,) the head.
    """
    emit = np.asarray(emit, dtype=np.float64)
    mu = np.asarray(mu, dtype=np.float64)
    A = support(mu)
    u = np.zeros(emit.shape[0])
    u[A] = 1.0
    return u, np.linalg.pinv(emit[A]) @ mu[A]


# ---------------------------------------------------------------------------------------------------------
# Prompts as reweightings of the posterior over H_0
# ---------------------------------------------------------------------------------------------------------


def reweight(post: np.ndarray, w: np.ndarray) -> np.ndarray:
    """P_u = (P * w) / <P, w> row-wise: the posterior over H_0 after a prompt whose effect on H_0 is the
    likelihood vector w = R u. Rows with <P, w> = 0 (the prompt rules out every state the input allows) are
    returned as NaN.

    Args:
        post: (N, m) posteriors P(H_0 | x).
        w: (m,) or (N, m) non-negative weights.
    """
    post = np.asarray(post, dtype=np.float64)
    num = post * np.asarray(w, dtype=np.float64)
    z = num.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(z > 0, num / z, np.nan)


def stationary_distribution(trans: np.ndarray) -> np.ndarray:
    """pi with pi^T T = pi^T, pi >= 0, sum 1 (the left eigenvector of eigenvalue 1; for a reducible chain
    one of the stationary distributions)."""
    trans = np.asarray(trans, dtype=np.float64)
    vals, vecs = np.linalg.eig(trans.T)
    k = int(np.argmin(np.abs(vals - 1.0)))
    pi = np.abs(np.real(vecs[:, k]))
    return pi / pi.sum()


def reversal_kernel(trans: np.ndarray, prior: np.ndarray | None = None) -> np.ndarray:
    """The prompt kernel of a prompt one position *before* H_0 in a chain at distribution ``prior``.

    Derivation. Put the prompt at position -1 with H_{-1} ~ prior and H_0 | H_{-1} ~ T. The prompt's
    likelihood vector is u_{h'} = P(prompt | H_{-1} = h'). With q = prior^T T the marginal of H_0,

        P(H_0 = h | prompt, x)  ∝  sum_{h'} prior_{h'} u_{h'} T_{h'h} * P(x_{1:T} | H_0 = h)
                                ∝  P(H_0 = h | x) * (R u)_h,   R_{h h'} = prior_{h'} T_{h'h} / q_h,

    where P(H_0 | x) is the posterior under the prior q for H_0. R is row-stochastic (the time reversal of
    T). When ``prior`` is stationary (default) q = prior, so the unprompted posterior is the one the chain
    itself gives.

    Returns:
        (m, m) row-stochastic R.
    """
    trans = np.asarray(trans, dtype=np.float64)
    prior = stationary_distribution(trans) if prior is None else np.asarray(prior, dtype=np.float64)
    q = prior @ trans
    with np.errstate(invalid="ignore", divide="ignore"):
        R = (prior[None, :] * trans.T) / q[:, None]  # R[h, h'] = prior[h'] T[h', h] / q[h]
    R[~np.isfinite(R)] = 0.0
    rows = R.sum(axis=1)
    R[rows == 0] = 1.0 / R.shape[1]  # unreachable H_0 states: any distribution (they have posterior 0)
    return R


# ---------------------------------------------------------------------------------------------------------
# Linear heads
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """score(x) = x @ weight + bias; predicted label 1[score >= 0]."""

    weight: np.ndarray
    bias: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, dtype=np.float64) @ self.weight + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        return (self.scores(features) >= 0).astype(np.int64)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of 1[score >= 0] == label."""
    return float(np.mean((np.asarray(scores) >= 0).astype(np.int64) == np.asarray(labels)))


def _standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    return (x - mean) / scale, mean, scale


def fit_logistic_head(features: np.ndarray, labels: np.ndarray, l2: float = 1e-6, max_iter: int = 500,
                      tol: float = 1e-9) -> LinearHead:
    """L2-regularised logistic regression (L-BFGS), features standardised internally.

    Minimises mean_i log(1 + exp(-s_i (w^T z_i + b))) + l2/2 |w|^2 over the standardised features z, s = 2y-1;
    the returned head acts on the raw features. With a tiny ``l2`` and separable data it approaches the
    max-margin direction (its norm grows until ``max_iter``).
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"features must be (N, d) and labels (N,); got {x.shape} and {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1")
    z, mean, scale = _standardize(x)
    s = 2.0 * y - 1.0
    d = z.shape[1]

    def fun(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:d], theta[d]
        margin = s * (z @ w + b)
        loss = np.logaddexp(0.0, -margin).mean() + 0.5 * l2 * w @ w
        g = -s * 0.5 * (1.0 - np.tanh(0.5 * margin))  # d loss_i / d score_i = -s sigmoid(-margin)
        grad = np.concatenate([z.T @ g / len(s) + l2 * w, [g.mean()]])
        return float(loss), grad

    res = optimize.minimize(fun, np.zeros(d + 1), jac=True, method="L-BFGS-B",
                            options={"maxiter": max_iter, "gtol": tol, "ftol": 1e-15})
    w, b = res.x[:d] / scale, res.x[d] - (res.x[:d] / scale) @ mean
    return LinearHead(w, float(b))


def hard_margin(features: np.ndarray, labels: np.ndarray) -> tuple[float, LinearHead]:
    """The largest margin t of a linear separator with |w|_inf <= 1 on standardised features (an LP).

        max t  s.t.  s_i (w^T z_i + b) >= t,  -1 <= w_j <= 1,  t <= 1.

    t > 0 iff the data are strictly linearly separable, i.e. some linear head has 100% accuracy on them;
    t <= 0 certifies that *no* linear head does (HiGHS solves it to ~1e-9).

    Returns:
        (t, head): the optimal margin and the separating head on the raw features.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    z, mean, scale = _standardize(x)
    s = 2.0 * y - 1.0
    N, d = z.shape
    # variables: w (d), b, t ; minimise -t ; constraint -s_i (z_i w + b) + t <= 0
    c = np.zeros(d + 2)
    c[-1] = -1.0
    A = np.hstack([-s[:, None] * z, -s[:, None], np.ones((N, 1))])
    bounds = [(-1.0, 1.0)] * d + [(None, None), (None, 1.0)]
    res = optimize.linprog(c, A_ub=A, b_ub=np.zeros(N), bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"hard_margin LP failed: {res.message}")
    w, b, t = res.x[:d], res.x[d], res.x[d + 1]
    return float(t), LinearHead(w / scale, float(b - (w / scale) @ mean))


def bayes_ceiling(features: np.ndarray, probs: np.ndarray, labels: np.ndarray, decimals: int = 10) -> float:
    """The best accuracy of *any* function of the features, over a finite, exactly weighted input set.

    Inputs whose features agree to ``decimals`` places form one group; a head must give the whole group one
    label, so the best it can do is sum_groups max(P(group, y=1), P(group, y=0)).

    Args:
        features: (N, d) feature of each input (e.g. the exact G_0 of every sequence of length T).
        probs: (N,) the probability of each input (need not be normalised).
        labels: (N,) 0/1 labels.
    """
    keys = np.round(np.asarray(features, dtype=np.float64), decimals) + 0.0  # + 0.0 folds -0.0 into 0.0
    _, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    pos = np.bincount(group, weights=probs * (labels == 1))
    neg = np.bincount(group, weights=probs * (labels == 0))
    return float(np.maximum(pos, neg).sum() / probs.sum())


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise total-variation distance (1/2) sum_v |p_v - q_v|."""
    return 0.5 * np.abs(np.asarray(p, dtype=np.float64) - np.asarray(q, dtype=np.float64)).sum(axis=-1)


# ---------------------------------------------------------------------------------------------------------
# The prompt-tuning oracle: optimise u jointly with the head on exact posteriors
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PromptOracleResult:
    """Best prompt found by :func:`prompt_oracle`.

    Attributes:
        u: (k,) the prompt's likelihood vector (max entry 1).
        head: the linear head on the prompted G_0.
        train_accuracy, test_accuracy: accuracies of 1[head(G_0^u) >= 0].
        restart: which initialisation won (0 = u const, the head-tuning solution).
    """

    u: np.ndarray
    head: LinearHead
    train_accuracy: float
    test_accuracy: float
    restart: int


def prompted_features(post: np.ndarray, emit: np.ndarray, kernel: np.ndarray, u: np.ndarray) -> np.ndarray:
    """G_0^u = P_u @ emit with P_u = reweight(P, R u): (N, n)."""
    return reweight(post, np.asarray(kernel) @ np.asarray(u)) @ np.asarray(emit)


def prompt_oracle(
    post_train: np.ndarray,
    y_train: np.ndarray,
    post_test: np.ndarray,
    y_test: np.ndarray,
    emit: np.ndarray,
    kernel: np.ndarray | None = None,
    *,
    restarts: int = 4,
    steps: int = 300,
    l2: float = 1e-6,
    seed: int = 0,
) -> PromptOracleResult:
    """Jointly optimise the prompt u >= 0 and a linear head on exact prompted outputs G_0^u.

    Parametrisation u = softmax(theta) * k (positive, scale-free since reweighting ignores the scale), head
    on standardised features; loss = logistic + l2. L-BFGS (torch, float64) from ``restarts``
    initialisations: restart 0 starts at u = const with the head-tuning solution (so the search contains head
    tuning); the others start from random u. Selection is by training accuracy (ties: training loss), never
    by test accuracy.

    Args:
        post_train, post_test: (N, m) exact posteriors P(H_0 | x).
        y_train, y_test: (N,) labels.
        emit: (m, n) emissions.
        kernel: (m, k) prompt kernel R (default identity: the prompt reweights H_0 directly).
    """
    import torch

    emit = np.asarray(emit, dtype=np.float64)
    m = emit.shape[0]
    kernel = np.eye(m) if kernel is None else np.asarray(kernel, dtype=np.float64)
    k = kernel.shape[1]
    gen = torch.Generator().manual_seed(int(seed))
    P = torch.tensor(np.asarray(post_train, dtype=np.float64))
    s = torch.tensor(2.0 * np.asarray(y_train, dtype=np.float64) - 1.0)
    E = torch.tensor(emit)
    R = torch.tensor(kernel)
    G_plain = np.asarray(post_train) @ emit
    mean = torch.as_tensor(G_plain.mean(0))
    scale = torch.as_tensor(np.where(G_plain.std(0) > 1e-12, G_plain.std(0), 1.0))

    def feats(theta: "torch.Tensor", post: "torch.Tensor") -> "torch.Tensor":
        w = R @ (torch.softmax(theta, 0) * k)
        pu = post * w
        pu = pu / pu.sum(1, keepdim=True).clamp_min(1e-300)
        return (pu @ E - mean) / scale

    head0 = fit_logistic_head(G_plain, y_train, l2=l2)
    best = None
    for r in range(max(1, restarts)):
        theta = (torch.zeros(k, dtype=torch.float64) if r == 0
                 else 2.0 * torch.randn(k, generator=gen, dtype=torch.float64)).requires_grad_(True)
        w0 = torch.as_tensor(head0.weight) * scale  # the head-tuning solution in standardised coordinates
        b0 = torch.tensor(head0.bias, dtype=torch.float64) + (torch.as_tensor(head0.weight) * mean).sum()
        w = w0.clone().requires_grad_(True)
        b = b0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta, w, b], lr=1.0, max_iter=steps, tolerance_grad=1e-12,
                                tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            margin = s * (feats(theta, P) @ w + b)
            loss = torch.nn.functional.softplus(-margin).mean() + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            margin = s * (feats(theta, P) @ w + b)
            loss = float(torch.nn.functional.softplus(-margin).mean() + 0.5 * l2 * (w * w).sum())
            train_acc = float(((feats(theta, P) @ w + b >= 0).double() == (s > 0).double()).double().mean())
        key = (train_acc, -loss)
        if best is None or key > best[0]:
            best = (key, r, theta.detach().clone(), w.detach().clone(), b.detach().clone())
    _, r, theta, w, b = best
    u = (torch.softmax(theta, 0) * k).numpy()
    u = u / u.max()
    weight = (w / scale).numpy()
    head = LinearHead(weight, float(b - (w / scale * mean).sum()))
    train_acc = accuracy(head.scores(prompted_features(post_train, emit, kernel, u)), y_train)
    test_acc = accuracy(head.scores(prompted_features(post_test, emit, kernel, u)), y_test)
    return PromptOracleResult(u, head, train_acc, test_acc, r)


@dataclasses.dataclass(frozen=True)
class TokenPromptResult:
    """Best real-token prompt found by :func:`token_prompt_oracle`.

    Attributes:
        token: the prompt token v, or None when no token beats the plain head (u = const).
        head: the linear head on the prompted G_0.
        train_accuracy, test_accuracy: accuracies of 1[head(G_0^u) >= 0] with u = W^T e_v.
    """

    token: int | None
    head: LinearHead
    train_accuracy: float
    test_accuracy: float


def token_prompt_oracle(post_train: np.ndarray, y_train: np.ndarray, post_test: np.ndarray, y_test: np.ndarray,
                        emit: np.ndarray, kernel: np.ndarray | None = None, l2: float = 1e-6) -> TokenPromptResult:
    """The prompt restricted to *real tokens*: an observed token v at the prompt position has likelihood
    vector u_h = P(X = v | H = h) = ``emit[h, v]`` (u = W^T e_v), which reweights H_0 by R u.

    Every v (and u = const, i.e. head tuning) gets a logistic head on G_0^u; the one with the best training
    accuracy wins (ties: head tuning, then the smaller v) -- no test data in the choice. This is the prompt a
    masked LM can be taught exactly in pretraining (the slot holds real tokens), the discrete counterpart of
    :func:`prompt_oracle`, and a lower bound for it.

    Args:
        post_train, post_test: (N, m) exact posteriors P(H_0 | x).
        emit: (m, n) emissions.
        kernel: (m, m) prompt kernel R (default identity); with the reversal kernel u is a token at
            position -1.
    """
    emit = np.asarray(emit, dtype=np.float64)
    m, n = emit.shape
    kernel = np.eye(m) if kernel is None else np.asarray(kernel, dtype=np.float64)
    best = None
    for v in [None, *range(n)]:
        u = np.ones(m) if v is None else emit[:, v]
        f_tr = prompted_features(post_train, emit, kernel, u)
        if not np.all(np.isfinite(f_tr)):
            continue  # the token rules out every state some input allows
        head = fit_logistic_head(f_tr, y_train, l2=l2)
        acc = accuracy(head.scores(f_tr), y_train)
        if best is None or acc > best[0]:
            best = (acc, v, head)
    acc, v, head = best
    u = np.ones(m) if v is None else emit[:, v]
    test_acc = accuracy(head.scores(prompted_features(post_test, emit, kernel, u)), y_test)
    return TokenPromptResult(None if v is None else int(v), head, acc, test_acc)


def head_oracle(G_train: np.ndarray, y_train: np.ndarray, G_test: np.ndarray, y_test: np.ndarray,
                l2: float = 1e-6) -> tuple[LinearHead, float, float]:
    """Best linear head on exact G_0 (logistic regression on the training split).

    Returns:
        (head, train_accuracy, test_accuracy).
    """
    head = fit_logistic_head(G_train, y_train, l2=l2)
    return head, accuracy(head.scores(G_train), y_train), accuracy(head.scores(G_test), y_test)



def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (ddof=1 when n > 1), min and max of a list of accuracies."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}

