"""The ``ftsim`` command line. It parses and validates arguments and dispatches; the work lives in the packages.

Bad input (a flag, a file, a field, a line of a data file) is reported as one line naming the culprit, with exit
status 2 and no traceback, before anything is computed or written; ``FTSIM_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import typing
from pathlib import Path

from ftsim import __version__
from ftsim.app.registry import EXPERIMENTS, VERIFIERS

DESCRIPTION = ("ftsim: check, with numbers, why fine-tuning a pretrained language model works -- synthetic HMM "
               "worlds with exact oracles, empirical NTKs, and the same predictions on real pretrained LMs.")

EPILOG = """examples:
  ftsim reproduce --preset quick          the main job (synthetic, CPU, minutes)
  ftsim verify hmm                        exact inference vs brute force and hmmlearn
  ftsim run malladi --preset quick --task SST-2 --model smollm2
  ftsim generate --preset wei2021 --num-states 10 --vocab-size 10 --sequences 1000 --length 64 --out corpora/w
  ftsim run ntk-width --preset paper --executor local --jobs 2    a sweep on two worker processes

`ftsim COMMAND --help` explains each command."""

# Preset parameters exposed by ``ftsim generate``, with their types (seed is handled separately).
_PRESET_FUNCS = {"wei2021": "wei2021_hmm", "memory": "memory_hmm", "random": "random_hmm", "ginc": "ginc_hmm"}


def _preset_params() -> dict[str, dict[str, tuple[type, object]]]:
    import simulate.hmm as H

    out: dict[str, dict[str, tuple[type, object]]] = {}
    for preset, fname in _PRESET_FUNCS.items():
        fn = getattr(H, fname)
        hints = typing.get_type_hints(fn)
        params = {}
        for name, p in inspect.signature(fn).parameters.items():
            if name == "seed":
                continue
            tp = hints.get(name, float)
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            params[name] = (args[0] if args else tp, p.default)
        out[preset] = params
    return out


class _Help(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40, width=110)


def _add_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they print plain lines when stderr is not a terminal)")


# ------------------------------------------------------------------------------------------------------------
# generate
# ------------------------------------------------------------------------------------------------------------

def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", formatter_class=_Help, help="write a synthetic corpus from an HMM preset",
        description=(
            "Sample sequences from an HMM preset and write them as sharded .npy token files with a manifest\n"
            "(parameters, seeds, dtypes, SHA-256 of every file). Streams: memory stays flat for any size.\n\n"
            "presets:\n"
            "  wei2021  Wei, Xie & Ma 2021: permutation-mixture transitions, softmax emissions\n"
            "  memory   memory-augmented HMM: a memory value per sequence x a syntax chain\n"
            "  random   Dirichlet rows (--concentration)\n"
            "  ginc     Xie et al. 2021 GINC: mixture of concept HMMs on (value, slot) states, a memory matrix\n"
            "           emits one token per state, slot 0 emits the delimiter 0; OOD concepts have prior 0\n"
            "           (states: joint index concept * V * S + value * S + slot)"),
        epilog=("example:\n  ftsim generate --preset wei2021 --num-states 10 --vocab-size 10 --sequences 100000 "
                "--length 128 --seed 0 --out corpora/wei2021"))
    p.add_argument("--preset", choices=list(_PRESET_FUNCS), required=True, help="HMM family")
    p.add_argument("--sequences", type=int, required=True, metavar="N", help="number of sequences")
    p.add_argument("--length", type=int, required=True, metavar="T", help="tokens per sequence")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output directory: empty, or a corpus of this spec (a killed run resumes)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, and the HMM's unless --hmm-seed (0)")
    p.add_argument("--hmm-seed", type=int, default=None, help="seed of the HMM parameters (default: --seed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous corpus in DIR (exactly the files its manifest lists)")
    p.add_argument("--states", action="store_true", help="also write hidden states")
    p.add_argument("--labels", action="store_true",
                   help="also write downstream labels y = 1[mu^T P(H_0|x) >= 0] (memory: of P(M|x))")
    p.add_argument("--task-support", type=int, default=6, metavar="K", help="non-zeros of the sparse mu (6)")
    p.add_argument("--text", action="store_true", help="also write a text rendering (t<k> words)")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, metavar="TOK", help="tokens per shard (2^24)")
    p.add_argument("--dtype", default=None, help="token dtype (default: the smallest unsigned that fits)")
    _add_progress(p)
    seen: dict[str, list[str]] = {}
    kinds: dict[str, type] = {}
    for preset, params in _preset_params().items():
        for name, (tp, default) in params.items():
            seen.setdefault(name, []).append(f"{preset}: {default}")
            kinds[name] = tp
    g = p.add_argument_group("preset parameters (default per preset)")
    for name, presets in seen.items():
        g.add_argument("--" + name.replace("_", "-"), dest=f"hp__{name}", default=argparse.SUPPRESS,
                       metavar=kinds[name].__name__.upper(), help="; ".join(presets))


def _cmd_generate(args: argparse.Namespace) -> int:
    from ftsim.core.config import parse_value
    from ftsim.core.errors import InputError
    from simulate.corpus import CorpusSpec, write_corpus

    allowed = _preset_params()[args.preset]
    params = {}
    for key, value in vars(args).items():
        if not key.startswith("hp__"):
            continue
        name = key[4:]
        if name not in allowed:
            raise InputError(f"does not apply to preset {args.preset!r} (its parameters: "
                             f"{', '.join('--' + n.replace('_', '-') for n in allowed)})", field=name)
        try:
            params[name] = parse_value(allowed[name][0], value, name)
        except ValueError as exc:
            raise InputError(str(exc).removeprefix(f"{name}: "), field=name) from None
    full = {name: params.get(name, default) for name, (_, default) in allowed.items()}
    try:  # validated on construction, before anything is written
        spec = CorpusSpec(args.preset, full, num_sequences=args.sequences, length=args.length, seed=args.seed,
                          hmm_seed=args.hmm_seed, states=args.states, labels=args.labels, text=args.text,
                          task_support=args.task_support, shard_tokens=args.shard_tokens, dtype=args.dtype)
    except InputError as exc:
        raise InputError(exc.message, field="sequences" if exc.field == "num_sequences" else exc.field) from None
    manifest = write_corpus(args.out, spec, overwrite=args.overwrite, progress=not args.no_progress)
    import numpy as np

    dt = np.dtype(manifest["dtype"])
    label = dt.name + ("" if dt.byteorder in ("=", "|") or dt.isnative else f" ({dt.str})")
    total = manifest["num_sequences"] * manifest["length"]
    print(f"wrote {total:,} tokens ({label}) in {len(manifest['shards'])} shard(s) to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------------------

def _add_verify(sub) -> None:
    p = sub.add_parser("verify", formatter_class=_Help, help="check a line of theory numerically",
                       description="Run the numerical checks of a line of theory and print a table: claim, "
                                   "setting, measured value, verdict.\nExit status 1 if any claim fails. Results "
                                   "are cached by code version: a rerun of unchanged code reads them.\n\nchecks: "
                                   + ", ".join(VERIFIERS))
    p.add_argument("name", choices=list(VERIFIERS), metavar="NAME", help=" | ".join(VERIFIERS))
    p.add_argument("--full", action="store_true", help="more models and samples (slower)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random instances (0)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="where to write the claims (default: <results>/verify/NAME)")
    p.add_argument("--overwrite", action="store_true", help="recompute even if this code's result is cached")


def _cmd_verify(args: argparse.Namespace) -> int:
    from ftsim.app.registry import verifier
    from ftsim.app.runner import run_verifier
    from ftsim.core.claims import claims_passed, format_claims

    claims, info = run_verifier(verifier(args.name), quick=not args.full, seed=args.seed, out=args.out,
                                overwrite=args.overwrite)
    print(format_claims(claims))
    print(f"({'cached result of a run that took' if info['cached'] else 'took'} {info['seconds']:.1f} s)")
    return 0 if claims_passed(claims) else 1


# ------------------------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------------------------

def _add_run(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("run", allow_abbrev=False, formatter_class=_Help, add_help=False, help="run an experiment with a preset",
                       usage="ftsim run NAME [--preset PRESET] [--FIELD VALUE ...] [--out DIR] [--overwrite] "
                             "[--device DEV] [--no-progress]",
                       description="Run an experiment. Each experiment's config fields become flags; "
                                   "`ftsim run NAME --help` lists them\nwith the value of each preset. Results go "
                                   "to <results>/NAME/<preset>-<config hash>/ (tidy tables,\nfigures, config.json, "
                                   "summary.json); units of work are cached, so a killed run resumes.",
                       epilog="experiments: " + ", ".join(EXPERIMENTS))
    p.add_argument("name", nargs="?", metavar="NAME", help=" | ".join(EXPERIMENTS))
    p.add_argument("--preset", metavar="PRESET", help="named preset the field flags override (each experiment "
                                                      "lists its own; default: its first, `quick`)")
    p.add_argument("-h", "--help", action="store_true", help="show this help (with NAME: the experiment's flags)")
    return p


def _experiment_parser(exp) -> argparse.ArgumentParser:
    from ftsim.core.config import add_config_arguments

    p = argparse.ArgumentParser(prog=f"ftsim run {exp.name}", description=exp.help, formatter_class=_Help,
                                allow_abbrev=False)  # "--p" is a field of some experiments, not "--preset"
    add_config_arguments(p, exp.config_cls, exp.presets)
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="results root (default: $FTSIM_RESULTS or ./results)")
    p.add_argument("--overwrite", action="store_true", help="recompute this run's units instead of reading them")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<index> (auto: cuda if visible)")
    _add_progress(p)
    g = p.add_argument_group("where the units are computed (see `ftsim status RUN_DIR`)")
    g.add_argument("--executor", default="serial", choices=["serial", "local", "submitit"],
                   help="serial: this process; local: --jobs worker processes; submitit: SLURM or its local mode")
    g.add_argument("--jobs", type=int, default=1, help="local workers (one GPU each when several are visible)")
    g.add_argument("--worker-threads", type=int, default=0, help="intra-op threads per worker (0: cores / jobs)")
    g.add_argument("--submitit-cluster", choices=["slurm", "local", "debug"], default=None,
                   help="submitit's cluster (default: SLURM when available, else local)")
    g.add_argument("--slurm-partition", default=None, help="SLURM partition")
    g.add_argument("--slurm-gpus", type=int, default=0, help="GPUs per job")
    g.add_argument("--slurm-time", type=int, default=60, metavar="MIN", help="time limit per job, minutes")
    g.add_argument("--slurm-cpus", type=int, default=2, help="CPUs per job")
    g.add_argument("--cached-only", action="store_true",
                   help="compute nothing: tables from the units finished so far (malladi leaves the rest out)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the units the run would compute (per kind, cached or not) and the estimated time")
    return p


def _executor(ns: argparse.Namespace):
    from ftsim.app.executors import ExecutorConfig

    return ExecutorConfig(name=ns.executor, jobs=ns.jobs, threads=ns.worker_threads, cluster=ns.submitit_cluster,
                          slurm_partition=ns.slurm_partition, slurm_gpus=ns.slurm_gpus, slurm_time=ns.slurm_time,
                          slurm_cpus=ns.slurm_cpus)


def _cmd_run(args: argparse.Namespace, rest: list[str], run_parser: argparse.ArgumentParser) -> int:
    from ftsim.app.registry import experiment
    from ftsim.app.runner import check_output_dir, run_experiment
    from ftsim.core import progress
    from ftsim.core.config import config_from_args
    from ftsim.core.experiment import resolve_device

    if args.name is None:
        run_parser.print_help()
        return 0 if args.help else 2
    exp = experiment(args.name)
    p = _experiment_parser(exp)
    if args.help:
        p.print_help()
        return 0
    ns = p.parse_args(rest + (["--preset", args.preset] if args.preset else []))
    config = config_from_args(exp.config_cls, exp.presets, ns)  # validated before anything is written
    if ns.out is not None:
        check_output_dir(ns.out)
    device = resolve_device(ns.device)
    executor = _executor(ns)
    if ns.no_progress:
        progress.configure(False)
    if ns.dry_run:
        import json

        from ftsim.app.runner import cache_for, dry_run

        print(json.dumps(dry_run(exp, config, device=device, cache=cache_for(ns.out)), indent=2))
        return 0
    out_dir, summary = run_experiment(exp, config, preset=ns.preset, root=ns.out, overwrite=ns.overwrite,
                                      device=ns.device, progress=not ns.no_progress, executor=executor,
                                      cached_only=ns.cached_only)
    print(f"results: {out_dir}")
    for key in ("headline", "compute_seconds", "this_run_seconds", "units", "units_missing", "device"):
        if key in summary:
            print(f"  {key}: {summary[key]}")
    for err in summary.get("figure_errors", []):
        print(f"  figure error: {err}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------------------
# figures, reproduce
# ------------------------------------------------------------------------------------------------------------

def _add_figures(sub) -> None:
    p = sub.add_parser("figures", formatter_class=_Help, help="redraw every figure from stored results",
                       description="Walk the results directory and redraw each run's figures from its tidy tables "
                                   "(no recomputation).")
    p.add_argument("--results", type=Path, default=None, metavar="DIR",
                   help="results root (default: $FTSIM_RESULTS or ./results)")


def _cmd_figures(args: argparse.Namespace) -> int:
    from ftsim.app.reproduce import redraw_all

    drawn, errors = redraw_all(args.results)
    for path in drawn:
        print(path)
    for err in errors:
        print(f"error: {err}", file=sys.stderr)
    print(f"{len(drawn)} figure(s) redrawn")
    return 0 if not errors else 1


def _add_reproduce(sub) -> None:
    p = sub.add_parser("reproduce", formatter_class=_Help, help="the main job: corpora, checks, experiments",
                       description="Generate the synthetic corpora, run every verifier and experiment of the "
                                   "preset, and write a\nsummary (summary.md/csv) and every claim (claims.md) under "
                                   "<results>/reproduce/PRESET. Exit status 1 if a claim fails.")
    p.add_argument("--preset", choices=["quick", "paper"], default="quick", help="quick (CPU, minutes) | paper")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="results root (default: $FTSIM_RESULTS or ./results)")
    p.add_argument("--overwrite", action="store_true", help="recompute every unit")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<index>")
    _add_progress(p)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ftsim.app.reproduce import reproduce
    from ftsim.app.runner import check_output_dir
    from ftsim.core import progress
    from ftsim.core.experiment import resolve_device

    if args.out is not None:
        check_output_dir(args.out)
    resolve_device(args.device)
    if args.no_progress:
        progress.configure(False)
    ok = reproduce(args.preset, root=args.out, overwrite=args.overwrite, device=args.device,
                   progress=not args.no_progress)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------------------

def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="ftsim", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"ftsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    _add_generate(sub)
    _add_verify(sub)
    run_parser = _add_run(sub)
    _add_figures(sub)
    _add_reproduce(sub)
    _add_status(sub)
    _add_docs(sub)
    return parser, run_parser


def _add_status(sub) -> None:
    p = sub.add_parser("status", formatter_class=_Help, help="how many units of a run are done, running, failed",
                       description="Count a run's planned units by state (done, running, failed, pending) and name "
                                   "each failed unit's error and log.")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory (results/NAME/PRESET-HASH)")


def _cmd_status(args: argparse.Namespace) -> int:
    from ftsim.app.runner import status

    st = status(args.run_dir)
    print(f"{st['run']}: {st['done']} done, {st['running']} running, {len(st['failed'])} failed, "
          f"{st['pending']} pending" + (f" ({st['note']})" if st.get("note") else ""))
    for f in st["failed"]:
        print(f"  failed: {f['label']}: {f['error']}" + (f" (log: {f['log']})" if f.get("log") else "")
              + f" [{f['record']}]")
    return 1 if st["failed"] else 0


def _add_docs(sub) -> None:
    p = sub.add_parser("docs", formatter_class=_Help, help="regenerate (or check) the README's measured tables",
                       description="Rewrite the generated blocks of README.md from the stored results in "
                                   "docs/measured/ (--check: fail if README differs instead).")
    p.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the stored results give")
    p.add_argument("--collect", type=Path, default=None, metavar="RESULTS",
                   help="first copy the measured tables from this results root into docs/measured/")


def _cmd_docs(args: argparse.Namespace) -> int:
    from ftsim.app.docs import collect, render_readme

    if args.collect is not None:
        for path in collect(args.collect):
            print(f"stored {path}")
    changed = render_readme(check=args.check)
    if args.check:
        if changed:
            print("README.md differs from the stored results in docs/measured/: run `ftsim docs`", file=sys.stderr)
            return 1
        print("README.md is up to date")
        return 0
    print("README.md rewritten" if changed else "README.md already up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    parser, run_parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command != "run" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "run":
            return _cmd_run(args, rest, run_parser)
        return {"generate": _cmd_generate, "verify": _cmd_verify, "figures": _cmd_figures,
                "reproduce": _cmd_reproduce, "status": _cmd_status, "docs": _cmd_docs}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; finished units are kept in the cache and a rerun resumes", file=sys.stderr)
        return 130
    except MemoryError as exc:
        # the eNTK engine's NTKMemoryError names N, C, P and the bytes needed: a one-line answer
        if type(exc).__name__ != "NTKMemoryError" or os.environ.get("FTSIM_DEBUG"):
            raise
        print(f"ftsim {args.command}: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from ftsim.app.runner import UnitsFailed

        if not isinstance(exc, UnitsFailed) or os.environ.get("FTSIM_DEBUG"):
            raise
        print(f"ftsim {args.command}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # Bad input: one line naming the flag, file, field or line, no traceback.
        if os.environ.get("FTSIM_DEBUG"):
            raise
        from ftsim.core.errors import InputError

        text = exc.describe(flag_style=True) if isinstance(exc, InputError) else str(exc)
        print(f"ftsim {args.command}: error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
