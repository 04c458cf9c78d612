"""``ftsim run malladi``: prompt-based fine-tuning vs its eNTK on a real pretrained LM (Malladi et al. 2023).

For one task, one model, k examples per class and several data seeds, the run measures test accuracy of

* **zero-shot** prompting (label-word scores at theta_0);
* **FT-SGD** / **FT-Adam**: prompt-based fine-tuning of all parameters (:mod:`real_tasks.finetune`);
* **K-SGD**: the SGD eNTK solution -- kernel regression with the f_0 correction (and kernel logistic regression,
  reported as ``K-SGD (logistic)``); **K-A-SignGD**: the asymmetric LS-SVM on the A-SignGD kernel, Adam's kernel
  analogue (:mod:`real_tasks.entk`, engine :mod:`theory.ntk`);
* **FT (no prompt)** and **K-SGD (no prompt)**: standard fine-tuning of a new linear head on a pooled
  representation, and its eNTK -- the paper's claim is that the prompt is what makes the kernel work;

plus the kernel-behaviour diagnostics of the fine-tuned models: accuracy of the linearised model
f(theta_0) + <grad f(theta_0), theta_FT - theta_0> against fine-tuning (share of the fine-tuning gain it
recovers), and the movement of the eNTK between theta_0 and theta_FT on (part of) the training set.

Work is split into resumable units (zero-shot; one per kernel; one per seed and fine-tuning method, diagnostics
included); kernels over the union of the test subset and all seeds' training sets are cached under
``<cache>/malladi/`` keyed by a hash of everything that produced them. Tables: ``results.jsonl/csv`` (tidy:
task, model, k, seed, method, metric, value), ``comparison.csv/md`` (mean and std over seeds), ``splits.json``
(the k-shot indices), and the figure ``malladi.pdf/png``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from ftsim.core.experiment import Experiment, RunContext
from ftsim.core.io import atomic_write_text, save_npy, stable_hash, write_json, write_table

__all__ = ["MalladiConfig", "PRESETS", "EXPERIMENT", "run", "METHOD_ORDER", "comparison_rows", "comparison_markdown",
           "task_table_markdown"]

ALL_METHODS = ("zero-shot", "ft-sgd", "ft-adam", "ft-noprompt", "k-sgd", "k-asigngd", "k-noprompt")

# Row order of the comparison table (names as in Malladi et al.'s tables).
METHOD_ORDER = ("zero-shot", "FT-SGD", "K-SGD", "K-SGD (logistic)", "FT-Adam", "K-A-SignGD",
                "FT (no prompt)", "K-SGD (no prompt)", "K-SGD (no prompt, logistic)")


def _f(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class MalladiConfig:
    """Settings of one ``malladi`` run. Defaults are the paper's (RoBERTa-base, LM-BFF's 1000 steps and grids,
    1000 test examples, exact eNTK where it fits); ``quick`` shrinks what a 2-core CPU cannot afford."""

    task: str = _f("SST-2", "task name (SST-2, SST-5, MR, CR, MPQA, Subj, TREC, AG News, MNLI, SNLI, QNLI, RTE, "
                            "MRPC, QQP)")
    model: str = _f("roberta-base", "smollm2 | minilm | tiny-causal | tiny-masked | tiny-encoder | GGUF path | local "
                                    "dir | Hugging Face id (offline: must be in the hub cache)")
    k: int = _f(16, "training (and validation) examples per class")
    seeds: tuple[int, ...] = _f((13, 21, 42, 87, 100), "data seeds (LM-BFF's five)")
    data_dir: Optional[str] = _f(None, "data folder (default $FTSIM_DATA or ../shared/data/text_classification)")
    test_size: int = _f(1000, "test examples (a seeded draw; LM-Kernel-FT caps at 1000); every method uses this set")
    label_mode: Literal["first", "sum"] = _f("first", "multi-token label words: first token's logit, or summed "
                                                      "log-probability (causal LMs)")
    methods: tuple[str, ...] = _f(ALL_METHODS, "subset of " + ",".join(ALL_METHODS))
    ft_steps: int = _f(1000, "fine-tuning steps (LM-BFF: 1000)")
    batch_sizes: tuple[int, ...] = _f((2, 4, 8), "mini-batch size grid (LM-BFF: 2,4,8)")
    sgd_lrs: tuple[float, ...] = _f((1e-4, 1e-3, 1e-2), "SGD learning-rate grid (prompt-based FT-SGD)")
    adam_lrs: tuple[float, ...] = _f((1e-5, 2e-5, 5e-5), "Adam learning-rate grid (LM-BFF)")
    noprompt_optimizer: Literal["sgd", "adam"] = _f("sgd", "optimizer of standard FT (sgd: the one its SGD eNTK "
                                                           "describes)")
    noprompt_lrs: tuple[float, ...] = _f((1e-4, 1e-3, 1e-2), "learning-rate grid of standard FT")
    eval_every: int = _f(100, "validate every this many steps and keep the best checkpoint (LM-BFF: 100)")
    max_grad_norm: Optional[float] = _f(1.0, "gradient-norm clipping (Hugging Face Trainer default)")
    head_seed: int = _f(0, "seed of the new linear head of standard FT (one head for all data seeds, so one "
                           "kernel serves them all)")
    ntk_implementation: Literal["auto", "jacobian", "streaming", "sketch", "factored"] = _f(
        "auto", "eNTK engine algorithm")
    union_ntk_implementation: Optional[Literal["auto", "jacobian", "streaming", "sketch", "factored"]] = _f(
        None, "engine of the union kernels behind K-SGD / K-A-SignGD / no-prompt kernel, exact ones accumulated in "
              "float64 (None: as ntk_implementation); ntk_* then apply to the diagnostics' kernel movement only")
    sketch_dim: Optional[int] = _f(None, "count-sketch dimension when the engine sketches (default: engine's)")
    sketch_seed: int = _f(0, "seed of the sketch hashes")
    memory_budget_gb: Optional[float] = _f(None, "memory the eNTK engine may use (default: half of what is free)")
    ntk_dtype: Literal["float64", "float32"] = _f("float64", "accumulation dtype of the eNTK engine")
    kernel_ridge: float = _f(0.0, "ridge of kernel regression, relative to the mean diagonal (0: pseudo-inverse, "
                                  "LM-Kernel-FT's lstsq)")
    logistic_ridge: float = _f(1e-3, "ridge of kernel logistic regression (relative to the mean diagonal)")
    asym_gamma: float = _f(1.0, "gamma of the asymmetric LS-SVM (LM-Kernel-FT's kernel_gamma)")
    diagnostics: bool = _f(True, "linearisation accuracy and kernel movement of the fine-tuned prompt models")
    diag_test_size: Optional[int] = _f(None, "test examples for the linearised model (None: the whole test set)")
    diag_train_size: Optional[int] = _f(None, "training examples (balanced over classes) for the kernel movement "
                                              "(None: all)")
    threads: int = _f(0, "torch CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(ALL_METHODS)
        if unknown:
            raise ValueError(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(ALL_METHODS)}")
        if self.k < 1 or self.test_size < 1 or self.ft_steps < 1:
            raise ValueError("k, test_size and ft_steps must be positive")
        if not self.seeds:
            raise ValueError("--seeds: at least one seed")
        if not (self.batch_sizes and self.sgd_lrs and self.adam_lrs and self.noprompt_lrs):
            raise ValueError("learning-rate and batch-size grids must not be empty")


PRESETS = {
    # What a shared 2-core CPU affords for one task, 5 seeds and every method (notes/issue-5.md has the measured
    # times). Against the paper preset: 100 test examples (a seeded subset nested in the 1000-example test set)
    # for every method; one learning rate per optimiser instead of a grid, set from the gradient scale (with the
    # gradient clipped to norm 1, an SGD step moves f by at most lr*||grad f|| ~ 80*lr logits for SmolLM2) and
    # checked on seed 13's validation set; 16 steps of batch 8 (4 epochs of the 32 examples) instead of 1000;
    # validation every 4 steps; the union kernels exact (factored engine, float64, 10 GiB); kernel movement on 8
    # training examples per seed with the eNTK count-sketched to 16384 dimensions in float32 (K(theta_0) and
    # K(theta_FT) with the same hashes; kept from the first runs so that their fine-tuning units stay cached).
    "quick": MalladiConfig(
        model="smollm2", test_size=100, ft_steps=16, batch_sizes=(8,), sgd_lrs=(1e-2,), adam_lrs=(1e-5,),
        noprompt_lrs=(1e-2,), eval_every=4, ntk_implementation="sketch", sketch_dim=16384, ntk_dtype="float32",
        union_ntk_implementation="factored", memory_budget_gb=10.0, diag_test_size=None, diag_train_size=8),
    "paper": MalladiConfig(),
}


# ---------------------------------------------------------------------------------------------------------------

def _timer():
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def _balanced_prefix(labels: list[int], n: int | None) -> list[int]:
    """Positions of the first ``n // C`` examples of each class (all when ``n`` is None)."""
    if n is None or n >= len(labels):
        return list(range(len(labels)))
    classes = sorted(set(labels))
    per = max(1, n // len(classes))
    out, seen = [], {c: 0 for c in classes}
    for i, y in enumerate(labels):
        if seen[y] < per:
            out.append(i)
            seen[y] += 1
    return out


class _Run:
    """State of one run: data, model, encoders, and the units of work."""

    def __init__(self, cfg: MalladiConfig, ctx: RunContext):
        import torch

        from real_tasks.data import kshot_split, load_task, texts
        from real_tasks.entk import kernel_union
        from real_tasks.models import load_model
        from real_tasks.prompts import PROMPTS, get_prompt, label_token_ids, words_of

        self.cfg, self.ctx = cfg, ctx
        self.torch = torch
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.data = load_task(cfg.task, cfg.data_dir)
        self.spec = self.data.spec
        self.splits = {s: kshot_split(self.data, cfg.k, s, max_test=cfg.test_size) for s in cfg.seeds}
        self.union = kernel_union(list(self.splits.values()))
        write_json(ctx.out_dir / "splits.json", {
            "data": self.data.describe(), "splits": [s.record() for s in self.splits.values()],
            "kernel_union": self.union.record()})
        vocab = None
        if cfg.model.startswith("tiny-"):
            pool = list(self.union.examples) + [e for s in self.splits.values() for e in s.dev]
            vocab = " ".join(texts(pool)).split() + words_of(PROMPTS.values())
        t = _timer()
        self.lm = load_model(cfg.model, device=ctx.device, cache_dir=ctx.cache_dir, vocab=vocab)
        self.load_seconds = t()
        self.prompt = get_prompt(self.spec.name)
        self.prompt_ok = self.lm.has_lm_head
        self.label_tokens = label_token_ids(self.lm.tokenizer, self.prompt, self.lm.kind) if self.prompt_ok else None
        if cfg.label_mode == "sum" and self.lm.kind != "causal":
            raise ValueError(f"--label-mode sum needs a causal LM; {cfg.model} is {self.lm.kind}")
        self.theta0 = {k: v.detach().to("cpu", copy=True) for k, v in self.lm.model.named_parameters()}
        self._enc: dict = {}
        self.skipped: list[str] = []
        test_index = list(next(iter(self.splits.values())).test_index)
        # What every cached unit depends on; units add their own settings (see _unit_key).
        self.key_common = {
            "model": self.lm.fingerprint, "task": self.spec.name, "k": cfg.k, "data_files": self.data.files,
            "test_index": stable_hash(test_index), "label_mode": cfg.label_mode,
            "prompt": dataclasses.asdict(self.prompt),
        }
        self.key_base = {**self.key_common, "union": stable_hash(self.union.record())}
        self.unit_dir = Path(ctx.cache_dir) / "malladi" / "units"

    # -- helpers --------------------------------------------------------------------------------------------
    def restore_theta0(self) -> None:
        from real_tasks.finetune import restore

        restore(self.lm.model, self.theta0)

    def classifier(self, use_prompt: bool):
        from real_tasks.finetune import make_classifier

        return make_classifier(self.lm, use_prompt=use_prompt, label_tokens=self.label_tokens,
                               label_mode=self.cfg.label_mode, num_classes=self.spec.num_labels,
                               head_seed=self.cfg.head_seed).to(self.ctx.device)

    def encoded(self, name: str, examples, use_prompt: bool):
        from real_tasks.finetune import encode_set

        key = (name, use_prompt)
        if key not in self._enc:
            self._enc[key] = encode_set(self.lm, examples, prompt=self.prompt if use_prompt else None,
                                        label_tokens=self.label_tokens, label_mode=self.cfg.label_mode,
                                        max_length=self.prompt.max_length)
        return self._enc[key]

    def test_set(self, use_prompt: bool):
        return self.encoded("test", next(iter(self.splits.values())).test, use_prompt)

    def union_set(self, use_prompt: bool):
        return self.encoded("union", self.union.examples, use_prompt)

    def ntk_options(self, union: bool = False) -> dict:
        """Engine options of the diagnostics' kernels, or (``union``) of the union kernels."""
        cfg = self.cfg
        opts = {"implementation": cfg.ntk_implementation, "sketch_dim": cfg.sketch_dim, "seed": cfg.sketch_seed,
                "memory_budget": None if cfg.memory_budget_gb is None else int(cfg.memory_budget_gb * 2 ** 30),
                "dtype": getattr(self.torch, cfg.ntk_dtype)}
        if union and self.union_engine_differs:
            opts.update(implementation=cfg.union_ntk_implementation, dtype=self.torch.float64,
                        sketch_dim=cfg.sketch_dim if cfg.union_ntk_implementation in ("sketch", "auto") else None)
        return opts

    @property
    def union_engine_differs(self) -> bool:
        u = self.cfg.union_ntk_implementation
        return u is not None and u != self.cfg.ntk_implementation

    # -- unit records: this run's store first, then the cross-run cache keyed by content ---------------------
    def _unit_key(self, unit: str, settings: dict) -> str:
        return stable_hash({"unit": unit, **self.key_common, **settings})

    def _lookup(self, unit: str, key: str) -> dict | None:
        """A finished unit: from this run directory (same config), else from the cache of any earlier run whose
        unit had the same inputs (results are cached per task, model, k, seed and method)."""
        if self.ctx.overwrite:
            return None
        rec = self.ctx.store.get(unit)
        if rec is not None and rec.get("unit_key") in (None, key):
            return rec
        path = self.unit_dir / f"{unit}-{key}.json"
        if path.is_file():
            from ftsim.core.io import read_json

            rec = read_json(path)
            self.ctx.store.put(unit, rec)
            return rec
        return None

    def _save(self, unit: str, key: str, rec: dict) -> None:
        rec["unit_key"] = key
        write_json(self.unit_dir / f"{unit}-{key}.json", rec)
        self.ctx.store.put(unit, rec)

    # -- units ----------------------------------------------------------------------------------------------
    def zero_shot(self) -> dict:
        from real_tasks.finetune import accuracy, evaluate

        key = self._unit_key("zeroshot", {})
        rec = self._lookup("zeroshot", key)
        if rec is not None:
            return rec
        t = _timer()
        self.restore_theta0()
        test = self.test_set(True)
        scores = evaluate(self.classifier(True), test, self.ctx.device)
        rec = {"accuracy": accuracy(scores, test.labels), "scores": scores.tolist(), "seconds": t()}
        self._save("zeroshot", key, rec)
        return rec

    def _kernel_paths(self, name: str) -> tuple[str, dict[str, Path], Path]:
        use_prompt = name.startswith("prompt")
        opts = self.ntk_options(union=True)
        key = stable_hash({**self.key_base, "kernel": name, "head_seed": None if use_prompt else self.cfg.head_seed,
                           "ntk": {k: str(v) for k, v in opts.items() if k != "memory_budget"}})
        folder = Path(self.ctx.cache_dir) / "malladi"
        paths = {part: folder / f"{self.spec.name.replace(' ', '_')}-{name}-{key}-{part}.npy"
                 for part in ("kernel", "outputs")}
        return key, paths, folder

    def _cached_kernel(self, name: str) -> dict | None:
        key, paths, folder = self._kernel_paths(name)
        unit = f"kernel-{name}"
        rec = None if self.ctx.overwrite else self.ctx.store.get(unit)
        if rec is not None and all(Path(p).is_file() for p in rec.get("paths", {}).values()):
            # this run directory's kernel (same config): trusted even if the key scheme changed since
            return dict(rec)
        if not self.ctx.overwrite and all(p.is_file() for p in paths.values()) and (folder / f"{unit}-{key}.json").is_file():
            from ftsim.core.io import read_json

            rec = read_json(folder / f"{unit}-{key}.json")
            self.ctx.store.put(unit, rec)
            return rec
        return None

    def kernel(self, name: str, also: tuple[str, ...] = ()) -> dict:
        """``name``: prompt-sgd, prompt-asigngd or noprompt-sgd. Returns the record with arrays loaded.

        Kernels in ``also`` of the same model function (prompt or not) that are not cached yet are computed in the
        same engine call (one set of per-example gradients for all) and cached for their own call."""
        from real_tasks.entk import compute_kernel

        rec = self._cached_kernel(name)
        if rec is None:
            use_prompt = name.startswith("prompt")
            names = [name] + [a for a in also if a != name and a.startswith("prompt") == use_prompt
                              and self._cached_kernel(a) is None]
            self.restore_theta0()
            module = self.classifier(use_prompt)
            res = compute_kernel(module, self.union_set(use_prompt), kernel=[n.split("-")[1] for n in names],
                                 device=self.ctx.device, progress=self.ctx.progress, **self.ntk_options(union=True))
            for nm in names:
                r = res[nm.split("-")[1]]
                key, paths, folder = self._kernel_paths(nm)
                hashes = {part: save_npy(paths[part], r[part]) for part in paths}
                rec_n = {"key": key, "paths": {k: str(v) for k, v in paths.items()}, "sha256": hashes,
                         "plan": r["plan"], "plan_text": r["plan_text"], "seconds": r["seconds"],
                         "num_outputs": r["num_outputs"], "size": len(self.union.examples),
                         "computed_with": names}
                if r["error_bound"] is not None:
                    diag = np.sqrt(np.clip(np.diag(r["kernel"]), 0, None))
                    rel = r["error_bound"] / np.maximum(np.abs(r["kernel"]), 1e-300)
                    rec_n["sketch_std_bound_over_norms"] = float(np.max(r["error_bound"] / np.maximum(
                        np.outer(diag, diag), 1e-300)))
                    rec_n["sketch_std_bound_relative_median"] = float(np.median(rel))
                write_json(folder / f"kernel-{nm}-{key}.json", rec_n)
                self.ctx.store.put(f"kernel-{nm}", rec_n)
                if nm == name:
                    rec = dict(rec_n)
        rec["kernel"] = np.load(rec["paths"]["kernel"], allow_pickle=False)
        rec["outputs"] = np.load(rec["paths"]["outputs"], allow_pickle=False)
        return rec

    def diag_kernel0(self, seed: int, positions: list[int]) -> np.ndarray:
        """The diagnostics' SGD kernel at theta_0 on the training positions of ``seed`` (cached per run)."""
        from real_tasks.entk import compute_kernel

        unit = f"diag-kernel0-{seed}"
        rec = None if self.ctx.overwrite else self.ctx.store.get(unit)
        if rec is None or rec.get("positions") != list(positions):
            self.restore_theta0()
            split = self.splits[seed]
            sub = self.encoded(f"diag-train-{seed}-{len(positions)}", [split.train[i] for i in positions], True)
            k0 = compute_kernel(self.classifier(True), sub, kernel="sgd", device=self.ctx.device,
                                progress=self.ctx.progress, **self.ntk_options())
            rec = {"positions": list(positions), "kernel": k0["kernel"].tolist(), "seconds": k0["seconds"]}
            self.ctx.store.put(unit, rec)
        return np.asarray(rec["kernel"], float)

    def finetune_unit(self, method: str, seed: int, k0_inline: bool) -> dict:
        """Fine-tune with the method's grid on one seed; keep the best on validation; diagnostics.

        The eNTK at theta_FT on a class-balanced part of the training set is stored with the unit; the same kernel
        at theta_0 is computed here too when ``k0_inline`` (else it is read out of the union kernel later, which
        uses the same algorithm, sketch dimension and hashes)."""
        import torch

        from real_tasks.entk import compute_kernel, kernel_distance_metrics
        from real_tasks.finetune import FTConfig, accuracy, evaluate, finetune, linearized_scores, restore, snapshot

        unit = f"ft-{method}-s{seed}"
        cfg = self.cfg
        use_prompt = method != "noprompt"
        optimizer = {"sgd": "sgd", "adam": "adam", "noprompt": cfg.noprompt_optimizer}[method]
        lrs = {"sgd": cfg.sgd_lrs, "adam": cfg.adam_lrs, "noprompt": cfg.noprompt_lrs}[method]
        settings = {"seed": seed, "method": method, "optimizer": optimizer, "lrs": lrs, "batch_sizes": cfg.batch_sizes,
                    "steps": cfg.ft_steps, "eval_every": cfg.eval_every, "max_grad_norm": cfg.max_grad_norm,
                    "head_seed": None if use_prompt else cfg.head_seed}
        if cfg.diagnostics and use_prompt:
            settings["diagnostics"] = {"test": cfg.diag_test_size, "train": cfg.diag_train_size, "k0_inline": k0_inline,
                                       "ntk": {k: str(v) for k, v in self.ntk_options().items() if k != "memory_budget"}}
        key = self._unit_key(unit, settings)
        rec = self._lookup(unit, key)
        if rec is not None:
            return rec
        split = self.splits[seed]
        train = self.encoded(f"train-{seed}", split.train, use_prompt)
        dev = self.encoded(f"dev-{seed}", split.dev, use_prompt)
        test = self.test_set(use_prompt)
        t_all = _timer()
        grid, best = [], None
        for bs in cfg.batch_sizes:
            for lr in lrs:
                t = _timer()
                self.restore_theta0()
                module = self.classifier(use_prompt)
                ft = FTConfig(optimizer, lr, cfg.ft_steps, bs, cfg.eval_every, max_grad_norm=cfg.max_grad_norm)
                try:
                    res = finetune(module, train, dev, ft, seed=seed, device=self.ctx.device,
                                   progress=self.ctx.progress, desc=f"{method} s{seed} lr={lr:g} bs={bs}")
                except FloatingPointError as exc:  # a diverging grid point is a result, not a crash
                    grid.append({"lr": lr, "batch_size": bs, "dev_acc": float("nan"), "error": str(exc),
                                 "seconds": t()})
                    continue
                entry = {"lr": lr, "batch_size": bs, "dev_acc": res.best_dev_acc, "best_step": res.best_step,
                         "final_train_loss": res.final_train_loss, "seconds": t(),
                         "history": [h for h in res.history if "dev_acc" in h]}
                grid.append(entry)
                if best is None or res.best_dev_acc > best[0]["dev_acc"]:
                    state = snapshot(module) if len(cfg.batch_sizes) * len(lrs) > 1 else None
                    best = (entry, module, state)
        if best is None:
            rec = {"method": method, "seed": seed, "grid": grid, "accuracy": float("nan"), "seconds": t_all(),
                   "error": "every grid point diverged"}
            self._save(unit, key, rec)
            return rec
        entry, module, state = best
        if state is not None:
            restore(module, state)
        scores = evaluate(module, test, self.ctx.device)
        rec = {"method": method, "seed": seed, "optimizer": optimizer, "grid": grid, "selected": {
            "lr": entry["lr"], "batch_size": entry["batch_size"], "best_step": entry["best_step"]},
            "dev_acc": entry["dev_acc"], "accuracy": accuracy(scores, test.labels), "scores": scores.tolist(),
            "ft_seconds": t_all()}
        if cfg.diagnostics and use_prompt:
            t = _timer()
            theta_ft = {k: v for k, v in snapshot(module).items()}
            theta0 = {"lm." + k: v for k, v in self.theta0.items()}
            n_diag = len(test) if cfg.diag_test_size is None else min(cfg.diag_test_size, len(test))
            rows = list(range(n_diag))
            diag_test = self.encoded(f"diag-test-{n_diag}", list(split.test)[:n_diag], True)
            lin, f0 = linearized_scores(module, theta0, theta_ft, diag_test, self.ctx.device)
            acc_lin = accuracy(lin, diag_test.labels)
            acc_ft = accuracy(scores[rows], diag_test.labels)
            acc_0 = accuracy(f0, diag_test.labels)
            gain = acc_ft - acc_0
            rec["diagnostics"] = {
                "diag_test_size": n_diag, "linearized_accuracy": acc_lin, "ft_accuracy_diag": acc_ft,
                "zero_shot_accuracy_diag": acc_0,
                "gain_recovered": (acc_lin - acc_0) / gain if abs(gain) > 1e-12 else float("nan"),
                "lin_output_rel_error": float((lin - scores[rows]).norm() / (scores[rows] - f0).norm().clamp_min(1e-12)),
                "linearize_seconds": t()}
            t = _timer()
            pos = _balanced_prefix([e.label for e in split.train], cfg.diag_train_size)
            sub = self.encoded(f"diag-train-{seed}-{len(pos)}", [split.train[i] for i in pos], True)
            module.eval()
            opts = self.ntk_options()
            k1 = compute_kernel(module, sub, kernel="sgd", device=self.ctx.device, progress=self.ctx.progress, **opts)
            rec["diagnostics"].update({"diag_train_size": len(pos), "kernel_ft": k1["kernel"].tolist(),
                                       "diag_train_positions": pos})
            if k0_inline:
                k0 = compute_kernel(module, sub, kernel="sgd", device=self.ctx.device, progress=self.ctx.progress,
                                    params=theta0, **opts)
                rec["diagnostics"]["kernel_0"] = k0["kernel"].tolist()
                rec["diagnostics"].update(kernel_distance_metrics(k0["kernel"], k1["kernel"]))
            rec["diagnostics"]["kernel_seconds"] = t()
        rec["seconds"] = t_all()
        del module
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
        self._save(unit, key, rec)
        return rec


def _num(x) -> float | None:
    """A float from a stored value (strict JSON keeps NaN and infinities as the strings "nan", "inf")."""
    return None if x is None else float(x)


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), float(np.std(v)), len(v)


