"""The ``ftsim`` command line. It only parses arguments and dispatches; the work lives in the packages.

Subcommands:
  generate   write a synthetic corpus (sharded .npy + manifest) from an HMM preset
  verify     check a line of theory numerically and print a claims table
  run        run an experiment with a preset (writes tidy results and figures)
  figures    redraw every figure from stored results
  reproduce  the main job: corpora, exactness checks, experiments, summary table and figure
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import typing
from pathlib import Path

from ftsim import __version__
from ftsim.app.registry import EXPERIMENTS, VERIFIERS, load

# Preset parameters exposed by ``ftsim generate``, with their types (seed is handled separately).
_PRESET_FUNCS = {"wei2021": "wei2021_hmm", "memory": "memory_hmm", "random": "random_hmm"}


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


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", formatter_class=_Formatter,
        help="write a synthetic corpus from an HMM preset",
        description=(
            "Sample sequences from an HMM preset and write them as sharded .npy token files with a manifest\n"
            "(all parameters, seed, dtypes, SHA-256 of every shard). Streams: memory stays flat for any size.\n\n"
            "presets:\n"
            "  wei2021  Wei, Xie & Ma 2021: permutation-mixture transitions, softmax emissions\n"
            "  memory   memory-augmented HMM: a memory value per sequence x a syntax chain\n"
            "  random   Dirichlet rows (--concentration)\n\n"
            "example:\n"
            "  ftsim generate --preset wei2021 --num-states 10 --vocab-size 10 --sequences 100000 \\\n"
            "      --length 128 --seed 0 --out corpora/wei2021"),
    )
    p.add_argument("--preset", choices=list(_PRESET_FUNCS), required=True)
    p.add_argument("--sequences", type=int, required=True, help="number of sequences N")
    p.add_argument("--length", type=int, required=True, help="tokens per sequence T")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (and HMM seed unless --hmm-seed)")
    p.add_argument("--hmm-seed", type=int, default=None, help="seed of the HMM parameters (default: --seed)")
    p.add_argument("--out", type=Path, required=True, help="output directory (must be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--states", action="store_true", help="also write hidden states")
    p.add_argument("--labels", action="store_true",
                   help="also write downstream labels y = 1[mu^T P(H_0|x) >= 0] (memory: of P(M|x))")
    p.add_argument("--task-support", type=int, default=6, help="non-zeros of the sparse mu")
    p.add_argument("--text", action="store_true", help="also write a text rendering (t<k> words)")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard")
    p.add_argument("--dtype", default=None, help="token dtype (default: smallest unsigned that fits)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    seen: dict[str, list[str]] = {}
    kinds: dict[str, type] = {}
    for preset, params in _preset_params().items():
        for name, (tp, default) in params.items():
            seen.setdefault(name, []).append(f"{preset}={default}")
            kinds[name] = tp
    g = p.add_argument_group("preset parameters (each preset's default shown)")
    for name, presets in seen.items():
        g.add_argument("--" + name.replace("_", "-"), dest=f"hp__{name}", default=argparse.SUPPRESS,
                       metavar=kinds[name].__name__.upper(), help="; ".join(presets))


def _cmd_generate(args: argparse.Namespace) -> int:
    from ftsim.core.config import parse_value
    from simulate.corpus import CorpusSpec, write_corpus

    allowed = _preset_params()[args.preset]
    params = {}
    for key, value in vars(args).items():
        if not key.startswith("hp__"):
            continue
        name = key[4:]
        if name not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to preset {args.preset!r}")
        params[name] = parse_value(allowed[name][0], value, "--" + name.replace("_", "-"))
    full = {name: params.get(name, default) for name, (_, default) in allowed.items()}
    spec = CorpusSpec(args.preset, full, num_sequences=args.sequences, length=args.length, seed=args.seed,
                      hmm_seed=args.hmm_seed, states=args.states, labels=args.labels, text=args.text,
                      task_support=args.task_support, shard_tokens=args.shard_tokens, dtype=args.dtype)
    manifest = write_corpus(args.out, spec, overwrite=args.overwrite, progress=not args.no_progress)
    total = manifest["num_sequences"] * manifest["length"]
    print(f"wrote {total:,} tokens ({manifest['dtype']}) in {len(manifest['shards'])} shard(s) to {args.out}")
    return 0


def _add_verify(sub: argparse._SubParsersAction) -> None:
    lines = "\n".join(f"  {k:10s} {h}" for k, (_, h) in VERIFIERS.items())
    p = sub.add_parser("verify", formatter_class=_Formatter, help="check a line of theory numerically",
                       description="Run numerical checks and print a table: claim, setting, measured value, "
                                   "verdict.\nExit status 1 if any claim fails.\n\nchecks:\n" + lines)
    p.add_argument("name", choices=list(VERIFIERS))
    p.add_argument("--full", action="store_true", help="more models and samples (slower)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="where to write claims (default: <results>/verify/NAME)")


def run_verifier(name: str, quick: bool = True, seed: int = 0, out: Path | None = None):
    """Run a registered verifier, write its claims table (JSONL, CSV, Markdown) and return the claims."""
    from ftsim.core.claims import claims_markdown
    from ftsim.core.io import atomic_write_text, results_root, write_table

    claims = load(VERIFIERS[name][0])(quick=quick, seed=seed)
    out = out or results_root() / "verify" / name
    write_table(out / "claims", [c.row() for c in claims])
    atomic_write_text(out / "claims.md", claims_markdown(claims))
    return claims


def _cmd_verify(args: argparse.Namespace) -> int:
    from ftsim.core.claims import claims_passed, format_claims

    claims = run_verifier(args.name, quick=not args.full, seed=args.seed, out=args.out)
    print(format_claims(claims))
    return 0 if claims_passed(claims) else 1


def _add_run(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    lines = "\n".join(f"  {k:14s} {h}" for k, (_, h) in EXPERIMENTS.items()) or "  (none registered)"
    p = sub.add_parser("run", formatter_class=_Formatter, add_help=False,
                       help="run an experiment with a preset",
                       description="ftsim run NAME --preset quick|paper [--FIELD VALUE ...]\n\n"
                                   "Each experiment's config fields become flags; `ftsim run NAME --help` lists "
                                   "them.\nResults go to <results>/NAME/<preset>-<config hash>/ (results.jsonl/csv, "
                                   "figures, config.json);\na killed run resumes where it stopped.\n\n"
                                   "experiments:\n" + lines)
    p.add_argument("name", nargs="?", metavar="NAME", help=", ".join(EXPERIMENTS))
    p.add_argument("-h", "--help", action="store_true")
    return p


def _cmd_run(args: argparse.Namespace, rest: list[str], parser: argparse.ArgumentParser) -> int:
    from ftsim.core.config import add_config_arguments, config_from_args
    from ftsim.core.experiment import run_experiment

    if args.name is None:
        parser.run_parser.print_help()  # type: ignore[attr-defined]
        return 0 if args.help else 2
    if args.name not in EXPERIMENTS:
        parser.run_parser.error(f"unknown experiment {args.name!r}; choose from {', '.join(EXPERIMENTS)}")  # type: ignore[attr-defined]
    exp = load(EXPERIMENTS[args.name][0])
    p = argparse.ArgumentParser(prog=f"ftsim run {args.name}", description=exp.help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, exp.config_cls, exp.presets)
    p.add_argument("--out", type=Path, default=None, help="results root (default: $FTSIM_RESULTS or ./results)")
    p.add_argument("--overwrite", action="store_true", help="recompute instead of reusing stored results")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--no-progress", action="store_true")
    if args.help:
        p.print_help()
        return 0
    ns = p.parse_args(rest)
    try:
        config = config_from_args(exp.config_cls, exp.presets, ns)
    except (ValueError, TypeError) as exc:
        p.error(str(exc))
    out_dir, summary = run_experiment(exp, config, preset=ns.preset, root=ns.out, overwrite=ns.overwrite,
                                      device=ns.device, progress=not ns.no_progress)
    print(f"results: {out_dir}")
    for key, value in summary.items():
        if isinstance(value, (int, float, str)):
            print(f"  {key}: {value}")
    return 0


def _add_figures(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("figures", formatter_class=_Formatter, help="redraw every figure from stored results",
                       description="Walk the results directory and redraw each run's figures from its tidy "
                                   "tables (no recomputation).")
    p.add_argument("--results", type=Path, default=None, help="results root (default: $FTSIM_RESULTS or ./results)")


def _cmd_figures(args: argparse.Namespace) -> int:
    from ftsim.app.reproduce import redraw_all

    drawn = redraw_all(args.results)
    for path in drawn:
        print(path)
    print(f"{len(drawn)} figure(s) redrawn")
    return 0


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", formatter_class=_Formatter, help="the main job: checks, experiments, summary",
                       description="Generate the synthetic corpora, run every exactness check and the experiments "
                                   "of the preset,\nand write a summary table (summary.md/csv) and figures under "
                                   "--out.")
    p.add_argument("--preset", choices=["quick", "paper"], default="quick")
    p.add_argument("--out", type=Path, default=None, help="results root (default: $FTSIM_RESULTS or ./results)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="auto")


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from ftsim.app.reproduce import reproduce

    ok = reproduce(args.preset, root=args.out, overwrite=args.overwrite, device=args.device)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftsim", formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description=__doc__.split("\n\n", 1)[0] + "\n\n" + __doc__.split("\n\n", 1)[1])
    parser.add_argument("--version", action="version", version=f"ftsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_generate(sub)
    _add_verify(sub)
    parser.run_parser = _add_run(sub)  # type: ignore[attr-defined]
    _add_figures(sub)
    _add_reproduce(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "run":
            return _cmd_run(args, rest, parser)
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return {"generate": _cmd_generate, "verify": _cmd_verify, "figures": _cmd_figures,
                "reproduce": _cmd_reproduce}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; finished units are kept and a rerun resumes", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as exc:
        # Library errors name the file, field or line; show them without a traceback.
        if os.environ.get("FTSIM_DEBUG"):
            raise
        print(f"ftsim {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
