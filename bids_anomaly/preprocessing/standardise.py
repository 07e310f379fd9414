"""Intensity standardisation learned on the healthy training cohort (second normalisation stage).

Stage 1 (:mod:`.normalise`) rescales each volume on its own (0.5th percentile -> 0, median -> 0.7).
Stage 2, here, is a Nyúl–Udupa piecewise-linear histogram standardisation: each scan's in-brain
percentile landmarks are mapped onto *standard* landmarks, the cohort median of the healthy
training scans' landmarks, so that tissue intensities line up across scanners and sites.

Lesion robustness: the landmarks stop at the 75th percentile (never above the 90th): a bright
lesion filling 5% of the brain pushes healthy voxels down in rank, so an upper landmark follows
it. On a three-tissue phantom with such a lesion (1.5x intensity) the healthy voxels' values
move by at most ~2% with p75 as the top landmark but by up to ~4% with p90 (stage 1 alone: 0.4%).
Beyond the outer landmarks the map continues with the slope of a wide inner segment (p50 -> p75
above, p1 -> p25 below) instead of that of a short outer one. The output is clipped to [0, 1.5]
like stage 1. The map is affine-equivariant: a scan rescaled as ``a * x + b`` (a > 0) gives the
same output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

PERCENTILES: tuple[float, ...] = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0)
BOTTOM_SPAN: tuple[float, float] = (1.0, 25.0)  # slope used below the first landmark
TOP_SPAN: tuple[float, float] = (50.0, 75.0)  # slope used above the last landmark
CLIP = 1.5
MAX_PERCENTILE = 90.0  # landmarks above follow bright lesions
_EPS = 1e-6  # relative gap that makes tied landmarks strictly increasing
METHOD = "Nyul-Udupa piecewise-linear histogram standardisation (cohort median landmarks)"


@dataclass(frozen=True)
class IntensityStandardisation:
    """Per contrast: the landmark percentiles and the learned standard landmark values."""

    percentiles: tuple[float, ...]
    standard: Mapping[str, tuple[float, ...]]
    bottom_span: tuple[float, float] = BOTTOM_SPAN
    top_span: tuple[float, float] = TOP_SPAN
    clip: float = CLIP
    n_scans: int = 0
    method: str = field(default=METHOD, compare=False)

    def __post_init__(self) -> None:
        pct = tuple(float(p) for p in self.percentiles)
        if len(pct) < 2 or any(b <= a for a, b in zip(pct, pct[1:])):
            raise ValueError(f"landmark percentiles must increase strictly: {pct}")
        if pct[-1] > MAX_PERCENTILE or pct[0] < 0:
            raise ValueError(f"landmark percentiles must lie in [0, {MAX_PERCENTILE}] "
                             f"(higher ones follow lesions): {pct}")
        for span in (self.bottom_span, self.top_span):
            if span[0] not in pct or span[1] not in pct or span[0] >= span[1]:
                raise ValueError(f"extrapolation span {span} must be two landmark percentiles")
        std = {}
        for c, vals in self.standard.items():
            v = tuple(float(x) for x in vals)
            if len(v) != len(pct) or any(b <= a for a, b in zip(v, v[1:])):
                raise ValueError(f"standard landmarks of {c} must be {len(pct)} strictly "
                                 f"increasing values: {v}")
            std[str(c)] = v
        object.__setattr__(self, "percentiles", pct)
        object.__setattr__(self, "standard", std)
        object.__setattr__(self, "bottom_span", tuple(float(x) for x in self.bottom_span))
        object.__setattr__(self, "top_span", tuple(float(x) for x in self.top_span))

    @property
    def contrasts(self) -> list[str]:
        return list(self.standard)

    def to_dict(self) -> dict:
        """JSON-able form, as stored in the bundle's ``model.json``."""
        return {"method": self.method, "percentiles": list(self.percentiles),
                "standard": {c: list(v) for c, v in self.standard.items()},
                "bottom_span": list(self.bottom_span), "top_span": list(self.top_span),
                "clip": self.clip, "n_scans": self.n_scans}

    @classmethod
    def from_dict(cls, d: Mapping) -> IntensityStandardisation:
        return cls(percentiles=tuple(d["percentiles"]),
                   standard={c: tuple(v) for c, v in d["standard"].items()},
                   bottom_span=tuple(d.get("bottom_span", BOTTOM_SPAN)),
                   top_span=tuple(d.get("top_span", TOP_SPAN)),
                   clip=float(d.get("clip", CLIP)), n_scans=int(d.get("n_scans", 0)),
                   method=str(d.get("method", METHOD)))


def scan_landmarks(values: np.ndarray, percentiles: Sequence[float]) -> np.ndarray:
    """Strictly increasing landmarks of one channel's in-brain values (ties opened by a tiny,
    scale-relative epsilon, so the map stays invertible and affine-equivariant)."""
    lm = np.maximum.accumulate(np.percentile(values.astype(np.float64), percentiles))
    spread = float(lm[-1] - lm[0])
    if spread <= 0:
        spread = max(abs(float(lm[0])), 1.0)
    return lm + _EPS * spread * np.arange(len(lm))


