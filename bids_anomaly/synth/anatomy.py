"""One synthetic subject: anatomy warped from the template, pose, lesions, head layers, the
scans of each contrast in native space.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..core.templates import Template
from .config import (
    CONTRAST_CODES,
    EDGE_HI,
    EDGE_LO,
    SynthConfig,
    SynthLesion,
    SynthScan,
    SynthSubject,
)
from .fields import euler, random_rotation, sigmoid, smooth_field, smoothstep, stream, wave_field

# Tissue intensities (CSF, GM, WM) of the synthetic T2w and FLAIR brains.
_TISSUE = {"T2w": (1.0, 0.6, 0.45), "FLAIR": (0.12, 0.65, 0.5)}
# Extra-cerebral layers: CSF gap (0-3 mm), skull (3-7 mm), scalp (7-12 mm).
_LAYERS = {"T1w": (0.10, 0.08, 0.70), "T2w": (0.90, 0.05, 0.40), "FLAIR": (0.12, 0.05, 0.55)}
_LAYER_EDGES_MM = (3.0, 7.0, 12.0)
_BASE_SCALE = 0.96  # the MNI brain is larger than an average adult brain


# --------------------------------------------------------------------------------------------
# Subject anatomy (shared by sessions) and scan geometry


@dataclass(frozen=True)
class _Anatomy:
    """Backward deformation anatomy -> template world, on a coarse axis-aligned grid."""

    origin: np.ndarray  # (3,) world mm of grid voxel 0
    spacing: float
    disp: tuple[np.ndarray, np.ndarray, np.ndarray]  # per world axis, mm
    head_waves: tuple[np.ndarray, np.ndarray, np.ndarray]  # (K, 5): dir xyz, freq, phase


def _brain_box(template: Template) -> tuple[np.ndarray, np.ndarray]:
    """World-mm bounding box (lo, hi) of the template brain."""
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(template.mask.any(axis=other))
        lo.append(hit[0])
        hi.append(hit[-1])
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1])
                        for c in (lo[2], hi[2])], float)
    world = corners @ template.affine[:3, :3].T + template.affine[:3, 3]
    return world.min(0), world.max(0)


def _brain_points(template: Template) -> np.ndarray:
    """World-mm coordinates of brain voxels on a ~4 mm lattice (for field-of-view sizing)."""
    step = max(1, round(4 / template.resolution))
    sub = np.argwhere(template.mask[::step, ::step, ::step]) * step
    return sub @ template.affine[:3, :3].T + template.affine[:3, 3]


def _make_anatomy(template: Template, rng: np.random.Generator) -> _Anatomy:
    lo, hi = _brain_box(template)
    spacing = 6.0
    margin = 30.0
    origin = lo - margin
    shape = tuple(int(math.ceil((hi - lo + 2 * margin)[k] / spacing)) + 1 for k in range(3))
    n_ctrl = 5
    amp = rng.uniform(2.0, 4.0)
    disp = tuple(smooth_field(rng, shape, n_ctrl, amp) for _ in range(3))
    waves = []
    for _ in range(3):  # thickness perturbation of the three head layers
        k = 6
        dirs = rng.standard_normal((k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        freqs = 2 * np.pi / rng.uniform(50.0, 140.0, k)
        phases = rng.uniform(0, 2 * np.pi, k)
        waves.append(np.column_stack([dirs, freqs, phases]))
    return _Anatomy(origin, spacing, disp, tuple(waves))  # type: ignore[arg-type]


def _pose(template: Template, rng: np.random.Generator) -> np.ndarray:
    """4x4 anatomy -> scanner world: scaling and rotation about the brain centre, then shift."""
    lo, hi = _brain_box(template)
    centre = (lo + hi) / 2
    scale = _BASE_SCALE * (1.0 + rng.uniform(-0.06, 0.06, 3))
    rot = euler(np.deg2rad(rng.uniform(-8.0, 8.0, 3)))
    shift = rng.uniform(-8.0, 8.0, 3)
    lin = rot @ np.diag(scale)
    pose = np.eye(4)
    pose[:3, :3] = lin
    pose[:3, 3] = centre + shift - lin @ centre
    return pose


def _native_grid(
    template: Template, pose: np.ndarray, voxel_size: float
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Native affine (voxel order P, S, R) and shape covering the posed head with a margin."""
    world = _brain_points(template) @ pose[:3, :3].T + pose[:3, 3]
    pad = _LAYER_EDGES_MM[2] + 10.0  # scalp, its irregularity, deformation and a margin
    wlo, whi = world.min(0) - pad, world.max(0) + pad
    n = np.ceil((whi - wlo) / voxel_size).astype(int) + 1
    aff = np.zeros((4, 4))
    aff[3, 3] = 1.0
    aff[1, 0] = -voxel_size  # axis 0 -> posterior
    aff[2, 1] = voxel_size  # axis 1 -> superior
    aff[0, 2] = voxel_size  # axis 2 -> right
    aff[:3, 3] = (wlo[0], wlo[1] + (n[1] - 1) * voxel_size, wlo[2])
    return aff, (int(n[1]), int(n[2]), int(n[0]))


