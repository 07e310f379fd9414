"""Training-time augmentation, the trainer's ETA, and the ddpm model (all tiny, 1 thread)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from bids_anomaly.calibration.types import Calibration
from bids_anomaly.models.augment import (
    affine,
    augment_batch,
    bias_field,
    flip_shift,
    intensity_gamma,
    local_warp,
)
from bids_anomaly.models.base import FitContext
from bids_anomaly.models.bundle import load_bundle, save_bundle
from bids_anomaly.models.registry import get_model_class
from bids_anomaly.models.trainer import eta_seconds, format_eta

from .model_inputs import SHAPE, one_thread, tiny_volumes  # noqa: F401

DDPM_TINY = {"channels": [8, 8], "norm_num_groups": 4, "num_head_channels": 4,
             "crop": [32, 40], "batch_size": 8, "lr": 2e-3, "steps": 3, "t_start": 100}


def _batch(n=4):
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(40.0), indexing="ij")
    disk = (((yy - 16) ** 2 / 150 + (xx - 20) ** 2 / 250) < 1).float()
    m = disk.expand(n, 1, 32, 40).clone()
    x = (0.7 + 0.1 * torch.rand(n, 1, 32, 40, generator=torch.Generator().manual_seed(3))) * m
    return x, m


HP = {"shift": 2, "aug_gamma": 0.1, "aug_bias": 0.1, "aug_affine": 5.0}


def test_augmentation_is_seeded_and_bounded():
    x, m = _batch()
    a = augment_batch(x, m, HP, torch.Generator().manual_seed(1))
    b = augment_batch(x, m, HP, torch.Generator().manual_seed(1))
    c = augment_batch(x, m, HP, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    xa, ma = a
    assert xa.shape == x.shape and set(ma.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(xa[ma == 0] == 0)  # nothing outside the (transformed) mask
    assert abs(float(ma.sum() / m.sum()) - 1) < 0.15  # ±5 % zoom: area within ~±10 %


def test_augmentations_off_is_the_old_flip_and_shift():
    x, m = _batch()
    off = {"shift": 2, "aug_gamma": 0.0, "aug_bias": 0.0, "aug_affine": 0.0}
    a = augment_batch(x, m, off, torch.Generator().manual_seed(4))
    b = flip_shift(x, m, 2, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_intensity_and_bias_ranges():
    x = torch.full((64, 1, 16, 16), 0.5)
    g = intensity_gamma(x, 0.1, torch.Generator().manual_seed(0))
    lo, hi = 0.95 * 0.5 ** 1.1, 1.05 * 0.5 ** 0.9
    assert g.min() >= lo - 1e-6 and g.max() <= hi + 1e-6 and g.std() > 0
    f = bias_field(torch.ones(8, 1, 24, 24), 0.1, torch.Generator().manual_seed(0))
    assert f.min() >= 0.9 - 1e-6 and f.max() <= 1.1 + 1e-6
    # smooth: neighbouring voxels differ far less than the field's range
    assert (f[..., 1:] - f[..., :-1]).abs().max() < 0.05


def test_affine_identity_at_zero_and_same_for_mask():
    x, m = _batch(2)
    xo, mo = affine(x, m, 1e-9, torch.Generator().manual_seed(0))
    assert torch.allclose(xo, x, atol=1e-4) and torch.equal(mo, m)
    xo, mo = affine(m.clone(), m, 5.0, torch.Generator().manual_seed(0))
    assert ((xo > 0.5).float() - mo).abs().mean() < 0.02  # image and mask moved together


def _ventricle_batch(n=8):
    """Brains with a dark central ventricle (2 channels, as a 2.5D stack)."""
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(56.0), indexing="ij")
    brain = (((yy - 24) / 20) ** 2 + ((xx - 28) / 24) ** 2 < 1).float()
    vent = (((yy - 24) / 4) ** 2 + ((xx - 28) / 8) ** 2 < 1).float()
    x = (brain * 0.8 - vent * 0.6).expand(n, 2, 48, 56).clone()
    return x, brain.expand(n, 1, 48, 56).clone(), vent


def test_local_warp_changes_anatomy_size_and_moves_mask_with_image():
    """aug_warp: ventricles grow and shrink from slice to slice (what ageing and displaced
    anatomy do), image and mask stay together, channels of a 2.5D stack move as one."""
    x, m, vent = _ventricle_batch()
    xo, mo = local_warp(x, m, 0.4, torch.Generator().manual_seed(0))
    assert xo.shape == x.shape and set(mo.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(xo[:, 0], xo[:, 1])
    dark = ((xo[:, 0] < 0.5) & (mo[:, 0] > 0)).flatten(1).sum(1).float()
    base = float(vent.sum())
    assert float(dark.max()) > 1.15 * base and float(dark.max() - dark.min()) > 0.2 * base
    # the image's brain follows the mask's brain (up to the interpolated rim)
    assert ((xo[:, :1] > 0.05).float() - mo).abs().mean() < 0.05
    again = local_warp(x, m, 0.4, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], xo) and torch.equal(again[1], mo)  # resumable: seeded


def test_warp_is_off_unless_asked_for():
    x, m, _ = _ventricle_batch(2)
    a = augment_batch(x, m, {"shift": 0}, torch.Generator().manual_seed(0))
    b = augment_batch(x, m, {"shift": 0, "aug_warp": 0.0}, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0])


def test_eta():
    assert eta_seconds([10.0, 20.0], 4, 30.0, 100.0) == 60.0
    assert eta_seconds([10.0, 20.0], 100, 30.0, 1.0) == 30.0  # capped by max_minutes
    assert eta_seconds([10.0], 0, 10.0, 1.0) == 0.0
    assert format_eta(65) == "01:05" and format_eta(3725) == "1:02:05"


def test_dae_defaults_include_augmentation():
    for kind in ("dae", "ae", "vae", "ddpm"):
        d = get_model_class(kind).defaults
        assert d["aug_gamma"] > 0 and d["aug_bias"] > 0 and d["aug_affine"] > 0


def test_ddpm_forward_backward_tiny():
    torch.manual_seed(0)
    model = get_model_class("ddpm")(["T1w", "FLAIR"], SHAPE, DDPM_TINY)
    x = torch.rand(3, 2, 32, 40)
    noisy, t, noise = model.make_input(x, torch.ones(3, 1, 32, 40),
                                       torch.Generator().manual_seed(0))
    assert noisy.shape == x.shape and t.shape == (3,) and noise.shape == x.shape
    noisy.requires_grad_(True)
    out = model.net((noisy, t, noise))
    assert out[0].shape == x.shape
    loss = model.loss_fn(out, x, torch.ones(3, 1, 32, 40))
    loss.backward()
    assert noisy.grad is not None and torch.isfinite(noisy.grad).all()


def test_ddpm_fit_reconstruct_bundle(tmp_path, caplog):
    vols, masks = tiny_volumes(3)
    torch.manual_seed(0)
    model = get_model_class("ddpm")(["T1w"], SHAPE, {**DDPM_TINY, "epochs": 2})
    with caplog.at_level(logging.INFO, logger="bids_anomaly"):
        hist = model.fit(vols[:2], masks[:2],
                         FitContext(val_volumes=vols[2:], val_masks=masks[2:], seed=1))
    losses = [h["train_loss"] for h in hist["history"]]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert any("ETA" in r.getMessage() for r in caplog.records)
    recon = model.reconstruct(vols[2], masks[2])
    assert recon.shape == vols[2].shape and np.isfinite(recon).all()
    assert np.all(recon[:, ~masks[2]] == 0)
    assert np.array_equal(recon, model.reconstruct(vols[2], masks[2]))  # deterministic
    calib = Calibration(mu=0.1, sd=0.05, thresholds={"0.01": 2.3}, default_fpr="0.01",
                        healthy_scores=[1.0, 1.2])
    card = {"name": "ddpm", "template": "MNI152NLin2009aSym", "resolution": 2}
    save_bundle(tmp_path / "b", model, card, calib)
    loaded = load_bundle(tmp_path / "b")
    assert loaded.card["model_type"] == "ddpm"
    assert np.array_equal(loaded.model.reconstruct(vols[2], masks[2]), recon)


def test_ddpm_rejects_bad_crop():
    with pytest.raises(ValueError, match="divisible"):
        get_model_class("ddpm")(["T1w"], SHAPE, {**DDPM_TINY, "crop": [33, 40]})


def test_ddpm_resume_repeats_uninterrupted_run(tmp_path):
    from tests.test_models_extra import _resume_case

    _resume_case(tmp_path, "ddpm", {k: v for k, v in DDPM_TINY.items()
                                    if k not in ("crop", "batch_size")})


def test_progress_bar_only_on_a_terminal():
    from bids_anomaly.training.fit import _progress_bar

    with _progress_bar("dae") as bar:  # pytest captures stderr: not a terminal
        assert bar is None


def test_compiled_forward_falls_back_to_eager(monkeypatch, caplog):
    """A GPU machine without a working compiler still trains: the first failing compiled call
    logs a warning and the network runs eagerly from then on, with the same result."""
    from bids_anomaly.models import trainer

    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(2, 1, 8, 8)

    def broken(_net):
        def call(_inp):
            raise RuntimeError("no triton here")
        return call

    monkeypatch.setattr(trainer.torch, "compile", broken)
    fwd = trainer.CompiledForward(net, enabled=True)
    assert fwd.compiled
    with caplog.at_level(logging.WARNING, logger="bids_anomaly"):
        out = fwd(x)
    assert torch.equal(out, net(x)) and not fwd.compiled
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)
    assert set(net.state_dict()) == {"weight", "bias"}  # the module itself is not wrapped


def test_cpu_training_never_compiles(monkeypatch):
    from bids_anomaly.models import trainer

    def refuse(_net):
        raise AssertionError("torch.compile called on the CPU")

    monkeypatch.setattr(trainer.torch, "compile", refuse)
    vols, masks = tiny_volumes(3)
    model = get_model_class("dae")(["T1w"], SHAPE, {"epochs": 1, "crop": [32, 40],
                                                    "infer_draws": 0})
    hist = model.fit(vols[:2], masks[:2], FitContext(val_volumes=vols[2:], val_masks=masks[2:]))
    assert hist["compiled"] is False and hist["device"] == "cpu"
