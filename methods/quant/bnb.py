"""bitsandbytes NF4 with double quantization (QLoRA's base-weight format; METHODS.md, "Quantizers").

``quant_type="nf4"`` and ``compress_statistics=True`` are always set explicitly (the library defaults to fp4),
``blocksize=64``; the absmax of every block is itself quantized to 8 bits in nested blocks of 256.

Two CPU problems of bitsandbytes 0.50.2 are worked around here (GPU behaviour is unchanged):

1. Its native CPU ``dequantize_4bit`` kernel (used by ``bnb.functional.dequantize_4bit`` and by the
   ``Linear4bit`` forward) returns wrong weights when the last dimension is a multiple of 16 but not of 64
   (in_features 32, 96, 160, ...) and there is more than one row: a quantization block that straddles two rows is
   scaled with the wrong absmax (relative weight error ~0.27 instead of ~0.09). :func:`dequantize_linear4bit`
   and :func:`bnb_nf4_fake_quant` therefore dequantize in plain torch (NF4 table lookup, nested absmax
   ``code2[q_absmax] * absmax2 + offset``, exactly what the CUDA kernels compute), and the module made by
   :func:`to_linear4bit` is a ``Linear4bit`` subclass whose forward on CPU is ``F.linear`` with that weight.
2. On CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight on the first eval/no-grad forward, un-nests the
   absmax and rounds it to bfloat16 (and asserts ``out_features % 32 == 0``). Modules made here turn that off
   (``support_avx512bf16_for_cpu = False``); :func:`dequantize_linear4bit` still reads repacked modules.
"""
from __future__ import annotations

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


def _linear4bit_cls():
    """``Linear4bit`` with a CPU forward that uses the correct dequantization (see module docstring)."""
    global _CPU_SAFE_LINEAR4BIT
    if _CPU_SAFE_LINEAR4BIT is None:
        bnb = _bnb()

        class Linear4bitNF4(bnb.nn.Linear4bit):
            """bitsandbytes ``Linear4bit`` (NF4 + double quantization); on CPU the forward is
            ``F.linear(x, dequantize_linear4bit(self), bias)`` in the compute dtype."""

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if x.device.type != "cpu":
                    return super().forward(x)
                in_dtype = x.dtype
                dtype = self.compute_dtype or x.dtype
                # the frozen NF4 weight, dequantized once and cached (keyed on the packed data's identity)
                key = (dtype, self.weight.data_ptr(), self.weight._version)
                cache = self.__dict__.get("_wcache")
                if cache is None or cache[0] != key:
                    with torch.no_grad():
                        cache = (key, dequantize_linear4bit(self).to(dtype))
                    self.__dict__["_wcache"] = cache
                w = cache[1]
                b = None if self.bias is None else self.bias.to(dtype)
                return torch.nn.functional.linear(x.to(dtype), w, b).to(in_dtype)

        Linear4bitNF4.__module__ = __name__
        Linear4bitNF4.__qualname__ = "Linear4bitNF4"
        _CPU_SAFE_LINEAR4BIT = Linear4bitNF4
    return _CPU_SAFE_LINEAR4BIT


_CPU_SAFE_LINEAR4BIT = None


def __getattr__(name: str):
    # ``methods.quant.bnb.Linear4bitNF4`` exists once asked for (bitsandbytes is imported lazily); this also
    # lets pickle / torch.save find the class.
    if name == "Linear4bitNF4":
        return _linear4bit_cls()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_linear4bit(linear: nn.Linear, compute_dtype: torch.dtype | None = None, *, blocksize: int = 64) -> nn.Module:
    """A frozen ``bnb.nn.Linear4bit`` (NF4, double quantization, block 64) holding ``linear``'s weight and bias."""
    _check_blocksize(blocksize)
    bnb = _bnb()
    w = linear.weight.detach()
    has_bias = linear.bias is not None
    module = _linear4bit_cls()(
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


def _nested_absmax(qs) -> torch.Tensor:
    """float32 absmax of every 4-bit block, undoing the double quantization when present."""
    if not qs.nested:
        return qs.absmax.float()
    s2 = qs.state2
    n = qs.absmax.numel()
    scale2 = s2.absmax.float().repeat_interleave(s2.blocksize)[:n]
    return s2.code.float()[qs.absmax.reshape(-1).long()] * scale2 + qs.offset.float()


def _dequantize_nf4(packed: torch.Tensor, qs) -> torch.Tensor:
    """Plain-torch ``dequantize_4bit``: float32 ``(D_out, D_in)`` (codes two per byte, first code high)."""
    from bitsandbytes.functional import get_4bit_type

    p = packed.reshape(-1)
    if p.dtype != torch.uint8:
        p = p.view(torch.uint8)
    numel = 1
    for d in qs.shape:
        numel *= d
    codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)[:numel]
    table = get_4bit_type(qs.quant_type, device=p.device).float()
    absmax = _nested_absmax(qs)
    vals = table[codes.long()]
    pad = absmax.numel() * qs.blocksize - numel
    vals = torch.nn.functional.pad(vals, (0, pad)).view(-1, qs.blocksize) * absmax.view(-1, 1)
    return vals.reshape(-1)[:numel].reshape(tuple(qs.shape))


def dequantize_linear4bit(module: nn.Module) -> torch.Tensor:
    """float32 weight ``(D_out, D_in)`` that a bitsandbytes ``Linear4bit`` computes with (double quant included)."""
    weight = module.weight
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ConfigError(
            f"{type(module).__name__} has no quant_state: its weight was never quantized. "
            f"Move it to a device (module.to('cpu')) or build it with to_linear4bit()."
        )
    if getattr(qs, "packing_format_for_cpu", False):
        return _dequantize_cpu_packed(weight.data, qs)
    return _dequantize_nf4(weight.data, qs)


def bnb_nf4_fake_quant(w: torch.Tensor, *, blocksize: int = 64) -> torch.Tensor:
    """float32 weight that a ``Linear4bit`` (NF4, double quant, block 64) made from ``w`` dequantizes to."""
    _check_blocksize(blocksize)
    from bitsandbytes.functional import quantize_4bit

    w = w.detach().contiguous()
    packed, qs = quantize_4bit(w, blocksize=blocksize, compress_statistics=True, quant_type="nf4")
    return _dequantize_nf4(packed, qs).reshape(w.shape)


def linear4bit_stored_bits(d_out: int, d_in: int, blocksize: int = 64) -> int:
    """Bits a Linear4bit with double quantization stores for a ``(d_out, d_in)`` weight.

    Codes (4 bits each, packed two per byte), 8-bit absmax per block, float32 absmax per nested block of 256
    and the float32 absmax offset. The constant lookup tables (the NF4 table, the 256-entry dynamic map of the
    nested quantization) are not counted.
    """
    numel = d_out * d_in
    nblocks = -(-numel // blocksize)
    return 8 * -(-numel // 2) + 8 * nblocks + 32 * -(-nblocks // NESTED_BLOCKSIZE) + 32
