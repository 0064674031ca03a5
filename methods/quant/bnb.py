"""bitsandbytes NF4 with double quantization (QLoRA's base-weight format; METHODS.md, "Quantizers").

``quant_type="nf4"`` and ``compress_statistics=True`` are always set explicitly (the library defaults to fp4),
``blocksize=64``; the absmax of every block is itself quantized to 8 bits in nested blocks of 256.

CPU note: on CPUs with AVX512-BF16, bitsandbytes' ``Linear4bit`` repacks its weight on the first forward in
eval mode without grad, un-nests the absmax and rounds it to bfloat16 (and asserts ``out_features % 32 == 0``).
That changes the numerics relative to the GPU path and breaks layers like 100 outputs, so modules made here turn
it off (``support_avx512bf16_for_cpu = False``): the forward is then always ``F.linear`` with exactly the weight
that :func:`dequantize_linear4bit` returns. :func:`dequantize_linear4bit` also reads modules already repacked.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError

BNB_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def _bnb():
    import bitsandbytes

    return bitsandbytes


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in BNB_BLOCKSIZES:
        raise ConfigError(
            f"blocksize={blocksize!r} is not supported by bitsandbytes NF4; supported: {list(BNB_BLOCKSIZES)}. "
            f"Use blocksize=64 (QLoRA)."
        )


def to_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype | None = None, *, blocksize: int = 64) -> nn.Module:
    """A frozen ``bnb.nn.Linear4bit`` (NF4, double quantization, block 64) holding ``linear``'s weight and bias."""
    _check_blocksize(blocksize)
    bnb = _bnb()
    w = linear.weight.detach()
    has_bias = linear.bias is not None
    module = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
        compress_statistics=True, quant_type="nf4", device="meta",
    )
    module.weight = bnb.nn.Params4bit(
        w.contiguous().to("cpu" if w.device.type == "meta" else w.device), requires_grad=False,
        quant_type="nf4", compress_statistics=True, blocksize=blocksize, module=module,
    )
    if has_bias:
        module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    module.weight = module.weight.to(w.device)  # quantizes
    module.quant_state = module.weight.quant_state
    module.support_avx512bf16_for_cpu = False
    module.requires_grad_(False)
    return module


def _dequantize_cpu_packed(data: torch.Tensor, qs) -> torch.Tensor:
    """Weight of a Linear4bit repacked by bitsandbytes for AVX512-BF16 CPUs (see module docstring)."""
    from bitsandbytes.functional import get_4bit_type

    n, k_half = data.shape
    k = k_half * 2
    bn = 32
    packed = data.reshape(-1, bn)
    qw = torch.cat([packed & 0xF, (packed >> 4) & 0xF], dim=-1)
    qw = qw.reshape(n // bn, k_half, bn, 2).transpose(-3, -2).reshape(n, k)
    code = get_4bit_type(qs.quant_type, device=data.device)
    absmax = qs.absmax.float().T.reshape(n, k // qs.blocksize)
    return code[qw.long()] * absmax.repeat_interleave(qs.blocksize, dim=1)


def dequantize_linear4bit(module: nn.Module) -> torch.Tensor:
    """float32 weight ``(D_out, D_in)`` that a bitsandbytes ``Linear4bit`` computes with (double quant included)."""
    from bitsandbytes.functional import dequantize_4bit

    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ConfigError(
            f"{type(module).__name__} has no quant_state: its weight was never quantized. "
            f"Move it to a device (module.to('cpu')) or build it with to_linear4bit()."
        )
    if getattr(qs, "packing_format_for_cpu", False):
        return _dequantize_cpu_packed(weight.data, qs)
    qs32 = copy.copy(qs)
    qs32.dtype = torch.float32  # dequantize_4bit computes in float32 and would cast to the original dtype
    return dequantize_4bit(weight.data, qs32).float().reshape(qs.shape)


def bnb_nf4_fake_quant(w: torch.Tensor, *, blocksize: int = 64) -> torch.Tensor:
    """float32 weight that a ``Linear4bit`` (NF4, double quant, block 64) made from ``w`` dequantizes to."""
    _check_blocksize(blocksize)
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = w.detach().contiguous()
    packed, qs = quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    qs.dtype = torch.float32
    return dequantize_4bit(packed, qs).float().reshape(w.shape)


def linear4bit_stored_bits(d_out: int, d_in: int, blocksize: int = 64) -> int:
    """Bits a Linear4bit with double quantization stores for a ``(d_out, d_in)`` weight.

    Codes (4 bits each, packed two per byte), 8-bit absmax per block, float32 absmax per nested block of 256
    and the float32 absmax offset. The constant lookup tables (the NF4 table, the 256-entry dynamic map of the
    nested quantization) are not counted.
    """
    numel = d_out * d_in
    nblocks = -(-numel // blocksize)
    return 8 * -(-numel // 2) + 8 * nblocks + 32 * -(-nblocks // NESTED_BLOCKSIZE) + 32
