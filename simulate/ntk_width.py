"""The eNTK engine sees NTK theory work: wider MLPs train closer to kernel gradient flow.

An MLP in the NTK parameterisation (Jacot, Gabriel & Hongler 2018),

    h_1 = W_1 x / sqrt(d) + beta b_1,   h_{l+1} = W_{l+1} phi(h_l) / sqrt(n) + beta b_{l+1},   f = h_{L+1},

with N(0, 1) weights, is trained by full-batch gradient descent on the mean squared error
L = 1/(2N) sum_i ||f(x_i) - y_i||^2 with learning rate eta for T steps. Its empirical NTK at initialisation,
K_0 = J_0 J_0^T (:func:`theory.ntk.empirical_ntk`), predicts the trained outputs through kernel gradient flow
(:func:`theory.solvers.gradient_flow` at time T with rate eta/N, with the f_0 correction). As the width n grows,
the network stays in the lazy regime: the distance between trained outputs and the kernel prediction, and the
relative movement of the kernel ||K_T - K_0||_F / ||K_0||_F, both shrink at least like n^{-1/2} (Jacot et al.
2018; Lee et al. 2019, "Wide Neural Networks of Any Depth Evolve as Linear Models Under Gradient Descent"), and
typically like n^{-1} (Dyer & Gur-Ari 2020, "Asymptotics of Wide Networks from Feynman Diagrams").

``ftsim run ntk-width --preset quick`` sweeps widths and seeds and draws the figure (figures/ntk.py);
``ftsim verify ntk`` checks the engine itself (implementations against explicit Jacobians, kernel identities,
the sketch's error bound, gradient-flow agreement, the width trends, linearisation) and prints a claims table.

The HMM-pretrained model of the head/prompt issue (``simulate/wei2021``) plugs in through :func:`run_unit`'s
model-function arguments (``f``, ``params``): any ``f(params, x) -> (B, C)`` works.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import torch

from ftsim.core.claims import Claim
from ftsim.core.experiment import Experiment, RunContext, UnitSpec, Verifier
from ftsim.core.io import write_table
from ftsim.core.threads import single_threaded
from theory.linearize import linearize, train
from theory.metrics import kernel_rel_change
from theory.ntk import empirical_ntk
from theory.oracles import explicit_jacobian, reference_kernel
from theory.solvers import gradient_flow

__all__ = ["NTKWidthConfig", "PRESETS", "EXPERIMENT", "VERIFIER", "make_data", "init_mlp", "mlp", "run_unit",
           "run", "slope"]


@dataclasses.dataclass(frozen=True)
class NTKWidthConfig:
    widths: tuple[int, ...] = dataclasses.field(default=(64, 128, 256, 512, 1024, 2048),
                                                metadata={"help": "hidden widths n to sweep"})
    depth: int = dataclasses.field(default=2, metadata={"help": "number of hidden layers"})
    input_dim: int = dataclasses.field(default=8, metadata={"help": "input dimension d (inputs on the sphere of "
                                                                     "radius sqrt(d))"})
    num_train: int = dataclasses.field(default=32, metadata={"help": "training examples N"})
    num_test: int = dataclasses.field(default=128, metadata={"help": "test examples"})
    task: Literal["regression", "classification"] = dataclasses.field(
        default="regression", metadata={"help": "regression (C=1, smooth teacher) or classification (one-hot "
                                                "MSE targets, C=num_classes)"})
    num_classes: int = dataclasses.field(default=3, metadata={"help": "classes for the classification task"})
    activation: Literal["relu", "tanh", "erf"] = dataclasses.field(default="relu", metadata={"help": "phi"})
    parameterization: Literal["ntk", "standard"] = dataclasses.field(
        default="ntk", metadata={"help": "ntk: N(0,1) weights with 1/sqrt(fan_in) multipliers; standard: "
                                         "N(0, 1/fan_in) weights and learning rate lr/width"})
    lr: float = dataclasses.field(default=1.0, metadata={"help": "learning rate eta of full-batch GD"})
    steps: int = dataclasses.field(default=400, metadata={"help": "GD steps T (gradient-flow time eta*T)"})
    bias_scale: float = dataclasses.field(default=0.1, metadata={"help": "beta, the bias multiplier"})
    seeds: tuple[int, ...] = dataclasses.field(default=(0, 1, 2, 3, 4), metadata={"help": "initialisation seeds"})
    data_seed: int = dataclasses.field(default=1234, metadata={"help": "seed of the data set"})
    float64: bool = dataclasses.field(default=True, metadata={"help": "train and compute kernels in float64"})

    def __post_init__(self) -> None:
        from ftsim.core.errors import InputError

        if not self.widths or min(self.widths) < 1:
            raise InputError(f"need positive widths, got {list(self.widths)}", field="widths")
        if not self.seeds or min(self.seeds) < 0:
            raise InputError(f"need at least one seed, all >= 0, got {list(self.seeds)}", field="seeds")
        for name in ("depth", "input_dim", "num_train", "num_test", "steps", "num_classes"):
            if getattr(self, name) < 1:
                raise InputError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if not self.lr > 0:
            raise InputError(f"must be > 0, got {self.lr}", field="lr")

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == "regression" else self.num_classes


PRESETS = {
    # quick: about a minute on a 2-core CPU: 4 widths x 3 seeds of a one-hidden-layer ReLU MLP (41k parameters at
    # n = 4096); the kernels of 96 inputs and 300 GD steps per network dominate.
    "quick": NTKWidthConfig(widths=(64, 256, 1024, 4096), depth=1, seeds=(0, 1, 2), num_test=64, steps=300),
    "paper": NTKWidthConfig(),
}


# ---------------------------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------------------------

def make_data(config: NTKWidthConfig, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Training and test sets of a smooth teacher on the sphere.

    Regression: y = sin(u.x) + cos(2 v.x)/2 (standardised), u, v random unit vectors. Classification: the argmax
    of ``num_classes`` such random teachers, with one-hot targets minus 1/C (mean-zero MSE targets).

    Returns:
        x_train (N, d), y_train (N, C) targets, labels_train (N,), x_test, y_test, labels_test.
    """
    g = torch.Generator().manual_seed(config.data_seed)
    n, d = config.num_train + config.num_test, config.input_dim
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(d)
    k = 1 if config.task == "regression" else config.num_classes
    u = torch.randn(d, k, generator=g, dtype=torch.float64)
    v = torch.randn(d, k, generator=g, dtype=torch.float64)
    u, v = u / u.norm(dim=0), v / v.norm(dim=0)
    score = torch.sin(x @ u) + 0.5 * torch.cos(2 * x @ v)  # (n, k)
    if config.task == "regression":
        y = (score - score.mean()) / score.std()
        labels = torch.zeros(n, dtype=torch.long)
    else:
        labels = score.argmax(1)
        y = torch.nn.functional.one_hot(labels, k).double() - 1.0 / k
    nt = config.num_train
    return {"x_train": x[:nt].to(dtype), "y_train": y[:nt].to(dtype), "labels_train": labels[:nt],
            "x_test": x[nt:].to(dtype), "y_test": y[nt:].to(dtype), "labels_test": labels[nt:]}


