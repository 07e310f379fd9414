"""Versions of the software that produced an output (for provenance)."""

from __future__ import annotations

from importlib import metadata

PACKAGES = ("torch", "monai", "antspyx", "SimpleITK", "deepbet", "nipype", "pybids", "nibabel",
            "nilearn", "numpy")


def software_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "n/a"
    return out
