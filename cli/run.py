"""The ``bids-anomaly`` commands: train, calibrate, score, report, evaluate, info, demo, and the
BIDS-App positional form (``BIDS_DIR OUTPUT_DIR LEVEL``, the hidden ``run`` command).

Each parses and validates its options, builds the configuration dataclasses, calls one library
function (``bids_anomaly.runner``, ``evaluation``, ``models.bundle_info``, ``runner.demo``) and
prints the result; all science lives in the library.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bids_anomaly import __version__
from bids_anomaly.core.errors import UsageError

from .console import console, print_card, print_evaluation, print_summary, setup_logging
from .parser import (
    CONTEXT,
    QUIET,
    BidsAppGroup,
    ModelChoice,
    build_config,
    check_level,
    parse_healthy,
    progress_config,
    run_options,
    selection_options,
)


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
    check_level(analysis_level)
    if analysis_level == "group":
        _group(bids_dir, output_dir, kw)
    else:
        _score(bids_dir, output_dir, model, kw)


def _score(bids_dir, output_dir, model, kw):
    from bids_anomaly.runner.participant import run_participant

    if not model:
        raise UsageError("the participant level needs --model (a bundle path or name)")
    cfg = build_config(bids_dir, output_dir, kw)
    summary = run_participant(cfg, model)
    print_summary(summary)
    sys.exit(int(summary.exit_code))


def _group(bids_dir, output_dir, kw):
    from bids_anomaly.bids_io.discovery import check_bids_root
    from bids_anomaly.runner.reports import run_group

    setup_logging(kw.get("verbose", 0))
    check_bids_root(bids_dir)
    print_summary(run_group(output_dir, progress_config(kw)))


@main_group.command("train", context_settings=CONTEXT)
@click.argument("bids_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--healthy-filter", "--healthy_filter", "healthy_filter", multiple=True,
              callback=parse_healthy, metavar="COLUMN=VALUE",
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
    from bids_anomaly.core.config import CONTRASTS, TrainConfig
    from bids_anomaly.runner.train import run_train

    cons = [c.strip() for c in contrasts.split(",") if c.strip()]
    if not cons or cons[0] != "T1w" or any(c not in CONTRASTS for c in cons):
        raise UsageError(f"--contrasts must start with T1w and use {', '.join(CONTRASTS)}")
    mcfg = {}
    if model_config:
        try:
            mcfg = json.loads(model_config.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"--model-config {model_config} is not valid JSON: {exc}") from exc
    cfg = build_config(bids_dir, output_dir, kw, contrasts=cons, healthy=healthy_filter)
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
              callback=parse_healthy, metavar="COLUMN=VALUE",
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
    from bids_anomaly.runner.train import run_calibrate

    cfg = build_config(bids_dir, output_dir, kw, healthy=healthy_filter)
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
    check_level(analysis_level, ("participant",))
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
    from bids_anomaly.runner.reports import run_reports

    check_level(analysis_level)
    setup_logging(verbose)
    if not output_dir.is_dir():
        from bids_anomaly.core.errors import MissingInputError

        raise MissingInputError(f"OUTPUT_DIR {output_dir} does not exist")
    subjects = [p.removeprefix("sub-") for p in participant_label] or None
    print_summary(run_reports(output_dir, analysis_level, subjects,
                              progress_config({"quiet": quiet})))


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
    from bids_anomaly.models.bundle_info import bundle_info

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
    from bids_anomaly.core.config import ResourceConfig
    from bids_anomaly.runner.demo import DEMO_DAE, DemoConfig, run_demo
    from bids_anomaly.synth.config import SynthConfig

    setup_logging(verbose)
    cfg = DemoConfig(
        synth=SynthConfig(n_healthy=n_healthy, n_patients=n_patients, seed=seed),
        dae={**DEMO_DAE, "max_minutes": minutes},
        resources=ResourceConfig(**({"nprocs": nprocs} if nprocs else {})), seed=seed,
        progress=progress_config({"quiet": quiet}))
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
