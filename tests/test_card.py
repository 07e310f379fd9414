"""The typed model card: JSON round trip, migration of 1.0 cards, refusal of unknown schemas."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bids_anomaly.calibration.types import Calibration
from bids_anomaly.core.config import PreprocConfig
from bids_anomaly.core.errors import BundleError, DataError, ExitCode
from bids_anomaly.models.base import FitContext
from bids_anomaly.models.bundle import load_bundle, save_bundle
from bids_anomaly.models.card import (
    CARD_SCHEMA,
    ModelCard,
    ModelSpec,
    Normalisation,
    TrainingRecord,
    card_from_dict,
    migrate_1_0,
)
from bids_anomaly.models.registry import get_model_class
from bids_anomaly.preprocessing.standardise import PERCENTILES, IntensityStandardisation

from .model_inputs import SHAPE, tiny_volumes


def _card() -> ModelCard:
    std = IntensityStandardisation(percentiles=PERCENTILES,
                                   standard={"T1w": (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)}, n_scans=4)
    calib = Calibration(mu=0.1, sd=0.05, thresholds={"0.01": 2.3, "0.001": 3.1},
                        default_fpr="0.001", healthy_scores=[1.0, 1.2, 0.9],
                        participants=["01", "02"], mask_fpr={"0.001": 0.0008})
    return ModelCard(
        name="dae", template="MNI152NLin2009aSym", space="MNI152NLin2009aSym", resolution=2,
        model=ModelSpec("dae", {"channels": [4, 8], "crop_mm": [64, 80]}, ("T1w",), SHAPE),
        calibration=calib, description="a card", preprocessing=PreprocConfig(resolution=2),
        inference_precision="float32",
        normalisation=Normalisation({"low": 0.5, "median_target": 0.7}, std),
        training=TrainingRecord(dataset="/data/ixi", participants=["01", "02"],
                                calibration_participants=["01", "02"], n_scans=2, seed=0,
                                history=[{"epoch": 1, "val_loss": 0.5}]),
        software={"bids-anomaly": "0.0"}, intended_use="research",
        files={"weights.safetensors": "ab" * 32})


def test_card_json_round_trip():
    card = _card()
    again = ModelCard.from_json(card.to_json())
    assert again == card
    assert again.schema_version == CARD_SCHEMA
    assert again.contrasts == ("T1w",) and again.standardisation == card.standardisation
    assert json.loads(card.to_json())["model_type"] == "dae"  # the on-disk layout is flat


def test_one_zero_card_migrates():
    """A 1.0 card as early versions wrote it: no checksum algorithm, no space, no
    standardisation, a training section with a key this version does not name."""
    old = _card().to_dict()
    old["schema_version"] = "1.0"
    for key in ("checksum_algorithm", "space", "normalisation"):
        old.pop(key)
    old["training"]["validation_participants"] = ["03"]
    assert migrate_1_0(old)["schema_version"] == "1.1"
    card = card_from_dict(old)
    assert card.schema_version == CARD_SCHEMA
    assert card.checksum_algorithm == "sha256" and card.space == card.template
    assert card.standardisation is None
    assert card.training.extra == {"validation_participants": ["03"]}
    assert card.to_dict()["training"]["validation_participants"] == ["03"]


@pytest.mark.parametrize("version", ["2.0", "1.7", ""])
def test_unknown_schema_is_refused(version):
    d = _card().to_dict()
    d["schema_version"] = version
    with pytest.raises(BundleError, match="schema version .* is not supported") as err:
        card_from_dict(d, "x/model.json")
    assert isinstance(err.value, DataError) and err.value.exit_code == ExitCode.DATA_ERROR == 65


def test_bundle_written_and_read_as_typed_card(tmp_path):
    vols, masks = tiny_volumes(2)
    model = get_model_class("zscore")(["T1w"], SHAPE)
    model.fit(vols, masks, FitContext())
    card = _card()
    path = save_bundle(tmp_path / "b", model, card)
    bundle = load_bundle(path)
    assert bundle.model_card.model == ModelSpec.of(model)
    assert bundle.model_card.training == card.training
    assert bundle.model_card.files["weights.safetensors"] != card.files["weights.safetensors"]
    assert bundle.card == json.loads((path / "model.json").read_text())
    np.testing.assert_array_equal(bundle.model.reconstruct(vols[0], masks[0]),
                                  model.reconstruct(vols[0], masks[0]))
