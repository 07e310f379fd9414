"""Training report inside a model bundle: model card, loss curves, calibration."""

from __future__ import annotations

import io
import json
from pathlib import Path

from ..core.atomic import write_text
from .figures import score_distribution
from .html import esc, img, kv_list, page, table


def loss_curves(history: list[dict]) -> bytes:
    """Train and validation loss per epoch (PNG)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0, 2.4), dpi=90)
    ax = fig.add_axes((0.12, 0.2, 0.84, 0.7))
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", ms=3, label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "o-", ms=3, label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("masked MSE")
    ax.set_yscale("log")
    ax.legend(frameon=False, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def build_training_report(bundle_dir: Path) -> Path:
    """Write ``report.html`` into a bundle from its ``model.json`` (nothing recomputed)."""
    bundle_dir = Path(bundle_dir)
    card = json.loads((bundle_dir / "model.json").read_text())
    train = card.get("training", {})
    calib = card.get("calibration", {})
    parts = [f"<h1>Model bundle: {esc(card.get('name'))}</h1>",
             f"<p>{esc(card.get('description', ''))}</p>",
             "<h2>Model card</h2>",
             kv_list([("type", card.get("model_type")), ("contrasts", card.get("contrasts")),
                      ("template", card.get("template")),
                      ("resolution (mm)", card.get("resolution")),
                      ("training dataset", train.get("dataset")),
                      ("training participants", len(train.get("participants", []))),
                      ("validation participants (choose the epoch)",
                       train.get("validation_participants")),
                      ("calibration participants (thresholds, healthy scores)",
                       train.get("calibration_participants")),
                      ("epoch chosen on", train.get("epoch_selection")),
                      ("best epoch", train.get("best_epoch")),
                      ("best validation loss", train.get("best_val_loss")),
                      ("device", train.get("device")), ("seconds", train.get("seconds")),
                      ("seed", train.get("seed")), ("intended use", card.get("intended_use")),
                      ("hyper-parameters", card.get("hyperparameters")),
                      ("preprocessing", card.get("preprocessing")),
                      ("software", card.get("software")), ("files (sha256)", card.get("files"))])]
    history = train.get("history") or []
    if history:
        parts += ["<h2>Loss curves</h2>", img(loss_curves(history), "loss curves")]
    examples = [(bundle_dir / f"example_{k}.png", k) for k in ("input", "recon")]
    if all(p.exists() for p, _ in examples):
        parts += ["<h2>Example: a held-out validation scan and its reconstruction</h2>"]
        for path, kind in examples:
            parts += [img(path.read_bytes(), f"validation {kind}"),
                      f"<p class='muted small'>{'input' if kind == 'input' else 'reconstruction'}"
                      "</p>"]
    reference = calib.get("reference") or {}
    observed = calib.get("mask_fpr") or {}
    n_ref = reference.get("n_scans", len(calib.get("healthy_scores") or []))
    parts += ["<h2>Calibration on held-out healthy participants</h2>",
              f"<p>Thresholds, the healthy score distribution and the flag rest on "
              f"<b>{esc(n_ref)}</b> healthy scan(s) that neither trained the model nor chose "
              "its epoch.</p>"]
    if reference.get("level") in ("warning", "refused"):
        parts += [f"<div class='error'><b>Small healthy reference.</b> "
                  f"{esc(reference.get('message'))}</div>"]
    parts += [table(["voxel FPR (nominal)", "threshold (z)", "mask FPR observed"],
                    [[k, f"{v:.3f}", f"{observed[k]:.5f}" if k in observed else "n/a"]
                     for k, v in calib.get("thresholds", {}).items()],
                    numeric={"threshold (z)", "mask FPR observed"}),
              f"<p>Default mask threshold: FPR {esc(calib.get('default_fpr'))}. The observed "
              "rate is what the shipped mask (threshold, then clusters smaller than "
              f"{esc((calib.get('params') or {}).get('min_cluster_voxels'))} voxels removed) "
              "flags on the calibration scans.</p>"]
    norm = calib.get("normative_info") or {}
    if norm:
        parts += [f"<p>Statmap: {esc(norm.get('statmap'))}; voxel-wise residual mean and "
                  f"standard deviation from the {esc(norm.get('n_scans'))} training scans "
                  f"(smoothed {esc(norm.get('smooth_sigma_voxels'))} voxel, sd floored at "
                  f"{esc(norm.get('sd_floor'))} × its median); thresholds and scores from the "
                  "held-out scans only.</p>"]
    else:
        parts += [f"<p>Statmap: raw residual standardised by its pooled mean "
                  f"{calib.get('mu', float('nan')):.4g} and standard deviation "
                  f"{calib.get('sd', float('nan')):.4g}.</p>"]
    if calib.get("healthy_scores"):
        parts += ["<h3>Per-scan scores of the healthy calibration scans</h3>",
                  img(score_distribution(calib["healthy_scores"]), "healthy score distribution")]
    dest = bundle_dir / "report.html"
    write_text(dest, page(f"bids-anomaly model {card.get('name')}", "\n".join(parts)))
    return dest
