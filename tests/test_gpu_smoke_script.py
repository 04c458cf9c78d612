"""The GPU smoke script stays runnable: on this machine it runs its checks CPU against CPU with tiny models
(the same code path a GPU machine runs against CUDA)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_gpu_smoke_script_runs_on_the_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_smoke.py"), "--tiny", "--device", "cpu",
                        "--out", str(out)], capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    info = json.loads(out.read_text())
    assert len(info["checks"]) == 5 and all(c["ok"] for c in info["checks"])
