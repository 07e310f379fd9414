"""Building and running the nipype workflows; each node's outcome, found by its exact name."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nipype import Node, Workflow

from ..core.config import ResourceConfig
from ..core.errors import ExitCode

LOG = logging.getLogger("bids_anomaly")

_ERROR_CODES = {
    "DataError": ExitCode.DATA_ERROR,
    "BundleError": ExitCode.DATA_ERROR,
    "MissingInputError": ExitCode.MISSING_INPUT,
    "OutputError": ExitCode.CANNOT_CREATE_OUTPUT,
}


_NODE_SAFE = re.compile(r"[^0-9A-Za-z_-]")


def node_name(prefix: str, scan_id: str) -> str:
    """``<prefix>_<scan id>``: one name per scan id (nipype allows only ``[A-Za-z0-9_-]``).

    A scan id with other characters is cleaned and gets a short hash of the original, so two
    ids never share a node (and its work directory).
    """
    safe = _NODE_SAFE.sub("_", scan_id)
    if safe != scan_id:
        safe += "_" + hashlib.sha256(scan_id.encode()).hexdigest()[:10]
    return f"{prefix}_{safe}"


@dataclass
class Failure:
    """A scan that did not finish, the reason and the exit code that reason maps to."""

    scan_id: str
    message: str
    code: ExitCode = ExitCode.FAILURE
    crash_file: str | None = None


_EVENT_STATES = {"start": "started", "exception": "failed", "end": "finished"}


class NodeEvents:
    """nipype's ``status_callback``: what happened to each node (by full name) in one run.

    States: ``started``, ``finished`` (ran, or was cached: MultiProc says "end" without
    "start" then), ``failed`` (final, even when nipype says "end" afterwards) and ``skipped``
    (downstream of a failed node; the Linear plugin reports those as "end").
    """

    def __init__(self) -> None:
        self.states: dict[str, str] = {}

    def __call__(self, node: Node, status: str) -> None:
        if self.states.get(node.fullname) != "failed" and status in _EVENT_STATES:
            self.states[node.fullname] = _EVENT_STATES[status]

    def mark_skipped(self, wf: Workflow) -> None:
        """Nodes downstream of a failed node did not run, whatever the plugin said."""
        import networkx as nx

        graph = wf._graph  # noqa: SLF001 - the workflow's own node graph
        full = {node: f"{wf.name}.{node.name}" for node in graph.nodes}
        for node in graph.nodes:
            if self.states.get(full[node]) == "failed":
                for dep in nx.descendants(graph, node):
                    if self.states.get(full[dep]) != "failed":
                        self.states[full[dep]] = "skipped"


@dataclass
class WorkflowRun:
    """What one run of a workflow left: node states, this run's crash files, nipype's error."""

    wf: Workflow
    started: float
    states: dict[str, str] | None  # None: the plugin does not report nodes (Graph plugins)
    crashes: dict[str, Path] = field(default_factory=dict)  # node full name -> crash file
    error: str | None = None  # nipype's own exception, one line

    def fullname(self, node: Node) -> str:
        return f"{self.wf.name}.{node.name}"


def configure(wf: Workflow, crash_dir: Path) -> None:
    """Execution settings; nipype creates ``crash_dir`` when a node first crashes."""
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


GPU_GB_PER_SLOT = 2.0  # a worker's CUDA context plus one scan's deepbet or scoring, with room


def gpu_slots(nprocs: int, device: str) -> int:
    """How many GPU nodes MultiProc may run at once: one per process while the card has
    ``GPU_GB_PER_SLOT`` GiB for each (nipype's default is one per visible GPU, which would
    preprocess and score one participant at a time on a one-GPU machine); 0 off CUDA."""
    if device == "cpu":
        return 0
    import torch

    if not torch.cuda.is_available():
        return 0
    index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    total_gb = torch.cuda.get_device_properties(index).total_memory / 2**30
    return max(1, min(int(nprocs), int(total_gb // GPU_GB_PER_SLOT)))


def plugin_args(resources: ResourceConfig) -> tuple[str, dict]:
    # forkserver: forked workers of a process whose torch/OpenMP pools are live deadlock.
    args = {"n_procs": resources.nprocs, "raise_insufficient": False,
            "mp_context": "forkserver"}
    slots = gpu_slots(resources.nprocs, resources.device)
    if slots:
        args["n_gpu_procs"] = slots
    args.update(resources.plugin_args)
    if resources.mem_gb:
        args["memory_gb"] = resources.mem_gb
    if resources.plugin == "Linear":
        args = dict(resources.plugin_args)
    return resources.plugin, args


_NIPYPE_LOGGERS = ("workflow_level", "interface_level", "utils_level")


def _nipype_level() -> str:
    return "INFO" if LOG.getEffectiveLevel() <= logging.DEBUG else "WARNING"


def worker_config(base_dir: Path | str) -> None:
    """Write ``base_dir/.nipype/nipype.cfg`` and point ``NIPYPE_CONFIG_DIR`` at it: worker
    processes read their logging levels from there when they import nipype, so this must
    happen before the worker server starts (:mod:`.workers`)."""
    level = _nipype_level()
    cfg_dir = Path(base_dir) / ".nipype"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / "nipype.cfg").write_text(
        "[logging]\n" + "".join(f"{k} = {level}\n" for k in _NIPYPE_LOGGERS)
        + "[execution]\npoll_sleep_duration = 0.01\n[monitoring]\nenabled = false\n")
    os.environ["NIPYPE_CONFIG_DIR"] = str(cfg_dir)


def _setup_logging(wf: Workflow) -> None:
    from nipype import config as nipype_config
    from nipype import logging as nipype_logging

    for key in _NIPYPE_LOGGERS:
        nipype_config.set("logging", key, _nipype_level())
    nipype_logging.update_logging(nipype_config)
    worker_config(wf.base_dir)


def node_dirs(wf: Workflow) -> dict[str, Path]:
    """Full name → working folder of every node of ``wf`` (where its progress records go)."""
    return {f"{wf.name}.{name}": Path(wf.base_dir) / wf.name / name
            for name in wf.list_node_names()}


def run_workflow(wf: Workflow, resources: ResourceConfig, crash_dir: Path,
                 on_status: Callable[[Node, str], None] | None = None) -> WorkflowRun:
    """Run ``wf`` and return what each node did; never raises for a node's failure.

    ``crash_dir`` must belong to this run alone (the runner gives each process its own
    ``logs/run-<stamp>-<pid>/``): only crash files written there during the run are read.
    ``on_status`` also gets nipype's node events (progress display).
    """
    _setup_logging(wf)
    configure(wf, crash_dir)
    before = set(crash_dir.glob("crash-*"))
    plugin, args = plugin_args(resources)
    if plugin in ("SLURM", "SGE", "PBS"):
        # Batch plugins ask the scheduler (squeue/qstat) about each pending job at every poll:
        # every 2 s (nipype's default), not 100 times a second. nipype's SLURM plugin names
        # its jobs after LOGNAME, unset in some containers and batch environments.
        wf.config["execution"]["poll_sleep_duration"] = 2.0
        os.environ.setdefault("LOGNAME", os.environ.get("USER") or str(os.getuid()))
    events = None
    if not plugin.endswith("Graph"):  # Graph plugins submit jobs and report nothing back
        events = NodeEvents()
        args["status_callback"] = events if on_status is None else _both(events, on_status)
    run = WorkflowRun(wf, time.time(), None if events is None else events.states)
    try:
        wf.run(plugin=plugin, plugin_args=args)
    except Exception as exc:  # nipype re-raises a node's error after finishing the others
        run.error = error_line(exc)
        LOG.debug("nipype raised: %s", exc)
    if events is not None:
        events.mark_skipped(wf)
    for path in sorted(set(crash_dir.glob("crash-*")) - before):
        node = crash_node(path)
        if node:
            run.crashes[node] = path
    return run


def _both(first: Callable[[Node, str], None], second: Callable[[Node, str], None]
          ) -> Callable[[Node, str], None]:
    def call(node: Node, status: str) -> None:
        first(node, status)
        try:
            second(node, status)
        except Exception as exc:  # noqa: BLE001 - a display must never break a run
            LOG.debug("progress callback failed: %s", exc)
    return call


def error_line(exc: BaseException) -> str:
    """nipype's exception on one line: the innermost ``Error: message`` of its traceback."""
    for err in (exc, exc.__cause__):
        if err is not None:
            msg, _ = parse_traceback(str(err), default="")
            if msg:
                return msg
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def parse_traceback(text: str, default: str = "unknown error (see crash file)"
                    ) -> tuple[str, ExitCode]:
    """(one-line error message, exit code) from a Python traceback."""
    match = re.findall(r"bids_anomaly\.(?:core\.)?errors\.(\w+): (.+)", text)
    if match:
        cls, msg = match[-1]
        return msg.strip(), _ERROR_CODES.get(cls, ExitCode.FAILURE)
    pattern = re.compile(r"\s*\w+(\.\w+)*(Error|Exception)")
    lines = [ln.strip() for ln in text.splitlines() if pattern.match(ln)]
    return (lines[-1] if lines else default), ExitCode.FAILURE


