"""Every model type, registered once: the CLI's ``--model-type`` and the benchmarks list these.

Importing this module imports each model module; each registers its class with
:func:`.base.register` under its ``type_name``, the only place a model's name is written.
"""

from __future__ import annotations

from . import ae, dae, ddpm, vae, zscore  # noqa: F401  (each registers its class)
from .base import REGISTRY, AnomalyModel

MODEL_TYPES: tuple[str, ...] = tuple(REGISTRY)


def get_model_class(type_name: str) -> type[AnomalyModel]:
    """The registered model class called ``type_name``; ValueError names the known ones."""
    try:
        return REGISTRY[type_name]
    except KeyError as exc:
        raise ValueError(
            f"unknown model type '{type_name}' (available: {', '.join(sorted(REGISTRY))})"
        ) from exc
