"""Training-time augmentation of 2D slice batches, suited to MRI. Plain torch (no MONAI).

Every random draw comes from the trainer's per-epoch ``torch.Generator``, on the generator's
own device (the CPU on CPU; the GPU on CUDA, so that no parameter is copied from the host at
each step), so a resumed run repeats an uninterrupted one exactly. Image and mask get the same
geometric transform; the intensity transforms touch the image only. The augmented slice is
the training target too (the model's ``make_input`` corrupts it afterwards).

Hyper-parameters (a model's ``defaults``; 0 disables one, and with all three at 0 the draws are
skipped, so training is bit-for-bit what it was before these were added):

``shift``       flips left-right (p = 0.5) and an in-plane roll of up to ±shift voxels;
``aug_gamma``   intensity scaling by a factor in [1 - g/2, 1 + g/2] and a gamma in [1 - g, 1 + g];
``aug_bias``    a smooth multiplicative bias field in [1 - b, 1 + b] (a random 3×3 control grid,
                upsampled bicubically: a low-order, slowly varying field like residual
                inhomogeneity after N4);
``aug_affine``  rotation up to ±aug_affine degrees and isotropic scaling up to ±aug_affine % about
                the slice centre (``affine_grid``/``grid_sample``; bilinear for the image,
                nearest for the mask).

Domain randomisation (what differs between scanners and protocols and is not disease; off by
default, and the target follows the input, so the network learns to reconstruct a scan of
another contrast or resolution faithfully instead of calling it anomalous):

``aug_contrast`` a random monotone intensity curve (piecewise linear through 4 inner control
                 points displaced by up to ±aug_contrast of the range): tissue contrast changes;
``aug_blur``     Gaussian blur with a sigma up to aug_blur voxels, separately per axis: thick
                 slices and lower resolution.

Anatomical randomisation (what differs between healthy people beyond an affine registration:
ventricle and sulcus size with age, local shape; off by default):

``aug_warp``     a smooth local expansion or contraction about a random point inside the brain
                 (magnification up to ``1 / (1 - aug_warp)`` at its centre, fading with a
                 Gaussian profile of a random width), plus a gentle random elastic field. The
                 same grid moves image and mask, so an enlarged ventricle or a displaced
                 structure is something to reconstruct, not to flag.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=gen.device)


def flip_shift(x: torch.Tensor, m: torch.Tensor, shift: int, gen: torch.Generator):
    """Random left-right flips and in-plane shifts (same for image and mask)."""
    flip = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    x = torch.where(flip[:, None, None, None].to(x.device), x.flip(-2), x)
    m = torch.where(flip[:, None, None, None].to(m.device), m.flip(-2), m)
    if shift > 0:
        dx, dy = torch.randint(-shift, shift + 1, (2,), generator=gen, device=gen.device).tolist()
        x = torch.roll(x, (dx, dy), dims=(-2, -1))
        m = torch.roll(m, (dx, dy), dims=(-2, -1))
    return x, m


def intensity_gamma(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Per-slice scaling in [1 - s/2, 1 + s/2] and gamma in [1 - s, 1 + s] (x ≥ 0 assumed)."""
    n = x.shape[0]
    scale = _uniform(n, 1 - strength / 2, 1 + strength / 2, gen).to(x.device, x.dtype)
    gamma = _uniform(n, 1 - strength, 1 + strength, gen).to(x.device, x.dtype)
    shape = (n,) + (1,) * (x.dim() - 1)
    return scale.view(shape) * x.clamp(min=0).pow(gamma.view(shape))


