"""Give a job exactly the GPUs its ``resources: gpu=N`` asked for.

Under SLURM the scheduler binds a job's GPUs (``--gpus=N`` sets ``CUDA_VISIBLE_DEVICES``). On a workstation
Snakemake only *counts* GPUs (the local profile's ``resources: gpu``): it never starts jobs that together ask
for more GPUs than there are, but it does not say which job gets which GPU. Without help every job would see
every GPU -- two one-GPU jobs would both land on GPU 0, and a job on a 4-GPU box would spread its model over
all four. :func:`claim` closes that gap, before CUDA is initialised:

* ``n == 0``: the job hides every GPU (``CUDA_VISIBLE_DEVICES=""``) and runs on the CPU, as declared;
* the job sees exactly ``n`` GPUs (a SLURM job, or ``CUDA_VISIBLE_DEVICES`` set by hand): they are used as given;
* it sees more: it takes ``n`` of them that no other qftbench job holds, marked by an exclusive ``flock`` on
  ``<lock dir>/gpu-<id>.lock`` that the operating system releases when the process ends (also when it is
  killed), and sets ``CUDA_VISIBLE_DEVICES`` to them;
* it sees fewer: a :class:`~methods.errors.ConfigError` naming the request, what is visible and the fix,
  before anything is loaded.

The model is then spread over the claimed GPUs when there is more than one (``device_map="auto"``,
:func:`qftbench.models.device_map_for_job`), so the GPU count of a job comes from its resources.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from methods.errors import ConfigError

#: file handles of the held locks: the locks last as long as this process
_HELD: list = []


def visible_gpus(env=None) -> list[str]:
    """The GPU ids this process may use, without initialising CUDA: the entries of ``CUDA_VISIBLE_DEVICES``
    when it is set (``""`` or ``-1``: none), else the indices listed by ``nvidia-smi -L``, else none."""
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = []
        for d in cvd.split(","):
            d = d.strip()
            if not d or d == "-1":  # CUDA stops at the first invalid entry
                break
            ids.append(d)
        return ids
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return []
        return [str(i) for i, line in enumerate(l for l in out.stdout.splitlines() if l.startswith("GPU "))]
    return []


def lock_dir() -> Path:
    """``$QFTBENCH_GPU_LOCK_DIR``, else ``<tmp>/qftbench-gpu-locks`` (node-local, shared by the node's jobs)."""
    d = Path(os.environ.get("QFTBENCH_GPU_LOCK_DIR") or Path(tempfile.gettempdir()) / "qftbench-gpu-locks")
    d.mkdir(parents=True, exist_ok=True)
    try:
        d.chmod(0o1777)  # several users of one workstation share the locks
    except OSError:
        pass
    return d


def _lock_path(d: Path, gid: str) -> Path:
    return d / ("gpu-" + gid.replace("/", "_") + ".lock")  # MIG ids contain slashes


def _try_lock(path: Path):
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    fh.flush()
    return fh


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def claim(n: int, *, env=None, visible: list[str] | None = None, locks: Path | None = None,
          wait_s: float | None = None, poll_s: float = 2.0) -> list[str]:
    """Make this process use ``n`` GPUs (see the module doc); returns the GPU ids it uses.

    Sets ``env["CUDA_VISIBLE_DEVICES"]`` (default ``os.environ``); call it before CUDA is initialised.
    ``wait_s``: how long to wait for busy GPUs to be freed by other jobs (default
    ``$QFTBENCH_GPU_WAIT_S`` or 600 s: Snakemake's GPU count makes a wait rare, e.g. a job started by hand).
    """
    env = os.environ if env is None else env
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"--gpus {n!r}: the number of GPUs must be an integer >= 0 (the job's resources: gpu).")
    ids = visible_gpus(env) if visible is None else list(visible)
    if n == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""
        return []
    if len(ids) < n:
        seen = env.get("CUDA_VISIBLE_DEVICES")
        where = (f"CUDA_VISIBLE_DEVICES={seen!r}" if seen is not None
                 else ("`nvidia-smi -L`" if shutil.which("nvidia-smi") else "no nvidia-smi on this machine"))
        raise ConfigError(
            f"This job asks for {n} GPU(s) (its resources: gpu={n}, from the sweep's resources.default.gpu or "
            f"resources.models.<model>.gpu) but sees {len(ids)} ({where}). Fix: run it where {n} GPU(s) are "
            f"available (SLURM: the slurm profile passes --gpus={n}; check the partition has GPUs), or lower "
            f"`gpu` for this model in the sweep's resources (gpu: 0 runs on the CPU).")
    if len(ids) == n:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        return ids
    d = lock_dir() if locks is None else Path(locks)
    d.mkdir(parents=True, exist_ok=True)
    wait_s = float(os.environ.get("QFTBENCH_GPU_WAIT_S", 600)) if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    while True:
        got = []
        for gid in ids:
            fh = _try_lock(_lock_path(d, gid))
            if fh is not None:
                got.append((gid, fh))
                if len(got) == n:
                    break
        if len(got) == n:
            _HELD.extend(fh for _, fh in got)
            chosen = [gid for gid, _ in got]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
            return chosen
        for _, fh in got:  # not enough: give back what we took, so two waiting jobs cannot deadlock
            fh.close()
        if time.monotonic() >= deadline:
            busy = {gid: _holder(_lock_path(d, gid)) for gid in ids}
            raise RuntimeError(
                f"This job asks for {n} GPU(s) but only {len(got)} of the visible {ids} are free after "
                f"{wait_s:g} s; held: {busy} (locks in {d}). Fix: wait for those jobs, or lower the number of "
                f"concurrent GPU jobs (snakemake --resources gpu=N), or set QFTBENCH_GPU_WAIT_S.")
        time.sleep(poll_s)


def release() -> None:
    """Give back the GPUs this process holds (they are also released when it exits)."""
    while _HELD:
        _HELD.pop().close()


# ------------------------------------------------------------------------------------------- placement
def _weights_gib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def check_spread(device_map: dict | None, model_name: str, gpus: int) -> None:
    """A model loaded with ``device_map="auto"`` must sit on GPUs only: transformers puts what does not fit
    on the CPU or the disk, which quantization and training here do not support (and which would be slow)."""
    if not device_map:
        return
    off = sorted({str(v) for v in device_map.values() if str(v) in ("cpu", "disk", "meta")})
    if off:
        n_off = sum(1 for v in device_map.values() if str(v) in off)
        raise ConfigError(
            f"Model {model_name!r} does not fit on the {gpus} GPU(s) of this job: device_map='auto' put "
            f"{n_off} of its {len(device_map)} parts on {'/'.join(off)}. Fix: give this model more GPUs "
            f"(resources.models.<label>.gpu in the sweep; `qftbench plan --sweep ...` shows the memory each "
            f"model needs), or use GPUs with more memory.")


def check_fits_one_gpu(model, model_name: str, device: int = 0) -> None:
    """Before moving a model onto one GPU: its weights must fit into the GPU's free memory."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    need = _weights_gib(model)
    if need > free / 2**30:
        raise ConfigError(
            f"Model {model_name!r} has {need:.1f} GiB of weights but GPU {device} has {free / 2**30:.1f} of "
            f"{total / 2**30:.1f} GiB free. Fix: give this model more GPUs (resources.models.<label>.gpu: 2 "
            f"spreads it with device_map='auto'; `qftbench plan --sweep ...` shows the memory each model needs), "
            f"or free the GPU.")
