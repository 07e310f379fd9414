"""The slice models' crop is sized in mm: the whole template brain is reconstructed at 1 and
2 mm, the card states the crop, and bundles with a voxel crop load as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bids_anomaly.calibration.types import Calibration
from bids_anomaly.core.templates import RESOLUTIONS, load_template
from bids_anomaly.models.base import FitContext
from bids_anomaly.models.bundle import load_bundle, save_bundle
from bids_anomaly.models.registry import get_model_class
from bids_anomaly.models.slices import crop_voxels, template_resolution

from .model_inputs import SHAPE, one_thread, tiny_volumes  # noqa: F401

# Small networks with the default number of levels (so the default crop multiple).
SMALL = {
    "dae": {"channels": [4, 4, 8, 8], "strides": [2, 2, 2]},
    "ae": {"channels": [4, 4, 8, 8], "latent": 8},
    "vae": {"channels": [4, 4, 8, 8], "latent": 8},
    # The smallest ddpm: one DDIM step (≈ 15 s at 1 mm on one CPU thread, 155 slices).
    "ddpm": {"channels": [4, 4, 4, 4], "norm_num_groups": 4, "num_head_channels": 4,
             "steps": 1, "t_start": 20},
}
FAST = {"epochs": 1, "batch_size": 8, "shift": 0, "aug_gamma": 0.0, "aug_bias": 0.0,
        "aug_affine": 0.0}


def _calib():
    return Calibration(mu=0.1, sd=0.05, thresholds={"0.01": 2.3}, default_fpr="0.01",
                       healthy_scores=[1.0, 1.2])


def _template_data(res: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A template-space volume, the template brain mask, and a 4-slice training mask."""
    t = load_template(res)
    rng = np.random.default_rng(res)
    vol = ((t.t1 + 0.02 * rng.standard_normal(t.shape)) * t.mask).astype(np.float32)[None]
    zs = np.nonzero(t.mask.any(axis=(0, 1)))[0]
    mid = (int(zs.min()) + int(zs.max())) // 2
    slab = t.mask.copy()
    slab[..., : mid - 2] = False
    slab[..., mid + 2:] = False
    return vol, t.mask, slab


def test_template_resolution_from_shape():
    for res in RESOLUTIONS:
        assert template_resolution(load_template(res).shape) == res
    assert template_resolution(SHAPE) is None


def test_crop_voxels_round_up_to_the_network_multiple():
    assert crop_voxels([192, 224], 2, 16) == [96, 112]
    assert crop_voxels([192, 224], 1, 16) == [192, 224]
    assert crop_voxels([200, 230], 2, 16) == [112, 128]
    assert crop_voxels([150, 150], 1, 8) == [152, 152]


@pytest.mark.parametrize("res", [2, 1])
@pytest.mark.parametrize("kind", ["dae", "ae", "vae", "ddpm"])
def test_whole_template_brain_is_reconstructed(kind, res):
    vol, mask, slab = _template_data(res)
    torch.manual_seed(0)
    model = get_model_class(kind)(["T1w"], mask.shape, {**SMALL[kind], **FAST})
    crop = model.hparams["crop"]
    assert model.hparams["crop_mm"] == [c * res for c in crop]
    assert model.hparams["crop_mm"][0] >= 192 and model.hparams["crop_mm"][1] >= 224
    model.fit([vol], [slab], FitContext(seed=0))
    recon = model.reconstruct(vol, mask)
    covered = float(np.mean(recon[0][mask] != 0))
    assert covered >= 0.99, f"{kind} at {res} mm: crop {crop} reconstructs {covered:.1%}"


def test_card_states_the_crop_and_1mm_bundle_round_trip(tmp_path):
    vol, mask, slab = _template_data(1)
    torch.manual_seed(0)
    model = get_model_class("dae")(["T1w"], mask.shape, {**SMALL["dae"], **FAST})
    model.fit([vol], [slab], FitContext(seed=0))
    card = {"name": "dae", "template": "MNI152NLin2009aSym", "resolution": 1}
    path = save_bundle(tmp_path / "dae", model, card, _calib())
    hp = json.loads((path / "model.json").read_text())["hyperparameters"]
    assert hp["crop"] == [192, 224] and hp["crop_mm"] == [192, 224]
    bundle = load_bundle(path)
    assert bundle.model.hparams["crop"] == [192, 224] and bundle.model.box == model.box
    np.testing.assert_array_equal(bundle.model.reconstruct(vol, mask),
                                  model.reconstruct(vol, mask))


@pytest.mark.parametrize("res", [2, 1])
def test_old_voxel_crop_is_kept(res):
    shape = load_template(res).shape
    model = get_model_class("dae")(["T1w"], shape, {"crop": [96, 112]})
    assert model.hparams["crop"] == [96, 112]
    assert model.hparams["crop_mm"] == [96 * res, 112 * res]


def test_old_bundle_with_voxel_crop_scores_as_before(tmp_path):
    """A card written before crop_mm existed (crop in voxels only) loads with that crop."""
    vols, masks = tiny_volumes(2)
    hp = {"channels": [4, 8], "strides": [2], "crop": [32, 40], "epochs": 1, "batch_size": 8}
    torch.manual_seed(0)
    model = get_model_class("dae")(["T1w"], SHAPE, hp)
    model.fit(vols[:1], masks[:1], FitContext(seed=0))
    card = {"name": "dae", "template": "MNI152NLin2009aSym", "resolution": 2}
    path = save_bundle(tmp_path / "old", model, card, _calib())
    full = json.loads((path / "model.json").read_text())
    old_defaults = {k: v for k, v in full["hyperparameters"].items() if k != "crop_mm"}
    full["hyperparameters"] = old_defaults
    (path / "model.json").write_text(json.dumps(full))
    bundle = load_bundle(path)
    assert bundle.model.hparams["crop"] == [32, 40] and bundle.model.box == model.box
    np.testing.assert_array_equal(bundle.model.reconstruct(vols[1], masks[1]),
                                  model.reconstruct(vols[1], masks[1]))


def test_crop_refusals():
    shape = load_template(2).shape
    with pytest.raises(ValueError, match="product of strides = 8"):
        get_model_class("dae")(["T1w"], shape, {"crop": [100, 112]})
    with pytest.raises(ValueError, match="set one of them"):
        get_model_class("dae")(["T1w"], shape, {"crop": [96, 112], "crop_mm": [96, 112]})
    with pytest.raises(ValueError, match="not a template grid"):
        get_model_class("ae")(["T1w"], SHAPE, {"channels": [4, 8]})
