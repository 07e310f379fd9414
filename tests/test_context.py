"""2.5D context of the slice models: neighbouring slices as channels, the centre reconstructed."""

from __future__ import annotations

import numpy as np
import torch

from bids_anomaly.models.base import FitContext
from bids_anomaly.models.registry import get_model_class
from bids_anomaly.models.slices import crop_box, volume_to_slices

from .model_inputs import SHAPE, one_thread, tiny_volumes  # noqa: F401

TINY = {"channels": [4, 8], "strides": [2], "crop": [32, 40], "batch_size": 8, "epochs": 1,
        "patience": 1, "infer_draws": 2}


def test_each_slice_carries_its_neighbours_in_order_zero_beyond_the_volume():
    rng = np.random.default_rng(0)
    vol = rng.random((2, *SHAPE)).astype(np.float32)  # two contrasts
    mask = np.ones(SHAPE, bool)
    box = crop_box(mask, (32, 40))
    plain, _, keep = volume_to_slices(vol, mask, box)
    ctx, m, keep2 = volume_to_slices(vol, mask, box, context=2)
    assert list(keep) == list(keep2) and ctx.shape == (SHAPE[2], 2 * 5, 32, 40)
    for z in range(SHAPE[2]):
        for d in range(-2, 3):
            got = ctx[z, (d + 2) * 2 : (d + 3) * 2]
            want = plain[z + d] if 0 <= z + d < SHAPE[2] else torch.zeros_like(plain[0])
            assert torch.equal(got, want), (z, d)


def test_a_dae_with_context_trains_and_reconstructs_the_centre_slice():
    vols, masks = tiny_volumes(3)
    torch.manual_seed(0)
    model = get_model_class("dae")(["T1w"], SHAPE, {**TINY, "context": 1})
    assert model.net.model[0].conv.in_channels == 3  # the slice and one neighbour each side
    model.fit(vols[:2], masks[:2], FitContext(val_volumes=vols[2:], val_masks=masks[2:]))
    recon = model.reconstruct(vols[2], masks[2])
    assert recon.shape == vols[2].shape and np.isfinite(recon).all()
    assert not recon[:, ~masks[2]].any()
    # Reconstructing is a function of the scan: the same call gives the same map.
    np.testing.assert_array_equal(recon, model.reconstruct(vols[2], masks[2]))


def test_the_noise_blob_is_the_same_on_a_slice_and_its_neighbours():
    model = get_model_class("dae")(["T1w"], SHAPE, {**TINY, "context": 1})
    clean = torch.zeros(4, 3, 32, 40)
    noisy = model.make_input(clean, torch.ones(4, 1, 32, 40), torch.Generator().manual_seed(1))
    assert noisy.abs().sum() > 0
    assert torch.equal(noisy[:, 0], noisy[:, 1]) and torch.equal(noisy[:, 1], noisy[:, 2])


def test_without_context_the_input_is_the_plain_slices():
    vols, masks = tiny_volumes(1)
    box = crop_box(masks[0], (32, 40))
    a, _, _ = volume_to_slices(vols[0], masks[0], box)
    b, _, _ = volume_to_slices(vols[0], masks[0], box, context=0)
    assert torch.equal(a, b) and a.shape[1] == 1
