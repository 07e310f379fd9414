"""Slice mosaics of volumes as PNG bytes (numpy composition, Pillow encoding).

One voxel -> ``scale`` pixels, cropped to the brain's bounding box. Axial slices show the
subject's anterior up and left on the image left (neurological): template-grid voxel axes run
left->right, posterior->anterior, inferior->superior (RAS). Used by the reports and by
training (the bundle's example images), hence a core module.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# Colours (RGB, 0-1) drawn over grey-scale images.
CONTOUR_RGB = (0.15, 1.0, 0.35)
EDGE_RGB = (1.0, 0.2, 0.2)
ANOMALY_CONTOUR_RGB = (0.2, 0.85, 1.0)


# --------------------------------------------------------------------------- helpers


def finite_array(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return np.where(np.isfinite(a), a, 0.0).astype(np.float32, copy=False)


def robust_range(
    volume: np.ndarray, mask: np.ndarray | None = None, lo: float = 1.0, hi: float = 99.5
) -> tuple[float, float]:
    """Percentile window of the (masked, else non-zero) finite voxels of ``volume``."""
    vol = np.asarray(volume, dtype=np.float32)
    sel = np.isfinite(vol)
    sel &= (np.asarray(mask) > 0) if mask is not None else (vol != 0)
    values = vol[sel]
    if values.size == 0:
        return 0.0, 1.0
    if values.size > 200_000:  # a strided sample is plenty for a display window
        values = values[:: values.size // 200_000 + 1]
    vmin, vmax = (float(v) for v in np.percentile(values, [lo, hi]))
    if not vmax > vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def bounding_box(mask: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` (grown by ``margin`` voxels); all if empty."""
    m = np.asarray(mask) > 0
    if not m.any():
        return tuple(slice(0, n) for n in m.shape)
    box = []
    for ax in range(m.ndim):
        other = tuple(i for i in range(m.ndim) if i != ax)
        idx = np.flatnonzero(m.any(axis=other))
        box.append(slice(max(0, idx[0] - margin), min(m.shape[ax], idx[-1] + 1 + margin)))
    return tuple(box)


