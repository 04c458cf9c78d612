"""Count-sketch random projections of gradients, with their exact error.

A count-sketch (Charikar, Chen & Farach-Colton 2002; the sparse Johnson-Lindenstrauss transform with one
non-zero per column) maps g in R^P to S g in R^k with a random bucket h(p) in {0..k-1} and a random sign
s(p) in {-1, +1} per coordinate:

    (S g)_j = sum_{p : h(p) = j} s(p) g_p.

For any fixed g, g' (the randomness is only in h and s), the sketched inner product is unbiased,
E <S g, S g'> = <g, g'>, and its variance is exactly

    Var <S g, S g'> = (1/k) [ ||g||^2 ||g'||^2 + <g, g'>^2 - 2 sum_p g_p^2 g'_p^2 ]
                   <= (1/k) [ ||g||^2 ||g'||^2 + <g, g'>^2 ]  <=  (2/k) ||g||^2 ||g'||^2,

(pairwise-independent buckets and 4-wise independent signs suffice; here they are fully independent). So a
sketched kernel entry has standard deviation at most sqrt(2/k) ||g|| ||g'|| -- the bound that
:func:`theory.ntk.empirical_ntk` reports for ``implementation="sketch"``.

Vectors split into parts (one per parameter tensor) are sketched part by part with independent hashes; the sum
of the parts' sketches is the count-sketch of the concatenated vector, so no concatenation is ever needed.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["CountSketch", "count_sketch", "count_sketch_variance", "count_sketch_std_bound"]


def count_sketch(vectors: torch.Tensor, buckets: torch.Tensor, signs: torch.Tensor, sketch_dim: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Count-sketch of the rows of ``vectors`` for explicit hash functions.

    Args:
        vectors: (R, P) rows to sketch.
        buckets: (P,) int64 bucket h(p) in [0, sketch_dim).
        signs: (P,) signs s(p) in {-1, +1} (any float dtype).
        sketch_dim: k.
        out: optional (R, k) accumulator (the sketch is added to it).

    Returns:
        (R, k) tensor whose row r is S vectors[r] (plus ``out``'s previous value).
    """
    if vectors.ndim != 2 or buckets.shape != (vectors.shape[1],) or signs.shape != buckets.shape:
        raise ValueError(f"count_sketch: vectors (R, P), buckets (P,), signs (P,) expected; got "
                         f"{tuple(vectors.shape)}, {tuple(buckets.shape)}, {tuple(signs.shape)}")
    if out is None:
        out = torch.zeros(vectors.shape[0], sketch_dim, dtype=vectors.dtype, device=vectors.device)
    out.index_add_(1, buckets, vectors * signs.to(vectors.dtype))
    return out


def count_sketch_variance(g: torch.Tensor, h: torch.Tensor, sketch_dim: int) -> torch.Tensor:
    """Exact variance of <S g, S h> over the random hash (see the module docstring); g, h: (P,)."""
    g2, h2 = g * g, h * h
    return (g2.sum() * h2.sum() + (g @ h) ** 2 - 2 * (g2 * h2).sum()) / sketch_dim


def count_sketch_std_bound(sq_norms1: torch.Tensor, sq_norms2: torch.Tensor, sketch_dim: int) -> torch.Tensor:
    """Per-entry standard-deviation bound sqrt(2/k) ||g_i|| ||g'_j|| of a sketched Gram matrix.

    Args:
        sq_norms1: (R1,) squared norms ||g_i||^2 of the first side's rows.
        sq_norms2: (R2,) squared norms of the second side's rows.
        sketch_dim: k.

    Returns:
        (R1, R2) bound on the standard deviation of each sketched inner product.
    """
    return math.sqrt(2.0 / sketch_dim) * torch.outer(sq_norms1.clamp_min(0).sqrt(), sq_norms2.clamp_min(0).sqrt())


@dataclasses.dataclass(frozen=True)
class CountSketch:
    """A count-sketch of vectors split into parts, with hashes derived from ``seed`` and the part index.

    The same object (same seed) must sketch both sides of a kernel so that their sketches share hashes.
    Same seed, same bytes: the hashes come from a CPU ``torch.Generator`` seeded with (seed, part).
    """

    sketch_dim: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sketch_dim < 1:
            raise ValueError(f"CountSketch: sketch_dim must be >= 1, got {self.sketch_dim}")

    def hashes(self, part: int, size: int, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(buckets (size,) int64, signs (size,) in ``dtype``) of part number ``part``."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed((self.seed * 1_000_003 + part * 7919 + 17) % (2 ** 63 - 1))
        buckets = torch.randint(self.sketch_dim, (size,), generator=gen)
        signs = torch.randint(2, (size,), generator=gen).to(dtype).mul_(2).sub_(1)
        return buckets.to(device), signs.to(device)

    def sketch(self, part: int, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add the sketch of part ``part`` of the (R, P_part) ``rows`` into ``out`` (R, k)."""
        buckets, signs = self.hashes(part, rows.shape[1], rows.device, rows.dtype)
        return count_sketch(rows, buckets, signs, self.sketch_dim, out=out)
