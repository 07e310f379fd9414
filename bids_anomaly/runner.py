"""Run levels end to end: train, participant (score), group, report; returns a summary.

The CLI builds a :class:`~bids_anomaly.config.RunConfig` and calls these; no click here.
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

from nipype import Node, Workflow

from . import __version__
from .bids_io import derivatives
from .bids_io.discovery import ScanInput, discover_scans, healthy_subjects
from .config import ProgressConfig, RunConfig, TrainConfig
from .errors import (
    BidsAnomalyError,
    BundleError,
    DataError,
    EmptySelectionError,
    ExitCode,
    MissingInputError,
    TrainingError,
)
from .interrupt import remove_temp_files, stop_children
from .naming import ScanKey, ScanOutputs
from .paths import ensure_writable_dir, validate_run_paths
from .preprocessing.checks import load_checked
from .progress import Reporter, TrainingView
from .reference import file_sha256
from .versions import software_versions
from .workflows.base import (
    Failure,
    node_name,
    preprocessing_workflow,
    result_output,
    scan_outcomes,
)
from .workflows.interfaces import DerivativesSink, Fit, Recalibrate, Score
from .workflows.watch import run_watched

LOG = logging.getLogger("bids_anomaly")
# OSErrors of a derivatives sink that mean "cannot create output" (exit 73): ENOSPC, EROFS,
# EDQUOT, EACCES.
_OUTPUT_ERRNO = re.compile(r"\[Errno (28|30|122|13)\]")


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


def _subject_places(output_dir: Path, subjects) -> list[tuple[Path, str]]:
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
        stop_children()
        remove_temp_files(places)
        finished, pending = scans_done()
        exc.level, exc.finished, exc.pending = level, finished, pending
        LOG.warning("interrupted: %d scan(s) finished, %d not", len(finished), len(pending))
        raise


def _scored(output_dir: Path, scans: list[ScanInput]) -> tuple[list[str], list[str]]:
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
    wf, nodes = preprocessing_workflow(scans, cfg.preproc, cfg.work_dir,
                                       cfg.resources.threads_per_node, cfg.seed, device)
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


def _resolve_device(cfg: RunConfig) -> str:
    from .models.trainer import resolve_device

    try:
        return resolve_device(cfg.resources.device)
    except RuntimeError as exc:
        raise DataError(str(exc)) from exc


def run_train(cfg: RunConfig, tcfg: TrainConfig) -> RunSummary:
    """Preprocess the healthy cohort (fan-out), then fit and calibrate one model bundle."""
    t0 = time.perf_counter()
    crash_dir = setup_run(cfg)
    device = _resolve_device(cfg)
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
    wf = Workflow(name=f"train_{node_name('wf', tcfg.name)}", base_dir=str(cfg.work_dir))
    node = Node(Fit(), name="fit", n_procs=threads, mem_gb=3.0)
    node.inputs.preproc = [str(done[s.key.scan_id]) for s in ok]
    node.inputs.spec = spec
    node.inputs.dest = str(dest.resolve())  # nipype runs the node from its own folder
    node.inputs.use_gpu = device.startswith("cuda")
    node.overwrite = True  # the bundle is the product: always (re)write it
    wf.add_nodes([node])
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
        from .reports.training import build_training_report

        summary.outputs["training_report"] = str(build_training_report(dest))
    except ImportError:
        pass
    summary.seconds = time.perf_counter() - t0
    return summary


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

    pre = replace(cfg.preproc, **{k: v for k, v in bundle.card["preprocessing"].items()
                                  if k in cfg.preproc.to_dict()})
    return replace(cfg, preproc=pre,
                   selection=replace(cfg.selection, contrasts=tuple(bundle.card["contrasts"])))


def _start_bundle_run(cfg: RunConfig, model: str):
    """What every run with a bundle starts with: (start time, crash folder, device, bundle,
    the config with the bundle's recipe, the scans it selects)."""
    from .models.bundle import load_bundle

    t0 = time.perf_counter()
    crash_dir = setup_run(cfg)
    device = _resolve_device(cfg)
    bundle = load_bundle(resolve_model(model, cfg.output_dir))
    cfg = _as_bundle_preprocesses(cfg, bundle)
    return t0, crash_dir, device, bundle, cfg, discover(cfg, "the model bundle's contrasts")


def run_calibrate(cfg: RunConfig, model: str, name: str | None = None) -> RunSummary:
    """Re-reference a bundle to this dataset's healthy participants (weights untouched)."""
    t0, crash_dir, device, bundle, cfg, scans = _start_bundle_run(cfg, model)
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
        wf = Workflow(name=f"calibrate_{node_name('wf', name)}", base_dir=str(cfg.work_dir))
        node = Node(Recalibrate(), name="calibrate", n_procs=cfg.resources.nprocs, mem_gb=3.0)
        node.inputs.bundle = str(bundle.path.resolve())
        node.inputs.preproc = [str(done[s.key.scan_id]) for s in ok]
        node.inputs.scans = [{"participant": s.key.subject, "scan_id": s.key.scan_id,
                              "sha256": file_sha256(s.files["T1w"])} for s in ok]
        node.inputs.dataset = str(cfg.bids_dir.resolve())
        node.inputs.dest = str(dest.resolve())
        node.inputs.device = device
        node.inputs.threads = cfg.resources.nprocs
        node.inputs.use_gpu = device.startswith("cuda")
        node.overwrite = True
        wf.add_nodes([node])
        step = Reporter(cfg.progress).step(f"calibrating on {len(ok)} healthy scans")
        run = run_watched(wf, cfg.resources, crash_dir, step)
        _, cal_failed = scan_outcomes(run, {"calibrate": [node]})
        step.close("failed" if cal_failed else f"bundle {name} written")
        if cal_failed:
            f = cal_failed["calibrate"]
            raise TrainingError(f"calibration failed: {f.message}")
    summary.scans += [ScanStatus(s.key.scan_id, "ok") for s in ok]
    summary.outputs["bundle"] = str(dest)
    from .reports.training import build_training_report

    summary.outputs["training_report"] = str(build_training_report(dest))
    summary.seconds = time.perf_counter() - t0
    return summary


def run_participant(cfg: RunConfig, model: str) -> RunSummary:
    """Score every selected scan with a bundle; write derivatives and participant reports."""
    t0, crash_dir, device, bundle, cfg, scans = _start_bundle_run(cfg, model)
    places = _subject_places(cfg.output_dir, [s.key.subject for s in scans])
    # Temporaries of these participants are left only by a run that was killed (SIGKILL,
    # node loss): nothing else writes them, so they are removed before resuming.
    stale = remove_temp_files(places)
    if stale:
        LOG.warning("removed %d temporary file(s) left by an interrupted run", len(stale))
    with interruptible("participant", places, lambda: _scored(cfg.output_dir, scans)):
        return _score_scans(cfg, bundle, scans, device, t0, crash_dir)


def _score_scans(cfg: RunConfig, bundle, scans: list[ScanInput], device: str,
                 t0: float, crash_dir: Path) -> RunSummary:
    derivatives.ensure_dataset(cfg.output_dir, cfg.bids_dir)
    prov = provenance(cfg)
    good, failed = precheck(scans)
    done, pfail = run_preprocessing(cfg, good, device, crash_dir)
    failed.update(pfail)
    wf = Workflow(name="score_wf", base_dir=str(cfg.work_dir))
    from .models.bundle import CARD, sha256

    card_sha = sha256(bundle.path / CARD)
    chains: dict[str, list[Node]] = {}  # scan id -> its nodes, in execution order
    threads = cfg.resources.threads_per_node
    for scan in good:
        sid = scan.key.scan_id
        if sid not in done:
            continue
        score = Node(Score(), name=node_name("score", sid), n_procs=threads, mem_gb=1.0)
        score.inputs.preproc = str(done[sid])
        score.inputs.bundle = str(bundle.path.resolve())
        # The card lists every file's sha256 and the calibration: any change re-scores.
        score.inputs.bundle_sha256 = card_sha
        score.inputs.device = device
        score.inputs.threads = threads
        score.inputs.use_gpu = device.startswith("cuda")
        sink = Node(DerivativesSink(), name=node_name("sink", sid))
        sink.overwrite = True
        sink.inputs.output_dir = str(cfg.output_dir.resolve())
        sink.inputs.bids_dir = str(cfg.bids_dir.resolve())
        sink.inputs.key = {"subject": scan.key.subject, "session": scan.key.session,
                           "run": scan.key.run, "acquisition": scan.key.acquisition}
        sink.inputs.preproc = str(done[sid])
        sink.inputs.sources = {c: str(p.resolve()) for c, p in scan.files.items()}
        sink.inputs.provenance = prov
        sink.inputs.resolution = int(bundle.card["resolution"])
        wf.connect(score, "files", sink, "files")
        chains[sid] = [score, sink]
    if chains:
        step = Reporter(cfg.progress).step("scoring", len(chains), "scans")
        run = run_watched(wf, cfg.resources, crash_dir, step,
                          items=[f"{wf.name}.{chain[-1].name}" for chain in chains.values()])
        _, sfail = scan_outcomes(run, chains)
        step.close(f"{len(chains) - len(sfail)}/{len(chains)} scans scored"
                   + (f", {len(sfail)} failed" if sfail else ""))
        for sid, f in sfail.items():
            if _OUTPUT_ERRNO.search(f.message):  # disk full, read-only, quota, permission
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


def build_reports(output_dir: Path, subjects: list[str],
                  progress: ProgressConfig | None = None) -> dict[str, str]:
    """Participant reports; a report that fails is logged, never fatal."""
    from .reports import build_participant_report

    out = {}
    step = Reporter(progress).step("participant reports", len(subjects), "participants")
    t0 = time.monotonic()
    for i, subject in enumerate(subjects, 1):
        try:
            out[f"sub-{subject}"] = str(build_participant_report(output_dir, subject))
        except Exception as exc:  # a report must never lose the run's results
            LOG.error("participant report for sub-%s failed: %s", subject, exc)
        step.update(done=i, eta_s=(time.monotonic() - t0) / i * (len(subjects) - i))
    step.close(f"{len(out)}/{len(subjects)} participant reports written")
    return out


def run_group(output_dir: Path, progress: ProgressConfig | None = None) -> RunSummary:
    """Group level: the table of every scan and the group report."""
    from .reports import build_group_report

    t0 = time.perf_counter()
    ensure_writable_dir(output_dir, "OUTPUT_DIR")
    step = Reporter(progress).step("group level", 2, "parts")
    step.update(info="collecting the scans' records")
    df = derivatives.write_group_table(output_dir)
    if df.empty:
        step.close("no scored participants")
        raise EmptySelectionError(
            f"no scored participants in {output_dir}: run the participant level first"
        )
    step.update(done=1, info=f"group report of {len(df)} scans")
    summary = RunSummary("group")
    for _, row in df.iterrows():
        summary.scans.append(ScanStatus(
            row["scan_id"], row["status"], row["error"] if isinstance(row["error"], str) else "",
            ExitCode.OK))
    summary.outputs["group_table"] = str(output_dir / "group_anomaly.tsv")
    summary.outputs["group_report"] = str(build_group_report(output_dir))
    step.close(f"table and report of {len(df)} scans")
    summary.seconds = time.perf_counter() - t0
    return summary


def run_reports(output_dir: Path, level: str, subjects: list[str] | None = None,
                progress: ProgressConfig | None = None) -> RunSummary:
    """Rebuild reports from existing derivatives, without recomputing anything."""
    if level == "group":
        return run_group(output_dir, progress)
    if not subjects:
        subjects = sorted(p.name[4:] for p in output_dir.glob("sub-*") if p.is_dir())
    summary = RunSummary("report")
    summary.outputs.update(build_reports(output_dir, subjects, progress))
    return summary