def _affine_grid(mat: np.ndarray, shape: tuple[int, int, int]) -> list[np.ndarray]:
    """The three output coordinates of ``mat`` (4x4) applied to every voxel index of ``shape``."""
    i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
    out = []
    for r in range(3):
        a, b, c, t = (np.float32(v) for v in mat[r])
        out.append(a * i[:, None, None] + (b * j[None, :, None] + (c * k[None, None, :] + t)))
    return out


# --------------------------------------------------------------------------------------------
# Lesions

def _draw_lesions(
    rng: np.random.Generator,
    config: SynthConfig,
    ycoords: Sequence[np.ndarray],
    wm: np.ndarray,
    brain: np.ndarray,
    voxel_size: float,
) -> tuple[SynthLesion, ...]:
    """Draw lesion shapes and centres (deep in the brain, mostly in white matter)."""
    depth = ndimage.distance_transform_edt(brain, sampling=voxel_size)
    lo, hi = config.lesions_per_patient
    lesions = []
    for _ in range(int(rng.integers(lo, hi + 1))):
        radius = rng.uniform(*config.lesion_radius_mm)
        axes = radius * rng.uniform(0.75, 1.25, 3)
        rotation = random_rotation(rng)
        k = 5
        dirs = rng.standard_normal((k, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        freqs = rng.uniform(1.0, 2.5, k) * np.pi
        phases = rng.uniform(0, 2 * np.pi, k)
        amps = rng.dirichlet(np.ones(k)) * 0.2
        in_wm = rng.random() < 0.85
        hypo = rng.random() < 0.5
        factors = {
            "T1w": rng.uniform(0.4, 0.7) if hypo else rng.uniform(1.3, 1.6),
            "T2w": rng.uniform(1.4, 1.8),
            "FLAIR": rng.uniform(1.4, 1.8),
        }
        pick = rng.random()
        shrink = 1.0
        while True:
            need = axes.max() * shrink * EDGE_HI + voxel_size
            cand = depth >= need
            if in_wm:
                cand_wm = cand & (wm > 0.5)
                cand = cand_wm if cand_wm.any() else cand
            flat = np.flatnonzero(cand)
            if flat.size or shrink < 0.05:
                break
            shrink *= 0.85
        if not flat.size:  # degenerate brain: use the deepest voxel
            flat = np.array([int(np.argmax(depth))])
        idx = int(flat[min(int(pick * flat.size), flat.size - 1)])
        centre = np.array([float(c.flat[idx]) for c in ycoords])
        lesions.append(SynthLesion(centre, axes * shrink, rotation, dirs, freqs, phases, amps,
                                   {c: float(f) for c, f in factors.items()}))
    return tuple(lesions)


def _lesion_weights(
    lesion: SynthLesion, ycoords: Sequence[np.ndarray], soft_brain: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flat voxel indices and effect weights (0..1) of one lesion on a native grid."""
    ext = lesion.extent_mm
    near = np.ones(soft_brain.shape, bool)
    for axis in range(3):
        near &= np.abs(ycoords[axis] - np.float32(lesion.centre_mm[axis])) <= ext
    idx = np.flatnonzero(near)
    rel = np.stack([c.ravel()[idx] for c in ycoords], axis=1).astype(np.float64)
    rel -= lesion.centre_mm
    u = (rel @ lesion.rotation) / lesion.semi_axes_mm
    q = np.linalg.norm(u, axis=1)
    wobble = np.cos((u @ lesion.wave_dirs.T) * lesion.wave_freqs + lesion.wave_phases)
    q = q * (1.0 + wobble @ lesion.wave_amps)
    w = smoothstep((EDGE_HI - q) / (EDGE_HI - EDGE_LO)) * soft_brain.ravel()[idx]
    if idx.size and not (w > 0.5).any():  # too small for this grid: keep its core voxel
        w[int(np.argmax(w))] = 1.0
    return idx, w.astype(np.float32)


# --------------------------------------------------------------------------------------------
# One scan


def _head_layers(
    brain: np.ndarray,
    anatomy: _Anatomy,
    zcoords: Sequence[np.ndarray],
    voxel_size: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices and weights of the CSF gap, skull and scalp layers outside the brain."""
    dist = ndimage.distance_transform_edt(~brain, sampling=voxel_size)
    reach = _LAYER_EDGES_MM[2] + 6.0
    idx = np.flatnonzero(dist < reach + voxel_size)
    d = dist.ravel()[idx].astype(np.float32) - np.float32(voxel_size / 2)
    pts = [z.ravel()[idx] for z in zcoords]
    width = np.float32(max(0.7, 0.3 * voxel_size))
    edges = [np.float32(e) + wave_field(w, pts, amp)
             for e, w, amp in zip(_LAYER_EDGES_MM, anatomy.head_waves, (0.8, 1.2, 2.0),
                                  strict=True)]
    s = [sigmoid((d - e) / width) for e in edges]
    return idx, 1.0 - s[0], s[0] - s[1], s[1] - s[2]


def _synth_scan(
    template: Template,
    config: SynthConfig,
    anatomy: _Anatomy,
    entropy: Sequence[int],
    session: int,
    lesion_rng: np.random.Generator | None,
    lesions: tuple[SynthLesion, ...],
) -> tuple[SynthScan, tuple[SynthLesion, ...]]:
    rng = stream(entropy, 2, session)
    pose = _pose(template, rng)
    vs = float(config.voxel_size)
    affine, shape = _native_grid(template, pose, vs)

    # native voxel -> anatomy (z) -> template world (y) -> template voxel
    zcoords = _affine_grid(np.linalg.inv(pose) @ affine, shape)
    gcoords = np.stack([(z - np.float32(anatomy.origin[a])) / np.float32(anatomy.spacing)
                        for a, z in enumerate(zcoords)])
    ycoords = [z - ndimage.map_coordinates(anatomy.disp[a], gcoords, order=1, mode="nearest")
               for a, z in enumerate(zcoords)]
    del gcoords
    tinv = np.linalg.inv(template.affine)
    tcoords = np.stack([
        sum((np.float32(tinv[r, c]) * ycoords[c] for c in range(3)), np.float32(tinv[r, 3]))
        for r in range(3)
    ]).astype(np.float32)

    soft, gm, wm, t1 = (
        ndimage.map_coordinates(arr, tcoords, order=1, mode="constant", cval=0.0,
                                prefilter=False, output=np.float32)
        for arr in (template.mask.astype(np.float32), template.gm, template.wm, template.t1)
    )
    del tcoords
    soft = np.clip(soft, 0.0, 1.0)
    brain = soft > 0.5
    csf = np.clip(soft - gm - wm, 0.0, 1.0)

    if lesion_rng is not None and not lesions:
        lesions = _draw_lesions(lesion_rng, config, ycoords, wm, brain, vs)
    weights = [_lesion_weights(les, ycoords, soft) for les in lesions]
    lesion_mask = np.zeros(shape, bool)
    for idx, w in weights:
        lesion_mask.ravel()[idx[w > 0.5]] = True
    lesion_mask &= brain

    layers = _head_layers(brain, anatomy, zcoords, vs) if config.with_skull else None
    del zcoords, ycoords

    images = {}
    for contrast in config.contrasts:
        crng = stream(entropy, 3, session, CONTRAST_CODES[contrast])
        if contrast == "T1w":
            gamma = crng.uniform(0.8, 1.2)
            contrast_gain = crng.uniform(-0.08, 0.08)
            img = np.power(t1, np.float32(gamma)) * (1.0 + np.float32(contrast_gain) * (wm - gm))
        else:
            jitter = crng.uniform(0.95, 1.05, 3).astype(np.float32)
            c_csf, c_gm, c_wm = (np.float32(v) for v in np.array(_TISSUE[contrast]) * jitter)
            texture = ndimage.gaussian_filter(
                crng.standard_normal(shape, dtype=np.float32), 1.0)
            texture *= np.float32(0.03) / max(float(texture.std()), 1e-6)
            img = (c_csf * csf + c_gm * gm + c_wm * wm) * (1.0 + texture)
        img = img.astype(np.float32)
        if layers is not None:
            idx, gap, skull, scalp = layers
            v_gap, v_skull, v_scalp = _LAYERS[contrast]
            v_scalp *= crng.uniform(0.85, 1.15)
            extra = v_gap * gap + v_skull * skull + v_scalp * scalp
            img.ravel()[idx] += (1.0 - soft.ravel()[idx]) * extra.astype(np.float32)
        bias = np.exp(smooth_field(crng, shape, 4, math.log1p(crng.uniform(0.08, 0.16))))
        # reference levels from the lesion-free image, so lesions leave the rest untouched
        sigma = crng.uniform(0.02, 0.04) * float(np.percentile(img[brain], 99))
        ref = float((img * bias).max())
        peak = crng.uniform(600.0, 1400.0)
        for (idx, w), les in zip(weights, lesions, strict=True):
            img.ravel()[idx] *= 1.0 + np.float32(les.factors[contrast] - 1.0) * w
        img *= bias
        n1 = crng.standard_normal(shape, dtype=np.float32)
        n2 = crng.standard_normal(shape, dtype=np.float32)
        img = np.sqrt((img + np.float32(sigma) * n1) ** 2 + (np.float32(sigma) * n2) ** 2)
        img *= np.float32(peak / ref)
        if layers is None:  # skull-stripped, as BraTS or open MS data: zero outside the brain
            img[~brain] = 0
        images[contrast] = np.clip(np.rint(img), 0, np.iinfo(np.int16).max).astype(np.int16)
    return SynthScan(affine, images, brain, lesion_mask), lesions


def synth_subject(
    template: Template, rng: np.random.Generator, config: SynthConfig, lesions: bool
) -> SynthSubject:
    """Synthesise one subject (``config.n_sessions`` scans) from ``rng``.

    The same ``rng`` state with ``lesions=False`` gives the same images without the lesions.
    """
    entropy = [int(v) for v in rng.integers(0, 2**63 - 1, size=4)]
    anatomy = _make_anatomy(template, stream(entropy, 0))
    lesion_rng = stream(entropy, 1) if lesions else None
    drawn: tuple[SynthLesion, ...] = ()
    scans = []
    for session in range(config.n_sessions):
        scan, drawn = _synth_scan(template, config, anatomy, entropy, session, lesion_rng, drawn)
        scans.append(scan)
    return SynthSubject(tuple(scans), drawn)
