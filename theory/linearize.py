"""Kernel-behaviour diagnostics: does fine-tuning behave like its linearisation around theta_0?

* :func:`linearize` -- the first-order Taylor expansion f_lin(theta; x) = f(theta_0; x) + J(theta_0; x)(theta -
  theta_0), evaluated with one forward-mode pass (``torch.func.jvp``) and trainable by ordinary autograd.
* :func:`train` -- full-batch or mini-batch SGD / Adam / SignGD on a model function ``f(params, batch)``.
* :func:`linearization_report` -- trains f and f_lin from theta_0 on the same batches and reports the agreement of
  their outputs, their accuracies, the share of fine-tuning's gain over zero-shot recovered by the linearised
  model (Malladi et al. 2023, Sec. 6 "linearization" and Table 4), and the relative kernel movement
  ||K(theta_T) - K(theta_0)||_F / ||K(theta_0)||_F ("fixed features", Sec. 3 / Definition 3.2).

Everything takes a model function and parameter mappings (the eNTK engine's conventions), so the same code
runs on the synthetic MLPs and on real pretrained language models.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch

from theory.batching import Batch, ModelFn, batch_size_of, slice_batch
from theory.metrics import accuracy, kernel_rel_change
from theory.ntk import empirical_ntk, select_parameters
from theory.solvers import targets_from_labels

__all__ = ["linearize", "linearized_outputs", "train", "TrainResult", "loss_value", "LinearizationReport", "linearization_report"]

OPTIMIZERS = ("sgd", "adam", "signgd")
LOSSES = ("mse", "ce")


def linearized_outputs(f: ModelFn, params0: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor],
                       batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_lin(params; x), f(params0; x)) for the first-order Taylor expansion around ``params0``:

        f_lin(theta; x) = f(theta_0; x) + J(theta_0; x) (theta - theta_0)   (Malladi et al. 2023, Def. 3.2)

    with one forward-mode pass (``torch.func.jvp``); names of ``params0`` missing from ``params`` are taken at
    theta_0. Differentiable in ``params`` (the jvp is linear in the tangent)."""
    names = [k for k in params0 if k in params]
    tangent = {k: params[k] - params0[k] for k in names}
    const = {k: v for k, v in params0.items() if k not in tangent}

    def g(sub):
        return f({**const, **sub}, batch)

    out0, dout = torch.func.jvp(g, ({k: params0[k] for k in names},), (tangent,))
    return out0 + dout, out0


