"""The command-line contract: exit codes, messages, option spellings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bids_anomaly import __version__

from .conftest import tree_hash


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bids_anomaly.cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_version():
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"bids-anomaly {__version__}"


@pytest.mark.parametrize("cmd", ["train", "calibrate", "score", "report", "evaluate", "demo",
                                 "info"])
def test_subcommand_help_is_actionable(cmd):
    r = run(cmd, "--help")
    assert r.returncode == 0
    assert "Usage:" in r.stdout and len(r.stdout.splitlines()) > 8


def test_unknown_option_is_usage_error_64(tiny_cohort, tmp_path):
    r = run("train", tiny_cohort.root, tmp_path / "out", "--no-such-option")
    assert r.returncode == 64
    assert "no-such-option" in r.stderr


def test_missing_bids_dir_is_66(tmp_path):
    r = run("train", tmp_path / "nope", tmp_path / "out")
    assert r.returncode == 66
    assert "does not exist" in r.stdout


def test_not_bids_is_16(tmp_path):
    (tmp_path / "notbids").mkdir()
    r = run("train", tmp_path / "notbids", tmp_path / "out")
    assert r.returncode == 16
    assert "dataset_description.json" in r.stdout


def test_unknown_analysis_level_is_17(tiny_cohort, tmp_path):
    r = run(tiny_cohort.root, tmp_path / "out", "everything", "--model", "x")
    assert r.returncode == 17
    assert "everything" in r.stdout


def test_output_inside_raw_dataset_is_64(tiny_cohort):
    before = tree_hash(tiny_cohort.root)
    r = run("train", tiny_cohort.root, tiny_cohort.root / "sub-h01" / "out")
    assert r.returncode == 64
    assert "raw part" in r.stdout
    assert tree_hash(tiny_cohort.root) == before


def test_work_dir_inside_bids_is_64(tiny_cohort, tmp_path):
    r = run("train", tiny_cohort.root, tmp_path / "out", "-w", tiny_cohort.root / "work")
    assert r.returncode == 64
    assert "work directory" in r.stdout


def test_participant_level_needs_model(tiny_cohort, tmp_path):
    r = run(tiny_cohort.root, tmp_path / "out", "participant")
    assert r.returncode == 64
    assert "--model" in r.stdout


@pytest.mark.parametrize("flag", ["--participant-label", "--participant_label"])
def test_unknown_participant_named_exit_18(tiny_cohort, tmp_path, flag):
    r = run("train", tiny_cohort.root, tmp_path / "out", flag, "h01", "sub-zz9", "qq7",
            "-w", tmp_path / "work")
    assert r.returncode == 18, r.stdout + r.stderr
    assert "zz9" in r.stdout and "qq7" in r.stdout and "h01" not in r.stdout.split(":")[-1]


@pytest.mark.parametrize("flag", ["--session-label", "--session_label"])
def test_session_filter_selecting_nothing_is_18(tiny_cohort, tmp_path, flag):
    r = run("train", tiny_cohort.root, tmp_path / "out", flag, "9", "-w", tmp_path / "work")
    assert r.returncode == 18, r.stdout + r.stderr
    assert "no T1w image" in r.stdout


def test_healthy_filter_selecting_nothing_is_18(tiny_cohort, tmp_path):
    r = run("train", tiny_cohort.root, tmp_path / "out", "--healthy-filter", "group=alien",
            "-w", tmp_path / "work")
    assert r.returncode == 18
    assert "group=alien" in r.stdout


def test_healthy_filter_unknown_column_is_65(tiny_cohort, tmp_path):
    r = run("train", tiny_cohort.root, tmp_path / "out", "--healthy_filter", "colour=blue",
            "-w", tmp_path / "work")
    assert r.returncode == 65
    assert "colour" in r.stdout and "participants.tsv" in r.stdout


def test_bad_filter_file_is_named(tiny_cohort, tmp_path):
    f = tmp_path / "filter.json"
    f.write_text(json.dumps({"bold": {"task": "rest"}}))
    r = run("train", tiny_cohort.root, tmp_path / "out", "--bids-filter-file", f)
    assert r.returncode == 65
    assert "bold" in r.stdout and str(f) in r.stdout.replace("\n", "")


def test_bad_memory_spelling_is_64(tiny_cohort, tmp_path):
    r = run("train", tiny_cohort.root, tmp_path / "out", "--mem", "lots")
    assert r.returncode == 64


def test_missing_model_bundle_is_65(tiny_cohort, tmp_path):
    r = run(tiny_cohort.root, tmp_path / "out", "participant", "--model", tmp_path / "nomodel",
            "-w", tmp_path / "work")
    assert r.returncode == 65
    assert "nomodel" in r.stdout


def test_greedy_label_expansion():
    from bids_anomaly.cli.argv import expand_greedy

    assert expand_greedy(["score", "--participant-label", "01", "02", "--seed", "1"]) == [
        "score", "--participant-label", "01", "--participant-label", "02", "--seed", "1"]
    assert expand_greedy(["--session_label", "1"]) == ["--session_label", "1"]


def test_cli_offers_every_registered_model():
    from bids_anomaly.cli.parser import MODEL_TYPES

    from bids_anomaly.models.registry import REGISTRY, get_model_class

    get_model_class("dae")  # registers the built-in models
    assert sorted(MODEL_TYPES) == sorted(REGISTRY)
