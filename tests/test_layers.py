"""The layer contract of pyproject.toml (import-linter) and the absence of import cycles between modules: the core
imports nothing of the project, theory only the core, simulate and real_tasks neither each other nor figures,
figures only the core; the application sits on top. Lazy imports inside functions count."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_import_linter_contracts_hold():
    exe = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                                 "sys.exit(lint_imports_command())"]
    r = subprocess.run(exe, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout, r.stdout[-2000:]


def test_no_import_cycles_between_modules():
    import grimp

    graph = grimp.build_graph("ftsim", "theory", "simulate", "real_tasks", "figures", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(importer=imported, imported=module):
                cycles.append((module, imported, graph.find_shortest_chain(importer=imported, imported=module)))
    assert not cycles, "\n".join(f"{a} -> {b} -> ... -> {a}: {chain}" for a, b, chain in cycles[:10])
