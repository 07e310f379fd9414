"""The derivatives sink: BIDS names, sidecars, dataset_description.json, group table.

Every file is written atomically; files shared by concurrent participant-level processes
are written under a lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pandas as pd

from .. import __version__
from ..core.atomic import atomic_path, file_lock, write_json, write_text
from ..core.naming import ScanKey, ScanOutputs, sidecar
from ..core.reference import reference_role

LOG = logging.getLogger("bids_anomaly")

# Folder patterns without a trailing slash: that is what bids-validator-deno matches.
BIDSIGNORE = ["*.html", "figures", "logs", "models", "*_statmap.*", "*_xfm.*",
              "*_clusters.*", "*_scores.json", "group_anomaly.*", "evaluation*", "*.lock"]

GROUP_COLUMNS = ["participant_id", "session_id", "run", "scan_id", "model", "score",
                 "percentile", "flagged", "reference_scans", "in_reference", "status",
                 "error", "n_clusters", "anomaly_volume_mm3", "report"]


def bids_uri(bids_dir: Path, path: Path) -> str:
    """``bids:raw:<relative path>`` for a file of the raw dataset."""
    return f"bids:raw:{Path(path).resolve().relative_to(Path(bids_dir).resolve()).as_posix()}"


def container_info() -> dict:
    """Where we run: Docker, Apptainer/Singularity, or a plain install."""
    if os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"):
        return {"Type": "singularity", "Tag": os.environ.get("BIDS_ANOMALY_IMAGE_TAG", "")}
    if Path("/.dockerenv").exists():
        return {"Type": "docker", "Tag": os.environ.get("BIDS_ANOMALY_IMAGE_TAG", "")}
    return {}


def ensure_dataset(output_dir: Path, bids_dir: Path) -> None:
    """Create dataset_description.json and .bidsignore once (safe under concurrency)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    desc = output_dir / "dataset_description.json"
    with file_lock(output_dir / "logs" / ".dataset"):
        if not desc.exists():
            gen = {"Name": "bids-anomaly", "Version": __version__,
                   "CodeURL": "https://github.com/bids-anomaly/bids-anomaly"}
            cont = container_info()
            if cont:
                gen["Container"] = cont
            write_json(desc, {
                "Name": "bids-anomaly: unsupervised anomaly maps",
                "BIDSVersion": "1.10.0",
                "DatasetType": "derivative",
                "GeneratedBy": [gen],
                "SourceDatasets": [{"URL": Path(bids_dir).resolve().as_uri()}],
                "DatasetLinks": {"raw": Path(bids_dir).resolve().as_uri()},
            })
        ignore = output_dir / ".bidsignore"
        if not ignore.exists():
            write_text(ignore, "\n".join(BIDSIGNORE) + "\n")


