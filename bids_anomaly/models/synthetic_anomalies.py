"""Synthetic anomalies for training a network to restore, not copy (Disyre / FPI style).

During training some input slices get irregular patches whose content is not what a healthy
brain has there; the target stays the clean slice, so the network learns to replace what does
not belong. The anomalies are deliberately generic — irregular shapes from thresholded smooth
noise, intensity scaled up or down, replaced by a patch of another slice of the batch, or
flattened to the patch mean — not the ellipsoids with which the benchmarks test, so that a gain
is not a model learning the test's lesion recipe. All draws come from the trainer's
generator, on its device (a resumed run repeats an uninterrupted one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _blobs(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 1, h, w) masks of one irregular blob each, 2–20% of the slice's bounding area."""
    low = torch.randn(n, 1, max(2, h // 8), max(2, w // 8), generator=gen, device=gen.device)
    field = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    yy = torch.linspace(-1, 1, h, device=gen.device).view(1, h, 1)
    xx = torch.linspace(-1, 1, w, device=gen.device).view(1, 1, w)
    cy, cx = (torch.rand(2, n, 1, 1, generator=gen, device=gen.device) * 1.2 - 0.6)
    ry, rx = (torch.rand(2, n, 1, 1, generator=gen, device=gen.device) * 0.25 + 0.08)
    ellipse = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    level = torch.rand(n, 1, 1, 1, generator=gen, device=gen.device) * 0.8 - 0.4
    return ((field > level) & ellipse[:, None]).float()


def insert_anomalies(x: torch.Tensor, mask: torch.Tensor, p: float,
                     gen: torch.Generator) -> torch.Tensor:
    """``x`` (N, C, H, W) with an anomaly in each slice with probability ``p`` (inside the
    brain ``mask``); edges are softened by one voxel so the network cannot key on a seam."""
    n, c, h, w = x.shape
    chosen = (torch.rand(n, generator=gen, device=gen.device) < p).float().view(n, 1, 1, 1)
    if not bool(chosen.any()):
        return x
    blob = _blobs(n, h, w, gen).to(x.device) * chosen.to(x.device) * mask
    blob = F.avg_pool2d(blob, 3, stride=1, padding=1)  # soft edge
    kind = torch.randint(0, 3, (n,), generator=gen, device=gen.device).to(x.device).view(n, 1, 1, 1)
    dev = gen.device
    factor = torch.where(torch.rand(n, generator=gen, device=dev) < 0.5,
                         torch.rand(n, generator=gen, device=dev) * 0.5 + 0.3,
                         torch.rand(n, generator=gen, device=dev) * 0.6 + 1.3).to(x.device, x.dtype)
    scaled = x * factor.view(n, 1, 1, 1)
    other = x.roll(1, dims=0)  # a patch of another slice (foreign content)
    area = blob.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
    flat = (x * blob).sum(dim=(2, 3), keepdim=True) / area
    flat = flat.expand_as(x)
    content = torch.where(kind == 0, scaled, torch.where(kind == 1, other, flat))
    return x * (1 - blob) + content * blob
