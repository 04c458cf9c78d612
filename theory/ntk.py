"""Empirical neural tangent kernels of any torch model: SGD, SignGD and asymmetric SignGD (Adam) kernels.

For a model wrapped as ``f(params, batch) -> (B, C)`` outputs (e.g. the logits of the label words at the prompt
position) the class-coupled empirical NTK between inputs x1 and x2 is

    K[i, c, j, c'] = < d f_c(x1_i) / d theta , d f_c'(x2_j) / d theta >                     (kernel="sgd")

(Jacot, Gabriel & Hongler 2018). Malladi et al. (2023, "A Kernel-Based View of Language Model Fine-Tuning",
Sec. 4) show that early Adam training follows SignGD and derive its kernels:

    K^{SignGD}[i, c, j, c']   = < sign d f_c(x1_i), sign d f_c'(x2_j) >                     (kernel="signgd")
    K^{A-SignGD}[i, c, j, c'] = < d f_c(x1_i),      sign d f_c'(x2_j) >                     (kernel="asigngd")

where x1 is the evaluation side and x2 the training side (the sign acts on the training gradient, which is the
update direction). ``params_subset`` restricts theta (head only, backbone only, LoRA factors, a mask): the kernel
of a union of disjoint subsets is the sum of their kernels, so LP-FT decompositions come for free.

Four implementations sit behind ``implementation=`` and are tested against each other and against explicit
Jacobians:

* ``"factored"``  per-example gradients rebuilt from the inputs and output gradients of each linear / embedding /
  norm operation, captured in C ordinary batched backward passes (:mod:`theory.ntk_factored`); rows are formed
  one parameter tensor at a time and contracted in one wide product. Tensors used any other way are computed by
  the per-example engine and added. ``auto`` uses it when at least ``AUTO_MIN_FACTORED`` of the parameters
  factor and a check against per-example gradients on the first examples passes.

* ``"jacobian"``  per-example gradients with ``torch.func`` (``vmap`` over examples of ``jacrev`` over the C
  outputs), all rows materialised, then contracted parameter tensor by parameter tensor. The reference.
* ``"streaming"`` stores only training-side (x2) gradients -- in tiles when they do not all fit -- and streams
  the evaluation side (x1) through them in blocks. For a symmetric kernel (x2 = None) every gradient is computed
  once and only the block lower triangle of products is formed (about half the Gram flops).
* ``"sketch"``    count-sketches every gradient block to ``sketch_dim`` dims (sign applied *before* sketching
  for the SignGD kernels). Unbiased; each entry's standard deviation is at most sqrt(2/k) ||g|| ||g'||
  (``NTKResult.error_bound``; see :mod:`theory.sketch`).

Otherwise ``"auto"`` plans from the memory budget: exact streaming whenever it fits, in as many tiles of the
training side as the budget needs (each tile recomputes the x1 gradients: with N1 ~ N2, t tiles cost about
(t + 1) / 2 times the gradient work of one tile), a sketch only when no exact plan fits (not even one stored
example beside one block), and :class:`NTKMemoryError` naming the sizes when nothing fits. The chosen :class:`Plan` is
returned with the kernel (``result.plan.describe()``); its ``reason`` says why.

Products over each parameter tensor (in column chunks of at most ``PRODUCT_CHUNK`` entries) run in the
gradients' dtype and are accumulated in ``dtype`` (float64 by default). For exact float64 kernels pass float64
parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch

from theory import ntk_factored as fz
from theory.batching import Batch, ModelFn, batch_size_of, batch_to, in_dims, slice_batch, unsqueeze
from theory.gram import PRODUCT_CHUNK, SIGN_RTOL, accumulate, mirror_lower, row_scale, sign_rows
from theory.memory import SavedTensorBytes, available_memory, format_bytes
from theory.sketch import CountSketch, count_sketch, count_sketch_std_bound

__all__ = [
    "Batch", "ModelFn", "KERNELS", "IMPLEMENTATIONS", "NTKResult", "Plan", "NTKMemoryError",
    "empirical_ntk", "empirical_ntks", "empirical_ntk_fn", "select_parameters", "batch_size_of", "slice_batch",
    "DEFAULT_SKETCH_DIM", "PRODUCT_CHUNK",
]

KERNELS = ("sgd", "signgd", "asigngd")
IMPLEMENTATIONS = ("jacobian", "streaming", "sketch", "factored", "auto")
PER_EXAMPLE = ("auto", "vmap", "loop")

DEFAULT_SKETCH_DIM = 4096  # std <= sqrt(2/4096) = 2.2% of ||g|| ||g'|| per entry
MAX_BLOCK = 64
SKETCH_CHUNK = 1 << 14  # columns sketched at a time (bounds the signed / cast temporaries)
_OVERHEAD_BYTES = 1 << 20  # allocator slack, Python objects, small temporaries
_WORK_FACTOR = 1.25  # safety factor on the per-example working memory estimate
_GLIBC_MMAP_MAX = 32 << 20  # glibc's largest dynamic mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)


class NTKMemoryError(MemoryError):
    """The memory budget cannot hold any plan for the requested kernel."""


# ---------------------------------------------------------------------------------------------------------------
# Parameter subsets
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Selection:
    names: tuple[str, ...]  # differentiated tensors, in the order of ``params``
    index: Mapping[str, torch.Tensor | None]  # flat indices of the selected entries (None: all)
    sizes: Mapping[str, int]  # selected entries per tensor
    dense_sizes: Mapping[str, int]  # all entries per tensor

    @property
    def num_params(self) -> int:
        return sum(self.sizes.values())


def select_parameters(params: Mapping[str, torch.Tensor], params_subset=None) -> _Selection:
    """Resolve ``params_subset`` into the differentiated tensors and the selected entries of each.

    Args:
        params: name -> tensor.
        params_subset: ``None`` (all); a name or a sequence of names; a predicate ``name -> bool``; or a mapping
            name -> boolean mask of the tensor's shape (or a bool for the whole tensor); names absent from the
            mapping are held constant.

    Returns:
        The selection (names, flat indices, sizes).
    """
    names = list(params)
    index: dict[str, torch.Tensor | None] = {}
    if params_subset is None:
        chosen = names
    elif isinstance(params_subset, str):
        chosen = [params_subset]
    elif isinstance(params_subset, Mapping):
        chosen = []
        for name, mask in params_subset.items():
            if name not in params:
                raise KeyError(f"params_subset: unknown parameter {name!r}; known: {_some(names)}")
            if isinstance(mask, bool):
                if mask:
                    chosen.append(name)
                continue
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool or tuple(mask.shape) != tuple(params[name].shape):
                raise ValueError(f"params_subset[{name!r}]: expected a bool mask of shape "
                                 f"{tuple(params[name].shape)}, got {mask.dtype} {tuple(mask.shape)}")
            idx = mask.reshape(-1).nonzero().reshape(-1)
            if idx.numel() == 0:
                continue
            chosen.append(name)
            index[name] = None if idx.numel() == mask.numel() else idx.to(params[name].device)
        chosen = [n for n in names if n in set(chosen)]
    elif callable(params_subset):
        chosen = [n for n in names if params_subset(n)]
    elif isinstance(params_subset, (Sequence, set, frozenset)):
        unknown = [n for n in params_subset if n not in params]
        if unknown:
            raise KeyError(f"params_subset: unknown parameter(s) {unknown}; known: {_some(names)}")
        wanted = set(params_subset)
        chosen = [n for n in names if n in wanted]
    else:
        raise TypeError(f"params_subset: expected None, names, a predicate or a mask mapping, got "
                        f"{type(params_subset).__name__}")
    if not chosen:
        raise ValueError(f"params_subset selects no parameter entries (parameters: {_some(names)})")
    dense = {n: int(params[n].numel()) for n in chosen}
    sizes = {n: (dense[n] if index.get(n) is None else int(index[n].numel())) for n in chosen}
    return _Selection(tuple(chosen), {n: index.get(n) for n in chosen}, sizes, dense)


def _some(names: Sequence[str], k: int = 6) -> str:
    return ", ".join(map(repr, names[:k])) + (f", ... ({len(names)} in all)" if len(names) > k else "")


# ---------------------------------------------------------------------------------------------------------------
# Plan and result
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`empirical_ntk` did and why.

    Memory figures are the planner's estimate of memory allocated by the call on top of what is already resident
    (parameters and inputs); ``memory_budget`` is the limit it planned against.
    """

    implementation: str
    requested: str
    kernel: str
    num_examples1: int
    num_examples2: int
    symmetric: bool
    num_outputs: int
    num_params: int
    num_params_total: int
    num_tensors: int
    grad_dtype: str
    dtype: str
    device: str
    batch_size: int
    tile_size: int
    num_tiles: int
    sketch_dim: int | None
    seed: int | None
    per_example: str
    memory_budget: int
    estimated_peak_bytes: int
    activation_bytes_per_example: int
    error: str
    reason: str
    factored: dict | None = None  # coverage, validation and remainder of the factored implementation

    def describe(self) -> str:
        """A few human-readable lines: the implementation, sizes, blocks, memory and error."""
        n2 = "x1 (symmetric)" if self.symmetric else f"N2={self.num_examples2}"
        lines = [
            f"eNTK plan: {self.implementation} ({self.error}); kernel {self.kernel}; requested {self.requested}",
            f"  sizes: N1={self.num_examples1}, {n2}, C={self.num_outputs} outputs, "
            f"P={self.num_params:,} of {self.num_params_total:,} parameters in {self.num_tensors} tensors",
            f"  compute: {self.grad_dtype} gradients ({self.per_example} per-example gradients), {self.dtype} "
            f"accumulation, on {self.device}; blocks of {self.batch_size} examples",
        ]
        if self.implementation == "streaming":
            lines.append(f"  training side stored in {self.num_tiles} tile(s) of <= {self.tile_size} examples"
                         + (" (x1 recomputed per tile)" if self.num_tiles > 1 else ""))
        if self.implementation == "sketch":
            lines.append(f"  count-sketch dim {self.sketch_dim} (seed {self.seed})")
        if self.implementation == "factored" and self.factored:
            fz = self.factored
            lines.append(f"  factored: {fz['covered_tensors']} tensors ({fz['covered_params']:,} parameters) from "
                         f"captured inputs and output gradients; captures in {self.num_tiles} tile(s) of <= "
                         f"{self.tile_size} examples; check on {fz['check_examples']} examples: {fz['check']}")
            if fz.get("capture_groups", 1) > 1:
                lines.append(f"  captures of all examples in {fz['capture_groups']} passes over groups of tensors")
            if fz.get("uncovered"):
                lines.append(f"  per-example engine for {len(fz['uncovered'])} uncovered tensor(s) "
                             f"({_some(sorted(fz['uncovered']), 3)}): {fz['remainder_plan']}")
        act = format_bytes(self.activation_bytes_per_example)
        lines.append(f"  memory: estimated peak {format_bytes(self.estimated_peak_bytes)} of budget "
                     f"{format_bytes(self.memory_budget)} (activations ~{act} per example)")
        lines.append(f"  why: {self.reason}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class NTKResult:
    """An empirical kernel and how it was computed.

    Attributes:
        kernel: (N1, C, N2, C) on CPU in ``dtype``; K[i, c, j, c'] as in the module docstring.
        plan: the :class:`Plan` that produced it.
        error_bound: for ``"sketch"``, (N1, C, N2, C) bound sqrt(2/k) ||g|| ||g'|| on each entry's standard
            deviation (norms of the exact, possibly signed, gradients); ``None`` for exact implementations.
        outputs1: (N1, C) model outputs f(params, x1), a by-product (for the f_0 correction of the solvers).
        outputs2: (N2, C) outputs at x2 (equal to ``outputs1`` when x2 is None).
    """

    kernel: torch.Tensor
    plan: Plan
    error_bound: torch.Tensor | None = None
    outputs1: torch.Tensor | None = None
    outputs2: torch.Tensor | None = None

    def matrix(self) -> torch.Tensor:
        """The kernel as an (N1*C, N2*C) matrix, rows ordered (example, output)."""
        n1, c1, n2, c2 = self.kernel.shape
        return self.kernel.reshape(n1 * c1, n2 * c2)


# ---------------------------------------------------------------------------------------------------------------
# Per-example gradients
# ---------------------------------------------------------------------------------------------------------------

class _Gradients:
    """Per-example Jacobian rows of f for blocks of examples, restricted to the selection.

    ``block(x)`` returns ({name: (n*C, P_name) rows}, (n, C) outputs); row ``i*C + c`` is d f_c(x_i)/d theta.
    """

    def __init__(self, f: ModelFn, params: Mapping[str, torch.Tensor], selection: _Selection, per_example: str,
                 num_outputs: int | None = None):
        self.f = f
        self.selection = selection
        self.sub = {n: params[n] for n in selection.names}
        self.const = {n: p for n, p in params.items() if n not in self.sub}
        self.per_example = per_example
        self.fallback_reason = ""
        self.num_outputs = num_outputs

    def _call(self, sub: Mapping[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return self.f({**self.const, **sub}, batch)

    def probe(self, example: Batch) -> tuple[int, torch.dtype, int]:
        """Run f on one example with autograd: check the output shape and measure the activations it saves.

        Returns:
            (C, output dtype, bytes of tensors saved for backward per example, parameters excluded).
        """
        sub = {n: p.detach().requires_grad_(True) for n, p in self.sub.items()}
        with torch.enable_grad(), SavedTensorBytes(exclude=[*self.sub.values(), *self.const.values()]) as counted:
            out = self._call(sub, example)
        saved = counted.nbytes
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"f(params, batch) must return a (B, C) tensor of outputs; for a batch of 1 example "
                             f"it returned {shape}")
        self.num_outputs = int(out.shape[1])
        return self.num_outputs, out.dtype, saved

    def _block_vmap(self, x: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        def single(sub, example):
            out = self._call(sub, unsqueeze(example))[0]  # (C,)
            return out, out.detach()

        jac = torch.func.jacrev(single, has_aux=True)
        grads, outputs = torch.func.vmap(jac, in_dims=(None, in_dims(x)))(self.sub, x)
        return grads, outputs  # grads[name]: (n, C, *shape)

    def _block_loop(self, x: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        n = batch_size_of(x)
        C = self.num_outputs
        per_name: dict[str, list[torch.Tensor]] = {name: [] for name in self.sub}
        outputs = []
        for i in range(n):
            xi = slice_batch(x, i, i + 1)
            out, vjp_fn = torch.func.vjp(lambda s: self._call(s, xi)[0], self.sub)
            outputs.append(out.detach())
            eye = torch.eye(C, dtype=out.dtype, device=out.device)
            rows = [vjp_fn(eye[c])[0] for c in range(C)]
            for name in self.sub:
                per_name[name].append(torch.stack([r[name] for r in rows]))  # (C, *shape)
        grads = {}
        for name in list(per_name):
            grads[name] = torch.stack(per_name.pop(name))  # (n, C, *shape)
        return grads, torch.stack(outputs)

    def block(self, x: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if self.per_example == "loop":
            grads, outputs = self._block_loop(x)
        elif self.per_example == "vmap":
            grads, outputs = self._block_vmap(x)
        else:  # auto: vmap, and fall back to a loop for models vmap cannot batch (data-dependent control flow)
            try:
                grads, outputs = self._block_vmap(x)
                self.per_example = "vmap"
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as exc:
                self.fallback_reason = f"vmap failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                self.per_example = "loop"
                grads, outputs = self._block_loop(x)
        rows: dict[str, torch.Tensor] = {}
        for name in self.selection.names:  # flatten and mask tensor by tensor so only one extra copy is alive
            g = grads.pop(name)
            g = g.reshape(g.shape[0] * g.shape[1], -1)  # (n*C, P_dense)
            idx = self.selection.index[name]
            rows[name] = g if idx is None else g.index_select(1, idx)
        return rows, outputs


def _ranges(n: int, size: int, start: int = 0) -> list[tuple[int, int]]:
    return [(s, min(start + n, s + size)) for s in range(start, start + n, size)]


# ---------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Sizes:
    n1: int
    n2: int
    symmetric: bool
    C: int
    P: int  # selected entries
    P_dense: int  # entries of the differentiated tensors
    P_max: int  # largest differentiated tensor
    grad_bytes: int
    acc_bytes: int
    act: int  # activation bytes per example
    cpu: bool = True  # host memory (glibc allocator) rather than a CUDA caching allocator

    @property
    def row_bytes(self) -> int:
        """Stored bytes per example (C gradient rows)."""
        return self.C * self.P * self.grad_bytes

    def work_bytes(self, cast: bool = False) -> int:
        """Working bytes per example of a gradient block: the dense gradients that vmap returns, one masked (or,
        with ``cast``, accumulation-dtype) copy of the largest tensor, saved activations and the C backward
        cotangents."""
        if cast:  # the sketch signs, casts and multiplies by the hash signs SKETCH_CHUNK columns at a time
            copy = min(self.P_max, SKETCH_CHUNK) * (self.grad_bytes + 2 * self.acc_bytes)
        else:
            copy = self.P_max * self.grad_bytes
        per = self.C * (self.P_dense * self.grad_bytes + copy) + (1 + self.C) * self.act
        return int(_WORK_FACTOR * per)

    @property
    def base_bytes(self) -> int:
        """The kernel accumulator, outputs and fixed slack."""
        return (self.n1 * self.C * self.n2 * self.C * self.acc_bytes + (self.n1 + self.n2) * self.C * 8
                + _OVERHEAD_BYTES)


def _default_block(n: int, symmetric_single: bool, s: "_Sizes | None" = None) -> int:
    # In the symmetric path smaller blocks save product flops (sum over blocks of b*e ~ N^2/2 + N b/2);
    # elsewhere larger blocks only make vmap more efficient.
    b = max(1, min(MAX_BLOCK, max(8, math.ceil(n / 4)) if symmetric_single else MAX_BLOCK, n))
    if s is not None and s.cpu:
        # glibc serves allocations under 32 MiB from a reusable heap but maps every larger one afresh, paying a
        # page fault per 4 KiB on first touch (~0.5 s/GB here). Keeping each per-tensor gradient block below that
        # size halved the per-example-gradient time of the benchmark transformer (4.0 s vs 7.8 s for 64 examples).
        per_example = s.C * s.P_max * s.grad_bytes
        fit = (_GLIBC_MMAP_MAX - (1 << 20)) // max(per_example, 1)
        if fit >= 4:
            b = min(b, fit)
    return b


def _plan_jacobian(s: _Sizes, budget: int, cap: int | None):
    stored = (s.n1 if s.symmetric else s.n1 + s.n2) * s.row_bytes
    b_cap = min(cap or _default_block(max(s.n1, s.n2), False, s), max(s.n1, s.n2))
    room = budget - s.base_bytes - stored
    b = min(b_cap, room // s.work_bytes()) if room > 0 else 0
    if b < 1:
        return None, s.base_bytes + stored + s.work_bytes()
    return dict(batch_size=int(b), tile_size=s.n2, num_tiles=1,
                peak=s.base_bytes + stored + int(b) * s.work_bytes()), None


def _plan_streaming(s: _Sizes, budget: int, cap: int | None, kernel: str):
    if s.symmetric:
        # asigngd signs chunks of the stored rows on the fly (the store keeps raw gradients for the other side)
        chunk_tmp = s.C * min(s.P_max, PRODUCT_CHUNK) * s.grad_bytes if kernel == "asigngd" else 0
        stored = s.n1 * s.row_bytes
        room = budget - s.base_bytes - stored - s.n1 * chunk_tmp
        b_cap = min(cap or _default_block(s.n1, True, s), s.n1)
        b = min(b_cap, room // s.work_bytes()) if room > 0 else 0
        if b >= 1:
            return dict(batch_size=int(b), tile_size=s.n1, num_tiles=1,
                        peak=s.base_bytes + stored + s.n1 * chunk_tmp + int(b) * s.work_bytes()), None
    chunk_tmp = 0  # the general path stores rows already signed
    b_cap = min(cap or _default_block(max(s.n1, s.n2), False, s), max(s.n1, s.n2))
    avail = budget - s.base_bytes
    best = None
    for b0 in (min(b_cap, 4), 1):  # reserve a useful block first, then give the rest to the stored tile
        t = (avail - b0 * s.work_bytes()) // (s.row_bytes + chunk_tmp) if avail > b0 * s.work_bytes() else 0
        if t >= 1:
            best = (b0, int(min(t, s.n2)))
            break
    minimum = s.base_bytes + s.row_bytes + chunk_tmp + s.work_bytes()
    if best is None:
        return None, minimum
    b0, t = best
    tiles = math.ceil(s.n2 / t)
    t = math.ceil(s.n2 / tiles)  # equal tiles use less memory for the same number of passes
    b = int(max(b0, min(b_cap, (avail - t * (s.row_bytes + chunk_tmp)) // s.work_bytes())))
    return dict(batch_size=b, tile_size=t, num_tiles=tiles,
                peak=s.base_bytes + t * (s.row_bytes + chunk_tmp) + b * s.work_bytes()), None


def _plan_sketch(s: _Sizes, budget: int, cap: int | None, k: int | None, kernel: str):
    n_sketch = s.n1 + (s.n2 if (not s.symmetric or kernel == "asigngd") else 0)
    hash_tmp = s.P_max * (8 + s.grad_bytes)
    b_cap = min(cap or _default_block(max(s.n1, s.n2), False, s), max(s.n1, s.n2))
    dims = [k] if k is not None else [DEFAULT_SKETCH_DIM >> i for i in range(7)]  # 4096 ... 64
    need_min = None
    for dim in dims:
        fixed = s.base_bytes + n_sketch * s.C * dim * s.acc_bytes + hash_tmp
        room = budget - fixed
        b = min(b_cap, room // s.work_bytes(cast=True)) if room > 0 else 0
        if b >= 1:
            return dict(batch_size=int(b), tile_size=s.n2, num_tiles=1, sketch_dim=int(dim),
                        peak=fixed + int(b) * s.work_bytes(cast=True)), None
        need_min = fixed + s.work_bytes(cast=True)
    return None, need_min


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Call:
    """One validated engine call: the model function, parameters and inputs on the device, the selection and its
    sizes, and the options that decide how the kernel is computed."""

    f: ModelFn
    params: Mapping[str, torch.Tensor]
    selection: _Selection
    x1: Batch
    x2: Batch | None  # None: x2 = x1 (symmetric inputs)
    sizes: _Sizes
    implementation: str
    budget: int
    batch_size: int | None
    sketch_dim: int | None
    seed: int
    dtype: torch.dtype
    device: torch.device
    grad_dtype: torch.dtype
    per_example: str
    progress: bool

    @property
    def symmetric(self) -> bool:
        return self.x2 is None

    def gradients(self) -> "_Gradients":
        return _Gradients(self.f, self.params, self.selection, self.per_example, self.sizes.C)

    def restricted(self, params_subset, **changes) -> "_Call":
        """The same call on a sub-selection of the parameters (and other ``changes``)."""
        sel = select_parameters(self.params, params_subset)
        sizes = dataclasses.replace(self.sizes, P=sel.num_params, P_dense=sum(sel.dense_sizes.values()),
                                    P_max=max(sel.dense_sizes.values()))
        return dataclasses.replace(self, selection=sel, sizes=sizes, **changes)

    def on_inputs(self, x1: Batch) -> "_Call":
        """The same call on the symmetric inputs ``x1``."""
        n = batch_size_of(x1, "x1")
        return dataclasses.replace(self, x1=x1, x2=None, sizes=dataclasses.replace(self.sizes, n1=n, n2=n,
                                                                                      symmetric=True))


def _prepare(f, params, x1, x2, *, params_subset, implementation, memory_budget, sketch_dim, seed, batch_size,
             dtype, device, progress, per_example) -> _Call:
    """Validate the arguments of :func:`empirical_ntk`, move everything to the device and probe the model."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if per_example not in PER_EXAMPLE:
        raise ValueError(f"per_example must be one of {PER_EXAMPLE}, got {per_example!r}")
    if sketch_dim is not None and sketch_dim < 1:
        raise ValueError(f"sketch_dim must be >= 1, got {sketch_dim}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not params:
        raise ValueError("params is empty")
    selection = select_parameters(params, params_subset)
    dev = torch.device(device) if device is not None else params[selection.names[0]].device
    params = {n: p.detach().to(dev) for n, p in params.items()}
    symmetric = x2 is None
    x1 = batch_to(x1, dev)
    x2 = None if symmetric else batch_to(x2, dev)
    n1 = batch_size_of(x1, "x1")
    n2 = n1 if symmetric else batch_size_of(x2, "x2")
    C, _, act = _Gradients(f, params, selection, per_example).probe(slice_batch(x1, 0, 1))
    grad_dtype = params[selection.names[0]].dtype
    sizes = _Sizes(n1=n1, n2=n2, symmetric=symmetric, C=C, P=selection.num_params,
                   P_dense=sum(selection.dense_sizes.values()), P_max=max(selection.dense_sizes.values()),
                   grad_bytes=torch.empty((), dtype=grad_dtype).element_size(),
                   acc_bytes=torch.empty((), dtype=dtype).element_size(), act=act, cpu=dev.type == "cpu")
    budget = int(memory_budget) if memory_budget is not None else available_memory(dev) // 2
    return _Call(f=f, params=params, selection=selection, x1=x1, x2=x2, sizes=sizes, implementation=implementation,
                 budget=budget, batch_size=batch_size, sketch_dim=sketch_dim, seed=seed, dtype=dtype, device=dev,
                 grad_dtype=grad_dtype, per_example=per_example, progress=progress)


def empirical_ntk(
    f: ModelFn,
    params: Mapping[str, torch.Tensor],
    x1: Batch,
    x2: Batch | None = None,
    *,
    kernel: str = "sgd",
    params_subset=None,
    implementation: str = "auto",
    memory_budget: int | None = None,
    sketch_dim: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    progress: bool = False,
    per_example: str = "auto",
) -> NTKResult:
    """The class-coupled empirical NTK (or a SignGD kernel) of ``f`` at ``params`` between x1 and x2.

    Args:
        f: ``f(params, batch) -> (B, C)`` outputs; call ``torch.func.functional_call(model, params, ...)`` inside.
            Must be deterministic (eval mode: no dropout).
        params: name -> tensor, e.g. ``dict(model.named_parameters())`` (detached internally).
        x1: evaluation-side batch (tensor or mapping of tensors with leading dim N1).
        x2: training-side batch (N2); ``None`` means x2 = x1 and exploits symmetry where the kernel has it.
        kernel: ``"sgd"`` <g, g'>, ``"signgd"`` <sign g, sign g'>, ``"asigngd"`` <g(x1), sign g(x2)>; ``sign`` is
            the rule of :mod:`theory.gram` (coordinates below 2^-40 ||g||_inf count as zero).
        params_subset: theta restricted to names / a predicate / boolean masks (see :func:`select_parameters`).
        implementation: ``"jacobian"``, ``"streaming"``, ``"sketch"``, ``"factored"`` or ``"auto"`` (see the
            module docstring).
        memory_budget: bytes the call may allocate on ``device`` on top of resident parameters and inputs;
            default half of the currently available memory.
        sketch_dim: k for the sketch (default: the largest of 4096, 2048, ..., 64 that fits).
        seed: seed of the sketch's hashes.
        batch_size: the most examples per per-example-gradient block (default: chosen by the planner).
        dtype: accumulation and output dtype.
        device: where to compute (default: the parameters' device); the kernel is returned on CPU.
        progress: show a tqdm bar over gradient blocks.
        per_example: ``"vmap"`` (batched ``torch.func``), ``"loop"`` (one example at a time), or ``"auto"``
            (vmap, falling back to the loop for models that vmap cannot batch).

    Returns:
        :class:`NTKResult` with ``kernel`` (N1, C, N2, C) and the ``plan``. With x2 = None the SGD and SignGD
        kernels are symmetric bit for bit (one triangle computed, mirrored).

    Raises:
        NTKMemoryError: when no plan fits ``memory_budget``; the message names N1, N2, C, P and the bytes needed.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    call = _prepare(f, params, x1, x2, params_subset=params_subset, implementation=implementation,
                    memory_budget=memory_budget, sketch_dim=sketch_dim, seed=seed, batch_size=batch_size, dtype=dtype,
                    device=device, progress=progress, per_example=per_example)
    return _compute(call, (kernel,))[kernel]


def empirical_ntks(f: ModelFn, params: Mapping[str, torch.Tensor], x1: Batch, x2: Batch | None = None, *,
                   kernels: Sequence[str] = ("sgd", "asigngd"), **options) -> dict[str, NTKResult]:
    """Several kernels (e.g. the SGD kernel for K-SGD and the A-SignGD kernel for K-A-SignGD) of the same model and
    inputs. With the factored implementation they come from one set of capture passes and per-example rows (each
    tensor's rows are formed once and contracted once per kernel); otherwise the per-example engine runs once per
    kernel. ``options`` are those of :func:`empirical_ntk`."""
    kernels = tuple(dict.fromkeys(kernels))
    bad = [k for k in kernels if k not in KERNELS]
    if bad or not kernels:
        raise ValueError(f"kernels must be a non-empty subset of {KERNELS}, got {list(kernels)}")
    defaults = dict(params_subset=None, implementation="auto", memory_budget=None, sketch_dim=None, seed=0,
                    batch_size=None, dtype=torch.float64, device=None, progress=False, per_example="auto")
    unknown = set(options) - set(defaults)
    if unknown:
        raise TypeError(f"empirical_ntks: unknown option(s) {sorted(unknown)}")
    return _compute(_prepare(f, params, x1, x2, **{**defaults, **options}), kernels)


def empirical_ntk_fn(f: ModelFn, **options) -> Callable[..., NTKResult]:
    """A closure ``ntk(params, x1, x2=None, **more) -> NTKResult`` with ``options`` fixed (neural-tangents style)."""

    def ntk(params: Mapping[str, torch.Tensor], x1: Batch, x2: Batch | None = None, **more) -> NTKResult:
        return empirical_ntk(f, params, x1, x2, **{**options, **more})

    return ntk


def _compute(call: _Call, kernels: Sequence[str], factored: bool = True,
             row_scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> dict[str, NTKResult]:
    """Every kernel of ``kernels`` for ``call``: the factored implementation when asked for (or ``auto`` and it
    applies), else the per-example engine once per kernel. ``row_scales``: ||g||_inf over all selected parameters
    per row of x1 / x2 when this call covers only part of them (the factored remainder)."""
    fallback = ""
    if factored and call.implementation in ("factored", "auto"):
        done = _try_factored(call, tuple(kernels))
        if isinstance(done, dict):
            return done
        fallback = done
    return {k: _per_example(call, k, fallback, row_scales) for k in kernels}


def _plan_error(call: _Call, kernel: str, error: str) -> str:
    if kernel != "sgd" and call.grad_dtype != torch.float64:
        error += f"; signs of coordinates at the {str(call.grad_dtype).replace('torch.', '')} rounding level are " \
                 f"not determined"
    return error


def _per_example(call: _Call, kernel: str, fallback: str, row_scales) -> NTKResult:
    """One kernel through the per-example engine (jacobian / streaming / sketch, as planned)."""
    s = call.sizes
    implementation = "auto" if call.implementation == "factored" else call.implementation
    plan = _make_plan(s, call.budget, implementation, kernel, call.batch_size, call.sketch_dim, call.seed,
                      call.selection, call.params, call.grad_dtype, call.dtype, call.device, call.per_example)
    plan = dataclasses.replace(plan, error=_plan_error(call, kernel, plan.error))
    if fallback:
        plan = dataclasses.replace(plan, requested=call.implementation, reason=f"{plan.reason}; factored: {fallback}")
    bar = None
    if call.progress:
        from ftsim.core.progress import bar as tqdm

        bar = tqdm(total=_num_blocks(plan), desc=f"eNTK ({plan.implementation})", unit="block")
        bar.write(plan.describe())
    grads = call.gradients()
    runner = {"jacobian": _run_jacobian, "streaming": _run_streaming, "sketch": _run_sketch}[plan.implementation]
    scales = (_Thresholds(row_scales[0]), _Thresholds(row_scales[1]))
    x2 = call.x1 if call.symmetric else call.x2
    K, bound, out1, out2 = runner(grads, plan, call.x1, x2, kernel, call.dtype, bar, scales)
    if bar is not None:
        bar.close()
    if call.symmetric and kernel != "asigngd":
        mirror_lower(K)
    per = grads.per_example if grads.per_example != "auto" else "vmap"
    reason = plan.reason + (f"; per-example loop: {grads.fallback_reason}" if grads.fallback_reason else "")
    plan = dataclasses.replace(plan, per_example=per, reason=reason)
    shape = (s.n1, s.C, s.n2, s.C)
    return NTKResult(kernel=K.reshape(shape).cpu(), plan=plan,
                     error_bound=None if bound is None else bound.reshape(shape).cpu(),
                     outputs1=out1.cpu(), outputs2=out2.cpu())


def _dense_masks(selection: _Selection, params, names) -> dict[str, torch.Tensor]:
    masks = {}
    for n in names:
        idx = selection.index.get(n)
        if idx is not None:
            m = torch.zeros(params[n].numel(), dtype=torch.bool, device=params[n].device)
            m[idx] = True
            masks[n] = m.reshape(params[n].shape)
    return masks


def _subset(selection: _Selection, params, names) -> dict[str, Any]:
    """A ``params_subset`` mapping selecting ``names`` with the selection's masks."""
    masks = _dense_masks(selection, params, names)
    return {n: masks.get(n, True) for n in names}


FACTORED_CHECK_EXAMPLES = 3
AUTO_MIN_FACTORED = 0.5  # "auto" factors when at least this share of the selected parameters is covered
FACTORED_CHECK_TOL = {torch.float64: 1e-10, torch.float32: 1e-3}  # structural errors are O(1)
# The sign rule's row scales come from the kernel's own captures when every covered tensor is captured in one
# pass (see theory.ntk_factored); False forces the separate scale pass (kept for groups of tensors), which the
# benchmark times as the "before".
FUSE_SIGN_SCALES = True


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How the factored implementation holds its captures: blocks, groups of tensors or example tiles."""

    block: int
    groups: list[list[str]]
    tile1: int
    tile2: int
    tiles: int
    peak: int


@dataclasses.dataclass(frozen=True)
class _Coverage:
    """What the probe of the factored implementation found: the covered tensors and what their captures need."""

    covered: list[str]
    uncovered: dict[str, str]  # tensor -> the operation that used it in an uncaptured way
    covered_params: int
    per_cap: int  # captured bytes per example
    per_name: Mapping[str, int]  # captured bytes per example that each tensor needs
    masks: Mapping[str, torch.Tensor]
    signature: tuple
    chunk: int  # bytes of one tensor's gradient rows formed at once


def _factored_budget_message(call: _Call, cov: _Coverage, need: int, detail: str) -> str:
    s = call.sizes
    return (f"memory budget {format_bytes(call.budget)} is too small for the factored eNTK of N1={s.n1}, N2={s.n2} "
            f"examples, C={s.C} outputs and P={s.P:,} parameters ({cov.covered_params:,} of them captured: "
            f"{format_bytes(cov.per_cap)} of inputs and output gradients per example, {format_bytes(s.base_bytes)} "
            f"for the kernel itself): {detail}; it needs at least {format_bytes(need)}. Raise memory_budget, "
            f"restrict params_subset, or use implementation='auto'.")


def _chunk_bytes(budget: int, cpu: bool) -> int:
    """Bytes of one tensor's gradient rows formed at once: at most a 16th of the budget (4 buffers are reserved)."""
    return min(fz.chunk_bytes_default(cpu), max(1 << 16, budget // 16))


def _factored_need(held: int, cpu: bool) -> int:
    """The least budget B with B >= held + 4 * _chunk_bytes(B) (the row buffers grow with the budget)."""
    need = held + 4 * _chunk_bytes(held, cpu)
    for _ in range(64):  # a contraction (slope <= 1/4): converges in a few steps
        nxt = held + 4 * _chunk_bytes(need, cpu)
        if nxt <= need:
            break
        need = nxt
    return need


def _factored_layout(call: _Call, cov: _Coverage, refuse) -> _Layout | str:
    """Blocks and tiles (or groups of tensors) whose captures fit the budget, or a refusal naming the sizes."""
    s = call.sizes
    per_cap, per_name = cov.per_cap, cov.per_name
    per_work = int(_WORK_FACTOR * (s.act + per_cap))
    n_all = s.n1 if call.symmetric else s.n1 + s.n2
    fixed = s.base_bytes + 4 * cov.chunk
    # the least that can be held: two tiles of one example (one if there is a single example), or one tensor's
    # captures of every example (one pass per tensor)
    hold_min = min(per_cap * (1 if call.symmetric and s.n1 == 1 else 2),
                   max(per_name.get(k, 0) for k in cov.covered) * n_all)
    need = _factored_need(s.base_bytes + (call.batch_size or 1) * per_work + hold_min, s.cpu)
    room0 = call.budget - fixed
    if room0 <= 0:
        return refuse(_factored_budget_message(
            call, cov, need, f"nothing is left beside the kernel and the row buffers ({format_bytes(fixed)})"),
            NTKMemoryError)
    b = call.batch_size or max(1, min(MAX_BLOCK, max(s.n1, s.n2), (room0 // 4) // max(per_work, 1),
                                      (room0 - hold_min) // max(per_work, 1)))
    room = room0 - b * per_work
    groups = [cov.covered]
    if n_all * per_cap > room:  # one capture pass per group of tensors, if the groups fit; else example tiles
        groups = fz.groups_for(cov.covered, per_name, n_all, room) or [cov.covered]
    if len(groups) == 1 and room < per_cap * (1 if call.symmetric and s.n1 == 1 else 2):
        return refuse(_factored_budget_message(
            call, cov, need, f"{format_bytes(max(room, 0))} is left for the captures of blocks of {b} examples"),
            NTKMemoryError)
    if len(groups) > 1:
        tile1, tile2, tiles = s.n1, s.n2, 1
        held = max(sum(per_name.get(k, 0) for k in g) for g in groups) * n_all // max(per_cap, 1)
    elif call.symmetric:
        tile1, tiles = fz.tiles_for(s.n1, per_cap, room, True)
        tile2, held = tile1, (tile1 if tiles == 1 else 2 * tile1)
    else:
        if (s.n1 + s.n2) * per_cap <= room:
            tile1, tile2, tiles = s.n1, s.n2, 1
        else:
            tile1 = tile2 = max(1, room // (2 * per_cap))
            tiles = math.ceil(s.n2 / tile2)
        held = min(s.n1, tile1) + min(s.n2, tile2)
    return _Layout(block=int(b), groups=groups, tile1=int(tile1), tile2=int(tile2), tiles=int(tiles),
                   peak=int(fixed + held * per_cap + b * per_work))


def _setup(call: _Call, cov: _Coverage, names: Sequence[str], block: int, dtype: torch.dtype | None = None,
           whole: bool = True) -> fz.Setup:
    """The factored computation of ``names`` (``whole``: all the covered tensors, so the probe's signature holds)."""
    return fz.Setup(f=call.f, params=call.params, names=tuple(names), masks=cov.masks, C=call.sizes.C,
                    dtype=dtype or call.dtype, block=block, chunk_bytes=cov.chunk,
                    signature=cov.signature if whole else None)


def _factored_check(call: _Call, cov: _Coverage, nv: int, refuse):
    """The factored SGD kernel of the covered tensors on the first examples against per-example gradients.

    The SGD kernel is checked, whatever kernels were asked for: it compares the gradient rows both share, while
    a sign kernel also depends on the signs of coordinates that are zero in exact arithmetic.

    Returns (check text, relative error or None, examples used), or a refusal."""
    s = call.sizes
    # as many of the probe's examples as the reference gradients allow, down to 2 (one pair; 1 if there is one)
    ref_bytes = lambda k: 2 * k * s.C * cov.covered_params * s.grad_bytes  # noqa: E731
    nc = next((k for k in range(nv, min(2, nv) - 1, -1) if ref_bytes(k) <= call.budget // 2), 0)
    ref = None
    xc = slice_batch(call.x1, 0, nc)
    if nc:
        sub = call.restricted(_subset(call.selection, call.params, cov.covered), implementation="jacobian",
                              dtype=torch.float64, progress=False).on_inputs(xc)
        try:
            ref = _compute(sub, ("sgd",), factored=False)["sgd"].matrix()
        except NTKMemoryError:
            pass
    if ref is None:
        return (f"skipped (the reference gradients of {min(2, nv)} examples, {format_bytes(ref_bytes(min(2, nv)))}, "
                f"do not fit half the budget)"), None, nv
    try:
        setup = _setup(call, cov, cov.covered, nc, torch.float64, whole=nc == nv)
        (mine,), _, _, _ = fz.run_factored(setup, xc, None, nc, nc, [(False, False)], tile1=nc, tile2=nc)
    except RuntimeError as exc:
        return refuse(f"capture differs between runs ({exc})")
    scale = float(ref.norm())
    err = float((mine.cpu() - ref).norm()) / (scale if scale > 0 else 1.0)
    tol = FACTORED_CHECK_TOL.get(call.grad_dtype, 1e-2)
    if not err <= tol:
        return refuse(f"the factored kernel disagrees with per-example gradients on the first {nc} examples "
                      f"(relative error {err:.2e} > {tol:g}); the model may not keep examples independent along "
                      f"dim 0 of every captured input")
    return f"SGD kernel, max rel. error {err:.1e} vs per-example gradients (tol {tol:g})", err, nc


def _row_scales(call: _Call, setup: fz.Setup | None, uncovered: Sequence[str], need: tuple[bool, bool]) -> tuple:
    """||g||_inf for each row (example, output) of x1 and x2, (n*C,) float64 (``None`` on a side not in ``need``):
    over the tensors of ``setup`` from captures of their own (``None``: none) and over the ``uncovered`` tensors
    from per-example gradients -- the sign rule's scale, or the part of it that the factored kernel's own captures
    do not provide."""
    s = call.sizes
    rest, rest_block = None, 1
    if uncovered:
        sub = call.restricted(_subset(call.selection, call.params, uncovered))
        rest = sub.gradients()
        rest_block = max(1, min(MAX_BLOCK, (call.budget // 2) // max(sub.sizes.work_bytes(), 1)))
    block = setup.block if setup is not None else rest_block

    def side(x, n):
        out = torch.zeros(n * s.C, dtype=torch.float64, device=call.device)
        for a in range(0, n, block):
            e = min(n, a + block)
            if setup is not None:
                out[a * s.C:e * s.C] = fz.row_scales(setup, slice_batch(x, a, e), e - a).to(out.device)
            for r0 in (range(a, e, rest_block) if rest is not None else ()):
                r1 = min(e, r0 + rest_block)
                rows, _ = rest.block(slice_batch(x, r0, r1))
                for g in rows.values():
                    out[r0 * s.C:r1 * s.C] = torch.maximum(out[r0 * s.C:r1 * s.C], row_scale(g).to(out.device))
        return out

    one = side(call.x1, s.n1) if need[0] else None
    if call.symmetric:
        return one, one
    return one, (side(call.x2, s.n2) if need[1] else None)


def _factored_coverage(call: _Call, nv: int, refuse) -> _Coverage | str:
    """Probe the first ``nv`` examples: which selected tensors the factored engine covers, and their capture sizes."""
    s, selection = call.sizes, call.selection
    try:
        probe = fz.capture_block(call.f, call.params, selection.names, slice_batch(call.x1, 0, nv), nv)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
        return refuse(f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    uncovered = dict(probe.uncovered)
    covered = [n for n in selection.names if n not in uncovered]
    if not any(u.name in covered for u in probe.uses):
        return refuse("no selected tensor enters a captured operation (linear, addmm, embedding, layer/RMS norm, "
                      "elementwise product)")
    P_cov = sum(selection.sizes[n] for n in covered)
    if call.implementation == "auto" and P_cov < AUTO_MIN_FACTORED * s.P:
        return (f"only {P_cov:,} of {s.P:,} parameters enter captured operations (uncovered: "
                f"{_some(sorted(uncovered), 3)}), below {AUTO_MIN_FACTORED:.0%}")
    probe.drop(set(uncovered))
    return _Coverage(covered=covered, uncovered=uncovered, covered_params=P_cov,
                     per_cap=max(1, probe.nbytes() // nv),
                     per_name={k: -(-v // nv) for k, v in probe.bytes_per_name().items()},
                     masks=_dense_masks(selection, call.params, covered), signature=probe.signature,
                     chunk=_chunk_bytes(call.budget, s.cpu))


def _factored_kernels(call: _Call, cov: _Coverage, layout: _Layout, signs: list[tuple[bool, bool]]):
    """The factored kernels of the covered tensors (one per entry of ``signs``), the outputs, the sign scales over
    every selected tensor (for the remainder) and how they were obtained."""
    s, b, groups = call.sizes, layout.block, layout.groups
    need = fz.signed_sides(signs, call.symmetric)
    uncovered = sorted(cov.uncovered)
    fuse = FUSE_SIGN_SCALES and len(groups) == 1 and any(need)
    scales, how = (None, None), None
    if any(need):
        if fuse:  # the covered part comes from the kernel's captures; the uncovered part first, if any
            scales = _row_scales(call, None, uncovered, need) if uncovered else (None, None)
            how = "from the kernel's captures" + (" and per-example gradients of the uncovered tensors"
                                                  if uncovered else "")
        else:
            scales = _row_scales(call, _setup(call, cov, cov.covered, b), uncovered, need)
            how = "separate capture pass" + (" (tensors captured in groups)" if len(groups) > 1 else "")
    bar = None
    if call.progress:
        from ftsim.core.progress import bar as tqdm

        tiles = layout.tiles
        n_caps = (math.ceil(s.n1 / b) * (tiles + 1) // 2 * max(1, tiles) if call.symmetric
                  else math.ceil(s.n2 / b) + tiles * math.ceil(s.n1 / b))
        bar = tqdm(total=n_caps * len(groups), desc="eNTK (factored)", unit="block")
    Ks = None
    for group in groups:
        setup = _setup(call, cov, group, b, whole=len(groups) == 1)
        Kg, o1, o2, sc = fz.run_factored(setup, call.x1, call.x2, s.n1, s.n2, signs, tile1=layout.tile1,
                                         tile2=layout.tile2, bar=bar, scales=scales, fuse_scales=fuse)
        if Ks is None:
            Ks, out1, out2, scales = Kg, o1, o2, sc
        else:
            for K, k in zip(Ks, Kg):
                K += k
        del Kg
    if bar is not None:
        bar.close()
    return Ks, out1, out2, scales, how


def _try_factored(call: _Call, kernels: tuple[str, ...]) -> dict[str, NTKResult] | str:
    """The factored implementation (:mod:`theory.ntk_factored`), checked against the per-example engine on the
    first examples. Returns the results, or (for ``"auto"``) the reason it was not used."""
    s, requested, selection = call.sizes, call.implementation, call.selection

    def refuse(why: str, error=RuntimeError) -> str:
        if requested == "factored":
            raise error(f"implementation='factored': {why}")
        return why

    nv = min(FACTORED_CHECK_EXAMPLES, s.n1)
    cov = _factored_coverage(call, nv, refuse)
    if isinstance(cov, str):
        return cov
    checked = _factored_check(call, cov, nv, refuse)
    if isinstance(checked, str):
        return checked
    check, check_err, check_n = checked
    layout = _factored_layout(call, cov, refuse)
    if isinstance(layout, str):
        return layout
    signs = [_signs(k) for k in kernels]
    Ks, out1, out2, scales, scales_how = _factored_kernels(call, cov, layout, signs)
    uncovered = cov.uncovered
    info = {"kernels_from_same_captures": list(kernels), "covered_tensors": len(cov.covered),
            "covered_params": cov.covered_params, "uncovered": uncovered, "check": check, "check_examples": check_n,
            "check_rel_error": check_err, "capture_bytes_per_example": cov.per_cap, "chunk_bytes": cov.chunk,
            "capture_groups": len(layout.groups), "sign_scale_pass": scales_how is not None,
            "sign_scales": scales_how, "remainder_plan": None}
    why = ("requested" if requested == "factored" else
           "every selected tensor's per-example gradients rebuild from captured inputs and output gradients"
           if not uncovered else f"{len(cov.covered)} of {len(selection.names)} tensors factor")
    exact = f"exact up to {str(call.grad_dtype).replace('torch.', '')} rounding"
    plan = Plan(
        implementation="factored", requested=requested, kernel=kernels[0], num_examples1=s.n1, num_examples2=s.n2,
        symmetric=call.symmetric, num_outputs=s.C, num_params=s.P,
        num_params_total=sum(int(p.numel()) for p in call.params.values()), num_tensors=len(selection.names),
        grad_dtype=str(call.grad_dtype).replace("torch.", ""), dtype=str(call.dtype).replace("torch.", ""),
        device=str(call.device), batch_size=layout.block, tile_size=layout.tile1, num_tiles=layout.tiles,
        sketch_dim=None, seed=None, per_example="batched backward", memory_budget=call.budget,
        estimated_peak_bytes=layout.peak, activation_bytes_per_example=s.act, error=exact, reason=why, factored=info)
    shape = (s.n1, s.C, s.n2, s.C)
    remainder = {}
    if uncovered:  # kernels of disjoint subsets add: the per-example engine for the rest
        rest = call.restricted(_subset(selection, call.params, sorted(uncovered)), implementation="auto")
        remainder = _compute(rest, kernels, factored=False, row_scales=scales)
    results = {}
    for kern, K in zip(kernels, Ks):
        bound, kplan = None, dataclasses.replace(plan, kernel=kern, error=_plan_error(call, kern, exact))
        if kern in remainder:
            rem = remainder[kern]
            K += rem.matrix().to(K.device)
            bound = None if rem.error_bound is None else rem.error_bound.reshape(shape).cpu()
            kplan = dataclasses.replace(
                kplan, factored={**info, "remainder_plan": rem.plan.describe().replace("\n", " |")},
                error=kplan.error if rem.plan.implementation != "sketch" else
                "factored part exact; uncovered part " + rem.plan.error)
        if call.symmetric and kern != "asigngd":
            mirror_lower(K)
        results[kern] = NTKResult(kernel=K.reshape(shape).cpu(), plan=kplan, error_bound=bound,
                                  outputs1=out1.cpu(), outputs2=out2.cpu())
    return results


def _make_plan(s: _Sizes, budget: int, implementation: str, kernel: str, cap: int | None, k: int | None,
               seed: int, sel: _Selection, params, grad_dtype, dtype, dev, per_example: str) -> Plan:
    exact = _plan_streaming(s, budget, cap, kernel)
    chosen, reason, choice = None, "", None
    if implementation == "jacobian":
        choice, need = _plan_jacobian(s, budget, cap)
        chosen, reason = "jacobian", "requested: every gradient row materialised"
        if choice is None:
            _raise_budget(s, budget, kernel, f"implementation='jacobian' needs at least {format_bytes(need)}")
    elif implementation == "streaming":
        choice, need = exact
        chosen, reason = "streaming", "requested"
        if choice is None:
            _raise_budget(s, budget, kernel, f"exact streaming needs at least {format_bytes(need)}")
    elif implementation == "sketch":
        choice, need = _plan_sketch(s, budget, cap, k, kernel)
        chosen, reason = "sketch", "requested"
        if choice is None:
            _raise_budget(s, budget, kernel, f"a sketch of dim {k or 64} needs at least {format_bytes(need)}")
    else:  # auto: exact whenever an exact plan fits; a sketch only when none does
        choice, need_exact = exact
        if choice is not None:
            chosen = "streaming"
            reason = ("all training-side gradients fit the budget" if choice["num_tiles"] == 1 else
                      f"exact streaming fits the budget with the training side in {choice['num_tiles']} tiles of "
                      f"<= {choice['tile_size']} examples (x1 gradients computed {choice['num_tiles']} times); "
                      f"exact is preferred to a sketch whenever an exact plan fits")
        else:
            sk, need_sketch = _plan_sketch(s, budget, cap, k, kernel)
            if sk is None:
                _raise_budget(s, budget, kernel, f"exact streaming needs at least {format_bytes(need_exact)} and "
                                                 f"a sketch of dim {k or 64} at least {format_bytes(need_sketch)}")
            chosen, choice = "sketch", sk
            reason = (f"no exact plan fits: exact streaming needs at least {format_bytes(need_exact)} "
                      f"(one stored example and one block), more than the budget")
    if cap is not None and choice["batch_size"] < cap:
        reason += f"; batch_size reduced from {cap} to {choice['batch_size']} to fit the budget"
    dim = choice.get("sketch_dim")
    if chosen == "sketch":
        error = (f"count-sketch: unbiased, per-entry std <= sqrt(2/{dim})*||g||*||g'|| = "
                 f"{math.sqrt(2 / dim):.3g}*||g||*||g'||")
    else:
        error = f"exact up to {str(grad_dtype).replace('torch.', '')} rounding"
    return Plan(
        implementation=chosen, requested=implementation, kernel=kernel, num_examples1=s.n1, num_examples2=s.n2,
        symmetric=s.symmetric, num_outputs=s.C, num_params=s.P,
        num_params_total=sum(int(p.numel()) for p in params.values()), num_tensors=len(sel.names),
        grad_dtype=str(grad_dtype).replace("torch.", ""), dtype=str(dtype).replace("torch.", ""), device=str(dev),
        batch_size=choice["batch_size"], tile_size=choice["tile_size"], num_tiles=choice["num_tiles"],
        sketch_dim=dim, seed=seed if chosen == "sketch" else None, per_example=per_example,
        memory_budget=budget, estimated_peak_bytes=int(choice["peak"]), activation_bytes_per_example=s.act,
        error=error, reason=reason,
    )


def _raise_budget(s: _Sizes, budget: int, kernel: str, detail: str) -> None:
    raise NTKMemoryError(
        f"memory budget {format_bytes(budget)} is too small for the {kernel} eNTK of N1={s.n1}, N2={s.n2} "
        f"examples, C={s.C} outputs and P={s.P:,} parameters ({s.grad_bytes}-byte gradients: "
        f"{format_bytes(s.row_bytes)} per example, {format_bytes(s.work_bytes())} working memory per example, "
        f"{format_bytes(s.base_bytes)} for the kernel itself): {detail}. Raise memory_budget, restrict "
        f"params_subset, or use implementation='sketch' with a smaller sketch_dim.")


def _num_blocks(plan: Plan) -> int:
    b = plan.batch_size
    n1b, n2b = math.ceil(plan.num_examples1 / b), math.ceil(plan.num_examples2 / b)
    if plan.implementation == "streaming":
        return n1b if (plan.symmetric and plan.num_tiles == 1) else n2b + plan.num_tiles * n1b
    return n1b if plan.symmetric else n1b + n2b


def _tick(bar) -> None:
    if bar is not None:
        bar.update(1)


def _blocks(grads: _Gradients, x: Batch, n: int, b: int, start: int = 0, stop: int | None = None,
            bar=None) -> Iterator[tuple[int, int, dict[str, torch.Tensor], torch.Tensor]]:
    stop = n if stop is None else stop
    for s, e in _ranges(stop - start, b, start):
        rows, out = grads.block(slice_batch(x, s, e))
        _tick(bar)
        yield s, e, rows, out


def _signs(kernel: str) -> tuple[bool, bool]:
    """(sign on the x1 side, sign on the x2 side)."""
    return {"sgd": (False, False), "signgd": (True, True), "asigngd": (False, True)}[kernel]


class _Thresholds:
    """Per-row thresholds tau * ||g||_inf of the sign rule (:mod:`theory.gram`) for one side of the kernel.

    ``external`` is the (N*C,) row scale over *all* selected parameters when this engine computes only part of them
    (the factored implementation's uncovered remainder); otherwise each block's scale comes from its own rows,
    which hold every selected tensor."""

    def __init__(self, external: torch.Tensor | None):
        self.external = external

    def of(self, s: int, e: int, C: int, rows: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.external is not None:
            scale = self.external[s * C:e * C]
        else:
            scale = None
            for g in rows.values():
                r = row_scale(g)
                scale = r if scale is None else torch.maximum(scale, r)
        dev = next(iter(rows.values())).device
        return (SIGN_RTOL * scale).to(dev)


def _run_jacobian(grads, plan, x1, x2, kernel, dtype, bar, scales):
    C = plan.num_outputs
    sa, sb = _signs(kernel)

    def materialise(x, n, side: _Thresholds, need: bool):
        rows = {name: None for name in grads.selection.names}
        outs, thr = [], []
        for s, e, block, out in _blocks(grads, x, n, plan.batch_size, bar=bar):
            if need:
                thr.append(side.of(s, e, C, block))
            for name, g in block.items():
                if rows[name] is None:
                    rows[name] = torch.empty(n * C, g.shape[1], dtype=g.dtype, device=g.device)
                rows[name][s * C:e * C] = g
            outs.append(out)
        return rows, torch.cat(outs), (torch.cat(thr) if need else None)

    J1, out1, t1 = materialise(x1, plan.num_examples1, scales[0], sa or (plan.symmetric and sb))
    if plan.symmetric:
        J2, out2, t2 = J1, out1, t1
    else:
        J2, out2, t2 = materialise(x2, plan.num_examples2, scales[1], sb)
    K = torch.zeros(plan.num_examples1 * C, plan.num_examples2 * C, dtype=dtype, device=out1.device)
    for name in grads.selection.names:
        accumulate(K, J1[name], J2[name], t1 if sa else None, t2 if sb else None)
    return K, None, out1, out2


def _run_streaming(grads, plan, x1, x2, kernel, dtype, bar, scales):
    C, b = plan.num_outputs, plan.batch_size
    n1, n2 = plan.num_examples1, plan.num_examples2
    sa, sb = _signs(kernel)
    names = grads.selection.names
    sizes = grads.selection.sizes
    K = None

    def new_store(rows: int, like: torch.Tensor) -> dict[str, torch.Tensor]:
        # One contiguous (rows, P_name) matrix per tensor: a block is contracted against every stored row in one
        # product per tensor, which reads the store once per block (not once per pair of blocks).
        return {name: torch.empty(rows, sizes[name], dtype=like.dtype, device=like.device) for name in names}

    if plan.symmetric and plan.num_tiles == 1:
        store = None
        outs = []
        thr_all = None  # asigngd: thresholds of the stored (raw) rows, signed on the fly
        for s, e, block, out in _blocks(grads, x1, n1, b, bar=bar):
            if K is None:
                K = torch.zeros(n1 * C, n2 * C, dtype=dtype, device=out.device)
                store = new_store(n1 * C, block[names[0]])
                if sb:
                    thr_all = torch.zeros(n1 * C, dtype=torch.float64, device=out.device)
            outs.append(out)
            rows, done, before = slice(s * C, e * C), slice(0, e * C), slice(0, s * C)
            if sb:
                thr_all[rows] = scales[0].of(s, e, C, block)
            thr_new, thr_done, thr_before = ((thr_all[rows], thr_all[done], thr_all[before]) if sb
                                             else (None, None, None))
            last = e == n1  # the last block is never read again: contract it in place, skip its copy
            for name in names:
                g = block.pop(name)  # (b*C, P_name)
                if kernel == "signgd":  # both sides signed: store the signed rows once
                    g = sign_rows(g, thr_new)
                if last:
                    new, upto = g, store[name][before]
                else:
                    store[name][rows] = g
                    new, upto = store[name][rows], store[name][done]
                del g
                if kernel == "asigngd":  # not symmetric: K[I, :e] = <g_I, sign g_:e>, K[:s, I] = <g_:s, sign g_I>
                    if last:
                        accumulate(K[rows, rows], new, new, None, thr_new)
                        if s > 0:
                            accumulate(K[rows, before], new, upto, None, thr_before)
                    else:
                        accumulate(K[rows, done], new, upto, None, thr_done)
                    if s > 0:
                        accumulate(K[before, rows], store[name][before], new, None, thr_new)
                elif last:  # K[:s, I] and the diagonal block
                    accumulate(K[rows, rows], new, new, None, None)
                    if s > 0:
                        accumulate(K[before, rows], upto, new, None, None)
                else:  # K[:e, I] in one product; the block row K[I, :s] is its mirror image
                    accumulate(K[done, rows], upto, new, None, None)
                del new, upto
            if kernel != "asigngd" and s > 0:
                K[rows, before] = K[before, rows].T
        out1 = torch.cat(outs)
        return K, None, out1, out1

    out1_parts: list[torch.Tensor] = []
    out2_parts: list[torch.Tensor] = []
    side2 = scales[0] if plan.symmetric else scales[1]
    for tile_start in range(0, n2, plan.tile_size):
        tile_stop = min(n2, tile_start + plan.tile_size)
        store = None
        for s, e, block, out in _blocks(grads, x2, n2, b, tile_start, tile_stop, bar=bar):
            if store is None:
                store = new_store((tile_stop - tile_start) * C, block[names[0]])
            rows = slice((s - tile_start) * C, (e - tile_start) * C)
            thr = side2.of(s, e, C, block) if sb else None
            for name in names:
                g = block.pop(name)
                store[name][rows] = sign_rows(g, thr) if sb else g
                del g
            out2_parts.append(out)
        cols = slice(tile_start * C, tile_stop * C)
        for s, e, block, out in _blocks(grads, x1, n1, b, bar=bar):
            if K is None:
                K = torch.zeros(n1 * C, n2 * C, dtype=dtype, device=out.device)
            if tile_start == 0:
                out1_parts.append(out)
            rows = slice(s * C, e * C)
            thr = scales[0].of(s, e, C, block) if sa else None
            for name in names:
                accumulate(K[rows, cols], block.pop(name), store[name], thr, None)
        del store
    out1, out2 = torch.cat(out1_parts), torch.cat(out2_parts)
    return K, None, out1, (out1 if plan.symmetric else out2)


def _run_sketch(grads, plan, x1, x2, kernel, dtype, bar, scales):
    C, b, k = plan.num_outputs, plan.batch_size, plan.sketch_dim
    n1, n2 = plan.num_examples1, plan.num_examples2
    sa, sb = _signs(kernel)
    sketch = CountSketch(k, plan.seed)
    names = grads.selection.names

    def sketch_side(x, n, sign, also_other_sign: bool, side: _Thresholds):
        S = S_other = norms = norms_other = None
        outs = []
        for s, e, block, out in _blocks(grads, x, n, b, bar=bar):
            if S is None:
                S = torch.zeros(n * C, k, dtype=dtype, device=out.device)
                norms = torch.zeros(n * C, dtype=dtype, device=out.device)
                if also_other_sign:
                    S_other, norms_other = torch.zeros_like(S), torch.zeros_like(norms)
            outs.append(out)
            rows = slice(s * C, e * C)
            thr = side.of(s, e, C, block) if (sign or also_other_sign) else None
            for part, name in enumerate(names):
                raw = block.pop(name)
                buckets, signs = sketch.hashes(part, raw.shape[1], raw.device, dtype)
                for c0 in range(0, raw.shape[1], SKETCH_CHUNK):
                    c1 = min(raw.shape[1], c0 + SKETCH_CHUNK)
                    for signed, SS, NN in ((sign, S, norms), (True, S_other, norms_other)):
                        if SS is None:
                            continue
                        v = raw[:, c0:c1]
                        v = (sign_rows(v, thr) if signed else v).to(dtype)
                        NN[rows] += torch.linalg.vector_norm(v, dim=1) ** 2
                        count_sketch(v, buckets[c0:c1], signs[c0:c1], k, out=SS[rows])
                        del v
        return S, norms, S_other, norms_other, torch.cat(outs)

    both = plan.symmetric and sa != sb  # asigngd with x2 = x1: raw and signed sketches in one pass
    S1, q1, S2, q2, out1 = sketch_side(x1, n1, sa, both, scales[0])
    if plan.symmetric:
        out2 = out1
        if not both:
            S2, q2 = S1, q1
    else:
        S2, q2, _, _, out2 = sketch_side(x2, n2, sb, False, scales[1])
    K = S1 @ S2.T
    bound = count_sketch_std_bound(q1, q2, k)
    return K, bound, out1, out2