def crash_node(path: Path) -> str:
    """The full node name (``wf.node``) on a text crash file's ``Node:`` line, or ''."""
    try:
        with open(path, errors="replace") as fh:
            first = fh.readline()
    except OSError:
        return ""
    match = re.match(r"Node: (\S+)", first)
    return match.group(1) if match else ""


def parse_crash(path: Path) -> tuple[str, str, ExitCode]:
    """(node name, one-line error message, exit code) from a nipype text crash file."""
    text = path.read_text(errors="replace")
    node = re.search(r"^Node: (\S+)", text, re.M)
    msg, code = parse_traceback(text)
    return (node.group(1) if node else "", msg, code)


def result_path(wf: Workflow, node: Node) -> Path:
    """nipype's result file of ``node`` (written for finished and failed nodes alike)."""
    return Path(wf.base_dir) / wf.name / node.name / f"result_{node.name}.pklz"


class ResultError(Exception):
    """A node's result file is missing or cannot be read (the message says which and why)."""


def load_result(wf: Workflow, node: Node):
    """The node's ``InterfaceResult``; :class:`ResultError` naming the file and the cause."""
    from nipype.pipeline.engine.utils import load_resultfile

    res = result_path(wf, node)
    if not res.exists():
        raise ResultError(f"{node.name}: no result file {res}")
    try:
        return load_resultfile(str(res))
    except Exception as exc:  # noqa: BLE001 - any cause is reported, with its type
        raise ResultError(f"{node.name}: cannot read result file {res} "
                          f"({type(exc).__name__}: {exc})") from exc


