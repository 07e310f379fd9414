"""The participant level: preprocess and score each scan with a bundle, write derivatives
and participant reports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..bids_io import derivatives
from ..bids_io.discovery import ScanInput
from ..core.config import RunConfig
from ..core.errors import ExitCode
from ..core.interrupt import remove_temp_files
from ..core.naming import ScanKey, ScanOutputs
from ..progress import Reporter
from ..workflows.base import scan_outcomes
from ..workflows.score import ScoreTarget, init_score_wf
from ..workflows.watch import run_watched
from .common import (
    LOG,
    OUTPUT_ERRNO,
    RunSummary,
    ScanStatus,
    interruptible,
    precheck,
    provenance,
    run_preprocessing,
    scored_scans,
    start_bundle_run,
    subject_places,
)
from .reports import build_reports


def run_participant(cfg: RunConfig, model: str) -> RunSummary:
    """Score every selected scan with a bundle; write derivatives and participant reports."""
    t0, crash_dir, device, bundle, cfg, scans = start_bundle_run(cfg, model)
    places = subject_places(cfg.output_dir, [s.key.subject for s in scans])
    # Temporaries of these participants are left only by a run that was killed (SIGKILL,
    # node loss): nothing else writes them, so they are removed before resuming.
    stale = remove_temp_files(places)
    if stale:
        LOG.warning("removed %d temporary file(s) left by an interrupted run", len(stale))
    with interruptible("participant", places, lambda: scored_scans(cfg.output_dir, scans)):
        return _score_scans(cfg, bundle, scans, device, t0, crash_dir)


def _score_scans(cfg: RunConfig, bundle, scans: list[ScanInput], device: str,
                 t0: float, crash_dir: Path) -> RunSummary:
    derivatives.ensure_dataset(cfg.output_dir, cfg.bids_dir)
    prov = provenance(cfg)
    good, failed = precheck(scans)
    done, pfail = run_preprocessing(cfg, good, device, crash_dir)
    failed.update(pfail)
    from ..models.bundle import CARD, sha256

    target = ScoreTarget(bundle.path, sha256(bundle.path / CARD), bundle.model_card.resolution,
                         cfg.bids_dir, cfg.output_dir, prov)
    wf, chains = init_score_wf(good, done, target, cfg.work_dir, device,
                               cfg.resources.threads_for(len(done)))
    if chains:
        step = Reporter(cfg.progress).step("scoring", len(chains), "scans")
        run = run_watched(wf, cfg.resources, crash_dir, step,
                          items=[f"{wf.name}.{chain[-1].name}" for chain in chains.values()])
        _, sfail = scan_outcomes(run, chains)
        step.close(f"{len(chains) - len(sfail)}/{len(chains)} scans scored"
                   + (f", {len(sfail)} failed" if sfail else ""))
        for sid, f in sfail.items():
            if OUTPUT_ERRNO.search(f.message):  # disk full, read-only, quota, permission
                f.code = ExitCode.CANNOT_CREATE_OUTPUT
            failed[sid] = f
    summary = RunSummary("participant")
    for scan in scans:
        sid = scan.key.scan_id
        if sid in failed:
            f = failed[sid]
            derivatives.write_failure(cfg.output_dir, scan.key, f.message, prov)
            summary.scans.append(ScanStatus(sid, "failed", f.message, f.code))
        else:
            summary.scans.append(ScanStatus(sid, "ok", _reference_warning(cfg.output_dir,
                                                                          scan.key)))
    # Participants asked for by label that have no T1w matching the selection: discovery
    # drops them (the others run); say so instead of finishing silently without them.
    found = {s.key.subject for s in scans}
    for subject in cfg.selection.participant_labels:
        if subject not in found:
            msg = (f"sub-{subject}: no T1w image in {cfg.bids_dir} matches the selection; "
                   "nothing to score")
            LOG.error(msg)
            derivatives.write_failure(cfg.output_dir, ScanKey(subject), msg, prov)
            summary.scans.append(ScanStatus(ScanKey(subject).scan_id, "failed", msg,
                                            ExitCode.MISSING_INPUT))
            found.add(subject)
    summary.outputs.update(build_reports(cfg.output_dir, sorted(found), cfg.progress))
    summary.seconds = time.perf_counter() - t0
    return summary


def _reference_warning(output_dir: Path, key: ScanKey) -> str:
    """A warning when the scan was part of the bundle's healthy reference (its record says)."""
    try:
        role = json.loads((output_dir / ScanOutputs(key).scores).read_text()).get("in_reference")
    except (OSError, ValueError, AttributeError):
        return ""
    if not role:
        return ""
    msg = (f"{key.scan_id} was a {role} participant of the model's healthy reference: "
           "its score is optimistic")
    LOG.warning(msg)
    return f"warning: {msg}"
