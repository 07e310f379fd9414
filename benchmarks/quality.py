"""Anomaly-detection quality on real scans: every model next to zscore and plain intensity.

    python benchmarks/quality.py [--models dae zscore] [--seeds 0 1 2] [--minutes M]
                                 [--model-config JSON] [--out DIR]
                                 [--held-out IXI049 IXI051 ...]

Trains on ../shared/data/ixi-t1 leaving two subjects out (--held-out), then scores
  * ixi-lesion: the two held-out IXI scans with synthetic lesions (DESIGN.md recipe) and
    unmodified copies of them as healthy controls (empty masks);
  * openms: the MS patient's T1w (manual lesion mask);
  * brats2015: contrast-enhanced T1w of six gliomas (note the contrast shift: the model never
    saw gadolinium) with the manual whole-tumour masks;
  * shift: the held-out IXI scans changed as another scanner or protocol would change them
    (``_shift.scanner_shifts``: contrast, gamma, resolution, noise, bias field, quantisation),
    healthy by construction: the shipped mask's observed FPR and the flags on them;
  * nichart (scan level only: its WMH masks lie on the FLAIR grid, not the T1w grid).
Each model is trained as ``bids-anomaly train`` trains it (its defaults, or ``--minutes``),
once per ``--seeds``; every figure is the mean ± sd over seeds. Prints one table: pooled
voxel AUROC / AUPRC / oracle Dice / Dice at the calibrated 1% and 0.1% FPR thresholds, the
observed FPR on healthy held-out (and shifted) scans, and scan-level AUROC, for each model and
for a plain-intensity baseline (robust z of the native intensity inside the brain; dark and
bright), all from the same run.

How many scans each figure rests on is printed beside it (n_healthy / n_lesioned). The
healthy FPR is counted where the statmap is defined: in template space inside the brain mask
eroded as scoring erodes it, the very set the thresholds were calibrated on (see
bids_anomaly/evaluation.py); the eroded rim, where the statmap is 0 by construction, no longer
dilutes it. With the default two held-out IXI subjects it rests on 2 healthy scans.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import nibabel as nb
import numpy as np
from _common import DATA, peak_rss_mb, print_table
from _shift import scanner_shifts

HELD_OUT = ("IXI049", "IXI051")


def _dataset_skeleton(dest: Path, name: str) -> Path:
    """``dest`` as a raw BIDS dataset named ``name`` with an empty labels derivative in it."""
    labels = dest / "derivatives" / "lesions"
    labels.mkdir(parents=True, exist_ok=True)
    (dest / "dataset_description.json").write_text(json.dumps(
        {"Name": name, "BIDSVersion": "1.10.0"}))
    (labels / "dataset_description.json").write_text(json.dumps(
        {"Name": "lesions", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
         "GeneratedBy": [{"Name": "benchmarks/quality.py"}]}))
    return labels


def lesion_copy(src_ds: Path, dest: Path, seed: int = 0,
                held_out: tuple[str, ...] = HELD_OUT) -> Path:
    """A BIDS dataset with the held-out IXI scans, with (sub-<id>les) and without lesions."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    labels = _dataset_skeleton(dest, "IXI held-out with synthetic lesions")
    rows = ["participant_id\tgroup"]
    for sub in held_out:
        img = nb.load(src_ds / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz")
        data = np.asarray(img.dataobj, dtype=np.float32)
        brain = np.asarray(nb.load(
            src_ds / f"derivatives/dlmuse/sub-{sub}/anat/sub-{sub}_desc-brain_mask.nii.gz"
        ).dataobj) > 0
        inner = ndimage.binary_erosion(brain, iterations=8)
        lesioned, mask = data.copy(), np.zeros(data.shape, bool)
        idx = np.indices(data.shape).astype(np.float32)
        for k in range(4):
            c = np.argwhere(inner)[rng.integers(inner.sum())]
            axes = rng.uniform(3, 8, 3)
            r = np.sqrt((((idx - c[:, None, None, None]) / axes[:, None, None, None]) ** 2)
                        .sum(0))
            blob = (r < 1) & brain
            factor = rng.uniform(0.4, 0.7) if k % 2 == 0 else rng.uniform(1.3, 1.6)
            lesioned[blob] *= factor
            mask |= blob
        for label, vol, m in ((f"{sub}les", lesioned, mask), (sub, data, np.zeros_like(mask))):
            out = dest / f"sub-{label}" / "anat"
            out.mkdir(parents=True, exist_ok=True)
            nb.save(nb.Nifti1Image(vol, img.affine, img.header), out / f"sub-{label}_T1w.nii.gz")
            lab = labels / f"sub-{label}" / "anat"
            lab.mkdir(parents=True, exist_ok=True)
            nb.save(nb.Nifti1Image(m.astype(np.uint8), img.affine),
                    lab / f"sub-{label}_label-lesion_mask.nii.gz")
            rows.append(f"sub-{label}\t{'patient' if m.any() else 'control'}")
    (dest / "participants.tsv").write_text("\n".join(rows) + "\n")
    return labels


def shift_copy(src_ds: Path, dest: Path, held_out: tuple[str, ...] = HELD_OUT) -> Path:
    """A BIDS dataset of the held-out IXI scans with scanner shifts (healthy: empty masks)."""
    import re

    rng = np.random.default_rng(0)
    labels = _dataset_skeleton(dest, "IXI held-out with scanner shifts")
    rows = ["participant_id\tgroup"]
    for sub in held_out:
        img = nb.load(src_ds / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz")
        for name, vol in scanner_shifts(np.asarray(img.dataobj, np.float32), rng).items():
            label = f"{sub}{re.sub('[^A-Za-z0-9]', '', name)}"
            for root, data in ((dest, vol.astype(np.float32)),
                               (labels, np.zeros(vol.shape, np.uint8))):
                out = root / f"sub-{label}" / "anat"
                out.mkdir(parents=True, exist_ok=True)
                suffix = "T1w" if root is dest else "label-lesion_mask"
                nb.save(nb.Nifti1Image(data, img.affine), out / f"sub-{label}_{suffix}.nii.gz")
            rows.append(f"sub-{label}\tcontrol")
    (dest / "participants.tsv").write_text("\n".join(rows) + "\n")
    return labels


def intensity_baseline(output_dir: Path, labels_dir: Path, bids_dir: Path, t1_pattern: str):
    """Plain intensity (robust z inside our native brain mask), dark and bright, pooled."""
    from bids_anomaly.evaluation import voxel_metrics

    pooled = {"bright": ([], []), "dark": ([], [])}
    for brain_path in sorted(output_dir.glob("sub-*/anat/sub-*_desc-brain_mask.nii.gz")):
        if "space-" in brain_path.name:
            continue
        sub = brain_path.name.split("_")[0][4:]
        lab = labels_dir / f"sub-{sub}/anat/sub-{sub}_label-lesion_mask.nii.gz"
        if not lab.exists():
            continue
        brain = np.asarray(nb.load(brain_path).dataobj) > 0
        x = np.asarray(nb.load(bids_dir / t1_pattern.format(s=sub)).dataobj, np.float32)
        y = np.asarray(nb.load(lab).dataobj)[brain] > 0
        v = x[brain]
        z = (v - np.median(v)) / (1.4826 * np.median(np.abs(v - np.median(v))) or 1.0)
        for name, s in (("bright", z), ("dark", -z)):
            pooled[name][0].append(s)
            pooled[name][1].append(y)
    out = {}
    for name, (s, y) in pooled.items():
        if s:
            m = voxel_metrics(np.concatenate(s), np.concatenate(y))
            out[f"intensity ({name})"] = m
    return out


def scan_level(scores: Path, model: str) -> dict:
    """Scan-level AUROC of healthy IXI controls vs all lesioned scans, flag counts, and the
    paired IXI comparison (each held-out subject's lesioned copy against its own unmodified
    scan: same scanner and anatomy, so no domain shift can explain the difference)."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    frames = []
    for name in ("ixi-lesion", "openms", "brats2015"):
        f = scores / name / "group_anomaly.tsv"
        if f.exists():
            df = pd.read_csv(f, sep="\t")
            df["lesioned"] = ~((name == "ixi-lesion") & ~df.participant_id.str.endswith("les"))
            frames.append(df[df.status == "ok"])
    df = pd.concat(frames)
    flagged = df.flagged.astype(str).str.lower() == "true"
    y = df.lesioned.to_numpy()
    auroc = float(roc_auc_score(y, df.score)) if 0 < y.sum() < len(y) else float("nan")
    paired, n_pairs = 0, 0
    ixi = scores / "ixi-lesion" / "group_anomaly.tsv"
    if ixi.exists():
        s = pd.read_csv(ixi, sep="\t").query("status == 'ok'").set_index("participant_id").score
        for pid in s.index:
            if not pid.endswith("les") and f"{pid}les" in s.index:
                n_pairs += 1
                paired += int(s[f"{pid}les"] > s[pid])
    return {"method": model, "healthy": int((~y).sum()), "lesioned": int(y.sum()),
            "scan_auroc": auroc, "healthy_flagged": int((flagged & ~y).sum()),
            "lesioned_flagged": int((flagged & y).sum()),
            "ixi_paired": f"{paired}/{n_pairs}"}


def _flag_count(group_table: Path) -> tuple[int, int]:
    import pandas as pd

    df = pd.read_csv(group_table, sep="\t")
    return int((df.flagged.astype(str).str.lower() == "true").sum()), len(df)


def run_seed(args, seed: int, root: Path, datasets: dict, timings: dict) -> tuple[list, list]:
    """Train every model with ``seed``, score every dataset; (metric rows, scan-level rows)."""
    from bids_anomaly.core.config import ResourceConfig, RunConfig, SelectionConfig, TrainConfig
    from bids_anomaly.evaluation import evaluate_outputs
    from bids_anomaly.runner.participant import run_participant
    from bids_anomaly.runner.reports import run_group
    from bids_anomaly.runner.train import run_train

    work = root / "work"  # shared across seeds: each scan is preprocessed once
    models_out = root / f"train-s{seed}"
    res = ResourceConfig(nprocs=args.nprocs)
    ixi = DATA / "ixi-t1"
    train_labels = tuple(p.name[4:] for p in sorted(ixi.glob("sub-*"))
                         if p.name[4:] not in args.held_out)
    for model in args.models:
        if args.reuse_models and (models_out / "models" / model / "model.json").exists():
            continue
        t = time.perf_counter()
        cfg = RunConfig(bids_dir=ixi, output_dir=models_out, work_dir=work,
                        selection=SelectionConfig(participant_labels=train_labels),
                        resources=res, seed=seed)
        mcfg = {} if model == "zscore" else {
            **args.model_config, **({"max_minutes": args.minutes} if args.minutes else {})}
        run_train(cfg, TrainConfig(model_type=model, model_config=mcfg))
        timings[f"train {model} seed {seed}"] = time.perf_counter() - t
    rows, scan_rows = [], []
    for model in args.models:
        outs = {}
        for name, (bids, _labels, filters, _) in datasets.items():
            out = root / "scores" / f"s{seed}" / model / name
            t = time.perf_counter()
            cfg = RunConfig(bids_dir=bids, output_dir=out, work_dir=work,
                            selection=SelectionConfig(bids_filters=filters), resources=res)
            run_participant(cfg, str(models_out / "models" / model))
            run_group(out)
            timings[f"score {model} {name} seed {seed}"] = time.perf_counter() - t
            outs[name] = out
        for name, (_bids, labels, _, _) in datasets.items():
            flagged, n = _flag_count(outs[name] / "group_anomaly.tsv")
            if labels is None:
                import pandas as pd

                df = pd.read_csv(outs[name] / "group_anomaly.tsv", sep="\t")
                rows.append({"dataset": name, "method": model, "n_scans": n,
                             "n_lesioned": n, "mean_pct": float(df.percentile.mean()),
                             "flagged": flagged})
                continue
            ev = evaluate_outputs([outs[name]], labels)
            p = ev.pooled.iloc[0].to_dict()
            n_fpr = int(p.get("n_fpr_template_scans", 0))
            lesioned = int(p["n_pathological"])
            rows.append({"dataset": name, "method": model, "n_scans": int(p["n_scans"]),
                         "n_healthy": int(p["n_healthy"]), "n_lesioned": lesioned,
                         **({"auroc": p["auroc"], "auprc": p["auprc"],
                             "oracle_dice": p["oracle_dice"], "dice@1%": p["dice_fpr0.01"],
                             "dice@0.1%": p["dice_fpr0.001"]} if lesioned else {}),
                         # Pooled over the healthy scans' voxels where the statmap is defined
                         # (template space, eroded brain: the calibration set).
                         "healthy_fpr@1%": p.get("fpr_template_fpr0.01") if n_fpr else None,
                         "healthy_fpr@0.1%": p.get("fpr_template_fpr0.001") if n_fpr else None,
                         "fpr_scans": n_fpr or None,
                         "scan_auroc": p["scan_auroc"] if lesioned else None,
                         **({"flagged": flagged} if not lesioned else {})})
        scan_rows.append(scan_level(root / "scores" / f"s{seed}" / model, model))
    first = args.models[0]
    for name, (bids, labels, _, pattern) in datasets.items():
        if labels is None or name == "shift":
            continue
        for method, m in intensity_baseline(root / "scores" / f"s{seed}" / first / name,
                                            labels, bids, pattern).items():
            rows.append({"dataset": name, "method": method, "auroc": m["auroc"],
                         "auprc": m["auprc"], "oracle_dice": m["oracle_dice"]})
    return rows, scan_rows


COUNTS = {"fpr_scans", "flagged", "healthy", "lesioned", "healthy_flagged", "lesioned_flagged"}


def mean_sd(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """Rows grouped by ``keys``; numbers as mean ± sd over the group (a lone value as is)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        agg = dict(zip(keys, key))
        agg["seeds"] = len(rs)
        for col in dict.fromkeys(c for r in rs for c in r):
            if col in keys:
                continue
            texts = [r[col] for r in rs if isinstance(r.get(col), str)]
            if texts:
                agg[col] = " ".join(texts)
                continue
            vals = [r[col] for r in rs if isinstance(r.get(col), (int, float))
                    and not isinstance(r.get(col), bool) and np.isfinite(r[col])]
            if not vals:
                continue
            agg[col] = (f"{np.mean(vals):.3f}±{np.std(vals):.3f}" if len(vals) > 1
                        else round(float(vals[0]), 4))
            if col.startswith("n_") or col in COUNTS:
                agg[col] = " ".join(str(int(v)) for v in vals) if len(set(vals)) > 1 \
                    else int(vals[0])
        out.append(agg)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["dae", "zscore"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--minutes", type=float, default=None,
                    help="training budget per model (default: the model's own default)")
    ap.add_argument("--model-config", type=json.loads, default={},
                    help="hyper-parameters (JSON) over the learned models' defaults, e.g. "
                         "'{\"views\": [\"axial\", \"coronal\", \"sagittal\"]}'")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bids-anomaly-quality"))
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument("--skip-nichart", action="store_true")
    ap.add_argument("--held-out", nargs="+", default=list(HELD_OUT), metavar="IXI_ID",
                    help="IXI subjects left out of training: the healthy held-out scans (and "
                         "their lesioned and shifted copies) every healthy figure rests on")
    ap.add_argument("--reuse-models", action="store_true",
                    help="keep OUT and skip training for bundles already there")
    args = ap.parse_args()
    args.held_out = tuple(args.held_out)
    if not DATA.exists():
        raise SystemExit(f"shared data not found at {DATA}")

    root = args.out
    if root.exists() and not args.reuse_models:
        shutil.rmtree(root)
    if (root / "scores").exists():
        shutil.rmtree(root / "scores")
    ixi = DATA / "ixi-t1"
    for name in ("ixi-lesion", "shift"):
        if (root / name).exists():
            shutil.rmtree(root / name)
    datasets = {
        "ixi-lesion": (root / "ixi-lesion", lesion_copy(ixi, root / "ixi-lesion",
                                                        held_out=args.held_out), {},
                       "sub-{s}/anat/sub-{s}_T1w.nii.gz"),
        "shift": (root / "shift", shift_copy(ixi, root / "shift", args.held_out), {},
                  "sub-{s}/anat/sub-{s}_T1w.nii.gz"),
        "openms": (DATA / "openms", DATA / "openms/derivatives/manual", {},
                   "sub-{s}/anat/sub-{s}_T1w.nii.gz"),
        "brats2015": (DATA / "brats2015", DATA / "brats2015/derivatives/manual",
                      {"T1w": {"ceagent": "gadolinium"}},
                      "sub-{s}/anat/sub-{s}_ce-gadolinium_T1w.nii.gz"),
    }
    if not args.skip_nichart:
        datasets["nichart"] = (DATA / "nichart", None, {}, "sub-{s}/anat/sub-{s}_T1w.nii.gz")
    timings: dict[str, float] = {}
    rows, scan_rows = [], []
    for seed in args.seeds:
        r, sr = run_seed(args, seed, root, datasets, timings)
        rows += r
        scan_rows += sr
    rows = sorted(mean_sd(rows, ("dataset", "method")),
                  key=lambda r: (r["dataset"], r["method"]))
    print(f"mean ± sd over seeds {args.seeds}")
    print_table(rows, ["dataset", "method", "seeds", "n_scans", "n_healthy", "n_lesioned",
                       "auroc", "auprc", "oracle_dice", "dice@1%", "dice@0.1%",
                       "healthy_fpr@1%", "healthy_fpr@0.1%", "fpr_scans", "scan_auroc",
                       "mean_pct", "flagged"])
    print()
    print(f"healthy_fpr: observed voxel FPR pooled over the healthy scans of that dataset "
          f"(fpr_scans: the {len(args.held_out)} held-out IXI scans for ixi-lesion, their "
          "shifted copies for shift), template space, inside the brain mask eroded as scoring "
          "erodes it (where the statmap is defined: the set the thresholds were calibrated "
          "on). flagged: scans above the bundle's 95th healthy percentile. Per-dataset "
          "scan_auroc: n_healthy against n_lesioned scans of that dataset.")
    print()
    scan_rows = mean_sd(scan_rows, ("method",))
    print("Scan level: held-out healthy IXI scans against every lesioned scan (IXI + "
          "synthetic lesions, openms, brats2015); flagged = above the bundle's 95th healthy "
          "percentile. Caveats: with n healthy scans the AUROC moves in steps of "
          "1/(n x lesioned); the openms and brats2015 scans differ from IXI in scanner, "
          "resolution and contrast as well as in pathology. ixi_paired: lesioned copies "
          "scoring above their own unmodified scan (same scanner and anatomy).")
    print_table(scan_rows, ["method", "seeds", "healthy", "lesioned", "scan_auroc",
                            "ixi_paired", "healthy_flagged", "lesioned_flagged"])
    print()
    for k, v in timings.items():
        print(f"{k}: {v:.0f} s")
    print(f"peak memory: {peak_rss_mb():.0f} MiB")


if __name__ == "__main__":
    main()
