"""The container contract, checked on the installed CLI without building an image.

The Apptainer image runs ``bids-anomaly`` as the calling user (any UID), with ``--cleanenv``
(only the image's environment), a read-only install, a home folder it must not rely on and,
on many clusters, no network. Here the installed console script is run the same way:

* as UID/GID 54321 with no supplementary groups and no capabilities (``setpriv`` inside
  ``unshare``, or ``os.setuid`` in a ``preexec_fn`` where namespaces are unavailable);
* with an environment built from scratch: PATH, HOME and the Dockerfile's ``ENV``, the cache
  variables pointed at a writable folder as the SLURM script does, plus the two variables
  Apptainer's runtime sets itself;
* with HOME and the working directory not writable by that UID;
* with the install tree (this repository, an editable install, root-owned) not writable by
  it: nothing may appear there, not even ``__pycache__`` (the image does not set
  PYTHONDONTWRITEBYTECODE);
* in an empty network namespace (loopback only) when ``unshare --net`` works.

``--version``, the participant level (two participants, a zscore bundle trained here as
root) and the group level must succeed, write the expected derivatives into an OUTPUT_DIR
owned by that UID and leave the input dataset byte-for-byte unchanged.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest

from .conftest import tree_hash

UID = GID = 54321
ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_TREES = [ROOT / "bids_anomaly", ROOT / "cli"]
# Fixed values the image must set (containers/README.md, "Environment set in the image").
FIXED_ENV = {
    "NIPYPE_NO_ET": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "OMP_NUM_THREADS": "1",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
    "PYTHONNOUSERSITE": "1",
}
CACHE_ENV = ("XDG_CACHE_HOME", "TORCH_HOME", "MPLCONFIGDIR")
SUBJECTS = ("t01", "p01")
OUTPUTS = [
    "sub-{s}/anat/sub-{s}_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz",
    "sub-{s}/anat/sub-{s}_space-MNI152NLin2009aSym_res-2_desc-brain_mask.nii.gz",
    "sub-{s}/anat/sub-{s}_space-MNI152NLin2009aSym_res-2_desc-recon_T1w.nii.gz",
    "sub-{s}/anat/sub-{s}_space-MNI152NLin2009aSym_res-2_stat-anomaly_statmap.nii.gz",
    "sub-{s}/anat/sub-{s}_stat-anomaly_statmap.nii.gz",
    "sub-{s}/anat/sub-{s}_stat-anomaly_statmap.json",
    "sub-{s}/anat/sub-{s}_label-anomaly_mask.nii.gz",
    "sub-{s}/anat/sub-{s}_label-anomaly_mask.json",
    "sub-{s}/anat/sub-{s}_from-T1w_to-MNI152NLin2009aSym_mode-image_xfm.mat",
    "sub-{s}/anat/sub-{s}_desc-anomaly_clusters.tsv",
    "sub-{s}/anat/sub-{s}_desc-anomaly_scores.json",
    "sub-{s}.html",
]
TIMEOUT = 600


def _cli() -> Path:
    exe = Path(sysconfig.get_path("scripts")) / "bids-anomaly"
    if not exe.is_file():
        pytest.skip(f"the bids-anomaly console script is not installed ({exe}); pip install -e .")
    return exe


def dockerfile_env() -> dict[str, str]:
    """The image's ``ENV`` (KEY=VALUE form), with ``${ARG}`` replaced by the ARG defaults."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    for line in text.splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword == "ARG" and "=" in rest:
            key, value = rest.strip().split("=", 1)
            args[key] = value.strip('"')
        elif keyword == "ENV":
            for item in shlex.split(rest):
                key, value = item.split("=", 1)
                for name, default in args.items():
                    value = value.replace("${" + name + "}", default)
                env[key] = value
    return env


