"""``bids-anomaly``: the command line (BIDS-App positional form and subcommands).

This module parses and validates options, builds the configuration dataclasses and prints
results; all science lives in the library.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import click

from bids_anomaly import __version__
from bids_anomaly.errors import BidsAnomalyError, ExitCode, UnknownAnalysisLevelError, UsageError

from .argv import expand_greedy
from .console import console, print_card, print_evaluation, print_summary, setup_logging

LEVELS = ("participant", "group")
PLUGINS = ("Linear", "MultiProc", "SLURM", "SLURMGraph", "SGE", "SGEGraph", "PBS", "PBSGraph")
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class ModelChoice(click.Choice):
    """``--model-type``: the model registry's names, imported (with torch) only when needed."""

    def __init__(self) -> None:
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        from bids_anomaly.models.registry import MODEL_TYPES

        return MODEL_TYPES


def __getattr__(name: str):
    if name == "MODEL_TYPES":
        return ModelChoice().choices
    raise AttributeError(name)


def _parse_mem(ctx, param, value):
    if value is None:
        return None
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)I?B?\s*", str(value).upper())
    if not m:
        raise click.BadParameter(f"'{value}' is not a memory size such as 8GB or 500MB")
    scale = {"": 1.0, "K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}[m.group(2)]
    return float(m.group(1)) * scale


def _parse_plugin_args(ctx, param, value):
    if not value:
        return {}
    path = Path(value)
    text = path.read_text() if path.is_file() else value
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"expected JSON or a JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise click.BadParameter("expected a JSON object")
    return data


def _parse_healthy(ctx, param, values):
    out = []
    for v in values:
        if "=" not in v:
            raise click.BadParameter(f"'{v}' is not COLUMN=VALUE (e.g. group=control)")
        col, val = v.split("=", 1)
        out.append((col.strip(), val.strip()))
    return tuple(out)


def _device(ctx, param, value):
    if value not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", value):
        raise click.BadParameter(f"'{value}' is not one of auto, cpu, cuda, cuda:N")
    return value


QUIET = click.option("-q", "--quiet", is_flag=True,
                     help="No progress display (the log in OUTPUT_DIR/logs keeps a line per "
                          "step). Without a terminal, progress is a few plain lines.")


def _progress(kw):
    from bids_anomaly.config import ProgressConfig

    return ProgressConfig(mode="quiet" if kw.get("quiet") else "auto")


def selection_options(f):
    """Options that choose scans (fMRIPrep/MRIQC spellings, '-' and '_' both accepted)."""
    f = click.option("--bids-filter-file", "--bids_filter_file", "bids_filter_file",
                     type=click.Path(dir_okay=False, path_type=Path),
                     help="JSON file of pybids filters per contrast, e.g. "
                          '{"t1w": {"acquisition": "mprage"}}.')(f)
    f = click.option("--session-label", "--session_label", "session_label", multiple=True,
                     metavar="LABEL [LABEL ...]",
                     help="Sessions to process (with or without 'ses-').")(f)
    f = click.option("--participant-label", "--participant_label", "participant_label",
                     multiple=True, metavar="LABEL [LABEL ...]",
                     help="Participants to process (with or without 'sub-'); default: all.")(f)
    return f


def run_options(f):
    """Resource and behaviour options shared by train and score."""
    opts = [
        click.option("-w", "--work-dir", "--work_dir", "work_dir",
                     type=click.Path(file_okay=False, path_type=Path),
                     help="Work directory (cache; a re-run resumes from it). "
                          "Default: OUTPUT_DIR/../bids-anomaly-work. Put it on local scratch."),
        click.option("--nprocs", "--n-cpus", "--nthreads", "nprocs", type=click.IntRange(1),
                     help="Processes nipype may run at once (default: all available cores)."),
        click.option("--omp-nthreads", "--omp_nthreads", "omp_nthreads", type=click.IntRange(0),
                     default=0, show_default=True,
                     help="Threads per process (torch, ITK); 0 picks for you."),
        click.option("--mem", "--mem-gb", "--mem_gb", "mem", callback=_parse_mem,
                     help="Memory limit for scheduling, e.g. 8GB."),
        click.option("--device", default="auto", show_default=True, callback=_device,
                     help="auto, cpu, cuda or cuda:N."),
        click.option("--plugin", "--use-plugin", "plugin", type=click.Choice(PLUGINS),
                     default="MultiProc", show_default=True, help="nipype execution plugin."),
        click.option("--plugin-args", "--plugin_args", "plugin_args",
                     callback=_parse_plugin_args,
                     help="nipype plugin arguments as JSON or a JSON file."),
        click.option("--skip-bids-validation", "--skip_bids_validation", is_flag=True,
                     help="Accepted for compatibility: indexing never runs the validator."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Random seed (training split, initialisation, augmentation)."),
        click.option("--resolution", type=click.Choice(["1", "2"]), default="2",
                     show_default=True, help="Template resolution in mm (training)."),
        click.option("--registration", type=click.Choice(["affine", "syn"]), default="affine",
                     show_default=True,
                     help="Registration to the template (training; scoring follows the "
                          "bundle's recipe)."),
        click.option("--brain-extraction", type=click.Choice(["auto", "deepbet", "none"]),
                     default="auto", show_default=True,
                     help="auto: deepbet unless the input is already skull-stripped."),
        click.option("-v", "--verbose", count=True, help="More output (-vv for debug)."),
        QUIET,
        click.option("--notrack", is_flag=True, help="Accepted; the tool never phones home."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _check_level(level: str, allowed=LEVELS) -> str:
    if level not in allowed:
        raise UnknownAnalysisLevelError(
            f"unknown analysis level '{level}' (expected {' or '.join(allowed)})"
        )
    return level


def _build_config(bids_dir, output_dir, kw, contrasts=("T1w",), healthy=()):
    from bids_anomaly.bids_io.discovery import check_bids_root, load_filter_file
    from bids_anomaly.config import PreprocConfig, ResourceConfig, RunConfig, SelectionConfig

    setup_logging(kw.get("verbose", 0))
    check_bids_root(bids_dir)
    filters = load_filter_file(kw["bids_filter_file"]) if kw.get("bids_filter_file") else {}
    work = kw.get("work_dir") or (output_dir.resolve().parent / "bids-anomaly-work")
    res = ResourceConfig(
        **({"nprocs": kw["nprocs"]} if kw.get("nprocs") else {}),
        omp_nthreads=kw.get("omp_nthreads") or 0,
        mem_gb=kw.get("mem"), device=kw.get("device", "auto"),
        plugin=kw.get("plugin", "MultiProc"), plugin_args=kw.get("plugin_args") or {},
    )
    # Absolute paths: nipype runs every node from its own folder.
    return RunConfig(
        bids_dir=bids_dir.resolve(), output_dir=output_dir.resolve(), work_dir=work.resolve(),
        selection=SelectionConfig(
            participant_labels=tuple(p.removeprefix("sub-")
                                     for p in kw.get("participant_label", ())),
            session_labels=tuple(s.removeprefix("ses-") for s in kw.get("session_label", ())),
            bids_filters=filters, contrasts=tuple(contrasts), healthy_filter=tuple(healthy)),
        resources=res,
        preproc=PreprocConfig(resolution=int(kw.get("resolution", 2)),
                              brain_extraction=kw.get("brain_extraction", "auto"),
                              registration=kw.get("registration", "affine")),
        seed=kw.get("seed", 0), verbose=kw.get("verbose", 0), progress=_progress(kw),
        command=" ".join(shlex.quote(a) for a in ["bids-anomaly", *sys.argv[1:]]),
    )


class BidsAppGroup(click.Group):
    """A group that also accepts the BIDS-App form ``BIDS_DIR OUTPUT_DIR LEVEL``."""

    def parse_args(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=BidsAppGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="bids-anomaly",
                      message="%(prog)s %(version)s")
def main_group():
    """Unsupervised anomaly detection in brain MRI, as a BIDS App.

    \b
    Learn what healthy brains look like, then flag what a new scan's model cannot
    reconstruct: tumours, lesions, the unexpected.

    \b
    Quick start (no data needed):   bids-anomaly demo /tmp/demo
    BIDS-App form:                  bids-anomaly BIDS_DIR OUTPUT_DIR participant --model NAME
    Train on healthy participants:  bids-anomaly train BIDS_DIR OUTPUT_DIR \\
                                        --healthy-filter group=control
    """


@main_group.command("run", hidden=True, context_settings=CONTEXT)
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.argument("analysis_level")
@click.option("--model", "-m", help="Model bundle: a path, or a name under OUTPUT_DIR/models.")
@selection_options
@run_options
def run_cmd(bids_dir, output_dir, analysis_level, model, **kw):
    """BIDS-App form: participant = score, group = group report."""
    _check_level(analysis_level)
    if analysis_level == "group":
        _group(bids_dir, output_dir, kw)
    else:
        _score(bids_dir, output_dir, model, kw)


def _score(bids_dir, output_dir, model, kw):
    from bids_anomaly.runner import run_participant

    if not model:
        raise UsageError("the participant level needs --model (a bundle path or name)")
    cfg = _build_config(bids_dir, output_dir, kw)
    summary = run_participant(cfg, model)
    print_summary(summary)
    sys.exit(int(summary.exit_code))


def _group(bids_dir, output_dir, kw):
    from bids_anomaly.bids_io.discovery import check_bids_root
    from bids_anomaly.runner import run_group

    setup_logging(kw.get("verbose", 0))
    check_bids_root(bids_dir)
    print_summary(run_group(output_dir, _progress(kw)))


@main_group.command("train", context_settings=CONTEXT)
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--healthy-filter", "--healthy_filter", "healthy_filter", multiple=True,
              callback=_parse_healthy, metavar="COLUMN=VALUE",
              help="participants.tsv filter for the healthy cohort (repeatable; default: all "
                   "selected participants, with a warning).")
@click.option("--model-type", "--model_type", "model_type", default="dae", show_default=True,
              type=ModelChoice(), help="Model to train.")
@click.option("--model-name", "--model_name", "model_name",
              help="Bundle name under OUTPUT_DIR/models (default: the model type).")
@click.option("--model-config", "--model_config", "model_config",
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="JSON file of hyper-parameters overriding the model's defaults.")
@click.option("--contrasts", default="T1w", show_default=True,
              help="Comma-separated input contrasts (T1w first), e.g. T1w,FLAIR.")
@click.option("--resume", is_flag=True, help="Continue from the last training checkpoint.")
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True,
              help="k-fold cross-fitting: k models, each calibrated on the participants it "
                   "never saw, then the shipped model on everyone (capped at the cohort size).")
@selection_options
@run_options
def train_cmd(bids_dir, output_dir, healthy_filter, model_type, model_name, model_config,
              contrasts, resume, folds, **kw):
    """Train a normative model on healthy participants and write a model bundle.

    \b
    The bundle goes to OUTPUT_DIR/models/NAME: model.json (model card), weights.safetensors,
    the healthy reference (out-of-fold: every healthy participant scored by a fold model that
    never saw it), and a training report.
    Example:
      bids-anomaly train /data/ixi /data/ixi/derivatives/bids-anomaly --healthy-filter group=control
    """
    from bids_anomaly.config import CONTRASTS, TrainConfig
    from bids_anomaly.runner import run_train

    cons = [c.strip() for c in contrasts.split(",") if c.strip()]
    if not cons or cons[0] != "T1w" or any(c not in CONTRASTS for c in cons):
        raise UsageError(f"--contrasts must start with T1w and use {', '.join(CONTRASTS)}")
    mcfg = {}
    if model_config:
        try:
            mcfg = json.loads(model_config.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"--model-config {model_config} is not valid JSON: {exc}") from exc
    cfg = _build_config(bids_dir, output_dir, kw, contrasts=cons, healthy=healthy_filter)
    summary = run_train(cfg, TrainConfig(model_type=model_type, model_name=model_name,
                                         model_config=mcfg, resume=resume, folds=folds))
    print_summary(summary)
    sys.exit(int(summary.exit_code))


@main_group.command("calibrate", context_settings=CONTEXT)
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--model", "-m", required=True,
              help="Model bundle to re-reference: a path, or a name under OUTPUT_DIR/models.")
@click.option("--healthy-filter", "--healthy_filter", "healthy_filter", multiple=True,
              callback=_parse_healthy, metavar="COLUMN=VALUE",
              help="participants.tsv filter for this site's healthy controls (repeatable; "
                   "default: all selected participants, with a warning).")
@click.option("--model-name", "--model_name", "model_name",
              help="Name of the new bundle under OUTPUT_DIR/models (default: MODEL-<dataset>).")
@selection_options
@run_options
def calibrate_cmd(bids_dir, output_dir, model, healthy_filter, model_name, **kw):
    """Re-reference a model bundle to a new site's healthy controls (weights untouched).

    \b
    The bundle's model reconstructs each control; their residuals set new voxel-wise
    statistics, voxel thresholds and the healthy score distribution. The new bundle
    (OUTPUT_DIR/models/NAME) names the cohort its scores are relative to.
    Example:
      bids-anomaly calibrate /data/siteB /data/siteB/derivatives/bids-anomaly \\
          --model /models/dae --healthy-filter group=control
    """
    from bids_anomaly.runner import run_calibrate

    cfg = _build_config(bids_dir, output_dir, kw, healthy=healthy_filter)
    summary = run_calibrate(cfg, model, model_name)
    print_summary(summary)
    sys.exit(int(summary.exit_code))


@main_group.command("score", context_settings=CONTEXT)
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.argument("analysis_level", default="participant")
@click.option("--model", "-m", required=True,
              help="Model bundle: a path, or a name under OUTPUT_DIR/models.")
@selection_options
@run_options
def score_cmd(bids_dir, output_dir, analysis_level, model, **kw):
    """Score participants with a trained model: anomaly maps, masks, scores, reports.

    \b
    Example:
      bids-anomaly score /data/cohort /data/cohort/derivatives/bids-anomaly participant \\
          --model /models/dae --participant-label 01 02
    """
    _check_level(analysis_level, ("participant",))
    _score(bids_dir, output_dir, model, kw)


@main_group.command("report", context_settings=CONTEXT)
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.argument("analysis_level")
@selection_options
@click.option("-v", "--verbose", count=True)
@QUIET
def report_cmd(bids_dir, output_dir, analysis_level, verbose, quiet, participant_label, **_):
    """Rebuild the HTML reports from existing derivatives (nothing is recomputed)."""
    from bids_anomaly.runner import run_reports

    _check_level(analysis_level)
    setup_logging(verbose)
    if not output_dir.is_dir():
        from bids_anomaly.errors import MissingInputError

        raise MissingInputError(f"OUTPUT_DIR {output_dir} does not exist")
    subjects = [p.removeprefix("sub-") for p in participant_label] or None
    print_summary(run_reports(output_dir, analysis_level, subjects,
                              _progress({"quiet": quiet})))


@main_group.command("evaluate", context_settings=CONTEXT)
@click.argument("output_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--labels", required=True, type=click.Path(path_type=Path),
              help="Labels derivative dataset with *_label-lesion_mask.nii.gz per scan.")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="Where to write the evaluation tables (default: the first OUTPUT_DIR).")