def learn_standardisation(volumes: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                          contrasts: Sequence[str],
                          percentiles: Sequence[float] = PERCENTILES,
                          bottom_span: tuple[float, float] = BOTTOM_SPAN,
                          top_span: tuple[float, float] = TOP_SPAN) -> IntensityStandardisation:
    """Learn standard landmarks per contrast from healthy (C, X, Y, Z) volumes and brain masks.

    The standard landmarks are the cohort median of each scan's landmarks (robust to an odd
    training scan). Scans with an empty mask are skipped."""
    if len(volumes) != len(masks):
        raise ValueError(f"{len(volumes)} volumes but {len(masks)} masks")
    pct = tuple(float(p) for p in percentiles)
    per_scan: list[np.ndarray] = []  # (C, L) per usable scan
    for vol, mask in zip(volumes, masks):
        if vol.shape[0] != len(contrasts):
            raise ValueError(f"volume has {vol.shape[0]} channels, contrasts are {list(contrasts)}")
        m = np.asarray(mask, bool)
        if m.any():
            per_scan.append(np.stack([scan_landmarks(ch[m], pct) for ch in vol]))
    if not per_scan:
        raise ValueError("no scan with a non-empty brain mask to learn the standardisation from")
    med = np.median(np.stack(per_scan), axis=0)
    standard = {}
    for c, lm in zip(contrasts, med):
        lm = np.maximum.accumulate(lm)
        standard[c] = tuple(lm + _EPS * max(float(lm[-1] - lm[0]), 1e-3) * np.arange(len(lm)))
    return IntensityStandardisation(percentiles=pct, standard=standard, bottom_span=bottom_span,
                                    top_span=top_span, n_scans=len(per_scan))


def _map_channel(values: np.ndarray, std: IntensityStandardisation, contrast: str) -> np.ndarray:
    pct = std.percentiles
    src = scan_landmarks(values, pct)
    dst = np.asarray(std.standard[contrast], np.float64)
    x = values.astype(np.float64)
    out = np.interp(x, src, dst)

    def slope(span: tuple[float, float]) -> float:
        i, j = pct.index(span[0]), pct.index(span[1])
        return float((dst[j] - dst[i]) / (src[j] - src[i]))

    lo, hi = x < src[0], x > src[-1]
    out[lo] = dst[0] + (x[lo] - src[0]) * slope(std.bottom_span)
    out[hi] = dst[-1] + (x[hi] - src[-1]) * slope(std.top_span)
    return np.clip(out, 0.0, std.clip)


def apply_standardisation(volume: np.ndarray, mask: np.ndarray, std: IntensityStandardisation,
                          contrasts: Sequence[str] | None = None) -> np.ndarray:
    """Map each channel's in-brain voxels from the scan's landmarks onto the standard ones.

    ``contrasts`` names the channels of ``volume`` (default: ``std.contrasts`` in order). Returns
    float32 of the same shape, zero outside ``mask``."""
    names = list(std.contrasts if contrasts is None else contrasts)
    missing = [c for c in names if c not in std.standard]
    if missing:
        raise ValueError(f"intensity standardisation has no landmarks for contrast(s) "
                         f"{', '.join(missing)} (it was learned for {', '.join(std.contrasts)})")
    if volume.shape[0] != len(names):
        raise ValueError(f"volume has {volume.shape[0]} channels but {len(names)} contrasts "
                         f"({', '.join(names)})")
    m = np.asarray(mask, bool)
    out = np.zeros(volume.shape, np.float32)
    if m.any():
        for i, c in enumerate(names):
            out[i][m] = _map_channel(volume[i][m], std, c)
    return out


def standardisation_from_card(card: Mapping) -> IntensityStandardisation | None:
    """The bundle's learned standardisation, or None for bundles written before it existed."""
    d = (card.get("normalisation") or {}).get("standardisation")
    return IntensityStandardisation.from_dict(d) if d else None


def standardise(volume: np.ndarray, mask: np.ndarray, std: IntensityStandardisation | None,
                contrasts: Sequence[str]) -> np.ndarray:
    """Apply ``std`` to a (C, X, Y, Z) volume in ``contrasts`` order, exactly as at training;
    ``volume`` unchanged when there is none (bundles written before it existed)."""
    if std is None:
        return volume
    return apply_standardisation(volume, mask, std, list(contrasts))


def standardise_for_bundle(volume: np.ndarray, mask: np.ndarray, card: Mapping) -> np.ndarray:
    """:func:`standardise` with the standardisation and contrasts of a card's JSON document."""
    return standardise(volume, mask, standardisation_from_card(card), card["contrasts"])
