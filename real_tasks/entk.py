"""eNTK solutions of prompt-based and standard fine-tuning on real data, through the engine in :mod:`theory.ntk`.

One kernel per (model function, kernel formula) is computed over the *union* U of the shared test subset and the
training sets of all data seeds, so every test-side gradient is computed once per task and shared by the five
seeds (a 135M-parameter gradient is 540 MB in float32: the engine never stores them whole; its factored
implementation rebuilds them one parameter tensor at a time from captured layer inputs and output gradients).
Each seed's kernel machine then reads its rows and columns out of the U x U kernel:

* K-SGD: kernel regression with the f_0 correction,
  ``f(x) = f_0(x) + K(x, X) K(X, X)^+ (y - f_0(X))`` (:func:`theory.solvers.kernel_regression`), and kernel
  logistic regression (:func:`theory.solvers.kernel_logistic_regression`), with the SGD kernel
  ``K(x, x') = <grad f(x), grad f(x')>``;
* K-A-SignGD: the asymmetric LS-SVM (:func:`theory.solvers.asymmetric_lssvm`) with the A-SignGD kernel
  ``K(x, x') = <grad f(x), sign grad f(x')>`` (Malladi et al. 2023, Sec. 4), x the evaluation side;

where f are the kernel outputs of :func:`real_tasks.models.kernel_outputs` (a single output ``f_1 - f_0`` with
targets +-1 for binary tasks, as LM-Kernel-FT's ``--binary_classification``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np
import torch

from real_tasks.data import Example, KShotSplit
from real_tasks.classify import EncodedSet, functional_outputs

__all__ = ["KernelUnion", "kernel_union", "compute_kernel", "solve_seed", "KERNEL_METHODS"]

KERNEL_METHODS = ("K-SGD", "K-SGD (logistic)", "K-A-SignGD")


@dataclasses.dataclass(frozen=True)
class KernelUnion:
    """The examples U whose pairwise kernel is computed: the test subset first, then every seed's training set
    (deduplicated by index into the training pool).

    Attributes:
        examples: U, in kernel order.
        test_rows: rows of U holding the test subset, in the split's test order.
        train_rows: seed -> rows of U holding that seed's training set, in the split's training order.
        pool_index: for the training part, the index into the task's training pool (test rows: -1).
    """

    examples: tuple[Example, ...]
    test_rows: tuple[int, ...]
    train_rows: dict[int, tuple[int, ...]]
    pool_index: tuple[int, ...]

    def record(self) -> dict:
        return {"size": len(self.examples), "test_rows": list(self.test_rows),
                "train_rows": {str(k): list(v) for k, v in self.train_rows.items()},
                "pool_index": list(self.pool_index)}


def kernel_union(splits: Sequence[KShotSplit]) -> KernelUnion:
    """U = the (shared) test subset and the union of the seeds' training sets."""
    if not splits:
        raise ValueError("kernel_union: no splits")
    test = splits[0].test
    if any(s.test_index != splits[0].test_index for s in splits):
        raise ValueError("kernel_union: the splits do not share one test set")
    examples: list[Example] = list(test)
    pool: list[int] = [-1] * len(test)
    where: dict[int, int] = {}
    train_rows: dict[int, tuple[int, ...]] = {}
    for s in splits:
        rows = []
        for i, ex in zip(s.train_index, s.train):
            if i not in where:
                where[i] = len(examples)
                examples.append(ex)
                pool.append(i)
            rows.append(where[i])
        train_rows[s.seed] = tuple(rows)
    return KernelUnion(tuple(examples), tuple(range(len(test))), train_rows, tuple(pool))


