"""The tiny sweep's whole DAG through a real SLURM (`--executor slurm` via workflow/profiles/slurm).

Checks that every job was submitted with sbatch and completed, and that the tables equal those of the local
run (timing columns aside). Skipped where no SLURM can be started (see tests/slurm_cluster.py).
"""
from __future__ import annotations

import re

import pandas as pd
import pytest

from slurm_cluster import (  # noqa: F401  (slurm_cluster is a fixture)
    FAST_POLLING_ENV,
    SLURM_PROFILE,
    job_info,
    run_snakemake,
    slurm_cluster,
    submitted_jobs,
)
from tests.conftest import REPO

pytestmark = pytest.mark.slow

TINY = REPO / "config" / "tiny.yaml"
TIMING = ["train time (s)", "peak mem (MB)", "tokens/s"]


def _tables(root):
    d = root / "results" / "tables" / "tiny"
    return {t: pd.read_csv(d / f"{t}.csv") for t in ("synthetic", "efficiency")}


def test_tiny_dag_through_slurm_equals_local_run(slurm_cluster, tmp_path):
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    local.mkdir()
    slurm.mkdir()
    r = run_snakemake(["-s", REPO / "Snakefile", "--cores", "2", "--configfile", TINY], cwd=local, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:]
    r = run_snakemake(["-s", REPO / "Snakefile", "--workflow-profile", SLURM_PROFILE, "--configfile", TINY,
                       "--jobs", "2"], cwd=slurm, timeout=1200, env=FAST_POLLING_ENV)
    assert r.returncode == 0, r.stdout[-4000:]
    jobs = submitted_jobs(r.stdout)
    rules = sorted(j["rule"] for j in jobs)
    # every job but the local target rule `all` went through sbatch
    assert rules == sorted(["quantize_base"] * 2 + ["finetune"] * 5 + ["evaluate"] * 5 + ["report"]), rules
    for j in jobs:
        info = job_info(j["jobid"])
        assert info["JobState"] == "COMPLETED", info
    a, b = _tables(local), _tables(slurm)
    pd.testing.assert_frame_equal(a["synthetic"], b["synthetic"])
    pd.testing.assert_frame_equal(a["efficiency"].drop(columns=TIMING, errors="ignore"),
                                  b["efficiency"].drop(columns=TIMING, errors="ignore"))
    for f in ("acc_vs_params", "loss_curves"):
        assert (slurm / "figures" / "tiny" / f"{f}.png").stat().st_size > 0


def test_paper_dry_run_under_the_released_code_preset(tmp_path):
    """`--config preset=released-code` switches the whole grid to the released codes' settings (README, "Paper
    or released code: presets"): the jobs' configs carry them."""
    r = run_snakemake(["-s", REPO / "Snakefile", "--workflow-profile", SLURM_PROFILE, "-n", "-p", "--configfile",
                       REPO / "config" / "paper.yaml", "--config", "preset=released-code"], cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:]
    blocks = r.stdout.split("\n\n")
    qa = next(b for b in blocks if "rule finetune:" in b and "llama-7b-qalora-r64-4b-g32-alpaca-s0" in b)
    assert '"lr": 0.0002' in qa and '"pool": "mean"' in qa and '"dropout": 0.0' in qa and '"float16"' in qa
    lq = next(b for b in blocks if "rule finetune:" in b and "llama-7b-loftq" in b)
    assert '"variant": "peft"' in lq and '"iters": 1' in lq
    assert "finetune          516" in r.stdout or re.search(r"finetune\s+516", r.stdout)


def test_paper_dry_run_with_slurm_profile_lists_gpu_resources(tmp_path):
    """No cluster needed: the profile's dry run shows each job's GPUs, memory and time limit."""
    r = run_snakemake(["-s", REPO / "Snakefile", "--workflow-profile", SLURM_PROFILE, "-n", "--configfile",
                       REPO / "config" / "paper.yaml"], cwd=tmp_path, timeout=600,
                      env={"QFT_SLURM_PARTITION": "gpu", "QFT_SLURM_ACCOUNT": "proj42"})
    assert r.returncode == 0, r.stdout[-3000:]
    out = r.stdout
    # one fine-tuning job of a 65B and of a 7B model: 2 GPUs vs 1, with the memory and time from config/paper.yaml
    blocks = out.split("\n\n")
    ft65 = next(b for b in blocks if "rule finetune:" in b and "llama-65b-qalora" in b)
    ft7 = next(b for b in blocks if "rule finetune:" in b and "llama-7b-qlora" in b)
    assert "gpu=2" in ft65 and "mem_mb=256000" in ft65 and "runtime=7200" in ft65
    assert "gpu=1" in ft7 and "mem_mb=64000" in ft7 and "runtime=1440" in ft7
    # the step gets its GPU count from the same resource (it spreads the 65B model over both GPUs)
    assert "--gpus 2 " in ft65 and "--gpus 1 " in ft7
    assert "slurm_partition=gpu" in ft7 and "slurm_account=proj42" in ft7
