"""Training stage: fit a model on preprocessed healthy scans, calibrate, write the bundle."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import __version__
from ..calibration.out_of_fold import calibrate_out_of_fold
from ..calibration.statmap import csf_weights
from ..calibration.types import ScoringParams
from ..core.config import PreprocConfig
from ..core.templates import TEMPLATE_NAME, load_template
from ..core.versions import software_versions
from ..models.base import FitContext
from ..models.bundle import save_bundle
from ..models.card import ModelCard, ModelSpec, Normalisation, TrainingRecord
from ..models.registry import get_model_class
from ..models.trainer import format_eta
from ..preprocessing.pipeline import PreprocResult, load_volume
from ..preprocessing.standardise import apply_standardisation, learn_standardisation

LOG = logging.getLogger("bids_anomaly")


# Scoring choices of new bundles (older cards keep theirs): every scan's healthy majority sets
# its own z baseline (see scoring.scan_baseline) and the statmap is smoothed with a Gaussian of
# 1 voxel (an extended low-contrast deviation adds up); measured in benchmarks/model_search.py.
DEFAULT_SCORING = {"scan_baseline": True, "smooth_sigma": 1.0}


@dataclass(frozen=True)
class ParticipantSplit:
    """Which healthy participants do what; the three sets never overlap.

    ``fit`` trains the network and sets the voxel-wise normative maps; ``validation`` chooses
    the epoch (early stopping); ``calibration`` sets the voxel thresholds and the healthy score
    reference, on scans that neither trained the model nor chose its epoch. With too few
    participants for a validation set the epoch is chosen on the training loss."""

    fit: list[str]
    validation: list[str]
    calibration: list[str]


def plan_folds(subjects: list[str], folds: int, seed: int,
               validation: bool = True) -> list[ParticipantSplit]:
    """K-fold cross-fitting plan: every participant calibrates exactly once.

    Participants are shuffled (``seed``) and dealt into ``min(folds, N)`` folds (at least 2).
    Fold k calibrates on its own participants; when ``validation`` and at least two others
    remain, one participant of the next fold chooses the epoch; the rest fit."""
    uniq = sorted(set(subjects))
    if len(uniq) < 2:
        raise ValueError("training needs at least 2 healthy participants (fit + calibration)")
    order = [str(s) for s in np.random.default_rng(seed).permutation(uniq)]
    k = max(2, min(int(folds), len(order)))
    groups = [order[i::k] for i in range(k)]
    plan = []
    for i, calib in enumerate(groups):
        rest = [s for s in order if s not in calib]
        val = [groups[(i + 1) % k][0]] if validation and len(rest) >= 2 else []
        plan.append(ParticipantSplit(fit=sorted(set(rest) - set(val)), validation=sorted(val),
                                     calibration=sorted(calib)))
    return plan


@dataclass
class FitInputs:
    """What the training node receives."""

    preproc_jsons: list[str]
    subjects: list[str]
    scan_ids: list[str]
    contrasts: list[str]
    model_type: str
    model_name: str
    model_config: dict
    preproc: dict
    folds: int
    dataset: str
    seed: int
    device: str
    threads: int
    checkpoint: str | None
    resume: bool
    sources_sha256: list[str] | None = None  # of each scan's T1w file, to recognise it later
    scoring: dict | None = None  # ScoringParams fields overriding the defaults


def fit_bundle(inputs: FitInputs, dest: Path,
               progress: Callable[[dict], None] | bool | None = None) -> Path:
    """Fit on the training participants, calibrate on the held-out ones, save the bundle.

    ``progress`` (for callers in Python, e.g. the benchmarks) gets the trainer's record after
    every epoch (epoch, epochs, losses, seconds, samples_per_s, eta_seconds); ``True`` shows a
    rich progress bar when stderr is a terminal and this is the main process (else nothing).
    The nipype node passes none: the per-epoch log line (with its ETA) is what shows there."""
    if progress is True:
        with _progress_bar(inputs.model_type) as bar:
            return fit_bundle(inputs, dest, progress=bar)
    if progress is False:
        progress = None
    t0 = time.perf_counter()
    preproc = PreprocConfig.from_dict(inputs.preproc)
    template = load_template(preproc.resolution)
    cls = get_model_class(inputs.model_type)
    plan = plan_folds(inputs.subjects, inputs.folds, inputs.seed, validation=cls.learned)
    data = {}
    for js, subj, sid in zip(inputs.preproc_jsons, inputs.subjects, inputs.scan_ids):
        data[sid] = (subj, *load_volume(PreprocResult.load(Path(js)), inputs.contrasts))
    # Stage 2 of the normalisation: intensity landmarks of the whole healthy cohort (medians
    # of per-scan percentiles: unsupervised, and barely moved by any one scan).
    std = learn_standardisation([v for _, v, _ in data.values()],
                                [m for _, _, m in data.values()], inputs.contrasts)
    for sid, (s, v, m) in data.items():  # one volume at a time: no second copy of the cohort
        data[sid] = (s, apply_standardisation(v, m, std, inputs.contrasts), m)

    def volumes(subjects: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        chosen = [(v, m) for s, v, m in data.values() if s in subjects]
        return [v for v, _ in chosen], [m for _, m in chosen]

    from ..models.trainer import resolve_device

    device = resolve_device(inputs.device)

    # A time budget (max_minutes) covers the whole training: the folds and the final model.
    share = {}
    if "max_minutes" in cls.defaults:
        total = float({**cls.defaults, **inputs.model_config}["max_minutes"])
        share = {"max_minutes": total / (len(plan) + 1)}

    def train(subjects: list[str], val_subjects: list[str], config: dict, tag: str):
        import torch

        torch.manual_seed(inputs.seed)  # initial weights follow --seed
        model = cls(inputs.contrasts, template.shape, {**config, **share})
        fit_v, fit_m = volumes(subjects)
        val_v, val_m = volumes(val_subjects)
        ckpt = (str(Path(inputs.checkpoint).with_name(f"{Path(inputs.checkpoint).stem}-{tag}"
                                                      f"{Path(inputs.checkpoint).suffix}"))
                if inputs.checkpoint else None)
        ctx = FitContext(val_volumes=val_v, val_masks=val_m, device=device,
                         threads=inputs.threads, seed=inputs.seed, checkpoint=ckpt,
                         resume=inputs.resume, progress=progress)
        history = model.fit(fit_v, fit_m, ctx)
        # Reconstruct exactly as scoring will: a model rebuilt from its saved tensors.
        return _reloaded(model), history

    # Out-of-fold residuals: each healthy scan reconstructed by a model that never saw it.
    residuals, masks, owners, weights, folds, example = [], [], [], [], [], None
    params = ScoringParams(**{**DEFAULT_SCORING, **cls.scoring_defaults,
                              **(inputs.scoring or {})})
    for k, split in enumerate(plan):
        LOG.info("Fold %d/%d: fitting %s on %d participants; epoch chosen on %s; "
                 "calibrating on %d", k + 1, len(plan), inputs.model_type, len(split.fit),
                 f"{len(split.validation)} validation participant(s)" if split.validation
                 else "the training loss", len(split.calibration))
        model_k, history_k = train(split.fit, split.validation, inputs.model_config,
                                   f"fold{k + 1}")
        for s, v, m in data.values():
            if s in split.calibration:
                recon = model_k.reconstruct(v, m, device=device)
                residuals.append(v - recon)
                masks.append(m)
                owners.append(s)
                weights.append(csf_weights(v, m, params))
                if example is None:
                    example = (v, recon, m)
        folds.append({**asdict(split), "best_epoch": history_k.get("best_epoch"),
                      "best_val_loss": history_k.get("best_val_loss"),
                      "epochs_run": len(history_k.get("history", []))})
        del model_k
    calib = calibrate_out_of_fold(residuals, masks, params, participants=owners,
                                  weights=weights)
    del residuals
    reference = calib.reference
    if reference["level"] != "ok":
        LOG.warning("%s", reference["message"])
    # The shipped model: every participant, for the median epoch the folds chose.
    final_config = dict(inputs.model_config)
    best = [f["best_epoch"] for f in folds if f.get("best_epoch")]
    if cls.learned and best and "epochs" in cls.defaults:
        final_config["epochs"] = max(1, int(np.median(best)))
    LOG.info("Final model: fitting %s on all %d participants (%s epochs)", inputs.model_type,
             len(set(inputs.subjects)), final_config.get("epochs", "n/a"))
    model, history = train(sorted(set(inputs.subjects)), [], final_config, "final")
    card = ModelCard(
        name=inputs.model_name,
        description=f"{inputs.model_type} normative model of healthy brains "
                    f"({', '.join(inputs.contrasts)}) in {TEMPLATE_NAME} at "
                    f"{preproc.resolution} mm",
        template=TEMPLATE_NAME,
        space=TEMPLATE_NAME,
        resolution=preproc.resolution,
        preprocessing=preproc,
        inference_precision="float32",  # calibration and scoring alike, on any device
        normalisation=Normalisation(
            per_volume={"method": "per-volume: 0.5th percentile → 0, median → 0.7",
                        "low": 0.5, "median_target": 0.7, "clip": 1.5},
            standardisation=std),
        training=TrainingRecord(
            dataset=inputs.dataset,
            participants=sorted(set(inputs.subjects)),
            calibration_participants=sorted(set(owners)),
            folds=folds,
            epoch_selection=(f"final model: median best epoch of {len(plan)} folds, each "
                             "chosen on a validation participant outside the fold's "
                             "calibration set" if cls.learned else "not learned"),
            scans=[{"scan_id": sid, "participant": subj, "role": "fit",
                    **({"sha256": digest} if digest else {})}
                   for sid, subj, digest in zip(inputs.scan_ids, inputs.subjects,
                                                inputs.sources_sha256
                                                or [None] * len(inputs.scan_ids))],
            n_scans=len(data),
            models_trained=len(plan) + 1,
            minutes_per_model=share.get("max_minutes"),
            seed=inputs.seed,
            device=device,
            seconds=round(time.perf_counter() - t0, 1),
            history=history.get("history", []),
            best_epoch=history.get("best_epoch"),
            best_val_loss=history.get("best_val_loss"),
        ),
        software={"bids-anomaly": __version__, **software_versions()},
        intended_use="Research use: flags deviations from the healthy training cohort; "
                     "not a diagnostic device.",
        model=ModelSpec.of(model),
        calibration=calib,
    )
    extra = {"calibration.npz": calibration_npz(calib)}
    if example is not None:
        extra.update(_example_reconstructions(*example))
    return save_bundle(dest, model, card, extra_files=extra)


def _reloaded(model):
    """A fresh instance of ``model`` loaded from copies of its state tensors."""
    fresh = type(model)(model.contrasts, model.shape, model.hparams)
    fresh.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    return fresh


@contextmanager
def _progress_bar(label: str):
    """A rich bar fed by the trainer's per-epoch records; None where it would not show."""
    import multiprocessing
    import sys

    if not sys.stderr.isatty() or multiprocessing.current_process().name != "MainProcess":
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn(f"training {label}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), transient=False) as bar:
        task = bar.add_task("fit", total=None, info="")

        def update(rec: dict) -> None:
            bar.update(task, completed=rec["epoch"], total=rec["epochs"],
                       info=f"val {rec['val_loss']:.5f}  ETA {format_eta(rec['eta_seconds'])}")

        yield update


def _example_reconstructions(volume: np.ndarray, recon: np.ndarray, mask: np.ndarray
                             ) -> dict[str, bytes]:
    """Mosaics of a held-out scan and its out-of-fold reconstruction (PNG)."""
    from ..core.mosaic import mosaic

    lo, hi = float(np.percentile(volume[0][mask], 1)), float(np.percentile(volume[0][mask], 99.5))
    return {
        "example_input.png": mosaic(volume[0] * mask, vmin=lo, vmax=hi, crop_mask=mask),
        "example_recon.png": mosaic(recon[0] * mask, vmin=lo, vmax=hi, crop_mask=mask),
    }


def calibration_npz(calib) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, healthy_scores=np.asarray(calib.healthy_scores, np.float64),
             thresholds_fpr=np.asarray([float(k) for k in calib.thresholds]),
             thresholds_z=np.asarray(list(calib.thresholds.values())),
             mu_sd=np.asarray([calib.mu, calib.sd]))
    return buf.getvalue()


def fit_inputs_json(inputs: FitInputs) -> str:
    return json.dumps(inputs.__dict__)