def _blocked(paths: list[Path]) -> dict[Path, set[str]]:
    """Folders on the way to ``paths`` that other users cannot traverse (``/root`` of a
    pyenv install), each with the child entries the sandbox must expose."""
    out: dict[Path, set[str]] = {}
    for path in paths:
        path = Path(path).resolve()
        chain = [*reversed(path.parents), path]
        for parent, child in zip(chain, chain[1:]):
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                out.setdefault(parent, set()).add(child.name)
                break
    return out


@dataclass
class Sandbox:
    """How to start a command as UID 54321; ``netns`` says whether it has no network."""

    base: Path
    netns: bool
    reason: str
    prefix: list[str] = field(default_factory=list)

    def _preexec(self) -> None:  # pragma: no cover - runs in the child
        os.setgroups([])
        os.setgid(GID)
        os.setuid(UID)

    def run(self, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
        if self.prefix:
            return subprocess.run([*self.prefix, *map(str, argv)], env=env, cwd=cwd,
                                  capture_output=True, text=True, timeout=TIMEOUT)
        return subprocess.run(list(map(str, argv)), env=env, cwd=cwd, preexec_fn=self._preexec,
                              capture_output=True, text=True, timeout=TIMEOUT)


def make_sandbox(base: Path) -> Sandbox:
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    blocked = _blocked([Path(sys.executable), Path(sys.prefix), Path(sys.base_prefix), ROOT,
                        _cli()])
    why = "unshare/setpriv (util-linux) are not installed"
    if unshare and setpriv:
        probe = subprocess.run([unshare, "--net", "--mount", "true"], capture_output=True,
                               text=True, timeout=30)
        if probe.returncode == 0:
            # Root-only folders on the interpreter's path (a pyenv under /root) are replaced,
            # inside the private mount namespace only, by a 0755 tmpfs that exposes just the
            # install (a bind mount of it): the UID reads it but can write nowhere new.
            lines = ["set -e"]
            for i, (parent, children) in enumerate(sorted(blocked.items())):
                for j, name in enumerate(sorted(children)):
                    stash = base / f".stash-{i}-{j}"
                    stash.mkdir(mode=0o700)
                    lines.append(f"mount --bind {shlex.quote(str(parent / name))} "
                                 f"{shlex.quote(str(stash))}")
                lines.append(f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(parent))}")
                for j, name in enumerate(sorted(children)):
                    stash, target = base / f".stash-{i}-{j}", parent / name
                    kind = "-d" if stash.is_dir() else "-f"
                    lines.append(f"[ {kind} {shlex.quote(str(target))} ] || "
                                 + (f"mkdir {shlex.quote(str(target))}" if kind == "-d"
                                    else f"touch {shlex.quote(str(target))}"))
                    lines.append(f"mount --bind {shlex.quote(str(stash))} "
                                 f"{shlex.quote(str(target))}")
            lines.append(f'exec {setpriv} --reuid={UID} --regid={GID} --clear-groups '
                         f'--no-new-privs -- "$@"')
            script = base / ".sandbox.sh"
            script.write_text("\n".join(lines) + "\n")
            return Sandbox(base, True, "", [unshare, "--net", "--mount", "--", "/bin/sh",
                                            str(script)])
        why = f"`unshare --net --mount` failed: {(probe.stderr or '').strip()[:200]}"
    if blocked:
        pytest.skip(f"the Python install is not reachable by UID {UID} "
                    f"({', '.join(map(str, blocked))} is root-only) and it cannot be exposed "
                    f"without mount namespaces ({why})")
    return Sandbox(base, False, f"network namespaces are unavailable here ({why}); the runs "
                                f"used the host network")


def _make_readable(root: Path) -> None:
    for p in [root, *root.rglob("*")]:
        mode = p.stat().st_mode
        os.chmod(p, mode | (0o555 if p.is_dir() else 0o444))


def _owned_by_uid(trees: list[Path]) -> list[str]:
    found = []
    for tree in trees:
        for dirpath, dirnames, filenames in os.walk(tree):
            for name in [*dirnames, *filenames]:
                p = Path(dirpath, name)
                try:
                    if p.lstat().st_uid == UID:
                        found.append(str(p))
                except FileNotFoundError:  # another process removed it meanwhile
                    continue
    return found


