"""QuantLinear: a frozen quantized linear layer for the suite's own formats (INTk with float zeros, NFk).

Storage (all buffers, nothing trainable):

- ``qweight``: uint8 1-D, the codes of the ``(D_out, D_in)`` weight in row-major order, densely bit-packed
  (:mod:`methods.quant.packing`);
- int: ``scales``, ``zeros`` float32 of shape ``(D_out / tile_out, D_in / tile_in)``;
  ``w~ = scales * (q - zeros)`` per block (float zeros, so merges into them are exact);
- nf: ``absmax`` float32 ``(ceil(D_out * D_in / blocksize),)`` and the ``codebook`` float32 ``(2^k,)``;
- ``bias``: float32 ``(D_out,)`` or None.

These float32 statistics are the suite's working copies: ``scheme.stored_bits_per_param(..., format="working")``
counts them; the reported (deployed) bits per weight count fp16 scales and zeros (:mod:`methods.quant.scheme`).

The statistics stay float32 whatever ``.to(dtype)`` / ``.half()`` is applied to the module; the forward
dequantizes in the compute dtype (``compute_dtype`` if given, else the input's dtype).

PEQA: :meth:`QuantLinear.enable_scale_training` adds the only trainable parameter a QuantLinear can have,
``scale_delta`` (int kind), so that the effective scale is ``scales + scale_delta``;
:meth:`QuantLinear.merge_scale_delta` folds it into ``scales``. Setting the attribute ``scale_delta_disabled``
to True runs the layer with the frozen ``scales`` (used by ``methods.adapter.disabled_adapters``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ShapeError
from .intk import int_dequantize, int_quantize
from .nf import codebook, nf_num_blocks, nf_quantize
from .packing import pack, packed_nbytes, unpack
from .scheme import QuantScheme

_FLOAT32_BUFFERS = ("scales", "zeros", "absmax", "codebook", "bias")


class QuantLinear(nn.Module):
    #: cache the dequantized frozen weight between forwards: "auto" (on the CPU, where dequantizing every
    #: call dominates the step time; on a GPU the weight is dequantized per call and never held), True, False
    CACHE_DEQUANTIZED = "auto"

    """Frozen quantized linear layer; ``y = x W~ᵀ + b`` with ``W~`` dequantized on the fly."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, bias: bool = False,
                 compute_dtype: torch.dtype | None = None, *, name: str = "<QuantLinear>"):
        super().__init__()
        if not isinstance(scheme, QuantScheme):
            raise ConfigError(f"scheme={scheme!r} must be a QuantScheme, e.g. QuantScheme('int', 4, group_size=32).")
        if scheme.kind == "bnb-nf4":
            raise ConfigError(
                "QuantLinear does not store kind='bnb-nf4'; use methods.quant.make_linear(scheme, linear) (a bitsandbytes "
                "Linear4bit) or kind='nf' with bits=4 for the suite's own NF4."
            )
        scheme.check_layer(name, out_features, in_features)
        self.in_features = in_features
        self.out_features = out_features
        self.scheme = scheme
        self.compute_dtype = compute_dtype
        numel = in_features * out_features
        self.register_buffer("qweight", torch.zeros(packed_nbytes(numel, scheme.bits), dtype=torch.uint8))
        if scheme.kind == "int":
            to, ti = scheme.block()
            shape = (out_features // to, in_features // ti)
            self.register_buffer("scales", torch.ones(shape, dtype=torch.float32))
            self.register_buffer("zeros", torch.zeros(shape, dtype=torch.float32))
        else:
            self.register_buffer("absmax", torch.zeros(nf_num_blocks(numel, scheme.blocksize), dtype=torch.float32))
            self.register_buffer("codebook", codebook(scheme.kind, scheme.bits))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32) if bias else None)
        self.scale_delta = None
        self.scale_delta_disabled = False  # True: run with the frozen scales (adapter.disabled_adapters)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, compute_dtype: torch.dtype | None = None, *,
                    name: str = "<linear>") -> "QuantLinear":
        """Round-to-nearest quantization of ``linear`` (weight and bias are copied, ``linear`` is unchanged)."""
        w = linear.weight.detach()
        has_bias = linear.bias is not None
        mod = cls(linear.in_features, linear.out_features, scheme, bias=has_bias, compute_dtype=compute_dtype,
                  name=name)
        if scheme.kind == "int":
            codes, scale, zero = int_quantize(w.float(), scheme.bits, scheme.block())
            mod._set(codes, scales=scale, zeros=zero)
        else:
            codes, absmax = nf_quantize(w, scheme.bits, scheme.blocksize, scheme.kind)
            mod._set(codes, absmax=absmax)
        if has_bias:
            mod.bias.copy_(linear.bias.detach().float())
        return mod.to(w.device)

    @classmethod
    def from_quantized(cls, codes: torch.Tensor, scheme: QuantScheme, *, scales: torch.Tensor | None = None,
                       zeros: torch.Tensor | None = None, absmax: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None,
                       name: str = "<quantized>") -> "QuantLinear":
        """Build from given codes ``(D_out, D_in)`` and statistics (int: scales + zeros; nf: absmax)."""
        if codes.dim() != 2:
            raise ShapeError(f"codes must be a (D_out, D_in) matrix, got shape {tuple(codes.shape)}.")
        d_out, d_in = codes.shape
        mod = cls(d_in, d_out, scheme, bias=bias is not None, compute_dtype=compute_dtype, name=name)
        if scheme.kind == "int":
            if scales is None or zeros is None:
                raise ConfigError("from_quantized with kind='int' needs both scales= and zeros= (per block).")
            mod._set(codes, scales=scales, zeros=zeros)
        else:
            if absmax is None:
                raise ConfigError("from_quantized with kind='nf' needs absmax= (one per block).")
            mod._set(codes, absmax=absmax)
        if bias is not None:
            if tuple(bias.shape) != (d_out,):
                raise ShapeError(f"bias has shape {tuple(bias.shape)}, expected ({d_out},).")
            mod.bias.copy_(bias.detach().float())
        return mod.to(codes.device)

    def _set(self, codes: torch.Tensor, **stats: torch.Tensor) -> None:
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise ShapeError(
                f"codes have shape {tuple(codes.shape)}, expected (out={self.out_features}, in={self.in_features})."
            )
        if codes.numel() and int(codes.max()) >= 2**self.scheme.bits:
            raise ConfigError(
                f"codes reach {int(codes.max())}, but bits={self.scheme.bits} allows at most {2**self.scheme.bits - 1}."
            )
        with torch.no_grad():
            self.qweight.copy_(pack(codes.to(torch.uint8), self.scheme.bits))
            for key, val in stats.items():
                buf = getattr(self, key)
                if tuple(val.shape) != tuple(buf.shape):
                    raise ShapeError(f"{key} has shape {tuple(val.shape)}, expected {tuple(buf.shape)} "
                                     f"for scheme {self.scheme.label()} and weight ({self.out_features}, "
                                     f"{self.in_features}).")
                buf.copy_(val.detach().float())

    # ------------------------------------------------------------------ weights
    def codes(self) -> torch.Tensor:
        """uint8 codes ``(D_out, D_in)``."""
        n = self.out_features * self.in_features
        return unpack(self.qweight, self.scheme.bits, n).reshape(self.out_features, self.in_features)

    def effective_scales(self) -> torch.Tensor:
        """``scales + scale_delta`` (int kind); differentiable in ``scale_delta``. Just ``scales`` without a
        ``scale_delta`` or while ``scale_delta_disabled`` is set."""
        if self.scheme.kind != "int":
            raise ConfigError(f"scheme kind {self.scheme.kind!r} has no scales; only kind='int' does.")
        if self.scale_delta is None or self.scale_delta_disabled:
            return self.scales
        return self.scales + self.scale_delta

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized weight ``(D_out, D_in)`` computed in float32 and cast to ``dtype``."""
        q = self.codes()
        if self.scheme.kind == "int":
            return int_dequantize(q, self.effective_scales(), self.zeros, self.scheme.block(), dtype=dtype)
        flat = self.codebook[q.reshape(-1).long()]
        scale = self.absmax.repeat_interleave(self.scheme.blocksize)[: flat.numel()]
        return (flat * scale).reshape(self.out_features, self.in_features).to(dtype)

    def _cache_ok(self) -> bool:
        mode = QuantLinear.CACHE_DEQUANTIZED
        return bool(mode) if mode != "auto" else self.qweight.device.type == "cpu"

    def _cached_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized weight for the forward, cached on the CPU (see ``CACHE_DEQUANTIZED``).

        The cache is keyed on the version counters of the codes and statistics, so any in-place change (a
        merge, ``load_state_dict``) invalidates it. With a trainable ``scale_delta`` (PEQA) only ``Q − Z`` is
        cached and the (differentiable) scales are applied on every call."""
        if not self._cache_ok():
            return self.dequantize(dtype)
        stats = [self.qweight] + ([self.scales, self.zeros] if self.scheme.kind == "int" else [self.absmax])
        key = (dtype, tuple((t.data_ptr(), t._version) for t in stats))
        peqa = self.scheme.kind == "int" and self.scale_delta is not None and not self.scale_delta_disabled
        if peqa:
            key = key + ("q-z",)
        cache = self.__dict__.get("_wcache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                if peqa:
                    to, ti = self.scheme.block()
                    q = self.codes().float().view(self.out_features // to, to, self.in_features // ti, ti)
                    val = q - self.zeros.float()[:, None, :, None]
                else:
                    val = self.dequantize(dtype)
            self.__dict__["_wcache"] = cache = (key, val)
        if not peqa:
            return cache[1]
        s = self.effective_scales()[:, None, :, None]
        return (s * cache[1]).reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        dtype = self.compute_dtype or x.dtype
        x = x.to(dtype)
        w = self._cached_weight(dtype)
        b = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x, w, b).to(in_dtype)

    # ------------------------------------------------------------------ PEQA
    def enable_scale_training(self) -> nn.Parameter:
        """Add the trainable ``scale_delta`` (float32 zeros, shape of ``scales``); returns it."""
        if self.scheme.kind != "int":
            raise ConfigError(
                f"scale training (PEQA) needs kind='int' scales; this layer is kind={self.scheme.kind!r}. "
                f"Use QuantScheme('int', bits, group_size=...)."
            )
        if self.scale_delta is None:
            self.scale_delta = nn.Parameter(torch.zeros_like(self.scales))
        return self.scale_delta

    def merge_scale_delta(self) -> None:
        """Fold ``scale_delta`` into ``scales`` and remove the parameter (no-op without one)."""
        if self.scale_delta is None:
            return
        with torch.no_grad():
            self.scales.add_(self.scale_delta.detach().to(self.scales))
        del self.scale_delta
        self.scale_delta = None

    # ------------------------------------------------------------------ plumbing
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "scale_delta" in state_dict and self.scale_delta is None and self.scheme.kind == "int":
            self.enable_scale_training()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        # keep statistics (and scale_delta) in float32 under .to(dtype) / .half() / .bfloat16()
        keep = {k: self._buffers[k] for k in _FLOAT32_BUFFERS if self._buffers.get(k) is not None}
        delta = None if self.scale_delta is None else self.scale_delta.data
        super()._apply(fn, recurse)
        for k, old in keep.items():
            new = self._buffers[k]
            if new.dtype != torch.float32:
                self._buffers[k] = old.to(new.device)
        if delta is not None and self.scale_delta.dtype != torch.float32:
            self.scale_delta.data = delta.to(self.scale_delta.device)
        return self

    def extra_repr(self) -> str:
        shape = (self.out_features, self.in_features)
        s = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
             f"scheme={self.scheme.label()}, "
             f"bits_per_param={self.scheme.stored_bits_per_param(*shape):.3f} (deployed), "
             f"working_bits_per_param={self.scheme.stored_bits_per_param(*shape, format='working'):.3f} "
             f"(fp32 statistics in memory)")
        if self.compute_dtype is not None:
            s += f", compute_dtype={self.compute_dtype}"
        if self.scale_delta is not None:
            s += ", scale_training=True"
        return s
