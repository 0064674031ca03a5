"""Dense bit packing of quantization codes.

Codes are packed little-endian: code ``j`` of the flattened input occupies bits ``j*bits .. j*bits+bits-1`` of
the little-endian bit stream, i.e. the lowest bits of each byte hold the earliest code. Sizes:

- ``bits=2``: 4 codes per byte, ``bits=4``: 2 codes per byte,
- ``bits=3``: 8 codes in 3 bytes,
- ``bits=8``: one code per byte (a copy).

The packed length is always ``ceil(numel * bits / 8)`` bytes; trailing padding bits are zero.
"""
from __future__ import annotations

import torch

from ..errors import ConfigError

PACKABLE_BITS = (2, 3, 4, 8)


def _check(bits: int) -> None:
    if bits not in PACKABLE_BITS:
        raise ConfigError(
            f"bits={bits!r} cannot be packed; supported: {list(PACKABLE_BITS)}. Set bits to one of those."
        )


def packed_nbytes(numel: int, bits: int) -> int:
    """Number of bytes :func:`pack` produces for ``numel`` codes."""
    _check(bits)
    return (numel * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (any shape, values < 2^bits) into a dense uint8 1-D tensor."""
    _check(bits)
    flat = codes.detach().reshape(-1).to(torch.uint8)
    n = flat.numel()
    nbytes = packed_nbytes(n, bits)
    if bits == 8:
        return flat.clone()
    if n and int(flat.max()) >= 2**bits:
        raise ConfigError(
            f"codes must be < 2^{bits}={2**bits} to be packed with bits={bits}; got max {int(flat.max())}."
        )
    if bits in (2, 4):
        per = 8 // bits
        pad = (-n) % per
        x = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, per).to(torch.int32)
        shifts = torch.arange(per, dtype=torch.int32) * bits
        out = (x << shifts).sum(dim=1).to(torch.uint8)
        return out[:nbytes].contiguous()
    # bits == 3: 8 codes -> 24-bit little-endian word -> 3 bytes
    pad = (-n) % 8
    x = torch.nn.functional.pad(flat, (0, pad)).reshape(-1, 8).to(torch.int32)
    word = (x << (torch.arange(8, dtype=torch.int32) * 3)).sum(dim=1)
    out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=1).reshape(-1).to(torch.uint8)
    return out[:nbytes].contiguous()


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as a uint8 1-D tensor."""
    _check(bits)
    p = packed.reshape(-1).to(torch.uint8)
    nbytes = packed_nbytes(numel, bits)
    if p.numel() < nbytes:
        raise ConfigError(f"packed tensor has {p.numel()} bytes, but {numel} codes of {bits} bits need {nbytes}.")
    p = p[:nbytes]
    if bits == 8:
        return p.clone()
    mask = 2**bits - 1
    if bits in (2, 4):
        per = 8 // bits
        shifts = torch.arange(per, dtype=torch.int32) * bits
        x = (p.to(torch.int32)[:, None] >> shifts) & mask
        return x.reshape(-1)[:numel].to(torch.uint8)
    pad = (-nbytes) % 3
    b = torch.nn.functional.pad(p, (0, pad)).reshape(-1, 3).to(torch.int32)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    x = (word[:, None] >> (torch.arange(8, dtype=torch.int32) * 3)) & mask
    return x.reshape(-1)[:numel].to(torch.uint8)
