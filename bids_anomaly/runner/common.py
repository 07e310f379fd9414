"""Run levels end to end: train, participant (score), group, report; returns a summary.

The CLI builds a :class:`~bids_anomaly.core.config.RunConfig` and calls these; no click here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..bids_io.discovery import ScanInput, discover_scans
from ..core.config import RunConfig
from ..core.errors import BidsAnomalyError, BundleError, DataError, ExitCode
from ..core.interrupt import INTERRUPT_HANDLED, remove_temp_files, stop_children
from ..core.naming import ScanOutputs
from ..core.paths import ensure_writable_dir, validate_run_paths
from ..core.versions import software_versions
from ..preprocessing.checks import load_checked
from ..progress import Reporter
from ..workflows.base import Failure, result_output, scan_outcomes
from ..workflows.preproc import init_preproc_wf
from ..workflows.watch import run_watched
from ..workflows.workers import start_worker_server

LOG = logging.getLogger("bids_anomaly")
# OSErrors of a derivatives sink that mean "cannot create output" (exit 73): ENOSPC, EROFS,
# EDQUOT, EACCES.
OUTPUT_ERRNO = re.compile(r"\[Errno (28|30|122|13)\]")


@dataclass
class ScanStatus:
    scan_id: str
    status: str
    message: str = ""
    code: ExitCode = ExitCode.OK


@dataclass
class RunSummary:
    """What a run did: one status per scan, paths worth printing, and the exit code."""

    level: str
    scans: list[ScanStatus] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> list[ScanStatus]:
        return [s for s in self.scans if s.status != "ok"]

    @property
    def exit_code(self) -> ExitCode:
        codes = {s.code for s in self.failed}
        if not codes:
            return ExitCode.OK
        return codes.pop() if len(codes) == 1 else ExitCode.FAILURE


def subject_places(output_dir: Path, subjects) -> list[tuple[Path, str]]:
    out = []
    for s in sorted(set(subjects)):
        out += [(output_dir / f"sub-{s}", "**/.*.tmp*"), (output_dir, f".sub-{s}.*.tmp*")]
    return out


@contextlib.contextmanager
def interruptible(level: str, places: list[tuple[Path, str]], scans_done) -> Iterator[None]:
    """On SIGINT/SIGTERM (KeyboardInterrupt): stop workers, drop temp files, say what finished.

    The exception is re-raised with ``finished`` (scan ids whose outputs are complete),
    ``pending`` and ``level`` attached, for the CLI's summary line.
    """
    try:
        yield
    except KeyboardInterrupt as exc:
        INTERRUPT_HANDLED.set()
        stop_children()
        remove_temp_files(places)
        finished, pending = scans_done()
        exc.level, exc.finished, exc.pending = level, finished, pending
        LOG.warning("interrupted: %d scan(s) finished, %d not", len(finished), len(pending))
        raise


def scored_scans(output_dir: Path, scans: list[ScanInput]) -> tuple[list[str], list[str]]:
    finished, pending = [], []
    for scan in scans:
        f = output_dir / ScanOutputs(scan.key).scores
        try:
            ok = json.loads(f.read_text()).get("status") == "ok"
        except (OSError, ValueError):
            ok = False
        (finished if ok else pending).append(scan.key.scan_id)
    return finished, pending


def provenance(cfg: RunConfig) -> dict:
    return {"command": cfg.command, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "versions": {"bids-anomaly": __version__, **software_versions()}}


def setup_run(cfg: RunConfig) -> Path:
    """Validate folders, create OUTPUT_DIR and the work dir, attach a log file.

    Returns this run's own crash folder, ``logs/run-<stamp>-<pid>/`` (next to its log file):
    concurrent runs into one OUTPUT_DIR never read each other's crash files.
    """
    validate_run_paths(cfg.bids_dir, cfg.output_dir, cfg.work_dir)
    ensure_writable_dir(cfg.output_dir, "OUTPUT_DIR")
    ensure_writable_dir(cfg.work_dir, "work directory")
    logs = ensure_writable_dir(cfg.output_dir / "logs", "log directory")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    # One log per process: concurrent participant-level runs share OUTPUT_DIR/logs.
    handler = logging.FileHandler(logs / f"run-{stamp}-{os.getpid()}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOG.addHandler(handler)
    return logs / f"run-{stamp}-{os.getpid()}"


def discover(cfg: RunConfig, needed_by: str = "--contrasts") -> list[ScanInput]:
    return discover_scans(cfg.bids_dir, cfg.selection, database_dir=cfg.work_dir / "bids_db",
                          validate=not cfg.skip_bids_validation, needed_by=needed_by)


def precheck(scans: list[ScanInput]) -> tuple[list[ScanInput], dict[str, Failure]]:
    """Cheap input checks before any workflow runs: bad scans are set aside with a reason."""
    good, bad = [], {}
    for scan in scans:
        if scan.error:  # ambiguous (65) or missing (66) inputs found by discovery
            LOG.error("%s", scan.error)  # every such message names the scan
            bad[scan.key.scan_id] = Failure(scan.key.scan_id, scan.error, scan.error_code)
            continue
        try:
            for path in scan.files.values():
                load_checked(path)
            good.append(scan)
        except BidsAnomalyError as exc:
            LOG.error("%s: %s", scan.key.scan_id, exc)
            bad[scan.key.scan_id] = Failure(scan.key.scan_id, str(exc), exc.exit_code)
    return good, bad


def run_preprocessing(cfg: RunConfig, scans: list[ScanInput], device: str, crash_dir: Path
                      ) -> tuple[dict[str, Path], dict[str, Failure]]:
    """Preprocess ``scans``: the result file of each that finished, and why the others did not."""
    wf, nodes = init_preproc_wf(scans, cfg.preproc, cfg.work_dir,
                                cfg.resources.threads_for(len(scans)), cfg.seed, device)
    if not scans:
        return {}, {}
    step = Reporter(cfg.progress).step("preprocessing", len(scans), "scans")
    run = run_watched(wf, cfg.resources, crash_dir, step)
    results, failures = scan_outcomes(run, {sid: [node] for sid, node in nodes.items()})
    done = {}
    for sid, result in results.items():
        res = result_output(result, "result")
        if res is None or not res.exists():
            failures[sid] = Failure(sid, f"preprocessing finished without its result file "
                                         f"({res or 'no output'})")
        else:
            done[sid] = res
    step.close(f"{len(done)}/{len(scans)} scans preprocessed"
               + (f", {len(failures)} failed" if failures else ""))
    return done, failures


def run_device(cfg: RunConfig) -> str:
    from ..models.trainer import resolve_device

    try:
        return resolve_device(cfg.resources.device)
    except RuntimeError as exc:
        raise DataError(str(exc)) from exc


def resolve_model(model: str, output_dir: Path) -> Path:
    """A bundle path, or a name under OUTPUT_DIR/models/."""
    p = Path(model)
    if (p / "model.json").exists():
        return p
    named = output_dir / "models" / model
    if (named / "model.json").exists():
        return named
    raise BundleError(
        f"model bundle '{model}' not found (looked for {p / 'model.json'} and "
        f"{named / 'model.json'})"
    )


def _as_bundle_preprocesses(cfg: RunConfig, bundle) -> RunConfig:
    """``cfg`` with the bundle's preprocessing recipe and contrasts (scoring repeats both)."""
    from dataclasses import replace

    card = bundle.model_card
    return replace(cfg, preproc=card.preprocessing or cfg.preproc,
                   selection=replace(cfg.selection, contrasts=tuple(card.contrasts)))


def start_bundle_run(cfg: RunConfig, model: str):
    """What every run with a bundle starts with: (start time, crash folder, device, bundle,
    the config with the bundle's recipe, the scans it selects)."""
    from ..models.bundle import load_bundle

    t0 = time.perf_counter()
    crash_dir = setup_run(cfg)
    # The workers' imports overlap the bundle check and discovery below.
    start_worker_server(cfg.resources, cfg.work_dir)
    device = run_device(cfg)
    bundle = load_bundle(resolve_model(model, cfg.output_dir))
    cfg = _as_bundle_preprocesses(cfg, bundle)
    return t0, crash_dir, device, bundle, cfg, discover(cfg, "the model bundle's contrasts")
