"""The ae and vae models, the trainer's loss hook, and resuming the shared trainer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_anomaly.calibration.types import Calibration
from bids_anomaly.models.base import FitContext
from bids_anomaly.models.bundle import load_bundle, save_bundle
from bids_anomaly.models.registry import get_model_class
from bids_anomaly.models.trainer import masked_loss
from bids_anomaly.models.vae import kl_divergence

from .model_inputs import SHAPE, one_thread, tiny_volumes  # noqa: F401

TINY = {"channels": [4, 8], "latent": 8, "crop": [32, 40], "batch_size": 8}


def _calib():
    return Calibration(mu=0.1, sd=0.05, thresholds={"0.01": 2.3, "0.001": 3.1},
                       default_fpr="0.001", healthy_scores=[1.0, 1.2])


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_forward_backward_tiny(kind):
    torch.manual_seed(0)
    model = get_model_class(kind)(["T1w", "FLAIR"], SHAPE, TINY)
    x = torch.rand(3, 2, 32, 40, requires_grad=True)
    assert model.make_input(x, torch.ones(3, 1, 32, 40), torch.Generator()) is x  # no noise
    model.net.train()
    out = model.net(x)
    if kind == "vae":
        recon, mu, logvar = out
        assert mu.shape == logvar.shape == (3, 8)
        loss = model.loss_fn(out, x.detach(), torch.ones(3, 1, 32, 40))
    else:
        recon = out
        loss = recon.mean()
    assert recon.shape == x.shape
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    model.net.eval()
    with torch.no_grad():  # inference is deterministic (vae: decoded from the posterior mean)
        a, b = model._forward_recon(x), model._forward_recon(x)
        assert torch.equal(a, b)
        if kind == "vae":
            assert torch.equal(a, model.net.decoder(model.net.mu(model.net.encoder(x))))


def test_crop_must_halve_at_every_level():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*len\\(channels\\) = 4"):
        get_model_class("ae")(["T1w"], SHAPE, {**TINY, "crop": [30, 40]})
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        get_model_class("ae")(["T1w"], SHAPE, {"kl_weight": 1.0})


def test_loss_hook():
    clean, mask = torch.rand(2, 1, 4, 4), (torch.rand(2, 1, 4, 4) > 0.5).float()
    recon = torch.rand(2, 1, 4, 4)
    mse = masked_loss(recon, clean, mask)
    assert torch.equal(mse, torch.nn.functional.mse_loss(recon * mask, clean * mask))
    mu, logvar = torch.zeros(2, 3), torch.zeros(2, 3)
    assert torch.equal(masked_loss((recon, mu, logvar), clean, mask), mse)  # tuple: out[0]
    assert float(kl_divergence(mu, logvar)) == 0.0
    vae = get_model_class("vae")(["T1w"], SHAPE, {**TINY, "kl_weight": 0.5})
    mu = torch.ones(2, 3)  # KL = 0.5 per latent dimension
    loss = masked_loss((recon, mu, logvar), clean, mask, vae.loss_fn)
    torch.testing.assert_close(loss, mse + 0.5 * 0.5)


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_fit_reduces_loss_and_bundle_round_trip(tmp_path, kind):
    vols, masks = tiny_volumes(3)
    torch.manual_seed(0)
    model = get_model_class(kind)(["T1w"], SHAPE, {**TINY, "epochs": 2})
    hist = model.fit(vols[:2], masks[:2],
                     FitContext(val_volumes=vols[2:], val_masks=masks[2:], seed=1))
    losses = [h["train_loss"] for h in hist["history"]]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert hist["history"][-1]["val_loss"] < hist["history"][0]["val_loss"]
    recon = model.reconstruct(vols[2], masks[2])
    assert recon.shape == vols[2].shape and np.isfinite(recon).all()
    assert np.all(recon[:, ~masks[2]] == 0)

    card = {"name": kind, "template": "MNI152NLin2009aSym", "resolution": 2}
    bundle = load_bundle(save_bundle(tmp_path / kind, model, card, _calib()))
    assert bundle.card["model_type"] == kind
    assert bundle.model.box == model.box
    np.testing.assert_array_equal(bundle.model.reconstruct(vols[2], masks[2]), recon)


class _Killed(Exception):
    pass


def _resume_case(tmp_path, kind, hp):
    """4 epochs straight vs. killed after epoch 2 and resumed from the checkpoint."""
    vols, masks = tiny_volumes(3)
    hp = {**hp, "crop": [32, 40], "batch_size": 8, "epochs": 4, "patience": 10}

    def run(name, init_seed, progress=None, resume=False):
        torch.manual_seed(init_seed)
        model = get_model_class(kind)(["T1w"], SHAPE, hp)
        ctx = FitContext(val_volumes=vols[2:], val_masks=masks[2:], seed=5, resume=resume,
                         checkpoint=str(tmp_path / f"{name}.pt"), progress=progress)
        return model, model.fit(vols[:2], masks[:2], ctx)

    ref, ref_hist = run("straight", 0)

    def kill(rec):
        if rec["epoch"] == 2:
            raise _Killed

    with pytest.raises(_Killed):
        run("killed", 0, progress=kill)
    seen = []
    # Different initial weights: everything must come from the checkpoint.
    model, hist = run("killed", 123, progress=lambda rec: seen.append(rec["epoch"]), resume=True)
    assert seen == [3, 4]
    assert [h["epoch"] for h in hist["history"]] == [1, 2, 3, 4]
    # Tolerance rel 1e-5; on CPU with one thread the runs agree exactly.
    for key in ("train_loss", "val_loss"):
        np.testing.assert_allclose([h[key] for h in hist["history"]],
                                   [h[key] for h in ref_hist["history"]], rtol=1e-5)
    assert hist["best_epoch"] == ref_hist["best_epoch"]
    np.testing.assert_allclose(hist["best_val_loss"], ref_hist["best_val_loss"], rtol=1e-5)
    a, b = model.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


def test_trainer_resume_repeats_uninterrupted_run(tmp_path):
    _resume_case(tmp_path, "dae", {"channels": [4, 8], "strides": [2]})


def test_trainer_resume_repeats_uninterrupted_run_vae(tmp_path):
    """The vae samples from the global RNG: the trainer reseeds it every epoch."""
    _resume_case(tmp_path, "vae", {"channels": [4, 8], "latent": 8})
