"""Gram products of gradient rows, the sign rule of the SignGD kernels, and exact symmetry.

Every eNTK implementation (:mod:`theory.ntk`, :mod:`theory.ntk_factored`) contracts blocks of per-example
gradient rows with :func:`accumulate`, so the three kernel formulas have one definition here.

**The sign rule.** The SignGD and A-SignGD kernels of Malladi et al. (2023, Sec. 4) take ``sign`` of gradient
coordinates. A coordinate that is zero in exact arithmetic (GPT-2's key-projection bias: softmax is invariant to
a shift of every score, so that gradient vanishes identically) comes out of floating point as a residue of either
sign, ~1e-19 in float64, and ``sign`` turns that residue into +-1 -- as large a contribution as any real
coordinate's. We use

    sign_tau(g)_j = sign(g_j) if |g_j| > tau * ||g||_inf, else 0,            tau = SIGN_RTOL = 2^-40 ~ 9.1e-13,

where g is the gradient of one output for one example over the *selected parameters* (every selected tensor,
not one tensor alone: a tensor whose whole gradient is a residue has no scale of its own). The rule is the same
for every implementation and dtype. It removes float64 residues (relative size ~1e-16..1e-18) and nothing a
float64 computation resolves. Measured on SmolLM2-135M (float32 gradients, one prompt output): 4e-8 of the
non-zero coordinates are below 1e-14 ||g||_inf and 3e-6 below 1e-12, so the rule leaves real-model kernels as
they were; it does *not* remove float32 residues (~1e-7 of their summands), which would need a threshold that
also zeroes real coordinates (86% of SmolLM2's coordinates are below 1e-4 ||g||_inf). Sign kernels are exact in
float64; in float32 the signs of coordinates at the rounding level are not determined (the plan says so).

**Symmetry.** A symmetric kernel (SGD or SignGD with x2 = x1) is made symmetric by construction: the lower
triangle is computed and mirrored (:func:`mirror_lower`), so K == K^T bit for bit on every CPU.
"""

from __future__ import annotations

import torch

__all__ = ["SIGN_RTOL", "PRODUCT_CHUNK", "sign_rows", "row_scale", "accumulate", "mirror_lower"]

SIGN_RTOL = 2.0 ** -40
PRODUCT_CHUNK = 1 << 20  # columns per product before accumulation in the output dtype


def row_scale(rows: torch.Tensor) -> torch.Tensor:
    """||row||_inf of each row of an (r, P) block (float64, shape (r,)); combine tensors with ``torch.maximum``."""
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    return rows.detach().abs().amax(dim=1).double()


def sign_rows(rows: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """sign_tau of each row: ``threshold`` (r,) is tau * ||g||_inf per row (see the module docstring); ``None``
    means plain ``sign`` (only for callers that know no coordinate is a residue)."""
    s = rows.sign()
    if threshold is None:
        return s
    keep = rows.abs() > threshold.to(rows.dtype).reshape(-1, 1)
    return s.mul_(keep)


def accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sign_a: torch.Tensor | bool | None,
               sign_b: torch.Tensor | bool | None) -> None:
    """out += t_a(a) @ t_b(b)^T for row-major (r1, P) and (r2, P) operands, over column chunks, each chunk's
    product cast to ``out.dtype`` before it is accumulated.

    ``sign_a`` / ``sign_b``: ``None`` or ``False`` (raw rows), a (r,) tensor of thresholds tau * ||g||_inf (rows
    signed with :func:`sign_rows`), or ``True`` (plain sign; for rows known to hold no residues).

    The operand with more rows goes on the left: for tall-skinny Gram products MKL's A @ B^T is about twice as
    fast with the wide block on the left (measured: (128 x P) @ (32 x P)^T 37 ms vs (32 x P) @ (128 x P)^T
    72 ms for P = 2^18), and it needs no transposed copy of either operand.
    """
    cols = a.shape[1]
    swap = b.shape[0] > a.shape[0]
    for s in range(0, cols, PRODUCT_CHUNK):
        e = min(cols, s + PRODUCT_CHUNK)
        ac, bc = a[:, s:e], b[:, s:e]
        if sign_a is not None and sign_a is not False:
            ac = sign_rows(ac, None if sign_a is True else sign_a)
        if sign_b is not None and sign_b is not False:
            bc = sign_rows(bc, None if sign_b is True else sign_b)
        prod = (bc @ ac.T).T if swap else ac @ bc.T
        out += prod if prod.dtype == out.dtype else prod.to(out.dtype)


def mirror_lower(m: torch.Tensor) -> torch.Tensor:
    """Copy the strict lower triangle of the square matrix ``m`` onto its upper triangle, in place; returns ``m``
    (then ``m == m.T`` exactly)."""
    n = m.shape[0]
    if m.ndim != 2 or m.shape[1] != n:
        raise ValueError(f"mirror_lower: expected a square matrix, got {tuple(m.shape)}")
    iu = torch.triu_indices(n, n, offset=1, device=m.device)
    m[iu[0], iu[1]] = m[iu[1], iu[0]]
    return m
