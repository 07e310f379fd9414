"""Preprocessing on the real shared datasets: brain-mask and registration quality, speed.

    python benchmarks/preprocessing.py [--datasets ixi-t1 nichart brats2015 openms] [--limit N]

Per subject: Dice of our brain mask against the dataset's reference mask (DLMUSE for IXI and
NiChart, the provided mask for BraTS, the non-zero support for open MS data), Dice of the
registered brain mask against the template brain mask, the brain-extraction route taken and
per-stage times. Then the median time per subject, a warm re-run through the nipype cache,
and peak memory. Threads: 1 per subject (what a nipype node gets with --nprocs 2).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nb
import numpy as np
from _common import DATA, dice, peak_rss_mb, print_table

REFERENCE = {
    "ixi-t1": "derivatives/dlmuse/sub-{s}/anat/sub-{s}_desc-brain_mask.nii.gz",
    "nichart": "derivatives/dlmuse/sub-{s}/anat/sub-{s}_desc-brain_mask.nii.gz",
    "brats2015": "derivatives/manual/sub-{s}/anat/sub-{s}_desc-brain_mask.nii.gz",
    "openms": None,  # skull-stripped, background 0: the reference is the non-zero support
}
T1W = {"brats2015": "sub-{s}/anat/sub-{s}_ce-gadolinium_T1w.nii.gz"}


def subjects(ds: Path) -> list[str]:
    return sorted(p.name[4:] for p in ds.glob("sub-*") if p.is_dir())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["ixi-t1", "nichart", "brats2015", "openms"])
    ap.add_argument("--limit", type=int, default=0, help="subjects per dataset (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warm", type=int, default=4,
                    help="IXI subjects for the nipype cold/warm re-run timing (0: skip)")
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"shared data not found at {DATA}")

    from bids_anomaly.core.config import PreprocConfig
    from bids_anomaly.core.templates import load_template
    from bids_anomaly.preprocessing.pipeline import preprocess_scan

    template = load_template(2)
    rows, times = [], []
    tmp = Path(tempfile.mkdtemp(prefix="bench-preproc-"))
    for name in args.datasets:
        ds = DATA / name
        subs = subjects(ds)[: args.limit or None]
        for s in subs:
            t1 = ds / T1W.get(name, "sub-{s}/anat/sub-{s}_T1w.nii.gz").format(s=s)
            t = time.perf_counter()
            try:
                res = preprocess_scan({"T1w": str(t1)}, tmp / name / s, PreprocConfig(),
                                      threads=args.threads)
            except Exception as exc:  # report and continue
                rows.append({"dataset": name, "subject": s, "route": f"FAILED: {exc}"})
                continue
            dt = time.perf_counter() - t
            times.append(dt)
            ours = np.asarray(nb.load(res.native_brain_mask).dataobj) > 0
            ref_rel = REFERENCE[name]
            if ref_rel:
                ref = np.asarray(nb.load(ds / ref_rel.format(s=s)).dataobj) > 0
            else:
                data = np.asarray(nb.load(t1).dataobj)
                ref = data != 0
            tmask = np.asarray(nb.load(res.template_brain_mask).dataobj) > 0
            rows.append({
                "dataset": name, "subject": s, "route": res.brain_extraction,
                "mask_dice": dice(ours, ref), "reg_dice": dice(tmask, template.mask),
                "seconds": dt, **{k: round(v, 2) for k, v in res.timings.items()},
            })
    print_table(rows, ["dataset", "subject", "route", "mask_dice", "reg_dice", "seconds",
                       "brain_mask", "n4", "registration", "resample_normalise"])
    if times:
        print(f"\nmedian seconds per subject ({args.threads} thread): "
              f"{statistics.median(times):.1f} (n={len(times)})")
    for name in args.datasets:
        sel = [r for r in rows if r["dataset"] == name and "mask_dice" in r]
        if sel:
            print(f"{name}: mask Dice min {min(r['mask_dice'] for r in sel):.3f}, "
                  f"registration Dice min {min(r['reg_dice'] for r in sel):.3f}")
    if args.warm:
        warm_rerun(tmp, args.warm)
    print(f"peak memory: {peak_rss_mb():.0f} MiB")
    shutil.rmtree(tmp)


def warm_rerun(tmp: Path, n: int) -> None:
    """The nipype workflow on ``n`` IXI subjects (--nprocs 2), then again from the cache."""
    from bids_anomaly.core.config import ResourceConfig, RunConfig, SelectionConfig
    from bids_anomaly.runner.common import discover, run_preprocessing

    ds = DATA / "ixi-t1"
    labels = tuple(subjects(ds)[:n])
    cfg = RunConfig(bids_dir=ds, output_dir=tmp / "warm-out", work_dir=tmp / "warm-work",
                    selection=SelectionConfig(participant_labels=labels),
                    resources=ResourceConfig(nprocs=2))
    scans = discover(cfg)
    times = []
    for _ in range(2):
        t = time.perf_counter()
        done, failed = run_preprocessing(cfg, scans, "cpu")
        times.append(time.perf_counter() - t)
        assert not failed, failed
    print(f"nipype workflow, {len(scans)} IXI subjects, --nprocs 2: cold {times[0]:.1f} s "
          f"({times[0] / len(scans):.1f} s/subject), warm re-run {times[1]:.2f} s "
          f"({times[1] / len(scans):.2f} s/subject; ratio {times[1] / times[0]:.3f})")


if __name__ == "__main__":
    main()
