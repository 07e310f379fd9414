"""Input discovery with pybids: which scans of BIDS_DIR to process, and with which contrasts."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from ..core.config import SelectionConfig
from ..core.errors import (
    DataError,
    EmptySelectionError,
    ExitCode,
    InvalidBidsError,
    MissingInputError,
)
from ..core.naming import ScanKey

LOG = logging.getLogger("bids_anomaly")

# Default pybids queries per contrast. A contrast-enhanced image (``ce-`` entity) is never
# taken for a plain T1w unless a filter file asks for it.
DEFAULT_QUERIES: dict[str, dict] = {
    "T1w": {"datatype": "anat", "suffix": "T1w", "ceagent": None, "part": None},
    "T2w": {"datatype": "anat", "suffix": "T2w", "ceagent": None, "part": None},
    "FLAIR": {"datatype": "anat", "suffix": "FLAIR", "ceagent": None, "part": None},
}


@dataclass(frozen=True)
class ScanInput:
    """One scan to process: its key and a file per contrast (T1w first).

    ``error`` is set when the scan's inputs cannot be chosen, with ``error_code`` the exit
    code it maps to: two images of one contrast for the scan key (65, ``DATA_ERROR``), or no
    image of an extra contrast the model needs (66, ``MISSING_INPUT``). The runner reports
    the scan as failed with that code and processes the others.
    """

    key: ScanKey
    files: dict[str, Path] = field(default_factory=dict)
    error: str | None = None
    error_code: ExitCode = ExitCode.DATA_ERROR  # meaningful only when ``error`` is set

    @property
    def t1w(self) -> Path:
        return self.files["T1w"]


def check_bids_root(bids_dir: Path) -> None:
    """Fail early (exit 66/16) when BIDS_DIR is missing or does not look like BIDS."""
    if not bids_dir.exists():
        raise MissingInputError(f"BIDS_DIR {bids_dir} does not exist")
    if not bids_dir.is_dir():
        raise InvalidBidsError(f"BIDS_DIR {bids_dir} is not a directory")
    desc = bids_dir / "dataset_description.json"
    if not desc.is_file():
        raise InvalidBidsError(
            f"{bids_dir} does not look like a BIDS dataset: dataset_description.json is missing"
        )
    try:
        json.loads(desc.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidBidsError(f"{desc} is not valid JSON: {exc}") from exc


def load_filter_file(path: Path) -> dict:
    """Read a ``--bids-filter-file`` (fMRIPrep style: ``{"t1w": {...}, "flair": {...}}``)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise MissingInputError(f"BIDS filter file {path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"BIDS filter file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"BIDS filter file {path} must map contrast names to entity filters")
    known = {c.lower(): c for c in DEFAULT_QUERIES}
    out = {}
    for key, value in data.items():
        if key.lower() not in known:
            raise DataError(
                f"BIDS filter file {path}: unknown contrast '{key}' "
                f"(expected one of {', '.join(sorted(known))})"
            )
        out[known[key.lower()]] = value
    return out


def _layout(bids_dir: Path, database_dir: Path | None, validate: bool):
    from bids import BIDSLayout, BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(validate=validate, ignore=["derivatives", "sourcedata", "code"])
    kwargs = {}
    if database_dir is not None:
        # One index per dataset, rebuilt each run: a stale index would hide new files, and a
        # shared one would answer for another dataset.
        key = hashlib.sha1(str(bids_dir.resolve()).encode()).hexdigest()[:12]
        db = database_dir / f"{bids_dir.resolve().name}-{key}"
        db.mkdir(parents=True, exist_ok=True)
        kwargs["database_path"] = str(db)
        kwargs["reset_database"] = True
    try:
        return BIDSLayout(str(bids_dir), indexer=indexer, **kwargs)
    except Exception as exc:  # pybids raises a zoo of exception types for bad datasets
        raise InvalidBidsError(f"pybids could not index {bids_dir}: {exc}") from exc


def _query(contrast: str, filters: dict) -> dict:
    from bids.layout import Query

    q = dict(DEFAULT_QUERIES[contrast])
    q.update(filters.get(contrast, {}))
    return {k: (Query.NONE if v is None else v) for k, v in q.items()}


def _ambiguous(contrast: str, scan_id: str, paths) -> str:
    return (f"more than one {contrast} image matches {scan_id}: "
            f"{', '.join(map(str, paths))}; use --bids-filter-file to choose one")


