"""Models and the bundle: forward/backward, fitting, round trip, refusals."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bids_anomaly.calibration.types import Calibration
from bids_anomaly.core.errors import BundleError
from bids_anomaly.models.base import FitContext
from bids_anomaly.models.bundle import load_bundle, save_bundle, sha256
from bids_anomaly.models.registry import get_model_class

from .model_inputs import SHAPE, tiny_volumes


def _calib():
    return Calibration(mu=0.1, sd=0.05, thresholds={"0.01": 2.3, "0.001": 3.1},
                       default_fpr="0.001", healthy_scores=[1.0, 1.2])


def test_dae_forward_backward_tiny():
    cls = get_model_class("dae")
    model = cls(["T1w"], SHAPE, {"channels": [4, 8], "strides": [2], "crop": [32, 40]})
    # A slice and its neighbours (context) as channels in, the same channels out.
    x = torch.rand(2, model.stacked_channels, 32, 40, requires_grad=True)
    out = model.net(x)
    assert out.shape == x.shape
    out.mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_dae_fit_reduces_loss_and_reconstructs():
    vols, masks = tiny_volumes(3)
    model = get_model_class("dae")(
        ["T1w"], SHAPE, {"channels": [4, 8], "strides": [2], "crop": [32, 40], "epochs": 3,
                         "batch_size": 8})
    hist = model.fit(vols[:2], masks[:2],
                     FitContext(val_volumes=vols[2:], val_masks=masks[2:], seed=1))
    losses = [h["train_loss"] for h in hist["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    recon = model.reconstruct(vols[2], masks[2])
    assert recon.shape == vols[2].shape
    assert np.all(recon[:, ~masks[2]] == 0)


def test_zscore_residual_is_standardised():
    vols, masks = tiny_volumes(5)
    model = get_model_class("zscore")(["T1w"], SHAPE, {"smooth_sigma": 0.0, "min_std": 1e-3})
    model.fit(vols, masks, FitContext())
    odd = vols[0].copy()
    odd[0, 20, 24, 5] += 1.0
    _, res = model.residual(odd, masks[0])
    assert res[20, 24, 5] > 5 * np.median(res[masks[0]])


def test_unknown_hyperparameter_is_refused():
    with pytest.raises(ValueError, match="colour"):
        get_model_class("zscore")(["T1w"], SHAPE, {"colour": 1})


@pytest.mark.parametrize("kind", ["dae", "zscore"])
def test_bundle_round_trip(tmp_path, kind):
    vols, masks = tiny_volumes(3)
    hp = {"channels": [4, 8], "strides": [2], "crop": [32, 40], "epochs": 1} if kind == "dae" \
        else {}
    model = get_model_class(kind)(["T1w"], SHAPE, hp)
    model.fit(vols[:2], masks[:2], FitContext(val_volumes=vols[2:], val_masks=masks[2:]))
    card = {"name": kind, "template": "MNI152NLin2009aSym", "resolution": 2}
    path = save_bundle(tmp_path / kind, model, card, _calib())
    bundle = load_bundle(path)
    a = model.reconstruct(vols[2], masks[2])
    b = bundle.model.reconstruct(vols[2], masks[2])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert bundle.calibration.thresholds == _calib().thresholds
    assert json.loads((path / "model.json").read_text())["files"]["weights.safetensors"]


def _saved(tmp_path):
    vols, masks = tiny_volumes(2)
    model = get_model_class("zscore")(["T1w"], SHAPE)
    model.fit(vols, masks, FitContext())
    card = {"name": "z", "template": "MNI152NLin2009aSym", "resolution": 2}
    return save_bundle(tmp_path / "z", model, card, _calib())


def test_bundle_checksum_mismatch_is_refused(tmp_path):
    path = _saved(tmp_path)
    with open(path / "weights.safetensors", "r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="checksum of weights.safetensors"):
        load_bundle(path)


def test_bundle_missing_weights_and_schema(tmp_path):
    path = _saved(tmp_path)
    card = json.loads((path / "model.json").read_text())
    card["schema_version"] = "9.0"
    (path / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="schema version 9.0"):
        load_bundle(path)
    card["schema_version"] = "1.0"
    (path / "model.json").write_text(json.dumps(card))
    (path / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="weights.safetensors is missing"):
        load_bundle(path)


def test_bundle_refuses_other_contrasts_template_resolution(tmp_path):
    bundle = load_bundle(_saved(tmp_path))
    with pytest.raises(BundleError, match="contrasts"):
        bundle.check_fits(["T1w", "FLAIR"], "MNI152NLin2009aSym", 2)
    with pytest.raises(BundleError, match="template"):
        bundle.check_fits(["T1w"], "OASIS", 2)
    with pytest.raises(BundleError, match="1 mm"):
        bundle.check_fits(["T1w"], "MNI152NLin2009aSym", 1)


class _Payload:
    """Unpickling this creates the directory ``marker`` (``os.mkdir``): proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _unpickles(path: Path, marker: Path, how: str) -> bool:
    """Positive control: does a careless loader (``how``) run the payload in ``path``?"""
    assert not marker.exists()
    try:
        if how == "pickle":
            with open(path, "rb") as fh:
                pickle.load(fh)
        else:
            torch.load(path, weights_only=False)
    except Exception:
        pass  # the payload runs while unpickling, whatever the loader does next
    ran = marker.exists()
    if ran:
        marker.rmdir()
    return ran