def linearize(f: ModelFn, params0: Mapping[str, torch.Tensor]) -> ModelFn:
    """The linearised model around ``params0``: ``f_lin(params, batch)`` (see :func:`linearized_outputs`), trainable
    by the same optimiser code as f."""
    p0 = {k: v.detach() for k, v in params0.items()}

    def f_lin(params: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return linearized_outputs(f, p0, params, batch)[0]

    return f_lin


def _targets(y: torch.Tensor, num_outputs: int) -> torch.Tensor:
    return targets_from_labels(y, num_outputs).to(y.device if isinstance(y, torch.Tensor) else "cpu")


def loss_value(out: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Mean loss over examples.

    ``"mse"``: 1/(2B) sum_i ||f(x_i) - y_i||^2 with y (B, C) targets or labels (one-hot / +-1);
    ``"ce"``: cross-entropy for C > 1 (integer labels), logistic loss log(1 + e^{-y f}) for C = 1.
    """
    if loss == "mse":
        target = y if (y.ndim == 2 and y.is_floating_point()) else _targets(y, out.shape[1])
        return 0.5 * ((out - target.to(out.dtype)) ** 2).sum() / out.shape[0]
    if loss == "ce":
        if out.shape[1] == 1:
            s = _targets(y, 1).to(out.dtype).reshape(-1)
            return torch.nn.functional.softplus(-s * out[:, 0]).mean()
        return torch.nn.functional.cross_entropy(out, y.long())
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


@dataclasses.dataclass
class TrainResult:
    """Trained parameters (detached, all names) and the training loss after every step."""

    params: dict[str, torch.Tensor]
    losses: list[float]


def train(f: ModelFn, params: Mapping[str, torch.Tensor], batches: Sequence[tuple[Batch, torch.Tensor]] | tuple,
          *, steps: int, lr: float, optimizer: str = "sgd", loss: str = "mse", params_subset=None,
          weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> TrainResult:
    """Train ``f`` from ``params`` for ``steps`` steps, cycling through ``batches`` in order.

    Args:
        f: model function ``f(params, batch) -> (B, C)`` (e.g. :func:`linearize`'s output).
        params: starting parameters (copied; the inputs are not modified).
        batches: a sequence of ``(x, y)`` mini-batches, cycled in order, or one ``(x, y)`` pair (full batch).
        steps: number of optimiser steps.
        lr: learning rate.
        optimizer: ``"sgd"`` (plain), ``"adam"`` (torch.optim.Adam) or ``"signgd"`` (theta -= lr sign(grad),
            the small-learning-rate limit of Adam studied by Malladi et al. 2023).
        loss: ``"mse"`` or ``"ce"`` (see :func:`loss_value`).
        params_subset: parameters to train (see :func:`theory.ntk.select_parameters`; boolean masks freeze the
            unselected entries); others stay fixed.
        weight_decay, betas, eps: passed to the optimiser.

    Returns:
        :class:`TrainResult`.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if isinstance(batches, tuple) and len(batches) == 2 and not isinstance(batches[0], tuple):
        batches = [batches]
    if not batches:
        raise ValueError("batches is empty")
    sel = select_parameters(params, params_subset)
    trainable = {k: params[k].detach().clone().requires_grad_(True) for k in sel.names}
    const = {k: v.detach() for k, v in params.items() if k not in trainable}
    masks = {}
    for k in sel.names:
        idx = sel.index[k]
        if idx is not None:
            m = torch.zeros(params[k].numel(), dtype=params[k].dtype, device=params[k].device)
            m[idx] = 1
            masks[k] = m.reshape(params[k].shape)
    leaves = list(trainable.values())
    opt = None
    if optimizer == "sgd":
        opt = torch.optim.SGD(leaves, lr=lr, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(leaves, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        value = loss_value(f({**const, **trainable}, x), y, loss)
        for p in leaves:
            p.grad = None
        value.backward()
        for k, m in masks.items():
            trainable[k].grad.mul_(m)
        if opt is not None:
            opt.step()
        else:
            with torch.no_grad():
                for k, p in trainable.items():
                    p.sub_(lr * (p.grad.sign() + weight_decay * p) * (masks[k] if k in masks else 1))
        losses.append(float(value.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training diverged at step {step}: loss {losses[-1]} (lr={lr} too large?)")
    out = {k: v.detach() for k, v in const.items()}
    out.update({k: v.detach() for k, v in trainable.items()})
    return TrainResult(params={k: out[k] for k in params}, losses=losses)


@dataclasses.dataclass
class LinearizationReport:
    """Fine-tuning vs its linearisation, evaluated on ``eval_data``.

    Attributes:
        acc_zero_shot, acc_finetuned, acc_linearized: accuracies of f(theta_0), f(theta_T), f_lin(theta_T^lin)
            (NaN for float regression targets).
        loss_zero_shot, loss_finetuned, loss_linearized: eval losses.
        gain_recovered: (acc_lin - acc_0) / (acc_ft - acc_0); NaN when fine-tuning gains nothing.
        output_distance: ||f_T - f_lin_T||_F / ||f_T - f_0||_F on the eval inputs (0: identical dynamics).
        prediction_agreement: share of eval examples where f_T and f_lin_T predict the same class.
        kernel_rel_change: ||K(theta_T) - K(theta_0)||_F / ||K(theta_0)||_F on ``kernel_inputs`` (NaN if not
            asked; :func:`theory.metrics.kernel_rel_change`).
        train_losses, train_losses_linearized: per-step training losses.
        params_finetuned, params_linearized: trained parameters.
    """

    acc_zero_shot: float
    acc_finetuned: float
    acc_linearized: float
    loss_zero_shot: float
    loss_finetuned: float
    loss_linearized: float
    gain_recovered: float
    output_distance: float
    prediction_agreement: float
    kernel_rel_change: float
    train_losses: list[float]
    train_losses_linearized: list[float]
    params_finetuned: dict[str, torch.Tensor] = dataclasses.field(repr=False)
    params_linearized: dict[str, torch.Tensor] = dataclasses.field(repr=False)

    def summary(self) -> dict[str, float]:
        """The scalar fields (for tables)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), float)}


def linearization_report(f: ModelFn, params0: Mapping[str, torch.Tensor], train_batches, eval_data: tuple[Batch,
                         torch.Tensor], *, steps: int, lr: float, optimizer: str = "sgd", loss: str = "mse",
                         params_subset=None, kernel_inputs: Batch | None = None,
                         ntk_options: Mapping[str, Any] | None = None, eval_batch_size: int | None = None
                         ) -> LinearizationReport:
    """Train f and its linearisation from ``params0`` on the same batches; compare them on ``eval_data``.

    Args:
        f: model function.
        params0: theta_0 (e.g. the pretrained weights).
        train_batches: as in :func:`train`.
        eval_data: ``(x, y)`` evaluation set (integer labels give accuracies).
        steps, lr, optimizer, loss, params_subset: as in :func:`train` (same for both models).
        kernel_inputs: inputs on which to measure the kernel movement (``None``: skip).
        ntk_options: keyword arguments for :func:`theory.ntk.empirical_ntk` (e.g. ``kernel``, ``memory_budget``).
        eval_batch_size: evaluate in chunks of this many examples (default: all at once).

    Returns:
        :class:`LinearizationReport`.
    """
    p0 = {k: v.detach() for k, v in params0.items()}
    f_lin = linearize(f, p0)
    ft = train(f, p0, train_batches, steps=steps, lr=lr, optimizer=optimizer, loss=loss, params_subset=params_subset)
    lin = train(f_lin, p0, train_batches, steps=steps, lr=lr, optimizer=optimizer, loss=loss,
                params_subset=params_subset)
    x_eval, y_eval = eval_data

    def evaluate(fn, params):
        n = batch_size_of(x_eval, "eval inputs")
        bs = eval_batch_size or n
        with torch.no_grad():
            outs = [fn(params, slice_batch(x_eval, s, min(n, s + bs))).detach() for s in range(0, n, bs)]
        return torch.cat(outs)

    out0, outT, outL = evaluate(f, p0), evaluate(f, ft.params), evaluate(f_lin, lin.params)
    classify = not (y_eval.is_floating_point() and y_eval.ndim == 2)
    accs = [accuracy(o, y_eval) if classify else float("nan") for o in (out0, outT, outL)]
    gain = accs[1] - accs[0]
    recovered = (accs[2] - accs[0]) / gain if classify and gain > 0 else float("nan")
    move = float(torch.linalg.vector_norm((outT - out0).double()))
    output_distance = float(torch.linalg.vector_norm((outT - outL).double())) / move if move > 0 else float("nan")
    if classify:
        agree = accuracy(outL, (outT[:, 0] > 0).long() if outT.shape[1] == 1 else outT.argmax(1))
    else:
        agree = float("nan")
    kdist = float("nan")
    if kernel_inputs is not None:
        opts = dict(ntk_options or {})
        opts.setdefault("params_subset", params_subset)
        k0 = empirical_ntk(f, p0, kernel_inputs, **opts).kernel
        kT = empirical_ntk(f, ft.params, kernel_inputs, **opts).kernel
        kdist = kernel_rel_change(k0, kT)
    losses = [float(loss_value(o, y_eval, loss)) for o in (out0, outT, outL)]
    return LinearizationReport(
        acc_zero_shot=accs[0], acc_finetuned=accs[1], acc_linearized=accs[2],
        loss_zero_shot=losses[0], loss_finetuned=losses[1], loss_linearized=losses[2],
        gain_recovered=recovered, output_distance=output_distance, prediction_agreement=agree,
        kernel_rel_change=kdist, train_losses=ft.losses, train_losses_linearized=lin.losses,
        params_finetuned=ft.params, params_linearized=lin.params,
    )
