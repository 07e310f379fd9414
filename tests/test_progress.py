"""Progress display: the monitor's counts, the plain output's shape, and `train`/`score` seen
through a pseudo-terminal (a live bar with an ETA) and through pipes (a few plain lines)."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bids_anomaly.core.config import ProgressConfig
from bids_anomaly.progress import PROGRESS_FILE, StepState, TrainingView, WorkflowProgress
from bids_anomaly.progress.display import PlainStep
from bids_anomaly.progress.records import Tail, node_progress

ETA = re.compile(r"ETA \d+:\d\d")
ANSI = re.compile(r"\x1b\[")
ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
DAE = {"epochs": 5, "patience": 20, "channels": [8, 16, 32], "strides": [2, 2]}


class _Node:
    def __init__(self, fullname: str):
        self.fullname = fullname


class _Recorder:
    """A Step that keeps every update."""

    def __init__(self):
        self.state = StepState("x")
        self.updates: list[dict] = []

    def update(self, **changes):
        self.updates.append(changes)
        for k, v in changes.items():
            setattr(self.state, k, v)

    def close(self, summary=None):
        pass


def test_batch_counts_queued_running_done(tmp_path: Path) -> None:
    dirs = {f"wf.n{i}": tmp_path / f"n{i}" for i in range(3)}
    for d in dirs.values():
        d.mkdir()
    step = _Recorder()
    mon = WorkflowProgress(step, dirs, batch=True)
    for name in dirs:
        mon(_Node(name), "start")  # submitted to the scheduler
    assert mon.counts() | {"ran": 0} == {"done": 0, "total": 3, "ran": 0, "running": 0,
                                         "queued": 3, "failed": 0}
    with node_progress(dirs["wf.n0"]):  # a job leaves the queue and runs its interface
        mon.poll()
        assert (mon.counts()["queued"], mon.counts()["running"]) == (2, 1)
        assert step.state.info == "queued 2 · running 1 · done 0"
    mon(_Node("wf.n0"), "end")
    mon(_Node("wf.n1"), "exception")
    c = mon.counts()
    assert (c["done"], c["running"], c["queued"], c["failed"]) == (2, 0, 1, 1)
    assert step.state.done == 2 and step.state.total == 3
    assert step.state.eta_s is not None  # one node ran: a rate, so an ETA


def test_cached_nodes_and_stale_records_give_no_rate(tmp_path: Path) -> None:
    d = tmp_path / "n0"
    d.mkdir()
    (d / PROGRESS_FILE).write_text(json.dumps({"t": time.time() - 3600, "kind": "start"}) + "\n")
    step = _Recorder()
    mon = WorkflowProgress(step, {"wf.n0": d, "wf.n1": tmp_path / "n1"})
    mon(_Node("wf.n0"), "start")
    mon.poll()  # a record of an earlier run of the node does not count
    mon(_Node("wf.n0"), "end")  # cached: over without running
    assert mon.counts()["ran"] == 0 and step.state.eta_s is None


def test_training_view_folds_epochs_and_eta() -> None:
    view = TrainingView()
    view.feed({"kind": "log", "msg": "Fold 1/2: fitting dae on 3 participants"})
    view.feed({"kind": "epoch", "epoch": 2, "epochs": 4, "train_loss": 0.1, "val_loss": 0.2,
               "samples_per_s": 300.0, "eta_seconds": 10.0})
    c = view.changes()
    assert c["count"] == "fold 1/2 · epoch 2/4" and "300 slices/s" in c["info"]
    assert c["done"] == pytest.approx(0.5 / 3)  # 2 folds + the shipped model
    assert c["eta_s"] >= 10.0 + 2 * 10.0  # this model's rest, then two more models
    view.feed({"kind": "log", "msg": "Final model: fitting dae on all 3 participants"})
    assert view.model == 3 and view.changes()["count"] == "final model"


def test_training_view_shows_the_view_of_a_multi_view_model() -> None:
    view = TrainingView()
    view.feed({"kind": "log", "msg": "Fold 1/2: fitting dae on 3 participants"})
    view.feed({"kind": "log", "msg": "model 'dae': training the coronal view (2 of 3)"})
    view.feed({"kind": "epoch", "epoch": 2, "epochs": 4, "train_loss": 0.1, "val_loss": 0.2,
               "samples_per_s": 300.0, "eta_seconds": 10.0})
    c = view.changes()
    assert c["count"] == "fold 1/2 · coronal view 2/3 · epoch 2/4"
    assert c["done"] == pytest.approx((1.5 / 3) / 3)  # half the second of three views
    assert c["eta_s"] >= 10.0 + 10.0  # this view's rest, then the sagittal one
    view.feed({"kind": "log", "msg": "Fold 2/2: fitting dae on 3 participants"})
    assert view.changes()["count"] == "fold 2/2"  # a new fold starts with no view yet


def test_plain_output_is_short_and_line_oriented() -> None:
    out = io.StringIO()
    step = PlainStep(StepState("training", 100, "epochs"), out, interval_s=3600)
    for k in range(1, 101):
        step.update(done=k, eta_s=100 - k)
    step.close("bundle written")
    lines = out.getvalue().splitlines()
    assert len(lines) <= 6, lines  # start, three quarters, end: not one line per epoch
    assert lines[0] == "training: started (0/100 epochs)" and "done" in lines[-1]
    assert "\r" not in out.getvalue() and not ANSI.search(out.getvalue())


def test_tail_waits_for_complete_lines(tmp_path: Path) -> None:
    f = tmp_path / PROGRESS_FILE
    f.write_text('{"kind": "start"}\n{"kind": "ep')
    tail = Tail(f)
    assert [r["kind"] for r in tail.read()] == ["start"]
    with open(f, "a") as fh:
        fh.write('och"}\n')
    assert [r["kind"] for r in tail.read()] == ["epoch"]
    f.write_text('{"kind": "start"}\n')  # the node restarted: the file was truncated
    assert [r["kind"] for r in tail.read()] == ["start"]


def test_quiet_resolves_to_no_console_output(capsys) -> None:
    from bids_anomaly.progress import Reporter

    step = Reporter(ProgressConfig(mode="quiet")).step("scoring", 2, "scans")
    step.update(done=2)
    step.close("2/2 scans scored")
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- the CLI


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "bids_anomaly.cli.main", *map(str, args)]


def _env() -> dict:
    return {**os.environ, "COLUMNS": "150", "TERM": "xterm-256color", "NIPYPE_NO_ET": "1"}


def run_in_pty(args: list[str], timeout: float = 600) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal; (exit code, output)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=_env(),
                            close_fds=True)
    os.close(slave)
    chunks, end = [], time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    root = tmp_path_factory.mktemp("progress")
    c = generate_cohort(root / "bids", SynthConfig(
        n_healthy=3, n_healthy_test=0, n_patients=1, voxel_size=4.0, template_resolution=2,
        n_sessions=1, with_skull=False, seed=5))
    cfg = root / "dae.json"
    cfg.write_text(json.dumps(DAE))
    return {"bids": c.root, "root": root, "cfg": cfg}


def _train(cohort, out: Path) -> list[str]:
    return _cli("train", cohort["bids"], out, "--healthy-filter", "split=train", "--folds", "2",
                "--model-config", cohort["cfg"], "-w", cohort["root"] / "work", "--nprocs", "2",
                "--registration", "affine-coarse")


def _score(cohort, out: Path) -> list[str]:
    return _cli("score", cohort["bids"], out, "participant", "--model", "dae",
                "--participant-label", "p01", "-w", cohort["root"] / "work", "--nprocs", "2")


def test_train_and_score_show_progress_on_a_terminal(cohort) -> None:
    out = cohort["root"] / "out-tty"
    rc, text = run_in_pty(_train(cohort, out))
    assert rc == 0, text[-3000:]
    assert "\r" in text and ANSI.search(text)  # a live bar, redrawn in place
    text = ESCAPES.sub("", text)
    assert ETA.search(text), text[-3000:]
    assert re.search(r"preprocessing .*\d/3 scans", text)
    assert re.search(r"fold \d/2 · epoch \d+/5", text) and "slices/s" in text
    assert "training dae: done" in text
    rc, text = run_in_pty(_score(cohort, out))
    assert rc == 0, text[-3000:]
    text = ESCAPES.sub("", text)
    assert re.search(r"scoring .*1/1 scans", text) and ETA.search(text)
    assert "scoring: done · 1/1 scans scored" in text
    logs = "".join(p.read_text() for p in (out / "logs").glob("run-*.log"))
    assert "preprocessing: done" in logs and "scoring: done" in logs  # a line per step


def test_train_and_score_through_pipes_stay_short(cohort) -> None:
    out = cohort["root"] / "out-pipe"
    train = subprocess.run(_train(cohort, out), capture_output=True, text=True, timeout=600,
                           env=_env())
    assert train.returncode == 0, train.stderr[-3000:]
    card = json.loads((out / "models" / "dae" / "model.json").read_text())
    epochs = sum(f["epochs_run"] for f in card["training"]["folds"])
    epochs += len(card["training"]["history"])
    score = subprocess.run(_score(cohort, out), capture_output=True, text=True, timeout=600,
                           env=_env())
    assert score.returncode == 0, score.stderr[-3000:]
    for err in (train.stderr, score.stderr):
        assert "\r" not in err and not ANSI.search(err), err
    lines = [ln for ln in train.stderr.splitlines() if ln.startswith(("preprocessing",
                                                                       "training"))]
    assert lines[0].startswith("preprocessing: started") and "training dae: done" in lines[-1]
    assert len(lines) <= 14 < epochs + 2, (epochs, lines)  # not a line per epoch
    assert any(ETA.search(ln) for ln in lines)
    assert len(score.stderr.splitlines()) <= 10, score.stderr
    assert "scoring: done · 1/1 scans scored" in score.stderr
    quiet = subprocess.run(_score(cohort, out) + ["--quiet"], capture_output=True, text=True,
                           timeout=600, env=_env())
    assert quiet.returncode == 0 and "scoring" not in quiet.stderr, quiet.stderr


def test_info_prints_the_card_and_refuses_a_tampered_bundle(tmp_path: Path) -> None:
    from tests.test_reference import _saved_zscore

    bundle = _saved_zscore(tmp_path)
    r = subprocess.run(_cli("info", bundle), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for text in ("zscore", "T1w", "MNI152NLin2009aSym at 2 mm", "checksums verified",
                 "weights.safetensors", "1% FPR: z ≥"):
        assert text in r.stdout, (text, r.stdout)
    r = subprocess.run(_cli("info", bundle, "--json"), capture_output=True, text=True,
                       timeout=120)
    info = json.loads(r.stdout)
    assert info["checksums_verified"] and info["reference"]["n_scans"] == 1
    assert info["reference"]["level"] == "refused" and set(info["thresholds"]["voxel"])
    with open(bundle / "weights.safetensors", "ab") as fh:
        fh.write(b"x")
    r = subprocess.run(_cli("info", bundle), capture_output=True, text=True, timeout=120)
    assert r.returncode == 65 and "weights.safetensors" in r.stdout + r.stderr
    assert "does not match" in r.stdout + r.stderr
