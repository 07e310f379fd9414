"""SIGINT / SIGTERM: stop the run cleanly and exit 130 / 143 with what finished.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from bids_anomaly.core.interrupt import INTERRUPT_HANDLED

from .console import console


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
    threading.Thread(target=_until_handled, args=(signum,), name="interrupt-watchdog",
                     daemon=True).start()
    raise Interrupted(signum)


def _until_handled(signum: int, every_s: float = 0.5) -> None:
    """Send the signal again until the run has started handling it.

    The handler's exception can be lost: a signal that lands while the main thread runs a
    ``__del__`` or a weakref callback (pybids' SQLAlchemy session cleans up that way) raises
    there, and Python drops it ("Exception ignored in ..."), as does any library's bare
    ``except:``. The run would then go on as if never signalled (seen in CI). Until the runner
    or the CLI sets ``INTERRUPT_HANDLED``, this re-arms the handler and re-sends the signal.
    """
    if not INTERRUPT_HANDLED.wait(every_s):
        _on_signal.fired = False  # the handler runs again and starts the next watchdog
        os.kill(os.getpid(), signum)


def _quiet_when_dropped(unraisable) -> None:
    """``sys.unraisablehook``: a dropped interrupt is re-sent (above), not printed."""
    if not isinstance(unraisable.exc_value, Interrupted):
        _previous_hook(unraisable)


_previous_hook = sys.unraisablehook


def install_signal_handlers() -> None:
    """SIGINT and SIGTERM stop the run cleanly (exit 130 / 143).

    The runner then stops nipype's workers (found through /proc, see
    ``bids_anomaly.core.interrupt.stop_children``), removes temporary files and reports which scans
    finished. No process group is created: SLURM/scancel and a terminal's Ctrl-C signal the
    whole job or foreground group, which still includes every worker. An interrupt that lands
    where Python drops it (inside a finalizer) is sent again (``_until_handled``).
    """
    global _previous_hook
    _on_signal.fired = False
    INTERRUPT_HANDLED.clear()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread (main() called in-process): keep the defaults
        return
    if sys.unraisablehook is not _quiet_when_dropped:
        _previous_hook = sys.unraisablehook
        sys.unraisablehook = _quiet_when_dropped


def report_interrupted(exc: KeyboardInterrupt) -> None:
    INTERRUPT_HANDLED.set()
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
