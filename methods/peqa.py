"""``peqa`` (Kim et al. 2023, PEQA): train only the per-group scales of an INTk model.

The worked example of adding a method (README, "Adding a method"): it is one file and one registry entry.
It has no pooled adapter (``geometry() -> None``): ``prepare`` quantizes the base and turns on a trainable
``scale_delta`` in every :class:`~methods.quant.linear.QuantLinear`, so that the effective weight is
``(S + ΔS)·(Q − Z)``; ``merge`` folds ``ΔS`` into ``S`` (exact: codes and zero points unchanged).
"""
from __future__ import annotations

from torch import nn

from .base import GPTQ_GROUPS, QUANTIZER, SEED, TARGETS, Hyper, Method


class PEQA(Method):
    name = "peqa"
    label = "PEQA"
    plot_style = ("#17becf", "*")  # (colour, marker) in the figures
    paper_rows = {"PEQA": "int-merge"}  # published rows it reproduces -> mode
    summary = "INTk base, only the per-group scales are trained; exact merge (new scales)"
    deploy = "int-merge"
    needs_base_weight_grad = True
    hyperparameters = {
        "bits": Hyper(4, int, "bits of the INT base", choices=(2, 3, 4, 8)),
        "group_size": Hyper(32, int, "quantization group along the input (one trainable scale per group)",
                            minimum=1),
        "quantizer": QUANTIZER, "gptq_groups": GPTQ_GROUPS, "targets": TARGETS, "seed": SEED,
    }

    def scheme(self):
        from .quant.scheme import QuantScheme
        return QuantScheme(kind="int", bits=self.hp["bits"], group_size=self.hp["group_size"])

    def geometry(self):
        return None

    # accounting: one scale per group; applying the scale is part of dequantization, not an adapter matmul
    def trainable_params(self, d_out, d_in):
        return d_out * (d_in // self.hp["group_size"])

    def adapter_flops_per_token(self, d_out, d_in):
        return 0

    def wrap_layer(self, name, base, adapter_dtype):
        base.enable_scale_training()
        return base

    def merge(self, model: nn.Module, dtype=None) -> nn.Module:
        from .quant.linear import QuantLinear
        for name, mod in list(model.named_modules()):
            if isinstance(mod, QuantLinear) and getattr(mod, "scale_delta", None) is not None:
                mod.merge_scale_delta()
        model.qft_merged = self.deploy
        model.qft_method = None
        return model
