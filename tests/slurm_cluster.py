"""A throwaway one-node Slurm cluster on 127.0.0.1 for tests that submit real jobs.

The module-scoped fixture `slurm_cluster` writes a configuration into a temporary directory
(this host as the only node, at 127.0.0.1, free ports, its own munge key and socket), starts
munged, slurmctld and slurmd in the foreground as children of the test process, waits until
the node is idle and, at the end, cancels what is left and stops the daemons by pid.

Jobs go through launch/slurm_train.sh with this interpreter's python and torchrun:

    from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

    def test_probe(slurm_cluster):
        job = slurm_cluster.run_job(["-m", "syncsn.distributed"], ntasks=2)
        assert job.state == "COMPLETED", job.describe()

Tests using the fixture are skipped, with the reason, when the Slurm or munge binaries are
missing (Debian: apt-get install slurm-wlm munge) or when not running as root (slurmd must).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_TRAIN = REPO / "launch" / "slurm_train.sh"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def unavailable_reason() -> str | None:
    """Why a local cluster cannot run here, or None when it can."""
    missing = [b for b in DAEMONS + CLIENTS if shutil.which(b, path=_SEARCH_PATH) is None]
    if missing:
        return (
            f"Slurm/munge not installed (missing {', '.join(missing)}); "
            "install with: apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root: slurmd starts job steps as their user"
    return None


@dataclass
class JobResult:
    job_id: int
    state: str
    exit_code: str
    restarts: int
    output: str
    elapsed: float

    def describe(self) -> str:
        return (
            f"job {self.job_id}: {self.state} (exit {self.exit_code}, restarts "
            f"{self.restarts}, {self.elapsed:.1f}s)\n--- output ---\n{self.output}"
        )


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _clean_environ() -> dict[str, str]:
    """This process's environment without launcher or Slurm input variables.

    The suite may itself run inside a Slurm job or under torchrun; none of that may leak
    into the local cluster's commands or jobs.
    """
    launcher = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"}
    launcher |= {"MASTER_PORT", "LAUNCH_MODE", "GPUS", "SRUN_ARGS", "TORCHRUN_ARGS"}
    prefixes = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "TORCHELASTIC_")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith(prefixes)}
    env["PATH"] = _SEARCH_PATH
    return env


class SlurmCluster:
    """One slurmctld + one slurmd (+ munged) on this host, configured under `root`."""

    def __init__(self, root: Path, cpus: int = 2):
        self.root = root
        self.cpus = cpus
        self.conf = root / "slurm.conf"
        self.jobs_dir = root / "jobs"
        self.controller = socket.gethostname().split(".")[0]
        # The node's name is what SLURM_JOB_NODELIST holds, and the tasks resolve it to find
        # rank 0; fall back to "localhost" where this host's own name does not resolve.
        try:
            socket.gethostbyname(self.controller)
            self.node = self.controller
        except OSError:
            self.node = "localhost"
        self._procs: dict[str, subprocess.Popen] = {}
        self._munge_dir: Path | None = None
        self.env: dict[str, str] = {}

    # -- set-up ----------------------------------------------------------------------------

    def _write_config(self) -> None:
        for sub in ("state", "spool", "jobs", "munge"):
            (self.root / sub).mkdir(exist_ok=True)
        munge_dir = self.root / "munge"
        if len(str(munge_dir / "munge.socket")) > 100:  # AF_UNIX paths are short
            self._munge_dir = Path(tempfile.mkdtemp(prefix="munge-"))
            munge_dir = self._munge_dir
        self.munge_socket = munge_dir / "munge.socket"
        self.munge_key = munge_dir / "munge.key"
        self.munge_key.write_bytes(os.urandom(1024))
        self.munge_key.chmod(0o600)

        ctld_port, slurmd_port = _free_ports(2)
        # Derived MASTER_PORTs (20000 + job id % 10000) then differ between clusters that run
        # at the same time on this machine.
        first_job = random.randrange(100_000, 900_000)
        r = self.root
        self.conf.write_text(
            f"""\
