"""Own NFk codebook quantizer (k = 2, 3, 4), blockwise absmax (METHODS.md, "Quantizers").

The codebook is the asymmetric normal-quantile construction of bitsandbytes' NF4 and of LoftQ::

    positive = ndtri(linspace(offset, 0.5, 2^(k-1) + 1)[:-1])     # 2^(k-1) values
    negative = -ndtri(linspace(offset, 0.5, 2^(k-1))[:-1])        # 2^(k-1) - 1 values
    codebook = sort(positive ∪ {0} ∪ negative) / max              # 2^k values in [-1, 1], exact 0

with ``offset = 0.9677083``, computed in float64 and stored as float32. For k = 4 it equals bitsandbytes' NF4
table. Quantization flattens the weight, splits it into blocks of ``blocksize`` (the last one may be partial),
scales each block by its absmax and picks the nearest codebook value (ties go to the lower value, as in
bitsandbytes).
"""
from __future__ import annotations

import functools

import torch

from .intk import check_bits

NF_BITS = (2, 3, 4)
NF_OFFSET = 0.9677083
#: bitsandbytes' FP4 (E2M1 without infinities) as a sorted codebook: the magnitudes 0, 0.0625, 2, 3, 4, 6, 8, 12
#: (sign bit, 2 exponent bits, 1 mantissa bit, bias 1, with 0.0625 for the subnormal code 001) over their max 12,
#: both signs (-0 kept, so 16 codes) -- QLoRA's FP4 (Table 2); tests check it against bitsandbytes' table
FP4_MAGNITUDES = (0.0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


@functools.lru_cache(maxsize=None)
def _codebook64(bits: int) -> torch.Tensor:
    half = 2 ** (bits - 1)
    pos = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return v / v.max()


@functools.lru_cache(maxsize=None)
def _fp4_codebook() -> torch.Tensor:
    v = torch.tensor(FP4_MAGNITUDES, dtype=torch.float64)
    return (torch.cat([-v, v]).sort().values / v.max()).to(torch.float32)


def codebook(kind: str, bits: int) -> torch.Tensor:
    """The sorted codebook of a blockwise-absmax codebook quantizer: ``"nf"`` (NFk) or ``"fp"`` (FP4)."""
    if kind == "fp":
        check_bits(bits, (4,), "FP4 quantizer")
        return _fp4_codebook().clone()
    return nf_codebook(bits)


def nf_codebook(bits: int) -> torch.Tensor:
    """The 2^bits sorted NFk values in [-1, 1] (float32), with an exact 0."""
    check_bits(bits, NF_BITS, "NFk quantizer")
    return _codebook64(bits).to(torch.float32)


def nf_num_blocks(numel: int, blocksize: int) -> int:
    return (numel + blocksize - 1) // blocksize


def _check_blocksize(blocksize: int) -> None:
    from ..errors import ConfigError

    if not isinstance(blocksize, int) or isinstance(blocksize, bool) or blocksize <= 0:
        raise ConfigError(f"blocksize={blocksize!r} must be a positive integer, e.g. blocksize=64.")


def nf_quantize(w: torch.Tensor, bits: int, blocksize: int = 64, kind: str = "nf") -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise-absmax NFk quantization (``kind="fp"``: the same with the FP4 codebook).

    Returns ``(codes, absmax)``: uint8 codes with ``w``'s shape (indices into :func:`nf_codebook`) and the
    float32 absmax of every block of the flattened weight, shape ``(ceil(numel / blocksize),)``.
    """
    code = codebook(kind, bits)
    _check_blocksize(blocksize)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = n - rem
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=-1)
    # same arithmetic as bitsandbytes: multiply by the reciprocal for full blocks, divide for the tail
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if rem:
        am = flat[full:].abs().amax()
        absmax = torch.cat([absmax, am[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am.clamp(min=1e-38), -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2
    q = torch.bucketize(scaled, bounds).to(torch.uint8)
    return q.reshape(w.shape), absmax.to(torch.float32)


def nf_dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int, blocksize: int = 64,
                  dtype: torch.dtype = torch.float32, kind: str = "nf") -> torch.Tensor:
    """``codebook[codes] * absmax[block]`` computed in float32, cast to ``dtype``, with ``codes``' shape."""
    code = codebook(kind, bits).to(absmax.device)
    _check_blocksize(blocksize)
    flat = code[codes.reshape(-1).long()]
    n = flat.numel()
    nb = nf_num_blocks(n, blocksize)
    if absmax.numel() != nb:
        from ..errors import ShapeError

        raise ShapeError(f"absmax has {absmax.numel()} entries, but {n} codes in blocks of {blocksize} need {nb}.")
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (flat * scale).reshape(codes.shape).to(dtype)


def nf_fake_quant(w: torch.Tensor, bits: int, blocksize: int = 64, kind: str = "nf") -> torch.Tensor:
    """float32 weight that NFk (or FP4, ``kind="fp"``) quantization of ``w`` dequantizes to."""
    codes, absmax = nf_quantize(w, bits, blocksize, kind)
    return nf_dequantize(codes, absmax, bits, blocksize, kind=kind)