@pytest.fixture(scope="module")
def contract():
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to run the CLI as an arbitrary unprivileged UID (as Apptainer "
                    "and `docker run --user` do)")
    from bids_anomaly.synth.cohort import generate_cohort
    from bids_anomaly.synth.config import SynthConfig

    cli = _cli()
    # pytest's tmp_path is 0700 under /tmp/pytest-of-root: use a base other users can enter.
    base = Path(tempfile.mkdtemp(prefix="ba-contract-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        sandbox = make_sandbox(base)
        cohort = generate_cohort(base / "bids", SynthConfig(
            n_healthy=3, n_healthy_test=1, n_patients=1, voxel_size=4.0,
            template_resolution=2, with_skull=False, seed=23))
        _make_readable(cohort.root)
        # The bundle comes from an ordinary (root) training run, read-only for the UID. The
        # sandboxed runs below use the default plugin (MultiProc, forkserver), as the image.
        models = base / "models-out"
        train = subprocess.run(
            [str(cli), "train", str(cohort.root), str(models), "--model-type", "zscore",
             "--registration", "affine-coarse", "--healthy-filter", "split=train",
             "-w", str(base / "train-work"),
             "--nprocs", "1", "--plugin", "Linear"],  # in-process: half the CPU time
            capture_output=True, text=True, timeout=TIMEOUT,
            env={**os.environ, "NIPYPE_NO_ET": "1", "OMP_NUM_THREADS": "1"})
        assert train.returncode == 0, f"training failed:\n{train.stdout}\n{train.stderr}"
        bundle = models / "models" / "zscore"
        _make_readable(models)

        home = base / "home"  # HOME and the working directory: not writable by the UID
        home.mkdir(mode=0o555)
        os.chmod(home, 0o555)
        cache, out, work = base / "cache", base / "out", base / "work"
        for d in (cache, out, work):
            d.mkdir()
            os.chown(d, UID, GID)
        env = {
            "PATH": f"{Path(cli).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                    "/sbin:/bin",
            **dockerfile_env(),
            "HOME": str(home),
            "XDG_CACHE_HOME": str(cache),
            "TORCH_HOME": str(cache / "torch"),
            "MPLCONFIGDIR": str(cache / "matplotlib"),
            # set by Apptainer's runtime even under --cleanenv
            "APPTAINER_CONTAINER": str(base / "bids-anomaly.sif"),
            "APPTAINER_NAME": "bids-anomaly.sif",
        }
        owned_before = _owned_by_uid(INSTALL_TREES)
        before = tree_hash(cohort.root)

        def run(*args):
            return sandbox.run([str(a) for a in args], env, home)

        probe = run(sys.executable, "-c", PROBE, *INSTALL_TREES, cohort.root, bundle,
                    sysconfig.get_path("purelib"))
        runs = {
            "version": run(cli, "--version"),
            "participant": run(cli, cohort.root, out, "participant", "--model", bundle,
                               "--participant-label", *SUBJECTS, "-w", work, "--nprocs", "1"),
            "group": run(cli, cohort.root, out, "group"),
        }
        yield {"sandbox": sandbox, "cohort": cohort, "out": out, "home": home, "env": env,
               "cache": cache, "runs": runs, "probe": probe, "before": before,
               "after": tree_hash(cohort.root), "owned_before": owned_before,
               "owned_after": _owned_by_uid(INSTALL_TREES)}
    finally:
        shutil.rmtree(base, ignore_errors=True)


# Runs inside the sandbox: who am I, what can I write, what network do I see.
PROBE = """
import json, os, socket, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
try:
    socket.create_connection(("192.0.2.1", 80), timeout=3).close()
    net = "connected"
except OSError as exc:
    net = type(exc).__name__ + ": " + str(exc)
import bids_anomaly, bids_anomaly.cli
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "cap_eff": int(status["CapEff"].strip(), 16),
    "writable": {p: os.access(p, os.W_OK)
                 for p in [os.environ["HOME"], os.getcwd(), *sys.argv[1:]]},
    "readable": {p: os.access(p, os.R_OK | os.X_OK) for p in sys.argv[1:]},
    "interfaces": [name for _, name in socket.if_nameindex()],
    "net": net,
    "env": sorted(os.environ),
    "package": bids_anomaly.__file__, "cli": bids_anomaly.cli.__file__,
}))
"""


def _show(proc: subprocess.CompletedProcess) -> str:
    return (f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
            f"--- stderr\n{proc.stderr[-4000:]}")


def test_sandbox_is_unprivileged_and_read_only(contract):
    probe = contract["probe"]
    assert probe.returncode == 0, _show(probe)
    info = json.loads(probe.stdout.strip().splitlines()[-1])
    assert (info["uid"], info["gid"], info["groups"], info["cap_eff"]) == (UID, GID, [], 0)
    assert not any(info["writable"].values()), info["writable"]  # HOME, cwd, install, input
    assert all(info["readable"].values()), info["readable"]
    assert Path(info["package"]).is_relative_to(ROOT / "bids_anomaly"), info["package"]
    for key in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHOME", "VIRTUAL_ENV"):
        assert key not in info["env"], f"{key} leaked into the sandbox"


def test_no_network_in_sandbox(contract):
    sandbox = contract["sandbox"]
    if not sandbox.netns:
        pytest.skip(sandbox.reason)
    info = json.loads(contract["probe"].stdout.strip().splitlines()[-1])
    assert info["interfaces"] == ["lo"], info["interfaces"]
    assert info["net"] != "connected", info["net"]


def test_environment_is_the_images(contract):
    env = contract["env"]
    for key, value in FIXED_ENV.items():
        assert env.get(key) == value, f"the Dockerfile should set {key}={value}"
    for key in CACHE_ENV:
        assert Path(env[key]).is_relative_to(contract["cache"])


@pytest.mark.parametrize("step", ["version", "participant", "group"])
def test_step_succeeds(contract, step):
    proc = contract["runs"][step]
    assert proc.returncode == 0, _show(proc)


def test_version_output(contract):
    from bids_anomaly import __version__

    assert contract["runs"]["version"].stdout.split() == ["bids-anomaly", __version__]


def test_derivatives_written_by_the_uid(contract):
    out = contract["out"]
    for s in SUBJECTS:
        for pattern in OUTPUTS:
            assert (out / pattern.format(s=s)).is_file(), pattern.format(s=s)
    for name in ("dataset_description.json", ".bidsignore", "group_anomaly.tsv",
                 "group_anomaly.json", "group_report.html"):
        assert (out / name).is_file(), name
    foreign = [str(p) for p in out.rglob("*") if p.lstat().st_uid != UID]
    assert not foreign, f"not written by UID {UID}: {foreign[:5]}"
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Container"] == {
        "Type": "singularity", "Tag": contract["env"]["BIDS_ANOMALY_IMAGE_TAG"]}
    df = pd.read_csv(out / "group_anomaly.tsv", sep="\t")
    assert sorted(df.participant_id) == [f"sub-{s}" for s in sorted(SUBJECTS)]
    assert set(df.status) == {"ok"}


def test_input_dataset_unchanged(contract):
    assert contract["after"] == contract["before"]


def test_nothing_written_to_home(contract):
    home = contract["home"]
    assert list(home.iterdir()) == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o555


def test_nothing_written_to_install_tree(contract):
    """The run imported the package without PYTHONDONTWRITEBYTECODE, yet wrote nothing into
    the (root-owned) install: no __pycache__ or anything else owned by the UID."""
    assert contract["owned_before"] == []
    assert contract["owned_after"] == []