ClusterName=syncsntest
SlurmctldHost={self.controller}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
FirstJobId={first_job}
KillWait=5
MinJobAge=600
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "wb")  # the child keeps its own copy
        self._procs[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()

    def _wait_for(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode})\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} not ready after {timeout:.0f}s\n{self.logs()}")

    def start(self, timeout: float = 30) -> None:
        t0 = time.monotonic()
        self._write_config()
        self.env = {**_clean_environ(), "SLURM_CONF": str(self.conf)}
        self._spawn(
            "munged",
            [
                shutil.which("munged", path=_SEARCH_PATH),
                "--foreground",
                "--force",  # root and a key outside /etc/munge are fine for a throwaway one
                f"--socket={self.munge_socket}",
                f"--key-file={self.munge_key}",
                f"--pid-file={self.munge_socket.parent / 'munged.pid'}",
                f"--log-file={self.root / 'munged.log'}",
                f"--seed-file={self.munge_socket.parent / 'munged.seed'}",
            ],
        )
        self._wait_for("munged", self.munge_socket.exists, timeout)
        sbin = {name: shutil.which(name, path=_SEARCH_PATH) for name in DAEMONS}
        self._spawn("slurmctld", [sbin["slurmctld"], "-D", "-i", "-f", str(self.conf)])
        slurmd = [sbin["slurmd"], "-D", "-f", str(self.conf)]
        if self.node != self.controller:
            slurmd += ["-N", self.node]
        self._spawn("slurmd", slurmd)
        self._wait_for("the node", lambda: self.node_state() == "idle", timeout)
        print(f"[slurm] cluster up in {time.monotonic() - t0:.1f}s ({self.root})", flush=True)

    def stop(self) -> None:
        """Cancel remaining jobs, then stop the daemons this object started, by pid."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            self._command(["scancel", "--quiet", f"--user={os.getuid()}"], check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.node_state() not in ("idle", ""):
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._munge_dir is not None:
            shutil.rmtree(self._munge_dir, ignore_errors=True)

    # -- queries ---------------------------------------------------------------------------

    def _command(self, cmd: Sequence[str], check: bool = True) -> str:
        proc = subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=30, check=False
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def node_state(self) -> str:
        out = self._command(["sinfo", "-h", "-n", self.node, "-o", "%t"], check=False)
        return out.strip().rstrip("*~#!%$@^-")

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, Restarts, ExitCode, EligibleTime, ..."""
        out = self._command(["scontrol", "show", "job", "--oneliner", str(job_id)])
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def output_path(self, job_id: int) -> Path:
        return self.jobs_dir / f"job-{job_id}.out"

    def output(self, job_id: int) -> str:
        path = self.output_path(job_id)
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, lines: int = 15) -> str:
        parts = []
        for name in (
            "munged.log",
            "slurmctld.log",
            "slurmd.log",
            *(f"{d}.stdout" for d in DAEMONS),
        ):
            path = self.root / name
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name} ---\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- jobs ------------------------------------------------------------------------------

    def submit(
        self,
        command: Sequence[str],
        *,
        ntasks: int = 2,
        mode: str = "tasks",
        env: Mapping[str, str] | None = None,
        sbatch_args: Sequence[str] = (),
    ) -> int:
        """sbatch launch/slurm_train.sh COMMAND... as an `ntasks`-task job; returns the job id.

        command: what follows the script, e.g. ["-m", "syncsn.distributed"] or
            ["examples/segmentation/train.py", "--resume", "auto"] (relative to the repo).
        mode: LAUNCH_MODE, "tasks" (one srun task per process) or "torchrun".
        The job runs this interpreter's python/torchrun, in the repository, one CPU per task,
        its output in output_path(job_id). The script's #SBATCH lines (--requeue, --signal,
        ...) apply, except the resources overridden here for a CPU-only node.
        """
        job_env = {
            **self.env,
            "LAUNCH_MODE": mode,
            "PYTHON": sys.executable,
            "TORCHRUN": str(Path(sys.executable).with_name("torchrun")),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        cmd = [
            "sbatch",
            "--parsable",
            f"--output={self.jobs_dir}/job-%j.out",
            f"--chdir={REPO}",
            "--nodes=1",
            f"--ntasks-per-node={ntasks}",
            "--cpus-per-task=1",
            "--gpus-per-node=0",
            "--time=10",
            *sbatch_args,
            str(SLURM_TRAIN),
            *command,
        ]
        proc = subprocess.run(
            cmd, env=job_env, capture_output=True, text=True, timeout=30, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed ({proc.returncode}): {proc.stderr}\n{self.logs()}")
        job_id = int(proc.stdout.strip().split(";")[0])
        print(f"[slurm] submitted job {job_id}: {' '.join(command)} ({mode})", flush=True)
        return job_id

    def wait(self, job_id: int, timeout: float = 120) -> JobResult:
        """Wait for the job to end; on timeout cancel it and fail with its output and logs."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in FINAL_STATES:
                result = JobResult(
                    job_id,
                    info["JobState"],
                    info.get("ExitCode", "?"),
                    int(info.get("Restarts", "0")),
                    self.output(job_id),
                    time.monotonic() - t0,
                )
                print(
                    f"[slurm] job {job_id} {result.state} after {result.elapsed:.1f}s", flush=True
                )
                return result
            time.sleep(0.25)
        self._command(["scancel", str(job_id)], check=False)
        raise AssertionError(
            f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s\n"
            f"--- output ---\n{self.output(job_id)}\n{self.logs()}"
        )

    def run_job(self, command: Sequence[str], *, timeout: float = 120, **kwargs) -> JobResult:
        """submit() then wait(): the hook for tests that run a command inside a job."""
        return self.wait(self.submit(command, **kwargs), timeout=timeout)

    def wait_for_output(self, job_id: int, pattern: str, count: int = 1, timeout: float = 60):
        """Wait until `pattern` (a regex) occurs `count` times in the job's output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.output(job_id))) >= count:
                return
            state = self.job_info(job_id).get("JobState")
            if state in FINAL_STATES:
                break
            time.sleep(0.2)
        raise AssertionError(
            f"job {job_id}: {pattern!r} not seen {count}x\n--- output ---\n"
            f"{self.output(job_id)}\n{self.logs()}"
        )

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        """Send `sig` to the job's batch script only: what --signal=B:USR1@T does T seconds
        before the time limit."""
        self._command(["scancel", "--batch", f"--signal={sig}", str(job_id)])

    def release_requeued(self, job_id: int, timeout: float = 60) -> None:
        """Let a requeued job start again now.

        Slurm holds a requeued batch job for 120 s so that the old run's step daemons can
        finish (slurmd refuses to start a job id it is still cleaning up). Here we watch them
        go ourselves, by their sockets in the spool directory, then release the job.
        """
        spool = self.root / "spool"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            requeued = int(info.get("Restarts", "0")) >= 1 and info.get("JobState") == "PENDING"
            if requeued and not any(spool.glob(f"*_{job_id}.*")):
                self._command(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
                return
            if info.get("JobState") in FINAL_STATES:
                break
            time.sleep(0.2)
        raise AssertionError(
            f"job {job_id} was not requeued: {self.job_info(job_id).get('JobState')}\n"
            f"--- output ---\n{self.output(job_id)}\n{self.logs()}"
        )


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