def discover_scans(
    bids_dir: Path,
    selection: SelectionConfig,
    database_dir: Path | None = None,
    validate: bool = False,
    needed_by: str = "--contrasts",
) -> list[ScanInput]:
    """Find every scan matching ``selection``; raise 18 when filters select nothing.

    A scan whose inputs cannot be chosen (two images of one contrast, or no image of an
    extra contrast in ``selection.contrasts``) is returned with ``error`` set, so that only
    that scan fails. ``needed_by`` says where the contrasts come from, for that message
    (``--contrasts``, or the model bundle's contrasts).
    """
    check_bids_root(bids_dir)
    layout = _layout(bids_dir, database_dir, validate)
    all_subjects = sorted(layout.get_subjects())
    if not all_subjects:
        raise EmptySelectionError(f"no participants (sub-*) found in {bids_dir}")
    subjects = [s.removeprefix("sub-") for s in selection.participant_labels] or all_subjects
    unknown = sorted(set(subjects) - set(all_subjects))
    if unknown:
        raise EmptySelectionError(
            f"participant label(s) not found in {bids_dir}: {', '.join(unknown)}"
        )
    base = {"subject": subjects, "extension": [".nii", ".nii.gz"], "return_type": "object"}
    if selection.session_labels:
        base["session"] = [s.removeprefix("ses-") for s in selection.session_labels]
    t1_files = layout.get(**base, **_query("T1w", selection.bids_filters))
    by_key: dict[ScanKey, list[Path]] = {}
    for f in sorted(t1_files, key=lambda f: f.path):
        ents = f.get_entities()
        key = ScanKey(
            subject=ents["subject"],
            session=ents.get("session"),
            run=str(ents["run"]) if ents.get("run") is not None else None,
            acquisition=ents.get("acquisition"),
        )
        by_key.setdefault(key, []).append(Path(f.path))
    scans: dict[ScanKey, ScanInput] = {}
    for key, paths in by_key.items():
        # Only this scan fails (exit 65 at the end); the other scans still run.
        error = _ambiguous("T1w", key.scan_id, paths) if len(paths) > 1 else None
        scans[key] = ScanInput(key, {"T1w": paths[0]}, error, ExitCode.DATA_ERROR)
    if not scans:
        raise EmptySelectionError(
            f"no T1w image in {bids_dir} matches the selection "
            f"(participants: {', '.join(subjects)}"
            + (f"; sessions: {', '.join(base['session'])}" if "session" in base else "")
            + ")"
        )
    for contrast in selection.contrasts:
        if contrast == "T1w":
            continue
        for key, scan in list(scans.items()):
            if scan.error:
                continue
            error, code = _extra_contrast(layout, base, scan, contrast, selection, bids_dir,
                                          needed_by)
            if error:  # only this scan fails (exit 65/66 at the end)
                scans[key] = replace(scan, error=error, error_code=code)
    return [scans[k] for k in sorted(scans, key=lambda k: k.scan_id)]


def _extra_contrast(layout, base: dict, scan: ScanInput, contrast: str,
                    selection: SelectionConfig, bids_dir: Path, needed_by: str
                    ) -> tuple[str | None, ExitCode]:
    """Add the ``contrast`` image of ``scan`` to its files; else say why not, with a code."""
    key = scan.key
    q = dict(base, subject=key.subject)
    where = bids_dir / f"sub-{key.subject}"
    if key.session:
        q["session"] = key.session
        where = where / f"ses-{key.session}"
    found = sorted(layout.get(**q, **_query(contrast, selection.bids_filters)),
                   key=lambda f: f.path)
    others = []
    if key.run and len(found) > 1:
        others = [f for f in found if str(f.get_entities().get("run")) != key.run]
        found = [f for f in found if str(f.get_entities().get("run")) == key.run]
    if key.acquisition and len(found) > 1:
        # acq- labels often differ between contrasts: narrow only when the T1w's matches.
        same = [f for f in found if f.get_entities().get("acquisition") == key.acquisition]
        found = same or found
    if not found:
        msg = (f"{key.scan_id}: no {contrast} image matches the selection in {where} "
               f"(needed by {needed_by} {', '.join(selection.contrasts)})")
        if others:
            msg += (f"; none has the T1w's run-{key.run}: "
                    f"{', '.join(f.path for f in others)}")
        if selection.bids_filters.get(contrast):
            msg += f"; --bids-filter-file for {contrast}: {selection.bids_filters[contrast]}"
        return msg, ExitCode.MISSING_INPUT
    if len(found) > 1:
        return _ambiguous(contrast, key.scan_id, [f.path for f in found]), ExitCode.DATA_ERROR
    scan.files[contrast] = Path(found[0].path)
    return None, ExitCode.OK


def read_participants(bids_dir: Path) -> pd.DataFrame | None:
    """participants.tsv as strings (None when the file is absent)."""
    path = bids_dir / "participants.tsv"
    if not path.exists():
        return None
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except Exception as exc:
        raise DataError(f"{path} cannot be read as a TSV file: {exc}") from exc
    if "participant_id" not in df.columns:
        raise DataError(f"{path} has no participant_id column")
    return df


def healthy_subjects(
    bids_dir: Path, subjects: list[str], healthy_filter: tuple[tuple[str, str], ...]
) -> list[str]:
    """Subjects that pass every ``COLUMN=VALUE`` filter of participants.tsv.

    With no filter every selected subject is assumed healthy, and a warning says so.
    """
    if not healthy_filter:
        LOG.warning(
            "No --healthy-filter given: all %d selected participants are assumed healthy",
            len(subjects),
        )
        return list(subjects)
    df = read_participants(bids_dir)
    if df is None:
        raise MissingInputError(
            f"--healthy-filter needs {bids_dir / 'participants.tsv'}, which does not exist"
        )
    for column, _ in healthy_filter:
        if column not in df.columns:
            raise DataError(
                f"--healthy-filter: column '{column}' is not in {bids_dir / 'participants.tsv'} "
                f"(columns: {', '.join(df.columns)})"
            )
    keep = pd.Series(True, index=df.index)
    for column, value in healthy_filter:
        keep &= df[column].str.strip() == value
    ids = {p.removeprefix("sub-") for p in df.loc[keep, "participant_id"]}
    selected = [s for s in subjects if s in ids]
    if not selected:
        filt = " and ".join(f"{c}={v}" for c, v in healthy_filter)
        raise EmptySelectionError(f"--healthy-filter {filt} selects no participant")
    return selected
