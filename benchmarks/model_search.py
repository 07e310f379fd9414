"""Model search in template space: one change at a time, several seeds, the zscore baseline.

    python benchmarks/model_search.py prepare              # preprocess every scan once
    python benchmarks/model_search.py wmh                  # NiChart's WMH in template space
    python benchmarks/model_search.py run --configs zscore dae --seeds 0 1 2
    python benchmarks/model_search.py table                # mean ± sd over seeds
    python benchmarks/model_search.py folds --configs dae+draws4+smooth1 --seeds 0

Each configuration is trained exactly as ``bids-anomaly train`` trains (``fit_bundle``:
k-fold out-of-fold reference + the shipped model) on eight IXI participants; the other two
never take part in training and carry the measurements:

* ``ixi-lesion``: the two held-out scans with synthetic ellipsoid lesions inserted in template
  space (dark ×0.4–0.7 and bright ×1.3–1.6, several draws per scan);
* ``brats2015`` (contrast-enhanced T1w, gliomas) and ``openms`` (T1w, MS): real lesions, labels
  moved to template space with each scan's own transform;
* ``healthy``: the two held-out scans as they are (same scanner);
* ``shift``: the two held-out scans with what differs between scanners and is not disease —
  gamma contrast warps, through-plane blur (thick slices), in-plane resolution loss, more noise,
  a bias field — each run through the whole preprocessing. For measuring only: never trained
  or calibrated on.

Reported per configuration (mean ± sd over seeds): pooled voxel AUPRC inside the brain per
lesion dataset, Dice of the shipped mask (nominal voxel FPR 0.1%), the shipped mask's observed
FPR on healthy and shifted scans, and how many of them are flagged. Everything is in template
space at 2 mm, which is what the models see; ``benchmarks/quality.py`` measures the whole
pipeline in native space.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nb
import numpy as np
from _common import DATA, print_table
from _shift import scanner_shifts

HELD_OUT = ("IXI049", "IXI051")
CACHE = Path("/tmp/bids-anomaly-model-search")
FOLDS = 4
# Every configuration starts from the dae as it was before the search (2D slices, clean
# input at inference, the ±10% bias field), so a name keeps its meaning when defaults change.
DAE = {"epochs": 20, "patience": 20, "max_minutes": 60.0, "infer_draws": 0, "context": 0,
       "aug_bias": 0.1}

# The dae's current default (dae+ctx1+bias3+csfl04+local8), what the multi-view rows build on.
_DEFAULT = {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3}
_DEFAULT_SCORING = {"smooth_sigma": 1.0, "csf_weight": 0.5, "csf_level": 0.4,
                    "local_baseline_sigma": 8.0}
_VIEWS = ("axial", "coronal", "sagittal")

# name → (model type, hyper-parameters, scoring parameters). One change at a time against
# "dae" (and "zscore" for the per-scan baseline, which is the statmap's, not the model's).
CONFIGS: dict[str, tuple[str, dict, dict]] = {
    "zscore": ("zscore", {}, {}),
    "zscore+baseline": ("zscore", {}, {"scan_baseline": True}),
    "dae": ("dae", dict(DAE), {}),
    "dae+baseline": ("dae", dict(DAE), {"scan_baseline": True}),
    "dae+noskip": ("dae", {**DAE, "skip_dropout": 1.0}, {}),
    "dae+skipdrop": ("dae", {**DAE, "skip_dropout": 0.5}, {}),
    "dae+anomalies": ("dae", {**DAE, "anomaly_p": 0.5}, {}),
    "dae+domain": ("dae", {**DAE, "aug_contrast": 0.1, "aug_blur": 1.0}, {}),
    "dae+anomalies+baseline": ("dae", {**DAE, "anomaly_p": 0.5}, {"scan_baseline": True}),
    "dae+noskip+baseline": ("dae", {**DAE, "skip_dropout": 1.0}, {"scan_baseline": True}),
    "dae+noskip+anomalies+baseline": ("dae", {**DAE, "skip_dropout": 1.0, "anomaly_p": 0.5},
                                      {"scan_baseline": True}),
    "dae+anomalies+domain": ("dae", {**DAE, "anomaly_p": 0.5, "aug_contrast": 0.1,
                                     "aug_blur": 1.0}, {}),
    # Inference-time corruption (the default dae's networks, reconstructions averaged over
    # noisy copies of the scan): trained once, shared through the checkpoints.
    "dae+draws4": ("dae", {**DAE, "infer_draws": 4}, {}),
    "dae+draws8": ("dae", {**DAE, "infer_draws": 8}, {}),
    "dae+draws4+half": ("dae", {**DAE, "infer_draws": 4, "infer_noise": 0.5}, {}),
    "dae+domain+draws4": ("dae", {**DAE, "aug_contrast": 0.1, "aug_blur": 1.0,
                                  "infer_draws": 4}, {}),
    "dae+domain2+draws4": ("dae", {**DAE, "aug_contrast": 0.2, "aug_blur": 1.5,
                                   "infer_draws": 4}, {}),
    "dae40+draws4": ("dae", {**DAE, "epochs": 40, "patience": 40, "infer_draws": 4}, {}),
    "dae+multiscale+draws4": ("dae", {**DAE, "noise_scales": [4, 8, 16], "infer_draws": 6},
                              {}),
    "dae+coarse16+draws4": ("dae", {**DAE, "noise_scale": 16, "infer_draws": 4}, {}),
    # Post-processing: Gaussian smoothing of the statmap (both models alike).
    "zscore+smooth1": ("zscore", {}, {"smooth_sigma": 1.0}),
    "zscore+smooth2": ("zscore", {}, {"smooth_sigma": 2.0}),
    "dae+draws4+smooth1": ("dae", {**DAE, "infer_draws": 4}, {"smooth_sigma": 1.0}),
    "dae+draws4+smooth2": ("dae", {**DAE, "infer_draws": 4}, {"smooth_sigma": 2.0}),
    # 2.5D: neighbouring slices as channels (same noise on them), on top of the default.
    "dae+ctx1": ("dae", {**DAE, "infer_draws": 4, "context": 1}, {"smooth_sigma": 1.0}),
    "dae+ctx2": ("dae", {**DAE, "infer_draws": 4, "context": 2}, {"smooth_sigma": 1.0}),
    # The default since the search: 2.5D, 4 draws, a ±30% bias field, σ 1.
    "dae+ctx1+bias3": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3},
                       {"smooth_sigma": 1.0}),
    # Wider smoothing of the default's statmap (the trained networks are shared).
    "dae+ctx1+bias3+smooth15": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3},
                                {"smooth_sigma": 1.5}),
    "dae+ctx1+bias3+smooth2": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3},
                               {"smooth_sigma": 2.0}),
    "zscore+smooth15": ("zscore", {}, {"smooth_sigma": 1.5}),
    # The default's inference noise (what the draws put on the scan) weaker and stronger.
    "dae+ctx1+bias3+inoise07": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3,
                                        "infer_noise": 0.7}, {"smooth_sigma": 1.0}),
    "dae+ctx1+bias3+inoise15": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3,
                                        "infer_noise": 1.5}, {"smooth_sigma": 1.0}),
    # The default trained with stronger coarse noise (std 0.8 instead of 0.5).
    "dae+ctx1+bias3+noise08": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3,
                                       "noise_std": 0.8}, {"smooth_sigma": 1.0}),
    # A 5x5x5 median instead of 3x3x3 (thin bright or dark lines, such as enhancing vessels
    # and sulci, vanish; blobs stay), for the default and for zscore.
    "dae+ctx1+bias3+median5": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3},
                               {"smooth_sigma": 1.0, "median_size": 5}),
    "zscore+median5": ("zscore", {}, {"smooth_sigma": 1.0, "median_size": 5}),
    # The default trained to restore synthetic anomalies (half the slices get one).
    "dae+ctx1+bias3+anomalies": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3,
                                         "anomaly_p": 0.5}, {"smooth_sigma": 1.0}),
    # The default trained with local expansions/contractions and a gentle elastic field
    # (ventricle and sulcus size, displaced anatomy: what an affine registration leaves).
    "dae+ctx1+bias3+warp4": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3,
                                     "aug_warp": 0.4}, {"smooth_sigma": 1.0}),
    # The default with its top skip kept at half (channel dropout 0.5 instead of removed).
    "dae+ctx1+bias3+skip05": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3,
                                      "skip_dropout": 0.5}, {"smooth_sigma": 1.0}),
    # The default with finer noise (1/4 of the slice grid instead of 1/8).
    "dae+ctx1+bias3+scale4": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3,
                                      "noise_scale": 4}, {"smooth_sigma": 1.0}),
    # CSF-dark voxels (the darkest tenth of the brain) at half weight in the raw map, for the
    # default and for zscore (scoring only: the trained networks are shared).
    "dae+ctx1+bias3+csfw05": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3},
                              {"smooth_sigma": 1.0, "csf_weight": 0.5}),
    "zscore+smooth1+csfw05": ("zscore", {}, {"smooth_sigma": 1.0, "csf_weight": 0.5}),
    # The CSF weighting with the signed z's slowly varying part removed (shading left by N4:
    # a Gaussian of 8 or 12 voxels of z clipped to ±1), scoring only.
    "dae+ctx1+bias3+csfw05+local8": ("dae", {**DAE, "infer_draws": 4, "context": 1,
                                             "aug_bias": 0.3},
                                     {"smooth_sigma": 1.0, "csf_weight": 0.5,
                                      "local_baseline_sigma": 8.0}),
    "dae+ctx1+bias3+csfw05+local12": ("dae", {**DAE, "infer_draws": 4, "context": 1,
                                              "aug_bias": 0.3},
                                      {"smooth_sigma": 1.0, "csf_weight": 0.5,
                                       "local_baseline_sigma": 12.0}),
    "dae+ctx1+bias3+csfw05+local8+smooth2": ("dae", {**DAE, "infer_draws": 4, "context": 1,
                                                     "aug_bias": 0.3},
                                             {"smooth_sigma": 2.0, "csf_weight": 0.5,
                                              "local_baseline_sigma": 8.0}),
    "zscore+smooth2+csfw05+local8": ("zscore", {}, {"smooth_sigma": 2.0, "csf_weight": 0.5,
                                                     "local_baseline_sigma": 8.0}),
    "dae+ctx1+bias3+csfl04+local8": ("dae", {**DAE, "infer_draws": 4, "context": 1,
                                             "aug_bias": 0.3},
                                     {"smooth_sigma": 1.0, "csf_weight": 0.5, "csf_level": 0.4,
                                      "local_baseline_sigma": 8.0}),
    "zscore+smooth1+csfl04+local8": ("zscore", {}, {"smooth_sigma": 1.0, "csf_weight": 0.5,
                                                     "csf_level": 0.4,
                                                     "local_baseline_sigma": 8.0}),
    "zscore+smooth1+csfw05+local8": ("zscore", {}, {"smooth_sigma": 1.0, "csf_weight": 0.5,
                                                     "local_baseline_sigma": 8.0}),
    # The dae's default with CSF-dark voxels at three quarters instead of half.
    "dae+ctx1+bias3+csfl04w075+local8": ("dae", {**DAE, "infer_draws": 4, "context": 1,
                                                 "aug_bias": 0.3},
                                         {"smooth_sigma": 1.0, "csf_weight": 0.75,
                                          "csf_level": 0.4, "local_baseline_sigma": 8.0}),
    # The dae's default with three networks, one per slice orientation (axial, coronal,
    # sagittal), reconstructions averaged; the axial one is the default's own network.
    "dae+ctx1+bias3+csfl04+local8+views3": ("dae", {**_DEFAULT, "views": list(_VIEWS)},
                                            dict(_DEFAULT_SCORING)),
    # The same networks, the views' reconstructions combined by their median, or by the one
    # nearest the scan at each voxel.
    **{f"dae+ctx1+bias3+csfl04+local8+views3{how}": (
        "dae", {**_DEFAULT, "views": list(_VIEWS), "view_combine": how},
        dict(_DEFAULT_SCORING)) for how in ("median", "closest")},
    # Two views: which one lifts the synthetic lesions and which one costs BraTS.
    **{f"dae+ctx1+bias3+csfl04+local8+{view}": (
        "dae", {**_DEFAULT, "views": ["axial", view]}, dict(_DEFAULT_SCORING))
       for view in ("coronal", "sagittal")},
    # The default one level deeper (bottleneck at 1/16 instead of 1/8).
    "dae+ctx1+bias3+deep5": ("dae", {**DAE, "infer_draws": 4, "context": 1, "aug_bias": 0.3,
                                     "channels": [16, 32, 64, 128, 256],
                                     "strides": [2, 2, 2, 2]}, {"smooth_sigma": 1.0}),
}


def _train_key(model_type: str, config: dict) -> str:
    """Configurations that differ only in how the trained networks are used share training
    (through resumable checkpoints); a multi-view model shares its axial networks with the
    single-view one (its other views have checkpoints of their own)."""
    from bids_anomaly.models.trainer import INFERENCE_HPARAMS, STOPPING_HPARAMS

    kept = {k: v for k, v in sorted(config.items())
            if k not in (*STOPPING_HPARAMS, *INFERENCE_HPARAMS, "views")}
    return f"{model_type}-{zlib.crc32(json.dumps(kept).encode()):08x}"


def _jobs(cache: Path) -> list[tuple[str, str, dict, str | None]]:
    """(group, scan name, files, native label path) for every scan to preprocess."""
    ixi, jobs = DATA / "ixi-t1", []
    for sub in sorted(p.name[4:] for p in ixi.glob("sub-*")):
        jobs.append(("ixi", sub, {"T1w": str(ixi / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz")}, None))
    brats = DATA / "brats2015"
    for p in sorted(brats.glob("sub-*")):
        s = p.name
        jobs.append(("brats2015", s[4:], {"T1w": str(p / f"anat/{s}_ce-gadolinium_T1w.nii.gz")},
                     str(brats / f"derivatives/manual/{s}/anat/{s}_label-lesion_mask.nii.gz")))
    ms = DATA / "openms"
    jobs.append(("openms", "msp07", {"T1w": str(ms / "sub-msp07/anat/sub-msp07_T1w.nii.gz")},
                 str(ms / "derivatives/manual/sub-msp07/anat/sub-msp07_label-lesion_mask.nii.gz")))
    nichart = DATA / "nichart"
    for p in sorted(nichart.glob("sub-*")):
        s = p.name
        jobs.append(("nichart", s[4:], {"T1w": str(p / f"anat/{s}_T1w.nii.gz")}, None))
    shifted = cache / "shifted"
    shifted.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for sub in HELD_OUT:
        img = nb.load(ixi / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz")
        for name, data in scanner_shifts(np.asarray(img.dataobj, np.float32), rng).items():
            path = shifted / f"{sub}_{name}_T1w.nii.gz"
            if not path.exists():
                nb.save(nb.Nifti1Image(data.astype(np.float32), img.affine), path)
            jobs.append(("shift", f"{sub}-{name}", {"T1w": str(path)}, None))
    return jobs


def _prepare_one(job, cache: Path) -> str:
    from bids_anomaly.core.config import PreprocConfig
    from bids_anomaly.core.templates import load_template
    from bids_anomaly.preprocessing.pipeline import PreprocResult, preprocess_scan
    from bids_anomaly.preprocessing.registration import to_template

    group, name, files, label = job
    out = cache / "preproc" / group / name
    if (out / "preproc.json").exists() and (not label or (out / "label.nii.gz").exists()):
        return f"{group}/{name}: cached"
    t = time.perf_counter()
    res = preprocess_scan(files, out, PreprocConfig(), threads=1, seed=0)
    res.save(out / "preproc.json")
    if label:
        template = load_template(2)
        (out / "tmp").mkdir(exist_ok=True)
        lab = to_template(nb.load(label), template, [res.xfm], out / "tmp", "linear")
        nb.save(nb.Nifti1Image((lab > 0.5).astype(np.uint8), template.affine),
                out / "label.nii.gz")
        shutil.rmtree(out / "tmp", ignore_errors=True)
    PreprocResult.load(out / "preproc.json")
    return f"{group}/{name}: {time.perf_counter() - t:.0f} s"


def prepare(cache: Path, procs: int) -> None:
    jobs = _jobs(cache)
    with ProcessPoolExecutor(procs) as pool:
        for msg in pool.map(_prepare_one, jobs, [cache] * len(jobs)):
            print(msg, flush=True)


def _wmh_path(cache: Path, subject: str) -> Path:
    return cache / "preproc" / "nichart" / subject / "wmh.nii.gz"


def wmh_in_template(cache: Path, subject: str) -> np.ndarray:
    """NiChart's WMH mask (DLWMLS, on the FLAIR grid) on the template grid: the FLAIR
    registered rigidly to the subject's T1w (ANTs), then the T1w's own transform (cached
    beside its preprocessing)."""
    from bids_anomaly.core.templates import load_template
    from bids_anomaly.preprocessing.pipeline import PreprocResult
    from bids_anomaly.preprocessing.registration import to_template

    out = cache / "preproc" / "nichart" / subject
    path = _wmh_path(cache, subject)
    if not path.exists():
        import ants

        res = PreprocResult.load(out / "preproc.json")
        anat = DATA / "nichart" / f"sub-{subject}" / "anat"
        label = (DATA / "nichart" / "derivatives" / "dlwmls" / f"sub-{subject}" / "anat"
                 / f"sub-{subject}_label-lesion_mask.nii.gz")
        work = out / "wmh_tmp"
        work.mkdir(exist_ok=True)
        fixed = ants.image_read(res.native_ref)
        flair = ants.image_read(str(anat / f"sub-{subject}_FLAIR.nii.gz"))
        reg = ants.registration(fixed=fixed, moving=flair, type_of_transform="Rigid",
                                outprefix=str(work / "flair2t1_"), random_seed=0)
        template = load_template(2)
        # antsApplyTransforms order: the last acts first (FLAIR -> T1w -> template).
        data = to_template(nb.load(label), template, [res.xfm, *reg["fwdtransforms"]], work,
                           "linear")
        nb.save(nb.Nifti1Image((data > 0.5).astype(np.uint8), template.affine), path)
        shutil.rmtree(work, ignore_errors=True)
    return np.asarray(nb.load(path).dataobj) > 0


def _wmh_one(subject: str, cache: Path) -> str:
    return f"{subject}: {int(wmh_in_template(cache, subject).sum()) * 8 / 1000:.1f} mL of WMH"


def wmh(cache: Path, procs: int) -> None:
    """Every NiChart subject's WMH mask on the template grid (``nichart-outside`` in ``run``)."""
    subjects = sorted(d.name for d in (cache / "preproc" / "nichart").glob("*")
                      if (d / "preproc.json").exists())
    with ProcessPoolExecutor(procs) as pool:
        for msg in pool.map(_wmh_one, subjects, [cache] * len(subjects)):
            print(msg, flush=True)


