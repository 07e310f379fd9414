"""What a synthetic cohort is: its configuration and the records of subjects, scans, lesions."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import UsageError

CONTRASTS = ("T1w", "T2w", "FLAIR")
GENERATOR_NAME = "bids-anomaly synth"
# Native voxel order of the written images (like IXI's sagittal T1w): axis 0 points
# posterior, axis 1 superior, axis 2 right.
NATIVE_AXCODES = ("P", "S", "R")
EDGE_LO, EDGE_HI = 0.85, 1.15  # soft edge of the lesion profile (normalised radius)
GROUP_CODES = {"h": 0, "t": 1, "p": 2}
CONTRAST_CODES = {c: i for i, c in enumerate(CONTRASTS)}


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Sizes count subjects; ranges are inclusive."""

    n_healthy: int = 12
    n_healthy_test: int = 2
    n_patients: int = 4
    voxel_size: float = 2.0
    template_resolution: int = 1
    contrasts: tuple[str, ...] = ("T1w",)
    n_sessions: int = 1
    with_skull: bool = True
    seed: int = 0
    lesions_per_patient: tuple[int, int] = (1, 3)
    lesion_radius_mm: tuple[float, float] = (6.0, 16.0)

    def __post_init__(self) -> None:
        if min(self.n_healthy, self.n_healthy_test, self.n_patients) < 0:
            raise UsageError("subject counts must not be negative")
        if not self.contrasts or self.contrasts[0] != "T1w":
            raise UsageError(f"contrasts must start with 'T1w', got {self.contrasts!r}")
        bad = [c for c in self.contrasts if c not in CONTRASTS]
        if bad or len(set(self.contrasts)) != len(self.contrasts):
            raise UsageError(f"contrasts must be distinct members of {CONTRASTS}, got "
                             f"{self.contrasts!r}")
        if not self.voxel_size > 0:
            raise UsageError(f"voxel_size must be positive, got {self.voxel_size}")
        if self.n_sessions < 1:
            raise UsageError(f"n_sessions must be at least 1, got {self.n_sessions}")
        lo, hi = self.lesions_per_patient
        if not 1 <= lo <= hi:
            raise UsageError(f"lesions_per_patient must be 1 <= lo <= hi, got {(lo, hi)}")
        rlo, rhi = self.lesion_radius_mm
        if not 0 < rlo <= rhi:
            raise UsageError(f"lesion_radius_mm must be 0 < lo <= hi, got {(rlo, rhi)}")


@dataclass(frozen=True)
class SynthLesion:
    """One lesion, defined in template-world mm so it sits at the same anatomy every session."""

    centre_mm: np.ndarray  # (3,) template world coordinates
    semi_axes_mm: np.ndarray  # (3,)
    rotation: np.ndarray  # (3, 3), columns are the ellipsoid axes
    wave_dirs: np.ndarray  # (K, 3) unit vectors of the shape perturbation
    wave_freqs: np.ndarray  # (K,)
    wave_phases: np.ndarray  # (K,)
    wave_amps: np.ndarray  # (K,)
    factors: dict[str, float]  # contrast -> intensity factor at full effect

    @property
    def extent_mm(self) -> float:
        """Radius (template mm) beyond which the lesion has no effect."""
        return float(self.semi_axes_mm.max() * EDGE_HI / (1.0 - self.wave_amps.sum()))


@dataclass(frozen=True)
class SynthScan:
    """One session's images on its native grid (all contrasts share the grid)."""

    affine: np.ndarray
    images: dict[str, np.ndarray]  # contrast -> int16 array
    brain_mask: np.ndarray  # bool
    lesion_mask: np.ndarray  # bool, empty without lesions


@dataclass(frozen=True)
class SynthSubject:
    """A synthetic subject: one scan per session and the lesions it carries."""

    scans: tuple[SynthScan, ...]
    lesions: tuple[SynthLesion, ...] = field(default=())

    @property
    def affine(self) -> np.ndarray:
        return self.scans[0].affine

    @property
    def images(self) -> dict[str, np.ndarray]:
        return self.scans[0].images

    @property
    def brain_mask(self) -> np.ndarray:
        return self.scans[0].brain_mask

    @property
    def lesion_mask(self) -> np.ndarray:
        return self.scans[0].lesion_mask


@dataclass(frozen=True)
class SynthCohort:
    """Where a generated cohort lives and which subjects play which role."""

    root: Path
    labels_dir: Path
    train_subjects: list[str]
    test_healthy_subjects: list[str]
    patient_subjects: list[str]
