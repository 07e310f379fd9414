"""Small synthetic inputs shared by the model tests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

SHAPE = (40, 48, 12)


@pytest.fixture(autouse=True)
def one_thread():
    """torch on one thread for every test of a module that imports this fixture."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_volumes(n, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    disk = ((yy - 20) ** 2 / 300 + (xx - 24) ** 2 / 400) < 1
    mask = np.repeat(disk[..., None], SHAPE[2], axis=2)
    vols = [(0.5 + 0.05 * rng.standard_normal(SHAPE)).astype(np.float32)[None] * mask
            for _ in range(n)]
    return vols, [mask] * n


def write_preprocessed(folder, affine, images, masks, prefix: str = "s") -> list[tuple[str, str]]:
    """Template-space scans on disk as preprocessing leaves them: ``(preproc.json, T1w)`` per
    image (``masks``: one brain mask for all, or one per image)."""
    from pathlib import Path

    import nibabel as nb

    from bids_anomaly.preprocessing.pipeline import PreprocResult

    folder = Path(folder)
    masks = masks if isinstance(masks, list) else [masks] * len(images)
    out = []
    for k, (img, mask) in enumerate(zip(images, masks)):
        mask_path = folder / f"{prefix}{k}_mask.nii.gz"
        nb.save(nb.Nifti1Image(mask.astype(np.uint8), affine), mask_path)
        path = folder / f"{prefix}{k}_T1w.nii.gz"
        nb.save(nb.Nifti1Image(np.asarray(img, np.float32), affine), path)
        res = PreprocResult(native_ref=str(path), native_brain_mask=str(mask_path), xfm="",
                            template_brain_mask=str(mask_path),
                            template_images={"T1w": str(path)}, brain_extraction="none",
                            brain_volume_ml=1.0)
        js = folder / f"{prefix}{k}.json"
        res.save(js)
        out.append((str(js), str(path)))
    return out
