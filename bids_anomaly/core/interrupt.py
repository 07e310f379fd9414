"""Stopping a run cleanly: find and stop worker processes, sweep atomic-write temporaries."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

# Set by whoever starts handling an interrupt (the runner's ``interruptible``, the CLI's
# summary): until then a signal handler may assume its exception was lost and raise it again.
INTERRUPT_HANDLED = threading.Event()


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere), children first."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def stop_children(grace_s: float = 3.0) -> int:
    """Stop every descendant process (nipype workers, the forkserver); return how many.

    Workers first get SIGINT, so Python code unwinds and removes its temporary files, then
    SIGTERM, then SIGKILL. The processes are found through /proc rather than a process
    group: a CLI that called setpgrp() would leave the terminal's foreground group (Ctrl-C
    would no longer reach it) and would escape the process tracking of some batch systems.
    """
    me = os.getpid()
    procs = descendants(me)
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 1.0), (signal.SIGKILL, 1.0)):
        alive = []
        for pid in procs:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except (ProcessLookupError, PermissionError):
                continue
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            for pid in list(alive):
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(pid, os.WNOHANG)
                if not _alive(pid):
                    alive.remove(pid)
            time.sleep(0.05)
        procs = alive
        if not procs:
            break
    return len(descendants(me))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def remove_temp_files(places: list[tuple[Path, str]]) -> list[Path]:
    """Delete atomic-write temporaries (``.NAME.XXXX.tmp*``): (folder, glob) pairs.

    Only this run's folders are swept: other participant-level processes may be writing
    into the same OUTPUT_DIR at the same time.
    """
    removed = []
    for folder, pattern in places:
        if not folder.is_dir():
            continue
        for p in folder.glob(pattern):
            if p.is_file() and ".tmp" in p.name:
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed
