"""Atomic files (and their mode under the umask), tidy tables and config parsing."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Literal, Optional

import numpy as np
import pytest

from ftsim.core.config import add_config_arguments, config_from_args, config_from_dict, config_hash, parse_value
from ftsim.core.io import (
    atomic_open,
    read_json,
    read_jsonl,
    save_npy,
    sha256_file,
    stable_hash,
    write_json,
    write_table,
)


def test_atomic_open_keeps_old_content_on_error(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w", encoding="utf-8") as fh:
            fh.write("half of the new")
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]  # no temp file left behind


def test_json_is_strict_and_handles_numpy(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan"), "d": (1, 2)})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": [0, 1, 2], "c": "nan", "d": [1, 2]}
    (tmp_path / "bad.json").write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 2"):
        read_json(tmp_path / "bad.json")


def test_save_npy_hash_is_the_file_hash(tmp_path):
    digest = save_npy(tmp_path / "a.npy", np.arange(10, dtype=np.uint8))
    assert digest == sha256_file(tmp_path / "a.npy")
    assert np.array_equal(np.load(tmp_path / "a.npy", allow_pickle=False), np.arange(10))


def test_tables_round_trip_and_bad_line_is_named(tmp_path):
    rows = [{"m": 4, "acc": 0.5}, {"m": 8, "acc": 0.75, "note": "x"}]
    write_table(tmp_path / "r", rows)
    assert read_jsonl(tmp_path / "r.jsonl") == rows
    assert (tmp_path / "r.csv").read_text().splitlines() == ["m,acc,note", "4,0.5,", "8,0.75,x"]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_atomic_files_respect_the_umask(tmp_path):
    import os

    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            write_json(tmp_path / f"m{mask:o}.json", {"a": 1})
        finally:
            os.umask(old)
        assert (tmp_path / f"m{mask:o}.json").stat().st_mode & 0o777 == mode


def test_stable_hash_is_order_independent_and_sensitive():
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


@dataclasses.dataclass(frozen=True)
class Cfg:
    num_states: int = 10
    lr: float = 0.1
    name: str = "x"
    flag: bool = False
    seeds: tuple[int, ...] = (1, 2)
    mode: Literal["head", "prompt"] = "head"
    budget: Optional[int] = None


PRESETS = {"quick": Cfg(), "paper": Cfg(num_states=30, seeds=(1, 2, 3))}


def test_config_flags_override_the_preset():
    p = argparse.ArgumentParser()
    add_config_arguments(p, Cfg, PRESETS)
    ns = p.parse_args(["--preset", "paper", "--lr", "0.01", "--seeds", "13,21", "--flag", "true",
                       "--mode", "prompt", "--budget", "none"])
    cfg = config_from_args(Cfg, PRESETS, ns)
    assert cfg == Cfg(num_states=30, lr=0.01, seeds=(13, 21), flag=True, mode="prompt", budget=None)
    assert config_hash(cfg) != config_hash(PRESETS["paper"])
    assert config_from_dict(Cfg, json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


@pytest.mark.parametrize("tp, text, pattern", [
    (int, "1.5", "not a valid int"), (bool, "maybe", "not a boolean"),
    (Literal["a", "b"], "c", "not one of a, b"), (tuple[int, ...], "1,x", "not a valid int"),
])
def test_bad_values_name_the_flag(tp, text, pattern):
    with pytest.raises(ValueError, match=f"--flag: .*{pattern}"):
        parse_value(tp, text, "--flag")


def test_config_errors_name_the_field():
    from ftsim.core.errors import InputError

    p = argparse.ArgumentParser()
    add_config_arguments(p, Cfg, PRESETS)
    with pytest.raises(InputError) as info:
        config_from_args(Cfg, PRESETS, p.parse_args(["--num-states", "ten"]))
    assert info.value.field == "num_states" and info.value.describe(flag_style=True).startswith("--num-states: ")


def test_unknown_config_field_is_named():
    with pytest.raises(ValueError, match=r"run\.json: unknown field\(s\) \['nope'\] for Cfg"):
        config_from_dict(Cfg, {"nope": 1}, source="run.json")