def init_mlp(config: NTKWidthConfig, width: int, seed: int, dtype: torch.dtype = torch.float64
             ) -> dict[str, torch.Tensor]:
    """Parameters W_l (fan_out, fan_in), b_l of the MLP; N(0, 1) (ntk) or N(0, 1/fan_in) (standard)."""
    g = torch.Generator().manual_seed(seed)
    dims = [config.input_dim] + [width] * config.depth + [config.num_outputs]
    params = {}
    for l in range(len(dims) - 1):
        w = torch.randn(dims[l + 1], dims[l], generator=g, dtype=torch.float64)
        if config.parameterization == "standard":
            w = w / math.sqrt(dims[l])
        params[f"W{l}"] = w.to(dtype)
        params[f"b{l}"] = torch.randn(dims[l + 1], generator=g, dtype=torch.float64).to(dtype)
    return params


def _phi(name: str):
    return {"relu": torch.relu, "tanh": torch.tanh, "erf": torch.erf}[name]


def mlp(config: NTKWidthConfig):
    """The model function ``f(params, x) -> (B, C)`` for ``config``'s depth, activation and parameterisation."""
    phi = _phi(config.activation)
    L = config.depth + 1
    ntk = config.parameterization == "ntk"
    beta = config.bias_scale

    def f(params, x):
        h = x
        for l in range(L):
            w = params[f"W{l}"]
            z = h @ w.T
            if ntk:
                z = z / math.sqrt(w.shape[1])
            h = z + beta * params[f"b{l}"]
            if l < L - 1:
                h = phi(h)
        return h

    return f


