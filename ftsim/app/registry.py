"""Where the command line finds experiments and verifiers: a name maps to a ``"module:attribute"`` target and
nothing else (everything else -- presets, figures, help, place in ``ftsim reproduce`` -- is declared by the
:class:`~ftsim.core.experiment.Experiment` or :class:`~ftsim.core.experiment.Verifier` value itself).

Targets are strings so that ``ftsim --help`` imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

from ftsim.core.errors import InputError

__all__ = ["EXPERIMENTS", "VERIFIERS", "load", "experiment", "verifier"]

# Order is the order of ``ftsim reproduce``'s summary (verifiers first, then experiments).
VERIFIERS: dict[str, str] = {
    "hmm": "simulate.verify:VERIFIER",
    "wei2021": "simulate.wei2021.verify:VERIFIER",
    "ntk": "simulate.ntk_width:VERIFIER",
    "lpft": "simulate.lpft:VERIFIER",
    "pretraining-bound": "simulate.deng2024:VERIFIER",
    "sparse": "simulate.sparse:VERIFIER",
    "smart": "simulate.smart:VERIFIER",
}

EXPERIMENTS: dict[str, str] = {
    "hmm-exactness": "simulate.verify:EXACTNESS",
    "wei2021-exp1": "simulate.wei2021.experiments:EXP1",
    "wei2021-exp2": "simulate.wei2021.experiments:EXP2",
    "lpft-synthetic": "simulate.lpft:EXPERIMENT",
    "ntk-width": "simulate.ntk_width:EXPERIMENT",
    "malladi": "real_tasks.malladi:EXPERIMENT",
    "lpft": "real_tasks.lpft:EXPERIMENT",
    "deng2024": "simulate.deng2024:EXPERIMENT",
    "sparse-synthetic": "simulate.sparse:EXPERIMENT",
    "sparse": "real_tasks.sparse:EXPERIMENT",
    "smart-synthetic": "simulate.smart:EXPERIMENT",
    "smart": "real_tasks.smart:EXPERIMENT",
}


def load(target: str) -> Any:
    """The object a ``"module:attribute"`` target names."""
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def experiment(name: str):
    if name not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}", field="name")
    return load(EXPERIMENTS[name])


def verifier(name: str):
    if name not in VERIFIERS:
        raise InputError(f"unknown verifier {name!r}; choose from {', '.join(VERIFIERS)}", field="name")
    return load(VERIFIERS[name])
