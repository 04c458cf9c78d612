"""Fine-tuning methods as values, and one :func:`finetune` that runs any of them.

A :class:`Method` is a frozen description (peft's ``LoraConfig`` / optax's optimizer values are the model):

* which parameters move -- :class:`Params`: glob patterns over the classifier's parameter names, boolean masks per
  tensor (sparse fine-tuning: masked entries stay bit-identical to theta_0, also under weight decay and Adam), or
  a peft adapter (LoRA, ...) injected into a sub-module (peft's own ``inject_adapter_in_model``, not hand-written);
* the head's start -- :class:`Head`: kept, zero, random, or given weights (a fitted linear probe), and a scale;
* the optimizer and its schedule -- :class:`Optimizer`: SGD (momentum), Adam, AdamW, SignGD; linear, constant or
  cosine decay with warm-up; gradient-norm clipping;
* the loss -- cross-entropy or squared error -- plus optional :class:`Regularizer` terms ``weight * fn(model,
  batch, outputs, labels)``, and an optional :class:`Proximal` anchor (an L2 pull to theta_0 or a moving anchor,
  or a Bregman divergence between the outputs at theta and at the anchor, as in SMART's proximal point step).

``finetune(classifier, train, method, seed=..., dev=...)`` trains ``classifier`` (an ``nn.Module`` mapping a batch
to (B, C) scores) in place on a data set (:class:`TensorData`, or anything with ``len``, ``labels``, ``select``
and ``batches``), on CPU or ``cuda``, with a progress bar, keeping the best validation checkpoint (LM-BFF's
protocol) when ``dev`` is given. Mini-batches are drawn without replacement per epoch from a ``torch.Generator``
seeded with ``seed``: same seed, same run on one machine.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import math
from typing import Any, Callable, Iterator, Literal, Mapping, Protocol, Sequence

import torch
from torch import nn

from theory.batching import Batch, batch_to, batch_size_of, slice_batch
from theory.metrics import accuracy

__all__ = ["Optimizer", "Params", "Head", "Regularizer", "Proximal", "Method", "FTResult", "TensorData",
           "TrainData", "finetune", "prepare", "evaluate", "snapshot", "restore", "trainable_parameters",
           "symmetric_kl"]


# ---------------------------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The optimizer and its learning-rate schedule.

    ``sgd`` (with ``momentum``), ``adam`` (L2 ``weight_decay`` added to the gradient, as torch's Adam),
    ``adamw`` (decoupled weight decay), ``signgd`` (theta -= lr * sign(grad), the small-learning-rate limit of
    Adam in Malladi et al. 2023). ``schedule``: ``linear`` decay to 0 over the run, ``constant``, or ``cosine``;
    ``warmup_steps`` of linear warm-up first.
    """

    name: Literal["sgd", "adam", "adamw", "signgd"] = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: Literal["linear", "constant", "cosine"] = "linear"
    warmup_steps: int = 0
    # torch's fused Adam/AdamW kernel: one pass per tensor, ~5x faster per step on this CPU and insensitive to the
    # exact zeros a sparse mask leaves in Adam's second moment (sqrt of 0 is 6x slower than of other values in
    # the default kernel here); its rounding differs from the default kernel's. Off by default (cache keys and
    # results unchanged); recorded in the key only when on.
    fused: bool = False

    def __post_init__(self) -> None:
        if self.name not in ("sgd", "adam", "adamw", "signgd"):
            raise ValueError(f"optimizer: name must be sgd, adam, adamw or signgd, not {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"optimizer: lr must be > 0, got {self.lr}")
        if self.schedule not in ("linear", "constant", "cosine"):
            raise ValueError(f"optimizer: schedule must be linear, constant or cosine, not {self.schedule!r}")

    def build(self, params: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
        if self.name in ("sgd", "signgd"):
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        extra = {"fused": True} if self.fused else {}
        if self.name == "adam":
            return torch.optim.Adam(params, lr=self.lr, betas=self.betas, eps=self.eps,
                                    weight_decay=self.weight_decay, **extra)
        return torch.optim.AdamW(params, lr=self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay,
                                 **extra)

    def describe(self) -> dict:
        d = dataclasses.asdict(self)
        if not d.pop("fused"):
            return d
        return {**d, "fused": True}

    def factor(self, step: int, steps: int) -> float:
        """Learning-rate multiplier after ``step`` optimizer steps of ``steps``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, steps - self.warmup_steps)
        done = (step - self.warmup_steps) / span
        if self.schedule == "linear":
            return max(0.0, 1.0 - done) if self.warmup_steps else max(0.0, 1.0 - step / steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def _fingerprint(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Params:
    """Which parameters move.

    Attributes:
        include: glob patterns (``fnmatch``) over the classifier's parameter names; a parameter moves if it
            matches one and no ``exclude`` pattern. ``("*",)``: everything (full fine-tuning).
        exclude: patterns that never move.
        masks: name -> boolean tensor of the parameter's shape: only True entries move (sparse fine-tuning); the
            others stay bit-identical to their start (gradients zeroed before clipping and the step, values
            restored after it, so neither weight decay nor Adam's moments can move them).
        adapter: a peft config (e.g. ``peft.LoraConfig``) injected with ``peft.inject_adapter_in_model`` into the
            sub-module ``adapter_scope`` ("" = the classifier); its new parameters are named ``...lora_A...`` and
            move when ``include`` matches them (see :meth:`lora`).
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    masks: Mapping[str, torch.Tensor] | None = None
    adapter: Any = None
    adapter_scope: str = ""

    @classmethod
    def only(cls, *patterns: str) -> "Params":
        return cls(include=tuple(patterns))

    @classmethod
    def lora(cls, config: Any, scope: str = "", also: Sequence[str] = ()) -> "Params":
        """The adapter's parameters (and ``also`` patterns, e.g. the head) move; nothing else."""
        return cls(include=("*lora_*", *also), adapter=config, adapter_scope=scope)

    def moves(self, name: str) -> bool:
        return (any(fnmatch.fnmatchcase(name, p) for p in self.include)
                and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude))

    def describe(self) -> dict:
        d: dict[str, Any] = {"include": list(self.include), "exclude": list(self.exclude)}
        if self.masks:
            d["masks"] = {k: {"sha256": _fingerprint(v), "density": float(v.float().mean())}
                          for k, v in sorted(self.masks.items())}
        if self.adapter is not None:
            cfg = self.adapter.to_dict() if hasattr(self.adapter, "to_dict") else repr(self.adapter)
            d["adapter"] = {"scope": self.adapter_scope, "config": {k: (sorted(v) if isinstance(v, set) else v)
                                                                    for k, v in dict(cfg).items()}
                            if isinstance(cfg, dict) else cfg}
        return d


@dataclasses.dataclass(frozen=True)
class Head:
    """How the head (the sub-module ``module``, e.g. a linear layer on pooled features) starts.

    ``keep`` (as the classifier has it), ``zero``, ``random`` (N(0, std^2) weights from ``seed``, zero bias), or
    ``given`` (``weights``: parameter name within the head -> tensor, e.g. a fitted linear probe's); the weights
    are then multiplied by ``scale`` (head-norm sweeps)."""

    init: Literal["keep", "zero", "random", "given"] = "keep"
    module: str = "head"
    seed: int = 0
    std: float = 0.02
    weights: Mapping[str, torch.Tensor] | None = None
    scale: float = 1.0

    def describe(self) -> dict:
        d = {"init": self.init, "module": self.module, "scale": self.scale}
        if self.init == "random":
            d.update(seed=self.seed, std=self.std)
        if self.init == "given":
            d["weights"] = {k: _fingerprint(v) for k, v in sorted((self.weights or {}).items())}
        return d


@dataclasses.dataclass(frozen=True)
class Regularizer:
    """A loss term ``weight * fn(model, batch, outputs, labels)`` (a scalar tensor), e.g. SMART's smoothness
    regularizer. ``name`` and ``params`` describe it for cache keys."""

    name: str
    weight: float
    fn: Callable[[nn.Module, Batch, torch.Tensor, torch.Tensor], torch.Tensor]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def describe(self) -> dict:
        return {"name": self.name, "weight": self.weight, "params": dict(self.params)}


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p || q) + KL(q || p) between the softmax distributions of two logit matrices."""
    lp, lq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return ((lp.exp() - lq.exp()) * (lp - lq)).sum(-1).mean()


@dataclasses.dataclass(frozen=True)
class Proximal:
    """A proximal anchor theta~ and a term pulling theta towards it.

    ``kind="l2"``: ``mu/2 ||theta - theta~||^2`` over the moving parameters; ``kind="bregman"``: ``mu *
    D(f(x; theta), f(x; theta~))`` on the batch, D the symmetric KL of the output distributions (SMART's Bregman
    proximal point; ``divergence="mse"``: half the mean squared difference, for regression). The anchor starts
    at theta_0; every ``update_every`` steps it becomes ``(1 - beta) theta_t + beta theta~`` (``beta = 0``:
    the vanilla anchor theta_t; ``beta > 0``: SMART's momentum anchor). With ``anchor="init"`` it stays theta_0.
    """

    kind: Literal["l2", "bregman"] = "l2"
    mu: float = 1.0
    anchor: Literal["init", "moving"] = "init"
    beta: float = 0.0
    update_every: int = 1
    divergence: Literal["skl", "mse"] = "skl"

    def __post_init__(self) -> None:
        if self.kind not in ("l2", "bregman") or self.anchor not in ("init", "moving"):
            raise ValueError(f"proximal: kind must be l2/bregman and anchor init/moving, got {self.kind}/{self.anchor}")
        if not 0.0 <= self.beta < 1.0 or self.update_every < 1 or self.mu < 0:
            raise ValueError(f"proximal: need 0 <= beta < 1, update_every >= 1, mu >= 0: {self}")

    def describe(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Method:
    """A fine-tuning method (see the module docstring).

    Attributes:
        name: a label for tables.
        optimizer: :class:`Optimizer`.
        steps: optimizer steps; ``batch_size``: examples per step (drawn without replacement per epoch).
        params, head: which parameters move; how the head starts.
        loss: ``ce`` (cross-entropy; logistic for one output) or ``mse`` (1/(2B) sum ||f - onehot(y)||^2).
        eval_every: score the validation set every this many steps (0: only at the end); with ``select_best``
            the best checkpoint (ties: the earlier) is restored at the end, as LM-BFF does.
        max_grad_norm: clip the global gradient norm (None: no clipping).
        regularizers, proximal: extra loss terms.
        autocast: ``None`` (full precision), ``"bf16"`` or ``"fp16"``: the forward pass under ``torch.autocast``
            on CUDA (fp16 with a gradient scaler); parameters, optimizer state and the loss stay float32. Ignored
            on the CPU, where mixed precision buys nothing here (the choice is recorded in ``describe``).
    """

    name: str
    optimizer: Optimizer
    steps: int
    batch_size: int = 8
    params: Params = Params()
    head: Head = Head()
    loss: Literal["ce", "mse"] = "ce"
    eval_every: int = 0
    max_grad_norm: float | None = 1.0
    select_best: bool = True
    regularizers: tuple[Regularizer, ...] = ()
    proximal: Proximal | None = None
    autocast: Literal["bf16", "fp16"] | None = None

    def __post_init__(self) -> None:
        if self.autocast not in (None, "bf16", "fp16"):
            raise ValueError(f"method {self.name!r}: autocast must be None, bf16 or fp16, not {self.autocast!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"method {self.name!r}: steps and batch_size must be >= 1, got {self.steps}, "
                             f"{self.batch_size}")
        if self.loss not in ("ce", "mse"):
            raise ValueError(f"method {self.name!r}: loss must be ce or mse, not {self.loss!r}")

    def describe(self) -> dict:
        """A JSON description (cache keys): every field, callables by their name and parameters."""
        return {"name": self.name, "optimizer": self.optimizer.describe(), "steps": self.steps,
                "batch_size": self.batch_size, "params": self.params.describe(), "head": self.head.describe(),
                "loss": self.loss, "eval_every": self.eval_every, "max_grad_norm": self.max_grad_norm,
                "select_best": self.select_best, "regularizers": [r.describe() for r in self.regularizers],
                "proximal": None if self.proximal is None else self.proximal.describe(),
                **({"autocast": self.autocast} if self.autocast else {})}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

class TrainData(Protocol):
    """What :func:`finetune` needs of a data set."""

    labels: torch.Tensor

    def __len__(self) -> int: ...

    def select(self, index: torch.Tensor) -> Batch: ...

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Batch]]: ...


@dataclasses.dataclass
class TensorData:
    """Inputs (a tensor or a mapping of tensors with leading dimension N) and integer labels (N,)."""

    inputs: Batch
    labels: torch.Tensor

    def __post_init__(self) -> None:
        n = batch_size_of(self.inputs, "inputs")
        if self.labels.shape[0] != n:
            raise ValueError(f"TensorData: {n} inputs but {self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index) -> Batch:
        index = torch.as_tensor(index, dtype=torch.long)
        if isinstance(self.inputs, torch.Tensor):
            return self.inputs[index]
        return {k: (v[index] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in self.inputs.items()}

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, Batch]]:
        for s in range(0, len(self), batch_size):
            idx = torch.arange(s, min(len(self), s + batch_size))
            yield idx, slice_batch(self.inputs, s, s + len(idx))


# ---------------------------------------------------------------------------------------------------------------
# Running a method
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FTResult:
    """History rows (step, train_loss, lr, [dev_acc]), the selected step and its validation accuracy, the last
    training loss, and the number of moving parameter entries."""

    history: list[dict]
    best_step: int
    best_dev_acc: float
    final_train_loss: float
    trainable_entries: int = 0


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the parameters (named as ``module.named_parameters()``)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.named_parameters()}


@torch.no_grad()
def restore(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`snapshot`) back into ``module``'s parameters."""
    params = dict(module.named_parameters())
    missing = set(params) - set(state)
    if missing:
        raise KeyError(f"restore: snapshot lacks {sorted(missing)[:3]}")
    for k, p in params.items():
        p.copy_(state[k].to(p.device, p.dtype))


@torch.no_grad()
def evaluate(module: nn.Module, data: TrainData, device: str | torch.device, batch_size: int = 16) -> torch.Tensor:
    """Scores (N, C) of ``module`` on ``data`` in eval mode (float64, CPU), in the set's order."""
    was = module.training
    module.eval()
    out = torch.empty(len(data), 0, dtype=torch.float64)
    for idx, batch in data.batches(batch_size):
        s = module(batch_to(batch, device)).double().cpu()
        if out.shape[1] == 0:
            out = torch.empty(len(data), s.shape[1], dtype=torch.float64)
        out[idx] = s
    module.train(was)
    return out


def _submodule(module: nn.Module, path: str) -> nn.Module:
    return module.get_submodule(path) if path else module


@torch.no_grad()
def _init_head(module: nn.Module, head: Head) -> None:
    if head.init == "keep" and head.scale == 1.0:
        return
    try:
        target = _submodule(module, head.module)
    except AttributeError:
        raise ValueError(f"head: the classifier has no sub-module {head.module!r}") from None
    params = dict(target.named_parameters())
    if head.init == "zero":
        for p in params.values():
            p.zero_()
    elif head.init == "random":
        gen = torch.Generator().manual_seed(head.seed)
        for name, p in params.items():
            if name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).mul_(head.std).to(p.dtype))
    elif head.init == "given":
        given = dict(head.weights or {})
        if set(given) != set(params):
            raise ValueError(f"head: given weights {sorted(given)} do not match the head's {sorted(params)}")
        for name, p in params.items():
            if tuple(given[name].shape) != tuple(p.shape):
                raise ValueError(f"head: given {name} has shape {tuple(given[name].shape)}, the head's is "
                                 f"{tuple(p.shape)}")
            p.copy_(given[name].to(p.device, p.dtype))
    if head.scale != 1.0:
        for name, p in params.items():
            if not name.endswith("bias"):
                p.mul_(head.scale)


def trainable_parameters(module: nn.Module, params: Params) -> list[tuple[str, nn.Parameter]]:
    """The (name, parameter) pairs that move under ``params``, in ``module.named_parameters()`` order."""
    moving = [(n, p) for n, p in module.named_parameters() if params.moves(n)]
    if params.masks:
        names = dict(module.named_parameters())
        unknown = sorted(set(params.masks) - set(names))
        if unknown:
            raise ValueError(f"params.masks: no parameter named {unknown[:3]}")
        for n, m in params.masks.items():
            if tuple(m.shape) != tuple(names[n].shape) or m.dtype != torch.bool:
                raise ValueError(f"params.masks[{n!r}]: expected a bool mask of shape {tuple(names[n].shape)}, "
                                 f"got {m.dtype} {tuple(m.shape)}")
    if not moving:
        raise ValueError(f"params: no parameter matches include={list(params.include)} "
                         f"exclude={list(params.exclude)}")
    return moving


def prepare(module: nn.Module, method: Method) -> list[tuple[str, nn.Parameter]]:
    """Apply the method's head start and adapter to ``module`` and set ``requires_grad`` on exactly the moving
    parameters; return them."""
    _init_head(module, method.head)
    if method.params.adapter is not None:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(method.params.adapter, _submodule(module, method.params.adapter_scope))
    moving = trainable_parameters(module, method.params)
    keep = {id(p) for _, p in moving}
    for p in module.parameters():
        p.requires_grad_(id(p) in keep)
    return moving