def _relist(path: Path, names: list[str]) -> None:
    """List ``names`` in the card's ``files`` with their correct sha256 (as a packer would)."""
    card = json.loads((path / "model.json").read_text())
    for name in names:
        card["files"][name] = sha256(path / name)
    (path / "model.json").write_text(json.dumps(card))


def test_bundle_is_not_code(tmp_path):
    """Nothing in a bundle is unpickled: pickles where a careless loader would look never run.

    Each payload creates a marker (absolute path inside tmp_path) when unpickled; the test
    first proves, with pickle.load / torch.load(weights_only=False) of the very same files,
    that they do run when unpickled, so a loader that unpickles fails this test.
    """
    marker = tmp_path / "pwned"
    path = _saved(tmp_path)
    # Extra files a loader might pick up: a torch checkpoint and a plain pickle, both listed
    # in the card with a correct checksum (so checksum verification alone does not stop them).
    torch.save({"state_dict": _Payload(marker)}, path / "weights.pt")
    (path / "extra.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    _relist(path, ["weights.pt", "extra.pkl"])
    assert _unpickles(path / "weights.pt", marker, "torch")
    assert _unpickles(path / "extra.pkl", marker, "pickle")
    load_bundle(path)
    assert not marker.exists(), "load_bundle unpickled a file of the bundle"

    # The weights themselves replaced by a pickle, re-checksummed: safetensors must refuse
    # them without running them. (torch 2.13 reads a *.safetensors name with safetensors even
    # in torch.load, so pickle.load is the careless loader to control against here.)
    weights = path / "weights.safetensors"
    weights.write_bytes(pickle.dumps(_Payload(marker)))
    _relist(path, ["weights.safetensors"])
    assert _unpickles(weights, marker, "pickle")
    with pytest.raises(BundleError, match="cannot be loaded"):
        load_bundle(path)
    assert not marker.exists(), "load_bundle unpickled weights.safetensors"


def test_dae_inference_draws_are_reproducible_and_denoise():
    """Noisy inference copies: the same reconstruction on every call (calibration and scoring
    must agree), different from the clean-input one, and 0 draws is the clean-input path."""
    vols, masks = tiny_volumes(3)
    hp = {"channels": [4, 8], "strides": [2], "crop": [32, 40], "epochs": 2, "batch_size": 8}
    model = get_model_class("dae")(["T1w"], SHAPE, {**hp, "infer_draws": 0})
    model.fit(vols[:2], masks[:2], FitContext(seed=1))
    clean = model.reconstruct(vols[2], masks[2])
    noisy = get_model_class("dae")(["T1w"], SHAPE, {**hp, "infer_draws": 3})
    noisy.load_state_dict(model.state_dict())
    a, b = noisy.reconstruct(vols[2], masks[2]), noisy.reconstruct(vols[2], masks[2])
    assert np.array_equal(a, b)
    assert not np.allclose(a, clean, atol=1e-4)
    assert np.all(a[:, ~masks[2]] == 0)
    zero = get_model_class("dae")(["T1w"], SHAPE, {**hp, "infer_draws": 0})
    zero.load_state_dict(model.state_dict())
    assert np.array_equal(zero.reconstruct(vols[2], masks[2]), clean)
