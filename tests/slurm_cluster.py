"""Helpers for tests that run Snakemake through a real single-node SLURM cluster (ci/slurm/start.sh).

    from slurm_cluster import slurm_cluster, run_snakemake, SLURM_PROFILE   # in a test module

* ``slurm_cluster``: session-scoped pytest fixture. Starts the cluster with ci/slurm/start.sh when running
  as root on Linux with apt-get and ``QFTBENCH_SLURM != "0"``; otherwise the test is skipped (with the
  reason). A cluster that the fixture started is stopped again at the end of the session unless
  ``QFTBENCH_SLURM_KEEP=1``.
* ``run_snakemake(args, cwd, timeout)``: runs ``timeout -k 10 <timeout> python -m snakemake <args>`` in
  ``cwd`` (Snakemake ignores SIGTERM while jobs run, hence the KILL after 10 s), returns the
  CompletedProcess with stdout+stderr merged in ``.stdout``, and keeps a copy in ``cwd/snakemake.out``.
* ``submitted_jobs(output)`` / ``job_info(jobid)``: what the SLURM plugin submitted, and what SLURM says
  about a job (``scontrol show job`` while slurmctld still holds it, MinJobAge=300 s after it ends; then the
  job-completion log).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
START_SH = REPO / "ci" / "slurm" / "start.sh"
STOP_SH = REPO / "ci" / "slurm" / "stop.sh"
SLURM_PROFILE = REPO / "workflow" / "profiles" / "slurm"
LOCAL_PROFILE = REPO / "workflow" / "profiles" / "local"
SMOKE_WORKFLOW = REPO / "tests" / "data" / "slurm_smoke"

# Environment for Snakemake under test: first status check 5 s after submission (the profile's default is
# 20 s). While nothing finishes, each further check comes 10 s later than the previous gap (5, +15, +25 ...;
# back to 5 s after any job finished). A trivial job takes 10-14 s here (two Snakemake start-ups inside the
# job), so 5 s catches it at +20 s; 2 s would check at +2, +14 and then miss it until +36.
FAST_POLLING_ENV = {"QFT_SLURM_INIT_SECONDS": "5"}


def slurm_unavailable_reason() -> str | None:
    """Why a local SLURM cluster cannot be started here (None if it can)."""
    if os.environ.get("QFTBENCH_SLURM", "") == "0":
        return "QFTBENCH_SLURM=0"
    if not sys.platform.startswith("linux"):
        return f"needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "ci/slurm/start.sh needs root"
    if shutil.which("apt-get") is None:
        return "ci/slurm/start.sh needs apt-get (Debian/Ubuntu)"
    if shutil.which("timeout") is None:
        return "needs coreutils timeout"
    return None


def cluster_answers() -> bool:
    """True if a SLURM controller answers right now."""
    if shutil.which("scontrol") is None:
        return False
    try:
        r = subprocess.run(["timeout", "5", "scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and "UP" in r.stdout


def start_cluster(timeout: int = 900) -> tuple[float, str]:
    """Run ci/slurm/start.sh; returns (seconds, its output). Raises RuntimeError on failure."""
    t0 = time.monotonic()
    try:
        r = subprocess.run(["timeout", "-k", "10", str(timeout), "bash", str(START_SH)],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=timeout + 30)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"ci/slurm/start.sh did not finish in {timeout} s:\n{e.stdout}") from e
    if r.returncode != 0:
        raise RuntimeError(f"ci/slurm/start.sh failed (exit {r.returncode}):\n{r.stdout}")
    return time.monotonic() - t0, r.stdout


def stop_cluster(timeout: int = 120) -> str:
    r = subprocess.run(["timeout", "-k", "10", str(timeout), "bash", str(STOP_SH)],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout + 30)
    return r.stdout


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM cluster (started by ci/slurm/start.sh), or skip."""
    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    was_running = cluster_answers()
    try:
        seconds, output = start_cluster()
    except RuntimeError as e:
        pytest.fail(str(e))
    info = {"start_seconds": seconds, "start_output": output, "was_running": was_running,
            "profile": SLURM_PROFILE}
    yield info
    if not was_running and os.environ.get("QFTBENCH_SLURM_KEEP", "") != "1":
        stop_cluster()


