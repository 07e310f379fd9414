"""What the GPU cohort benchmark relies on to run on a machine that has only PyTorch:
the carried wheel set covers the pipeline's imports and dependencies, and the template
comes from a carried cache where nilearn is absent (benchmarks/gpu_cohort.py)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from bids_anomaly.core import templates

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "benchmarks" / "gpu_wheels.txt"

# What the GPU machine has (its package list, /work/.library/device/KINDS.md) among the
# names the pipeline needs; gpu_wheels.txt's header says the same.
DEVICE_HAS = {
    "numpy", "scipy", "torch", "pandas", "scikit-learn", "scikit-image", "matplotlib",
    "pillow", "statsmodels", "patsy", "requests", "click", "rich", "networkx", "lxml",
    "simplejson", "formulaic", "interface-meta", "filelock", "fsspec", "pyyaml", "jinja2",
    "tqdm", "safetensors", "einops", "packaging", "python-dateutil", "pyparsing",
    "typing-extensions", "zipp", "six", "tzdata", "joblib", "threadpoolctl", "narwhals",
    "wrapt", "contourpy", "cycler", "fonttools", "kiwisolver", "markupsafe", "sympy",
    "setuptools", "urllib3", "idna", "certifi", "charset-normalizer", "colorama",
    "typing-inspect", "cloudpickle",
}
# Left behind on purpose, each with what stands in for it on the GPU machine.
LEFT_OUT = {
    "simpleitk": "N4 through antspyx (BIDS_ANOMALY_N4_BACKEND=antspyx)",
    "nilearn": "the template cache (BIDS_ANOMALY_CACHE)",
    "customtkinter": "deepbet's GUI only", "darkdetect": "deepbet's GUI only",
    "docopt": "num2words' command line only",
    "importlib-resources": "Python < 3.12 only",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _carried() -> dict[str, str]:
    out = {}
    for line in WHEELS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            spec = line.split()[0]
            name, _, version = spec.partition("==")
            assert version, f"{spec}: pin an exact version (name==version)"
            assert _norm(name) not in out, f"{name} listed twice"
            out[_norm(name)] = version
    return out


def test_wheel_set_is_pinned_and_carries_nothing_the_machine_has():
    carried = _carried()
    assert not {"numpy", "scipy", "torch"} & set(carried)
    assert not DEVICE_HAS & set(carried)
    assert not set(LEFT_OUT) & set(carried)


def test_every_product_dependency_travels_is_there_or_is_replaced():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    known = set(_carried()) | DEVICE_HAS | set(LEFT_OUT)
    missing = [d for d in deps if _norm(Requirement(d).name) not in known]
    assert not missing, f"dependencies neither carried, on the GPU machine nor replaced: {missing}"


def test_carried_wheels_bring_their_own_dependencies():
    # each carried package's requirements (as installed here, for Python 3.12 on Linux) are
    # carried too, on the GPU machine, or left out with a reason
    env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
           "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    known = set(_carried()) | DEVICE_HAS | set(LEFT_OUT)
    gaps = []
    for name in _carried():
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if (r.marker is None or r.marker.evaluate(env)) and _norm(r.name) not in known:
                gaps.append(f"{name} needs {r.name}")
    assert not gaps, gaps


def test_template_from_the_carried_cache_without_nilearn(tmp_path, monkeypatch):
    written = templates.export_template_cache(tmp_path, resolutions=(2,))
    assert [p.name for p in written] == [
        f"mni152-nilearn{metadata.version('nilearn')}-res2.npz"]
    expected = templates.load_template(2)
    monkeypatch.setattr(templates, "_nilearn_version", lambda: None)
    monkeypatch.setenv("BIDS_ANOMALY_CACHE", str(tmp_path))
    arrays = templates._cached_arrays(2)
    for key in ("affine", "t1", "mask", "gm", "wm"):
        assert np.array_equal(arrays[key], getattr(expected, key))
    monkeypatch.setenv("BIDS_ANOMALY_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ImportError, match="BIDS_ANOMALY_CACHE"):
        templates._cached_arrays(2)
