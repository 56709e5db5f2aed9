"""A throwaway single-host SLURM cluster for the launcher tests (after the recipe in
shared/reference/single-host-slurm.sh): Debian's slurmctld + one `slurmd -N nK` per node on this host,
munge auth, root, no systemd or cgroups. Everything lives in a temp dir; `stop()` kills only the PIDs
`start()` recorded (munged only if we started it) and removes the temp dir (MEGALM_KEEP_SLURM=1 keeps it).

Use the `slurm_cluster` fixture (tests/test_launcher_slurm.py); it skips with the reason when the
packages are missing (install them with scripts/install_slurm.sh) or when we are not root.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo", "munged", "munge", "unmunge")


def missing_requirements() -> Optional[str]:
    """Why a cluster cannot start here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        return (f"SLURM packages not installed (missing {', '.join(missing)}): run scripts/install_slurm.sh "
                f"(apt: {' '.join(PACKAGES)})")
    if os.geteuid() != 0:
        return "the throwaway SLURM cluster needs root (slurmd runs jobs as root here)"
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_port(n: int) -> int:
    """A base port with base..base+n free (slurmctld + one per slurmd)."""
    for base in range(16817, 30000, 37):
        if all(_port_free(base + i) for i in range(n + 1)):
            return base
    raise RuntimeError("no free port range for slurmctld/slurmd")


def _munge_ok(env) -> bool:
    try:
        m = subprocess.run(["munge", "-n"], capture_output=True, timeout=5, env=env)
        if m.returncode != 0:
            return False
        u = subprocess.run(["unmunge"], input=m.stdout, capture_output=True, timeout=5, env=env)
        return u.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass
