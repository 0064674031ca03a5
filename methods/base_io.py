"""Saving and loading a quantized base, so that it is computed once and shared by every run that needs it.

``save_quantized_base(model, dir)`` writes the frozen base modules that :meth:`Method.quantize` put in place
(``QuantLinear`` buffers, bitsandbytes ``Linear4bit`` packed weights and quantization state; a 16-bit base
writes nothing but its manifest) plus, for LoftQ, the adapter initialisation that belongs to that base.
``load_quantized_base(model, dir, method)`` puts them back into a freshly loaded model with the original
weights, after checking that the base was made for this model and this method's base key. Files are written
to a temporary folder and renamed, so a half-written base is never taken for a finished one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import _set_module
from .errors import ConfigError

MANIFEST = "base_manifest.json"


def save_quantized_base(model: nn.Module, directory: str | os.PathLike, method=None) -> Path:
    from .quant.linear import QuantLinear
    from .quant.modules import _is_linear4bit

    info = getattr(model, "qft_base", None)
    if info is None:
        raise ConfigError("save_quantized_base: the model has no quantized base (call method.quantize first).")
    final = Path(directory)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors, layers = {}, {}
    for name in info["layers"]:
        mod = model.get_submodule(name)
        if isinstance(mod, QuantLinear):
            kind = "QuantLinear"
            extra = {"scheme": dataclasses.asdict(mod.scheme)}
        elif _is_linear4bit(mod):
            kind = "Linear4bit"
            extra = {"compute_dtype": str(mod.compute_dtype).replace("torch.", "") if mod.compute_dtype else None}
        elif isinstance(mod, nn.Linear):
            layers[name] = {"type": "Linear"}
            continue  # a 16-bit base is the model's own weight
        else:
            raise ConfigError(f"save_quantized_base: layer {name} is a {type(mod).__name__}, not a base module.")
        for k, v in mod.state_dict().items():
            if k != "scale_delta":
                tensors[f"{name}.{k}"] = v.detach().contiguous().cpu()
        layers[name] = {"type": kind, "in": mod.in_features, "out": mod.out_features,
                        "bias": getattr(mod, "bias", None) is not None, **extra}
    if tensors:
        save_file(tensors, str(tmp / "base.safetensors"))
    init = getattr(method, "_init", None) if method is not None else None
    if init:
        save_file({f"{n}.{w}": t.contiguous() for n, (a, b) in init.items() for w, t in (("A", a), ("B", b))},
                  str(tmp / "init.safetensors"))
        (tmp / "init_report.json").write_text(json.dumps(getattr(method, "loftq_report", {}), indent=1))
    config = getattr(model, "config", None)
    manifest = {"method": info["method"], "key": info["key"], "layers": layers,
                "model_config": config.to_dict() if hasattr(config, "to_dict") else None}
    if info.get("weight_error") is not None:  # ||W - W_base|| / ||W|| per target layer (methods.base.weight_error)
        manifest["weight_error"] = info["weight_error"]
    if info.get("init_error") is not None:  # ||W - (W_base + ΔW_0)|| / ||W||: LoftQ's initialisation (Method.init_errors)
        manifest["init_error"] = info["init_error"]
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str))
    shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    return final


def load_quantized_base(model: nn.Module, directory: str | os.PathLike, method) -> nn.Module:
    """Replace the target layers of a fresh model by the saved base modules; in place."""
    from .quant.linear import QuantLinear
    from .quant.scheme import QuantScheme

    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise ConfigError(f"load_quantized_base: {d} holds no {MANIFEST} (not a finished quantized base).")
    manifest = json.loads((d / MANIFEST).read_text())
    if json.loads(json.dumps(manifest["key"])) != json.loads(json.dumps(method.base_key())):
        raise ConfigError(f"load_quantized_base: {d} was built for {manifest['method']} with base {manifest['key']}, "
                          f"not for {method.name}'s base {method.base_key()}.")
    tensors = load_file(str(d / "base.safetensors")) if (d / "base.safetensors").is_file() else {}
    for name, spec in manifest["layers"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"load_quantized_base: layer {name} of {d} does not exist in this model.") from None
        if spec["type"] == "Linear":
            continue
        if (old.out_features, old.in_features) != (spec["out"], spec["in"]):
            raise ConfigError(f"load_quantized_base: layer {name} is ({old.out_features}, {old.in_features}) in the "
                              f"model but ({spec['out']}, {spec['in']}) in {d}.")
        sd = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if spec["type"] == "QuantLinear":
            s = dict(spec["scheme"])
            if s.get("tile") is not None:
                s["tile"] = tuple(s["tile"])
            new = QuantLinear(spec["in"], spec["out"], QuantScheme(**s), bias=spec["bias"])
            new.load_state_dict(sd)
        else:
            import bitsandbytes as bnb

            from .quant.bnb import _linear4bit_cls

            cdt = getattr(torch, spec["compute_dtype"]) if spec.get("compute_dtype") else None
            new = _linear4bit_cls()(spec["in"], spec["out"], bias=spec["bias"], compute_dtype=cdt,
                                    compress_statistics=True, quant_type="nf4", device="meta")
            stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
            device = "cuda" if torch.cuda.is_available() else "cpu"
            new.weight = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats,
                                                             requires_grad=False, device=device, module=new)
            new.bias = nn.Parameter(sd["bias"].to(device), requires_grad=False) if spec["bias"] else None
        new.requires_grad_(False)
        _set_module(model, name, new)
    model.requires_grad_(False)
    if (d / "init.safetensors").is_file():
        init = load_file(str(d / "init.safetensors"))
        method._init = {n: (init[f"{n}.A"], init[f"{n}.B"]) for n in manifest["layers"]}
        method.loftq_report = json.loads((d / "init_report.json").read_text())
    model.qft_base = {"method": manifest["method"], "key": method.base_key(), "layers": list(manifest["layers"])}
    return model
