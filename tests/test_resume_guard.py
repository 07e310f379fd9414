"""``resume`` refuses a checkpoint from another run; deterministic mode is scoped to ``fit``."""

from __future__ import annotations

import pytest
import torch

from bids_anomaly.core.errors import DataError, ExitCode
from bids_anomaly.models.base import FitContext
from bids_anomaly.models.registry import get_model_class
from bids_anomaly.models.trainer import deterministic_algorithms

from .model_inputs import SHAPE, one_thread, tiny_volumes  # noqa: F401

HP = {"channels": [4, 8], "strides": [2], "crop": [32, 40], "batch_size": 8, "epochs": 2}


class _Stop(Exception):
    pass


def _fit(ckpt, kind="dae", hp=None, vols=None, resume=False, seed=5, progress=None):
    all_vols, masks = tiny_volumes(4)
    vols = all_vols if vols is None else vols
    hp = {**HP, **(hp or {})}
    if kind != "dae":
        hp = {k: v for k, v in hp.items() if k != "strides"} | {"latent": 8}
    torch.manual_seed(0)
    model = get_model_class(kind)(["T1w"], SHAPE, hp)
    ctx = FitContext(val_volumes=vols[3:], val_masks=masks[3:], seed=seed, resume=resume,
                     checkpoint=str(ckpt), progress=progress)
    return model.fit(vols[:3], masks[:3], ctx)


def _stop_after_first(rec):
    raise _Stop


@pytest.fixture()
def ckpt(tmp_path):
    """The checkpoint of a 2-epoch run killed after its first epoch."""
    path = tmp_path / "checkpoint.pt"
    with pytest.raises(_Stop):
        _fit(path, progress=_stop_after_first)
    assert path.exists()
    return path


def _refused(ckpt, **kw) -> str:
    with pytest.raises(DataError) as err:
        _fit(ckpt, resume=True, **kw)
    msg = str(err.value)
    assert str(ckpt) in msg and "--resume" in msg and "delete the checkpoint" in msg
    assert err.value.exit_code == ExitCode.DATA_ERROR
    return msg


def test_refuses_another_data_split(ckpt):
    vols, _ = tiny_volumes(4, seed=1)
    assert "training data" in _refused(ckpt, vols=vols)


def test_refuses_other_hyperparameters(ckpt):
    assert "hyper-parameter epochs 2 (now 3)" in _refused(ckpt, hp={"epochs": 3})
    assert "hyper-parameter lr 0.001 (now 0.002)" in _refused(ckpt, hp={"lr": 2e-3})


def test_refuses_another_model_type(ckpt):
    msg = _refused(ckpt, kind="ae", hp={"channels": [4, 8]})
    assert "model 'dae' (now 'ae')" in msg and "network" in msg


def test_refuses_another_seed(ckpt):
    assert "seed 5 (now 6)" in _refused(ckpt, seed=6)


def test_refuses_a_checkpoint_without_fingerprint(ckpt):
    state = torch.load(ckpt, weights_only=True)
    del state["fingerprint"]
    torch.save(state, ckpt)
    assert "no fingerprint" in _refused(ckpt)


def test_refuses_an_unreadable_checkpoint(ckpt):
    ckpt.write_bytes(b"not a checkpoint")
    assert "unreadable" in _refused(ckpt)


def test_same_run_resumes_even_with_another_time_budget(ckpt):
    seen = []
    hist = _fit(ckpt, resume=True, hp={"max_minutes": 60.0, "patience": 3},
                progress=lambda rec: seen.append(rec["epoch"]))
    assert seen == [2] and [h["epoch"] for h in hist["history"]] == [1, 2]


def _drop_from_fingerprint(ckpt, key):
    state = torch.load(ckpt, weights_only=True)
    del state["fingerprint"]["hyperparameters"][key]
    torch.save(state, ckpt)


def test_a_checkpoint_from_before_an_option_existed_resumes_while_it_is_off(ckpt):
    """An interrupted run of an older release (its fingerprint lacks an option added since,
    off by default) resumes; it is refused once the option is turned on."""
    _drop_from_fingerprint(ckpt, "aug_warp")
    hist = _fit(ckpt, resume=True)
    assert [h["epoch"] for h in hist["history"]] == [1, 2]
    _drop_from_fingerprint(ckpt, "aug_warp")
    assert "hyper-parameter aug_warp None (now 0.4)" in _refused(ckpt, hp={"aug_warp": 0.4})


def _mode() -> tuple[bool, bool]:
    return (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())


@pytest.mark.parametrize("before", [(False, False), (True, False)])
def test_deterministic_mode_is_restored_after_fit(tmp_path, before):
    outer = _mode()
    try:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        _fit(tmp_path / "a.pt", hp={"epochs": 1})
        assert _mode() == before

        def stop(rec):
            assert _mode() == (True, True)  # on while training
            raise _Stop

        with pytest.raises(_Stop):
            _fit(tmp_path / "b.pt", hp={"epochs": 1}, progress=stop)
        assert _mode() == before
    finally:
        torch.use_deterministic_algorithms(outer[0], warn_only=outer[1])


def test_deterministic_context_restores_on_error():
    outer = _mode()
    with pytest.raises(RuntimeError), deterministic_algorithms():
        assert _mode() == (True, True)
        raise RuntimeError("boom")
    assert _mode() == outer