def comparison_rows(rows: list[dict]) -> list[dict]:
    """Mean and (population) std over seeds of every (task, model, k, method, metric), in :data:`METHOD_ORDER`."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["model"], r["k"], r["method"], r["metric"]), []).append(r["value"])
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    out = []
    for (task, model, k, method, metric), vals in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][4] != "accuracy", kv[0][4],
                                            order.get(kv[0][3], 99), kv[0][3])):
        mean, std, n = _mean_std(vals)
        out.append({"task": task, "model": model, "k": k, "method": method, "metric": metric, "mean": mean,
                    "std": std, "n": n})
    return out


def comparison_markdown(comp: list[dict]) -> str:
    """Accuracy table (percent, mean (std) over seeds) and a diagnostics table."""
    acc = [r for r in comp if r["metric"] == "accuracy"]
    lines = ["| task | model | k | method | accuracy % (std) | seeds |", "|---|---|---|---|---|---|"]
    for r in acc:
        lines.append(f"| {r['task']} | {r['model']} | {r['k']} | {r['method']} | "
                     f"{100 * r['mean']:.1f} ({100 * r['std']:.1f}) | {r['n']} |")
    diag = [r for r in comp if r["metric"] != "accuracy"]
    if diag:
        lines += ["", "| task | method | diagnostic | mean (std) | seeds |", "|---|---|---|---|---|"]
        for r in diag:
            lines.append(f"| {r['task']} | {r['method']} | {r['metric']} | {r['mean']:.3f} ({r['std']:.3f}) | "
                         f"{r['n']} |")
    return "\n".join(lines) + "\n"


def task_table_markdown(rows: list[dict], metric: str = "accuracy", scale: float = 100.0, digits: int = 1,
                        reference: dict[str, dict[str, str]] | None = None) -> str:
    """Methods x tasks table of ``metric`` (mean (std) over seeds) from tidy rows of one or more runs.

    ``reference``: optional extra rows ``{label: {task: text}}`` appended below (e.g. a paper's numbers).
    """
    from real_tasks.data import TASKS

    comp = [r for r in comparison_rows(rows) if r["metric"] == metric]
    order = {name: i for i, name in enumerate(TASKS)}  # the papers' task order
    tasks = sorted(dict.fromkeys(r["task"] for r in comp), key=lambda t: (order.get(t, len(order)), t))
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in comp)]
    methods += [m for m in dict.fromkeys(r["method"] for r in comp) if m not in methods]
    cell = {(r["method"], r["task"]): r for r in comp}
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for m in methods:
        vals = []
        for t in tasks:
            r = cell.get((m, t))
            vals.append("" if r is None or r["n"] == 0 else
                        f"{scale * r['mean']:.{digits}f} ({scale * r['std']:.{digits}f})" if r["n"] > 1 else
                        f"{scale * r['mean']:.{digits}f}")
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    for label, by_task in (reference or {}).items():
        lines.append(f"| {label} | " + " | ".join(by_task.get(t, "") for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: MalladiConfig, ctx: RunContext) -> dict:
    """Run every unit (resuming finished ones), then write tables, the figure and the summary."""
    import torch

    from real_tasks.entk import kernel_distance_metrics, solve_seed
    from real_tasks.finetune import accuracy

    t_total = _timer()
    R = _Run(cfg, ctx)
    methods = set(cfg.methods)
    prompt_methods = {"zero-shot", "ft-sgd", "ft-adam", "k-sgd", "k-asigngd"}
    if not R.prompt_ok and methods & prompt_methods:
        R.skipped.append(f"prompt-based methods {sorted(methods & prompt_methods)}: {cfg.model} has no LM head")
        methods -= prompt_methods
    base = {"task": R.spec.name, "model": cfg.model, "k": cfg.k}
    rows: list[dict] = []
    seconds = {"load": R.load_seconds, "zero_shot": 0.0, "entk": 0.0, "entk_solve": 0.0, "finetune": 0.0,
               "diagnostics": 0.0}
    test_labels = np.array([e.label for e in next(iter(R.splits.values())).test])
    union_labels = np.array([e.label for e in R.union.examples])
    checks: dict = {}

    if "zero-shot" in methods:
        z = R.zero_shot()
        seconds["zero_shot"] += z["seconds"]
        rows.append({**base, "seed": None, "method": "zero-shot", "metric": "accuracy", "value": _num(z["accuracy"]),
                     "n_test": len(test_labels)})

    names = {"sgd": "FT-SGD", "adam": "FT-Adam", "noprompt": "FT (no prompt)"}
    k0_inline = cfg.ntk_implementation == "auto" or "k-sgd" not in methods
    ft_records: dict[tuple[str, int], dict] = {}
    for seed in cfg.seeds:
        for method in ("sgd", "adam", "noprompt"):
            if f"ft-{method}" in methods:
                ft_records[(method, seed)] = R.finetune_unit(method, seed, k0_inline)

    kernels: dict[str, dict] = {}
    wanted = {"prompt-sgd": "k-sgd" in methods, "prompt-asigngd": "k-asigngd" in methods,
              "noprompt-sgd": "k-noprompt" in methods}
    also = tuple(n for n, need in wanted.items() if need)
    for name, need in wanted.items():
        if need:
            kernels[name] = R.kernel(name, also)
            seconds["entk"] += kernels[name]["seconds"]
    if "prompt-sgd" in kernels and "zero-shot" in methods:
        # Self-check: the engine's f_0 on the test rows must predict what zero-shot prompting predicts.
        f0 = kernels["prompt-sgd"]["outputs"][list(R.union.test_rows)]
        checks["zero_shot_from_engine_outputs"] = accuracy(torch.from_numpy(f0), torch.from_numpy(test_labels))

    t = _timer()
    for seed in cfg.seeds:
        tr, te = R.union.train_rows[seed], R.union.test_rows
        solved: dict[str, np.ndarray] = {}
        if "prompt-sgd" in kernels or "prompt-asigngd" in kernels:
            ks = kernels.get("prompt-sgd")
            ka = kernels.get("prompt-asigngd")
            outs = (ks or ka)["outputs"]
            solved.update(solve_seed(None if ks is None else ks["kernel"], None if ka is None else ka["kernel"],
                                     outs, union_labels, tr, te, ridge=cfg.kernel_ridge,
                                     logistic_ridge=cfg.logistic_ridge, gamma=cfg.asym_gamma))
        if "noprompt-sgd" in kernels:
            kn = kernels["noprompt-sgd"]
            res = solve_seed(kn["kernel"], None, kn["outputs"], union_labels, tr, te, ridge=cfg.kernel_ridge,
                             logistic_ridge=cfg.logistic_ridge)
            solved["K-SGD (no prompt)"] = res["K-SGD"]
            solved["K-SGD (no prompt, logistic)"] = res["K-SGD (logistic)"]
        for method, out in solved.items():
            rows.append({**base, "seed": seed, "method": method, "metric": "accuracy",
                         "value": accuracy(torch.from_numpy(out), torch.from_numpy(test_labels)),
                         "n_test": len(test_labels)})
    seconds["entk_solve"] += t()

    for (method, seed), rec in ft_records.items():
        diag = dict(rec.get("diagnostics", {}))
        seconds["finetune"] += rec.get("ft_seconds", rec.get("seconds", 0.0))
        seconds["diagnostics"] += diag.get("linearize_seconds", 0.0) + diag.get("kernel_seconds", 0.0)
        if "kernel_ft" in diag and "kernel_distance" not in diag and R.union_engine_differs:
            # K(theta_0) with the diagnostics' engine (same algorithm, sketch and hashes as K(theta_FT))
            diag.update(kernel_distance_metrics(R.diag_kernel0(seed, diag["diag_train_positions"]),
                                                np.asarray(diag["kernel_ft"], float)))
        elif "kernel_ft" in diag and "kernel_distance" not in diag and "prompt-sgd" in kernels:
            c = kernels["prompt-sgd"]["num_outputs"]
            rows_u = diag.get("diag_union_rows") or [R.union.train_rows[seed][i] for i in diag["diag_train_positions"]]
            flat = (np.asarray(rows_u)[:, None] * c + np.arange(c)[None, :]).reshape(-1)
            diag.update(kernel_distance_metrics(kernels["prompt-sgd"]["kernel"][np.ix_(flat, flat)],
                                                np.asarray(diag["kernel_ft"], float)))
        rows.append({**base, "seed": seed, "method": names[method], "metric": "accuracy",
                     "value": _num(rec["accuracy"]), "n_test": len(test_labels),
                     "lr": rec.get("selected", {}).get("lr"), "batch_size": rec.get("selected", {}).get("batch_size"),
                     "best_step": rec.get("selected", {}).get("best_step")})
        for metric in ("linearized_accuracy", "ft_accuracy_diag", "zero_shot_accuracy_diag", "gain_recovered",
                       "lin_output_rel_error", "kernel_distance", "kernel_rel_change"):
            if metric in diag:
                rows.append({**base, "seed": seed, "method": names[method], "metric": metric,
                             "value": _num(diag[metric]), "n_test": diag.get("diag_test_size")})

    write_table(ctx.out_dir / "results", rows)
    comp = comparison_rows(rows)
    write_table(ctx.out_dir / "comparison", comp)
    atomic_write_text(ctx.out_dir / "comparison.md", comparison_markdown(comp))
    figures = []
    try:
        from figures.malladi import redraw

        figures = [str(p) for p in redraw(ctx.out_dir)]
    except Exception as exc:  # noqa: BLE001 -- a figure failure must not lose the results written above
        R.skipped.append(f"figure: {type(exc).__name__}: {exc}")

    acc = {r["method"]: r for r in comp if r["metric"] == "accuracy"}
    parts = [f"{m} {100 * acc[m]['mean']:.1f}±{100 * acc[m]['std']:.1f}" for m in METHOD_ORDER if m in acc]
    summary = {
        "headline": f"{R.spec.name} k={cfg.k} {cfg.model} ({len(cfg.seeds)} seeds, {len(test_labels)} test): "
                    + ", ".join(parts),
        "task": R.spec.name, "model": R.lm.describe(), "k": cfg.k, "seeds": list(cfg.seeds),
        "test_size": len(test_labels), "kernel_union_size": len(R.union.examples),
        "label_tokens": None if R.label_tokens is None else R.label_tokens.record(),
        "accuracy": {m: {"mean": r["mean"], "std": r["std"], "n": r["n"]} for m, r in acc.items()},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "compute_seconds": round(sum(seconds.values()), 2),
        "this_invocation_seconds": round(t_total(), 2),
        "kernel_plans": {n: k["plan_text"] for n, k in kernels.items()},
        "checks": checks, "skipped": R.skipped, "figures": figures,
        "data": {k: v for k, v in R.data.describe().items() if k not in ("files",)},
        "device": ctx.device, "threads": __import__("torch").get_num_threads(), "cpu_count": os.cpu_count(),
    }
    return summary


EXPERIMENT = Experiment(
    name="malladi",
    config_cls=MalladiConfig,
    presets=PRESETS,
    run=run,
    help=("Malladi et al. 2023, 'A Kernel-Based View of Language Model Fine-Tuning': prompt-based fine-tuning "
          "(SGD, Adam) vs the eNTK solutions (K-SGD, K-A-SignGD) on k-shot real tasks, standard fine-tuning "
          "without a prompt and its kernel, zero-shot, and kernel-behaviour diagnostics.\n\nexample:\n"
          "  ftsim run malladi --preset quick --task SST-2 --model smollm2 --k 16 --seeds 13,21,42,87,100"),
)
