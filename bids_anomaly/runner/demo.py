"""The demo: synthetic cohort → train (dae and zscore) → score → group reports → evaluate."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..core.config import (
    PreprocConfig,
    ProgressConfig,
    ResourceConfig,
    RunConfig,
    SelectionConfig,
    TrainConfig,
)
from ..evaluation import EvaluationResult, evaluate_outputs, write_evaluation
from ..synth.cohort import generate_cohort
from ..synth.config import SynthConfig
from .common import RunSummary
from .participant import run_participant
from .reports import run_group
from .train import run_train

LOG = logging.getLogger("bids_anomaly")

# Sized so the whole demo runs in a few minutes on 2 CPU cores: the budget covers the 3 fold
# models and the shipped one.
DEMO_DAE = {"epochs": 30, "patience": 30, "max_minutes": 4.0}
DEMO_FOLDS = 3


@dataclass
class DemoConfig:
    """Demo sizes; tests shrink them."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    dae: dict = field(default_factory=lambda: dict(DEMO_DAE))
    models: tuple[str, ...] = ("dae", "zscore")
    folds: int = DEMO_FOLDS
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    preproc: PreprocConfig = field(default_factory=PreprocConfig)
    seed: int = 0
    progress: ProgressConfig = field(default_factory=ProgressConfig)


@dataclass
class DemoResult:
    root: Path
    bids_dir: Path
    outputs: dict[str, Path]
    evaluation: EvaluationResult
    summaries: list[RunSummary]
    seconds: dict[str, float]


def run_demo(root: Path, cfg: DemoConfig = DemoConfig(), command: str = "",
             step: Callable[[str], None] | None = None) -> DemoResult:
    """Run every stage on a cohort the package generates; return paths and metrics."""
    say = step or (lambda msg: LOG.info(msg))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    say("Generating the synthetic cohort")
    cohort = generate_cohort(root / "rawdata", replace(cfg.synth, seed=cfg.seed))
    seconds["synth"] = time.perf_counter() - t
    work = root / "work"
    main_out = root / "derivatives" / "bids-anomaly"
    base = RunConfig(bids_dir=cohort.root, output_dir=main_out, work_dir=work,
                     selection=SelectionConfig(healthy_filter=(("split", "train"),)),
                     resources=cfg.resources, preproc=cfg.preproc, seed=cfg.seed,
                     command=command, progress=cfg.progress)
    summaries: list[RunSummary] = []
    for model in cfg.models:
        t = time.perf_counter()
        say(f"Training the '{model}' model on {len(cohort.train_subjects)} healthy participants")
        mcfg = cfg.dae if model == "dae" else {}
        summaries.append(run_train(base, TrainConfig(model_type=model, model_config=mcfg,
                                                     folds=cfg.folds)))
        seconds[f"train_{model}"] = time.perf_counter() - t
    test = tuple(cohort.test_healthy_subjects + cohort.patient_subjects)
    outputs = {}
    for model in cfg.models:
        out = main_out if model == cfg.models[0] else root / "derivatives" / f"bids-anomaly-{model}"
        outputs[model] = out
        t = time.perf_counter()
        say(f"Scoring {len(test)} participants with '{model}'")
        run = replace(base, output_dir=out,
                      selection=SelectionConfig(participant_labels=test))
        summaries.append(run_participant(run, str(main_out / "models" / model)))
        summaries.append(run_group(out, cfg.progress))
        seconds[f"score_{model}"] = time.perf_counter() - t
    say("Evaluating against the synthetic lesion masks")
    result = evaluate_outputs([outputs[m] for m in cfg.models], cohort.labels_dir)
    write_evaluation(result, main_out)
    return DemoResult(root, cohort.root, outputs, result, summaries, seconds)
