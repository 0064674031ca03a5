"""Exact merge of a block-constant update into the zero points of an INTk base (QA-LoRA, QA-HiRA).

With ``w~[o,i] = S[o,b] · (Q[o,i] − Z[o,b])`` and an update constant on each quantization block,
``ΔW[o,i] = δ[o,b]``, the merged layer keeps the codes ``Q`` and scales ``S`` and only changes
``Z' = Z − δ / S`` (METHODS.md, "Merging into zero points"). Every merge is checked numerically.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import _set_module, adapter_modules
from .errors import QFTError


class MergeError(QFTError, RuntimeError):
    """A merge that is not exact within tolerance."""


def merge_into_zeros(mod, scheme, *, tol: float = 1e-5):
    """Return a new QuantLinear with ``Z' = Z − δ/S`` and the relative error of the merged weight."""
    from .quant.linear import QuantLinear

    base, adapter = mod.base, mod.adapter
    if (adapter.q, adapter.p) != tuple(scheme.block()):
        raise MergeError(f"adapter blocks (q={adapter.q}, p={adapter.p}) are not the quantization blocks "
                         f"{tuple(scheme.block())}: the update is not constant per block, no exact merge exists.")
    scales = base.scales.float()
    delta = adapter.block_delta().to(scales.device)
    zeros = base.zeros.float() - delta / scales
    merged = QuantLinear.from_quantized(base.codes(), scheme, scales=scales.clone(), zeros=zeros,
                                        bias=None if base.bias is None else base.bias.clone())
    want = base.dequantize(torch.float32) + adapter.delta_weight().to(scales.device)
    got = merged.dequantize(torch.float32)
    rel = float((got - want).norm() / want.norm().clamp_min(1e-30))
    if rel > tol:
        raise MergeError(f"exact merge failed its check: relative weight error {rel:.3g} > {tol:g}")
    return merged, rel


class IntMergeMixin:
    """``merge`` for methods whose adapter blocks coincide with the INT quantization blocks."""

    deploy = "int-merge"

    def merge(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """Exact INT merge in place: codes and scales unchanged, zero points moved. ``dtype`` is ignored."""
        scheme = self.scheme()
        report = {}
        for name, mod in list(adapter_modules(model)):
            merged, rel = merge_into_zeros(mod, scheme)
            _set_module(model, name, merged)
            report[name] = rel
        self.merge_report = {"layers": len(report), "max_rel_weight_error": max(report.values(), default=0.0)}
        model.qft_merged = self.deploy
        model.qft_method = None
        return model
