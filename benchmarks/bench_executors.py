"""Wall time of one sweep with each executor, measured in one run on this machine, and its projection to N workers.

The sweep is ``ftsim run ntk-width --preset quick`` (widths x seeds: one unit per trained network and its kernel
gradient flow), computed from an empty unit cache

* ``serial``: the units in this process, one after another;
* ``local --jobs 2``: two worker processes (one BLAS/torch thread each, ``--worker-threads 1``), the gather step in
  this process;

each in a fresh cache and results directory, best of ``--repeats``. The tables of both runs must be byte-identical
(checked here, and by ``tests/test_executors.py``). The projection to N workers uses the per-unit compute times the
serial run recorded in its ``units.json``: a greedy longest-first schedule of the units on N workers gives the
makespan, plus the measured overhead of the gather step (serial wall time minus the sum of unit times). It ignores
contention for memory bandwidth and, on this shared 2-core machine, for the cores themselves: the load average at
the start of each run is recorded.

    python benchmarks/bench_executors.py [--repeats 1] [--out benchmarks/results/bench_executors.json]
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ftsim.core.io import read_json, write_json  # noqa: E402

EXPERIMENT = "ntk-width"
TABLES = ("results.jsonl", "summary_by_width.jsonl", "predictions.jsonl")


def run_once(executor: list[str], workdir: Path) -> dict:
    env = {**os.environ, "FTSIM_CACHE": str(workdir / "cache"), "FTSIM_RESULTS": str(workdir / "results"),
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ftsim.app.cli", "run", EXPERIMENT, "--preset", "quick", "--no-progress",
           "--worker-threads", "1", *executor]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    run_dir = next((workdir / "results" / EXPERIMENT).glob("quick-*"))
    digests = {t: hashlib.sha256((run_dir / t).read_bytes()).hexdigest() for t in TABLES if (run_dir / t).is_file()}
    units = read_json(run_dir / "units.json") if (run_dir / "units.json").is_file() else {}
    return {"wall_s": wall, "load_average_1min_before": load, "table_sha256": digests, "units": units}


def unit_seconds(units) -> list[float]:
    rows = units.get("units", units) if isinstance(units, dict) else units
    return [float(u.get("seconds") or 0.0) for u in rows if isinstance(u, dict)]


def makespan(times: list[float], workers: int) -> float:
    heap = [0.0] * workers
    for t in sorted(times, reverse=True):
        heapq.heappush(heap, heapq.heappop(heap) + t)
    return max(heap)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_executors.json")
    args = ap.parse_args()
    modes = {"serial": ["--executor", "serial"], "local --jobs 2": ["--executor", "local", "--jobs", "2"]}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for mode, flags in modes.items():
            with tempfile.TemporaryDirectory(prefix="ftsim-bench-exec-") as tmp:
                r = run_once(flags, Path(tmp))
                runs[mode].append(r)
                print(f"{mode}: {r['wall_s']:.1f} s (load {r['load_average_1min_before']:.1f})", flush=True)
    best = {m: min(rs, key=lambda r: r["wall_s"]) for m, rs in runs.items()}
    identical = len({json.dumps(b["table_sha256"], sort_keys=True) for b in best.values()}) == 1
    times = unit_seconds(best["serial"]["units"])
    total = sum(times)
    overhead = max(best["serial"]["wall_s"] - total, 0.0)
    projection = {str(n): makespan(times, n) + overhead for n in (1, 2, 4, 8, 16, 32)} if times else {}
    report = {
        "benchmark": "bench_executors",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "sweep": f"ftsim run {EXPERIMENT} --preset quick, empty cache",
        "wall_s": {m: b["wall_s"] for m, b in best.items()},
        "all_wall_s": {m: [r["wall_s"] for r in rs] for m, rs in runs.items()},
        "load_average_1min_before": {m: b["load_average_1min_before"] for m, b in best.items()},
        "speedup_local2_over_serial": best["serial"]["wall_s"] / best["local --jobs 2"]["wall_s"],
        "tables_byte_identical": identical,
        "num_units": len(times), "sum_unit_seconds": total, "max_unit_seconds": max(times) if times else None,
        "gather_overhead_s": overhead,
        "projected_wall_s": projection,
        "projection": "greedy longest-first schedule of the serial run's per-unit compute times on N workers, plus "
                      "the serial run's non-unit overhead; no contention modelled",
    }
    write_json(args.out, report)
    print(json.dumps({k: report[k] for k in ("wall_s", "speedup_local2_over_serial", "tables_byte_identical",
                                              "num_units", "projected_wall_s")}, indent=2))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
