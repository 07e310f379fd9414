"""Multi-view slice models: one network per slice orientation, reconstructions averaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bids_anomaly.models.base import FitContext
from bids_anomaly.models.registry import get_model_class
from bids_anomaly.models.slice_model import VIEW_COMBINE, combine_views
from bids_anomaly.models.slices import crop_box, from_view, to_view, volume_to_slices

from .model_inputs import SHAPE, one_thread, tiny_volumes  # noqa: F401

TINY = {"channels": [4, 8], "strides": [2], "crop": [32, 40], "batch_size": 8, "epochs": 1,
        "patience": 1, "infer_draws": 2, "context": 1}
VIEWS = ["axial", "coronal", "sagittal"]


def test_a_view_cuts_planes_of_its_own_axis():
    vol = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(1, *SHAPE)
    mask = np.ones(SHAPE, bool)
    for view, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        v, m = to_view(vol, view), to_view(mask, view)
        np.testing.assert_array_equal(from_view(v, view), vol)
        box = crop_box(m, v.shape[1:3])
        slices, _, keep = volume_to_slices(v, m, box)
        assert len(keep) == SHAPE[axis]
        # Slice 3 of the view is the volume's plane 3 along that axis.
        np.testing.assert_array_equal(slices[3, 0].numpy(), np.take(vol[0], 3, axis=axis))


def test_views_must_be_known_distinct_and_axial_first():
    cls = get_model_class("dae")
    for bad in (["axial", "axial"], ["coronal", "axial"], ["axial", "oblique"]):
        with pytest.raises(ValueError, match="views"):
            cls(["T1w"], SHAPE, {**TINY, "views": bad})
    with pytest.raises(ValueError, match="view_combine 'max'"):
        cls(["T1w"], SHAPE, {**TINY, "view_combine": "max"})


def test_views_combine_by_mean_median_or_the_one_nearest_the_scan():
    scan = np.array([1.0, 1.0, 0.0, 5.0]).reshape(1, 4, 1, 1)
    recs = np.array([[0.0, 1.2, 0.1, 1.0], [0.9, 3.0, -0.3, 1.5],
                     [0.3, 0.0, 0.2, 0.5]]).reshape(3, 1, 4, 1, 1)
    got = {how: combine_views(recs, scan, how).ravel() for how in VIEW_COMBINE}
    np.testing.assert_allclose(got["mean"], [0.4, 1.4, 0.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(got["median"], [0.3, 1.2, 0.1, 1.0])
    # A voxel restored by any view is not anomalous: the residual is the smallest of any view.
    np.testing.assert_allclose(got["closest"], [0.9, 1.2, 0.1, 1.5])


def test_a_three_view_dae_trains_saves_and_reconstructs_the_mean_of_its_views(tmp_path):
    vols, masks = tiny_volumes(3)
    cls = get_model_class("dae")
    torch.manual_seed(0)
    model = cls(["T1w"], SHAPE, {**TINY, "views": VIEWS})
    history = model.fit(vols[:2], masks[:2],
                        FitContext(val_volumes=vols[2:], val_masks=masks[2:],
                                   checkpoint=str(tmp_path / "model.pt")))
    assert set(history["views"]) == set(VIEWS)
    # One checkpoint per view: the axial one where a single-view model keeps it.
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "model-coronal.pt", "model-sagittal.pt", "model.pt"]
    members = model.view_models()
    assert [m.view for m in members] == VIEWS
    assert [m.hparams["crop"] for m in members] == [[32, 40], [32, 12], [40, 12]]
    recon = model.reconstruct(vols[2], masks[2])
    views = [m._reconstruct_view(vols[2], masks[2]) for m in members]
    np.testing.assert_allclose(recon, np.mean(views, axis=0), rtol=1e-6)
    # The views disagree (three networks, three neighbourhoods), so the mean is not one view.
    assert min(np.abs(v - recon).max() for v in views) > 1e-4
    assert not recon[:, ~masks[2]].any()

    # The state holds every view; a model rebuilt from the same hyper-parameters restores all.
    state = model.state_dict()
    assert {k.split(".")[0] for k in state} >= {"net", "coronal", "sagittal", "crop_box"}
    fresh = cls(["T1w"], SHAPE, model.hparams)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.reconstruct(vols[2], masks[2]), recon)


def test_the_axial_network_of_a_multi_view_model_is_the_single_view_model(tmp_path):
    """Same seed, same data: the axial view trains exactly as the single-view model does, so a
    single-view checkpoint resumes as the multi-view model's axial network."""
    vols, masks = tiny_volumes(3)
    cls = get_model_class("dae")
    nets = []
    for views in (["axial"], VIEWS):
        torch.manual_seed(0)
        model = cls(["T1w"], SHAPE, {**TINY, "views": views})
        model.fit(vols[:2], masks[:2], FitContext(val_volumes=vols[2:], val_masks=masks[2:]))
        nets.append(model.net.state_dict())
    assert all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])
