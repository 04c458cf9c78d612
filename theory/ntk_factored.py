"""The factored eNTK: per-example gradients rebuilt from the inputs and output gradients of each parameterised
operation, captured in ordinary *batched* forward and backward passes.

For a linear map ``y = x W^T + b`` applied to every position s of example i, the gradient of an output f_c(x_i)
with respect to W is ``sum_s delta[c, i, s]^T x[i, s]``, where ``delta[c, i, s] = d f_c(x_i) / d y[i, s]``.
Because examples do not interact in a forward pass (no batch statistics), one batched backward pass of
``sum_i f_c(x_i)`` yields every example's ``delta`` at once. So the eNTK needs only C batched backward passes
(the floor of any method) plus, per parameter tensor, the materialisation of the per-example rows from (x, delta)
and the Gram product -- layer by layer, so the rows of one tensor (not of the whole model) are in memory at once,
and each Gram is one wide GEMM over all N*C rows instead of many block products.

Captured operations (by identity of the parameter tensor passed in, so ``torch.func.functional_call`` models and
tied weights work):

* ``F.linear`` weight and bias, ``x @ w.T`` / ``x @ w`` with a 2-d parameter w, and ``torch.addmm(b, x, w)``
  (GPT-2's ``Conv1D``: ``addmm(bias, x.view(-1, nx), weight)``);
* ``F.embedding`` weight (rows are scattered by token id; only rows used by both sides are formed), also with an
  index shared by all examples (position ids of shape (1, T)) whose output is broadcast-added to a batched tensor;
* ``F.layer_norm`` and ``F.rms_norm`` weight and bias;
* elementwise ``*`` of a tensor by a parameter broadcast over it (HF's ``RMSNorm``: ``weight * hidden``);
* ``+`` of a parameter, or of a static slice of one, broadcast over a batched tensor (a bias add, learned
  position embeddings ``x + pos[:T]``).

**Where the examples are.** A tensor is *batched* when its dim 0 is the n examples of the block. A reshape of a
batched tensor to (n*S, ...) rows (``x.view(-1, nx)``) is still example-major: reshapes follow the logical
row-major order, so rows ``i*S .. i*S+S-1`` are example i's. The capture records such reshapes (by a weak
reference, so nothing is kept alive), and a linear map on them stores its input as (n, S, nx) and its output
gradients as (C, n, S, nf), exactly as if it had been applied to the (n, S, nx) tensor.

**Shared embedding indices.** ``F.embedding(position_ids, wpe)`` with ``position_ids`` of shape (1, T) is the
same for every example; its output E (1, T, d) is added to a batched (n, T, d) tensor h. The gradient that
reaches E in a batched backward pass is summed over the examples, so it is captured at the add instead: with
``delta[c, i, t] = d f_c(x_i) / d (h + E)[i, t]``, the per-example gradient of row r is
``sum_{t : ids[t] = r} delta[c, i, t]``. Any other use of E makes the table uncovered.

Rows of a tensor that no example touches (vocabulary rows of an unused token, label-word rows of a tied LM head)
are skipped: their contribution to every product is exactly zero, also after ``sign``.

Any other use of a selected parameter (``w.T``, ``w[:T]``, a custom CUDA op) makes that tensor *uncovered*; its
kernel is computed by the per-example (vmap) engine and added, which is exact because kernels of disjoint
parameter subsets add up. :func:`theory.ntk.empirical_ntk` checks the factored kernel against the per-example
engine on a few examples before it uses it (models where the example dimension is not the leading one of every
captured input would fail that check and are computed by the per-example engine instead).

**Sign scales.** The SignGD kernels need ||g||_inf over every selected parameter for each row (example, output)
before any coordinate is signed (:mod:`theory.gram`). :func:`run_factored` computes it from the captures it takes
anyway, the first time each tile of examples is captured (each block product needs only the scales of its own two
tiles); only when the tensors are captured in several groups does the scale need a capture pass of its own
(:func:`row_scales`), because no single pass sees every tensor.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from theory.batching import slice_batch
from theory.gram import SIGN_RTOL, accumulate, mirror_lower, row_scale

__all__ = ["Setup", "Capture", "capture_block", "FactoredKernel", "run_factored", "row_scales", "signed_sides"]

_MUL = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_ADDMM = {torch.addmm, torch.Tensor.addmm}
_RESHAPE = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten}


def _is_transpose(func, args) -> bool:
    """``w.T`` / ``w.t()`` / ``torch.t(w)`` / ``w.mT`` of a 2-d tensor."""
    if func in (torch.Tensor.t, torch.t):
        return True
    owner = getattr(func, "__self__", None)
    return (owner is torch.Tensor.T or owner is torch.Tensor.mT) and len(args) == 1 and args[0].dim() == 2


def _static_index(index) -> bool:
    """An index made of slices, integers, None and Ellipsis only (a view whose position does not depend on data)."""
    items = index if isinstance(index, tuple) else (index,)
    return all(isinstance(i, (slice, int, type(None), type(Ellipsis))) and not isinstance(i, bool) for i in items)


_RMS_NORM = getattr(F, "rms_norm", None)


def _tensors_in(args, kwargs):
    """The tensors among the arguments of a call (in lists, tuples and dicts too). A direct walk: ``tree_flatten``
    cost a fifth of a tiny GPT-2's capture time."""
    stack = [kwargs, args]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())


@dataclasses.dataclass(frozen=True)
class _Use:
    kind: str  # "linear" | "linear_t" | "embedding" | "norm" | "mul" | "add"
    name: str  # parameter name
    role: str  # "weight" | "bias"
    x: int  # key of the captured input (token ids for embeddings)
    out: int  # index of the captured output
    # embedding: (padding index, index shared by all examples); norm: (kind, shape, eps); add: (static index,)
    extra: tuple = ()


