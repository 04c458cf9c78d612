"""Where the command line finds experiments, verifiers and figures (imported lazily, by name).

Values are ``"module:attribute"`` strings so that ``ftsim --help`` does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (target, one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "wei2021-exp1": ("simulate.wei2021.experiments:EXP1",
                     "Wei et al. 2021 exp. 1: prompt vs head tuning accuracy vs number of hidden states"),
    "wei2021-exp2": ("simulate.wei2021.experiments:EXP2",
                     "Wei et al. 2021 exp. 2: memory HMM + attention head vs vanilla HMM + linear head"),
    "ntk-width": ("simulate.ntk_width:EXPERIMENT",
                  "eNTK engine demo: MLPs of growing width approach kernel gradient flow"),
    "malladi": ("real_tasks.malladi:EXPERIMENT",
                "Malladi et al. 2023: prompt-based fine-tuning vs eNTK on a real pretrained LM"),
}

# name -> (target returning list[Claim], one-line help); target signature: fn(quick: bool, seed: int)
VERIFIERS: dict[str, tuple[str, str]] = {
    "hmm": ("simulate.verify:verify_hmm",
            "exact HMM inference vs brute force and hmmlearn; sampler vs exact marginals"),
    "wei2021": ("simulate.wei2021.verify:verify",
                "Wei et al. 2021 oracles: head tuning, prompt tuning, memory (exact posteriors)"),
    "ntk": ("simulate.ntk_width:verify",
            "eNTK engine: implementations agree, kernel regimes, width -> kernel gradient flow"),
}

# experiment name -> target ``fn(run_dir: Path) -> list[Path]`` that redraws that run's figures from its tables
FIGURES: dict[str, str] = {
    "wei2021-exp1": "figures.wei2021:redraw",
    "wei2021-exp2": "figures.wei2021:redraw",
    "ntk-width": "figures.ntk:redraw",
    "malladi": "figures.malladi:redraw",
}


def load(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
