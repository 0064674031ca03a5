"""Fine-tuning that survives a kill: a direct training loop on top of ``accelerate``.

Paper settings are the defaults (METHODS.md, "Training protocol"): paged AdamW 32-bit, constant learning rate,
grad-norm clip 0.3, weight decay 0, gradient accumulation, bf16 where the hardware has it.

Exact resume. Everything a step does is a function of ``(seed, step)``:

* the examples of step ``t`` are a slice of a permutation of the data set seeded by ``(seed, epoch)``;
* the RNG (dropout) is re-seeded from ``(seed, step)`` before each step;
* a checkpoint holds the trainable tensors, the optimizer state and the step, written atomically
  (temporary folder, then rename) into a scratch folder that the workflow never deletes.

So a run killed after a checkpoint and started again produces the same final adapter as an uninterrupted run
(bit for bit on the CPU). A NaN or infinite loss stops the run with :class:`TrainingDiverged` before the bad
update is applied. Every optimizer step appends loss, learning rate, grad norm, tokens/s and memory to a JSONL.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import TRAIN_CHOICES, TRAIN_DEFAULTS as _D

log = logging.getLogger("qftbench.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainConfig:
    """The ``train`` section of a run config, plus the seed. Defaults and choices: ``qftbench.config``'s
    :data:`~qftbench.config.TRAIN_DEFAULTS` and :data:`~qftbench.config.TRAIN_CHOICES` (one place)."""

    max_steps: int = _D["max_steps"]                # optimizer steps
    batch_size: int = _D["batch_size"]              # examples per optimizer step (= micro_batch_size * grad_accum)
    micro_batch_size: int = _D["micro_batch_size"]  # examples per forward/backward
    lr: float = _D["lr"]
    lr_scheduler: str = _D["lr_scheduler"]          # constant | linear | cosine
    warmup_steps: int = _D["warmup_steps"]
    max_grad_norm: float = _D["max_grad_norm"]
    weight_decay: float = _D["weight_decay"]
    optimizer: str = _D["optimizer"]                # paged_adamw_32bit | adamw_32bit | adamw_torch
    precision: str = _D["precision"]                # auto (bf16 on a bf16-capable GPU, else fp32) | bf16 | fp16 | fp32
    gradient_checkpointing: bool = _D["gradient_checkpointing"]
    save_steps: int = _D["save_steps"]
    keep_checkpoints: int = _D["keep_checkpoints"]
    # dtypes of the model being trained (applied by qftbench.pipeline.prepared_model, recorded here with the rest):
    adapter_dtype: str = _D["adapter_dtype"]  # float32 | bfloat16 | float16: the trainable (adapter) weights and
                                              # their AdamW state; bfloat16 is what qlora.py does with --bf16
                                              # (qlora.py:396-399)
    norm_dtype: str = _D["norm_dtype"]        # model (the norms keep the model's dtype) | float32 (qlora.py:400-401)
    seed: int = 0

    def __post_init__(self):
        from methods.errors import ConfigError

        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"train.batch_size={self.batch_size} is not a multiple of train.micro_batch_size="
                              f"{self.micro_batch_size}; set batch_size = micro_batch_size x gradient accumulation.")
        for f in ("max_steps", "batch_size", "micro_batch_size", "save_steps"):
            if getattr(self, f) < 1:
                raise ConfigError(f"train.{f}={getattr(self, f)} must be >= 1.")
        for f, ch in TRAIN_CHOICES.items():
            if getattr(self, f) not in ch:
                raise ConfigError(f"train.{f}={getattr(self, f)!r} is not one of {list(ch)}.")

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 17) % (2**63)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of optimizer step ``step`` (0-based): consecutive slices of seeded permutations."""
    out = []
    start = step * batch_size
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(seed, 10**9 + epoch)))
        take = min(batch_size - len(out), n - pos)
        out.extend(perm[pos:pos + take].tolist())
    return out


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids (pad_id), labels (-100) and attention_mask (0)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.as_tensor(e["input_ids"])
        labels[i, :k] = torch.as_tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _make_optimizer(cfg: TrainConfig, params, device: torch.device):
    name = cfg.optimizer
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if name == "paged_adamw_32bit" and device.type != "cuda":
        log.warning("paged optimizers need CUDA; using bitsandbytes' non-paged AdamW 32-bit on %s", device.type)
        name = "adamw_32bit"
    if name in ("paged_adamw_32bit", "adamw_32bit"):
        try:
            import bitsandbytes as bnb

            cls = bnb.optim.PagedAdamW32bit if name == "paged_adamw_32bit" else bnb.optim.AdamW32bit
            return cls(params, **kw), name
        except Exception as e:  # pragma: no cover - depends on the installed bitsandbytes build
            log.warning("bitsandbytes optimizer %s unavailable (%s); falling back to torch.optim.AdamW", name, e)
            name = "adamw_torch"
    return torch.optim.AdamW(params, **kw), name


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_scheduler == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return max(0.0, 1 - frac) if cfg.lr_scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
    return f


