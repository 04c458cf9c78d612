"""Frozen config dataclasses with named presets, and the command-line flags generated from their fields.

An experiment's config is a frozen dataclass whose defaults are the paper's settings; named presets
(``quick``, ``paper``) are instances of it. The command line is generated from the fields: every field
``num_states: int`` becomes ``--num-states INT``; tuples take comma-separated values (``--seeds 13,21,42``).
Nothing the user types is evaluated as code.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Mapping, TypeVar

from ftsim.core.errors import InputError
from ftsim.core.io import stable_hash, to_jsonable

__all__ = ["add_config_arguments", "config_from_args", "config_hash", "config_from_dict", "parse_value"]

C = TypeVar("C")

_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def parse_value(tp: Any, text: str, name: str = "value") -> Any:
    """Parse ``text`` into the field type ``tp`` (int, float, str, bool, Optional, tuple[X, ...], Literal)."""
    tp, optional = _unwrap_optional(tp)
    if optional and text.strip().lower() in ("none", "null", ""):
        return None
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        elem = args[0] if args else str
        parts = [p for p in text.split(",") if p.strip() != ""]
        return tuple(parse_value(elem, p.strip(), name) for p in parts)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if text not in [str(c) for c in choices]:
            raise ValueError(f"{name}: {text!r} is not one of {', '.join(map(str, choices))}")
        return next(c for c in choices if str(c) == text)
    if tp is bool:
        key = text.strip().lower()
        if key not in _BOOL_WORDS:
            raise ValueError(f"{name}: {text!r} is not a boolean (use true/false)")
        return _BOOL_WORDS[key]
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a valid {tp.__name__}") from None
    raise TypeError(f"{name}: unsupported config field type {tp!r}")


def _type_label(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is tuple:
        (elem, *_) = typing.get_args(tp) or (str,)
        label = f"{getattr(elem, '__name__', 'X').upper()},..."
    elif origin is typing.Literal:
        label = "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    else:
        label = getattr(tp, "__name__", str(tp)).upper()
    return label + ("|none" if optional else "")


def _field_help(cls: type, field: dataclasses.Field) -> str:
    return field.metadata.get("help", "") if field.metadata else ""


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, presets: Mapping[str, Any]) -> None:
    """Add ``--preset`` and one flag per field of the dataclass ``cls`` (default: keep the preset's value)."""
    hints = typing.get_type_hints(cls)
    parser.add_argument("--preset", default=next(iter(presets)), choices=list(presets),
                        help=f"named preset the flags below override: {' | '.join(presets)} (default: "
                             f"{next(iter(presets))})")
    group = parser.add_argument_group("config fields (each overrides the preset; [each preset's value])")
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        tp = hints[field.name]
        shown = {name: to_jsonable(getattr(p, field.name)) for name, p in presets.items()}
        values = "; ".join(f"{k}: {_short(v)}" for k, v in shown.items())
        help_text = _field_help(cls, field)
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=f"cfg__{field.name}",
            metavar=_type_label(tp),
            default=None,
            # argparse %-formats help strings: a literal "%" (e.g. "10% of the examples") must be doubled
            help=((help_text + " " if help_text else "") + f"[{values}]").replace("%", "%%"),
        )


def _short(v: Any, width: int = 40) -> str:
    text = ",".join(map(str, v)) if isinstance(v, list) else str(v)
    return text if len(text) <= width else text[:width - 3] + "..."


def config_from_args(cls: type[C], presets: Mapping[str, C], args: argparse.Namespace) -> C:
    """The chosen preset with every given flag applied, validated by the dataclass's ``__post_init__``.

    Raises:
        InputError: naming the field whose value does not parse or does not validate.
    """
    base = presets[args.preset]
    hints = typing.get_type_hints(cls)
    overrides = {}
    for field in dataclasses.fields(cls):
        raw = getattr(args, f"cfg__{field.name}", None)
        if raw is not None:
            try:
                overrides[field.name] = parse_value(hints[field.name], raw, field.name)
            except (ValueError, TypeError) as exc:
                msg = str(exc)
                msg = msg[len(field.name) + 2:] if msg.startswith(field.name + ": ") else msg
                raise InputError(msg, field=field.name) from None
    try:
        return dataclasses.replace(base, **overrides)
    except InputError:
        raise
    except (ValueError, TypeError) as exc:
        raise InputError(str(exc)) from None


def config_from_dict(cls: type[C], data: Mapping[str, Any], source: str = "config") -> C:
    """Rebuild a config from its JSON form, naming unknown or missing fields."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"{source}: unknown field(s) {sorted(unknown)} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        tp, _ = _unwrap_optional(hints[k])
        kwargs[k] = tuple(v) if typing.get_origin(tp) is tuple and v is not None else v
    return cls(**kwargs)


def config_hash(config: Any, length: int = 10) -> str:
    """Content hash of a config (its JSON form): the key for run directories and caches."""
    return stable_hash({"type": type(config).__name__, "fields": to_jsonable(config)}, length)
