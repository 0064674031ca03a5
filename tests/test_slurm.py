"""Snakemake through a real single-node SLURM (ci/slurm/start.sh) with workflow/profiles/slurm.

Skipped unless root on Linux with apt-get (and QFTBENCH_SLURM != "0"). About 2 minutes in all once the
cluster is up (installing the packages the first time: about a minute more).
"""
from __future__ import annotations

import shutil

import pytest

from slurm_cluster import (  # noqa: F401  (slurm_cluster is a fixture)
    FAST_POLLING_ENV,
    SLURM_PROFILE,
    SMOKE_WORKFLOW,
    job_info,
    run_snakemake,
    slurm_cluster,
    submitted_jobs,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def smoke_dir(tmp_path):
    shutil.copy(SMOKE_WORKFLOW / "Snakefile", tmp_path / "Snakefile")
    return tmp_path


def run_smoke(workdir, mode, *extra, timeout=150):
    return run_snakemake(["--workflow-profile", SLURM_PROFILE, "--config", f"mode={mode}", *extra],
                         cwd=workdir, timeout=timeout, env=FAST_POLLING_ENV)


def test_profile_dry_run_reads_site_settings(smoke_dir):
    """Site values come from the environment (no cluster needed for a dry run)."""
    r = run_snakemake(["--workflow-profile", SLURM_PROFILE, "-n", "--config", "mode=smoke"], cwd=smoke_dir,
                      timeout=120, env={"QFT_SLURM_PARTITION": "gpu-a100", "QFT_SLURM_ACCOUNT": "proj42",
                                        "QFT_SLURM_EXTRA": "--qos=high --exclusive"})
    assert r.returncode == 0, r.stdout
    assert "slurm_partition=gpu-a100" in r.stdout
    assert "slurm_account=proj42" in r.stdout
    assert "slurm_extra=--qos=high --exclusive" in r.stdout
    # rule resources are not overridden by the profile
    assert "mem_mb=150" in r.stdout and "gpu=0" in r.stdout and "runtime=2" in r.stdout
    r = run_snakemake(["--workflow-profile", SLURM_PROFILE, "-n", "--config", "mode=smoke"], cwd=smoke_dir,
                      timeout=120, env={"QFT_SLURM_PARTITION": "", "QFT_SLURM_ACCOUNT": "",
                                        "QFT_SLURM_EXTRA": ""})
    assert r.returncode == 0, r.stdout
    assert "slurm_partition" not in r.stdout and "slurm_account" not in r.stdout


def test_smoke_workflow_runs_through_sbatch(slurm_cluster, smoke_dir):
    r = run_smoke(smoke_dir, "smoke")
    assert r.returncode == 0, r.stdout[-6000:]
    jobs = submitted_jobs(r.stdout)
    assert sorted(j["rule"] for j in jobs) == ["combine", "cpu_only", "prepare", "prepare"], r.stdout[-6000:]
    expected_mem = {"prepare": "200M", "cpu_only": "150M", "combine": "200M"}
    for j in jobs:
        info = job_info(j["jobid"])
        assert info["JobState"] == "COMPLETED", info
        assert info["WorkDir"] == str(smoke_dir)
        assert info["TimeLimit"] == "00:02:00", info            # runtime=2 (minutes) -> sbatch -t 2
        assert info["MinMemoryNode"] == expected_mem[j["rule"]], info
        assert info.get("Comment") == f"rule_{j['rule']}" or info.get("Comment", "").startswith(
            f"rule_{j['rule']}_"), info
        if j["rule"] == "cpu_only":                               # gpu=0 -> no GPU request at all
            assert "gpu" not in " ".join(f"{k}={v}" for k, v in info.items() if k.startswith("Tres")), info
    # the outputs were written inside those SLURM jobs
    ids = {j["jobid"] for j in jobs}
    summary = (smoke_dir / "results" / "summary.txt").read_text()
    cpu_only = (smoke_dir / "results" / "cpu_only.txt").read_text()
    written_by = {tok.split("=")[1] for tok in (summary + cpu_only).split() if tok.startswith("job=")}
    assert written_by == ids, (written_by, ids)
    assert "gpus=none" in cpu_only


def test_failing_rule_is_reported(slurm_cluster, smoke_dir):
    # --retries 0: the profile's retries would just run the failing job three times
    r = run_smoke(smoke_dir, "fail", "--retries", "0")
    assert r.returncode != 0, r.stdout[-6000:]
    assert r.returncode not in (124, 137), "snakemake hung (killed by timeout):\n" + r.stdout[-6000:]
    assert "Error in rule fails" in r.stdout
    assert "SLURM status is: 'FAILED'" in r.stdout
    jobs = {j["rule"]: j for j in submitted_jobs(r.stdout)}
    info = job_info(jobs["fails"]["jobid"])
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info  # (the jobstep exits 1)
    # keep-going: the independent job still ran; the failed job's SLURM log is kept
    assert (smoke_dir / "results" / "ok.txt").exists()
    assert not (smoke_dir / "results" / "fails.txt").exists()
    assert "about to fail" in (smoke_dir / jobs["fails"]["log"]).read_text()  # (an absolute log path wins)


def test_killed_job_is_retried_and_resumes_from_checkpoint(slurm_cluster, smoke_dir):
    r = run_smoke(smoke_dir, "resume")
    assert r.returncode == 0, r.stdout[-6000:]
    jobs = [j for j in submitted_jobs(r.stdout) if j["rule"] == "resume"]
    assert len(jobs) == 2, r.stdout[-6000:]
    first, second = (job_info(j["jobid"]) for j in jobs)
    assert first["JobState"] == "CANCELLED", first
    assert second["JobState"] == "COMPLETED", second
    assert "Trying to restart job" in r.stdout
    trace = (smoke_dir / "scratch" / "resume.trace").read_text()
    assert f"job={jobs[0]['jobid']} killing myself" in trace
    assert f"job={jobs[1]['jobid']} resumed-from=3" in trace
    assert "NOT KILLED" not in trace
    assert (smoke_dir / "results" / "resumed.txt").read_text().split() == [
        "done", "steps=6", "started-at=3", f"job={jobs[1]['jobid']}"]