@click.option("-v", "--verbose", count=True)
def evaluate_cmd(output_dirs, labels, out, verbose):
    """Voxel and scan-level metrics of one or more scored OUTPUT_DIRs against lesion masks.

    \b
    Several OUTPUT_DIRs (one per model) are compared side by side. The tables go to --out
    (default: the first OUTPUT_DIR); when that folder holds group_anomaly.tsv its
    group_report.html is rebuilt with an Evaluation section.
    """
    from bids_anomaly.evaluation import evaluate_outputs, write_evaluation

    setup_logging(verbose)
    result = evaluate_outputs(list(output_dirs), labels)
    paths = write_evaluation(result, out or output_dirs[0])
    print_evaluation(result)
    console.print(f"Tables: {', '.join(str(p) for p in paths if p.suffix == '.tsv')}")
    for p in paths:
        if p.suffix == ".html":
            console.print(f"Group report (with an Evaluation section): {p}")


@main_group.command("info", context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info_cmd(bundle, as_json):
    """Show a model bundle's card (checksums verified): model, contrasts, template,
    training cohort, healthy reference, thresholds, software versions.

    \b
    A bundle whose files do not match model.json fails with exit code 65.
    Example:
      bids-anomaly info /data/ixi/derivatives/bids-anomaly/models/dae
    """
    from bids_anomaly.bundle_info import bundle_info

    info = bundle_info(bundle)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=2, default=str))
        return
    print_card(info.rows())