def _copy(src: str, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def sink_scan(output_dir: Path, key: ScanKey, files: dict, preproc: dict, bids_dir: Path,
              sources: dict[str, str], provenance: dict, resolution: int = 2) -> dict:
    """Copy one scan's node outputs into OUTPUT_DIR under their BIDS names, with sidecars.

    ``files`` are the scoring node's outputs, ``preproc`` the preprocessing node's result.
    Returns the scores record (also written as the scan's ``_scores.json``).
    """
    out = ScanOutputs(key, res=resolution)
    summary = json.loads(Path(files["summary"]).read_text())
    t1_uri = bids_uri(bids_dir, Path(sources["T1w"]))
    src_uris = [bids_uri(bids_dir, Path(p)) for p in sources.values()]
    model = summary["model"]
    model_meta = {"Name": model["name"], "Type": model["type"], "SHA256": model["sha256"]}
    thresholds = summary["thresholds"]

    res_desc = {str(resolution): f"{resolution} mm isotropic grid of the {out.space} template"}

    def put(src: str, rel: Path, meta: dict | None) -> None:
        _copy(src, output_dir / rel)
        if meta is not None and "_res-" in rel.name:
            meta = {**meta, "Resolution": res_desc}
        if meta is not None:
            write_json(output_dir / sidecar(rel), meta)

    put(preproc["native_brain_mask"], out.native_brain_mask,
        {"Sources": [t1_uri], "Type": "Brain", "Method": preproc["brain_extraction"]})
    put(preproc["template_brain_mask"], out.template_brain_mask,
        {"Sources": [t1_uri], "Type": "Brain", "SpatialReference": out.space})
    for contrast, path in preproc["template_images"].items():
        uri = bids_uri(bids_dir, Path(sources[contrast]))
        put(path, out.preproc(contrast), {
            "Sources": [uri], "SkullStripped": True,
            "Normalisation": "per-volume: 0.5th percentile to 0, median to 0.7"})
        put(files[f"recon_{contrast}"], out.recon(contrast),
            {"Sources": [uri], "SkullStripped": True,
             "Description": "pseudo-healthy reconstruction", "Model": model_meta})
    stat_meta = {
        "Sources": src_uris,
        "Description": "anomaly z-map: residual standardised against held-out healthy scans",
        "Model": model_meta,
        "Thresholds": thresholds,
        "DefaultFPR": summary["default_fpr"],
    }
    if summary.get("scoring"):
        stat_meta["Scoring"] = summary["scoring"]
    put(files["template_statmap"], out.template_statmap,
        {**stat_meta, "SpatialReference": out.space})
    put(files["native_statmap"], out.native_statmap, stat_meta)
    mask_meta = {
        "Sources": src_uris, "Model": model_meta, "Threshold": summary["threshold"],
        "NominalVoxelFPR": summary["default_fpr"],
        "MinClusterVoxels": summary.get("min_cluster_voxels"),
        "Description": "voxels above the threshold, clusters smaller than MinClusterVoxels "
                       "removed; the threshold is the (1 - NominalVoxelFPR) quantile of the "
                       "statmap on healthy calibration scans",
    }
    observed = summary.get("observed_mask_fpr")
    reference = summary.get("reference") or {}
    if observed is not None:
        # What this mask (after the cluster filter) flagged on those healthy scans.
        mask_meta["ObservedFPR"] = observed
        mask_meta["ObservedFPRScans"] = reference.get("n_scans")
    put(files["template_mask"], out.template_mask, {**mask_meta, "SpatialReference": out.space})
    put(files["native_mask"], out.native_mask, mask_meta)
    put(preproc["xfm"], out.xfm, {"Sources": [t1_uri], "Type": "ITK affine (antspyx)",
                                  "FromSpace": "T1w", "ToSpace": out.space})
    from ..preprocessing.registration import warp_paths

    for src, dest in zip(warp_paths(preproc["xfm"]), warp_paths(output_dir / out.xfm)):
        if src.exists():  # SyN: the warps travel with the affine
            _copy(str(src), dest)
    put(files["clusters"], out.clusters, {
        "cluster_id": {"Description": "cluster number, largest first"},
        "size_mm3": {"Description": "cluster volume", "Units": "mm^3"},
        "peak_z": {"Description": "maximum anomaly z in the cluster"},
        "mean_z": {"Description": "mean anomaly z in the cluster"},
        "centroid_x": {"Description": "centroid, template x", "Units": "mm"},
        "centroid_y": {"Description": "centroid, template y", "Units": "mm"},
        "centroid_z": {"Description": "centroid, template z", "Units": "mm"},
        "hemisphere": {"Description": "left, right or midline (|x| <= 2 mm)"},
        "darker_fraction": {"Description": "share of the cluster's voxels where the scan is "
                            "darker than its pseudo-healthy reconstruction (1: hypo-intense "
                            "throughout, 0: hyper-intense); n/a where no reconstruction was "
                            "kept"},
    })
    record = scan_record(key, "ok")
    record.update({k: summary[k] for k in ("score", "percentile", "flagged", "threshold",
                                           "flag_score", "flag_percentile",
                                           "default_fpr", "n_clusters", "anomaly_volume_mm3",
                                           "healthy_scores", "model")})
    record["voxel_threshold"] = summary["threshold"]
    record["observed_mask_fpr"] = summary.get("observed_mask_fpr")
    record["scoring"] = summary.get("scoring")
    record["reference"] = summary.get("reference")
    role = reference_role(model.get("reference_scans") or {}, Path(sources["T1w"]), bids_dir,
                          key.subject)
    record["in_reference"] = role
    if role:
        LOG.warning("%s was a %s participant of model %s: its score is optimistic",
                    key.scan_id, role, model["name"])
    record["provenance"] = provenance
    record["preprocessing"] = summary["preprocessing"]
    record["timings"] = summary["timings"]
    write_json(output_dir / out.scores, record)
    return record


def scan_record(key: ScanKey, status: str, error: str | None = None) -> dict:
    return {
        "scan_id": key.scan_id,
        "participant_id": f"sub-{key.subject}",
        "session_id": f"ses-{key.session}" if key.session else None,
        "run": key.run,
        "status": status,
        "error": error,
    }


def write_failure(output_dir: Path, key: ScanKey, error: str, provenance: dict) -> None:
    """Record a failed scan (the group level and reports list it with its error)."""
    rec = scan_record(key, "failed", error)
    rec["provenance"] = provenance
    write_json(output_dir / ScanOutputs(key).scores, rec)


def collect_records(output_dir: Path) -> list[dict]:
    """All per-scan score records under OUTPUT_DIR (an unreadable one as a failed record)."""
    return [read_record(p) for p in
            sorted(output_dir.glob("sub-*/**/anat/*_desc-anomaly_scores.json"))]


def read_record(path: Path) -> dict:
    """One scan's scores record; status ``failed`` with the file and the problem when it
    cannot be read, so the scan stays in the group table."""
    key = _key_from_name(path.name)
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        msg = f"cannot read scores record {path}: {exc}"
    else:
        if isinstance(rec, dict) and rec.get("status"):
            return {**scan_record(key, str(rec["status"])), **rec}
        msg = f"scores record {path} holds no status (not a bids-anomaly scores record)"
    LOG.error("%s", msg)
    return scan_record(key, "failed", msg)


def _key_from_name(name: str) -> ScanKey:
    """The ScanKey in a derivative file name (``sub-01_ses-1_run-2_desc-..._scores.json``)."""
    ents = dict(part.split("-", 1) for part in name.split("_") if "-" in part)
    return ScanKey(ents.get("sub", ""), ents.get("ses"), ents.get("run"), ents.get("acq"))


def write_group_table(output_dir: Path) -> pd.DataFrame:
    """group_anomaly.tsv (+ .json) from every per-scan record, under a lock."""
    rows = []
    for r in collect_records(output_dir):
        rows.append({
            "participant_id": r["participant_id"],
            "session_id": r.get("session_id"),
            "run": r.get("run"),
            "scan_id": r["scan_id"],
            "model": (r.get("model") or {}).get("name"),
            "score": r.get("score"),
            "percentile": r.get("percentile"),
            "flagged": None if r.get("flagged") is None else str(bool(r["flagged"])).lower(),
            "reference_scans": (r.get("reference") or {}).get("n_scans",
                                                             len(r.get("healthy_scores") or [])
                                                             or None),
            "in_reference": r.get("in_reference"),
            "status": r["status"],
            "error": r.get("error"),
            "n_clusters": r.get("n_clusters"),
            "anomaly_volume_mm3": r.get("anomaly_volume_mm3"),
            "report": f"{r['participant_id']}.html",
        })
    df = pd.DataFrame(rows, columns=GROUP_COLUMNS)
    dest = output_dir / "group_anomaly.tsv"
    with file_lock(output_dir / "logs" / ".group"):
        with atomic_path(dest) as tmp:
            df.to_csv(tmp, sep="\t", index=False, na_rep="n/a", float_format="%.4f")
        write_json(sidecar(dest), {
            "participant_id": {"Description": "participant label"},
            "session_id": {"Description": "session label (n/a without sessions)"},
            "run": {"Description": "run index (n/a without runs)"},
            "scan_id": {"Description": "scan identifier used in file names"},
            "model": {"Description": "name of the model bundle that scored the scan"},
            "score": {"Description": "mean of the top 1% anomaly z-values in the brain"},
            "percentile": {"Description": "percentile of the score among held-out healthy "
                                          "scans (Student-t predictive distribution of a "
                                          "normal fit)", "Units": "%"},
            "flagged": {"Description": "true when the percentile is at or above 95 (n/a when "
                                       "the healthy reference is too small for a percentile)"},
            "reference_scans": {"Description": "number of healthy scans the percentile, the "
                                               "flag and the voxel thresholds rest on"},
            "in_reference": {"Description": "fit, validation or calibration when this scan was "
                                            "part of the model's healthy reference (its score "
                                            "is then optimistic); n/a otherwise"},
            "status": {"Description": "ok or failed"},
            "error": {"Description": "why the scan failed"},
            "n_clusters": {"Description": "number of clusters in the anomaly mask"},
            "anomaly_volume_mm3": {"Description": "volume of the anomaly mask in template space",
                                   "Units": "mm^3"},
            "report": {"Description": "participant report (relative link)"},
        })
    return df