def _loss(scores: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "ce":
        if scores.shape[1] == 1:  # one output f_1 - f_0: the logistic loss
            s = (2 * y - 1).to(scores.dtype).reshape(-1)
            return nn.functional.softplus(-s * scores[:, 0]).mean()
        return nn.functional.cross_entropy(scores.float(), y)
    target = nn.functional.one_hot(y, scores.shape[1]).to(scores.dtype) if scores.shape[1] > 1 else \
        (2 * y - 1).to(scores.dtype).reshape(-1, 1)
    return 0.5 * ((scores - target) ** 2).sum() / scores.shape[0]


class _Anchor:
    """The proximal anchor theta~ of :class:`Proximal` over the moving parameters."""

    def __init__(self, prox: Proximal, moving: list[tuple[str, nn.Parameter]]):
        self.prox = prox
        self.values = {n: p.detach().clone() for n, p in moving}

    def update(self, step: int, moving) -> None:
        if self.prox.anchor != "moving" or step % self.prox.update_every:
            return
        b = self.prox.beta
        with torch.no_grad():
            for n, p in moving:
                self.values[n].mul_(b).add_(p.detach(), alpha=1 - b)

    def term(self, module: nn.Module, batch, scores: torch.Tensor, moving) -> torch.Tensor:
        if self.prox.kind == "l2":
            return 0.5 * self.prox.mu * sum(((p - self.values[n]) ** 2).sum() for n, p in moving)
        from torch.func import functional_call

        with torch.no_grad():
            anchored = functional_call(module, {**dict(module.named_parameters()), **self.values}, (batch,))
        if self.prox.divergence == "mse":
            return self.prox.mu * 0.5 * ((scores - anchored) ** 2).sum(-1).mean()
        return self.prox.mu * symmetric_kl(scores, anchored)


def finetune(module: nn.Module, train: TrainData, method: Method, *, seed: int,
             device: str | torch.device = "cpu", dev: TrainData | None = None, progress: bool = False,
             desc: str | None = None, on_step: Callable[[int, nn.Module], dict | None] | None = None) -> FTResult:
    """Run ``method`` on ``module`` in place; with ``dev``, leave it at the best validation checkpoint.

    Args:
        module: the classifier (``forward(batch) -> (B, C)`` scores).
        train: the training set; ``dev``: the validation set (or None).
        method: the :class:`Method`.
        seed: seed of the mini-batch order.
        device: where to train.
        progress: show a progress bar (``ftsim.core.progress``).
        on_step: called after every step with (step, module); a dict it returns is merged into that step's
            history row (e.g. the head norm).

    Returns:
        :class:`FTResult`.
    """
    module.to(device)
    dev_type = torch.device(device).type
    # Dropout (and any other draw inside the model) comes from the global torch RNG: seed it from ``seed`` so a
    # run is a function of its inputs (a resumed sweep equals a fresh one), without disturbing the caller's RNG.
    with torch.random.fork_rng(devices=[torch.device(device)] if dev_type == "cuda" else [],
                               device_type=dev_type if dev_type == "cuda" else "cuda"):
        torch.manual_seed(seed)
        return _finetune(module, train, method, seed=seed, device=device, dev=dev, progress=progress, desc=desc,
                         on_step=on_step)


def _finetune(module, train, method, *, seed, device, dev, progress, desc, on_step) -> FTResult:
    from ftsim.core.progress import bar as progress_bar

    moving = prepare(module, method)
    module.train()
    params = [p for _, p in moving]
    masks = {id(p): method.params.masks[n].to(p.device) for n, p in moving
             if method.params.masks and n in method.params.masks}
    # theta_0 of every masked tensor; after each step the masked-out entries are put back with one elementwise
    # torch.where (a boolean-index assignment scans the mask for its indices every step: 3x a small model's step),
    # written into the parameter
    frozen = {id(p): p.detach().clone() for _, p in moving if id(p) in masks}
    grad_masks = {k: m.to(frozen[k].dtype) for k, m in masks.items()}  # a float multiply is 3x a bool one
    opt = method.optimizer.build(params)
    steps = method.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: method.optimizer.factor(s, steps))
    anchor = _Anchor(method.proximal, moving) if method.proximal is not None else None
    gen = torch.Generator().manual_seed(seed)
    amp = method.autocast if torch.device(device).type == "cuda" else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    n = len(train)
    perm, cursor = torch.randperm(n, generator=gen), 0
    history: list[dict] = []
    best = (-1.0, 0, None)  # (dev acc, step, snapshot)
    loss_val = math.nan
    bar = progress_bar(range(1, steps + 1), desc=desc or method.name, disable=not progress, leave=False)
    for step in bar:
        if cursor >= n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        idx = perm[cursor:cursor + method.batch_size]
        cursor += method.batch_size
        batch = batch_to(train.select(idx), device)
        y = train.labels[idx].to(device)
        with torch.autocast("cuda", dtype=amp_dtype, enabled=amp is not None):
            scores = module(batch)  # (B, C)
        scores = scores.float() if amp is not None else scores
        loss = _loss(scores, y, method.loss)
        objective = loss
        for reg in method.regularizers:
            objective = objective + reg.weight * reg.fn(module, batch, scores, y)
        if anchor is not None:
            objective = objective + anchor.term(module, batch, scores, moving)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.unscale_(opt)
        else:
            objective.backward()
        for p in params:
            m = grad_masks.get(id(p))
            if m is not None and p.grad is not None:
                p.grad.mul_(m)
            if method.optimizer.name == "signgd" and p.grad is not None:
                p.grad.sign_()
        if method.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, method.max_grad_norm)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        if masks:
            with torch.no_grad():
                for p in params:
                    if id(p) in masks:
                        torch.where(masks[id(p)], p, frozen[id(p)], out=p)
        if anchor is not None:
            anchor.update(step, moving)
        loss_val = float(loss.detach())
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"{method.name}: loss became {loss_val} at step {step} (lr "
                                     f"{method.optimizer.lr} too large?)")
        row = {"step": step, "train_loss": loss_val, "lr": sched.get_last_lr()[0]}
        if dev is not None and ((method.eval_every and step % method.eval_every == 0) or step == steps):
            acc = accuracy(evaluate(module, dev, device), dev.labels)
            row["dev_acc"] = acc
            if acc > best[0]:
                best = (acc, step, snapshot(module) if (step != steps and method.select_best) else None)
            module.train()
        if on_step is not None:
            row.update(on_step(step, module) or {})
        history.append(row)
        bar.set_postfix(loss=f"{loss_val:.3f}")
    if best[2] is not None:
        restore(module, best[2])
    module.eval()
    entries = sum(int(masks[id(p)].sum()) if id(p) in masks else p.numel() for p in params)
    return FTResult(history, best[1] if dev is not None else steps, best[0] if dev is not None else math.nan,
                    loss_val, entries)