# ---------------------------------------------------------------------------------------------------------------
# One unit of work: one width, one seed
# ---------------------------------------------------------------------------------------------------------------

def run_unit(config: NTKWidthConfig, width: int, seed: int, device: str = "cpu", data=None, f=None, params=None
             ) -> tuple[dict, list[dict]]:
    """Train one network and compare it with its kernel gradient-flow prediction.

    Args:
        config: the sweep's settings.
        width, seed: this unit.
        device: torch device.
        data: the output of :func:`make_data` (default: built from ``config``).
        f, params: a model function and its initial parameters (default: the MLP of ``config``); any
            ``f(params, x) -> (B, C)`` works, e.g. a pretrained model.

    Returns:
        (metrics row, per-test-point prediction rows).
    """
    dtype = torch.float64 if config.float64 else torch.float32
    data = data or make_data(config, dtype)
    data = {k: v.to(device) for k, v in data.items()}
    f = f or mlp(config)
    p0 = params or init_mlp(config, width, seed, dtype)
    p0 = {k: v.to(device) for k, v in p0.items()}
    lr = config.lr / width if config.parameterization == "standard" else config.lr
    xtr, ytr, xte, yte = data["x_train"], data["y_train"], data["x_test"], data["y_test"]
    n, C = xtr.shape[0], ytr.shape[1]
    x_all = torch.cat([xtr, xte])
    res0 = empirical_ntk(f, p0, x_all, device=device)
    k0 = res0.kernel
    f0 = res0.outputs1.double()
    k_train, k_test_train = k0[:n, :, :n, :], k0[n:, :, :n, :]
    # GD on L = 1/(2N) sum ||f - y||^2 is the flow d theta/dt = -(lr/N) J^T (f - y) at time t = steps.
    gf_test = gradient_flow(k_train, ytr.cpu(), config.steps, k_test_train=k_test_train, f0_train=f0[:n],
                            f0_test=f0[n:], lr=lr / n)
    gf_train = gradient_flow(k_train, ytr.cpu(), config.steps, f0_train=f0[:n], lr=lr / n)
    trained = train(f, p0, (xtr, ytr), steps=config.steps, lr=lr, optimizer="sgd", loss="mse")
    lin = train(linearize(f, p0), p0, (xtr, ytr), steps=config.steps, lr=lr, optimizer="sgd", loss="mse")
    with torch.no_grad():
        fT = f(trained.params, x_all).double().cpu()
        fL = linearize(f, p0)(lin.params, x_all).double().cpu()
    kT = empirical_ntk(f, trained.params, x_all, device=device).kernel
    gf_move_test = gf_test - f0[n:]
    row = {
        "width": width, "seed": seed, "num_params": sum(int(v.numel()) for v in p0.values()),
        "dist_gf_test": float((fT[n:] - gf_test).norm() / gf_move_test.norm()),
        "dist_gf_train": float((fT[:n] - gf_train).norm() / (gf_train - f0[:n]).norm()),
        "dist_lin_test": float((fT[n:] - fL[n:]).norm() / (fL[n:] - f0[n:]).norm()),
        "discretization_test": float((fL[n:] - gf_test).norm() / gf_move_test.norm()),
        "kernel_move": kernel_rel_change(k0, kT),
        "kernel_move_train": kernel_rel_change(k_train, kT[:n, :, :n, :]),
        "test_mse_net": float(((fT[n:] - yte.double().cpu()) ** 2).sum(1).mean() / 2),
        "test_mse_gf": float(((gf_test - yte.double().cpu()) ** 2).sum(1).mean() / 2),
        "train_loss_final": trained.losses[-1],
    }
    if config.task == "classification":
        labels = data["labels_test"].cpu()
        row["test_acc_net"] = float((fT[n:].argmax(1) == labels).double().mean())
        row["test_acc_gf"] = float((gf_test.argmax(1) == labels).double().mean())
    preds = [{"width": width, "seed": seed, "point": i, "output": c, "f0": float(f0[n + i, c]),
              "net": float(fT[n + i, c]), "gf": float(gf_test[i, c]), "lin": float(fL[n + i, c])}
             for i in range(xte.shape[0]) for c in range(C)]
    return row, preds


