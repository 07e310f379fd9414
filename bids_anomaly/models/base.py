"""The model interface and the ``register`` decorator (``registry`` imports the model types)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

REGISTRY: dict[str, type[AnomalyModel]] = {}


def register(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    """Class decorator: make a model available to ``--model-type``."""
    REGISTRY[cls.type_name] = cls
    return cls


@dataclass
class FitContext:
    """What a model's ``fit`` may use: validation data, device, threads, seed, progress."""

    val_volumes: list[np.ndarray] = field(default_factory=list)
    val_masks: list[np.ndarray] = field(default_factory=list)
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    checkpoint: str | None = None
    resume: bool = False
    progress: Callable[[dict], None] | None = None
    # torch.compile the network's training forward on CUDA (eager again at its first failure);
    # never on the CPU, whose training stays bit for bit what it was.
    compile: bool = True


class AnomalyModel(ABC):
    """A normative model of healthy brains in template space.

    Volumes are float32 arrays (C, X, Y, Z): one channel per contrast, on the template grid.
    """

    type_name: ClassVar[str]
    learned: ClassVar[bool] = True
    defaults: ClassVar[dict] = {}
    # Values a hyper-parameter had before it existed: a card written then lacks the key and
    # must load as it was trained, not with today's default.
    legacy_defaults: ClassVar[dict] = {}
    # Scoring choices (``ScoringParams`` fields) this model is calibrated with at ``train``,
    # over the project-wide ones (``training.fit.DEFAULT_SCORING``); the bundle records them.
    scoring_defaults: ClassVar[dict] = {}

    def __init__(self, contrasts: list[str], shape: tuple[int, int, int],
                 hparams: dict | None = None):
        unknown = set(hparams or {}) - set(self.defaults)
        if unknown:
            raise ValueError(
                f"unknown hyper-parameter(s) for model '{self.type_name}': {sorted(unknown)} "
                f"(known: {sorted(self.defaults)})"
            )
        self.contrasts = list(contrasts)
        self.shape = tuple(shape)
        self.hparams = {**self.defaults, **(hparams or {})}

    @abstractmethod
    def fit(self, volumes: list[np.ndarray], masks: list[np.ndarray], ctx: FitContext) -> dict:
        """Fit on healthy volumes; return a training history (JSON-serialisable)."""

    @abstractmethod
    def reconstruct(self, volume: np.ndarray, mask: np.ndarray, device: str = "cpu") -> np.ndarray:
        """A pseudo-healthy version of ``volume`` (same shape)."""

    def residual(self, volume: np.ndarray, mask: np.ndarray, device: str = "cpu"
                 ) -> tuple[np.ndarray, np.ndarray]:
        """Reconstruction and the raw anomaly map (X, Y, Z): mean absolute residual."""
        recon = self.reconstruct(volume, mask, device=device)
        return recon, np.abs(volume - recon).mean(axis=0) * mask

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to store in weights.safetensors."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`."""
