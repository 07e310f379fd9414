"""The train and calibrate levels: preprocess, one Fit (or Recalibrate) node, the bundle and
its training report.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..bids_io.discovery import ScanInput, healthy_subjects
from ..core.config import RunConfig, TrainConfig
from ..core.errors import DataError, EmptySelectionError, ExitCode, MissingInputError, TrainingError
from ..core.reference import file_sha256
from ..progress import Reporter, TrainingView
from ..workflows.base import scan_outcomes
from ..workflows.train import init_calibrate_wf, init_train_wf
from ..workflows.watch import run_watched
from ..workflows.workers import start_worker_server
from .common import (
    RunSummary,
    ScanStatus,
    discover,
    interruptible,
    precheck,
    run_device,
    run_preprocessing,
    setup_run,
    start_bundle_run,
)


def run_train(cfg: RunConfig, tcfg: TrainConfig) -> RunSummary:
    """Preprocess the healthy cohort (fan-out), then fit and calibrate one model bundle."""
    t0 = time.perf_counter()
    crash_dir = setup_run(cfg)
    start_worker_server(cfg.resources, cfg.work_dir)
    device = run_device(cfg)
    scans = discover(cfg)
    subjects = sorted({s.key.subject for s in scans})
    healthy = set(healthy_subjects(cfg.bids_dir, subjects, cfg.selection.healthy_filter))
    scans = [s for s in scans if s.key.subject in healthy]
    dest = cfg.output_dir / "models" / tcfg.name
    with interruptible("train", *_bundle_watch(dest)):
        return _train(cfg, tcfg, scans, device, dest, t0, crash_dir)


def _bundle_watch(dest: Path):
    """For :func:`interruptible` around a run that writes the bundle ``dest``: where its
    temporaries lie, and whether it was finished."""
    places = [(dest, "**/.*.tmp*"), (dest.parent, f".{dest.name}*.tmp*")]
    return places, lambda: ((["bundle"], []) if (dest / "model.json").exists()
                            else ([], ["bundle"]))


def _preprocess_checked(cfg: RunConfig, scans: list[ScanInput], device: str, crash_dir: Path,
                        level: str):
    """Precheck and preprocess ``scans``: (summary listing the failures, failures by scan id,
    the scans that preprocessed, their preprocessing results)."""
    good, failed = precheck(scans)
    done, pfail = run_preprocessing(cfg, good, device, crash_dir)
    failed.update(pfail)
    summary = RunSummary(level, [ScanStatus(f.scan_id, "failed", f.message, f.code)
                                 for f in failed.values()])
    return summary, failed, [s for s in good if s.key.scan_id in done], done


def _train(cfg: RunConfig, tcfg: TrainConfig, scans: list[ScanInput], device: str,
           dest: Path, t0: float, crash_dir: Path) -> RunSummary:
    summary, failed, ok, done = _preprocess_checked(cfg, scans, device, crash_dir, "train")
    if len({s.key.subject for s in ok}) < 2:
        msg = (f"training needs at least 2 healthy participants that preprocess cleanly; "
               f"{len(ok)} scan(s) available")
        if failed and all(f.code == ExitCode.MISSING_INPUT for f in failed.values()):
            # Every set-aside scan lacks an input (e.g. a --contrasts image): exit 66.
            raise MissingInputError(f"{msg}; {len(failed)} scan(s) lack an input "
                                    "(see the errors above)")
        raise EmptySelectionError(msg)
    threads = max(1, cfg.resources.nprocs if cfg.resources.omp_nthreads == 0
                  else cfg.resources.omp_nthreads)
    spec = {
        "subjects": [s.key.subject for s in ok],
        "scan_ids": [s.key.scan_id for s in ok],
        "contrasts": list(cfg.selection.contrasts),
        "model_type": tcfg.model_type,
        "model_name": tcfg.name,
        "model_config": dict(tcfg.model_config),
        "preproc": cfg.preproc.to_dict(),
        "folds": tcfg.folds,
        # The T1w file's digest lets scoring recognise a scan of the healthy reference.
        "sources_sha256": [file_sha256(s.files["T1w"]) for s in ok],
        "dataset": str(cfg.bids_dir.resolve()),
        "seed": cfg.seed,
        "device": device,
        "threads": threads,
        "checkpoint": str(cfg.work_dir / "train" / tcfg.name / "checkpoint.pt"),
        "resume": tcfg.resume,
    }
    wf, node = init_train_wf(tcfg.name, [str(done[s.key.scan_id]) for s in ok], spec, dest,
                             cfg.work_dir, threads, use_gpu=device.startswith("cuda"))
    step = Reporter(cfg.progress).step(f"training {tcfg.model_type}")
    run = run_watched(wf, cfg.resources, crash_dir, step, training=TrainingView())
    _, fit_failed = scan_outcomes(run, {"fit": [node]})
    step.close(f"{'failed' if fit_failed else 'bundle written'} ({len(ok)} scans)")
    if fit_failed:
        f = fit_failed["fit"]
        where = f" (crash file: {f.crash_file})" if f.crash_file else ""
        # A data error (e.g. a --resume checkpoint of another run) keeps its exit code 65.
        error = DataError if f.code == ExitCode.DATA_ERROR else TrainingError
        raise error(f"training failed: {f.message}{where}")
    summary.scans += [ScanStatus(s.key.scan_id, "ok") for s in ok]
    summary.outputs["bundle"] = str(dest)
    try:
        from ..reports.training import build_training_report

        summary.outputs["training_report"] = str(build_training_report(dest))
    except ImportError:
        pass
    summary.seconds = time.perf_counter() - t0
    return summary


def run_calibrate(cfg: RunConfig, model: str, name: str | None = None) -> RunSummary:
    """Re-reference a bundle to this dataset's healthy participants (weights untouched)."""
    t0, crash_dir, device, bundle, cfg, scans = start_bundle_run(cfg, model)
    healthy = set(healthy_subjects(cfg.bids_dir, sorted({s.key.subject for s in scans}),
                                   cfg.selection.healthy_filter))
    scans = [s for s in scans if s.key.subject in healthy]
    name = name or f"{bundle.name}-{cfg.bids_dir.resolve().name}"
    dest = cfg.output_dir / "models" / name
    with interruptible("calibrate", *_bundle_watch(dest)):
        summary, _, ok, done = _preprocess_checked(cfg, scans, device, crash_dir, "calibrate")
        if not ok:
            raise EmptySelectionError("calibrate needs healthy participants that preprocess "
                                      "cleanly; none did (see the errors above)")
        wf, node = init_calibrate_wf(
            name, bundle.path, [str(done[s.key.scan_id]) for s in ok],
            [{"participant": s.key.subject, "scan_id": s.key.scan_id,
              "sha256": file_sha256(s.files["T1w"])} for s in ok],
            str(cfg.bids_dir.resolve()), dest, cfg.work_dir, device, cfg.resources.nprocs)
        step = Reporter(cfg.progress).step(f"calibrating on {len(ok)} healthy scans")
        run = run_watched(wf, cfg.resources, crash_dir, step)
        _, cal_failed = scan_outcomes(run, {"calibrate": [node]})
        step.close("failed" if cal_failed else f"bundle {name} written")
        if cal_failed:
            f = cal_failed["calibrate"]
            raise TrainingError(f"calibration failed: {f.message}")
    summary.scans += [ScanStatus(s.key.scan_id, "ok") for s in ok]
    summary.outputs["bundle"] = str(dest)
    from ..reports.training import build_training_report

    summary.outputs["training_report"] = str(build_training_report(dest))
    summary.seconds = time.perf_counter() - t0
    return summary
