"""Training cost of each model type at its default size, on the shared IXI T1w data.

    python benchmarks/training.py [--models MODEL ...] [--epochs 3] [--threads 2]
                                  [--cache DIR] [--full [--full-model dae]]

The IXI scans are preprocessed once (``preprocess_scan``, cached in ``--cache`` between models
and runs); the last participant is held out of training for the scoring test. Then per model,
in a child process of its own (so peak memory is that model's): ``fit_bundle`` for
``--epochs`` epochs (the first epoch reported separately: it carries warm-up costs), epoch
time, slices per second, peak memory (VmHWM, else ``getrusage``), parameter count, and the
time of the whole stage (fit + calibration + bundle). The bundle is then loaded with
``load_bundle`` in a FRESH process that scores the held-out scan (load and scoring timed).

``--full`` also runs ``bids-anomaly train`` end to end on the data set (preprocessing through
nipype included) and prints its wall time; the acceptance is ≤ 20 min on 2 cores.
Skips cleanly (exit 0) when ../shared/data/ixi-t1 is absent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import DATA, peak_rss_mb, print_table

# Children run as this process does: ``PYTHONPATH=<other checkout>:<site-packages> python -S
# benchmarks/training.py`` times another version (-S: no editable install shadows it).
PYTHON = [sys.executable, *(["-S"] if sys.flags.no_site else [])]

IXI = DATA / "ixi-t1"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "bids-anomaly-bench-training"

SCORE = r"""
import json, sys, time
t0 = time.perf_counter()
import nibabel as nb
import torch
from pathlib import Path
torch.set_num_threads(int(sys.argv[3]))
from bids_anomaly.preprocessing.pipeline import load_volume
from bids_anomaly.models.bundle import load_bundle
from bids_anomaly.preprocessing.pipeline import PreprocResult
from bids_anomaly.preprocessing.standardise import standardise_for_bundle
from bids_anomaly.inference.scoring import score_volume
b = load_bundle(Path(sys.argv[1]))
t_load = time.perf_counter() - t0
res = PreprocResult.load(Path(sys.argv[2]))
vol, mask = load_volume(res, b.card["contrasts"])
vol = standardise_for_bundle(vol, mask, b.card)
t1 = time.perf_counter()
r = score_volume(b.model, vol, mask, b.calibration, nb.load(res.template_brain_mask).affine)
print("RESULT " + json.dumps({"load_s": t_load, "score_s": time.perf_counter() - t1,
                              "scan_score": float(r.score), "flagged": bool(r.flagged)}))
"""


def own_peak_mib() -> float:
    """This process's peak RSS. VmHWM where Linux has it: a child's ``getrusage`` maximum
    starts from its parent's (kept across fork and exec), which would report the parent's
    preprocessing peak for every model."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def subjects() -> list[str]:
    return sorted(p.name[4:] for p in IXI.glob("sub-*") if p.is_dir())


def preprocess_all(cache: Path, threads: int) -> dict[str, Path]:
    """sub → preproc.json, preprocessing what the cache lacks."""
    from bids_anomaly.core.config import PreprocConfig
    from bids_anomaly.preprocessing.pipeline import preprocess_scan

    out = {}
    for s in subjects():
        js = cache / "preproc" / s / "preproc.json"
        if not js.exists():
            t = time.perf_counter()
            preprocess_scan({"T1w": str(IXI / f"sub-{s}" / "anat" / f"sub-{s}_T1w.nii.gz")},
                            js.parent, PreprocConfig(), threads=threads)
            print(f"  preprocessed {s} in {time.perf_counter() - t:.1f} s", flush=True)
        out[s] = js
    return out