def _precision(cfg: TrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: summed over the job's GPUs (a model spread over several), else the RSS."""
    if device.type == "cuda":
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _checkpoints(scratch: Path) -> list[tuple[int, Path]]:
    out = []
    for p in scratch.glob("checkpoint-*"):
        if p.is_dir() and (p / "state.json").is_file():
            try:
                out.append((int(p.name.split("-")[1]), p))
            except ValueError:
                pass
    return sorted(out)


def _save_checkpoint(scratch: Path, step: int, model, optimizer, scheduler, keep: int, extra: dict) -> Path:
    final = scratch / f"checkpoint-{step}"
    tmp = scratch / f".tmp-checkpoint-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous().cpu() for k, v in trainable_state(model).items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))  # written last: marks complete
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in _checkpoints(scratch)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    saved = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    for k, v in saved.items():
        params[k].data.copy_(v.to(params[k].device, params[k].dtype))
    st = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    return json.loads((path / "state.json").read_text())["step"]


def finetune(model: nn.Module, train_examples: list[dict], cfg: TrainConfig, scratch_dir: str | os.PathLike,
             log_path: str | os.PathLike, *, pad_id: int = 0, stop_after: int | None = None, callback=None) -> dict[str, Any]:
    """Train the model's trainable parameters in place; resume from the newest checkpoint in ``scratch_dir``.

    ``train_examples`` are dicts with ``input_ids`` and ``labels`` (-100 where no loss). ``stop_after`` ends
    the run early after that many optimizer steps; ``callback(step, record)`` is called after every optimizer
    step and checkpoint. Returns a summary (steps, tokens, times, memory)."""
    from accelerate import Accelerator

    scratch = Path(scratch_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if not train_examples:
        raise ValueError("finetune: the training set is empty")
    precision = _precision(cfg)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # one process may train several runs at different precisions
    acc = Accelerator(mixed_precision={"fp32": "no"}.get(precision, precision),
                      cpu=not torch.cuda.is_available())
    device = acc.device
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("finetune: the model has no trainable parameters (prepare it with a method first)")
    optimizer, opt_name = _make_optimizer(cfg, params, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    if not hasattr(model, "hf_device_map"):  # a model spread over GPUs keeps its placement
        model.to(device)

    start = 0
    ckpts = _checkpoints(scratch)
    if ckpts:
        start = _load_checkpoint(ckpts[-1][1], model, optimizer, scheduler)
        log.info("resuming from %s (step %d)", ckpts[-1][1], start)
    resumed_from = start
    model.train()
    t_run = time.perf_counter()
    tokens_total = 0
    end = cfg.max_steps if stop_after is None else min(cfg.max_steps, stop_after)
    summary = {"optimizer": opt_name, "precision": precision, "device": str(device), "resumed_from_step": resumed_from}
    with open(log_path, "a") as logf:
        if resumed_from:
            logf.write(json.dumps({"event": "resume", "step": resumed_from}) + "\n")
        for step in range(start, end):
            t0 = time.perf_counter()
            torch.manual_seed(_step_seed(cfg.seed, step))
            idx = batch_indices(len(train_examples), cfg.batch_size, step, cfg.seed)
            n_tok = sum(int((torch.as_tensor(train_examples[i]["labels"][1:]) != -100).sum()) for i in idx)
            loss_sum = 0.0
            for j in range(cfg.grad_accum):
                micro = [train_examples[i] for i in idx[j * cfg.micro_batch_size:(j + 1) * cfg.micro_batch_size]]
                batch = {k: v.to(device) for k, v in collate(micro, pad_id).items()}
                with acc.autocast():
                    out = model(**batch)
                # token-weighted mean over the whole optimizer batch
                n_micro = int((batch["labels"][:, 1:] != -100).sum())
                loss = out.loss * (n_micro / max(1, n_tok))
                if not torch.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss is {float(out.loss)} at step {step + 1} (micro-batch {j}); no update was applied. "
                        f"Lower train.lr (now {cfg.lr:g}), check the data, or use precision=fp32. The last good "
                        f"checkpoint in {scratch} is kept.")
                acc.backward(loss)
                loss_sum += float(loss.detach())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            tokens_total += n_tok
            rec = {"step": step + 1, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens": n_tok, "tokens_per_s": n_tok / dt if dt else None, "step_time_s": dt,
                   "peak_mem_mb": peak_memory_mb(device), "time": time.time()}
            logf.write(json.dumps(rec) + "\n")
            logf.flush()
            if (step + 1) % cfg.save_steps == 0 or step + 1 == cfg.max_steps:
                _save_checkpoint(scratch, step + 1, model, optimizer, scheduler, cfg.keep_checkpoints,
                                 {"seed": cfg.seed, "max_steps": cfg.max_steps})
            if callback is not None:
                callback(step + 1, rec)
    wall = time.perf_counter() - t_run
    summary.update({"steps": end, "steps_this_session": end - resumed_from, "train_tokens_this_session": tokens_total,
                    "wall_time_s": wall, "tokens_per_s": tokens_total / wall if wall else None,
                    "peak_mem_mb": peak_memory_mb(device), "finished": end == cfg.max_steps})
    model.eval()
    return summary
