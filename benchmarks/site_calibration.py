"""Site adaptation on real scans from another scanner: ``calibrate`` on a few NiChart scans.

    python benchmarks/model_search.py prepare     # once: preprocessed scans in template space
    python benchmarks/site_calibration.py --configs dae+draws4+smooth1 zscore+smooth1 \
        --calibrate 8 --figure docs/site_calibration.png

NiChart (23 older adults, another scanner and protocol than the IXI training cohort, 2 mm,
uint8-quantised) stands in for a new site. A bundle trained by ``model_search.py`` on 8 IXI
brains is re-referenced
(:func:`bids_anomaly.training.recalibrate.recalibrate_bundle`, weights untouched,
as ``bids-anomaly calibrate`` does) to ``--calibrate`` NiChart participants drawn at random; the
others are scored against both references. Measured on them: the shipped mask's observed voxel
FPR (nominal 0.1%) inside the eroded brain away from the white-matter hyperintensities (the
DLWMLS masks, on the FLAIR grid, moved to the T1w by a rigid registration and dilated by 3
voxels), and how many scans are flagged. The calibration scans carry WMH and ageing too: the
new reference describes that site's population, which is what a site's controls are.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from _common import DATA, print_table
from model_search import CACHE, run, wmh_in_template


def measure(cache: Path, config: str, seed: int, n_calib: int) -> list[dict]:
    from scipy import ndimage

    from bids_anomaly.core.templates import load_template
    from bids_anomaly.inference.scoring import score_volume
    from bids_anomaly.models.bundle import load_bundle
    from bids_anomaly.preprocessing.pipeline import PreprocResult, load_volume
    from bids_anomaly.preprocessing.standardise import standardise_for_bundle
    from bids_anomaly.training.recalibrate import ReferenceScan, recalibrate_bundle

    src = cache / "bundles" / f"{config}-s{seed}"
    if not (src / "model.json").exists():
        run(cache, config, seed, threads=2)
    bundle = load_bundle(src)
    subjects = sorted(d.name for d in (cache / "preproc" / "nichart").glob("*")
                      if (d / "preproc.json").exists())
    order = [str(s) for s in np.random.default_rng(seed).permutation(subjects)]
    calib, test = sorted(order[:n_calib]), sorted(order[n_calib:])
    dest = cache / "site-bundles" / f"{config}-s{seed}-nichart{n_calib}"
    if not (dest / "model.json").exists():
        scans = [ReferenceScan(str(cache / "preproc" / "nichart" / s / "preproc.json"), s, s)
                 for s in calib]
        recalibrate_bundle(bundle, scans, dest, dataset="nichart")
    site = load_bundle(dest)
    template = load_template(2)
    rows = []
    for s in test:
        vol, brain = load_volume(PreprocResult.load(cache / "preproc" / "nichart" / s
                                                    / "preproc.json"), ["T1w"])
        wmh = wmh_in_template(cache, s)
        row = {"config": config, "seed": seed, "scan": s, "wmh_ml": float(wmh.sum()) * 8 / 1000}
        for key, b in (("ixi", bundle), ("site", site)):
            res = score_volume(b.model, standardise_for_bundle(vol, brain, b.card), brain,
                               b.calibration, template.affine)
            eroded = ndimage.binary_erosion(brain, iterations=b.calibration.params.erosion)
            away = eroded & ~ndimage.binary_dilation(wmh, iterations=3)
            row[f"fpr_{key}"] = float(res.mask[away].mean())
            row[f"fprall_{key}"] = float(res.mask[eroded].mean())  # WMH included
            row[f"flagged_{key}"] = bool(res.flagged)
        rows.append(row)
    return rows


def figure(rows: list[dict], path: Path) -> None:
    """Per-scan observed FPR against the IXI reference and the site's own (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.6), sharey=True,
                             squeeze=False)
    for ax, config in zip(axes[0], configs):
        rs = [r for r in rows if r["config"] == config]
        floor = 1e-5  # a scan with no flagged voxel is drawn here
        for r in rs:
            ax.plot([0, 1], [max(r["fpr_ixi"], floor), max(r["fpr_site"], floor)], "-o",
                    color="0.6", lw=0.8, ms=3)
        for x, key in ((0, "fpr_ixi"), (1, "fpr_site")):
            ax.plot([x - 0.15, x + 0.15], [max(floor, np.median([r[key] for r in rs]))] * 2,
                    "k-", lw=2)
            zeros = sum(r[key] == 0 for r in rs)
            if zeros:
                ax.annotate(f"{zeros} of {len(rs)}: no voxel flagged", (x, floor),
                            xytext=(0, 8), textcoords="offset points", ha="center", fontsize=8)
        ax.axhline(0.001, color="tab:blue", ls="--", lw=1, label="nominal 0.1%")
        ax.axhline(0.002, color="tab:red", ls=":", lw=1, label="2 × nominal")
        ax.set_yscale("log")
        ax.set_xticks([0, 1], ["IXI reference", "NiChart reference\n(calibrate)"])
        ax.set_xlim(-0.4, 1.4)
        ax.set_title(config, fontsize=10)
    axes[0][0].set_ylabel("observed voxel FPR outside WMH")
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["dae+draws4+smooth1", "zscore+smooth1"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--calibrate", type=int, default=8, help="NiChart scans to calibrate on")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--figure", type=Path, default=None)
    args = ap.parse_args()
    if not (DATA / "nichart").exists():
        raise SystemExit(f"shared data not found at {DATA}")
    if not (args.cache / "preproc" / "nichart").exists():
        raise SystemExit("run `python benchmarks/model_search.py prepare` first")
    rows = [r for c in args.configs for s in args.seeds
            for r in measure(args.cache, c, s, args.calibrate)]
    summary = []
    for c in args.configs:
        rs = [r for r in rows if r["config"] == c]
        summary.append({
            "config": c, "scans": len(rs),
            **{f"{k}_fpr_median": float(np.median([r[f"fpr_{k}"] for r in rs]))
               for k in ("ixi", "site")},
            **{f"{k}_fpr_mean": float(np.mean([r[f"fpr_{k}"] for r in rs]))
               for k in ("ixi", "site")},
            **{f"{k}_fpr_with_wmh": float(np.mean([r[f"fprall_{k}"] for r in rs]))
               for k in ("ixi", "site")},
            **{f"{k}_flagged": f"{sum(r[f'flagged_{k}'] for r in rs)}/{len(rs)}"
               for k in ("ixi", "site")},
        })
    print(f"n: {args.calibrate} NiChart scans calibrate, the other {summary[0]['scans']} are "
          "measured (per seed); FPR = shipped mask (nominal 0.1%) outside dilated WMH")
    print_table(summary, list(summary[0]))
    print(json.dumps(rows))
    if args.figure:
        figure(rows, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
