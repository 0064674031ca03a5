"""``base``: the un-tuned base model, 16-bit or quantized (the papers' "base" and "base w/ GPTQ" rows).

No adapter and no trainable parameters: ``prepare`` only quantizes (or, with ``bits=16``, leaves the model as
it is), fine-tuning is skipped by the pipeline, and ``merge`` returns the model unchanged.
"""
from __future__ import annotations

from .base import GPTQ_GROUPS, QUANTIZER, TARGETS, Hyper, Method
from .errors import ConfigError


class Base(Method):
    name = "base"
    label = "base (un-tuned)"
    plot_style = ("#555555", "x")  # (colour, marker) in the figures
    paper_rows = {"base": "base", "base w/ GPTQ": "base"}  # published rows it reproduces -> mode
    summary = "the un-tuned base: 16-bit, or quantized (INTk RTN/GPTQ, NF4) with no adapter"
    deploy = "base"
    hyperparameters = {
        "bits": Hyper(16, int, "16 (no quantization) or the bits of the quantized base", choices=(16, 8, 4, 3, 2)),
        "quant_type": Hyper("int", str, "quantizer of a quantized base: 'int' (INTk), 'nf' (NF4 bitsandbytes, "
                            "NF2/NF3 own) or 'fp' (FP4, bitsandbytes' E2M1 codebook, own, no DQ)",
                            choices=("int", "nf", "fp")),
        "group_size": Hyper(128, int, "group along the input (int) or absmax block (nf)", minimum=1),
        "quantizer": QUANTIZER, "gptq_groups": GPTQ_GROUPS, "targets": TARGETS,
    }

    def validate(self):
        if self.hp["quant_type"] == "nf" and self.hp["bits"] == 8:
            raise ConfigError("base: bits=8 is not available with quant_type='nf'; use quant_type='int'.")
        if self.hp["quant_type"] == "fp" and self.hp["bits"] != 4:
            raise ConfigError(f"base: quant_type='fp' is FP4; set bits=4 (got bits={self.hp['bits']}).")
        super().validate()

    def scheme(self):
        from .quant.scheme import QuantScheme

        bits, g = self.hp["bits"], self.hp["group_size"]
        if bits == 16:
            return None
        if self.hp["quant_type"] == "int":
            return QuantScheme(kind="int", bits=bits, group_size=g)
        if self.hp["quant_type"] == "fp":
            return QuantScheme(kind="fp", bits=4, blocksize=g)
        return QuantScheme(kind="bnb-nf4", bits=4) if bits == 4 else QuantScheme(kind="nf", bits=bits, blocksize=g)

    def geometry(self):
        return None

    def trainable_params(self, d_out, d_in):
        return 0

    def adapter_flops_per_token(self, d_out, d_in):
        return 0

    def wrap_layer(self, name, base, adapter_dtype):
        return base

    def merge(self, model, dtype=None):
        model.qft_merged = "base"
        model.qft_method = None
        return model