class SlurmCluster:
    nodes: int = 2
    root: str = ""
    port: int = 0
    pids: list[tuple[str, int]] = field(default_factory=list)
    env: dict = field(default_factory=dict)
    node_names: list[str] = field(default_factory=list)
    # How long slurmctld waits for a silent slurmd before marking its node DOWN (and acting on its jobs).
    slurmd_timeout: int = 10
    message_timeout: Optional[int] = None  # SLURM's default is 10 s

    @property
    def conf(self) -> str:
        return os.path.join(self.root, "etc", "slurm.conf")

    def run(self, args: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self.root = tempfile.mkdtemp(prefix="megalm-slurm-")
        for d in ("etc", "state", "spool", "log", "run"):
            os.makedirs(os.path.join(self.root, d))
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 1
        with open("/proc/meminfo") as f:
            mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        mem = mem_kb // 1024 * 8 // 10 // self.nodes
        if not _munge_ok(self.env):
            key = "/etc/munge/munge.key"
            if not (os.path.exists(key) and os.path.getsize(key) > 0):
                subprocess.run(["mungekey", "-c", "-k", key], check=True, capture_output=True)
                shutil.chown(key, "munge", "munge")
                os.chmod(key, 0o400)
            os.makedirs("/run/munge", exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            os.chmod("/run/munge", 0o755)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True, capture_output=True)
            for _ in range(50):
                if _munge_ok(self.env):
                    break
                time.sleep(0.1)
            try:
                with open("/run/munge/munged.pid") as f:
                    self.pids.append(("munged", int(f.read().strip())))
            except (OSError, ValueError):
                pass
        self.port = _pick_port(self.nodes)
        self.node_names = [f"n{i}" for i in range(1, self.nodes + 1)]
        r = self.root
        lines = [
            "ClusterName=megalmci", f"SlurmctldHost={host}", f"SlurmctldPort={self.port}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            "# cred_expire = also the wait before a requeued job may start again (default 120 s)",
            "AuthInfo=cred_expire=10",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/slurmd-%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid", f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerParameters=sched_interval=2,bf_interval=2", "MpiDefault=none", "MailProg=/bin/true",
            "ReturnToService=2", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/log/jobcomp.txt", f"SlurmdTimeout={self.slurmd_timeout}", "MinJobAge=600", "KillWait=10",
        ]
        if self.message_timeout is not None:
            lines.append(f"MessageTimeout={self.message_timeout}")
        for i, n in enumerate(self.node_names, start=1):
            lines.append(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.port + i} CPUs={cpus} "
                         f"Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={mem}")
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", self.conf])
        for n in self.node_names:
            self._spawn(f"slurmd-{n}", ["slurmd", "-D", "-N", n, "-f", self.conf])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            p = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = " ".join(sorted(set(p.stdout.split())))
            if p.returncode == 0 and state == "idle":
                return self
            time.sleep(0.3)
        logs = self.logs()
        self.stop()
        raise RuntimeError(f"SLURM cluster not ready within {timeout}s (node state {state!r}):\n{logs}")

    def _spawn(self, name: str, args: list[str]) -> None:
        out = open(os.path.join(self.root, "log", f"{name}.stdout"), "w")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.pids.append((name, proc.pid))

    def job_processes(self, job_id: str, node: str) -> list[int]:
        """PIDs of job `job_id`'s processes on `node`: its tasks (SLURMD_NODENAME=node, SLURM_JOB_ID=job in
        their environment) and the slurmstepd above them. On this single host they outlive their slurmd."""
        tasks = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    env = set(f.read().split(b"\0"))
            except OSError:
                continue
            if f"SLURMD_NODENAME={node}".encode() in env and f"SLURM_JOB_ID={job_id}".encode() in env:
                tasks.append(int(name))
        stepds = set()
        for pid in tasks:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
                ppid = int(stat[stat.rfind(")") + 2:].split()[1])
                with open(f"/proc/{ppid}/cmdline", "rb") as f:
                    if f.read().startswith(b"slurmstepd"):
                        stepds.add(ppid)
            except (OSError, ValueError):
                continue
        return sorted(stepds) + sorted(set(tasks) - stepds)

    def kill_node(self, node: str, job_id: str) -> list[int]:
        """What a node failure does: its slurmd and the job's processes on it die at once (SIGKILL).
        Returns the job PIDs killed (slurmd aside)."""
        pid = dict(self.pids)[f"slurmd-{node}"]
        victims = self.job_processes(job_id, node)
        for p in [pid, *victims]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        self.pids = [(n, p) for n, p in self.pids if p != pid]
        return victims

    def restart_node(self, node: str, timeout: float = 60) -> None:
        """Start `node`'s slurmd again and wait until SLURM has it back in service (ReturnToService=2)."""
        self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", self.conf])
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run(["sinfo", "-h", "-n", node, "-N", "-o", "%T"], check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.3)
        raise RuntimeError(f"node {node} not back in service within {timeout}s (state {state!r}):\n{self.logs()}")

    def logs(self, tail: int = 15) -> str:
        parts = []
        logdir = os.path.join(self.root, "log")
        for name in sorted(os.listdir(logdir)) if os.path.isdir(logdir) else []:
            with open(os.path.join(logdir, name), errors="replace") as f:
                lines = f.read().splitlines()[-tail:]
            parts.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        try:
            jobs = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=10).stdout.split()
            if jobs:
                self.run(["scancel", *jobs], check=False, timeout=10)
                for _ in range(100):
                    if not self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=10).stdout.split():
                        break
                    time.sleep(0.2)
        except (OSError, subprocess.SubprocessError):
            pass
        for name, pid in reversed(self.pids):  # reverse start order, recorded PIDs only
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(150):
                try:
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        break
                except ChildProcessError:  # not our child (munged): poll for it
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.pids.clear()
        if self.root and not os.environ.get("MEGALM_KEEP_SLURM"):  # keep state and logs for debugging
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------------------------- job helpers
    def job(self, job_id: str) -> dict:
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        out = {}
        for tok in p.stdout.split():
            k, sep, v = tok.partition("=")
            if sep and k not in out:
                out[k] = v
        return out

    def wait_job(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
                 timeout: float = 120, what: str = "") -> dict:
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        self.run(["scancel", str(job_id)], check=False)
        raise AssertionError(f"job {job_id} {what} did not reach {states} within {timeout}s; last {info}\n{self.logs()}")


@contextlib.contextmanager
def running_cluster(nodes: int = 2, **settings):
    """Start a cluster for a test module (pytest.skip with the reason when it cannot run here).
    `settings`: SlurmCluster fields such as slurmd_timeout."""
    import pytest

    why = missing_requirements()
    if why:
        pytest.skip(why)
    cluster = SlurmCluster(nodes=nodes, **settings).start()
    try:
        yield cluster
    finally:
        cluster.stop()
