"""The residual → statmap math of :mod:`.statmap` in torch, for scoring on the GPU.

The same steps with the same boundary rules as the scipy code (binary erosion with the
6-neighbour cross and nothing outside the volume, a 3×3×3 median and a masked Gaussian with
scipy's half-sample reflection at the volume's faces, a Gaussian truncated at 4 sigma), so a
volume scored on the GPU gets the statmap the CPU gives to float32 rounding. Only the cluster
labelling and the writing stay on the CPU. :func:`.statmap` remains the reference (the CPU path
and calibration use it); ``tests/test_statmap_torch.py`` holds the two together.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .statmap import LOCAL_BASELINE_CLIP
from .types import NormativeMaps, ScoringParams


def _reflect_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad ``r`` on both sides of ``dim`` as scipy's ``mode='reflect'`` (d c b a | a b c d)."""
    if r == 0:
        return x
    n = x.shape[dim]
    if r > n:  # longer than the axis: scipy reflects again and again (period 2n)
        idx = torch.remainder(torch.arange(-r, n + r, device=x.device), 2 * n)
        idx = torch.where(idx >= n, 2 * n - 1 - idx, idx)
        return x.index_select(dim, idx)
    left = x.narrow(dim, 0, r).flip(dim)
    right = x.narrow(dim, n - r, r).flip(dim)
    return torch.cat([left, x, right], dim=dim)


def gaussian_filter(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter of a 3D volume (separable, reflect at the faces)."""
    r = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float64)
    k = torch.exp(-0.5 / float(sigma) ** 2 * t * t)
    k = (k / k.sum()).to(x.dtype)
    out = x
    for dim in range(3):
        padded = _reflect_pad(out, r, dim)
        shape = [1, 1, 1]
        shape[dim] = 2 * r + 1
        out = F.conv3d(padded[None, None], k.view(1, 1, *shape))[0, 0]
    return out


def median3(x: torch.Tensor) -> torch.Tensor:
    """3×3×3 median (scipy ``median_filter(size=3)``: reflect at the faces)."""
    p = x
    for dim in range(3):
        p = _reflect_pad(p, 1, dim)
    patches = p.unfold(0, 3, 1).unfold(1, 3, 1).unfold(2, 3, 1)
    return patches.reshape(*x.shape, 27).median(dim=-1).values


def erode(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    """scipy ``binary_erosion`` with the 6-neighbour cross, ``iterations`` times (outside
    the volume counts as background)."""
    m = mask.bool()
    for _ in range(iterations):
        p = F.pad(m[None, None].float(), (1, 1, 1, 1, 1, 1))[0, 0] > 0
        c = p[1:-1, 1:-1, 1:-1]
        m = (c & p[:-2, 1:-1, 1:-1] & p[2:, 1:-1, 1:-1] & p[1:-1, :-2, 1:-1]
             & p[1:-1, 2:, 1:-1] & p[1:-1, 1:-1, :-2] & p[1:-1, 1:-1, 2:])
    return m


def _median(v: torch.Tensor) -> torch.Tensor:
    """numpy's median (the mean of the two middle values for an even count)."""
    s = v.sort().values
    n = s.numel()
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _masked_smooth(values: torch.Tensor, inside: torch.Tensor, sigma: float) -> torch.Tensor:
    """:func:`.statmap._masked_smooth`: a Gaussian within ``inside`` (normalised
    convolution), 0 outside."""
    w = inside.float()
    num = gaussian_filter(values * w, sigma)
    den = gaussian_filter(w, sigma)
    return torch.where(inside, num / den.clamp(min=1e-6), torch.zeros_like(values))


def csf_weights(volume: torch.Tensor, brain: torch.Tensor, params: ScoringParams
                ) -> torch.Tensor | None:
    """:func:`.statmap.csf_weights` on the volume's device (the two wide Gaussians that find
    the local level are most of the CPU cost of scoring a 2 mm scan)."""
    if params.csf_weight == 1.0:
        return None
    inside = brain.bool()
    if not bool(inside.any()):
        return None
    t1 = volume[0].float()
    rel = t1 / _masked_smooth(t1, inside, params.csf_sigma).clamp(min=1e-6)
    level = (params.csf_level if params.csf_level > 0
             else float(torch.quantile(rel[inside].double(), params.csf_quantile)))
    one = torch.ones_like(t1)
    return torch.where(inside & (rel < level), one * params.csf_weight, one)


def raw_map(volume: torch.Tensor, recon: torch.Tensor, brain: torch.Tensor,
            normative: NormativeMaps, scan_spread: list[float] | None,
            weights: torch.Tensor | None = None, local_sigma: float = 0.0) -> torch.Tensor:
    """:func:`.statmap.statmap_from_residual` of ``volume - recon`` (C, X, Y, Z)."""
    mean = torch.as_tensor(normative.mean, device=volume.device)
    sd = torch.as_tensor(normative.sd, device=volume.device)
    z = (volume - recon - mean) / sd
    if local_sigma > 0:  # statmap.local_baseline
        for c in range(z.shape[0]):
            clipped = z[c].clamp(-LOCAL_BASELINE_CLIP, LOCAL_BASELINE_CLIP)
            z[c] = z[c] - _masked_smooth(clipped, brain.bool(), local_sigma)
    if scan_spread is not None:
        ref = torch.as_tensor(np.asarray(scan_spread, np.float64), device=volume.device)
        for c in range(z.shape[0]):
            vals = z[c][brain]
            med = _median(vals)
            mad = 1.4826 * _median((vals - med).abs())
            spread = torch.clamp(mad, min=1e-6).double()
            scale = torch.clamp(spread / ref[c], min=1.0).float()
            z[c] = (z[c] - med) / scale
    raw = z.abs().mean(dim=0) * brain
    return raw if weights is None else raw * weights


def postprocess(raw: torch.Tensor, brain: torch.Tensor, params: ScoringParams
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.statmap.postprocess`: median filter, masked smoothing, kept inside the eroded
    brain; returns (map, eroded mask)."""
    eroded = erode(brain, params.erosion) if params.erosion > 0 else brain.bool()
    out = raw.float()
    if params.median_size == 3:
        out = median3(out)
    elif params.median_size > 1:
        raise ValueError(f"median_size {params.median_size}: only 3 is implemented on the GPU")
    if params.smooth_sigma > 0:
        out = _masked_smooth(out, eroded, params.smooth_sigma)
    return out * eroded, eroded


def scan_score(statmap: torch.Tensor, eroded: torch.Tensor, top_fraction: float) -> float:
    """:func:`.statmap.scan_score`: the mean of the top ``top_fraction`` in the brain."""
    vals = statmap[eroded]
    if vals.numel() == 0:
        return float("nan")
    k = max(1, int(round(top_fraction * vals.numel())))
    return float(vals.topk(k).values.double().mean())
