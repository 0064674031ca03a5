"""A job uses exactly the GPUs its resources ask for; models are spread only over them and must fit.

Claiming is tested with real ``flock`` locks between real processes (the GPU ids are given, so no GPU is
needed); the memory check of ``qftbench plan`` is compared with the device map that accelerate computes for
the real 65B architecture on the meta device (what ``from_pretrained(device_map="auto")`` does on two GPUs).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from methods.errors import ConfigError
from qftbench import gpus as G
from qftbench import sweep as S
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _release():
    yield
    G.release()


def test_zero_gpus_hides_every_gpu():
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    assert G.claim(0, env=env) == []
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert G.visible_gpus(env) == []


def test_exactly_the_visible_gpus_are_used_as_given(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "3,5"}  # e.g. what SLURM set for --gpus=2
    assert G.claim(2, env=env, locks=tmp_path) == ["3", "5"]
    assert env["CUDA_VISIBLE_DEVICES"] == "3,5"
    assert list(tmp_path.iterdir()) == []  # nothing to share: no locks taken


def test_visible_gpus_parses_cuda_visible_devices():
    assert G.visible_gpus({"CUDA_VISIBLE_DEVICES": "0, 2,GPU-1a2b"}) == ["0", "2", "GPU-1a2b"]
    assert G.visible_gpus({"CUDA_VISIBLE_DEVICES": "1,-1,2"}) == ["1"]  # CUDA stops at the first invalid id
    assert G.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_too_few_gpus_is_a_clear_error_before_any_work():
    with pytest.raises(ConfigError) as e:
        G.claim(2, env={"CUDA_VISIBLE_DEVICES": "0"})
    msg = str(e.value)
    assert "asks for 2 GPU(s)" in msg and "sees 1" in msg and "CUDA_VISIBLE_DEVICES='0'" in msg
    assert "resources.models.<model>.gpu" in msg and "Fix:" in msg
    with pytest.raises(ConfigError, match="integer >= 0"):
        G.claim(-1, env={})


def test_concurrent_jobs_get_distinct_gpus(tmp_path):
    a, b, c = {}, {}, {}
    ids = ["0", "1", "2", "3"]
    assert G.claim(1, env=a, visible=ids, locks=tmp_path) == ["0"]
    assert G.claim(2, env=b, visible=ids, locks=tmp_path) == ["1", "2"]
    assert G.claim(1, env=c, visible=ids, locks=tmp_path) == ["3"]
    assert (a["CUDA_VISIBLE_DEVICES"], b["CUDA_VISIBLE_DEVICES"], c["CUDA_VISIBLE_DEVICES"]) == ("0", "1,2", "3")
    with pytest.raises(RuntimeError, match=r"only 0 of the visible .* are free after 0.2 s"):
        G.claim(1, env={}, visible=ids, locks=tmp_path, wait_s=0.2, poll_s=0.05)
    G.release()
    assert G.claim(2, env={}, visible=ids, locks=tmp_path) == ["0", "1"]


HOLD = """
import sys, time
from qftbench.gpus import claim
print(",".join(claim(int(sys.argv[1]), visible=sys.argv[2].split(","), locks=sys.argv[3])), flush=True)
time.sleep(600)
"""


def test_a_killed_job_gives_its_gpus_back(tmp_path):
    """Locks are held by the process: another process cannot take the GPU, and SIGKILL frees it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", HOLD, "1", "0,1", str(tmp_path)], stdout=subprocess.PIPE,
                         text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "0"
        assert G.claim(1, env={}, visible=["0", "1"], locks=tmp_path) == ["1"]  # GPU 0 is taken
        with pytest.raises(RuntimeError, match="pid"):  # the message names the holder
            G.claim(1, env={}, visible=["0", "1"], locks=tmp_path, wait_s=0.1, poll_s=0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    t0 = time.monotonic()
    assert G.claim(1, env={}, visible=["0", "1"], locks=tmp_path, wait_s=10, poll_s=0.05) == ["0"]
    assert time.monotonic() - t0 < 5


def test_waiting_job_starts_when_a_gpu_is_freed(tmp_path):
    """A job started while its GPU is busy (e.g. by hand, outside Snakemake's count) waits for it."""
    import threading

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", HOLD, "2", "0,1,2", str(tmp_path)], stdout=subprocess.PIPE,
                         text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "0,1"
        killer = threading.Timer(1.0, p.send_signal, args=(signal.SIGKILL,))
        killer.start()
        t0 = time.monotonic()
        assert G.claim(2, env={}, visible=["0", "1", "2"], locks=tmp_path, wait_s=30, poll_s=0.05) == ["0", "1"]
        assert 0.9 < time.monotonic() - t0 < 20
    finally:
        p.kill()
        p.wait(timeout=30)


def test_cli_step_refuses_gpus_it_does_not_have(tmp_path):
    """`qftbench prepare --gpus 1` (what a rule runs for a job with gpu=1) on a machine without GPUs."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-m", "qftbench.cli", "prepare", "--config", str(REPO / "config" / "run.example.yaml"),
                        "--gpus", "1", "--set", f"paths.results={tmp_path}"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert p.returncode != 0
    assert "asks for 1 GPU(s)" in p.stderr and "sees 0" in p.stderr
    assert not any(tmp_path.iterdir())  # nothing computed, nothing written


def test_cli_step_with_zero_gpus_runs_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "qftbench.cli", "validate", "--config",
                        str(REPO / "config" / "run.example.yaml"), "--gpus", "0"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "CUDA_VISIBLE_DEVICES=''" in p.stderr


# ----------------------------------------------------------------------------------------------- memory
def test_plan_memory_fit_for_the_paper_grid():
    sweep = S.load(REPO / "config" / "paper.yaml")
    rows = {r["model"]: r for r in S.memory_fit(sweep)}
    assert set(rows) == {"llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama2-7b", "llama2-13b"}
    assert rows["llama-65b"]["params"] == 65_285_660_672  # the published 65.2B
    assert rows["llama-65b"]["weights_gib"] == pytest.approx(65_285_660_672 * 2 / 2**30)
    assert all(r["fits"] for r in rows.values())  # 80 GiB GPUs: 65B on 2, the rest on 1
    assert rows["llama-65b"]["gpus"] == 2 and rows["llama-33b"]["gpus"] == 1
    small = {r["model"]: r for r in S.memory_fit(sweep, gpu_mem_gib=48)}  # e.g. A6000 / L40S
    assert not small["llama-33b"]["fits"] and not small["llama-65b"]["fits"] and small["llama-13b"]["fits"]
    assert "resources.models.llama-33b.gpu: 2" in small["llama-33b"]["fix"]
    assert "resources.models.llama-65b.gpu: 3" in small["llama-65b"]["fix"]


def test_plan_prints_memory_fit():
    p = subprocess.run([sys.executable, "-m", "qftbench.cli", "plan", "--sweep", str(REPO / "config" / "paper.yaml"),
                        "--gpu-mem-gib", "48"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr
    line = next(l for l in p.stdout.splitlines() if l.startswith("  llama-33b "))
    assert "on 1 x 48 GiB" in line and "DOES NOT FIT" in line and "gpu: 2" in line


def _meta_65b():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    raw = json.loads((REPO / "qftbench" / "model_configs" / "llama-65b.json").read_text())
    cfg = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("name", "hub_id")})
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def test_65b_spreads_over_two_80gib_gpus_as_device_map_auto_would():
    """What transformers' device_map="auto" computes for LLaMA-65B (balanced memory, decoder layers unsplit):
    on the two GPUs of its job everything is on GPU 0 and 1; one GPU would leave layers on the CPU, which
    :func:`qftbench.gpus.check_spread` refuses."""
    from accelerate import infer_auto_device_map
    from transformers.integrations.accelerate import get_balanced_memory

    model = _meta_65b()
    split = ["LlamaDecoderLayer"]
    two = {0: 80 * 2**30, 1: 80 * 2**30, "cpu": 256 * 2**30}
    mm = get_balanced_memory(model, max_memory=two, no_split_module_classes=split)
    dm = infer_auto_device_map(model, max_memory=mm, no_split_module_classes=split)
    on = {}
    for k, v in dm.items():
        on.setdefault(v, []).append(k)
    assert set(on) == {0, 1}
    layers = {v: sum(1 for k in ks if k.startswith("model.layers.")) for v, ks in on.items()}
    assert layers[0] + layers[1] == 80 and min(layers.values()) >= 30  # balanced, not 1 layer on GPU 1
    G.check_spread(dm, "huggyllama/llama-65b", 2)

    one = {0: int(80 * 2**30 * S.GPU_FILL), "cpu": 256 * 2**30}
    dm1 = infer_auto_device_map(model, max_memory=one, no_split_module_classes=split)
    assert "cpu" in set(dm1.values())
    with pytest.raises(ConfigError, match=r"does not fit on the 1 GPU\(s\).*on cpu.*resources.models"):
        G.check_spread(dm1, "huggyllama/llama-65b", 1)


def test_gptq_moves_block_inputs_to_the_block_device():
    """GPTQ runs each decoder block on its own device (a spread model): nested inputs follow it."""
    from methods.quant.gptq import _module_device, _to_device

    x = {"h": torch.ones(2), "pos": (torch.zeros(1), [torch.zeros(1)]), "flag": True}
    y = _to_device(x, torch.device("meta"))
    assert y["h"].is_meta and y["pos"][0].is_meta and y["pos"][1][0].is_meta and y["flag"] is True
    assert _to_device(x, None) is x
    assert _module_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")


@pytest.mark.slow
def test_local_profile_gives_each_job_its_own_gpu(tmp_path):
    """Real Snakemake with the local profile on a "two-GPU workstation" (CUDA_VISIBLE_DEVICES=0,1; the jobs run
    on the CPU here since torch sees no CUDA): every GPU job of a sweep with `gpu: 1` is pinned to one GPU
    instead of seeing both, and its provenance records which."""
    import yaml

    sweep = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    sweep["grid"] = {"rank": [2]}
    sweep.pop("claims")  # they compare the rank-4 runs
    sweep["resources"]["default"]["gpu"] = 1
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "0,1", "QFT_GPUS": "2", "QFT_CORES": "2",
           "QFTBENCH_GPU_LOCK_DIR": str(tmp_path / "locks")}
    p = subprocess.run(["timeout", "-k", "10", "900", sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
                        "--workflow-profile", str(REPO / "workflow" / "profiles" / "local"),
                        "--configfile", "sweep.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    root = tmp_path / "results" / "logs"
    seen = {}
    for log in sorted(root.rglob("*.log")):
        if log.relative_to(root).parts[0] in ("report", "runs_table"):  # (no GPU: the collation's own jobs)
            continue
        ids = set(re.findall(r"--gpus 1: CUDA_VISIBLE_DEVICES='([^']*)'", log.read_text()))
        assert len(ids) == 1 and ids <= {"0", "1"}, (log, ids)
        seen[log] = ids.pop()
    assert {p.relative_to(root).parts[0] for p in seen} == {"quantize_base", "finetune", "evaluate"}
    for prov in (tmp_path / "results" / "runs").glob("*/provenance.json"):
        assert json.loads(prov.read_text())["hardware"]["cuda_visible_devices"] in ("0", "1")
