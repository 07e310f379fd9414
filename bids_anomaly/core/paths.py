"""Validation of the run's folders: never write into the input dataset."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import OutputError, UsageError


def _inside(path: Path, parent: Path) -> bool:
    try:
        path.relative_to(parent)
        return True
    except ValueError:
        return False


def validate_run_paths(bids_dir: Path, output_dir: Path, work_dir: Path | None) -> None:
    """OUTPUT_DIR must differ from BIDS_DIR and not sit in its raw part (derivatives/ is fine);
    the work directory must be outside BIDS_DIR."""
    bids = bids_dir.resolve()
    out = output_dir.resolve()
    if out == bids:
        raise UsageError(f"OUTPUT_DIR must differ from BIDS_DIR ({bids})")
    if _inside(out, bids) and not _inside(out, bids / "derivatives"):
        raise UsageError(
            f"OUTPUT_DIR {out} is inside the raw part of BIDS_DIR {bids}; "
            f"use {bids / 'derivatives' / 'bids-anomaly'} or a folder outside BIDS_DIR"
        )
    if _inside(bids, out):
        raise UsageError(f"BIDS_DIR {bids} must not be inside OUTPUT_DIR {out}")
    if work_dir is not None and _inside(work_dir.resolve(), bids):
        raise UsageError(f"the work directory {work_dir} must not be inside BIDS_DIR {bids}")


def ensure_writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` if needed and check that we can write into it (exit 73 otherwise)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {what} {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path} is not writable")
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"0" * 4096)
    except OSError as exc:
        raise OutputError(f"cannot write into {what} {path}: {exc.strerror or exc}") from exc
    finally:
        if probe.exists():
            probe.unlink()
    return path