def node_failure(run: WorkflowRun, node: Node, scan_id: str
                 ) -> tuple[object | None, Failure | None]:
    """(``InterfaceResult``, None) when ``node`` finished in ``run``, else (None, Failure).

    A node is matched to its crash file and its result by its exact full name, never by a
    part of it.
    """
    full = run.fullname(node)
    crash = run.crashes.get(full)
    if crash is not None:
        _, msg, code = parse_crash(crash)
        return None, Failure(scan_id, msg, code, str(crash))
    state = None if run.states is None else run.states.get(full)
    if run.states is not None and state != "finished":
        return None, _unfinished(run, node, scan_id, state)
    try:
        result = load_result(run.wf, node)
    except ResultError as exc:
        return None, Failure(scan_id, str(exc))
    tb = getattr(getattr(result, "runtime", None), "traceback", None)
    if tb:
        msg, code = parse_traceback(str(tb))
        return None, Failure(scan_id, msg, code)
    return result, None


def _unfinished(run: WorkflowRun, node: Node, scan_id: str, state: str | None) -> Failure:
    """Why a node that did not finish failed, without a crash file of its own."""
    res = result_path(run.wf, node)
    if state == "failed" and res.exists() and res.stat().st_mtime >= run.started - 0.05:
        try:
            tb = getattr(load_result(run.wf, node).runtime, "traceback", None)
        except ResultError as exc:
            return Failure(scan_id, str(exc))
        if tb:
            msg, code = parse_traceback(str(tb))
            return Failure(scan_id, msg, code)
    what = {"failed": "failed", "skipped": "did not run (a step before it failed)"}.get(
        state or "", "did not finish")
    why = run.error or "no crash file; see the run's log"
    return Failure(scan_id, f"{node.name} {what}: {why}")


def scan_outcomes(run: WorkflowRun, nodes: dict[str, list[Node]]
                  ) -> tuple[dict[str, object], dict[str, Failure]]:
    """Per scan id: the result of its last node when all its nodes finished, else the first
    failure along its chain of ``nodes`` (in execution order)."""
    done: dict[str, object] = {}
    failed: dict[str, Failure] = {}
    for scan_id, chain in nodes.items():
        result = None
        for node in chain:
            result, failure = node_failure(run, node, scan_id)
            if failure is not None:
                failed[scan_id] = failure
                break
        else:
            done[scan_id] = result
    return done, failed


def result_output(result, output: str) -> Path | None:
    """One output file of a finished node's result (None when it has no such output)."""
    value = getattr(result.outputs, output, None) if result.outputs else None
    return Path(value) if value else None

