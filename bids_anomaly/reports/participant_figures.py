"""The participant report's figures: input, reconstruction and overlay per contrast, QC views
(brain mask contour, registration edges), PNGs the derivatives already hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.naming import ScanOutputs
from . import figures
from .html import esc, fmt_num, img, is_missing, to_float
from .loaders import ScanRecord, load_native_qc, load_volume

log = logging.getLogger(__name__)
_CONTRASTS = ("T1w", "T2w", "FLAIR")
DEFAULT_DISPLAY_Z = 3.0  # display threshold when neither a threshold nor a mask is available
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Level:
    """Image detail; reports with many scans step down to stay under the size limit."""

    scale: float
    qc_scale: float
    n_slices: int
    qc: bool = True
    inline_all: bool = True  # False: inline only the overlay (input/recon stay PNG files)


def figure_html(png: bytes, alt: str, caption: str, **attrs: str) -> str:
    return f"<figure>{img(png, alt, **attrs)}<figcaption>{caption}</figcaption></figure>"


def images_html(output_dir: Path, rec: ScanRecord, level: Level, pngs: dict[Path, bytes],
            figs_dir: Path) -> str:
    outs = rec.outputs or ScanOutputs(rec.key)
    sid = rec.key.scan_id
    contrasts = [c for c in _CONTRASTS if (output_dir / outs.preproc(c)).is_file()]
    if not contrasts:
        return '<p class="muted">No preprocessed image found; mosaics are not available.</p>'
    stat = load_volume(output_dir / outs.template_statmap)
    mask = load_volume(output_dir / outs.template_mask)
    brain = load_volume(output_dir / outs.template_brain_mask)
    thr = to_float(rec.scores.get("voxel_threshold", rec.scores.get("z_threshold")))
    html_parts = ["<h3>Input, reconstruction and anomaly map</h3>"]
    for i, contrast in enumerate(contrasts):
        pre = load_volume(output_dir / outs.preproc(contrast))
        if pre is None:
            continue
        recon = load_volume(output_dir / outs.recon(contrast))
        st, mk, bm, rc = (v if v is not None and v.shape == pre.shape else None
                          for v in (stat, mask, brain, recon))
        t = thr
        if t is None and mk is None and st is not None:
            t = DEFAULT_DISPLAY_Z
        figs = figures.anomaly_mosaics(
            pre, rc if rc is not None else np.zeros_like(pre),
            st if st is not None else np.zeros_like(pre), mk, t, brain_mask=bm,
            n_slices=level.n_slices, scale=level.scale,
        )
        suffix = "" if contrast == "T1w" else contrast
        rel_in = figs_dir / f"{sid}_desc-input{suffix}_anomaly.png"
        rel_rc = figs_dir / f"{sid}_desc-recon{suffix}_anomaly.png"
        pngs[rel_in] = figs["input"]
        if rc is not None:
            pngs[rel_rc] = figs["recon"]
        if level.inline_all:
            html_parts.append(figure_html(figs["input"], f"{contrast} input",
                                      f"Preprocessed input ({esc(contrast)}).",
                                      id=f"input-{sid}-{contrast}"))
            if rc is not None:
                html_parts.append(figure_html(figs["recon"], f"{contrast} reconstruction",
                                          "Pseudo-healthy reconstruction by the model."))
            else:
                html_parts.append('<p class="muted">No reconstruction image found.</p>')
        else:
            links = [f'<a href="{esc(rel.as_posix())}">{esc(name)}</a>'
                     for rel, name in ((rel_in, "input"), (rel_rc, "reconstruction"))
                     if rel in pngs]
            html_parts.append(f'<p class="muted small">{esc(contrast)} mosaics (not inlined to '
                              f"keep this report small): {', '.join(links)}.</p>")
        if i > 0:
            continue  # the anomaly map is shown once, over the first contrast
        if st is None and mk is None:
            html_parts.append('<p class="muted">No anomaly map found.</p>')
            continue
        pngs[figs_dir / f"{sid}_desc-overlay_anomaly.png"] = figs["overlay"]
        if figs["overlay"] == figs["input"]:  # nothing above threshold: do not inline twice
            html_parts.append('<p class="muted" data-testid="no-overlay">The anomaly map has no '
                              "voxel above the display threshold in these slices.</p>")
            continue
        if t is not None:
            what = f"anomaly z-map where z ≥ {esc(fmt_num(t, 2))} (hot colours)"
        else:
            what = "anomaly z-map inside the anomaly mask (hot colours)"
        if mk is not None and np.any(mk):
            what += ", anomaly mask outlined in cyan"
        elif mk is not None:
            what += "; the anomaly mask is empty"
        target = f"overlay-{sid}"
        if not level.inline_all:
            html_parts.append(figure_html(figs["overlay"], "input with anomaly overlay",
                                      f"Input with {what}."))
            continue
        html_parts.append(
            f'<label class="toggle"><input type="checkbox" class="overlay-toggle" checked '
            f'data-target="{esc(target)}" data-base="{esc(f"input-{sid}-{contrast}")}" '
            f'data-testid="overlay-toggle-{esc(sid)}"> show anomaly overlay</label>'
        )
        html_parts.append(figure_html(figs["overlay"], "input with anomaly overlay",
                                  f"Input with {what}.", id=target))
    return "\n".join(html_parts)


def qc_html(output_dir: Path, rec: ScanRecord, level: Level, pngs: dict[Path, bytes],
        figs_dir: Path) -> str:
    outs = rec.outputs or ScanOutputs(rec.key)
    sid = rec.key.scan_id
    qc = rec.scores.get("qc") if isinstance(rec.scores.get("qc"), dict) else {}
    parts = ["<h3>Quality control</h3>"]
    given = {k: _existing_png(output_dir, qc.get(k)) for k in ("mask_contour_png",
                                                             "registration_png")}
    pre = bm = None
    if given["mask_contour_png"] is None or given["registration_png"] is None:
        pre = load_volume(output_dir / outs.preproc("T1w"))
        if pre is None:
            for c in _CONTRASTS[1:]:
                pre = load_volume(output_dir / outs.preproc(c))
                if pre is not None:
                    break
        bm = load_volume(output_dir / outs.template_brain_mask)
    # Brain mask contour: the native mask over the native input T1w (what brain extraction saw).
    png = given["mask_contour_png"]
    caption = "Brain mask (green outline), as given in the scan's QC record."
    native = load_native_qc(output_dir, outs) if png is None else None
    if native is not None:
        image, native_mask, input_path = native
        png = figures.mask_contour(image, native_mask, scale=level.qc_scale)
        pngs[figs_dir / f"{sid}_desc-brainmask_qc.png"] = png
        caption = ("Brain mask (green outline) over the input T1w in its native space "
                   f"({esc(input_path.name)}): the outline should follow the brain surface, "
                   "without skull or dura inside and no cortex cut off.")
    elif png is None and pre is not None and bm is not None and bm.shape == pre.shape:
        png = figures.mask_contour(pre, bm, scale=level.qc_scale)
        pngs[figs_dir / f"{sid}_space-{outs.space}_desc-brainmask_qc.png"] = png
        caption = ("Brain mask (green outline) over the preprocessed image in template space "
                   "(the native input T1w or its brain mask was not found).")
    if png is not None:
        parts.append(figure_html(png, "brain mask contour", caption,
                             data_testid=f"mask-qc-{'native' if native else 'other'}-{sid}"))
    else:
        parts.append('<p class="muted">Brain-mask QC not available.</p>')
    # Registration edges.
    png = given["registration_png"]
    if png is None and pre is not None:
        tpl = _template(outs.res)
        if tpl is not None and tpl.t1.shape == pre.shape:
            png = figures.registration_edges(pre, tpl.t1, template_mask=tpl.mask,
                                             scale=level.qc_scale, n_slices=5)
            pngs[figs_dir / f"{sid}_desc-registration_qc.png"] = png
    if png is not None:
        parts.append(figure_html(png, "registration edges",
                             "Template edges (red) over the registered image: edges should "
                             "follow the brain outline, ventricles and major sulci."))
    else:
        parts.append('<p class="muted">Registration QC not available.</p>')
    return "\n".join(parts)


def _template(res: int):
    try:
        from ..core.templates import load_template

        return load_template(res)
    except Exception as exc:  # noqa: BLE001 - QC figure is optional
        log.warning("template not available for the registration QC figure: %s", exc)
        return None


def _existing_png(output_dir: Path, rel: Any) -> bytes | None:
    """Bytes of a PNG given relative to OUTPUT_DIR (must stay inside it), else None."""
    if is_missing(rel) or not isinstance(rel, str):
        return None
    root = output_dir.resolve()
    path = (output_dir / rel).resolve()
    if root != path and root not in path.parents:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data.startswith(_PNG_MAGIC) and len(data) < 2 * 1024 * 1024 else None
