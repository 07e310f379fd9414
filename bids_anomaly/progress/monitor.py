"""Progress of one nipype workflow run, shown in the main process.

nipype's ``status_callback`` says when a node is submitted (``start``) and when it is over
(``end``/``exception``), with every plugin that reports nodes (Linear, MultiProc, SLURM, SGE,
PBS); a thread reads the records nodes write into their own folders (:mod:`.records`): that
a node really started running (on a cluster: left the queue), and the trainer's epochs. The
step shows done/total with an ETA from the rate of nodes that ran (cached nodes finish at
once and do not count), and, for batch plugins, the queued/running/done counts.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .display import Step
from .records import PROGRESS_FILE, Tail

_FOLD = re.compile(r"Fold (\d+)/(\d+)")
_VIEW = re.compile(r"training the (\w+) view \((\d+) of (\d+)\)")


@dataclass
class TrainingView:
    """The trainer's records as one step: model k of K, epoch, losses, speed and ETA."""

    label: str = "training"
    models_total: int | None = None
    model: int = 0
    phase: str = ""
    epoch: dict = field(default_factory=dict)
    model_started: float = field(default_factory=time.monotonic)
    durations: list[float] = field(default_factory=list)
    view: tuple[str, int, int] | None = None  # a multi-view model's view: name, k, of n
    view_started: float = field(default_factory=time.monotonic)

    def feed(self, rec: dict) -> None:
        if rec.get("kind") == "epoch":
            self.epoch = rec
            if not self.model:
                self.model, self.phase = 1, "model 1"
        elif rec.get("kind") == "log":
            msg = str(rec.get("msg", ""))
            view = _VIEW.search(msg)
            if view:
                self.view = (view.group(1), int(view.group(2)), int(view.group(3)))
                self.view_started, self.epoch = time.monotonic(), {}
                return
            fold = _FOLD.search(msg)
            if fold or msg.startswith("Final model"):
                self._next_model()
                if fold:
                    k, n = int(fold.group(1)), int(fold.group(2))
                    self.model, self.models_total, self.phase = k, n + 1, f"fold {k}/{n}"
                else:
                    self.model = (self.models_total or self.model + 1)
                    self.phase = "final model"

    def _next_model(self) -> None:
        now = time.monotonic()
        if self.model:
            self.durations.append(now - self.model_started)
        self.model_started, self.epoch, self.view = now, {}, None

    def changes(self) -> dict:
        """Fields of :class:`~.display.StepState` for the step."""
        e = self.epoch
        parts = [self.phase] if self.phase else []
        if self.view:
            parts.append(f"{self.view[0]} view {self.view[1]}/{self.view[2]}")
        frac_model = 0.0
        eta_model = None
        if e:
            parts.append(f"epoch {e.get('epoch')}/{e.get('epochs')}")
            frac_model = float(e.get("epoch", 0)) / max(1.0, float(e.get("epochs", 1)))
            eta_model = float(e.get("eta_seconds", 0.0))
            if self.view:  # the model's views train one after another
                _, k, n = self.view
                frac_model = (k - 1 + frac_model) / n
                per_view = time.monotonic() - self.view_started + eta_model
                eta_model += (n - k) * per_view
        info = ""
        if e:
            info = (f"loss {float(e.get('train_loss', float('nan'))):.4g} · "
                    f"val {float(e.get('val_loss', float('nan'))):.4g} · "
                    f"{float(e.get('samples_per_s', 0.0)):.0f} slices/s")
        out: dict = {"count": " · ".join(parts), "info": info}
        total = self.models_total
        if total and self.model:
            out["total"], out["done"] = 1.0, min(1.0, (self.model - 1 + frac_model) / total)
            if eta_model is not None:
                elapsed = time.monotonic() - self.model_started
                per_model = (sum(self.durations) / len(self.durations) if self.durations
                             else elapsed + eta_model)
                out["eta_s"] = eta_model + max(0, total - self.model) * per_model
        elif eta_model is not None:
            out["eta_s"] = eta_model
        return out


class WorkflowProgress:
    """A ``status_callback`` for nipype plus a reader thread; feeds ``step``.

    ``items`` are the full names of the nodes the step counts (one per scan); every node of
    the workflow counts towards running/queued. ``batch``: show queued/running/done (cluster
    plugins). ``training``: the trainer's records drive the step instead of node counts.
    """

    def __init__(self, step: Step, node_dirs: dict[str, Path], items: list[str] | None = None,
                 *, batch: bool = False, training: TrainingView | None = None,
                 poll_s: float = 0.5):
        self.step, self.batch, self.training = step, batch, training
        self.node_dirs = node_dirs
        self.items = set(items if items is not None else node_dirs)
        self.poll_s = poll_s
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.submitted: set[str] = set()
        self.running: set[str] = set()
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.ran: set[str] = set()  # nodes seen running in this run (not merely cached)
        self._tails = {name: Tail(Path(d) / PROGRESS_FILE) for name, d in node_dirs.items()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- nipype's callback
    def __call__(self, node, status: str) -> None:
        name = getattr(node, "fullname", str(node))
        with self._lock:
            if status == "start":
                self.submitted.add(name)
            elif status in ("end", "exception"):
                self.done.add(name)
                self.running.discard(name)
                if status == "exception":
                    self.failed.add(name)
        self.refresh()

    # ---------------------------------------------------------------- reading records
    def poll(self) -> None:
        """Read new records of the nodes not yet over, then update the step."""
        with self._lock:
            pending = [n for n in self.submitted | self.running if n not in self.done]
        for name in pending:
            tail = self._tails.get(name)
            if tail is None:
                continue
            for rec in tail.read():
                if float(rec.get("t", 0)) < self.started_wall - 1.0:
                    continue  # left by an earlier run of this node
                if rec.get("kind") == "start":
                    with self._lock:
                        self.running.add(name)
                        self.ran.add(name)
                elif self.training is not None:
                    self.training.feed(rec)
        self.refresh()

    def counts(self) -> dict[str, int]:
        with self._lock:
            over = self.done
            return {"done": len(self.items & over), "total": len(self.items),
                    "ran": len(self.items & over & self.ran),
                    "running": len(self.running - over),
                    "queued": len(self.submitted - self.running - over),
                    "failed": len(self.items & self.failed)}

    def refresh(self) -> None:
        c = self.counts()
        if self.training is not None:
            self.step.update(**self.training.changes())
            return
        if self.batch:
            info = f"queued {c['queued']} · running {c['running']} · done {c['done']}"
        else:
            info = f"{c['running']} running" if c["running"] else ""
        if c["failed"]:
            info += (" · " if info else "") + f"{c['failed']} failed"
        eta = None
        remaining = c["total"] - c["done"]
        if c["ran"] and remaining > 0:
            eta = (time.monotonic() - self.started) / c["ran"] * remaining
        elif remaining == 0:
            eta = 0.0
        self.step.update(done=c["done"], total=c["total"], info=info, eta_s=eta)

    # ---------------------------------------------------------------- thread
    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - progress must never break a run
                pass

    def __enter__(self) -> WorkflowProgress:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="bids-anomaly-progress",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.poll()
        except Exception:  # noqa: BLE001
            pass
