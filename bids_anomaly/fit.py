"""Training stage: fit a model on preprocessed healthy scans, calibrate, write the bundle."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nb
import numpy as np

from . import __version__
from .calibration import calibrate
from .config import PreprocConfig
from .models.base import FitContext, get_model_class
from .models.bundle import save_bundle
from .preprocessing.pipeline import PreprocResult
from .preprocessing.standardise import apply_standardisation, learn_standardisation
from .scoring import ScoringParams
from .templates import TEMPLATE_NAME, load_template
from .training import format_eta
from .versions import software_versions

LOG = logging.getLogger("bids_anomaly")


def load_volume(result: PreprocResult, contrasts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(C, X, Y, Z) template-space volume and its brain mask from a preprocessing result."""
    chans = [np.asarray(nb.load(result.template_images[c]).dataobj, np.float32) for c in contrasts]
    mask = np.asarray(nb.load(result.template_brain_mask).dataobj) > 0
    return np.stack(chans), mask


def split_participants(subjects: list[str], fraction: float, seed: int) -> tuple[list, list]:
    """Participant-level split into fit and held-out (validation + calibration) sets."""
    uniq = sorted(set(subjects))
    if len(uniq) < 2:
        raise ValueError("training needs at least 2 healthy participants (fit + calibration)")
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(uniq))
    n_held = min(len(uniq) - 1, max(1, int(round(fraction * len(uniq)))))
    held = sorted(order[:n_held])
    return sorted(order[n_held:]), held


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
    calibration_fraction: float
    dataset: str
    seed: int
    device: str
    threads: int
    checkpoint: str | None
    resume: bool


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
    fit_subj, held_subj = split_participants(inputs.subjects, inputs.calibration_fraction,
                                             inputs.seed)
    data = {}
    for js, subj, sid in zip(inputs.preproc_jsons, inputs.subjects, inputs.scan_ids):
        data[sid] = (subj, *load_volume(PreprocResult.load(Path(js)), inputs.contrasts))
    # Stage 2 of the normalisation: learned on the fit participants only, applied to all.
    std = learn_standardisation([v for s, v, _ in data.values() if s in fit_subj],
                                [m for s, _, m in data.values() if s in fit_subj],
                                inputs.contrasts)
    for sid, (s, v, m) in data.items():  # one volume at a time: no second copy of the cohort
        data[sid] = (s, apply_standardisation(v, m, std, inputs.contrasts), m)
    fit = [(v, m) for s, v, m in data.values() if s in fit_subj]
    held = [(v, m) for s, v, m in data.values() if s in held_subj]
    cls = get_model_class(inputs.model_type)
    import torch

    torch.manual_seed(inputs.seed)  # initial weights follow --seed
    model = cls(inputs.contrasts, template.shape, inputs.model_config)
    from .training import resolve_device

    device = resolve_device(inputs.device)
    ctx = FitContext(val_volumes=[v for v, _ in held], val_masks=[m for _, m in held],
                     device=device, threads=inputs.threads, seed=inputs.seed,
                     checkpoint=inputs.checkpoint, resume=inputs.resume, progress=progress)
    LOG.info("Fitting %s on %d scans (%d participants); %d held-out scans for calibration",
             inputs.model_type, len(fit), len(fit_subj), len(held))
    history = model.fit([v for v, _ in fit], [m for _, m in fit], ctx)
    # Calibrate the model exactly as scoring will see it: rebuilt from its saved tensors.
    model = _reloaded(model)
    calib = calibrate(model, [v for v, _ in held], [m for _, m in held], ScoringParams(),
                      device=device, participants=held_subj,
                      normative_volumes=[v for v, _ in fit], normative_masks=[m for _, m in fit])
    card = {
        "name": inputs.model_name,
        "description": f"{inputs.model_type} normative model of healthy brains "
                       f"({', '.join(inputs.contrasts)}) in {TEMPLATE_NAME} at "
                       f"{preproc.resolution} mm",
        "template": TEMPLATE_NAME,
        "space": TEMPLATE_NAME,
        "resolution": preproc.resolution,
        "preprocessing": preproc.to_dict(),
        "normalisation": {
            "per_volume": {"method": "per-volume: 0.5th percentile → 0, median → 0.7",
                           "low": 0.5, "median_target": 0.7, "clip": 1.5},
            "standardisation": std.to_dict(),
        },
        "training": {
            "dataset": inputs.dataset,
            "participants": fit_subj,
            "calibration_participants": held_subj,
            "n_scans": len(fit),
            "seed": inputs.seed,
            "device": device,
            "seconds": round(time.perf_counter() - t0, 1),
            "history": history.get("history", []),
            "best_epoch": history.get("best_epoch"),
            "best_val_loss": history.get("best_val_loss"),
        },
        "software": {"bids-anomaly": __version__, **software_versions()},
        "intended_use": "Research use: flags deviations from the healthy training cohort; "
                        "not a diagnostic device.",
    }
    extra = {"calibration.npz": _calibration_npz(calib)}
    if held:
        extra.update(_example_reconstructions(model, held[0][0], held[0][1], device))
    return save_bundle(dest, model, card, calib, extra_files=extra)


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


def _example_reconstructions(model, volume: np.ndarray, mask: np.ndarray, device: str
                             ) -> dict[str, bytes]:
    """Mosaics of a held-out validation scan and the model's reconstruction (PNG)."""
    from .reports.figures import mosaic

    recon = model.reconstruct(volume, mask, device=device)
    lo, hi = float(np.percentile(volume[0][mask], 1)), float(np.percentile(volume[0][mask], 99.5))
    return {
        "example_input.png": mosaic(volume[0] * mask, vmin=lo, vmax=hi, crop_mask=mask),
        "example_recon.png": mosaic(recon[0] * mask, vmin=lo, vmax=hi, crop_mask=mask),
    }


def _calibration_npz(calib) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, healthy_scores=np.asarray(calib.healthy_scores, np.float64),
             thresholds_fpr=np.asarray([float(k) for k in calib.thresholds]),
             thresholds_z=np.asarray(list(calib.thresholds.values())),
             mu_sd=np.asarray([calib.mu, calib.sd]))
    return buf.getvalue()


def fit_inputs_json(inputs: FitInputs) -> str:
    return json.dumps(inputs.__dict__)
