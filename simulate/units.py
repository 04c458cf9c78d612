"""Planned units of the synthetic experiments: one compute target that every ``simulate`` experiment's plan names.

An experiment's ``plan(config, ctx)`` describes each unit with :func:`unit_spec`: its cache key (kind, version,
inputs), the config, a module-level function ``fn(work, config, **params)`` that computes it, and the function's JSON
parameters. Whichever process computes the unit (the run itself through ``ctx.unit_of``, a local worker, a SLURM
job) goes through :func:`compute_unit`, which rebuilds the config from its JSON form, fixes the thread count (float
reductions depend on it, so a unit is the same wherever it runs) and calls the function. A unit that needs another
unit (a fine-tuning run needs the pretrained body) fetches it with :meth:`UnitSpec.fetch` and names it in ``needs``,
so executors start it after that one.

Two experiments (``lpft-synthetic``, ``sparse-synthetic``) fine-tune the masked LM that ``wei2021-exp1 --preset
quick`` pretrains: :func:`exp1_checkpoint` names its pretraining arguments and :func:`checkpoint_spec` plans it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Any, Callable

from ftsim.core.cache import UnitCache
from ftsim.core.config import config_from_dict
from ftsim.core.experiment import UnitSpec

__all__ = ["unit_spec", "compute_unit", "exp1_checkpoint", "checkpoint_spec", "compute_checkpoint"]


def _name(obj: Any) -> str:
    """``"module:qualname"`` of a module-level function or class (closures and lambdas cannot be named)."""
    if "<" in obj.__qualname__ or "." in obj.__qualname__:
        raise ValueError(f"{obj.__qualname__}: a planned unit needs a module-level function (not a closure)")
    return f"{obj.__module__}:{obj.__qualname__}"


def _resolve(name: str) -> Any:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def unit_spec(kind: str, version: int | str, inputs: Any, fn: Callable[..., Any], config: Any, *, label: str = "",
              threads: int | None = 1, needs: tuple[UnitSpec, ...] = (), **params: Any) -> UnitSpec:
    """The unit (kind, version, inputs) computed by ``fn(work, config, **params)``, as data.

    Args:
        fn: a module-level function; ``params`` its JSON keyword arguments besides the work directory and config.
        config: the experiment's frozen config dataclass (stored in its JSON form).
        threads: torch and BLAS threads while ``fn`` runs (None: leave them as the process has them).
        needs: the units ``fn`` reads (:meth:`UnitSpec.fetch`); executors start this one after them.
    """
    return UnitSpec(kind, version, inputs, "simulate.units:compute_unit",
                    {"fn": _name(fn), "config": dataclasses.asdict(config), "config_type": _name(type(config)),
                     "threads": threads, **params}, label=label, needs=tuple(n.key.digest for n in needs))


def compute_unit(work, fn: str, config: dict, config_type: str, threads: int | None = None, **params: Any) -> Any:
    """Compute one planned unit (see :func:`unit_spec`) in this process: the target of every spec it makes."""
    from ftsim.core.threads import limit_threads

    cfg = config_from_dict(_resolve(config_type), config)
    with limit_threads(threads) if threads else contextlib.nullcontext():
        return _resolve(fn)(work, cfg, **params)


def exp1_checkpoint(num_states: int, hmm_seed: int = 0, **changes: Any) -> dict[str, Any]:
    """The arguments of :func:`simulate.wei2021.pretrain.pretrain` for the masked LM of ``wei2021-exp1 --preset
    quick`` on the ``wei2021`` HMM (``num_states``, ``hmm_seed``), with ``changes`` to that preset (``None``: keep).

    Returns:
        {"spec": HMMSpec, "length": T + 1, "cfg": PretrainConfig, "eval_length": T}.
    """
    from simulate.wei2021.experiments import EXP1_PRESETS
    from simulate.wei2021.pretrain import HMMSpec

    exp = dataclasses.replace(EXP1_PRESETS["quick"], **{k: v for k, v in changes.items() if v is not None})
    return {"spec": HMMSpec.make("wei2021", hmm_seed, num_states=num_states, vocab_size=exp.vocab_size),
            "length": exp.seq_len, "cfg": exp.pretrain_config(False, hmm_seed), "eval_length": exp.length}


def checkpoint_spec(num_states: int, hmm_seed: int, changes: dict[str, Any], device: str, cache_root: str
                    ) -> UnitSpec:
    """The checkpoint unit of :func:`exp1_checkpoint` (the key :func:`~simulate.wei2021.pretrain.pretrain` gives it),
    as data: the units that fine-tune it fetch it from the cache, so a plan lists it before them."""
    from simulate.wei2021.pretrain import pretrain_key

    a = exp1_checkpoint(num_states, hmm_seed, **changes)
    key = pretrain_key(a["spec"], a["length"], a["cfg"], eval_length=a["eval_length"], device=device)
    return UnitSpec(key.kind, key.version, key.inputs, "simulate.units:compute_checkpoint",
                    {"num_states": num_states, "hmm_seed": hmm_seed, "changes": changes, "device": device,
                     "cache_root": cache_root}, label=f"wei2021 pretrain m={num_states} hmm seed {hmm_seed}")


def compute_checkpoint(work, num_states: int, hmm_seed: int, changes: dict[str, Any], device: str,
                       cache_root: str) -> dict:
    """Pretrain the checkpoint of :func:`checkpoint_spec` into ``work`` (its corpus a unit of the same cache)."""
    from simulate.wei2021.pretrain import train_unit

    a = exp1_checkpoint(num_states, hmm_seed, **changes)
    return train_unit(work, a["spec"], a["length"], a["cfg"], UnitCache(cache_root), eval_length=a["eval_length"],
                      device=device)
