"""The MNI152NLin2009aSym template and its tissue maps, from nilearn's package data (offline)."""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

TEMPLATE_NAME = "MNI152NLin2009aSym"
RESOLUTIONS = (1, 2)


@dataclass(frozen=True)
class Template:
    """Template images on one grid. Arrays are float32 (t1, gm, wm) and bool (mask)."""

    name: str
    resolution: int
    affine: np.ndarray
    t1: np.ndarray
    mask: np.ndarray
    gm: np.ndarray
    wm: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape)  # type: ignore[return-value]

    @property
    def csf(self) -> np.ndarray:
        """CSF probability: what is inside the mask and neither grey nor white matter."""
        return np.clip(self.mask.astype(np.float32) - self.gm - self.wm, 0.0, 1.0)

    def image(self, data: np.ndarray, dtype=np.float32) -> nb.Nifti1Image:
        """Wrap ``data`` (template-grid array) in a NIfTI image with the template affine."""
        img = nb.Nifti1Image(np.asarray(data, dtype=dtype), self.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(self.affine, code=4)
        img.set_sform(self.affine, code=4)
        return img


def _cache_dir() -> Path:
    """Where the arrays of a template are cached between processes: ``BIDS_ANOMALY_CACHE``,
    else a per-user folder in the temp dir."""
    root = os.environ.get("BIDS_ANOMALY_CACHE") or os.path.join(
        tempfile.gettempdir(), f"bids-anomaly-cache-{os.getuid()}")
    return Path(root)


def _cache_name(nilearn_version: str, resolution: int) -> str:
    return f"mni152-nilearn{nilearn_version}-res{resolution}.npz"


def _nilearn_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nilearn")
    except PackageNotFoundError:
        return None


def _cache_file(resolution: int, nilearn_version: str) -> Path:
    """The cache file of a template, keyed by nilearn's version."""
    return _cache_dir() / _cache_name(nilearn_version, resolution)


def _from_nilearn(resolution: int) -> dict[str, np.ndarray]:
    from nilearn import datasets

    t1_img = datasets.load_mni152_template(resolution=resolution)
    mask_img = datasets.load_mni152_brain_mask(resolution=resolution)
    gm_img = datasets.load_mni152_gm_template(resolution=resolution)
    wm_img = datasets.load_mni152_wm_template(resolution=resolution)
    mask = np.asarray(mask_img.dataobj) > 0.5
    return {"affine": t1_img.affine.copy(),
            "t1": np.asarray(t1_img.dataobj, dtype=np.float32) * mask, "mask": mask,
            "gm": np.asarray(gm_img.dataobj, dtype=np.float32) * mask,
            "wm": np.asarray(wm_img.dataobj, dtype=np.float32) * mask}


def _read_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("affine", "t1", "mask", "gm", "wm")}
        if arrays["t1"].shape == arrays["mask"].shape:
            return arrays
    except (OSError, KeyError, ValueError):
        pass
    return None


def _without_nilearn(resolution: int) -> dict[str, np.ndarray]:
    """Where nilearn is not installed: a cache file that a machine with nilearn wrote
    (``mni152-nilearn<version>-res<r>.npz`` in ``BIDS_ANOMALY_CACHE``, the newest version
    when there are several; the GPU benchmark carries them so)."""
    from packaging.version import InvalidVersion, Version

    def key(p: Path):
        v = p.name.removeprefix("mni152-nilearn").removesuffix(f"-res{resolution}.npz")
        try:
            return (1, Version(v))
        except InvalidVersion:
            return (0, Version("0"))

    for path in sorted(_cache_dir().glob(_cache_name("*", resolution)), key=key, reverse=True):
        arrays = _read_cache(path)
        if arrays is not None:
            return arrays
    raise ImportError(
        f"the {TEMPLATE_NAME} template comes from nilearn's package data, and nilearn is not "
        f"installed: install it, or set BIDS_ANOMALY_CACHE to a folder holding "
        f"{_cache_name('<version>', resolution)} written where nilearn is installed")


def _cached_arrays(resolution: int) -> dict[str, np.ndarray]:
    """The template arrays, from the cache when it is readable (importing nilearn and
    resampling costs ~4 s per process), else from nilearn's package data; the cache is
    written atomically and skipped silently where the folder is not writable."""
    version = _nilearn_version()
    if version is None:
        return _without_nilearn(resolution)
    path = _cache_file(resolution, version)
    arrays = _read_cache(path)
    if arrays is not None:
        return arrays
    arrays = _from_nilearn(resolution)
    try:
        from .atomic import atomic_path

        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)
    except OSError:
        pass
    return arrays


def export_template_cache(folder: Path, resolutions=RESOLUTIONS) -> list[Path]:
    """Write the template arrays (nilearn's, so where nilearn is installed) into ``folder``
    as cache files that a machine without nilearn reads through ``BIDS_ANOMALY_CACHE``.

    LZMA-compressed npz (np.load reads it as any npz): 4.7 MiB for both resolutions instead
    of nilearn's 11 MiB wheel or 127 MiB of uncompressed cache; each is read back and
    compared before it is kept."""
    import io
    import zipfile

    version = _nilearn_version()
    if version is None:
        raise ImportError("exporting the template cache needs nilearn")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for res in resolutions:
        t = load_template(res)
        arrays = {"affine": t.affine, "t1": t.t1, "mask": t.mask, "gm": t.gm, "wm": t.wm}
        path = folder / _cache_name(version, res)
        tmp = path.with_name(path.name + ".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as z:
            for key, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
                z.writestr(f"{key}.npy", buf.getvalue())
        back = _read_cache(tmp)
        if back is None or not all(np.array_equal(back[k], v) and back[k].dtype == v.dtype
                                   for k, v in arrays.items()):
            tmp.unlink(missing_ok=True)
            raise OSError(f"template cache {path} did not read back as written")
        tmp.replace(path)
        written.append(path)
    return written


@functools.lru_cache(maxsize=4)
def load_template(resolution: int = 2) -> Template:
    """Load the template at 1 or 2 mm from nilearn's bundled files (no download)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"template resolution must be one of {RESOLUTIONS}, got {resolution}")
    a = _cached_arrays(resolution)
    mask = a["mask"].astype(bool)
    t1, gm, wm = (a[k].astype(np.float32) for k in ("t1", "gm", "wm"))
    for arr in (t1, gm, wm, mask):
        arr.setflags(write=False)
    return Template(TEMPLATE_NAME, resolution, a["affine"].astype(np.float64), t1, mask, gm, wm)
