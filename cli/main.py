"""``bids-anomaly``: the entry point, mapping outcomes to exit codes (BIDS Apps spec draft).

0 success, 64 usage (click's 2), the library's ``ExitCode`` for its errors, 128 + signal
number when interrupted. The commands are in :mod:`.run`, their options in :mod:`.parser`.
"""

from __future__ import annotations

import os
import sys

import click

from bids_anomaly.core.errors import BidsAnomalyError, ExitCode
from bids_anomaly.core.interrupt import INTERRUPT_HANDLED

from .argv import expand_greedy
from .console import console
from .run import main_group
from .signals import install_signal_handlers, report_interrupted


def main(argv: list[str] | None = None) -> None:
    """Entry point: exit codes follow the BIDS Apps spec draft (click's 2 becomes 64)."""
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    install_signal_handlers()
    args = expand_greedy(list(sys.argv[1:] if argv is None else argv))
    try:
        main_group.main(args=args, prog_name="bids-anomaly", standalone_mode=False)
    except click.exceptions.NoSuchOption as exc:
        exc.show()
        sys.exit(int(ExitCode.USAGE))
    except click.exceptions.UsageError as exc:
        exc.show()
        sys.exit(int(ExitCode.USAGE))
    except click.exceptions.Abort as exc:
        INTERRUPT_HANDLED.set()  # no watchdog re-sends the signal while this exits
        if isinstance(exc.__cause__, KeyboardInterrupt):  # click wraps Ctrl-C/SIGTERM
            report_interrupted(exc.__cause__)
        console.print("[red]Aborted.[/]")
        sys.exit(130)
    except KeyboardInterrupt as exc:
        report_interrupted(exc)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BidsAnomalyError as exc:
        console.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(int(exc.exit_code))
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
