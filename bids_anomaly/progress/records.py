"""Progress records a nipype node writes into its own folder, for the main process to read.

A node runs in a worker process (MultiProc), in the main process (Linear) or on another
machine (SLURM, SGE, PBS): the one channel all of them share is the work directory. Each node
appends JSON lines to ``<node dir>/progress.jsonl``: ``start`` when its interface begins,
``epoch`` records from the trainer, ``log`` lines of its steps (folds, final model) and
``end``. The main process tails the file (:mod:`.monitor`). Records are small single
``write`` calls, flushed at once; the file is truncated when the node (re)starts.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PROGRESS_FILE = "progress.jsonl"
LOG = logging.getLogger("bids_anomaly")


class NodeProgress:
    """Writer of one node's records (``epoch`` is the trainer's progress callback)."""

    def __init__(self, fh: IO[str]):
        self._fh = fh

    def write(self, kind: str, **fields: object) -> None:
        line = json.dumps({"t": time.time(), "kind": kind, **fields}, default=float)
        self._fh.write(line + "\n")
        self._fh.flush()

    def epoch(self, record: dict) -> None:
        self.write("epoch", **record)


class _StepLog(logging.Handler):
    """Forwards the node's step messages (fold, final model) and its warnings as records."""

    def __init__(self, out: NodeProgress):
        super().__init__(logging.INFO)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        # Per-epoch lines come as epoch records already; warnings and the fit's steps (folds,
        # the final model, a multi-view model's views) stay.
        if record.levelno >= logging.WARNING or \
                record.module in ("fit", "recalibrate", "slice_model"):
            try:
                self.out.write("log", level=record.levelname, msg=record.getMessage())
            except (OSError, ValueError):  # a full disk must not fail the node
                pass


@contextmanager
def node_progress(node_dir: str | Path) -> Iterator[NodeProgress]:
    """Records of the interface running in ``node_dir``: start, what it yields, end."""
    path = Path(node_dir) / PROGRESS_FILE
    log = logging.getLogger("bids_anomaly")
    with open(path, "w", encoding="utf-8") as fh:
        out = NodeProgress(fh)
        out.write("start", pid=os.getpid(), host=socket.gethostname())
        handler = _StepLog(out)
        level = log.level
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)  # a worker's logger: let the step lines through
        log.addHandler(handler)
        ok = False
        try:
            yield out
            ok = True
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
            out.write("end", ok=ok)


@dataclass
class Tail:
    """Reads the records appended to one progress file since the last call."""

    path: Path
    offset: int = 0
    _partial: str = ""

    def read(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:  # truncated: the node restarted
            self.offset, self._partial = 0, ""
        if size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read()
        self.offset += len(chunk)
        text = self._partial + chunk.decode("utf-8", errors="replace")
        lines = text.split("\n")
        self._partial = lines.pop()  # an unfinished last line waits for the next read
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out
