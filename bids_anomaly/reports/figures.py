"""Report figures as PNG bytes: slice mosaics, anomaly overlays, QC views and score plots.

Every function is a plain function of arrays that returns the bytes of a small PNG, so the
reports can inline them (base64) and users can save them on their own. Slice mosaics are
composed in numpy (one voxel -> ``scale`` pixels, cropped to the brain's bounding box) and
encoded with Pillow, matplotlib's own PNG writer; the score plot uses matplotlib's Agg canvas
(no pyplot, no global state, safe in worker processes).

Display convention for all mosaics: for axial slices the subject's anterior is up and the
subject's left is on the image left (neurological), because template-grid voxel axes run
left->right, posterior->anterior, inferior->superior (RAS).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from ..core.mosaic import (
    ANOMALY_CONTOUR_RGB,
    CONTOUR_RGB,
    bounding_box,
    box_for,
    encode_png,
    finite_array,
    focus_voxel,
    render,
    robust_range,
)

__all__ = [
    "anomaly_mosaics",
    "anomaly_strip",
    "mask_contour",
    "registration_edges",
    "score_distribution",
]


def _anomaly_view(preproc: np.ndarray, statmap: np.ndarray, mask: np.ndarray | None,
                  threshold: float | None, brain_mask: np.ndarray | None) -> dict:
    """What every view of a scan's anomaly shares: crop, grey window, the statmap as shown,
    its threshold, the mask outline and the slice through the anomaly."""
    preproc, stat = finite_array(preproc), finite_array(statmap)
    crop = brain_mask if brain_mask is not None and np.any(brain_mask) else (preproc != 0)
    vmin, vmax = robust_range(preproc, crop)
    m = np.asarray(mask) > 0 if mask is not None else None
    has_mask = m is not None and bool(m.any())
    shown: np.ndarray | None = stat
    thr: float | None = None
    if threshold is not None and np.isfinite(threshold):
        thr = float(threshold)
    elif has_mask:
        thr = float(stat[m].min())
        shown = np.where(m, stat, thr - 1.0).astype(np.float32)
    else:
        shown = None  # nothing to show: no threshold and an empty mask
    return {"preproc": preproc, "box": box_for(preproc, crop), "vmin": vmin, "vmax": vmax,
            "shown": shown, "thr": thr,
            "contours": [(m, ANOMALY_CONTOUR_RGB)] if has_mask else [],
            "focus": focus_voxel(m, None) if has_mask else focus_voxel(shown, thr)}


def anomaly_mosaics(
    preproc: np.ndarray,
    recon: np.ndarray,
    statmap: np.ndarray,
    mask: np.ndarray | None,
    threshold: float | None,
    *,
    brain_mask: np.ndarray | None = None,
    n_slices: int = 8,
    axis: int = 2,
    scale: float = 2.0,
) -> dict[str, bytes]:
    """Matching mosaics (same crop, slices and grey window) of one scan.

    Returns PNG bytes under ``"input"``, ``"recon"`` (pseudo-healthy reconstruction) and
    ``"overlay"``: the statmap where it reaches ``threshold`` in a hot colour map over the
    input, with the binary anomaly ``mask`` outlined. Without a threshold the statmap is
    shown inside ``mask``.
    """
    v = _anomaly_view(preproc, statmap, mask, threshold, brain_mask)
    common = dict(axes=(axis,), n_slices=n_slices, box=v["box"], vmin=v["vmin"],
                  vmax=v["vmax"], scale=scale, focus=v["focus"])
    return {
        "input": encode_png(render(v["preproc"], **common)),
        "recon": encode_png(render(finite_array(recon), **common)),
        "overlay": encode_png(render(v["preproc"], overlay=v["shown"],
                                      overlay_threshold=v["thr"], contours=v["contours"],
                                      **common)),
    }


def anomaly_strip(preproc: np.ndarray, statmap: np.ndarray, mask: np.ndarray | None,
                  threshold: float | None, *, brain_mask: np.ndarray | None = None,
                  n_slices: int = 4, scale: float = 0.75, axis: int = 2) -> np.ndarray:
    """One row of ``n_slices`` small slices with the anomaly overlay (RGB floats in [0, 1]),
    drawn as :func:`anomaly_mosaics` draws its overlay (one slice through the anomaly)."""
    v = _anomaly_view(preproc, statmap, mask, threshold, brain_mask)
    return render(v["preproc"], axes=(axis,), n_slices=n_slices, box=v["box"],
                   vmin=v["vmin"], vmax=v["vmax"], scale=scale, overlay=v["shown"],
                   overlay_threshold=v["thr"], contours=v["contours"], focus=v["focus"])


def mask_contour(
    image: np.ndarray, brain_mask: np.ndarray, n_slices: int = 6,
    axes: Sequence[int] = (2, 1), scale: float = 1.5,
) -> bytes:
    """QC: the brain mask outlined over the image (axial and coronal rows)."""
    image = finite_array(image)
    bm = np.asarray(brain_mask) > 0
    vmin, vmax = robust_range(image, bm if bm.any() else None)
    box = bounding_box(bm | (image != 0), margin=4)
    return encode_png(render(image, axes=axes, n_slices=n_slices, box=box, vmin=vmin,
                              vmax=vmax, scale=scale, contours=[(bm, CONTOUR_RGB)]))


def registration_edges(
    registered: np.ndarray, template_t1: np.ndarray, n_slices: int = 5,
    axes: Sequence[int] = (2, 1, 0), scale: float = 1.5,
    template_mask: np.ndarray | None = None,
) -> bytes:
    """QC: edges of the template (Sobel gradient magnitude, thinned) over the registered image.

    Misregistration shows as template edges that do not follow the image's own boundaries.
    """
    reg = finite_array(registered)
    tpl = finite_array(template_t1)
    if reg.shape != tpl.shape:
        raise ValueError(f"registered image {reg.shape} is not on the template grid {tpl.shape}")
    tmask = np.asarray(template_mask) > 0 if template_mask is not None else tpl > 0
    vmin, vmax = robust_range(reg, None)
    box = bounding_box(tmask | (reg != 0), margin=3)
    return encode_png(render(reg, axes=axes, n_slices=n_slices, box=box, vmin=vmin, vmax=vmax,
                              scale=scale, edges_of=tpl, edges_brain=tmask))


def score_distribution(
    healthy_scores: Sequence[float] | None,
    score: float | None = None,
    threshold: float | None = None,
    *,
    label: str = "this scan",
    width: float = 5.0,
    height: float = 1.8,
    dpi: int = 90,
) -> bytes:
    """Histogram and strip of the healthy reference scores with the scan's score as a line."""
    from matplotlib.figure import Figure

    ref = np.asarray([] if healthy_scores is None else list(healthy_scores), dtype=object)
    ref = np.asarray([float(v) for v in ref if v is not None], dtype=float)
    ref = ref[np.isfinite(ref)]
    fig = Figure(figsize=(width, height), dpi=dpi)
    ax = fig.add_axes((0.08, 0.27, 0.9, 0.63))
    if ref.size:
        bins = min(30, max(5, int(np.sqrt(ref.size)) + 1))
        ax.hist(ref, bins=bins, color="#9aa7b4", edgecolor="white", linewidth=0.5,
                label=f"healthy reference (n={ref.size})")
        ymax = ax.get_ylim()[1]
        ax.plot(ref, np.full(ref.shape, -0.06 * ymax), "|", color="#4b5a68", ms=6, mew=0.8)
        ax.set_ylim(-0.12 * ymax, ymax * 1.05)
    else:
        ax.text(0.5, 0.5, "no healthy reference scores", ha="center", va="center",
                transform=ax.transAxes, color="#666", fontsize=8)
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="#555", ls="--", lw=1, label="flag threshold")
    if score is not None and np.isfinite(score):
        ax.axvline(score, color="#d62728", lw=2, label=label)
    lo, hi = ax.get_xlim()
    pts = [v for v in (score, threshold) if v is not None and np.isfinite(v)]
    if pts:
        span = max(hi, *pts) - min(lo, *pts)
        ax.set_xlim(min(lo, *pts) - 0.03 * span, max(hi, *pts) + 0.03 * span)
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("anomaly score", fontsize=8, labelpad=1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6.5, frameon=False, loc="lower left", bbox_to_anchor=(0, 1.0),
                  ncol=3, borderaxespad=0, handlelength=1.5)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
