"""Saving and loading adapters alone (safetensors + a JSON description), atomically."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter import PooledAdapter
from .atomic import atomic_write
from .errors import ConfigError

WEIGHTS = "adapter.safetensors"
CONFIG = "adapter_config.json"
PEFT_CONFIG = "qftbench_adapter.json"  # beside a peft adapter folder's own files (methods.peft_method)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor a method added: pooled-adapter matrices and PEQA scale deltas."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PooledAdapter):
            for pname, p in mod.named_parameters(recurse=False):
                out[f"{name}.{pname}"] = p.detach()
        elif getattr(mod, "scale_delta", None) is not None:
            out[f"{name}.scale_delta"] = mod.scale_delta.detach()
    return out


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` (method, hyperparameters, tensor shapes)."""
    method = getattr(model, "qft_method", None)
    if method is None:
        raise ConfigError("save_adapter: the model carries no prepared method (prepare it first; a merged model "
                          "has no separate adapter).")
    if hasattr(method, "save_adapter"):  # a method with its own adapter format (peft: a peft adapter folder)
        method.save_adapter(model, directory)
        return Path(directory)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    cfg = {"format": "qftbench-adapter", "version": 1, **method.describe(),
           "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    atomic_write(d / WEIGHTS, lambda p: save_file(tensors, p, metadata={"method": method.name}))
    atomic_write(d / CONFIG, lambda p: Path(p).write_text(json.dumps(cfg, indent=2, sort_keys=True)))
    return d


def _with_defaults(method, saved: dict) -> dict:
    """The saved hyperparameters with those the method gained since (absent from an older adapter) at their
    defaults, which is the behaviour the adapter was trained with (e.g. ``gptq_groups``)."""
    return {**{k: h.default for k, h in method.hyperparameters.items() if k not in saved}, **saved}


def _prepared_method(model: nn.Module, d: Path, cfg: dict):
    """The method of the adapter described by ``cfg``: the model's own (which must be the same method with the same
    hyperparameters), or, for an unprepared model, built from ``cfg`` and prepared on it."""
    from .registry import from_config

    method = getattr(model, "qft_method", None)
    if method is None:
        method = from_config({"name": cfg["method"], **cfg["hyperparameters"]})
        method.prepare(model)
    elif method.name != cfg["method"] or method.hp != _with_defaults(method, cfg["hyperparameters"]):
        raise ConfigError(f"load_adapter: the model was prepared with {method!r} but {d} holds an adapter of "
                          f"{cfg['method']!r} with {cfg['hyperparameters']}; prepare a fresh model instead.")
    return method


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter`. An unprepared model is prepared with the saved method."""
    d = Path(directory)
    if (d / PEFT_CONFIG).is_file():  # saved by the peft method (a peft adapter folder + this description)
        _prepared_method(model, d, json.loads((d / PEFT_CONFIG).read_text())).load_adapter(model, d)
        return model
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise ConfigError(f"load_adapter: {d} does not hold {CONFIG} and {WEIGHTS} (written by save_adapter).")
    _prepared_method(model, d, json.loads((d / CONFIG).read_text()))
    own = adapter_state_dict(model)
    saved = load_file(str(d / WEIGHTS))
    missing, unexpected = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
    if missing or unexpected:
        raise ConfigError(f"load_adapter: {d} does not fit this model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}.")
    for k, v in saved.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ConfigError(f"load_adapter: tensor {k} has shape {tuple(v.shape)} in {d} but "
                              f"{tuple(own[k].shape)} in the model.")
        own[k].copy_(v.to(own[k].dtype))
    return model