def one_model(model: str, epochs: int, threads: int, cache: Path) -> dict:
    """Child process: fit one model on all but the last participant, save its bundle."""
    import logging

    import torch

    from bids_anomaly.core.config import PreprocConfig
    from bids_anomaly.models.registry import get_model_class
    from bids_anomaly.training.fit import FitInputs, fit_bundle

    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    torch.set_num_threads(threads)
    pre = preprocess_all(cache, threads)
    train = sorted(pre)[:-1]
    cls = get_model_class(model)
    config = {"epochs": epochs, "patience": epochs + 1} if cls.learned else {}
    inputs = FitInputs(
        preproc_jsons=[str(pre[s]) for s in train], subjects=train,
        scan_ids=[f"sub-{s}_T1w" for s in train], contrasts=["T1w"], model_type=model,
        model_name=f"bench-{model}", model_config=config, preproc=PreprocConfig().to_dict(),
        folds=2, dataset=str(IXI), seed=0, device="cpu", threads=threads,
        checkpoint=None, resume=False)
    dest = cache / "bundles" / model
    t = time.perf_counter()
    fit_bundle(inputs, dest)
    stage_s = time.perf_counter() - t
    card = json.loads((dest / "model.json").read_text())
    hist = card["training"]["history"]
    n_params = 0
    if cls.learned:
        n_params = sum(p.numel() for p in cls(["T1w"], tuple(card["shape"])).net.parameters())
    row = {"model": model, "params": n_params, "epochs": len(hist), "stage_s": stage_s,
           "peak_mib": own_peak_mib(), "bundle": str(dest),
           "train_scans": card["training"]["n_scans"]}
    if hist:
        row["epoch1_s"] = hist[0]["seconds"]
        rest = hist[1:] or hist
        row["epoch_s"] = statistics.mean(h["seconds"] for h in rest)
        row["slices_per_s"] = statistics.mean(h["samples_per_s"] for h in rest)
        row["val_loss"] = hist[-1]["val_loss"]
    return row


def score_fresh(bundle: str, preproc_json: Path, threads: int) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([*PYTHON, "-c", SCORE, bundle, str(preproc_json), str(threads)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        return {"score": f"FAILED: {proc.stderr.strip().splitlines()[-1:]}"}
    res = json.loads(line[0][7:])
    return {"load_s": res["load_s"], "score_s": res["score_s"], "fresh_wall_s": wall,
            "scan_score": res["scan_score"]}


def main() -> None:
    from bids_anomaly.models.registry import MODEL_TYPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODEL_TYPES),
                    help="default: every registered model type")
    ap.add_argument("--epochs", type=int, default=3, help="epochs timed per learned model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                    help="preprocessed scans and bundles (kept between runs)")
    ap.add_argument("--full", action="store_true",
                    help="also time `bids-anomaly train` end to end (acceptance: ≤ 20 min)")
    ap.add_argument("--full-model", default="dae")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one model, JSON on stdout
    args = ap.parse_args()
    if not IXI.exists():
        print(f"skipped: {IXI} not found")
        return
    if args.one:
        print("RESULT " + json.dumps(one_model(args.one, args.epochs, args.threads, args.cache)))
        return

    t = time.perf_counter()
    pre = preprocess_all(args.cache, args.threads)
    print(f"preprocessing ({len(pre)} scans, cached in {args.cache}): "
          f"{time.perf_counter() - t:.1f} s")
    held = pre[sorted(pre)[-1]]
    rows = []
    for model in args.models:
        print(f"== {model}", flush=True)
        proc = subprocess.run([*PYTHON, __file__, "--one", model, "--epochs",
                               str(args.epochs), "--threads", str(args.threads),
                               "--cache", str(args.cache)], capture_output=True, text=True)
        sys.stdout.write(proc.stderr[-3000:] if proc.returncode else "")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            rows.append({"model": model, "score": "FIT FAILED"})
            continue
        row = json.loads(line[0][7:])
        row.update(score_fresh(row.pop("bundle"), held, args.threads))
        rows.append(row)
    print(f"\n{args.threads} threads; epoch_s, slices_per_s: mean over epochs 2..N "
          f"(epoch1_s separate); stage_s: fit + calibration + bundle; score: held-out scan "
          f"in a fresh process")
    print(f"peak memory of this process and its children (preprocessing, fits, scoring): "
          f"{peak_rss_mb():.0f} MiB")
    print_table(rows, ["model", "params", "train_scans", "epochs", "epoch1_s", "epoch_s",
                       "slices_per_s", "val_loss", "stage_s", "peak_mib", "load_s", "score_s",
                       "fresh_wall_s", "scan_score"])
    if args.full:
        full(args.full_model, args.threads)


def full(model: str, threads: int) -> None:
    out = Path(tempfile.mkdtemp(prefix="bench-train-full-"))
    cmd = [*PYTHON, "-m", "bids_anomaly.cli.main", "train", str(IXI), str(out / "out"),
           "--model-type", model,
           "-w", str(out / "work"), "--nprocs", str(threads)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out)  # not a checkout
    wall = time.perf_counter() - t
    print(f"\nfull `bids-anomaly train` ({model}, {threads} cores): {wall / 60:.1f} min, "
          f"exit {proc.returncode} (acceptance: ≤ 20 min); output in {out}")
    if proc.returncode:
        print(proc.stderr[-2000:])


if __name__ == "__main__":
    main()
