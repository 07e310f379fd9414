"""A throw-away single-node SLURM cluster for the tests (Debian's ``slurm-wlm`` and ``munge``).

``SlurmCluster.start(folder)`` writes a munge key, a ``slurm.conf`` (one node ``localhost``
with 2 CPUs, one partition ``debug``, free TCP ports, state, spool, logs and the job
completion file all under ``folder``), starts ``munged``, ``slurmctld`` and ``slurmd`` in the
foreground as children of this process and waits until ``sinfo`` reports the node idle.
``stop()`` ends exactly those processes, by pid (SIGTERM, then SIGKILL), and returns the pids
still alive (none, unless something is badly wrong).

Every client call (sbatch, squeue, scontrol, srun, and nipype's SLURM plugin, which shells
out to sbatch/squeue) must see ``SLURM_CONF`` pointing at the cluster's ``slurm.conf``:
``cluster.env`` is ``os.environ`` plus that variable.

Accounting: there is no slurmdbd, so ``sacct`` has nothing to read
(``accounting_storage/none``). Finished jobs are recorded by ``jobcomp/filetxt`` in
``folder/jobcomp.txt``, one line per job or array task (``JobId=``, ``ArrayJobId=``,
``ArrayTaskId=``, ``JobState=``, ``ExitCode=``, ``StartTime=``, ``EndTime=`` ...), which
``jobcomp()`` parses: the sacct-style evidence. ``squeue``/``scontrol show job`` see them too
for ``MinJobAge`` seconds after the end.

Where the cluster cannot start (not root, a package missing, a daemon that fails) ``start``
raises ``ClusterUnavailable`` with the reason and the daemon's log tail, for ``pytest.skip``.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NODE = "localhost"
PARTITION = "debug"
CPUS = 2
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "srun", "scancel")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot start here; the message says why (for ``pytest.skip``)."""


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _mem_mb() -> int:
    """Memory the node offers: 90 % of MemTotal (slurmd drains a node that has less)."""
    text = Path("/proc/meminfo").read_text()
    kb = int(re.search(r"^MemTotal:\s+(\d+)", text, re.M).group(1))
    return max(512, int(kb / 1024 * 0.9))


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path.name}: no log)"
    return f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(
        text.splitlines()[-lines:])


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin", "/sbin") if (p := Path(d) / name).is_file()
         and os.access(p, os.X_OK)), None)


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    start_seconds: float = 0.0
    mem_mb: int = 0

    # -- start / stop ------------------------------------------------------------------

    @classmethod
    def start(cls, root: Path, timeout: float = 60.0) -> SlurmCluster:
        if os.name != "posix" or os.geteuid() != 0:
            raise ClusterUnavailable("a test SLURM cluster needs root (slurmd runs jobs as "
                                     "any user); not root here")
        missing = [n for n in (*DAEMONS, *CLIENTS) if _find(n) is None]
        if missing:
            raise ClusterUnavailable(
                f"{', '.join(missing)} not found: apt-get install slurm-wlm munge")
        t0 = time.perf_counter()
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        for sub in ("munge", "state", "spool", "log", "run"):
            (root / sub).mkdir(exist_ok=True)
            os.chmod(root / sub, 0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o400)
        socket_path = root / "munge" / "munge.socket"
        ctld_port, slurmd_port = _free_ports(2)
        mem = _mem_mb()
        conf = root / "slurm.conf"
        plugstack = root / "plugstack.conf"
        plugstack.write_text("")
        conf.write_text(f"""\
# Throw-away single-node cluster written by tests/slurm_cluster.py
ClusterName=bidsanomalytest
SlurmctldHost={NODE}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={root / "state"}
SlurmdSpoolDir={root / "spool"}
SlurmctldPidFile={root / "run" / "slurmctld.pid"}
SlurmdPidFile={root / "run" / "slurmd.pid"}
SlurmctldLogFile={root / "log" / "slurmctld.log"}
SlurmdLogFile={root / "log" / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={plugstack}
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root / "jobcomp.txt"}
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=600
MaxArraySize=1001
InactiveLimit=0
KillWait=5
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={CPUS} RealMemory={mem} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM")},
               "SLURM_CONF": str(conf)}
        cluster = cls(root=root, conf=conf, env=env, mem_mb=mem)
        try:
            cluster._spawn("munged", [
                _find("munged"), "--foreground", "--force", f"--socket={socket_path}",
                f"--key-file={key}", f"--log-file={root / 'log' / 'munged.log'}",
                f"--pid-file={root / 'run' / 'munged.pid'}",
                f"--seed-file={root / 'munge' / 'munged.seed'}", "--num-threads=4"])
            cluster._wait(lambda: socket_path.exists(), 15, "munged", "its socket")
            cluster._spawn("slurmctld", [_find("slurmctld"), "-D", "-i", "-f", str(conf)])
            cluster._wait(lambda: cluster._ok(["scontrol", "ping"], "UP"), timeout,
                          "slurmctld", "scontrol ping UP")
            cluster._spawn("slurmd", [_find("slurmd"), "-D", "-N", NODE, "-f", str(conf)])
            cluster._wait(lambda: cluster._ok(["sinfo", "-h", "-N", "-o", "%t"], "idle",
                                              exact=True),
                          timeout, "slurmd", "node idle in sinfo")
        except OSError as exc:  # a daemon that cannot even be executed
            cluster.stop()
            raise ClusterUnavailable(f"cannot start the test cluster: {exc}\n"
                                     f"{cluster.logs()}") from exc
        except BaseException:
            cluster.stop()
            raise
        cluster.start_seconds = time.perf_counter() - t0
        return cluster

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 (closed: stop)
        self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=self.env,
                                            cwd=self.root, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        out.close()

    def _ok(self, argv: list[str], want: str, exact: bool = False) -> bool:
        try:
            proc = subprocess.run(argv, env=self.env, capture_output=True, text=True,
                                  timeout=10)
        except subprocess.TimeoutExpired:
            return False
        out = proc.stdout.strip()
        return proc.returncode == 0 and (out == want if exact else want in out)

    def _wait(self, ready, timeout: float, name: str, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for n, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterUnavailable(f"{n} exited ({p.returncode}) while starting "
                                             f"the test cluster\n{self.logs(n)}")
            if ready():
                return
            time.sleep(0.25)
        raise ClusterUnavailable(f"{name}: no {what} after {timeout:.0f} s\n{self.logs(name)}")

    def logs(self, *names: str) -> str:
        parts = []
        for n in names or DAEMONS:
            parts.append(_tail(self.root / "log" / f"{n}.log"))
            stdout = self.root / "log" / f"{n}.stdout"
            if stdout.is_file() and stdout.stat().st_size:
                parts.append(_tail(stdout))
        return "\n".join(parts)

    @property
    def pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items()}

    def stop(self, grace: float = 15.0) -> list[int]:
        """Cancel the jobs still queued, SIGTERM each daemon (slurmd, slurmctld, munged:
        reverse start order) and SIGKILL any left after ``grace`` seconds, then SIGKILL what
        the cluster started and left behind (slurmstepd, job processes: found by this
        cluster's SLURM_CONF in their environment). Returns the pids still alive."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            try:
                jobs = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout
                if jobs.split():
                    self.run(["scancel", *jobs.split()], check=False, timeout=10)
                    deadline = time.monotonic() + grace
                    while time.monotonic() < deadline and self.run(
                            ["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.strip():
                        time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        strays = self.strays()
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(_gone(p) for p in strays):
            time.sleep(0.1)
        return [pid for pid in [*(p.pid for p in self.procs.values()), *strays]
                if not _gone(pid)]

    def strays(self) -> list[int]:
        """Live processes, other than this one, whose environment holds this cluster's
        SLURM_CONF: what its daemons started (slurmstepd, jobs) and what the tests started
        with ``env``."""
        marker = f"SLURM_CONF={self.conf}".encode()
        skip = {os.getpid(), *self.pids.values()}
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in skip:
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker in env and not _gone(int(entry.name)):
                out.append(int(entry.name))
        return out

    # -- clients -----------------------------------------------------------------------

    def run(self, argv: list[str], check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        kw.setdefault("env", self.env)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stdout}"
                               f"\n{proc.stderr}")
        return proc

    def jobcomp(self) -> list[dict[str, str]]:
        """The job completion records, oldest first (``KEY=VALUE`` fields of each line)."""
        path = self.root / "jobcomp.txt"
        if not path.is_file():
            return []
        return [dict(re.findall(r"(\w+)=(\S*)", line))
                for line in path.read_text().splitlines() if line.strip()]

    def wait_jobs(self, job_ids: list[str], timeout: float = 600) -> list[dict[str, str]]:
        """Wait until every job in ``job_ids`` (array jobs: every task) has left the queue;
        returns their completion records."""
        ids = [str(j) for j in job_ids]
        deadline = time.monotonic() + timeout
        while True:
            out = self.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)],
                           check=False).stdout
            if not out.strip():
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"jobs {ids} still queued after {timeout} s:\n{out}\n"
                                   f"{self.logs('slurmctld')}")
            time.sleep(1)
        return [r for r in self.jobcomp() if r.get("JobId") in ids
                or r.get("ArrayJobId") in ids]


def _prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()  # looked up here: the child between fork and exec only calls it


def _die_with_parent() -> None:
    """In the daemon, before exec: SIGTERM when the test process dies (PR_SET_PDEATHSIG = 1),
    so that a killed pytest leaves no cluster behind."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM), 0, 0, 0)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes once reaped (Popen.wait).
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"
