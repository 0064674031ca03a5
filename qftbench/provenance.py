"""Provenance recorded with every result: git commit, package versions, hardware, seeds, timings."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "lm_eval", "datasets", "safetensors",
            "snakemake", "pandas", "numpy", "qftbench")
REPO = Path(__file__).resolve().parents[1]


def git_info() -> dict[str, Any]:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return None
    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))
            if commit else None}


def versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


#: the CPU features that change which kernels torch (oneDNN / its own vectorised code) picks, and so the low
#: bits of bf16 (and some fp32) results: with AMX or AVX512-BF16, bf16 matmuls take other code paths.
CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16", "asimd", "sve", "bf16")


def native_bf16(info: dict[str, Any] | None = None) -> bool:
    """Whether this CPU computes bf16 natively (x86: AVX512-BF16 or AMX-BF16; Arm: the bf16 extension). Without it
    torch emulates bf16 arithmetic and a bf16-autocast training step is about 20x slower than float32 (SmolLM2,
    batch 8: 78 s vs 4 s per step on an AVX2-only AMD EPYC, measured 2026-12-02)."""
    feats = set((info or cpu_info()).get("features") or [])
    return bool(feats & {"avx512_bf16", "amx_bf16", "bf16"})


#: environment variables that cap the instruction set of torch's own kernels (ATen) and of oneDNN
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def cpu_info() -> dict[str, Any]:
    """CPU model, the kernel-relevant features it has, and the capability torch dispatches to."""
    import torch

    out: dict[str, Any] = {"machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and "model" not in out:
            out["model"] = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    out["features"] = [f for f in CPU_FEATURES if f in flags]
    try:
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - older torch
        out["torch_cpu_capability"] = None
    try:
        out["mkldnn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover
        out["mkldnn_bf16"] = None
    # environment settings that cap the instruction set torch and oneDNN use (they change the kernels as a CPU
    # without those features would): recorded when set
    out["isa_overrides"] = {k: os.environ[k] for k in ISA_ENV if os.environ.get(k)}
    return out


def hardware() -> dict[str, Any]:
    import torch

    hw = {"host": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
          "cuda": torch.cuda.is_available(), "cpu": cpu_info()}
    if torch.cuda.is_available():
        hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        hw["cuda_version"] = torch.version.cuda
    try:
        with open("/proc/meminfo") as f:
            hw["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    for k in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURM_NODELIST", "CUDA_VISIBLE_DEVICES"):
        if k in os.environ:
            hw[k.lower()] = os.environ[k]
    return hw


def record(**extra) -> dict[str, Any]:
    return {"git": git_info(), "versions": versions(), "hardware": hardware(), "time": time.time(), **extra}
