"""Atomic writes and inter-process locks for files in the output directory.

Every output goes to a temporary file in the destination folder and is renamed into place,
so a killed run never leaves a half-written derivative. Files shared by concurrent
participant-level processes (dataset_description.json, group table) are written under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nb


@contextlib.contextmanager
def atomic_path(dest: Path | str, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sfx = suffix if suffix is not None else "".join(dest.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{sfx}", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(dest: Path | str, text: str) -> Path:
    """Atomically write ``text`` to ``dest``."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_bytes(dest: Path | str, data: bytes) -> Path:
    """Atomically write ``data`` to ``dest``."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_json(dest: Path | str, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return write_text(dest, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_nifti(dest: Path | str, img: nb.Nifti1Image) -> Path:
    """Atomically save a NIfTI image (the temp name keeps the .nii.gz suffix)."""
    with atomic_path(dest, suffix=".nii.gz" if str(dest).endswith(".gz") else ".nii") as tmp:
        nb.save(img, tmp)
    return Path(dest)


def write_with(dest: Path | str, writer: Callable[[Path], None], suffix: str | None = None) -> Path:
    """Atomically create ``dest`` with ``writer(tmp_path)``."""
    with atomic_path(dest, suffix=suffix) as tmp:
        writer(tmp)
    return Path(dest)


@contextlib.contextmanager
def file_lock(path: Path | str) -> Iterator[None]:
    """Exclusive advisory lock (fcntl) on ``path`` + '.lock', for files shared across processes."""
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
