"""QuantScheme: one value object that names a base-weight quantizer and builds frozen quantized layers.

Kinds (METHODS.md, "Quantizers"):

- ``"int"``: group-wise asymmetric INTk with float zero points, RTN here (GPTQ builds the same
  :class:`~methods.quant.linear.QuantLinear` through ``QuantLinear.from_quantized``). Blocks are either row
  groups of ``group_size`` inputs (tile ``(1, g)``) or 2-D tiles ``(tile_out, tile_in)``, e.g. ``(8, 4)``.
- ``"nf"``: the suite's own NFk codebook quantizer (k = 2, 3, 4), blockwise absmax over the flattened weight.
- ``"bnb-nf4"``: bitsandbytes NF4 with double quantization, block 64 (QLoRA).
- ``"fp"``: FP4, bitsandbytes' E2M1 code as an own codebook quantizer (blockwise absmax like ``"nf"``, no double
  quantization): the FP4 of QLoRA's Table 2, for the quantizer-error comparison (``base`` with ``quant_type: fp``).

Bits per weight (:meth:`QuantScheme.stored_bits_per_param`, ``format=``), for a layer of ``N = D_out · D_in``
weights; ``k`` bits per code, ``g`` weights per INT block (``group_size``, or ``tile_out · tile_in``: 32 for
the 8x4 tiles), ``B`` the NF blocksize. Constant lookup tables (codebooks) are never counted.

==============  ==========================================  =================================  ============
quantizer       ``"deployed"`` (default; efficiency table,  ``"working"`` (what the suite's    ``"gptq"``
                ``bits_per_param``)                         modules hold in memory)
==============  ==========================================  =================================  ============
INTk, groups g  k + 32/g: fp16 scale + fp16 float zero      8·ceil(N·k/8)/N + 64/g: fp32       k + (16+k)/g
                per group (GPTQ/HQQ-style float zeros):     scale + fp32 float zero per group
                int4 g32 5.0, g128 4.25; int3 g32 4.0
INTk, tiles     k + 32/(to·ti): the same per-block          8·ceil(N·k/8)/N + 64/(to·ti)       --
                overhead (8x4: k + 1)
NFk (own)       (N·k + 32·ceil(N/B))/N ≈ k + 32/B: fp32     8·ceil(N·k/8)/N + 32·ceil(N/B)/N   --
                absmax per block, as bitsandbytes NF4
                stores it without double quantization
bnb NF4 + DQ    bitsandbytes' real storage: 4 + 8/B +       the same                           --
                32/(256·B) + 32/N (offset); B=64: 4.127
==============  ==========================================  =================================  ============

``"gptq"`` is the packed-integer-zero GPTQ checkpoint that :func:`methods.quant.export.export_gptq_checkpoint`
writes (row groups only): k-bit codes, an fp16 scale and a k-bit packed integer zero per group; int4 g32
4.625, int4 g128 ≈ 4.156, int3 g32 ≈ 3.594, int2 g32 ≈ 2.563, int8 g32 8.75. Its ``g_idx`` (one int32 per
input, ``32 / D_out`` bits per weight, recomputable as ``i // g`` without act-order) is not counted. Its
integer zeros make the exact QA-LoRA / QA-HiRA merges lossy (export.py); the ``"deployed"`` float-zero layout
keeps them exact, which is why it is the reported number.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, ShapeError, did_you_mean
from .bnb import BNB_BLOCKSIZES, linear4bit_stored_bits
from .intk import SUPPORTED_BITS as INT_BITS, int_fake_quant
from .nf import NF_BITS, nf_fake_quant, nf_num_blocks
from .packing import packed_nbytes

KINDS = ("int", "nf", "bnb-nf4", "fp")
BITS_BY_KIND = {"int": INT_BITS, "nf": NF_BITS, "bnb-nf4": (4,), "fp": (4,)}
STAT_BITS = 32  # scales, zeros and absmax of QuantLinear are float32 (the "working" format)
DEPLOYED_STAT_BITS = 16  # INT scales and float zeros as a deployed float-zero format stores them (fp16)
NF_ABSMAX_BITS = 32  # NF absmax as bitsandbytes stores it without double quantization (fp32)
GPTQ_SCALE_BITS = 16  # the GPTQ checkpoint's fp16 scales (its zeros are k-bit integers)
#: the bits-per-weight formats of :meth:`QuantScheme.stored_bits_per_param` (module docstring)
BIT_FORMATS = ("deployed", "working", "gptq")


def _is_pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest_sizes(n: int, bad: int) -> list[int]:
    """Up to three sizes that divide ``n``, near the requested ``bad`` one: the two largest powers of two below
    it and the smallest multiple of 32 above it (or the nearest divisor above it, or ``n`` itself)."""
    divs = _divisors(n)
    below = [d for d in divs if d < bad and d > 1 and d & (d - 1) == 0][-2:]
    above = [d for d in divs if d > bad and d % 32 == 0] or [d for d in divs if d > bad] or [n]
    out = sorted(set(below + above[:1]))
    return [d for d in out if d > 1] or [n]


@dataclass(frozen=True)
class QuantScheme:
    kind: str  # "int" (group-wise asymmetric INTk, float zeros), "nf" (own NFk codebook), "bnb-nf4", "fp" (FP4)
    bits: int
    group_size: int | None = None  # int: row groups of g inputs == tile (1, g)
    tile: tuple[int, int] | None = None  # int: 2-D tile (tile_out, tile_in); exactly one of group_size/tile
    blocksize: int = 64  # nf / bnb-nf4

    def __post_init__(self):
        if isinstance(self.tile, list):
            object.__setattr__(self, "tile", tuple(self.tile))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError (field, value, fix) for an inconsistent scheme."""
        if self.kind not in KINDS:
            raise ConfigError(
                f"kind={self.kind!r} is not a quantizer kind; set kind to one of "
                f"{', '.join(repr(k) for k in KINDS)}.{did_you_mean(self.kind, KINDS)}"
            )
        supported = BITS_BY_KIND[self.kind]
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or self.bits not in supported:
            raise ConfigError(
                f"bits={self.bits!r} is not supported by kind={self.kind!r}; supported: {list(supported)}. "
                f"Set bits to one of those" + (" or use kind='nf' for NF2/NF3." if self.kind == "bnb-nf4" else ".")
            )
        if self.kind == "int":
            if self.group_size is None and self.tile is None:
                raise ConfigError(
                    "kind='int' needs exactly one of group_size (row groups of g inputs) or tile "
                    "((tile_out, tile_in)); got neither. Set e.g. group_size=32 or tile=(8, 4)."
                )
            if self.group_size is not None and self.tile is not None:
                raise ConfigError(
                    f"kind='int' needs exactly one of group_size or tile; got both group_size={self.group_size!r} "
                    f"and tile={self.tile!r}. Set the other one to None (group_size=g is tile=(1, g))."
                )
            if self.group_size is not None and not _is_pos_int(self.group_size):
                raise ConfigError(
                    f"group_size={self.group_size!r} must be a positive integer (inputs per quantization group); "
                    f"e.g. group_size=32."
                )
            if self.tile is not None and not (
                isinstance(self.tile, tuple) and len(self.tile) == 2 and all(_is_pos_int(t) for t in self.tile)
            ):
                raise ConfigError(
                    f"tile={self.tile!r} must be two positive integers (tile_out, tile_in); e.g. tile=(8, 4)."
                )
        else:
            for field in ("group_size", "tile"):
                if getattr(self, field) is not None:
                    raise ConfigError(
                        f"{field}={getattr(self, field)!r} applies only to kind='int', not kind={self.kind!r}; "
                        f"set {field}=None (the {self.kind} quantizer uses blocksize, now {self.blocksize})."
                    )
            if not _is_pos_int(self.blocksize):
                raise ConfigError(f"blocksize={self.blocksize!r} must be a positive integer; e.g. blocksize=64.")
            if self.kind == "bnb-nf4" and self.blocksize not in BNB_BLOCKSIZES:
                raise ConfigError(
                    f"blocksize={self.blocksize!r} is not supported by kind='bnb-nf4'; supported: "
                    f"{list(BNB_BLOCKSIZES)}. Use blocksize=64 (QLoRA)."
                )

    def block(self) -> tuple[int, int]:
        """The INTk quantization block ``(tile_out, tile_in)``: ``(1, group_size)`` or ``tile``."""
        if self.kind != "int":
            raise ConfigError(
                f"block() is defined for kind='int' only, not kind={self.kind!r} "
                f"(it quantizes blocks of blocksize={self.blocksize} flattened weights)."
            )
        return (1, self.group_size) if self.group_size is not None else tuple(self.tile)

    def check_layer(self, name: str, d_out: int, d_in: int) -> None:
        """Raise ShapeError when the layer ``name`` of shape ``(d_out, d_in)`` cannot be split into blocks."""
        if self.kind != "int":
            return
        head = f"layer {name} with weight shape (out={d_out}, in={d_in}): "
        if self.group_size is not None:
            g = self.group_size
            if d_in % g:
                sug = ", ".join(str(s) for s in suggest_sizes(d_in, g))
                raise ShapeError(
                    head + f"in={d_in} is not divisible by group_size={g}; choose a group_size that divides every "
                    f"target layer's in-features, e.g. {sug}"
                )
            return
        to, ti = self.tile
        problems = []
        if d_out % to:
            problems.append(
                f"out={d_out} is not divisible by tile_out={to} (tile={self.tile}); choose a tile_out that divides "
                f"every target layer's out-features, e.g. {', '.join(str(s) for s in suggest_sizes(d_out, to))}"
            )
        if d_in % ti:
            problems.append(
                f"in={d_in} is not divisible by tile_in={ti} (tile={self.tile}); choose a tile_in that divides "
                f"every target layer's in-features, e.g. {', '.join(str(s) for s in suggest_sizes(d_in, ti))}"
            )
        if problems:
            raise ShapeError(head + "; ".join(problems))

    # ------------------------------------------------------------------ compute
    def fake_quant(self, w: torch.Tensor) -> torch.Tensor:
        """float32 weight that the module built by :func:`methods.quant.modules.make_linear` dequantizes to."""
        if self.kind == "int":
            self.check_layer("<weight>", *w.shape)
            return int_fake_quant(w.detach().float(), self.bits, self.block())
        if self.kind in ("nf", "fp"):
            return nf_fake_quant(w, self.bits, self.blocksize, self.kind)
        from .bnb import bnb_nf4_fake_quant

        return bnb_nf4_fake_quant(w, blocksize=self.blocksize)

    def bit_formats(self) -> tuple[str, ...]:
        """The ``format=`` values :meth:`stored_bits_per_param` accepts for this scheme (``"gptq"`` only for INT
        row groups: the GPTQ checkpoint cannot store tiles or NF codes)."""
        if self.kind == "int" and self.group_size is not None:
            return BIT_FORMATS
        return BIT_FORMATS[:2]

    def stored_bits_per_param(self, d_out: int, d_in: int, format: str = "deployed") -> float:
        """Bits per weight of a ``(d_out, d_in)`` layer in the given storage ``format`` (table in the module
        docstring):

        - ``"deployed"`` (default): the format a user deploys: INT with fp16 scale and fp16 float zero per block
          (``k + 32/g``), own NF with fp32 absmax per block, bnb-nf4 as bitsandbytes stores it;
        - ``"working"``: what the module from ``make_linear`` holds in memory (the suite's fp32 working
          copies: densely packed codes plus float32 scales and zeros / absmax; bnb-nf4 as stored);
        - ``"gptq"``: the GPTQ checkpoint of :mod:`methods.quant.export` (INT row groups only): ``k`` bits per
          code, fp16 scale and k-bit packed integer zero per group, ``k + (16 + k)/g``.

        Constant lookup tables (codebooks) are not counted."""
        if format not in BIT_FORMATS:
            raise ConfigError(f"format={format!r} is not a bits-per-weight format; use one of "
                              f"{', '.join(repr(f) for f in BIT_FORMATS)}.{did_you_mean(format, BIT_FORMATS)}")
        if format not in self.bit_formats():
            raise ConfigError(
                f"format='gptq' (the packed-integer-zero GPTQ checkpoint) exists for kind='int' with row groups "
                f"(group_size) only, not for {self.label()}; use format='deployed' or 'working'."
            )
        numel = d_out * d_in
        if self.kind == "bnb-nf4":
            return linear4bit_stored_bits(d_out, d_in, self.blocksize) / numel
        if self.kind == "int":
            self.check_layer("<weight>", d_out, d_in)
            to, ti = self.block()
            n_blocks = (d_out // to) * (d_in // ti)
        else:
            n_blocks = nf_num_blocks(numel, self.blocksize)
        if format == "working":
            code_bits = 8 * packed_nbytes(numel, self.bits)
            return (code_bits + (2 if self.kind == "int" else 1) * STAT_BITS * n_blocks) / numel
        code_bits = self.bits * numel
        if format == "gptq":
            return (code_bits + (GPTQ_SCALE_BITS + self.bits) * n_blocks) / numel
        if self.kind == "int":
            return (code_bits + 2 * DEPLOYED_STAT_BITS * n_blocks) / numel
        return (code_bits + NF_ABSMAX_BITS * n_blocks) / numel

    def label(self) -> str:
        """Short name, e.g. ``int4-g32``, ``int2-tile8x4``, ``nf3-b64``, ``bnb-nf4-dq-b64``."""
        if self.kind == "int":
            blk = f"g{self.group_size}" if self.group_size else f"tile{self.tile[0]}x{self.tile[1]}"
            return f"int{self.bits}-{blk}"
        if self.kind in ("nf", "fp"):
            return f"{self.kind}{self.bits}-b{self.blocksize}"
        return f"bnb-nf4-dq-b{self.blocksize}"
