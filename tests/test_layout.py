"""The package's layout: no import circle, imports only run down the stages.

The stages, lowest first (a module may import its own stage and the ones before it)::

    core → bids_io → preprocessing → models → calibration → bundle → training → inference
         → derivatives → reports → evaluation → workflows → runner → demo → cli

(``calibration`` sits before ``training``: ``fit_bundle`` calibrates on out-of-fold residuals.)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"bids_anomaly": ROOT / "bids_anomaly", "bids_anomaly.cli": ROOT / "cli"}

STAGES = ["core", "bids_io", "preprocessing", "models", "calibration", "bundle", "training",
          "inference", "derivatives", "reports", "evaluation", "workflows", "runner", "demo",
          "cli"]
# Longest prefix wins; anything not listed is core (the package's __init__).
STAGE_OF = {
    "bids_anomaly.core": "core",
    "bids_anomaly.progress": "core",
    "bids_anomaly.bids_io": "bids_io",
    "bids_anomaly.synth": "bids_io",
    "bids_anomaly.preprocessing": "preprocessing",
    "bids_anomaly.models": "models",
    "bids_anomaly.calibration": "calibration",
    "bids_anomaly.models.bundle": "bundle",
    "bids_anomaly.models.bundle_info": "bundle",
    "bids_anomaly.models.card": "bundle",
    "bids_anomaly.training": "training",
    "bids_anomaly.inference": "inference",
    "bids_anomaly.bids_io.derivatives": "derivatives",
    "bids_anomaly.reports": "reports",
    "bids_anomaly.evaluation": "evaluation",
    "bids_anomaly.workflows": "workflows",
    "bids_anomaly.runner": "runner",
    "bids_anomaly.runner.demo": "demo",
    "bids_anomaly.cli": "cli",
}
# Known upward imports, each a lazy one inside a function; nothing may join this list.
UPWARD: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    out = {}
    for pkg, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [p for p in path.relative_to(root).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def stage(module: str) -> int:
    best = max((p for p in STAGE_OF if module == p or module.startswith(p + ".")),
               key=len, default=None)
    return STAGES.index(STAGE_OF[best] if best else "core")


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of package modules, lazy ones (inside functions) included."""
    graph = {}
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = (".".join(here[:len(here) - node.level + 1] + [node.module or ""])
                        .rstrip(".") if node.level else node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            found |= {t for t in targets if t in mods and t != name}
        graph[name] = found
    return graph


def test_no_import_circle():
    graph = imports(modules())
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import circle: " + " → ".join(path[path.index(node):] + [node]))
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_imports_follow_the_stages():
    upward = {(a, b) for a, targets in imports(modules()).items() for b in targets
              if stage(b) > stage(a) and not b.startswith(a + ".")}
    assert upward <= UPWARD, sorted(upward - UPWARD)


def test_every_module_imports_on_its_own():
    """Each module in a process where no package module was imported before it (a fork of
    one that pre-loaded the third-party libraries only); it loads nothing of a later stage."""
    script = textwrap.dedent("""
        import importlib, json, os, sys
        import numpy, scipy.ndimage, torch, nibabel, pandas, click, rich  # noqa: F401
        result = {}
        for name in json.loads(sys.argv[1]):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    importlib.import_module(name)
                    out = {"ok": True, "loaded": sorted(m for m in sys.modules
                                                        if m.startswith("bids_anomaly"))}
                except BaseException as exc:
                    out = {"ok": False, "error": repr(exc)}
                os.write(w, json.dumps(out).encode())
                os._exit(0)
            os.close(w)
            data = b""
            while chunk := os.read(r, 65536):
                data += chunk
            os.waitpid(pid, 0)
            result[name] = json.loads(data or b'{"ok": false, "error": "no answer"}')
        print(json.dumps(result))
    """)
    mods = sorted(modules())
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(mods)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    failed = {m: r["error"] for m, r in result.items() if not r["ok"]}
    assert not failed, failed
    later = {m: [x for x in r["loaded"] if x in result and stage(x) > stage(m)]
             for m, r in result.items()}
    assert not {m: x for m, x in later.items() if x}, later


def test_every_package_is_installed():
    """A non-editable install (the container images) ships only the packages pyproject
    lists: every folder with an ``__init__.py`` must be among them."""
    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "bids_anomaly").rglob("__init__.py")} | {"bids_anomaly.cli"}
    assert found - listed == set(), "packages missing from pyproject.toml"
    assert listed - found == set(), "pyproject.toml lists packages that do not exist"