def snakemake_command() -> list[str]:
    """The Snakemake of this interpreter (jobs inside SLURM re-use the same interpreter)."""
    return [sys.executable, "-m", "snakemake"]


def run_snakemake(args, cwd, timeout: int = 600, env: dict | None = None,
                  kill_after: int = 10) -> subprocess.CompletedProcess:
    """Run ``timeout -k <kill_after> <timeout> python -m snakemake <args>`` in ``cwd``.

    ``args`` is a list of strings (e.g. ``["--workflow-profile", str(SLURM_PROFILE), "all"]``);
    ``env`` entries are added to os.environ. Never raises on a non-zero exit: check ``.returncode``
    (124/137 = killed by the timeout). stdout and stderr are merged into ``.stdout`` and also written to
    ``cwd/snakemake.out``.
    """
    cwd = Path(cwd)
    cmd = ["timeout", "-k", str(kill_after), str(timeout), *snakemake_command(), *map(str, args)]
    full_env = dict(os.environ)
    full_env.update(env or {})
    # jobs run on the same machine with --export=ALL: make sure they find this venv's tools first
    full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full_env.get("PATH", "")])
    try:
        r = subprocess.run(cmd, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout + kill_after + 30)
    except subprocess.TimeoutExpired as e:  # only if `timeout` itself failed to stop it
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        r = subprocess.CompletedProcess(cmd, 137, out, None)
    (cwd / "snakemake.out").write_text(" ".join(cmd) + "\n" + (r.stdout or ""))
    return r


_SUBMITTED = re.compile(r"submitted with SLURM jobid (\d+) \(log: (\S+)\)")


def submitted_jobs(output: str) -> list[dict]:
    """Jobs the SLURM plugin submitted (in order): [{'jobid': '12', 'rule': 'resume', 'log': '...'}]."""
    jobs = []
    for jobid, log in _SUBMITTED.findall(output):
        m = re.search(r"slurm_logs/rule_([^/]+)/", log)
        jobs.append({"jobid": jobid, "rule": m.group(1) if m else None, "log": log})
    return jobs


JOBCOMP = Path(os.environ.get("QFT_SLURM_DIR", "/tmp/qft-slurm")) / "log" / "jobcomp.txt"


def _parse_tokens(text: str) -> dict[str, str]:
    info: dict[str, str] = {}
    for token in text.split():
        if "=" in token:
            k, v = token.split("=", 1)
            info.setdefault(k, v)
    return info


def job_info(jobid) -> dict[str, str]:
    """What SLURM knows about a job: JobState, ExitCode, TimeLimit, WorkDir, ...

    First ``scontrol show job -o <id>``; slurmctld forgets a finished job MinJobAge (300 s) after it ends, so a
    job that finished earlier in a long DAG is then read from the job-completion log that ci/slurm/start.sh
    configures (``JobCompType=jobcomp/filetxt``, one ``JobId=.. JobState=..`` line per finished job).
    """
    r = subprocess.run(["timeout", "10", "scontrol", "show", "job", "-o", str(jobid)],
                       capture_output=True, text=True, timeout=20)
    if r.returncode == 0:
        return _parse_tokens(r.stdout)
    if JOBCOMP.is_file():
        for line in reversed(JOBCOMP.read_text().splitlines()):
            if line.startswith(f"JobId={jobid} "):
                info = _parse_tokens(line)
                info["source"] = str(JOBCOMP)
                return info
    raise RuntimeError(f"scontrol show job {jobid} failed ({r.stderr.strip()}) and {JOBCOMP} has no line for it")
