"""Reference computations that share no code with the engines they check: explicit Jacobians by
``torch.autograd.functional.jacobian`` and the kernels formed from them.

Tests and the ``ftsim verify`` claims compare :mod:`theory.ntk` (every implementation), :mod:`theory.linearize`
and the fine-tuning code against these. The only thing shared with the engine is the *definition* of the sign
rule (:mod:`theory.gram`), so both compute the same kernel.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from theory.gram import SIGN_RTOL, sign_rows

__all__ = ["explicit_jacobian", "reference_kernel", "sign_tau"]


def explicit_jacobian(f, params: Mapping[str, torch.Tensor], x, names: Sequence[str] | None = None) -> torch.Tensor:
    """(N*C, P) Jacobian of ``f(params, x) -> (N, C)`` with respect to the named parameters (default: all), rows
    ordered (example, output), columns the flattened tensors in the order of ``names``."""
    names = list(names or params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def g(v):
        sub = {n: t.reshape(s) for n, t, s in zip(names, torch.split(v, sizes), shapes)}
        return f({**params, **sub}, x)

    return torch.autograd.functional.jacobian(g, flat).reshape(-1, flat.numel())


def sign_tau(J: torch.Tensor) -> torch.Tensor:
    """The sign rule of the SignGD kernels (:mod:`theory.gram`) applied to whole Jacobian rows: a coordinate below
    ``SIGN_RTOL * ||row||_inf`` counts as zero."""
    return sign_rows(J, SIGN_RTOL * J.abs().amax(dim=1))


def reference_kernel(kernel: str, J1: torch.Tensor, J2: torch.Tensor | None = None) -> torch.Tensor:
    """The (N1*C, N2*C) kernel from explicit Jacobians: ``sgd`` J1 J2^T, ``signgd`` sign(J1) sign(J2)^T,
    ``asigngd`` J1 sign(J2)^T (x2 = x1 when ``J2`` is None)."""
    J2 = J1 if J2 is None else J2
    if kernel == "sgd":
        return J1 @ J2.T
    if kernel == "signgd":
        return sign_tau(J1) @ sign_tau(J2).T
    if kernel == "asigngd":
        return J1 @ sign_tau(J2).T
    raise ValueError(f"kernel must be sgd, signgd or asigngd, got {kernel!r}")