class _CaptureMode(TorchFunctionMode):
    def __init__(self, by_id: Mapping[int, str], n: int):
        super().__init__()
        self.by_id = by_id
        self.n = n
        self.uses: list[_Use] = []
        self.inputs: dict[int, torch.Tensor] = {}
        self.outs: list[torch.Tensor] = []
        self.split: dict[int, int] = {}  # output index -> S: the output's n*S rows are (n, S) example-major
        self.uncovered: dict[str, str] = {}
        self.views: dict[int, tuple[str, Any, torch.Tensor]] = {}  # id(view) -> (name, index, view)
        self.transposed: dict[int, tuple[str, torch.Tensor]] = {}  # id(w.T) -> (name, w.T)
        self.shared: dict[int, tuple[str, torch.Tensor, torch.Tensor, Any]] = {}  # id(E) -> (name, ids, E, pad)
        self.flat: dict[int, tuple[weakref.ref, int]] = {}  # id(t) -> (t, S): t reshapes a batched tensor to n*S rows
        self._alive: list[torch.Tensor] = []  # flattened inputs whose (n, S, ...) view is kept: their ids stay theirs

    def _input(self, t: torch.Tensor, S: int = 1) -> int:
        """Key of a captured input; one with n*S example-major rows is kept as its (n, S, ...) view."""
        key = id(t)
        if key not in self.inputs:
            if S == 1:
                self.inputs[key] = t
            else:
                self.inputs[key] = t.reshape(self.n, S, *t.shape[1:])
                self._alive.append(t)
        return key

    def _out(self, t: torch.Tensor, S: int = 1) -> int:
        """Index of a captured operation's output (each is a fresh tensor: no lookup needed)."""
        self.outs.append(t)
        if S > 1:
            self.split[len(self.outs) - 1] = S
        return len(self.outs) - 1

    def _batched(self, t: Any, min_dim: int = 2) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() >= min_dim and t.shape[0] == self.n

    def _rows_per_example(self, t: Any, min_dim: int = 2) -> int | None:
        """S when dim 0 of ``t`` holds the block's examples as n*S example-major rows (S = 1: ``t`` is batched);
        ``None`` when it is not known to."""
        if not isinstance(t, torch.Tensor) or t.dim() < min_dim:
            return None
        if t.shape[0] == self.n:
            return 1
        entry = self.flat.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def _tracked(self, t: Any) -> str | None:
        """The parameter behind ``t`` when ``t`` is a selected parameter or a view / transpose / shared embedding
        of one that is waiting for the operation that uses it."""
        if not isinstance(t, torch.Tensor):
            return None
        key = id(t)
        if key in self.by_id:
            return self.by_id[key]
        for table in (self.views, self.transposed, self.shared):
            if key in table:
                return table[key][0]
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        captured = self._try_capture(func, args, kwargs)
        if captured is not None:
            return captured
        out = func(*args, **kwargs)
        if func in _RESHAPE and isinstance(out, torch.Tensor) and args:
            self._note_reshape(args[0], out)
        if self.by_id and isinstance(out, torch.Tensor):
            for a in _tensors_in(args, kwargs):
                name = None if a is out else self._tracked(a)  # ``t.to(same dtype)`` returns t: no use
                if name is not None:
                    self.uncovered.setdefault(name, getattr(func, "__name__", str(func)))
        return out

    def _note_reshape(self, src: Any, out: torch.Tensor) -> None:
        """Remember ``out`` as n*S example-major rows when it reshapes a batched (or already flattened) tensor."""
        if (self._rows_per_example(src, 1) is not None and out.dim() >= 1 and out.dtype == src.dtype
                and out.shape[0] > self.n and out.shape[0] % self.n == 0 and self._tracked(src) is None):
            self.flat[id(out)] = (weakref.ref(out), out.shape[0] // self.n)

    def _linear_weight(self, w) -> tuple[str | None, str]:
        """(name, kind) of the weight of ``x @ w``: a parameter (kind ``linear_t``: its rows are input features) or
        the transpose of one (``linear``)."""
        name = self.by_id.get(id(w))
        if name is not None and w.dim() == 2:
            return name, "linear_t"
        if id(w) in self.transposed:
            return self.transposed[id(w)][0], "linear"
        return None, ""

    def _try_capture(self, func, args, kwargs):
        get = self.by_id.get
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            wn, bn = get(id(w)), (get(id(b)) if b is not None else None)
            S = self._rows_per_example(x)
            if (wn or bn) and S is not None:
                out = func(*args, **kwargs)
                k, o = self._input(x, S), self._out(out, S)
                if wn:
                    self.uses.append(_Use("linear", wn, "weight", k, o))
                if bn:
                    self.uses.append(_Use("linear", bn, "bias", k, o))
                return out
        elif func in _ADDMM:
            return self._try_addmm(func, args, kwargs)
        elif func is F.embedding:
            names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
            a = dict(zip(names, args), **kwargs)
            ids, w = a.get("input"), a.get("weight")
            wn = get(id(w))
            if (wn and isinstance(ids, torch.Tensor) and ids.dim() >= 1 and a.get("max_norm") is None
                    and not a.get("scale_grad_by_freq") and not ids.is_floating_point()):
                out = func(*args, **kwargs)
                pad = a.get("padding_idx")
                if pad is not None and pad < 0:
                    pad += w.shape[0]
                if self._batched(ids, 1):
                    self.uses.append(_Use("embedding", wn, "weight", self._input(ids), self._out(out), (pad, False)))
                else:  # the same index for every example: a use only once it is added to a batched tensor
                    self.shared[id(out)] = (wn, ids.detach().reshape(1, -1), out, pad)
                return out
        elif func is F.layer_norm or (_RMS_NORM is not None and func is _RMS_NORM):
            rms = func is not F.layer_norm
            names = ("input", "normalized_shape", "weight", "eps") if rms else \
                ("input", "normalized_shape", "weight", "bias", "eps")
            a = dict(zip(names, args), **kwargs)
            x, w, b = a.get("input"), a.get("weight"), a.get("bias")
            wn, bn = get(id(w)) if w is not None else None, get(id(b)) if b is not None else None
            if (wn or bn) and self._batched(x) and x.dim() > len(tuple(a["normalized_shape"])):
                out = func(*args, **kwargs)
                k, o = self._input(x), self._out(out)
                extra = ("rms" if rms else "ln", tuple(a["normalized_shape"]), a.get("eps"))
                if wn:
                    self.uses.append(_Use("norm", wn, "weight", k, o, extra))
                if bn:
                    self.uses.append(_Use("norm", bn, "bias", k, o, extra))
                return out
        elif _is_transpose(func, args) and len(args) == 1 and not kwargs and get(id(args[0])) \
                and args[0].dim() == 2:
            out = func(*args)
            self.transposed[id(out)] = (get(id(args[0])), out)  # a use only once it multiplies (below)
            return out
        elif func in _MATMUL and len(args) == 2 and not kwargs:
            x, w = args
            S = self._rows_per_example(x)
            if S is None or self._tracked(x) is not None:
                return None
            wn, kind = self._linear_weight(w)
            if wn:  # x @ w.T == F.linear(x, w); x @ w: rows of w are input features
                out = func(*args)
                self.uses.append(_Use(kind, wn, "weight", self._input(x, S), self._out(out, S)))
                return out
        elif func is torch.Tensor.__getitem__ and len(args) == 2 and not kwargs and get(id(args[0])) \
                and _static_index(args[1]):
            out = func(*args)
            self.views[id(out)] = (get(id(args[0])), args[1], out)  # a use only once it is added (below)
            return out
        elif func in _ADD and len(args) == 2 and not kwargs:
            return self._try_add(func, args)
        elif func in _MUL and len(args) == 2 and not kwargs:
            a, b = args
            for p, t in ((a, b), (b, a)):
                pn = get(id(p)) if isinstance(p, torch.Tensor) else None
                if pn and get(id(t)) is None and self._batched(t, 1) and p.dim() < t.dim():
                    out = func(*args)
                    if out.shape != t.shape:
                        self.uncovered.setdefault(pn, "mul (broadcasts the parameter beyond the input)")
                        return out
                    self.uses.append(_Use("mul", pn, "weight", self._input(t), self._out(out)))
                    return out
        return None

    def _try_addmm(self, func, args, kwargs):
        """``addmm(b, x, w)`` = x @ w + b with x of n*S example-major rows, a parameter w (nx, nf) or the transpose
        of one, and/or a parameter bias b (nf,)."""
        a = dict(zip(("input", "mat1", "mat2"), args), **kwargs)
        b, x, w = a.get("input"), a.get("mat1"), a.get("mat2")
        if a.get("beta", 1) != 1 or a.get("alpha", 1) != 1 or a.get("out") is not None:
            return None
        S = self._rows_per_example(x)
        if S is None or x.dim() != 2 or self._tracked(x) is not None:
            return None
        wn, kind = self._linear_weight(w)
        bn = self.by_id.get(id(b)) if isinstance(b, torch.Tensor) else None
        if bn is not None and tuple(b.shape) != (w.shape[-1],):
            return None  # a bias of another shape: uncovered
        if (wn is None and self._tracked(w) is not None) or (bn is None and self._tracked(b) is not None):
            return None  # a view of a parameter in a place not captured: uncovered
        if wn is None and bn is None:
            return None
        out = func(*args, **kwargs)
        k, o = self._input(x, S), self._out(out, S)
        if wn:
            self.uses.append(_Use(kind, wn, "weight", k, o))
        if bn:
            self.uses.append(_Use("linear", bn, "bias", k, o))
        return out

    def _try_add(self, func, args):
        """``t + p``: a parameter or a static slice of one broadcast over a batched t, or an embedding E with an
        index shared by all examples broadcast over the example dim of t."""
        get = self.by_id.get
        a, b = args
        for p, t in ((a, b), (b, a)):
            if not isinstance(p, torch.Tensor) or not self._batched(t, 1) or self._tracked(t) is not None:
                continue
            if id(p) in self.shared:
                name, ids, _, pad = self.shared[id(p)]
                lead = (1,) * (t.dim() - p.dim())
                if p.dim() > t.dim() or lead + tuple(p.shape) != (1, *t.shape[1:]):
                    return None  # broadcast over more than the examples: uncovered
                out = func(*args)
                self.uses.append(_Use("embedding", name, "weight", self._input(ids), self._out(out), (pad, True)))
                return out
            pn, index = (get(id(p)), None) if get(id(p)) else (self.views.get(id(p), (None, None))[:2])
            if pn and p.dim() < t.dim():
                out = func(*args)
                if out.shape != t.shape:
                    return None
                self.uses.append(_Use("add", pn, "weight", -1, self._out(out), (index,)))
                return out
        return None


@dataclasses.dataclass
class Capture:
    """What the factored engine keeps of one block of n examples: the captured inputs and output gradients.

    Attributes:
        n: examples in the block.
        uses: the captured operations, in forward order.
        inputs: input key -> detached input (token ids for embeddings, (1, S) when shared by all examples; an
            input of n*S example-major rows as its (n, S, ...) view).
        deltas: output index -> (C, n, *out_shape) gradient of the C outputs (``None`` if no output depends on it;
            an output of n*S example-major rows as (C, n, S, ...)).
        outputs: (n, C) model outputs.
        uncovered: selected tensor -> the operation that used it in an uncaptured way.
    """

    n: int
    uses: list[_Use]
    inputs: dict[int, torch.Tensor]
    deltas: list[torch.Tensor | None]
    outputs: torch.Tensor
    uncovered: dict[str, str]

    @property
    def signature(self) -> tuple:
        return tuple((u.kind, u.name, u.role) for u in self.uses)

    def nbytes(self) -> int:
        seen = sum(t.numel() * t.element_size() for t in self.inputs.values())
        return seen + sum(d.numel() * d.element_size() for d in self.deltas if d is not None)

    def bytes_per_name(self) -> dict[str, int]:
        """Captured bytes each tensor needs (its uses' inputs and output gradients; shared ones counted for each)."""
        out: dict[str, int] = {}
        seen: set[tuple[str, str, int]] = set()
        for u in self.uses:
            parts = [("o", u.out, self.deltas[u.out])]
            if u.x in self.inputs:
                parts.append(("x", u.x, self.inputs[u.x]))
            for kind, key, t in parts:
                if t is not None and (u.name, kind, key) not in seen:
                    seen.add((u.name, kind, key))
                    out[u.name] = out.get(u.name, 0) + t.numel() * t.element_size()
        return out

    def drop(self, names: set[str]) -> None:
        """Forget the uses of ``names`` (tensors computed elsewhere) and the inputs/outputs only they needed."""
        self.uses = [u for u in self.uses if u.name not in names]
        keep_x = {u.x for u in self.uses}
        keep_o = {u.out for u in self.uses}
        self.inputs = {k: v for k, v in self.inputs.items() if k in keep_x}
        self.deltas = [d if i in keep_o else None for i, d in enumerate(self.deltas)]


def _twice(x):
    """The batch of one example, repeated: a batch of 2."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x])
    return {k: (torch.cat([v, v]) if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in x.items()}


def capture_block(f, params: Mapping[str, torch.Tensor], names: Sequence[str], x, n: int) -> Capture:
    """Run ``f(params, x)`` for a block of n examples with the selected tensors ``names`` tracked, then one batched
    backward pass per output; return the captured inputs and output gradients.

    A block of one example is run twice over (a batch of 2) and the first copy kept: with n = 1 a tensor shared
    by all examples (HF's ``position_ids`` of shape (1, T)) would look batched, and the captured operations would
    differ from those of larger blocks."""
    if n == 1:
        cap = capture_block(f, params, names, _twice(x), 2)
        return Capture(1, cap.uses, {k: v[:1] for k, v in cap.inputs.items()},
                       [None if d is None else d[:, :1] for d in cap.deltas], cap.outputs[:1], cap.uncovered)
    sub = {k: params[k].detach().requires_grad_(True) for k in names}
    full = {**{k: v.detach() for k, v in params.items() if k not in sub}, **sub}
    mode = _CaptureMode({id(v): k for k, v in sub.items()}, n)
    with torch.enable_grad(), mode:
        y = f(full, x)
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != n:
        raise ValueError(f"f(params, batch) must return a (B, C) tensor; for a batch of {n} it returned "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    C = y.shape[1]
    deltas: list[list[torch.Tensor | None]] = [[] for _ in mode.outs]
    needs = [i for i, o in enumerate(mode.outs) if o.requires_grad]
    if needs and y.requires_grad:
        targets = [mode.outs[i] for i in needs]
        for c in range(C):
            g = torch.autograd.grad(y[:, c].sum(), targets, retain_graph=c < C - 1, allow_unused=True)
            for i, gi in zip(needs, g):
                deltas[i].append(gi)
    stacked = [torch.stack(d) if d and all(t is not None for t in d) else None for d in deltas]
    for i, S in mode.split.items():  # (C, n*S, ...) -> (C, n, S, ...): rows i*S .. i*S+S-1 are example i's
        if stacked[i] is not None:
            stacked[i] = stacked[i].reshape(C, n, S, *stacked[i].shape[2:])
    inputs = {k: v.detach() for k, v in mode.inputs.items()}
    return Capture(n, mode.uses, inputs, stacked, y.detach(), dict(mode.uncovered))


# ---------------------------------------------------------------------------------------------------------------
# Rows of one parameter tensor from a capture
# ---------------------------------------------------------------------------------------------------------------

def _row_shape(p: torch.Tensor) -> tuple[int, int]:
    """A tensor as (rows, width): dim 0 and the rest (1-d and 0-d tensors: width 1)."""
    if p.dim() <= 1:
        return max(1, p.numel()), 1
    return p.shape[0], p[0].numel()


def _flat(t: torch.Tensor, lead: int, last: int | None) -> torch.Tensor:
    """Collapse the dims between the ``lead`` leading ones and the last ``last`` dims (``None``: none kept)."""
    if last is None:
        return t.reshape(*t.shape[:lead], -1)
    return t.reshape(*t.shape[:lead], -1, *t.shape[t.dim() - last:])


def _norm_hat(x: torch.Tensor, extra: tuple) -> torch.Tensor:
    kind, shape, eps = extra
    if kind == "ln":
        return F.layer_norm(x, shape, None, None, 1e-5 if eps is None else eps)
    return _RMS_NORM(x, shape, None, eps)


def _dense_grad(cap: Capture, u: _Use, pshape: torch.Size) -> torch.Tensor:
    """(C, n, *pshape) per-example gradient of a small (norm / mul) parameter."""
    delta = cap.deltas[u.out]
    nd = len(pshape)
    full_shape = pshape
    if u.kind == "add" and u.extra[0] is not None:  # the gradient of a static slice, placed into the parameter
        pshape = torch.empty(pshape, device="meta")[u.extra[0]].shape
        nd = len(pshape)
    if u.kind == "norm":
        prod = delta if u.role == "bias" else delta * _norm_hat(cap.inputs[u.x], u.extra).unsqueeze(0)
    elif u.kind == "add":
        prod = delta
    else:  # mul
        prod = delta * cap.inputs[u.x].unsqueeze(0)
    prod = _flat(prod, 2, nd).sum(2) if prod.dim() > 2 + nd else prod  # sum over the non-parameter dims
    keep = [d for d in range(nd) if pshape[d] == 1 and prod.shape[2 + d] != 1]
    if keep:
        prod = prod.sum(dim=[2 + d for d in keep], keepdim=True)
    prod = prod.reshape(prod.shape[0], prod.shape[1], *pshape)
    if pshape != full_shape:
        index = u.extra[0] if isinstance(u.extra[0], tuple) else (u.extra[0],)
        g = torch.zeros(prod.shape[0], prod.shape[1], *full_shape, dtype=prod.dtype, device=prod.device)
        g[(slice(None), slice(None)) + index] = prod
        prod = g
    return prod


def active_rows(cap: Capture, name: str, p: torch.Tensor) -> torch.Tensor:
    """Boolean (rows,) mask of the rows of ``p`` that some example's gradient touches."""
    rows, _ = _row_shape(p)
    act = torch.zeros(rows, dtype=torch.bool, device=p.device)
    for u in cap.uses:
        if u.name != name or cap.deltas[u.out] is None:
            continue
        d = cap.deltas[u.out]
        if u.kind == "linear":
            # Output rows no example reaches (an LM head's rows other than the label words) are worth skipping
            # only for wide outputs; a pass over delta costs a third of forming the rows of a hidden layer.
            if rows >= ACTIVE_ROWS_MIN:
                act |= d.reshape(-1, d.shape[-1]).ne(0).any(0)
            else:
                act[:] = True
        elif u.kind == "embedding":
            ids = cap.inputs[u.x].reshape(-1)
            if u.extra[0] is not None:
                ids = ids[ids != u.extra[0]]
            act[ids] = True
        else:
            act[:] = True
    return act


def rows_of(cap: Capture, name: str, p: torch.Tensor, idx: torch.Tensor, C: int, out: torch.Tensor) -> None:
    """Write into ``out`` (C, n, k, width; each ``out[c]`` contiguous) the per-example gradient rows ``idx`` (k of
    them) of tensor ``name``, summed over its uses."""
    rows, width = _row_shape(p)
    k = idx.numel()
    lo = int(idx[0]) if k else 0
    span = slice(lo, lo + k) if k and int(idx[-1]) - lo + 1 == k else None  # idx is sorted: a range?
    first = True

    def pick(t: torch.Tensor, dim: int) -> torch.Tensor:
        """Rows ``idx`` of ``t`` along ``dim``: a view for a range (index_select on the last dim is 2x slower than
        the whole product)."""
        if k == rows:
            return t
        if span is not None:
            return t.narrow(dim, span.start, k)
        return t.index_select(dim, idx)

    def put(c: int | None, g: torch.Tensor | None = None, b1=None, b2=None) -> None:
        """out[c] (or all of out for c=None) = / += g, or the batched product b1 @ b2 written in place."""
        target = out if c is None else out[c]
        if b1 is not None:
            if first:
                torch.bmm(b1, b2, out=target)
            else:
                target.add_(torch.bmm(b1, b2))
        elif first:
            target.copy_(g)
        else:
            target.add_(g)

    for u in cap.uses:
        if u.name != name or cap.deltas[u.out] is None:
            continue
        d = cap.deltas[u.out]
        if u.kind == "linear":
            dk = pick(_flat(d, 2, 1), -1)  # (C, n, S, k)
            if u.role == "bias":
                put(None, dk.sum(2).unsqueeze(-1))
            else:
                x = _flat(cap.inputs[u.x], 1, 1)  # (n, S, d_in)
                for c in range(C):  # (n, k, S) @ (n, S, d_in), straight into the row buffer
                    put(c, b1=dk[c].transpose(1, 2), b2=x)
        elif u.kind == "linear_t":  # y = x @ w, w (d_in, d_out): rows of the gradient are x^T delta
            x = pick(_flat(cap.inputs[u.x], 1, 1), -1)  # (n, S, k)
            dd = _flat(d, 2, 1)  # (C, n, S, d_out)
            for c in range(C):
                put(c, b1=x.transpose(1, 2), b2=dd[c])
        elif u.kind == "embedding":
            shared = u.extra[1]  # one (1, S) index for every example
            ids = cap.inputs[u.x].reshape(1 if shared else cap.n, -1).expand(cap.n, -1)  # (n, S)
            dd = d.reshape(C, cap.n, ids.shape[1], -1)  # (C, n, S, width)
            pos = torch.full((rows,), -1, dtype=torch.long, device=ids.device)
            pos[idx] = torch.arange(k, device=ids.device)
            where = pos[ids]  # (n, S)
            valid = where >= 0
            if u.extra[0] is not None:
                valid &= ids != u.extra[0]
            base = torch.arange(C * cap.n, device=ids.device).reshape(C, cap.n, 1) * k
            valid = valid.unsqueeze(0).expand(C, -1, -1)
            target = (base + where.unsqueeze(0))[valid]
            g = torch.zeros(C * cap.n * k, dd.shape[-1], dtype=dd.dtype, device=dd.device)
            g.index_add_(0, target, dd[valid])
            put(None, g.reshape(C, cap.n, k, dd.shape[-1]))
        else:
            g = _dense_grad(cap, u, p.shape).reshape(C, cap.n, rows, width)
            put(None, pick(g, 2))
        first = False
    if first:
        out.zero_()


# ---------------------------------------------------------------------------------------------------------------
# The kernel from captures
# ---------------------------------------------------------------------------------------------------------------

ACTIVE_ROWS_MIN = 4096  # linear maps with at least this many outputs get their untouched rows skipped
SYM_PARTS = 4  # a symmetric Gram is formed as 4 x 4 row blocks, the lower triangle only: 10/16 of the flops


class FactoredKernel:
    """Accumulates kernel blocks K[A, B] between captured groups of examples, tensor by tensor."""

    def __init__(self, params: Mapping[str, torch.Tensor], names: Sequence[str], masks: Mapping[str, Any],
                 C: int, chunk_bytes: int):
        self.params, self.names, self.masks, self.C = params, list(names), masks, C
        self.chunk_bytes = chunk_bytes
        self._buf: dict[int, torch.Tensor] = {}

    def _buffer(self, numel: int, like: torch.Tensor, slot: int) -> torch.Tensor:
        """A reused flat buffer: fresh row buffers of tens of MiB page-fault on every allocation (glibc maps them
        anew), which cost as much as computing the rows."""
        b = self._buf.get(slot)
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            b = self._buf[slot] = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
        return b[:numel]

    def _rows(self, caps: Sequence[Capture], name: str, idx: torch.Tensor, slot: int = 0) -> torch.Tensor:
        p = self.params[name]
        rows, width = _row_shape(p)
        n = sum(cap.n for cap in caps)
        r = self._buffer(self.C * n * idx.numel() * width, p, slot).view(self.C, n, idx.numel(), width)
        off = 0
        for cap in caps:
            rows_of(cap, name, p, idx, self.C, r[:, off:off + cap.n])
            off += cap.n
        r = r.reshape(self.C * n, -1)  # (C * n, k * w), row c * n + i
        mask = self.masks.get(name)
        if mask is not None:
            r *= mask.reshape(rows, width).index_select(0, idx).reshape(1, -1).to(r.dtype)
        return r

    def block(self, targets: Sequence[tuple[torch.Tensor, tuple[bool, bool]]], A: Sequence[Capture],
              B: Sequence[Capture] | None, thresholds: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
              ) -> None:
        """For each (out, signs) of ``targets``: out (C*nA, C*nB) (rows ordered (c, i)) += the kernel with those
        signs between groups A and B (B=None: B = A). The rows of each tensor are formed once for all targets.

        ``thresholds``: (C*nA,) and (C*nB,) per-row thresholds of the sign rule (:mod:`theory.gram`), rows ordered
        (c, i); required on a side that is signed. A symmetric target (B = A, equal signs) is computed on its lower
        triangle and mirrored, so it is symmetric bit for bit."""
        same = B is None
        B = A if same else B
        tA, tB = thresholds[0], (thresholds[0] if same else thresholds[1])
        nA, nB = sum(c.n for c in A), sum(c.n for c in B)
        r = self.C * nA
        step = max(1, math.ceil(r / SYM_PARTS))
        parts = [(s0, min(r, s0 + step)) for s0 in range(0, r, step)]
        tri = [same and sg[0] == sg[1] for _, sg in targets]  # symmetric: block lower triangle, mirrored below

        def side(flag: bool, thr, lo=0, hi=None):
            if not flag:
                return None
            if thr is None:
                raise ValueError("a signed side needs the sign rule's row thresholds")
            return thr[lo:hi]

        for name in self.names:
            p = self.params[name]
            rows, width = _row_shape(p)
            act = torch.zeros(rows, dtype=torch.bool, device=p.device)
            for cap in A:
                act |= active_rows(cap, name, p)
            if not same:
                actB = torch.zeros_like(act)
                for cap in B:
                    actB |= active_rows(cap, name, p)
                act &= actB
            idx = act.nonzero().reshape(-1)
            if idx.numel() == 0:
                continue
            per_row = self.C * (nA + (0 if same else nB)) * width * p.element_size()
            step = max(1, self.chunk_bytes // max(per_row, 1))
            for s in range(0, idx.numel(), step):
                sub = idx[s:s + step]
                ra = self._rows(A, name, sub)
                rb = None
                for (out, signs), t in zip(targets, tri):
                    if t:
                        for s0, s1 in parts:
                            accumulate(out[s0:, s0:s1], ra[s0:], ra[s0:s1], side(signs[0], tA, s0),
                                       side(signs[1], tA, s0, s1))
                    else:
                        if rb is None:
                            rb = ra if same else self._rows(B, name, sub, slot=1)
                        accumulate(out, ra, rb, side(signs[0], tA), side(signs[1], tB))
                del ra, rb
        for (out, _), t in zip(targets, tri):
            if t:
                mirror_lower(out)

    def row_scale(self, A: Sequence[Capture]) -> torch.Tensor:
        """||g||_inf over this kernel's tensors for each row (c, i) of the captured examples A: (C*nA,) float64."""
        nA = sum(c.n for c in A)
        out = torch.zeros(self.C * nA, dtype=torch.float64, device=self.params[self.names[0]].device)
        for name in self.names:
            p = self.params[name]
            rows, width = _row_shape(p)
            act = torch.zeros(rows, dtype=torch.bool, device=p.device)
            for cap in A:
                act |= active_rows(cap, name, p)
            idx = act.nonzero().reshape(-1)
            step = max(1, self.chunk_bytes // max(self.C * nA * width * p.element_size(), 1))
            for s in range(0, idx.numel(), step):
                out = torch.maximum(out, row_scale(self._rows(A, name, idx[s:s + step])).to(out.device))
        return out


def reorder(K: torch.Tensor, C: int, n1: int, n2: int) -> torch.Tensor:
    """(C*n1, C*n2) with rows (c, i) -> (n1*C, n2*C) with rows (i, c)."""
    return K.reshape(C, n1, C, n2).permute(1, 0, 3, 2).reshape(n1 * C, n2 * C)


def chunk_bytes_default(cpu: bool) -> int:
    # Below glibc's 32 MiB mmap threshold on the CPU, so row buffers are reused from the heap rather than mapped
    # (and page-faulted) afresh each time; larger on GPUs.
    return (24 << 20) if cpu else (256 << 20)


def groups_for(names: Sequence[str], per_example: Mapping[str, int], n: int, room: int) -> list[list[str]] | None:
    """Consecutive groups of tensors whose captures for all ``n`` examples fit ``room`` bytes (one capture pass
    per group, no recaptured example tiles), or None when a single tensor does not fit."""
    groups: list[list[str]] = []
    used = 0
    for name in names:
        need = per_example.get(name, 0) * n
        if need > room:
            return None
        if not groups or used + need > room:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += need
    return groups


def tiles_for(n: int, per_example: int, room: int, symmetric: bool) -> tuple[int, int]:
    """(tile size, number of tiles) such that the captures held at once fit ``room`` bytes."""
    hold = 1 if (symmetric and per_example * n <= room) else 2
    t = max(1, min(n, room // max(1, hold * per_example)))
    tiles = math.ceil(n / t)
    return math.ceil(n / tiles), tiles


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every capture and kernel block of one factored computation shares.

    Attributes:
        f: the model function ``f(params, batch) -> (B, C)``.
        params: every parameter of the model (name -> tensor, on the device).
        names: the tensors captured and contracted (the covered ones, or one group of them).
        masks: name -> boolean mask of its selected entries (absent: the whole tensor).
        C: outputs per example.
        dtype: accumulation and output dtype of the kernels.
        block: examples per capture (one batched forward and C batched backward passes).
        chunk_bytes: bytes of one tensor's gradient rows formed at once.
        signature: the captured operations every block must show (``None``: those of the first block).
    """

    f: Any
    params: Mapping[str, torch.Tensor]
    names: tuple[str, ...]
    masks: Mapping[str, torch.Tensor]
    C: int
    dtype: torch.dtype
    block: int
    chunk_bytes: int
    signature: tuple | None = None

    def kernel(self) -> FactoredKernel:
        return FactoredKernel(self.params, self.names, self.masks, self.C, self.chunk_bytes)

    @property
    def device(self) -> torch.device:
        return self.params[self.names[0]].device


def capture_tile(setup: Setup, x, start: int, stop: int, bar=None) -> list[Capture]:
    """Captures of examples ``start:stop`` in blocks of ``setup.block``, each checked against the signature (the
    captured operations of the first block): a block that captured different operations raises ``RuntimeError``."""
    caps = []
    signature = setup.signature
    for s in range(start, stop, setup.block):
        e = min(stop, s + setup.block)
        cap = capture_block(setup.f, setup.params, setup.names, slice_batch(x, s, e), e - s)
        if signature is None:
            signature = cap.signature
        elif cap.signature != signature:
            raise RuntimeError(f"the factored engine captured different operations for examples {s}:{e} than for "
                               f"the first block ({len(cap.signature)} vs {len(signature)} uses)")
        caps.append(cap)
        if bar is not None:
            bar.update(1)
    return caps


def _by_example(v: torch.Tensor, C: int) -> torch.Tensor:
    """(C*n,) ordered (c, i) -> (n*C,) ordered (i, c)."""
    return v.reshape(C, -1).T.reshape(-1)


def _by_output(v: torch.Tensor, C: int) -> torch.Tensor:
    """(n*C,) ordered (i, c) -> (C*n,) ordered (c, i)."""
    return v.reshape(-1, C).T.reshape(-1)


def row_scales(setup: Setup, x, n: int) -> torch.Tensor:
    """||g||_inf over the tensors ``setup.names`` for each row (example, output) of the n examples x: (n*C,)
    float64, rows ordered (i, c), from a capture of their own (see :class:`_SignScales` for the fused way)."""
    return _by_example(setup.kernel().row_scale(capture_tile(setup, x, 0, n)), setup.C)


def signed_sides(signs: Sequence[tuple[bool, bool]], symmetric: bool) -> tuple[bool, bool]:
    """(x1 needs sign scales, x2 needs them) for kernels with these (x1 sign, x2 sign); symmetric: x2 is x1."""
    one = any(a for a, _ in signs) or (symmetric and any(b for _, b in signs))
    return one, (not symmetric and any(b for _, b in signs))


class _SignScales:
    """The sign rule's row scales ||g||_inf of one side of the kernel, (n*C,) float64 ordered (example, output).

    ``given`` is either the complete scale (computed elsewhere: ``fuse=False``) or, with ``fuse=True``, the
    scale of the tensors this computation does not capture (``None``: there are none); each tile's scale is then
    completed from its captures the first time the tile is captured, before any of its rows is signed."""

    def __init__(self, n: int, C: int, given: torch.Tensor | None, fuse: bool, device: torch.device):
        self.C, self.fuse = C, fuse
        if fuse:
            self.scale = (torch.zeros(n * C, dtype=torch.float64, device=device) if given is None
                          else given.to(device=device, dtype=torch.float64).clone())
        else:
            self.scale = None if given is None else given.to(device)
        self.done = torch.zeros(n, dtype=torch.bool)

    def add(self, fk: FactoredKernel, caps: Sequence[Capture], start: int) -> None:
        """Complete the scale of the examples of ``caps`` (starting at ``start``) from their captures, once."""
        n = sum(c.n for c in caps)
        if not self.fuse or bool(self.done[start:start + n].all()):
            return
        rows = slice(start * self.C, (start + n) * self.C)
        self.scale[rows] = torch.maximum(self.scale[rows], _by_example(fk.row_scale(caps), self.C))
        self.done[start:start + n] = True

    def thresholds(self, start: int, n: int) -> torch.Tensor | None:
        """tau * ||g||_inf of examples ``start:start+n``, ordered (output, example) like the kernel blocks."""
        if self.scale is None:
            return None
        return SIGN_RTOL * _by_output(self.scale[start * self.C:(start + n) * self.C], self.C)


def run_factored(setup: Setup, x1, x2, n1: int, n2: int, signs: Sequence[tuple[bool, bool]], *, tile1: int,
                 tile2: int, bar=None, scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                 fuse_scales: bool = False):
    """The factored kernels (n1*C, n2*C) (rows (example, output)) over the tensors ``setup.names``, one per entry
    of ``signs`` ((sign on the x1 side, sign on the x2 side)), from the same captures, with the outputs at x1 and
    x2. ``x2=None``: symmetric. Tiles of ``tile1`` / ``tile2`` examples bound the captures held at once (the tile
    of the outer loop is kept, inner tiles are recaptured).

    ``scales``: (n1*C,) and (n2*C,) row scales ||g||_inf of the sign rule, rows (example, output), needed on a
    signed side: the complete scales, or with ``fuse_scales`` the scales of the selected tensors *not* in
    ``setup.names`` (``None``: there are none), completed here from the kernel's own captures.

    Returns:
        (kernels, outputs at x1, outputs at x2, (scale of x1, scale of x2)): the complete scales (``None`` on a
        side that no kernel signs), for the per-example remainder.
    """
    symmetric = x2 is None
    C, dtype = setup.C, setup.dtype
    fk = setup.kernel()
    dev = setup.device
    Ks = [torch.zeros(n1 * C, n2 * C, dtype=dtype, device=dev) for _ in signs]
    need1, need2 = signed_sides(signs, symmetric)
    sc1 = _SignScales(n1, C, scales[0] if need1 else None, fuse_scales and need1, dev)
    sc2 = sc1 if symmetric else _SignScales(n2, C, scales[1] if need2 else None, fuse_scales and need2, dev)

    def cap(x, s, e):
        return capture_tile(setup, x, s, e, bar)

    def put(A, B, r0, c0, same: bool, which=None):
        # rows: examples r0.. of x1; columns: examples c0.. of x2 (of x1 when symmetric: then sc2 is sc1)
        which = range(len(signs)) if which is None else which
        nA, nB = sum(c.n for c in A), sum(c.n for c in B)
        tmps = {k: torch.zeros(C * nA, C * nB, dtype=dtype, device=dev) for k in which}
        tA = sc1.thresholds(r0, nA)
        tB = None if same else sc2.thresholds(c0, nB)
        fk.block([(tmps[k], signs[k]) for k in which], A, None if same else B, (tA, tB))
        for k in which:
            Ks[k][r0 * C:(r0 + nA) * C, c0 * C:(c0 + nB) * C] = reorder(tmps[k], C, nA, nB)

    out1 = torch.empty(n1, C, dtype=dtype, device=dev)
    out2 = out1 if symmetric else torch.empty(n2, C, dtype=dtype, device=dev)
    if symmetric:
        starts = list(range(0, n1, tile1))
        asym = [k for k, sg in enumerate(signs) if sg[0] != sg[1]]
        for I, sI in enumerate(starts):
            eI = min(n1, sI + tile1)
            A = cap(x1, sI, eI)
            sc1.add(fk, A, sI)  # tiles before this one were scaled when they were captured as A
            out1[sI:eI] = torch.cat([c.outputs for c in A]).to(dtype)
            put(A, A, sI, sI, True)
            for sJ in starts[:I]:
                eJ = min(n1, sJ + tile1)
                B = cap(x1, sJ, eJ)
                put(A, B, sI, sJ, False)
                for k, sg in enumerate(signs):
                    if sg[0] == sg[1]:
                        Ks[k][sJ * C:eJ * C, sI * C:eI * C] = Ks[k][sI * C:eI * C, sJ * C:eJ * C].T
                if asym:
                    put(B, A, sJ, sI, False, asym)
                del B
            del A
        return Ks, out1, out1, (sc1.scale, sc1.scale)
    held1 = None
    for sJ in range(0, n2, tile2):
        eJ = min(n2, sJ + tile2)
        B = cap(x2, sJ, eJ)
        sc2.add(fk, B, sJ)
        out2[sJ:eJ] = torch.cat([c.outputs for c in B]).to(dtype)
        for sI in range(0, n1, tile1):
            eI = min(n1, sI + tile1)
            A = held1 if held1 is not None else cap(x1, sI, eI)
            if sJ == 0:
                sc1.add(fk, A, sI)
                out1[sI:eI] = torch.cat([c.outputs for c in A]).to(dtype)
            if tile1 >= n1:
                held1 = A
            put(A, B, sI, sJ, False)
        del B
    return Ks, out1, out2, (sc1.scale, sc2.scale)
