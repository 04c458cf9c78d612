"""Where the command line finds experiments, verifiers and figures (imported lazily, by name).

Values are ``"module:attribute"`` strings so that ``ftsim --help`` does not import torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (target, one-line help)
EXPERIMENTS: dict[str, tuple[str, str]] = {}

# name -> (target returning list[Claim], one-line help); target signature: fn(quick: bool, seed: int)
VERIFIERS: dict[str, tuple[str, str]] = {
    "hmm": ("simulate.verify:verify_hmm",
            "exact HMM inference vs brute force and hmmlearn; sampler vs exact marginals"),
}

# experiment name -> target ``fn(run_dir: Path) -> list[Path]`` that redraws that run's figures from its tables
FIGURES: dict[str, str] = {}


def load(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj
