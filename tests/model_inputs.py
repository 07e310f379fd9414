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