def slope(widths, values) -> float:
    """Least-squares slope of log(values) against log(widths)."""
    lw, lv = np.log(np.asarray(widths, float)), np.log(np.asarray(values, float))
    return float(np.polyfit(lw, lv, 1)[0])


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds per width, for every metric (ftsim.core.tables)."""
    from ftsim.core.tables import summarize as stats

    out = []
    metrics = [k for k in rows[0] if k not in ("width", "seed", "num_params")]
    for w in sorted({r["width"] for r in rows}):
        sub = [r for r in rows if r["width"] == w]
        rec = {"width": w, "num_params": sub[0]["num_params"], "num_seeds": len(sub)}
        for m in metrics:
            st = stats(r[m] for r in sub if m in r)
            rec[f"{m}_mean"], rec[f"{m}_std"] = st.mean, st.std
        out.append(rec)
    return out


UNIT_VERSION = 2  # bump when run_unit's computation changes (2: no wall time in the row)


def _net_spec(config: NTKWidthConfig, width: int, seed: int, device: str) -> UnitSpec:
    common = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("widths", "seeds")}
    return UnitSpec("ntk-width.net", UNIT_VERSION,
                    {**common, "width": width, "seed": seed, "device": torch.device(device).type},
                    "simulate.ntk_width:compute_net",
                    {"config": dataclasses.asdict(config), "width": width, "seed": seed, "device": device},
                    label=f"width={width} seed={seed}")


def compute_net(work, config: dict, width: int, seed: int, device: str) -> dict:
    """One unit of the sweep (see :func:`run_unit`), from the JSON form of the config."""
    from ftsim.core.config import config_from_dict

    cfg = config_from_dict(NTKWidthConfig, config)
    row, preds = run_unit(cfg, width, seed, device, data=make_data(cfg, torch.float64 if cfg.float64 else torch.float32))
    return {"row": row, "preds": preds}


def plan(config: NTKWidthConfig, ctx: RunContext) -> list[UnitSpec]:
    """Every network of the sweep, as data (one unit per width and seed)."""
    return [_net_spec(config, w, s, ctx.device) for w in config.widths for s in config.seeds]


def run(config: NTKWidthConfig, ctx: RunContext) -> dict:
    """Sweep widths x seeds (one cached unit per network), write tidy tables (the figure is drawn from them)."""
    from ftsim.core.progress import bar

    first_seed = config.seeds[0]
    rows, preds = [], []
    for spec in bar(plan(config, ctx), desc="ntk-width", unit="net", disable=not ctx.progress):
        rec = ctx.unit_of(spec).result
        rows.append(rec["row"])
        if rec["row"]["seed"] == first_seed:
            preds.extend(rec["preds"])
    summary_rows = summarize(rows)
    write_table(ctx.out_dir / "results", rows)
    write_table(ctx.out_dir / "summary_by_width", summary_rows)
    write_table(ctx.out_dir / "predictions", preds)
    widths = [r["width"] for r in summary_rows]
    s_gf = slope(widths, [r["dist_gf_test_mean"] for r in summary_rows])
    s_k = slope(widths, [r["kernel_move_mean"] for r in summary_rows])
    lo, hi = summary_rows[0], summary_rows[-1]
    return {
        "headline": (f"width {lo['width']} -> {hi['width']}: distance to kernel GF "
                     f"{lo['dist_gf_test_mean']:.3f} -> {hi['dist_gf_test_mean']:.3f} (slope {s_gf:.2f}), "
                     f"kernel movement {lo['kernel_move_mean']:.3f} -> {hi['kernel_move_mean']:.3f} "
                     f"(slope {s_k:.2f}; theory: <= -1/2, typically -1)"),
        "slope_dist_gf": s_gf, "slope_kernel_move": s_k,
    }


EXPERIMENT = Experiment(
    name="ntk-width",
    config_cls=NTKWidthConfig,
    presets=PRESETS,
    run=run,
    figures=("figures.ntk:redraw",),
    verifier="ntk",
    plan=plan,
    reproduce=("quick", "paper"),
    help="MLPs of growing width (NTK parameterisation, full-batch GD on MSE) against kernel gradient flow with "
         "their empirical NTK at initialisation: output distance and kernel movement vs width.",
)


# ---------------------------------------------------------------------------------------------------------------
# ftsim verify ntk
# ---------------------------------------------------------------------------------------------------------------

def _small_mlp(seed: int, width: int = 7, d: int = 5, C: int = 3):
    cfg = NTKWidthConfig(widths=(width,), depth=2, input_dim=d, task="classification", num_classes=C,
                         activation="tanh")
    return mlp(cfg), init_mlp(cfg, width, seed)




def _gen(seed: int, claim: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + claim)


@single_threaded
def claim_implementations_agree(quick: bool, seed: int) -> Claim:
    g = _gen(seed, 1)
    f, p = _small_mlp(seed)
    x1 = torch.randn(5, 5, generator=g, dtype=torch.float64)
    x2 = torch.randn(4, 5, generator=g, dtype=torch.float64)
    J1, J2 = explicit_jacobian(f, p, x1), explicit_jacobian(f, p, x2)
    worst, cases, tiles = 0.0, 0, 1
    for kern in ("sgd", "signgd", "asigngd"):
        for xb, Jb in ((x2, J2), (None, J1)):
            ref = reference_kernel(kern, J1, Jb)
            # the last budget leaves room for ~2 stored examples: streaming must tile the training side
            for impl, budget in (("jacobian", None), ("streaming", None), ("streaming", (1 << 20) + 16000),
                                 ("factored", None)):
                for per in (("vmap",) if impl == "factored" else ("vmap", "loop")):
                    r = empirical_ntk(f, p, x1, xb, kernel=kern, implementation=impl, memory_budget=budget,
                                      per_example=per, batch_size=2)
                    worst = max(worst, float((r.matrix() - ref).abs().max() / ref.abs().max()))
                    tiles = max(tiles, r.plan.num_tiles)
                    cases += 1
    return Claim("every implementation equals the explicit-Jacobian kernel (sgd, signgd, asigngd)",
                 f"tanh MLP P={J1.shape[1]}, N1=5, N2=4 and x2=x1, C=3, float64; {cases} cases (jacobian, "
                 f"streaming in 1 and {tiles} tiles, each with vmap and loop; factored)",
                 f"max rel. error {worst:.1e} (tol 1e-12, float64 rounding)", worst <= 1e-12,
                 "torch.autograd.functional.jacobian")


@single_threaded
def claim_linear_model(quick: bool, seed: int) -> Claim:
    g = _gen(seed, 2)
    X = torch.randn(6, 4, generator=g, dtype=torch.float64)
    W = {"W": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    K = empirical_ntk(lambda q, x: x @ q["W"].T + q["b"], W, X).kernel
    ref = torch.einsum("ij,ab->iajb", X @ X.T + 1, torch.eye(3, dtype=torch.float64))
    err = float((K - ref).abs().max() / ref.abs().max())
    return Claim("a linear model's eNTK is (X X^T + 1) (x) I_C", "f(x) = W x + b, N=6, d=4, C=3",
                 f"max rel. error {err:.1e} (tol 1e-12)", err <= 1e-12, "closed form")


@single_threaded
def claim_symmetric_psd(quick: bool, seed: int) -> Claim:
    g = _gen(seed, 3)
    f, p = _small_mlp(seed)
    xs = torch.randn(12, 5, generator=g, dtype=torch.float64)
    eig_ok = []
    for kern in ("sgd", "signgd"):
        M = empirical_ntk(f, p, xs, kernel=kern).matrix()
        asym = float((M - M.T).abs().max())
        ev = torch.linalg.eigvalsh(M)
        eig_ok.append((kern, asym, float(ev.min() / ev.max())))
    # eigenvalues of a float64 Gram matrix of size n are exact to about n * eps * ||K||_2 (Weyl + backward
    # stability of the product and of eigvalsh); 64 n eps leaves room for the constants.
    eig_tol = 64 * M.shape[0] * torch.finfo(torch.float64).eps
    ok = all(a == 0 and e >= -eig_tol for _, a, e in eig_ok)
    return Claim("SGD and SignGD kernels are symmetric PSD", "tanh MLP, N=12, C=3 (36 x 36)",
                 "; ".join(f"{k}: |K-K^T|max={a:.0e}, min eig/max eig={e:.1e}" for k, a, e in eig_ok)
                 + f" (symmetric by construction: lower triangle mirrored; eig >= -{eig_tol:.1e} = -64 n eps)",
                 ok, "Gram matrices")


@single_threaded
def claim_sketch(quick: bool, seed: int) -> Claim:
    g = _gen(seed, 4)
    cfg = NTKWidthConfig(widths=(128,), depth=1, input_dim=16, task="classification", num_classes=2)
    fs, ps = mlp(cfg), init_mlp(cfg, 128, seed)
    xk = torch.randn(10, 16, generator=g, dtype=torch.float64)
    exact = empirical_ntk(fs, ps, xk, implementation="streaming").kernel
    k_dim, reps = 256, (20 if quick else 100)
    sq_err, bound_sq, mean_k = 0.0, 0.0, torch.zeros_like(exact)
    for r in range(reps):
        res = empirical_ntk(fs, ps, xk, implementation="sketch", sketch_dim=k_dim, seed=1000 * seed + r)
        sq_err += float(((res.kernel - exact) ** 2).sum())
        bound_sq += float((res.error_bound ** 2).sum())
        mean_k += res.kernel / reps
    ratio = sq_err / bound_sq
    bias = float((mean_k - exact).norm() / math.sqrt(sq_err / reps))  # ~ 1/sqrt(reps) if unbiased
    return Claim("count-sketch kernel: unbiased, mean squared error <= sum of stated variance bounds "
                 "(2/k)||g||^2||g'||^2",
                 f"ReLU MLP P={sum(v.numel() for v in ps.values())}, N=10, C=2, k={k_dim}, {reps} seeds",
                 f"MSE / bound = {ratio:.2f} (<= 1.3); ||mean - K|| / rms error = {bias:.2f} "
                 f"(1/sqrt(reps) = {1 / math.sqrt(reps):.2f}, <= 3/sqrt(reps))",
                 ratio <= 1.3 and bias <= 3 / math.sqrt(reps), "count-sketch variance (theory/sketch.py)")


@single_threaded
def claim_tiny_lr_follows_gradient_flow(quick: bool, seed: int) -> Claim:
    cfg5 = NTKWidthConfig(widths=(2048,), depth=1, num_train=16, num_test=32, lr=0.05, steps=400, seeds=(seed,))
    row, _ = run_unit(cfg5, 2048, seed)
    return Claim("tiny-learning-rate GD follows kernel gradient flow",
                 "2-layer ReLU MLP width 2048 (NTK param.), lr 0.05, 400 steps, N=16",
                 f"rel. distance to GF: test {row['dist_gf_test']:.3f}, train {row['dist_gf_train']:.3f} "
                 "(tol 1/sqrt(2048) = 0.022, the finite-width bound)",
                 row["dist_gf_test"] <= 0.022 and row["dist_gf_train"] <= 0.022, "Jacot et al. 2018; Lee et al. 2019")


@single_threaded
def claim_width_trends(quick: bool, seed: int) -> list[Claim]:
    widths = (64, 256, 1024, 4096) if quick else (64, 128, 256, 512, 1024, 2048, 4096)
    seeds = (seed, seed + 1) if quick else tuple(range(seed, seed + 5))
    cfg6 = NTKWidthConfig(widths=widths, depth=1, num_train=16, num_test=32, lr=1.0, steps=200, seeds=seeds)
    data6 = make_data(cfg6)
    rows = [run_unit(cfg6, w, s, data=data6)[0] for w in widths for s in seeds]
    summ = summarize(rows)
    s_gf = slope(widths, [r["dist_gf_test_mean"] for r in summ])
    s_k = slope(widths, [r["kernel_move_mean"] for r in summ])
    setting = f"2-layer ReLU MLPs, widths {widths[0]}..{widths[-1]}, {len(seeds)} seeds, lr 1, 200 steps"
    expected = "theory: -1/2 bound (Lee et al.), -1 typical (Dyer & Gur-Ari); pass <= -0.3"
    return [Claim("wider networks are closer to kernel gradient flow (distance O(width^-1/2))", setting,
                  "dist: " + ", ".join(f"{r['width']}: {r['dist_gf_test_mean']:.3f}" for r in summ)
                  + f"; log-log slope {s_gf:.2f} ({expected})", s_gf <= -0.3, "Lee et al. 2019; Dyer & Gur-Ari 2020"),
            Claim("wider networks' kernels move less (||K_T - K_0||/||K_0|| O(width^-1/2))", setting,
                  "move: " + ", ".join(f"{r['width']}: {r['kernel_move_mean']:.3f}" for r in summ)
                  + f"; log-log slope {s_k:.2f} ({expected})", s_k <= -0.3, "Jacot et al. 2018; Dyer & Gur-Ari 2020")]


@single_threaded
def claim_linearization_recovers_gain(quick: bool, seed: int) -> Claim:
    from theory.linearize import linearization_report

    cfg8 = NTKWidthConfig(widths=(2048,), depth=1, task="classification", num_classes=3, num_train=48,
                          num_test=96)
    data8 = make_data(cfg8)
    f8, p8 = mlp(cfg8), init_mlp(cfg8, 2048, seed)
    rep = linearization_report(f8, p8, (data8["x_train"], data8["labels_train"]),
                               (data8["x_test"], data8["labels_test"]), steps=150, lr=1.0, loss="ce",
                               kernel_inputs=data8["x_train"])
    return Claim("the linearised model recovers most of fine-tuning's gain in the lazy regime",
                 "2-layer ReLU MLP width 2048, 3 classes, N=48, SGD lr 1 (CE), 150 steps",
                 f"acc zero-shot {rep.acc_zero_shot:.2f}, fine-tuned {rep.acc_finetuned:.2f}, linearised "
                 f"{rep.acc_linearized:.2f}: gain recovered {rep.gain_recovered:.2f} (>= 0.9); output "
                 f"distance {rep.output_distance:.3f}, kernel movement {rep.kernel_rel_change:.3f}",
                 rep.gain_recovered >= 0.9, "Malladi et al. 2023, Sec. 6")


@single_threaded
def claim_lssvm_is_krr(quick: bool, seed: int) -> Claim:
    from theory.solvers import asymmetric_lssvm, kernel_regression

    g = _gen(seed, 9)
    f, p = _small_mlp(seed)
    xs = torch.randn(12, 5, generator=g, dtype=torch.float64)
    Ks = empirical_ntk(f, p, xs).kernel
    ytr = torch.randint(0, 3, (8,), generator=g)
    a = asymmetric_lssvm(Ks[8:, :, :8, :], Ks[:8, :, :8, :], ytr, gamma=2.0)
    b = kernel_regression(Ks[:8, :, :8, :], ytr, Ks[8:, :, :8, :], ridge=0.5)
    err = float((a - b).abs().max() / b.abs().max())
    return Claim("asymmetric LS-SVM with a symmetric kernel = kernel ridge regression (ridge 1/gamma)",
                 "tanh MLP eNTK, N=8 train, 4 test, C=3, gamma=2", f"max rel. difference {err:.1e} (tol 1e-9)",
                 err <= 1e-9, "AsK-LS dual (He et al.); Malladi et al. 2023 App.")


VERIFIER = Verifier(
    name="ntk",
    claims=(claim_implementations_agree, claim_linear_model, claim_symmetric_psd, claim_sketch,
            claim_tiny_lr_follows_gradient_flow, claim_width_trends, claim_linearization_recovers_gain,
            claim_lssvm_is_krr),
    help="eNTK engine: implementations agree, kernel identities, sketch bound, width -> kernel gradient flow",
)
