"""Exceptions that carry the exit codes of the BIDS Apps execution spec draft."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes (see DESIGN.md)."""

    OK = 0
    FAILURE = 1
    INVALID_BIDS = 16
    UNKNOWN_LEVEL = 17
    EMPTY_SELECTION = 18
    USAGE = 64
    DATA_ERROR = 65
    MISSING_INPUT = 66
    CANNOT_CREATE_OUTPUT = 73


class BidsAnomalyError(Exception):
    """Base class: a message for the user and the exit code it maps to."""

    exit_code: ExitCode = ExitCode.FAILURE


class UsageError(BidsAnomalyError):
    exit_code = ExitCode.USAGE


class InvalidBidsError(BidsAnomalyError):
    exit_code = ExitCode.INVALID_BIDS


class UnknownAnalysisLevelError(BidsAnomalyError):
    exit_code = ExitCode.UNKNOWN_LEVEL


class EmptySelectionError(BidsAnomalyError):
    exit_code = ExitCode.EMPTY_SELECTION


class DataError(BidsAnomalyError):
    """An input file exists but its content cannot be used (names the file and the problem)."""

    exit_code = ExitCode.DATA_ERROR


class MissingInputError(BidsAnomalyError):
    exit_code = ExitCode.MISSING_INPUT


class OutputError(BidsAnomalyError):
    exit_code = ExitCode.CANNOT_CREATE_OUTPUT


class BundleError(DataError):
    """A model bundle is missing, corrupt or does not fit the scan."""


class TrainingError(BidsAnomalyError):
    """Fitting the model failed (the crash file is named in the message)."""
