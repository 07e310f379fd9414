"""Building and running the nipype workflows; mapping crashes back to scans."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from nipype import Node, Workflow

from ..bids_io.discovery import ScanInput
from ..config import PreprocConfig, ResourceConfig
from ..errors import ExitCode
from .interfaces import Preprocess

LOG = logging.getLogger("bids_anomaly")

_ERROR_CODES = {
    "DataError": ExitCode.DATA_ERROR,
    "BundleError": ExitCode.DATA_ERROR,
    "MissingInputError": ExitCode.MISSING_INPUT,
    "OutputError": ExitCode.CANNOT_CREATE_OUTPUT,
}


def node_name(prefix: str, scan_id: str) -> str:
    return f"{prefix}_{re.sub(r'[^0-9a-zA-Z]', '', scan_id)}"


@dataclass
class Failure:
    """A scan that did not finish, the reason and the exit code that reason maps to."""

    scan_id: str
    message: str
    code: ExitCode = ExitCode.FAILURE
    crash_file: str | None = None


def configure(wf: Workflow, crash_dir: Path) -> None:
    crash_dir.mkdir(parents=True, exist_ok=True)
    wf.config["execution"].update({
        "crashdump_dir": str(crash_dir),
        "crashfile_format": "txt",
        "stop_on_first_crash": False,
        "hash_method": "content",
        "poll_sleep_duration": 0.01,
        "remove_unnecessary_outputs": False,
        "create_report": False,
        "parameterize_dirs": False,
    })
    wf.config["monitoring"] = {"enabled": False}


def plugin_args(resources: ResourceConfig) -> tuple[str, dict]:
    # forkserver: forked workers of a process whose torch/OpenMP pools are live deadlock.
    args = {"n_procs": resources.nprocs, "raise_insufficient": False,
            "mp_context": "forkserver", **resources.plugin_args}
    if resources.mem_gb:
        args["memory_gb"] = resources.mem_gb
    if resources.plugin == "Linear":
        args = dict(resources.plugin_args)
    return resources.plugin, args


def run_workflow(wf: Workflow, resources: ResourceConfig, crash_dir: Path) -> list[Path]:
    """Run ``wf``; return the crash files it wrote (empty when everything finished)."""
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    level = "INFO" if LOG.getEffectiveLevel() <= logging.DEBUG else "WARNING"
    for key in ("workflow_level", "interface_level", "utils_level"):
        nipype_config.set("logging", key, level)
    nipype_logging.update_logging(nipype_config)
    # Worker processes read their logging levels from NIPYPE_CONFIG_DIR/nipype.cfg.
    cfg_dir = Path(wf.base_dir) / ".nipype"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "nipype.cfg").write_text(
        "[logging]\n" + "".join(f"{k} = {level}\n" for k in
                                 ("workflow_level", "interface_level", "utils_level"))
        + "[execution]\npoll_sleep_duration = 0.01\n[monitoring]\nenabled = false\n")
    os.environ["NIPYPE_CONFIG_DIR"] = str(cfg_dir)
    configure(wf, crash_dir)
    before = set(crash_dir.glob("crash-*"))
    t0 = time.time()
    plugin, args = plugin_args(resources)
    error = None
    try:
        wf.run(plugin=plugin, plugin_args=args)
    except Exception as exc:  # nipype re-raises a node's error after finishing the others
        error = exc
    crashes = [p for p in crash_dir.glob("crash-*")
               if p not in before and p.stat().st_mtime >= t0 - 1]
    if error is not None and not crashes:
        raise error
    return sorted(crashes)


def parse_crash(path: Path) -> tuple[str, str, ExitCode]:
    """(node name, one-line error message, exit code) from a nipype text crash file."""
    text = path.read_text(errors="replace")
    node = re.search(r"^Node: (\S+)", text, re.M)
    match = re.findall(r"bids_anomaly\.errors\.(\w+): (.+)", text)
    if match:
        cls, msg = match[-1]
        return (node.group(1) if node else "", msg.strip(), _ERROR_CODES.get(cls, ExitCode.FAILURE))
    pattern = re.compile(r"\s*\w+(\.\w+)*(Error|Exception)")
    lines = [ln.strip() for ln in text.splitlines() if pattern.match(ln)]
    msg = lines[-1] if lines else "unknown error (see crash file)"
    return (node.group(1) if node else "", msg, ExitCode.FAILURE)


def failures_from_crashes(crashes: list[Path], names: dict[str, str]) -> dict[str, Failure]:
    """Map crash files to scans through ``names`` (node-name fragment → scan id)."""
    out: dict[str, Failure] = {}
    for crash in crashes:
        node, msg, code = parse_crash(crash)
        for fragment, scan_id in names.items():
            if node.endswith(fragment) or f".{fragment}" in node or fragment in crash.name:
                out[scan_id] = Failure(scan_id, msg, code, str(crash))
                break
    return out


def preprocessing_workflow(scans: list[ScanInput], preproc: PreprocConfig, work_dir: Path,
                           threads: int, seed: int, device: str) -> tuple[Workflow, dict]:
    """One Preprocess node per scan (shared by train and score, so the cache is reused)."""
    wf = Workflow(name="preproc_wf", base_dir=str(work_dir))
    nodes = {}
    for scan in scans:
        node = Node(Preprocess(), name=node_name("preproc", scan.key.scan_id),
                    n_procs=threads, mem_gb=1.5)
        node.inputs.t1w = str(scan.t1w)
        node.inputs.extra = {c: str(p) for c, p in scan.files.items() if c != "T1w"}
        node.inputs.config = preproc.to_dict()
        node.inputs.threads = threads
        node.inputs.seed = seed
        node.inputs.device = "cpu" if device == "cpu" else device
        wf.add_nodes([node])
        nodes[scan.key.scan_id] = node
    return wf, nodes


def node_result_file(wf: Workflow, node: Node, output: str) -> Path | None:
    """The output file of a finished node, read from its result in the work directory."""
    from nipype.pipeline.engine.utils import load_resultfile

    res = Path(wf.base_dir) / wf.name / node.name / f"result_{node.name}.pklz"
    if not res.exists():
        return None
    try:
        result = load_resultfile(str(res))
    except Exception:
        return None
    value = getattr(result.outputs, output, None) if result.outputs else None
    return Path(value) if value else None