def _lesioned(volume: np.ndarray, brain: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Four ellipsoid lesions (two dark, two bright) deep in the brain, template space."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(brain, iterations=6)
    idx = np.indices(brain.shape).astype(np.float32)
    out, mask = volume.copy(), np.zeros(brain.shape, bool)
    for k in range(4):
        c = np.argwhere(inner)[rng.integers(inner.sum())]
        axes = rng.uniform(2.5, 6, 3)
        r = np.sqrt((((idx - c[:, None, None, None]) / axes[:, None, None, None]) ** 2).sum(0))
        blob = (r < 1) & brain
        out[:, blob] *= rng.uniform(0.4, 0.7) if k % 2 == 0 else rng.uniform(1.3, 1.6)
        mask |= blob
    return out, mask


def _eval_scans(cache: Path):
    """(group, name, volume (C,X,Y,Z) stage 1, brain, label or None) for every measured scan."""
    from bids_anomaly.preprocessing.pipeline import PreprocResult, load_volume

    for group in ("ixi", "brats2015", "openms", "shift", "nichart"):
        for d in sorted((cache / "preproc" / group).glob("*")):
            if (group == "ixi" and d.name not in HELD_OUT) or not (d / "preproc.json").exists():
                continue
            vol, brain = load_volume(PreprocResult.load(d / "preproc.json"), ["T1w"])
            label = (np.asarray(nb.load(d / "label.nii.gz").dataobj) > 0) \
                if (d / "label.nii.gz").exists() else None
            if group == "ixi":
                yield "healthy", d.name, vol, brain, None
                rng = np.random.default_rng(zlib.crc32(d.name.encode()))
                for draw in range(3):
                    les, m = _lesioned(vol, brain, rng)
                    yield "ixi-lesion", f"{d.name}-{draw}", les, brain, m
            else:
                yield group, d.name, vol, brain, label


def run(cache: Path, name: str, seed: int, threads: int) -> dict:
    import torch
    from scipy import ndimage

    from bids_anomaly.core.config import PreprocConfig
    from bids_anomaly.core.templates import load_template
    from bids_anomaly.evaluation import voxel_metrics
    from bids_anomaly.inference.scoring import score_volume
    from bids_anomaly.models.bundle import load_bundle
    from bids_anomaly.preprocessing.standardise import standardise_for_bundle
    from bids_anomaly.training.fit import FitInputs, fit_bundle

    torch.set_num_threads(threads)
    model_type, config, scoring = CONFIGS[name]
    train = sorted(d.name for d in (cache / "preproc" / "ixi").glob("*") if d.name not in HELD_OUT)
    inputs = FitInputs(
        preproc_jsons=[str(cache / "preproc" / "ixi" / s / "preproc.json") for s in train],
        subjects=train, scan_ids=train, contrasts=["T1w"], model_type=model_type,
        model_name=name, model_config=config, preproc=PreprocConfig().to_dict(), folds=FOLDS,
        dataset="ixi-t1", seed=seed, device="cpu", threads=threads,
        checkpoint=str(cache / "checkpoints" / f"{_train_key(model_type, config)}-s{seed}"
                       / "model.pt"),
        # No CSF weighting unless a configuration asks (zscore's default since csfw05), so
        # that a name keeps its meaning.
        resume=True, scoring={"csf_weight": 1.0, **scoring})
    t = time.perf_counter()
    dest = cache / "bundles" / f"{name}-s{seed}"
    if (dest / "model.json").exists():  # trained by an earlier run: measure it again
        train_s = json.loads((dest / "model.json").read_text())["training"]["seconds"]
    else:
        fit_bundle(inputs, dest)
        train_s = time.perf_counter() - t
    bundle = load_bundle(dest)
    template = load_template(2)
    pooled: dict[str, tuple[list, list]] = {}
    dice_num: dict[str, float] = {}
    dice_den: dict[str, float] = {}
    fpr: dict[str, list[float]] = {}
    flagged: dict[str, list[bool]] = {}
    flagged_scans: list[str] = []
    for group, scan, vol, brain, label in _eval_scans(cache):
        std = standardise_for_bundle(vol, brain, bundle.card)
        res = score_volume(bundle.model, std, brain, bundle.calibration, template.affine)
        if label is None:
            eroded = ndimage.binary_erosion(brain, iterations=bundle.calibration.params.erosion)
            fpr.setdefault(group, []).append(float(res.mask[eroded].mean()))
            if group == "nichart" and _wmh_path(cache, scan).exists():  # 3 voxels from WMH
                away = eroded & ~ndimage.binary_dilation(wmh_in_template(cache, scan),
                                                         iterations=3)
                fpr.setdefault("nichart-outside", []).append(float(res.mask[away].mean()))
            flagged.setdefault(group, []).append(bool(res.flagged))
            if res.flagged and group in ("healthy", "shift"):
                flagged_scans.append(scan)
            continue
        # Another scanner's tissue away from its lesions (3 voxels of margin).
        eroded = ndimage.binary_erosion(brain, iterations=bundle.calibration.params.erosion)
        away = eroded & ~ndimage.binary_dilation(label, iterations=3)
        fpr.setdefault(f"{group}-outside", []).append(float(res.mask[away].mean()))
        s, y = pooled.setdefault(group, ([], []))
        s.append(res.statmap[brain])
        y.append(label[brain])
        dice_num[group] = dice_num.get(group, 0.0) + 2.0 * float((res.mask & label).sum())
        dice_den[group] = dice_den.get(group, 0.0) + float(res.mask.sum() + label.sum())
    row = {"config": name, "seed": seed, "train_s": round(train_s, 1),
           "mask_fpr_calibration": bundle.calibration.mask_fpr.get("0.001"),
           "flagged_healthy_scans": flagged_scans}
    for group, (s, y) in pooled.items():
        m = voxel_metrics(np.concatenate(s), np.concatenate(y))
        row[f"{group}_auprc"] = m["auprc"]
        row[f"{group}_dice"] = dice_num[group] / max(1.0, dice_den[group])
    for group in fpr:
        row[f"{group}_fpr"] = float(np.mean(fpr[group]))
        if group in flagged:
            row[f"{group}_flagged"] = f"{sum(flagged[group])}/{len(flagged[group])}"
    with open(cache / "results.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def combine(cache: Path, names: list[str], seed: int) -> dict:
    """Pooled voxel AUPRC of each configuration's statmap and of their mean (an ensemble of
    statmaps; thresholds are not recalibrated, so only the ranking metric is reported)."""
    from bids_anomaly.core.templates import load_template
    from bids_anomaly.evaluation import voxel_metrics
    from bids_anomaly.inference.scoring import score_volume
    from bids_anomaly.models.bundle import load_bundle
    from bids_anomaly.preprocessing.standardise import standardise_for_bundle

    bundles = [load_bundle(cache / "bundles" / f"{n}-s{seed}") for n in names]
    template = load_template(2)
    pooled: dict[str, dict[str, tuple[list, list]]] = {}
    for group, _scan, vol, brain, label in _eval_scans(cache):
        if label is None:
            continue
        maps = [score_volume(b.model, standardise_for_bundle(vol, brain, b.card), brain,
                             b.calibration, template.affine).statmap[brain] for b in bundles]
        for key, m in [*zip(names, maps), ("mean", np.mean(maps, axis=0))]:
            s, y = pooled.setdefault(group, {}).setdefault(key, ([], []))
            s.append(m)
            y.append(label[brain])
    row = {"combine": names, "seed": seed}
    for group, by in pooled.items():
        for key, (s, y) in by.items():
            row[f"{group}_auprc[{key}]"] = round(
                voxel_metrics(np.concatenate(s), np.concatenate(y))["auprc"], 4)
    return row


class _MeanReconstruction:
    """An ensemble: the mean of its members' reconstructions."""

    def __init__(self, members):
        self.members = members

    def reconstruct(self, volume, mask, device="cpu"):
        return np.mean([m.reconstruct(volume, mask, device=device) for m in self.members], 0)


def folds(cache: Path, name: str, seed: int, draws: int) -> dict:
    """Pooled voxel AUPRC of the shipped model next to an ensemble of the fold models and the
    shipped one (mean reconstruction, ``draws`` noisy draws each), both against the bundle's
    out-of-fold reference (thresholds not recalibrated: the ranking metric only)."""
    import torch

    from bids_anomaly.core.templates import load_template
    from bids_anomaly.evaluation import voxel_metrics
    from bids_anomaly.inference.scoring import score_volume
    from bids_anomaly.models.bundle import load_bundle
    from bids_anomaly.preprocessing.standardise import standardise_for_bundle

    model_type, config, _ = CONFIGS[name]
    bundle = load_bundle(cache / "bundles" / f"{name}-s{seed}")
    base = bundle.model
    ckpt = cache / "checkpoints" / f"{_train_key(model_type, config)}-s{seed}"
    members = []
    for path in [*sorted(ckpt.glob("model-fold*.pt")), None]:
        m = type(base)(base.contrasts, base.shape, {**base.hparams, "infer_draws": draws})
        if path is None:
            m.load_state_dict(base.state_dict())
        else:
            state = torch.load(path, weights_only=True)
            m.net.load_state_dict(state["best_net"] or state["net"])
            m.box = base.box
        members.append(m)
    ensemble = _MeanReconstruction(members)
    template = load_template(2)
    pooled: dict[str, tuple[list, list]] = {}
    for group, _scan, vol, brain, label in _eval_scans(cache):
        if label is None:
            continue
        std = standardise_for_bundle(vol, brain, bundle.card)
        for key, model in (("shipped", base), (f"ensemble{len(members)}", ensemble)):
            res = score_volume(model, std, brain, bundle.calibration, template.affine)
            s, y = pooled.setdefault(f"{group}_auprc[{key}]", ([], []))
            s.append(res.statmap[brain])
            y.append(label[brain])
    return {"folds": name, "seed": seed, "draws_per_member": draws,
            **{k: round(voxel_metrics(np.concatenate(s), np.concatenate(y))["auprc"], 4)
               for k, (s, y) in pooled.items()}}


COLUMNS = ["ixi-lesion_auprc", "brats2015_auprc", "openms_auprc", "ixi-lesion_dice",
           "brats2015_dice", "healthy_fpr", "shift_fpr", "openms-outside_fpr", "nichart_fpr",
           "nichart-outside_fpr", "healthy_flagged", "shift_flagged", "nichart_flagged", "train_s"]


def table(cache: Path) -> None:
    rows = [json.loads(ln) for ln in (cache / "results.jsonl").read_text().splitlines() if ln]
    # A configuration measured again (new columns, a re-scored bundle): its latest row counts.
    rows = list({(r["config"], r["seed"]): r for r in rows}.values())
    out = []
    for name in dict.fromkeys(r["config"] for r in rows):
        rs = [r for r in rows if r["config"] == name]
        agg = {"config": name, "seeds": len(rs)}
        for c in COLUMNS:
            vals = [r.get(c) for r in rs if r.get(c) is not None]
            if vals and isinstance(vals[0], str):
                agg[c] = " ".join(vals)
            elif vals:
                agg[c] = f"{np.mean(vals):.3f}±{np.std(vals):.3f}" if len(vals) > 1 \
                    else f"{vals[0]:.3f}"
        out.append(agg)
    print("n: healthy = 2 held-out IXI scans; shift = their shifted copies (count in "
          "shift_flagged); ixi-lesion = 6 "
          "lesioned copies; brats2015 = 6; openms = 1 (outside: its brain away from the "
          "lesions, another scanner); nichart = 23 elderly (WMH and ageing: not healthy; "
          "outside: away from their WMH, after the wmh step); FPR = shipped mask (nominal "
          "0.1%) over the eroded brain")
    print_table(out, ["config", "seeds", *COLUMNS])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", choices=["prepare", "wmh", "run", "table", "combine", "folds"])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draws", type=int, default=1, help="folds: noisy draws per member")
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"shared data not found at {DATA}")
    if args.step == "prepare":
        prepare(args.cache, args.procs)
    elif args.step == "wmh":
        wmh(args.cache, args.procs)
    elif args.step == "run":
        for name in args.configs:
            for seed in args.seeds:
                row = run(args.cache, name, seed, args.threads)
                print(json.dumps(row), flush=True)
    elif args.step == "folds":
        for name in args.configs:
            for seed in args.seeds:
                print(json.dumps(folds(args.cache, name, seed, args.draws)), flush=True)
    elif args.step == "combine":
        for seed in args.seeds:
            print(json.dumps(combine(args.cache, args.configs, seed)), flush=True)
    else:
        table(args.cache)


if __name__ == "__main__":
    main()
