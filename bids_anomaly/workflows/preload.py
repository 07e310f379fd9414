"""Imported by the forkserver that nipype's workers fork from (:mod:`.workers`).

Each import is what a Preprocess or Score node would import at its start; one that fails
here is left to fail, with its real error, in the node that needs it.
"""

from __future__ import annotations

import importlib

from ..preprocessing.registration import _single_threaded

# Before antspyx is imported: ITK reads its thread count once per process, and ANTs must run
# on one thread in every worker forked from here (registration.py says why).
_single_threaded()

MODULES = (
    "numpy", "scipy.ndimage", "nibabel", "torch", "SimpleITK", "ants", "deepbet.bet",
    "monai.networks.nets", "safetensors.torch", "nipype.pipeline.engine",
    "bids_anomaly.preprocessing.pipeline", "bids_anomaly.inference.score_scan",
    "bids_anomaly.models.bundle", "bids_anomaly.models.registry",
    "bids_anomaly.bids_io.derivatives",
)

for _name in MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001, S110 - the node that needs it reports the error
        pass