def bias_field(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Multiply by a smooth field in [1 - s, 1 + s] (3×3 control grid, bicubic upsampling)."""
    n, _, h, w = x.shape
    ctrl = torch.rand(n, 1, 3, 3, generator=gen, device=gen.device).to(x.device, x.dtype) * 2 - 1
    field = F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True)
    return x * (1 + strength * field.clamp(-1, 1))


def affine(x: torch.Tensor, m: torch.Tensor, degrees: float, gen: torch.Generator):
    """Rotation up to ±degrees and scaling up to ±degrees % (same for image and mask)."""
    n = x.shape[0]
    theta = _uniform(n, -degrees, degrees, gen) * (math.pi / 180)
    zoom = _uniform(n, 1 - degrees / 100, 1 + degrees / 100, gen)
    cos, sin = torch.cos(theta) / zoom, torch.sin(theta) / zoom
    zero = torch.zeros(n, device=gen.device)
    mat = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    mat = mat.to(x.device, torch.float32)
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    xo = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                       align_corners=False).to(x.dtype)
    mo = F.grid_sample(m.float(), grid, mode="nearest", padding_mode="zeros",
                       align_corners=False).to(m.dtype)
    return xo, mo


def contrast_curve(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """A random monotone piecewise-linear curve per slice on [0, top] (top: the batch's 99.9th
    percentile); values above ``top`` keep the last segment's slope."""
    n = x.shape[0]
    top = float(torch.quantile(x.detach().flatten()[::7].float(), 0.999)) or 1.0
    dev = gen.device
    knots = torch.linspace(0, 1, 6, device=dev)
    inner = knots[1:-1] + (torch.rand(n, 4, generator=gen, device=dev) * 2 - 1) * strength
    ys = torch.cat([torch.zeros(n, 1, device=dev), inner.sort(dim=1).values.clamp(0.02, 0.98),
                    torch.ones(n, 1, device=dev)], dim=1).to(x.device, x.dtype)
    t = (x / top).clamp(min=0)
    pos = (t * 5).clamp(max=5 - 1e-6)
    i = pos.floor().long()
    frac = pos - i
    idx = i.view(n, -1)
    lo = ys.gather(1, idx).view_as(x)
    hi = ys.gather(1, idx + 1).view_as(x)
    beyond = (t - 1).clamp(min=0) * (ys[:, 5] - ys[:, 4]).view(n, 1, 1, 1) * 5
    return top * (lo + frac * (hi - lo) + beyond)


def gaussian_blur(x: torch.Tensor, max_sigma: float, gen: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur, sigma drawn in [0, max_sigma] per slice and axis."""
    n = x.shape[0]
    radius = max(1, int(math.ceil(2.5 * max_sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=gen.device)
    out = x
    for dim in (-2, -1):
        sigma = torch.rand(n, generator=gen, device=gen.device) * max_sigma + 1e-3
        k = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
        k = (k / k.sum(dim=1, keepdim=True)).to(x.device, x.dtype)  # (n, 2r+1)
        c = out.shape[1]
        shape = (n * c, 1, 1, -1) if dim == -1 else (n * c, 1, -1, 1)
        weight = k.repeat_interleave(c, dim=0).view(shape)
        pad = (radius, radius, 0, 0) if dim == -1 else (0, 0, radius, radius)
        flat = F.pad(out.reshape(1, n * c, *out.shape[2:]), pad, mode="replicate")
        out = F.conv2d(flat, weight, groups=n * c).view_as(out)
    return out


def local_warp(x: torch.Tensor, m: torch.Tensor, strength: float, gen: torch.Generator):
    """A radial expansion (or contraction) about a random point in each slice's brain, plus a
    smooth elastic field of up to 1.5 % of the slice (same grid for image and mask)."""
    n, _, h, w = x.shape
    dev = gen.device
    # A centre drawn among the slice's brain voxels (the slice centre for an empty one).
    flat = m.detach().float().reshape(n, -1).to(dev)
    weights = flat + (flat.sum(1, keepdim=True) == 0).float()
    pick = torch.multinomial(weights, 1, generator=gen).squeeze(1)
    cy = (pick // w).float() / max(1, h - 1) * 2 - 1
    cx = (pick % w).float() / max(1, w - 1) * 2 - 1
    amp = _uniform(n, -strength, strength, gen)
    width = _uniform(n, 0.15, 0.45, gen)
    ys = torch.linspace(-1, 1, h, device=dev).view(1, h, 1)
    xs = torch.linspace(-1, 1, w, device=dev).view(1, 1, w)
    dy, dx = ys - cy.view(n, 1, 1), xs - cx.view(n, 1, 1)
    g = torch.exp(-(dy**2 + dx**2) / (2 * width.view(n, 1, 1) ** 2))
    # Sampling from c + (p - c)(1 - a·g): a > 0 magnifies about c, a < 0 shrinks.
    gy, gx = ys - amp.view(n, 1, 1) * g * dy, xs - amp.view(n, 1, 1) * g * dx
    ctrl = (torch.rand(n, 2, 4, 4, generator=gen, device=dev) * 2 - 1) * 0.03
    elastic = F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True)
    grid = torch.stack([gx + elastic[:, 1], gy + elastic[:, 0]], dim=-1).to(x.device)
    xo = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                       align_corners=True).to(x.dtype)
    mo = F.grid_sample(m.float(), grid, mode="nearest", padding_mode="zeros",
                       align_corners=True).to(m.dtype)
    return xo, mo


def augment_batch(x: torch.Tensor, m: torch.Tensor, hp: dict, gen: torch.Generator):
    """All augmentations a model's hyper-parameters ask for (missing keys: off, except shift
    flips which always run). The image is re-masked so nothing leaks outside the brain."""
    x, m = flip_shift(x, m, int(hp.get("shift", 0)), gen)
    deg = float(hp.get("aug_affine", 0.0))
    if deg > 0:
        x, m = affine(x, m, deg, gen)
    changed = deg > 0
    warp = float(hp.get("aug_warp", 0.0))
    if warp > 0:
        x, m = local_warp(x, m, warp, gen)
        changed = True
    for key, transform in _INTENSITY:  # in this order: the draws follow it
        strength = float(hp.get(key, 0.0))
        if strength > 0:
            x = transform(x, strength, gen)
            changed = True
    if changed:
        x = x * m
    return x, m


# Intensity transforms (image only) by hyper-parameter, in the order they are applied.
_INTENSITY = (("aug_gamma", intensity_gamma), ("aug_bias", bias_field),
              ("aug_contrast", contrast_curve), ("aug_blur", gaussian_blur))
