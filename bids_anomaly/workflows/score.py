"""``init_score_wf``: per scan, a Score node connected to its DerivativesSink."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nipype import Node, Workflow

from ..bids_io.discovery import ScanInput
from .base import node_name
from .interfaces import DerivativesSink, Score


@dataclass(frozen=True)
class ScoreTarget:
    """Where scoring reads and writes: the bundle, the BIDS dataset, OUTPUT_DIR."""

    bundle: Path
    bundle_sha256: str  # model.json's checksum: a new card or calibration re-scores
    resolution: int
    bids_dir: Path
    output_dir: Path
    provenance: dict


def init_score_wf(scans: list[ScanInput], preproc: dict[str, Path], target: ScoreTarget,
                  work_dir: Path, device: str, threads: int,
                  name: str = "score_wf") -> tuple[Workflow, dict[str, list[Node]]]:
    """The scoring workflow and, per scan id, its nodes in execution order.

    ``Score`` (:func:`~bids_anomaly.inference.score_scan.score_preprocessed`) writes the
    statmaps, mask, clusters and summary in its node folder; ``DerivativesSink``
    (:func:`~bids_anomaly.bids_io.derivatives.sink_scan`) copies them into OUTPUT_DIR with
    BIDS names and sidecars. Scans without a ``preproc`` result get no nodes."""
    wf = Workflow(name=name, base_dir=str(work_dir))
    chains: dict[str, list[Node]] = {}
    for scan in scans:
        sid = scan.key.scan_id
        if sid not in preproc:
            continue
        score = Node(Score(), name=node_name("score", sid), n_procs=threads, mem_gb=1.0)
        score.inputs.preproc = str(preproc[sid])
        score.inputs.bundle = str(Path(target.bundle).resolve())
        score.inputs.bundle_sha256 = target.bundle_sha256
        score.inputs.device = device
        score.inputs.threads = threads
        score.inputs.use_gpu = device.startswith("cuda")
        sink = Node(DerivativesSink(), name=node_name("sink", sid))
        sink.overwrite = True
        sink.inputs.output_dir = str(Path(target.output_dir).resolve())
        sink.inputs.bids_dir = str(Path(target.bids_dir).resolve())
        sink.inputs.key = {"subject": scan.key.subject, "session": scan.key.session,
                           "run": scan.key.run, "acquisition": scan.key.acquisition}
        sink.inputs.preproc = str(preproc[sid])
        sink.inputs.sources = {c: str(p.resolve()) for c, p in scan.files.items()}
        sink.inputs.provenance = target.provenance
        sink.inputs.resolution = target.resolution
        wf.connect(score, "files", sink, "files")
        chains[sid] = [score, sink]
    return wf, chains