def compute_kernel(module: torch.nn.Module, data: EncodedSet, *, kernel: str | Sequence[str],
                   implementation: str = "auto", sketch_dim: int | None = None, memory_budget: int | None = None,
                   seed: int = 0, device: str | torch.device = "cpu", progress: bool = False,
                   params: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float64) -> dict:
    """The symmetric eNTK of ``module``'s kernel outputs over all of ``data`` (x2 = x1).

    For ``kernel="asigngd"`` the result is the non-symmetric ``K[i, j] = <g(x_i), sign g(x_j)>`` for all pairs.
    A sequence of kernels (``("sgd", "asigngd")``) is computed from one set of per-example gradients where the
    engine's factored implementation applies (:func:`theory.ntk.empirical_ntks`), and a dict kernel -> result is
    returned. The examples are ordered longest first and every block of the engine drops its all-padding columns
    (the kernel is returned in ``data``'s order): similar lengths share a block, so little padding is
    processed. ``dtype`` is the engine's accumulation dtype (float32 halves the memory traffic of a count-sketch,
    whose own error, about 1% of ||g|| ||g'|| at k = 16384, dwarfs float32 rounding).

    Returns:
        ``{"kernel": (N*C, N*C) float64 numpy, "outputs": (N, C) float64 numpy (f at ``params``), "plan": dict,
        "error_bound": (N*C, N*C) numpy or None, "seconds": float, "num_outputs": C}`` (one per kernel for a
        sequence).
    """
    from theory.ntk import empirical_ntks

    module.eval()
    f = functional_outputs(module, trim=True)
    if params is None:
        params = {k: v.detach() for k, v in module.named_parameters()}
    n = len(data)
    order = torch.argsort(data.lengths, descending=True, stable=True)  # the engine sizes memory on the first ones
    inv = torch.argsort(order)
    batch = {k: (v[order] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v)
             for k, v in data.batch.items()}
    kernels = (kernel,) if isinstance(kernel, str) else tuple(kernel)
    t0 = time.perf_counter()
    results = empirical_ntks(f, params, batch, None, kernels=kernels, implementation=implementation,
                             memory_budget=memory_budget, sketch_dim=sketch_dim, seed=seed, dtype=dtype,
                             device=device, progress=progress)
    seconds = time.perf_counter() - t0
    out = {}
    for name, res in results.items():
        c = res.kernel.shape[1]
        K = res.kernel[inv][:, :, inv]
        bound = None if res.error_bound is None else res.error_bound[inv][:, :, inv]
        out[name] = {"kernel": K.reshape(n * c, n * c).double().numpy(),
                     "outputs": res.outputs1[inv].double().reshape(n, c).numpy(),
                     "plan": res.plan.to_dict(), "plan_text": res.plan.describe(),
                     "error_bound": None if bound is None else bound.reshape(n * c, n * c).double().numpy(),
                     "seconds": seconds / len(results), "num_outputs": c}
    return out[kernels[0]] if isinstance(kernel, str) else out


def _rows(index: Sequence[int], c: int) -> np.ndarray:
    """Flat (example, output) rows of a (N*C, N*C) kernel for the examples ``index``."""
    idx = np.asarray(index, dtype=np.int64)
    return (idx[:, None] * c + np.arange(c)[None, :]).reshape(-1)


def solve_seed(k_sgd: np.ndarray | None, k_asym: np.ndarray | None, outputs: np.ndarray, labels: np.ndarray,
               train_rows: Sequence[int], test_rows: Sequence[int], *, ridge: float = 0.0,
               logistic_ridge: float = 1e-3, gamma: float = 1.0) -> dict[str, np.ndarray]:
    """Kernel-machine test outputs for one seed, read out of U x U kernels.

    Args:
        k_sgd: (N*C, N*C) SGD kernel over U (or None to skip K-SGD).
        k_asym: (N*C, N*C) A-SignGD kernel over U, rows the evaluation side (or None).
        outputs: (N, C) f_0 over U.
        labels: (N,) integer labels over U.
        train_rows, test_rows: rows of U.
        ridge: relative ridge of kernel regression (times the mean diagonal of K_XX; 0: pseudo-inverse).

    Returns:
        method name -> (M, C) test outputs.
    """
    from theory.solvers import asymmetric_lssvm, kernel_logistic_regression, kernel_regression

    c = outputs.shape[1]
    tr, te = _rows(train_rows, c), _rows(test_rows, c)
    f0_tr, f0_te = outputs[list(train_rows)], outputs[list(test_rows)]
    y = labels[list(train_rows)]
    out: dict[str, np.ndarray] = {}
    if k_sgd is not None:
        K, Kx = k_sgd[np.ix_(tr, tr)], k_sgd[np.ix_(te, tr)]
        K = (K + K.T) / 2  # exact kernels are symmetric; the sketch's S S^T is too, up to rounding
        out["K-SGD"] = kernel_regression(K, y, Kx, f0_train=f0_tr, f0_test=f0_te, ridge=ridge,
                                         ridge_scale="trace").numpy()
        out["K-SGD (logistic)"] = kernel_logistic_regression(K, y, Kx, f0_train=f0_tr, f0_test=f0_te,
                                                             ridge=logistic_ridge, ridge_scale="trace").numpy()
    if k_asym is not None:
        A, Ax = k_asym[np.ix_(tr, tr)], k_asym[np.ix_(te, tr)]
        out["K-A-SignGD"] = asymmetric_lssvm(Ax, A, y, gamma=gamma, f0_train=f0_tr, f0_test=f0_te).numpy()
    return out
