"""The command line's shared options, their parsers, and the run configuration they build.

The fMRIPrep/MRIQC spellings are accepted ('-' and '_'); ``--model-type`` offers the model
registry's names (imported, with torch, only when the option is parsed or shown).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import click

from bids_anomaly.core.errors import UnknownAnalysisLevelError

from .console import setup_logging

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


def parse_healthy(ctx, param, values):
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


def progress_config(kw):
    from bids_anomaly.core.config import ProgressConfig

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
                     help="Threads per node (deepbet and model inference/training; ANTs "
                          "and N4 always run on one, so results never depend on it). 0: the "
                          "cores shared out between the scans that run at once (one "
                          "participant gets them all)."),
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
        click.option("--registration", type=click.Choice(["affine", "affine-coarse", "syn"]),
                     default="affine", show_default=True,
                     help="Registration to the template (training; scoring follows the "
                          "bundle's recipe). affine-coarse skips the affine's full-resolution "
                          "level: 2-3x faster, within about 0.6 mm RMS of affine; for tests "
                          "and quick looks (the quality benchmarks use affine)."),
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


def check_level(level: str, allowed=LEVELS) -> str:
    if level not in allowed:
        raise UnknownAnalysisLevelError(
            f"unknown analysis level '{level}' (expected {' or '.join(allowed)})"
        )
    return level


def build_config(bids_dir, output_dir, kw, contrasts=("T1w",), healthy=()):
    from bids_anomaly.bids_io.discovery import check_bids_root, load_filter_file
    from bids_anomaly.core.config import PreprocConfig, ResourceConfig, RunConfig, SelectionConfig

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
        seed=kw.get("seed", 0), verbose=kw.get("verbose", 0), progress=progress_config(kw),
        command=" ".join(shlex.quote(a) for a in ["bids-anomaly", *sys.argv[1:]]),
    )


class BidsAppGroup(click.Group):
    """A group that also accepts the BIDS-App form ``BIDS_DIR OUTPUT_DIR LEVEL``."""

    def parse_args(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)
