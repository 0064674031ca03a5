"""Group-wise asymmetric INTk quantization with float zero points (METHODS.md, "Quantizers").

A *block* is a tile of ``(tile_out, tile_in)`` weights: row groups of ``g`` inputs are ``(1, g)``, the
QA-HiRA reference tiles are ``(8, 4)``. Per block::

    scale = (max - min) / (2^k - 1)        zero = -min / scale
    q     = clamp(round(w / scale + zero), 0, 2^k - 1)
    w~    = scale * (q - zero)

Scales and zeros have shape ``(D_out / tile_out, D_in / tile_in)``. Zero points stay floats so that merges
into them (QA-LoRA, QA-HiRA) are exact. A block whose weights are all equal gets ``scale = 1`` and is then
represented exactly (``q = 0``, ``w~ = min``; an all-zero block dequantizes to exactly 0.0). The GPTQ export,
whose zeros are integers, re-encodes such blocks (:func:`methods.quant.export.gptq_layer_params`).
"""
from __future__ import annotations

import torch

from ..errors import ConfigError, ShapeError

SUPPORTED_BITS = (2, 3, 4, 8)

Tile = tuple[int, int]


def check_bits(bits: int, supported=SUPPORTED_BITS, what: str = "INTk quantizer") -> None:
    if bits not in supported:
        raise ConfigError(
            f"bits={bits!r} is not supported by the {what}; supported: {list(supported)}. "
            f"Set bits to one of those."
        )


def check_tile(shape: tuple[int, int], tile: Tile, layer: str = "weight") -> None:
    d_out, d_in = shape
    to, ti = tile
    if d_out % to or d_in % ti:
        raise ShapeError(
            f"layer {layer} with weight shape (out={d_out}, in={d_in}) cannot be split into "
            f"quantization blocks of {to} (out) x {ti} (in): "
            + (f"in={d_in} is not divisible by {ti}. " if d_in % ti else "")
            + (f"out={d_out} is not divisible by {to}. " if d_out % to else "")
            + "Choose a group size / tile that divides the layer's width."
        )


def _blocks(w: torch.Tensor, tile: Tile) -> torch.Tensor:
    """(D_out, D_in) -> (D_out/to, D_in/ti, to*ti): each block's weights on the last axis."""
    d_out, d_in = w.shape
    to, ti = tile
    return w.reshape(d_out // to, to, d_in // ti, ti).permute(0, 2, 1, 3).reshape(d_out // to, d_in // ti, to * ti)


def expand(stat: torch.Tensor, tile: Tile) -> torch.Tensor:
    """Broadcast a per-block statistic (D_out/to, D_in/ti) to the weight's shape (D_out, D_in)."""
    to, ti = tile
    return stat.repeat_interleave(to, dim=0).repeat_interleave(ti, dim=1)


def int_params(w: torch.Tensor, bits: int, tile: Tile) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and float zero points of every block, computed in float32 from min/max."""
    check_bits(bits)
    check_tile(tuple(w.shape), tile)
    b = _blocks(w.detach().float(), tile)
    wmin = b.amin(dim=-1)
    wmax = b.amax(dim=-1)
    scale = (wmax - wmin) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = -wmin / scale
    return scale, zero


def int_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, tile: Tile) -> torch.Tensor:
    """Integer codes (uint8, shape of ``w``) for given per-block scales and zeros."""
    s = expand(scale, tile)
    z = expand(zero, tile)
    q = torch.clamp(torch.round(w.detach().float() / s + z), 0, 2**bits - 1)
    return q.to(torch.uint8)


def int_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, tile: Tile,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scale * (q - zero)`` broadcast over blocks, computed in float32 and cast to ``dtype``."""
    d_out, d_in = codes.shape
    to, ti = tile
    q = codes.float().view(d_out // to, to, d_in // ti, ti)
    w = scale.float()[:, None, :, None] * (q - zero.float()[:, None, :, None])
    return w.reshape(d_out, d_in).to(dtype)


def int_quantize(w: torch.Tensor, bits: int, tile: Tile) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: returns ``(codes uint8 (D_out, D_in), scale, zero)``."""
    scale, zero = int_params(w, bits, tile)
    return int_codes(w, scale, zero, bits, tile), scale, zero


def int_fake_quant(w: torch.Tensor, bits: int, tile: Tile) -> torch.Tensor:
    codes, scale, zero = int_quantize(w, bits, tile)
    return int_dequantize(codes, scale, zero, tile, dtype=w.dtype)
