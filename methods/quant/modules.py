"""Module factories over the quantizer value objects: a frozen quantized layer from an ``nn.Linear`` and a
:class:`~methods.quant.scheme.QuantScheme`, and the two questions every method asks of a layer (is it quantized,
what float32 weight does it hold). Kept apart from :mod:`.scheme` so that the imports run one way:
``scheme`` (value objects) <- ``linear`` (QuantLinear) <- ``modules`` (factories).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .bnb import dequantize_linear4bit, to_linear4bit
from .linear import QuantLinear
from .scheme import QuantScheme


def make_linear(scheme: QuantScheme, linear: nn.Linear, compute_dtype: torch.dtype | None = None, *,
                name: str = "<linear>") -> nn.Module:
    """Frozen quantized copy of ``linear`` (bias kept) under ``scheme``: QuantLinear for int/nf/fp, bitsandbytes'
    Linear4bit for bnb-nf4."""
    scheme.check_layer(name, linear.out_features, linear.in_features)
    if scheme.kind == "bnb-nf4":
        return to_linear4bit(linear, compute_dtype, blocksize=scheme.blocksize)
    return QuantLinear.from_linear(linear, scheme, compute_dtype, name=name)


def _is_linear4bit(module: nn.Module) -> bool:
    if "bitsandbytes" not in sys.modules:  # nothing can be a Linear4bit before bitsandbytes is imported
        return False
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def is_quantized(module: nn.Module) -> bool:
    """True for a QuantLinear or a bitsandbytes Linear4bit."""
    return isinstance(module, QuantLinear) or _is_linear4bit(module)


def dequantize_module(module: nn.Module) -> torch.Tensor:
    """float32 weight ``(D_out, D_in)`` of a QuantLinear, a bnb Linear4bit or a plain nn.Linear (detached)."""
    if isinstance(module, QuantLinear):
        with torch.no_grad():
            return module.dequantize(torch.float32)
    if _is_linear4bit(module):
        return dequantize_linear4bit(module)
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    raise TypeError(
        f"dequantize_module() takes a QuantLinear, a bitsandbytes Linear4bit or an nn.Linear, "
        f"got {type(module).__name__}."
    )