def pick_slices(extent: int, n_slices: int, focus: int | None = None) -> list[int]:
    """``n_slices`` evenly spaced indices inside ``[0, extent)``, skipping the outer ends.

    With ``focus`` the nearest slice is replaced by it (e.g. the slice of largest anomaly).
    """
    n = max(1, min(int(n_slices), extent))
    if n == 1:
        idx = [extent // 2]
    else:
        lo, hi = 0.16 * (extent - 1), 0.86 * (extent - 1)
        idx = [int(round(v)) for v in np.linspace(lo, hi, n)]
    if focus is not None and 0 <= focus < extent and focus not in idx:
        nearest = int(np.argmin([abs(i - focus) for i in idx]))
        idx[nearest] = int(focus)
    return sorted(set(idx))


def _tile(vol: np.ndarray, k: int, axis: int) -> np.ndarray:
    """2-D slice ``k`` along ``axis`` oriented for display (rows = last remaining axis, up)."""
    return np.take(vol, k, axis=axis).T[::-1]


def _zoom(img: np.ndarray, scale: float, order: int) -> np.ndarray:
    if scale == 1:
        return img
    return ndimage.zoom(img, scale, order=order, mode="nearest", grid_mode=True)


def _edge(mask2d: np.ndarray) -> np.ndarray:
    m = mask2d > 0
    return m & ~ndimage.binary_erosion(m, border_value=0)


def _paint(rgb: np.ndarray, where: np.ndarray, color: Sequence[float], alpha: float = 1.0) -> None:
    if where.any():
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.asarray(color, dtype=np.float32)


def _hot_lut() -> np.ndarray:
    from matplotlib import colormaps

    # Skip the black/dark-red bottom of "hot" so low supra-threshold values stay visible.
    return colormaps["hot"](np.linspace(0.35, 1.0, 256))[:, :3].astype(np.float32)


def _sobel_edges(img: np.ndarray, brain: np.ndarray | None, pct: float = 80.0) -> np.ndarray:
    """Thin edges of a 2-D image: Sobel magnitude, non-maximum suppression, high threshold."""
    img = ndimage.gaussian_filter(img.astype(np.float32), 0.8)
    gx = ndimage.sobel(img, axis=1)
    gy = ndimage.sobel(img, axis=0)
    mag = np.hypot(gx, gy)
    region = mag > 0 if brain is None else (brain > 0) | ndimage.binary_dilation(brain > 0)
    vals = mag[region & (mag > 0)]
    if vals.size == 0:
        return np.zeros(img.shape, bool)
    strong = mag >= np.percentile(vals, pct)
    # Non-maximum suppression along the gradient direction quantised to 4 directions.
    ang = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    p = np.pad(mag, 1, mode="edge")
    h, w = mag.shape

    def nb(dy: int, dx: int) -> np.ndarray:
        return p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    keep = np.zeros_like(strong)
    for lo, hi, (dy, dx) in (
        (0, 22.5, (0, 1)),
        (157.5, 180.1, (0, 1)),
        (22.5, 67.5, (1, 1)),
        (67.5, 112.5, (1, 0)),
        (112.5, 157.5, (1, -1)),
    ):
        sel = (ang >= lo) & (ang < hi)
        keep |= sel & (mag >= nb(dy, dx)) & (mag >= nb(-dy, -dx))
    return strong & keep & region


def _grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Compose rows of RGB tiles (H, W, 3) into one image, padding with black."""
    row_imgs = []
    for tiles in rows:
        h = max(t.shape[0] for t in tiles)
        parts = []
        for t in tiles:
            canvas = np.zeros((h, t.shape[1], 3), np.float32)
            top = (h - t.shape[0]) // 2
            canvas[top : top + t.shape[0]] = t
            parts.append(canvas)
            parts.append(np.zeros((h, pad, 3), np.float32))
        row_imgs.append(np.concatenate(parts[:-1], axis=1))
    width = max(r.shape[1] for r in row_imgs)
    out = []
    for r in row_imgs:
        canvas = np.zeros((r.shape[0], width, 3), np.float32)
        canvas[:, : r.shape[1]] = r
        out.append(canvas)
        out.append(np.zeros((pad, width, 3), np.float32))
    return np.concatenate(out[:-1], axis=0)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of a float RGB image in [0, 1] (stored as 8-bit grey when it has no colour)."""
    from PIL import Image  # Pillow: a dependency of matplotlib

    arr = np.clip(np.asarray(rgb, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(
        arr[..., 0], arr[..., 2]
    ):
        arr = arr[..., 0]
    img = Image.fromarray(arr, mode="L" if arr.ndim == 2 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def render(
    volume: np.ndarray,
    *,
    axes: Sequence[int],
    n_slices: int,
    box: tuple[slice, ...],
    vmin: float,
    vmax: float,
    scale: float,
    overlay: np.ndarray | None = None,
    overlay_threshold: float | None = None,
    overlay_vmax: float | None = None,
    contours: Sequence[tuple[np.ndarray, Sequence[float]]] = (),
    edges_of: np.ndarray | None = None,
    edges_brain: np.ndarray | None = None,
    focus: Sequence[int] | None = None,
) -> np.ndarray:
    vol = finite_array(volume)[box]
    ov = finite_array(overlay)[box] if overlay is not None else None
    cons = [(np.asarray(m)[box] > 0, c) for m, c in contours if m is not None]
    ed = finite_array(edges_of)[box] if edges_of is not None else None
    edb = np.asarray(edges_brain)[box] > 0 if edges_brain is not None else None
    lut = _hot_lut() if ov is not None else None
    thr = overlay_threshold
    if ov is not None and thr is None:
        thr = float(np.nextafter(np.float32(0), np.float32(1)))
    if ov is not None:
        supra = ov[ov >= thr]
        top = overlay_vmax if overlay_vmax is not None else (
            float(np.percentile(supra, 99)) if supra.size else thr + 1.0
        )
        top = top if top > thr else thr + 1.0
    rows: list[list[np.ndarray]] = []
    for ax in axes:
        f = None
        if focus is not None:
            f = int(focus[ax]) - (box[ax].start or 0)
        tiles = []
        for k in pick_slices(vol.shape[ax], n_slices, f):
            g = _zoom(_tile(vol, k, ax), scale, order=1)
            g = np.clip((g - vmin) / (vmax - vmin), 0.0, 1.0)
            rgb = np.repeat(g[..., None], 3, axis=2)
            if ov is not None:
                o = _zoom(_tile(ov, k, ax), scale, order=0)
                sel = o >= thr
                if sel.any():
                    level = np.clip((o[sel] - thr) / (top - thr), 0.0, 1.0)
                    rgb[sel] = 0.15 * rgb[sel] + 0.85 * lut[(level * 255).astype(int)]
            for m, color in cons:
                _paint(rgb, _edge(_zoom(_tile(m, k, ax).astype(np.uint8), scale, 0)), color)
            if ed is not None:
                brain2d = None
                if edb is not None:
                    brain2d = _zoom(_tile(edb, k, ax).astype(np.uint8), scale, 0)
                e = _sobel_edges(_zoom(_tile(ed, k, ax), scale, order=1), brain2d)
                _paint(rgb, e, EDGE_RGB, alpha=0.9)
            tiles.append(rgb)
        rows.append(tiles)
    return _grid(rows)


def box_for(volume: np.ndarray, crop_mask: np.ndarray | None) -> tuple[slice, ...]:
    if crop_mask is not None and np.any(crop_mask):
        return bounding_box(crop_mask)
    return bounding_box(np.isfinite(volume) & (np.asarray(volume) != 0))


def focus_voxel(overlay: np.ndarray | None, threshold: float | None) -> tuple[int, ...] | None:
    """Voxel index of the anomaly's centre of mass per axis (largest supra-threshold area)."""
    if overlay is None:
        return None
    ov = finite_array(overlay)
    sel = ov >= threshold if threshold is not None else ov > 0
    if not sel.any():
        return None
    return tuple(int(np.argmax(sel.sum(axis=tuple(j for j in range(3) if j != ax))))
                 for ax in range(3))


# --------------------------------------------------------------------------- public API


def mosaic(
    volume: np.ndarray,
    overlay: np.ndarray | None = None,
    mask_contour: np.ndarray | None = None,
    n_slices: int = 8,
    axis: int | Sequence[int] = 2,
    vmin: float | None = None,
    vmax: float | None = None,
    *,
    overlay_threshold: float | None = None,
    overlay_vmax: float | None = None,
    crop_mask: np.ndarray | None = None,
    contour_color: Sequence[float] = CONTOUR_RGB,
    scale: float = 2.0,
    focus_overlay: bool = True,
) -> bytes:
    """Slice mosaic (one row per ``axis``, default axial) of ``volume`` as PNG bytes.

    ``overlay`` is shown in a hot colour map where ``overlay >= overlay_threshold`` (where
    ``overlay > 0`` without a threshold); ``mask_contour`` is drawn as a thin outline.
    ``vmin``/``vmax`` default to a robust (1-99.5 %) window of the non-zero voxels. The image
    is cropped to the bounding box of ``crop_mask`` (else the non-zero voxels) and, when the
    overlay is non-empty, one slice goes through the anomaly.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"mosaic needs a 3-D volume, got shape {volume.shape}")
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if vmin is None or vmax is None:
        lo, hi = robust_range(volume, crop_mask)
        vmin = lo if vmin is None else vmin
        vmax = hi if vmax is None else vmax
    if not vmax > vmin:
        vmax = vmin + 1.0
    box = box_for(volume, crop_mask)
    focus = focus_voxel(overlay, overlay_threshold) if focus_overlay else None
    contours = [(mask_contour, contour_color)] if mask_contour is not None else []
    rgb = render(volume, axes=axes, n_slices=n_slices, box=box, vmin=vmin, vmax=vmax,
                  scale=scale, overlay=overlay, overlay_threshold=overlay_threshold,
                  overlay_vmax=overlay_vmax, contours=contours, focus=focus)
    return encode_png(rgb)
