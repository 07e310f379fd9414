"""BIDS derivative file names written by bids-anomaly (one place, so every writer agrees)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .templates import TEMPLATE_NAME

# Entity order of the BIDS specification for the entities we emit.
_ORDER = ("sub", "ses", "acq", "ce", "rec", "run", "from", "to", "mode", "space", "res",
          "label", "desc", "stat")


@dataclass(frozen=True)
class ScanKey:
    """Identifies one scan (the unit that gets an anomaly map): participant, session, run."""

    subject: str
    session: str | None = None
    run: str | None = None
    acquisition: str | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def entities(self) -> dict[str, str]:
        ents = {"sub": self.subject}
        if self.session:
            ents["ses"] = self.session
        if self.acquisition:
            ents["acq"] = self.acquisition
        if self.run:
            ents["run"] = self.run
        return ents

    @property
    def scan_id(self) -> str:
        """A filename-safe id, e.g. ``sub-01_ses-1_run-2``."""
        return "_".join(f"{k}-{v}" for k, v in self.entities.items())

    @property
    def subdir(self) -> Path:
        """``sub-01[/ses-1]/anat`` relative to a dataset root."""
        parts = [f"sub-{self.subject}"]
        if self.session:
            parts.append(f"ses-{self.session}")
        return Path(*parts, "anat")


def build_name(key: ScanKey, suffix: str, ext: str = ".nii.gz", **entities: str | None) -> str:
    """Compose a BIDS file name: ``build_name(key, 'mask', space=..., label='anomaly')``.

    ``from_`` may be used for the reserved word ``from``.
    """
    ents = dict(key.entities)
    for name, value in entities.items():
        if value is None:
            continue
        ents[name.rstrip("_")] = str(value)
    unknown = set(ents) - set(_ORDER)
    if unknown:
        raise ValueError(f"unsupported entities: {sorted(unknown)}")
    ordered = [f"{k}-{ents[k]}" for k in _ORDER if k in ents]
    return "_".join(ordered) + f"_{suffix}{ext}"


@dataclass(frozen=True)
class ScanOutputs:
    """Every derivative path written for one scan, relative to OUTPUT_DIR."""

    key: ScanKey
    res: int = 2
    space: str = TEMPLATE_NAME

    def _p(self, suffix: str, ext: str = ".nii.gz", **ents: str | None) -> Path:
        return self.key.subdir / build_name(self.key, suffix, ext, **ents)

    def _t(self, suffix: str, ext: str = ".nii.gz", **ents: str | None) -> Path:
        return self._p(suffix, ext, space=self.space, res=str(self.res), **ents)

    def preproc(self, contrast: str = "T1w") -> Path:
        return self._t(contrast, desc="preproc")

    def recon(self, contrast: str = "T1w") -> Path:
        return self._t(contrast, desc="recon")

    @property
    def template_brain_mask(self) -> Path:
        return self._t("mask", desc="brain")

    @property
    def template_statmap(self) -> Path:
        return self._t("statmap", stat="anomaly")

    @property
    def template_mask(self) -> Path:
        return self._t("mask", label="anomaly")

    @property
    def native_brain_mask(self) -> Path:
        return self._p("mask", desc="brain")

    @property
    def native_statmap(self) -> Path:
        return self._p("statmap", stat="anomaly")

    @property
    def native_mask(self) -> Path:
        return self._p("mask", label="anomaly")

    @property
    def xfm(self) -> Path:
        return self._p("xfm", ".mat", from_="T1w", to=self.space, mode="image")

    @property
    def clusters(self) -> Path:
        return self._p("clusters", ".tsv", desc="anomaly")

    @property
    def scores(self) -> Path:
        """Per-scan score record (JSON) that the group level collects."""
        return self._p("scores", ".json", desc="anomaly")

    @property
    def figures_dir(self) -> Path:
        return Path(f"sub-{self.key.subject}", "figures")

    @property
    def thumbnail(self) -> Path:
        """Small overview strip (input slices with the anomaly overlay) for the group report."""
        return self.figures_dir / f"{self.key.scan_id}_desc-overview_thumb.jpg"


def sidecar(path: Path | str) -> Path:
    """The JSON sidecar of a NIfTI or TSV path."""
    p = str(path)
    for ext in (".nii.gz", ".nii", ".tsv", ".mat"):
        if p.endswith(ext):
            return Path(p[: -len(ext)] + ".json")
    raise ValueError(f"no sidecar convention for {path}")