@main_group.command("demo", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--n-healthy", default=12, show_default=True, type=click.IntRange(3))
@click.option("--n-patients", default=4, show_default=True, type=click.IntRange(1))
@click.option("--minutes", default=3.0, show_default=True, type=click.FloatRange(0.1),
              help="Training time budget for the dae model.")
@click.option("--nprocs", type=click.IntRange(1), help="Processes (default: all cores).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-v", "--verbose", count=True)
@QUIET
def demo_cmd(directory, n_healthy, n_patients, minutes, nprocs, seed, verbose, quiet):
    """Generate a synthetic cohort, train dae and zscore, score, report and evaluate.

    Everything is made locally from the MNI152 template shipped with nilearn: no download.
    """
    from bids_anomaly.config import ResourceConfig
    from bids_anomaly.demo import DEMO_DAE, DemoConfig, run_demo
    from bids_anomaly.synth import SynthConfig

    setup_logging(verbose)
    cfg = DemoConfig(
        synth=SynthConfig(n_healthy=n_healthy, n_patients=n_patients, seed=seed),
        dae={**DEMO_DAE, "max_minutes": minutes},
        resources=ResourceConfig(**({"nprocs": nprocs} if nprocs else {})), seed=seed,
        progress=_progress({"quiet": quiet}))
    # Each stage shows its own progress on stderr (the runner's steps); stdout names them.
    result = run_demo(directory, cfg, command="bids-anomaly demo " + str(directory),
                      step=lambda msg: console.log(msg))
    for s in result.summaries:
        if s.failed:
            print_summary(s)
    print_evaluation(result.evaluation)
    console.print(f"\n[bold]Demo finished[/] in {sum(result.seconds.values()):.0f} s")
    for model, out in result.outputs.items():
        console.print(f"  {model:7s} group report: {out / 'group_report.html'}")
    first = next(iter(result.outputs.values()))
    reports = sorted(first.glob("sub-*.html"))
    if reports:
        console.print(f"  participant reports: {first}/sub-*.html ({len(reports)} files)")
    console.print(f"  model bundles: {first / 'models'}")
    bad = [s for s in result.summaries if s.failed]
    sys.exit(1 if bad else 0)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by the SIGINT/SIGTERM handler (carries the signal number)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum, frame):
    # Only the first signal interrupts; cleanup (stopping workers, a few seconds at most)
    # must not itself be interrupted by a second Ctrl-C or a repeated SIGTERM.
    if getattr(_on_signal, "fired", False):
        return
    _on_signal.fired = True
    raise Interrupted(signum)


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM stop the run cleanly (exit 130 / 143).

    The runner then stops nipype's workers (found through /proc, see
    ``bids_anomaly.runner.stop_children``), removes temporary files and reports which scans
    finished. No process group is created: SLURM/scancel and a terminal's Ctrl-C signal the
    whole job or foreground group, which still includes every worker.
    """
    _on_signal.fired = False
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread (main() called in-process): keep the defaults
        pass


def _interrupted(exc: KeyboardInterrupt) -> None:
    signum = getattr(exc, "signum", signal.SIGINT)
    name = signal.Signals(signum).name
    finished = getattr(exc, "finished", None)
    pending = getattr(exc, "pending", None)
    if finished is None:
        detail = "nothing was running yet"
    elif getattr(exc, "level", "") == "train":
        detail = ("the model bundle was not written" if pending else
                  "the model bundle was complete") + "; preprocessed scans stay in the work dir"
    else:
        detail = (f"{len(finished)} of {len(finished) + len(pending)} scan(s) finished"
                  + (f" ({', '.join(finished)})" if finished else ""))
    console.print(f"[red]Interrupted by {name}:[/] {detail}; finished outputs are kept and "
                  "no temporary files remain; re-run the same command (same -w) to resume.",
                  highlight=False, soft_wrap=True)
    sys.stdout.flush()
    sys.stderr.flush()
    import logging

    logging.shutdown()
    if not isinstance(exc, Interrupted):
        sys.exit(128 + int(signum))
    # os._exit: the interpreter's atexit hooks would wait for nipype's process pool.
    os._exit(128 + int(signum))


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit codes follow the BIDS Apps spec draft (click's 2 becomes 64)."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    install_signal_handlers()
    args = expand_greedy(list(sys.argv[1:] if argv is None else argv))
    try:
        main_group.main(args=args, prog_name="bids-anomaly", standalone_mode=False)
    except click.exceptions.NoSuchOption as exc:
        exc.show()
        sys.exit(int(ExitCode.USAGE))
    except click.exceptions.UsageError as exc:
        exc.show()
        sys.exit(int(ExitCode.USAGE))
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click wraps Ctrl-C/SIGTERM
            _interrupted(exc.__cause__)
        console.print("[red]Aborted.[/]")
        sys.exit(130)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BidsAnomalyError as exc:
        console.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(int(exc.exit_code))
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
