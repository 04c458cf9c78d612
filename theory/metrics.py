"""Metrics with one definition each, shared by every experiment, table and figure.

* :func:`predict` / :func:`accuracy` -- the predicted class of a score vector. Ties go to the **lower class
  index** everywhere: ``argmax`` returns the first maximum, and a single score ``s = f_1 - f_0`` predicts class 1
  only when ``s > 0`` (so the two representations of a binary classifier always agree).
* :func:`kernel_rel_change` -- relative kernel movement ``||K_1 - K_0||_F / ||K_0||_F``.
* :func:`kernel_distance` -- the scale-free kernel distance ``1 - <K_0, K_1>_F / (||K_0||_F ||K_1||_F)`` of Fort
  et al. (2020) that Malladi et al. (2023, Sec. 6) report.
* :func:`relative_distance` -- ``||a - b||_F / ||b||_F``.

Inputs may be numpy arrays or torch tensors; results are Python floats (or int64 numpy arrays for predictions).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["predict", "accuracy", "kernel_rel_change", "kernel_distance", "relative_distance"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def predict(scores: Any) -> np.ndarray:
    """Predicted class per row: ``argmax`` of (N, C) scores (first maximum), ``1[s > 0]`` of (N,) or (N, 1)."""
    s = _np(scores)
    if s.ndim == 2 and s.shape[1] == 1:
        s = s[:, 0]
    if s.ndim == 1:
        return (s > 0).astype(np.int64)
    if s.ndim != 2:
        raise ValueError(f"predict: scores must be (N,), (N, 1) or (N, C), got shape {s.shape}")
    return s.argmax(axis=1).astype(np.int64)


def accuracy(scores: Any, labels: Any) -> float:
    """Share of rows whose predicted class (:func:`predict`) is the label. Labels are class indices; for a single
    score labels in {-1, +1} are read as {0, 1}."""
    y = _np(labels).reshape(-1).astype(np.int64)
    pred = predict(scores)
    if y.shape[0] != pred.shape[0]:
        raise ValueError(f"accuracy: {pred.shape[0]} score rows but {y.shape[0]} labels")
    if y.size and y.min() < 0:  # +-1 labels of a single output
        y = (y > 0).astype(np.int64)
    return float(np.mean(pred == y)) if y.size else float("nan")


def relative_distance(a: Any, b: Any) -> float:
    """||a - b||_F / ||b||_F in float64 (NaN when b = 0)."""
    import torch

    a = torch.as_tensor(_np(a)).double()
    b = torch.as_tensor(_np(b)).double()
    den = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / den if den > 0 else float("nan")


def kernel_rel_change(k0: Any, k1: Any) -> float:
    """Relative kernel movement ||K_1 - K_0||_F / ||K_0||_F."""
    return relative_distance(k1, k0)


def kernel_distance(k0: Any, k1: Any) -> float:
    """1 - <K_0, K_1>_F / (||K_0||_F ||K_1||_F) (Fort et al. 2020): 0 for kernels equal up to scale."""
    a, b = _np(k0).astype(np.float64), _np(k1).astype(np.float64)
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 - float((a * b).sum()) / den if den > 0 else float("nan")
