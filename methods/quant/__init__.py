"""Quantizers: NF4 through bitsandbytes, own NFk and FP4 codebook quantizers, group-wise INTk (RTN and GPTQ).

bitsandbytes is imported lazily (only by the ``bnb-nf4`` kind and :mod:`methods.quant.bnb`'s functions).
"""
from .bnb import bnb_nf4_fake_quant, dequantize_linear4bit, to_linear4bit
from .intk import int_dequantize, int_fake_quant, int_params, int_quantize
from .linear import QuantLinear
from .nf import codebook, nf_codebook, nf_dequantize, nf_fake_quant, nf_quantize
from .packing import pack, packed_nbytes, unpack
from .modules import dequantize_module, is_quantized, make_linear
from .scheme import QuantScheme

__all__ = [
    "QuantScheme", "QuantLinear", "dequantize_module", "is_quantized", "make_linear",
    "codebook", "nf_codebook", "nf_quantize", "nf_dequantize", "nf_fake_quant",
    "pack", "unpack", "packed_nbytes",
    "to_linear4bit", "dequantize_linear4bit", "bnb_nf4_fake_quant",
    "int_params", "int_quantize", "int_dequantize", "int_fake_quant",
]
