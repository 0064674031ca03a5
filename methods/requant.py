"""Re-quantization of a merged 16-bit model (the "QLoRA w/ GPTQ" rows, and the same for Q-BaRA and LoftQ).

``requantize(model, layers, scheme, quantizer="gptq", calibration=...)`` replaces the named dense layers of a
merged model by INTk (or NF) base modules, with GPTQ (calibration data needed) or round-to-nearest.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .base import _set_module
from .errors import ConfigError
from .quant.modules import make_linear


def requantize(model: nn.Module, layers: Iterable[str], scheme, quantizer: str = "gptq",
               calibration: list[torch.Tensor] | None = None) -> nn.Module:
    layers = list(layers)
    for name in layers:
        mod = model.get_submodule(name)
        if not isinstance(mod, nn.Linear):
            raise ConfigError(f"requantize: layer {name} is a {type(mod).__name__}; merge the model to 16 bits first.")
        scheme.check_layer(name, mod.out_features, mod.in_features)
    if quantizer == "gptq":
        if scheme.kind != "int":
            raise ConfigError(f"requantize: GPTQ is implemented for INTk schemes, not kind={scheme.kind!r}.")
        if not calibration:
            raise ConfigError("requantize: quantizer='gptq' needs calibration batches (or use quantizer='rtn').")
        from .quant.gptq import gptq_quantize_model

        gptq_quantize_model(model, layers, scheme, list(calibration))
        return model
    if quantizer != "rtn":
        raise ConfigError(f"requantize: quantizer={quantizer!r} is not 'gptq' or 'rtn'.")
    for name in layers:
        mod = model.get_submodule(name)
        _set_module(model, name, make_linear(scheme, mod.float() if mod.weight.dtype == torch.float16 else mod))
    return model
