"""Downstream adaptation of a frozen pretrained model (Wei, Xie & Ma 2021, Sections 3-5).

* Head tuning: a linear head on the mask-position output G_0(x) (the model's distribution over x_0 given
  ``[MASK, x_1..T]``), fitted by logistic regression; the L2 strength is chosen on a validation split.
* Prompt tuning: k trainable soft prompt vectors in the model's k prompt slots (``[p_1..p_k, MASK,
  x_1..T]``), the model frozen, the same kind of linear head on the prompted G_0; prompt and head trained
  jointly with Adam on the logistic loss; the state with the best validation accuracy is kept. Two starts
  (``TuningConfig.prompt_init``):

  - ``"mask"``: the prompt at the ``[MASK]`` embedding (the empty slots of pretraining and head tuning) and
    the head at the head-tuning solution: the search starts exactly from head tuning.
  - ``"token"``: a discrete search first. Each real token v (and ``[MASK]``) is put in the slot next to
    x_0 -- in the theory, a prompt token x_{-1} = v with likelihood vector u = W^T e_v -- a head is fitted
    on the prompted G_0, and the candidate with the best validation accuracy is the start. ``[MASK]`` is a
    candidate, so this start is never worse on validation than head tuning. The slot held real tokens in
    pretraining, so these are the prompts whose effect the model has been taught; gradient steps from a
    token start stay near inputs it has seen, where a soft vector far from every embedding need not.
* Attention head (memory HMM): softmax attention over per-position outputs G_t(x) (keys from log G_t,
  values G_t), a linear read-out of the pooled values.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from simulate.wei2021.models import SmallTransformer, leave_one_out_probs, mask_logits, mask_probs
from theory.wei2021 import accuracy, fit_logistic_head

__all__ = [
    "TuningConfig",
    "head_tuning",
    "prompt_tuning",
    "AttentionHead",
    "fit_attention_head",
    "attention_tuning",
]


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Hyper-parameters of downstream tuning.

    Attributes:
        head_l2_grid: L2 strengths tried for the logistic head (chosen on validation accuracy).
        prompt_steps, prompt_batch, prompt_lr, head_lr: Adam on the prompt and the head.
        prompt_init: ``"mask"`` (start from head tuning) or ``"token"`` (start from the best real token in
            the slot next to x_0, chosen on validation accuracy; see the module docstring).
        eval_every: validation accuracy is checked every this many steps (best state kept).
        attention_steps, attention_heads, attention_lr: the attention head (full-batch Adam).
    """

    head_l2_grid: tuple[float, ...] = (1e-6, 1e-4, 1e-2)
    prompt_steps: int = 300
    prompt_batch: int = 128
    prompt_lr: float = 1e-2
    head_lr: float = 1e-2
    prompt_init: str = "mask"
    eval_every: int = 25
    attention_steps: int = 400
    attention_heads: int = 4
    attention_lr: float = 5e-2

    def __post_init__(self) -> None:
        if self.prompt_init not in ("mask", "token"):
            raise ValueError(f"prompt_init must be 'mask' or 'token', got {self.prompt_init!r}")


def _tensor(x: np.ndarray, device: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), device=device)


def head_tuning(model: SmallTransformer, train, val, test, cfg: TuningConfig, device: str = "cpu") -> dict:
    """Linear head on the frozen model's G_0. ``train``/``val``/``test`` have ``.observed`` (N, T) and
    ``.labels`` (N,) (e.g. :class:`simulate.wei2021.oracles.DownstreamData`).

    Returns:
        dict with train/val/test accuracy, the chosen l2, the head (weight, bias) and the train features'
        mean/std (used to initialise prompt tuning).
    """
    feats = [mask_probs(model, _tensor(d.observed, device)).cpu().double().numpy() for d in (train, val, test)]
    best = None
    for l2 in cfg.head_l2_grid:
        head = fit_logistic_head(feats[0], train.labels, l2=l2)
        val_acc = accuracy(head.scores(feats[1]), val.labels)
        if best is None or val_acc > best[0]:
            best = (val_acc, l2, head)
    val_acc, l2, head = best
    return {"train_accuracy": accuracy(head.scores(feats[0]), train.labels), "val_accuracy": val_acc,
            "test_accuracy": accuracy(head.scores(feats[2]), test.labels), "l2": l2, "head": head,
            "train_features": feats[0]}


