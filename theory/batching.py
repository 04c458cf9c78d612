"""Batches of the eNTK contract: a tensor, or a mapping of tensors with a common leading dimension N.

A model function ``f(params, batch) -> (B, C)`` takes such a batch; these helpers count, slice and move them
without knowing what the tensors mean (token ids, attention masks, features).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch

__all__ = ["Batch", "ModelFn", "batch_size_of", "slice_batch", "batch_to", "in_dims", "unsqueeze"]

Batch = Union[torch.Tensor, Mapping[str, Any]]
ModelFn = Callable[[Mapping[str, torch.Tensor], Batch], torch.Tensor]


def batch_size_of(batch: Batch, name: str = "batch") -> int:
    """Leading dimension N shared by every tensor of ``batch`` (error naming the field that disagrees)."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            raise ValueError(f"{name}: a 0-d tensor has no example dimension")
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        sizes = {k: int(v.shape[0]) for k, v in batch.items() if isinstance(v, torch.Tensor) and v.ndim > 0}
        if not sizes:
            raise ValueError(f"{name}: the mapping holds no tensor with an example dimension")
        n = next(iter(sizes.values()))
        bad = {k: s for k, s in sizes.items() if s != n}
        if bad:
            raise ValueError(f"{name}: tensors disagree on the number of examples: {sizes}")
        return n
    raise TypeError(f"{name}: expected a tensor or a mapping of tensors, got {type(batch).__name__}")


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Examples ``start:stop`` of a batch (non-tensor mapping values pass through)."""
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    return {k: (v[start:stop] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """The batch with every tensor moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def in_dims(batch: Batch):
    """``vmap`` in_dims mapping every tensor with an example dimension to 0."""
    if isinstance(batch, torch.Tensor):
        return 0
    return {k: (0 if isinstance(v, torch.Tensor) and v.ndim > 0 else None) for k, v in batch.items()}


def unsqueeze(example: Batch) -> Batch:
    """One example (no leading dimension) as a batch of one."""
    if isinstance(example, torch.Tensor):
        return example.unsqueeze(0)
    return {k: (v.unsqueeze(0) if isinstance(v, torch.Tensor) else v) for k, v in example.items()}