def prompt_tuning(model: SmallTransformer, train, val, test, cfg: TuningConfig, seed: int,
                  head_init: dict | None = None, device: str = "cpu", progress: bool = False) -> dict:
    """Soft prompt + linear head on the prompted G_0, model frozen (see the module docstring).

    Args:
        head_init: the :func:`head_tuning` result to start the head from (computed here if None).
    """
    k = model.config.prompt_slots
    if k < 1:
        raise ValueError("prompt tuning needs a model pretrained with prompt_slots >= 1")
    if head_init is None:
        head_init = head_tuning(model, train, val, test, cfg, device)
    gen = torch.Generator().manual_seed(int(seed))
    mask_vec = model.tok.weight[model.config.mask_id].detach()
    if cfg.prompt_init == "token":
        start, feats, h, init = _token_start(model, train, val, test, head_init, device)
    else:
        start, feats, h = mask_vec.expand(k, -1).clone(), head_init["train_features"], head_init["head"]
        init = {"init_token": MASK_TOKEN, "init_val_accuracy": head_init["val_accuracy"],
                "init_test_accuracy": head_init["test_accuracy"]}
    mean = torch.as_tensor(feats.mean(0), dtype=torch.float32, device=device)
    scale = torch.as_tensor(np.where(feats.std(0) > 1e-8, feats.std(0), 1.0), dtype=torch.float32, device=device)
    # The head acts on standardised features z = (G - mean) / scale: w_z = w * scale, b_z = b + w . mean.
    w = torch.nn.Parameter(torch.as_tensor(h.weight, dtype=torch.float32, device=device) * scale)
    b = torch.nn.Parameter(torch.tensor(h.bias + float(h.weight @ feats.mean(0)), dtype=torch.float32, device=device))
    # A little noise breaks the symmetry between slots; at 1% of the [MASK] embedding's scale the start is
    # the chosen start (head tuning, or the best token) up to that perturbation.
    noise = 0.01 * mask_vec.norm() / mask_vec.numel() ** 0.5 * torch.randn(k, mask_vec.numel(), generator=gen).to(device)
    prompt = torch.nn.Parameter(start + noise)
    opt = torch.optim.Adam([{"params": [prompt], "lr": cfg.prompt_lr}, {"params": [w, b], "lr": cfg.head_lr}])
    X = {k: _tensor(d.observed, device) for k, d in (("train", train), ("val", val), ("test", test))}
    Y = {k: torch.as_tensor(d.labels, dtype=torch.float32, device=device) for k, d in
         (("train", train), ("val", val), ("test", test))}

    def scores(x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(mask_logits(model, x, prompt), -1)
        return ((p - mean) / scale) @ w + b

    def acc(split: str) -> float:
        with torch.no_grad():
            out = torch.cat([scores(X[split][i:i + 1024]) for i in range(0, len(X[split]), 1024)])
        return float(((out >= 0).float() == Y[split]).float().mean())

    best = (acc("val"), 0, prompt.detach().clone(), w.detach().clone(), b.detach().clone())
    N = len(X["train"])
    from ftsim.core.progress import bar as tqdm

    for step in tqdm(range(1, cfg.prompt_steps + 1), desc="prompt tuning", disable=not progress, leave=False):
        idx = torch.randint(0, N, (min(cfg.prompt_batch, N),), generator=gen).to(device)
        loss = F.binary_cross_entropy_with_logits(scores(X["train"][idx]), Y["train"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.prompt_steps:
            v = acc("val")
            if v > best[0]:
                best = (v, step, prompt.detach().clone(), w.detach().clone(), b.detach().clone())
    val_acc, best_step, p_best, w_best, b_best = best
    with torch.no_grad():
        prompt.copy_(p_best)
        w.copy_(w_best)
        b.copy_(b_best)
    return {"train_accuracy": acc("train"), "val_accuracy": val_acc, "test_accuracy": acc("test"),
            "best_step": best_step, "prompt_norm": float(p_best.norm()), "mask_norm": float(mask_vec.norm()),
            "prompt_init": cfg.prompt_init, **init}


MASK_TOKEN = -1  # ``init_token`` of a start at the [MASK] embedding (as ``simulate.inference.MASK``)


def _token_start(model: SmallTransformer, train, val, test, head_init: dict, device: str):
    """The discrete start of ``prompt_init="token"``: every real token v in the slot next to x_0 (the other
    slots ``[MASK]``) and ``[MASK]`` itself, each with a logistic head (head tuning's L2) on its prompted
    G_0; the best validation accuracy wins (ties go to ``[MASK]``, then to the smaller id).

    Returns:
        (start (k, d) prompt embeddings, the winner's train features (N, n), its head, a record with
        ``init_token`` (-1 for ``[MASK]``), ``init_val_accuracy``, ``init_test_accuracy``).
    """
    k, mask_id = model.config.prompt_slots, model.config.mask_id
    best = (head_init["val_accuracy"], mask_id, head_init["train_features"], head_init["head"])
    for v in range(model.config.vocab_size):
        prompt = model.tok.weight[[mask_id] * (k - 1) + [v]].detach()  # (k, d)
        f_tr, f_va = (mask_probs(model, _tensor(d.observed, device), prompt).cpu().double().numpy()
                      for d in (train, val))
        head = fit_logistic_head(f_tr, train.labels, l2=head_init["l2"])
        val_acc = accuracy(head.scores(f_va), val.labels)
        if val_acc > best[0]:
            best = (val_acc, v, f_tr, head)
    val_acc, v, f_tr, head = best
    start = model.tok.weight[[mask_id] * (k - 1) + [v]].detach().clone()
    if v == mask_id:
        test_acc = head_init["test_accuracy"]
    else:
        f_te = mask_probs(model, _tensor(test.observed, device), start).cpu().double().numpy()
        test_acc = accuracy(head.scores(f_te), test.labels)
    return start, f_tr, head, {"init_token": MASK_TOKEN if v == mask_id else int(v), "init_val_accuracy": val_acc,
                               "init_test_accuracy": test_acc}


class AttentionHead(nn.Module):
    """Attention pooling over per-position output distributions, then a linear read-out.

    For features F (B, T, n) (rows are distributions): head j scores position t by a_{tj} = k_j^T log F_t
    + c_j, pools v_j = sum_t softmax_t(a_{.j}) F_t, and the logit is r^T [v_1; ...; v_H] + r_0. With a
    constant key this is the average of the per-position outputs; a key can pick the positions whose
    output reveals the memory value (those whose syntax state is known), which is how the memory-HMM
    theorem reads P(M | x) off G_t linearly.
    """

    def __init__(self, vocab_size: int, num_heads: int = 4):
        super().__init__()
        self.key = nn.Linear(vocab_size, num_heads)
        self.readout = nn.Linear(num_heads * vocab_size, 1)
        nn.init.zeros_(self.key.weight)  # start from uniform attention (the average output)
        nn.init.zeros_(self.key.bias)

    def forward(self, feats: torch.Tensor, log_feats: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B,) for features (B, T, n); ``log_feats`` = log(feats) may be passed precomputed."""
        B, T, n = feats.shape
        if log_feats is None:
            log_feats = torch.log(feats.clamp_min(1e-6))
        att = torch.softmax(self.key(log_feats), dim=1)  # (B, T, H), softmax over T
        pooled = torch.einsum("bth,btn->bhn", att, feats)  # (B, H, n)
        return self.readout(pooled.reshape(B, -1)).squeeze(-1)


def fit_attention_head(F_train: np.ndarray, y_train: np.ndarray, F_test: np.ndarray, y_test: np.ndarray,
                       *, F_val: np.ndarray | None = None, y_val: np.ndarray | None = None, steps: int = 400,
                       num_heads: int = 4, lr: float = 5e-2, seed: int = 0, eval_every: int = 25) -> dict:
    """Full-batch Adam on the logistic loss of an :class:`AttentionHead` (float32, CPU).

    Features are per-position distributions (B, T, n). With a validation split the state with the best
    validation accuracy is kept; otherwise the final one.
    """
    torch.manual_seed(int(seed))
    head = AttentionHead(F_train.shape[-1], num_heads)
    Xtr = torch.tensor(np.asarray(F_train, dtype=np.float32))
    logXtr = torch.log(Xtr.clamp_min(1e-6))
    ytr = torch.tensor(np.asarray(y_train, dtype=np.float32))
    opt = torch.optim.Adam(head.parameters(), lr=lr)

    def acc(Fx: np.ndarray, y: np.ndarray) -> float:
        with torch.no_grad():
            return accuracy(head(torch.tensor(np.asarray(Fx, dtype=np.float32))).numpy(), y)

    best = None
    for step in range(1, steps + 1):
        loss = F.binary_cross_entropy_with_logits(head(Xtr, logXtr), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if F_val is not None and (step % eval_every == 0 or step == steps):
            v = acc(F_val, y_val)
            if best is None or v > best[0]:
                best = (v, {k: t.clone() for k, t in head.state_dict().items()})
    if best is not None:
        head.load_state_dict(best[1])
    return {"train_accuracy": acc(F_train, y_train), "test_accuracy": acc(F_test, y_test),
            "val_accuracy": None if best is None else best[0], "head": head}


def attention_tuning(model: SmallTransformer, train, val, test, cfg: TuningConfig, seed: int,
                     device: str = "cpu", positions: list[int] | None = None) -> dict:
    """Attention head on the frozen masked LM's per-position outputs G_t(x) (leave-one-out, one masked
    position per pass) of the inputs x_1..T."""
    feats = [leave_one_out_probs(model, _tensor(d.observed, device), positions).cpu().double().numpy()
             for d in (train, val, test)]
    fit = fit_attention_head(feats[0], train.labels, feats[2], test.labels, F_val=feats[1], y_val=val.labels,
                             steps=cfg.attention_steps, num_heads=cfg.attention_heads, lr=cfg.attention_lr,
                             seed=seed)
    return {k: v for k, v in fit.items() if k != "head"}
