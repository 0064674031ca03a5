"""Export of a (merged) INTk model in the GPTQ checkpoint layout (METHODS.md, "Export").

Per quantized linear layer ``name`` (weight ``(D_out, D_in)``, row groups of ``g`` inputs, ``G = D_in / g``)
the checkpoint holds, as AutoGPTQ / GPTQModel / transformers write and read them (``checkpoint_format="gptq"``,
the "v1" format)::

    name.qweight  int32 (D_in * bits / 32, D_out)   codes packed along the input dimension
    name.qzeros   int32 (G, D_out * bits / 32)      (integer zero - 1), packed along the output dimension
    name.scales   fp16  (G, D_out)
    name.g_idx    int32 (D_in,)                     g_idx[i] = i // g   (desc_act = False)
    name.bias     (if the layer has one)

Packing: the codes of 32 consecutive entries form one little-endian bit stream of ``bits * 32`` bits spread
over ``bits`` int32 words, entry ``k`` at bits ``k*bits .. k*bits+bits-1`` (lowest bits first). For bits 2/4/8
that is "entry ``k`` of word ``j`` at ``(k % (32/bits)) * bits``"; for 3 bits values straddle word boundaries
exactly as in AutoGPTQ's 3-bit packer. Words are stored as int32 (two's complement of the uint32 pattern).

Dequantization by a GPTQ kernel: ``w = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])`` with the
*integer* zero read back as ``stored + 1``.

What is lossy (and measured by :func:`zero_rounding_loss`, not hidden):

* zero points: the suite keeps float zeros (exact QA-LoRA / QA-HiRA merges); GPTQ stores integers, so
  ``Z = clamp(round(zero), 0, 2^k - 1)``. The codes are kept; only the zero point moves (by at most 0.5 steps,
  more where it is clamped).
* the v1 format cannot store ``Z = 0``: it stores ``Z - 1 = -1``, and GPTQModel (and so transformers/optimum)
  converts v1 to v2 on load by adding ``0x11..1`` to the packed words, so a field of all ones overflows into
  its neighbour. With ``v1_safe=True`` (default) such zeros are lifted to 1 (counted in the report); with
  ``v1_safe=False`` they are written as ``-1 & mask`` like old AutoGPTQ (which then load wrongly).
* scales are stored in fp16.

Constant groups (all codes of a row group equal, so the suite's layer dequantizes the group to one value
``c = scale * (q - zero)``: e.g. the all-zero inputs GPTQ zeroes, for which RTN/GPTQ use ``scale = 1``,
``zero = -c``) are re-encoded by :func:`gptq_layer_params`, because rounding their zero would move the whole
group (an all-zero group came back as ``1 * (0 - 1) = -1.0``): ``c == 0`` -> ``q = Z = lo``; ``c != 0`` ->
``scale = fp16(|c|)``, ``q - Z = sign(c)`` (``Z = 1``, ``q = 2`` for ``c > 0``; ``Z = 1``, ``q = 0`` for
``c < 0``; ``Z`` is never 0, so also ``v1_safe=False`` writes them readably). So ``0`` comes back as exactly
``0.0`` and ``c`` as ``fp16(c)`` (the nearest fp16 value; for ``|c| > 65504`` the step ``|q - Z|`` grows so that
the scale stays finite). A constant group that the plain rounding already reproduces at least as well (as a
reader decodes it) keeps it. Only these groups' codes change; every other group keeps its codes.

The exact merge stays exact only in a float-zero format (the suite's own QuantLinear).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ShapeError

__all__ = [
    "GPTQ_BITS",
    "pack_int32",
    "unpack_int32",
    "export_zero_points",
    "gptq_layer_params",
    "to_gptq_tensors",
    "from_gptq_tensors",
    "quant_linear_from_gptq",
    "export_gptq_checkpoint",
    "zero_rounding_loss",
]

GPTQ_BITS = (2, 3, 4, 8)
_MASK32 = 0xFFFFFFFF


def _check_bits(bits: int) -> None:
    if bits not in GPTQ_BITS:
        raise ConfigError(f"bits={bits!r} cannot be exported in the GPTQ layout; supported: {list(GPTQ_BITS)}.")


# ----------------------------------------------------------------------------------------- packing


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers ``(R, C)`` in ``[0, 2^bits)`` along dim 0 into int32 ``(R * bits / 32, C)``.

    Each run of 32 rows becomes ``bits`` words, row ``k`` of the run at bits ``k*bits ..`` of the run's
    little-endian bit stream (lowest bits first). ``R`` must be a multiple of 32 for 3 bits, of
    ``32 / bits`` otherwise.
    """
    _check_bits(bits)
    if values.dim() != 2:
        raise ShapeError(f"pack_int32 expects a 2-D tensor, got shape {tuple(values.shape)}.")
    r, c = values.shape
    per = 32 if bits == 3 else 32 // bits  # rows per packing unit
    words = bits if bits == 3 else 1
    if r % per:
        raise ShapeError(f"pack_int32: {r} rows cannot be packed with bits={bits}: need a multiple of {per}.")
    v = values.detach().to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ConfigError(f"pack_int32: values must lie in [0, {2**bits - 1}] for bits={bits}.")
    v = v.reshape(r // per, per, c)
    out = torch.zeros(r // per, words, c, dtype=torch.int64, device=values.device)
    for k in range(per):
        w, s = divmod(k * bits, 32)
        out[:, w] |= (v[:, k] << s) & _MASK32
        if s + bits > 32:
            out[:, w + 1] |= v[:, k] >> (32 - s)
    out = out.reshape(r // per * words, c)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, rows: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``(R * bits / 32, C)`` -> int64 ``(R, C)``."""
    _check_bits(bits)
    per = 32 if bits == 3 else 32 // bits
    words = bits if bits == 3 else 1
    n, c = packed.shape
    if n % words:
        raise ShapeError(f"unpack_int32: {n} packed rows are not a multiple of {words} for bits={bits}.")
    x = packed.detach().to(torch.int64) & _MASK32
    x = x.reshape(n // words, words, c)
    mask = 2**bits - 1
    out = torch.empty(n // words, per, c, dtype=torch.int64, device=packed.device)
    for k in range(per):
        w, s = divmod(k * bits, 32)
        val = x[:, w] >> s
        if s + bits > 32:
            val = val | (x[:, w + 1] << (32 - s))
        out[:, k] = val & mask
    out = out.reshape(n // words * per, c)
    if rows is not None:
        if rows != out.shape[0]:
            raise ShapeError(f"unpack_int32: expected {rows} rows, the packed tensor holds {out.shape[0]}.")
    return out


# ----------------------------------------------------------------------------------------- zeros


def export_zero_points(zero: torch.Tensor, bits: int, *, v1_safe: bool = True) -> tuple[torch.Tensor, int]:
    """Integer zero points that the GPTQ export writes: ``clamp(round(zero), lo, 2^k - 1)`` as float32.

    ``lo`` is 1 with ``v1_safe`` (the v1 format cannot store 0, see module docstring), else 0.
    Returns ``(zeros, n_lifted)`` with ``n_lifted`` the number of zeros that rounded to 0 and were lifted to 1.
    """
    maxq = 2**bits - 1
    z = torch.clamp(torch.round(zero.detach().float()), 0, maxq)
    n_lifted = 0
    if v1_safe:
        n_lifted = int((z == 0).sum())
        z = torch.clamp(z, min=1)
    return z, n_lifted


def _row_group_size(ql) -> int:
    scheme = ql.scheme
    if scheme.kind != "int":
        raise ConfigError(f"GPTQ export needs an INTk QuantLinear (kind='int'), got kind={scheme.kind!r}.")
    to, ti = scheme.block()
    if to != 1:
        raise ConfigError(
            f"GPTQ checkpoints store row groups (1, g) only; this layer uses 2-D tiles {scheme.block()} "
            f"(QA-HiRA reference reading). Keep it in the suite's own QuantLinear format instead."
        )
    return ti


# ----------------------------------------------------------------------------------------- layers

_FP16_MAX = 65504.0


@torch.no_grad()
def gptq_layer_params(quant_linear, *, v1_safe: bool = True) -> dict:
    """What the GPTQ export writes for one row-group INT QuantLinear, unpacked (module docstring).

    Returns ``{"codes": int64 (D_out, D_in), "scales": float16 (D_out, G), "zeros": int64 (D_out, G)`` (the
    integer zero, ``qzeros`` holds ``zeros - 1``), ``"reencoded": bool (D_out, G)`` (constant groups written
    with their own scale / zero / codes), ``"n_zero_lifted"`` (other groups whose zero rounded to 0 and was
    lifted to 1), ``"n_constant_reencoded"``}. The dequantized export is
    ``scales.float() * (codes - zeros)`` per group."""
    g = _row_group_size(quant_linear)
    bits = quant_linear.scheme.bits
    _check_bits(bits)
    if quant_linear.scale_delta is not None:
        raise ConfigError("GPTQ export: merge the PEQA scale_delta first (QuantLinear.merge_scale_delta()).")
    d_out, d_in = quant_linear.out_features, quant_linear.in_features
    n_groups = d_in // g
    maxq, lo = 2**bits - 1, (1 if v1_safe else 0)  # lo: the smallest zero written for a non-constant group
    codes = quant_linear.codes().to(torch.int64)  # (D_out, D_in)
    z_round = torch.clamp(torch.round(quant_linear.zeros.detach().float()), 0, maxq)  # before the v1 lift
    zeros = torch.clamp(z_round, min=lo).to(torch.int64)  # = export_zero_points(...)[0]
    scales = quant_linear.scales.detach().float().to(torch.float16)

    # constant groups: every code of the (row, group) equal -> the layer's value there is one constant c
    cg = codes.view(d_out, n_groups, g)
    const = (cg == cg[..., :1]).all(dim=-1)
    reencoded = torch.zeros_like(const)
    if const.any():
        q0 = cg[..., 0]
        c = (quant_linear.scales.float() * (q0.float() - quant_linear.zeros.float()))  # as int_dequantize
        # what the plain rounding gives back, as read (a v1 zero of 0 is stored as -1 & mask, read as 2^k)
        z_read = torch.where(zeros == 0, torch.full_like(zeros, maxq + 1), zeros)
        plain = scales.float() * (q0 - z_read).float()
        # q - Z = sign(c) * step, scale = fp16(|c| / step); step 1 unless |c| / step would overflow fp16; Z >= 1
        step = torch.clamp(torch.ceil(c.abs() / _FP16_MAX), min=1, max=maxq - 1)
        s_c = torch.clamp(c.abs() / step, max=_FP16_MAX).to(torch.float16)
        one = torch.ones_like(step)
        z_c = torch.where(c < 0, step, one).to(torch.int64)  # c > 0: Z = 1, q = 1 + step; c < 0: Z = step, q = 0
        q_c = torch.where(c > 0, 1 + step, torch.where(c < 0, 0 * step, one)).to(torch.int64)
        keep_scale = torch.isfinite(scales.float()) & (scales.float() > 0)
        s_c = torch.where(c == 0, torch.where(keep_scale, scales, torch.ones_like(scales)), s_c)
        new = s_c.float() * (q_c - z_c).float()
        reencoded = const & ((new - c).abs() < (plain - c).abs())
        if reencoded.any():
            zeros = torch.where(reencoded, z_c, zeros)
            scales = torch.where(reencoded, s_c, scales)
            cg = torch.where(reencoded[..., None], q_c[..., None].expand_as(cg), cg)
            codes = cg.reshape(d_out, d_in)
    n_lifted = int(((z_round == 0) & ~reencoded).sum()) if v1_safe else 0
    return {"codes": codes, "scales": scales, "zeros": zeros, "reencoded": reencoded,
            "n_zero_lifted": n_lifted, "n_constant_reencoded": int(reencoded.sum())}


@torch.no_grad()
def to_gptq_tensors(quant_linear, *, v1_safe: bool = True) -> dict[str, torch.Tensor]:
    """GPTQ tensors (``qweight``, ``qzeros``, ``scales``, ``g_idx`` and ``bias`` if any) of a row-group INT
    :class:`~methods.quant.linear.QuantLinear`: zeros rounded as :func:`export_zero_points`, constant groups
    re-encoded exactly (:func:`gptq_layer_params`)."""
    g = _row_group_size(quant_linear)
    bits = quant_linear.scheme.bits
    _check_bits(bits)
    if quant_linear.scale_delta is not None:
        raise ConfigError("to_gptq_tensors: merge the PEQA scale_delta first (QuantLinear.merge_scale_delta()).")
    return _gptq_tensors(quant_linear, gptq_layer_params(quant_linear, v1_safe=v1_safe), g)


def _gptq_tensors(quant_linear, p: dict, g: int) -> dict[str, torch.Tensor]:
    bits = quant_linear.scheme.bits
    d_out, d_in = quant_linear.out_features, quant_linear.in_features
    codes = p["codes"]  # (D_out, D_in)
    stored = (p["zeros"] - 1) & (2**bits - 1)  # (D_out, G)
    out = {
        "qweight": pack_int32(codes.t().contiguous(), bits),
        # stored is (D_out, G): pack along D_out, then (G, D_out * bits / 32)
        "qzeros": pack_int32(stored.contiguous(), bits).t().contiguous(),
        "scales": p["scales"].t().contiguous(),
        "g_idx": (torch.arange(d_in, dtype=torch.int32) // g).to(torch.int32),
    }
    if quant_linear.bias is not None:
        out["bias"] = quant_linear.bias.detach().clone()
    assert out["qweight"].shape == (d_in * bits // 32, d_out)
    return out


def from_gptq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                      bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpack GPTQ (v1) tensors to the suite's layout: ``(codes uint8 (D_out, D_in), scale float32 (D_out, G),
    zero float32 (D_out, G))`` with ``zero = stored + 1`` (integer valued)."""
    _check_bits(bits)
    d_out = qweight.shape[1]
    d_in = qweight.shape[0] * 32 // bits
    n_groups = scales.shape[0]
    if tuple(scales.shape) != (n_groups, d_out) or qzeros.shape[0] != n_groups:
        raise ShapeError(
            f"from_gptq_tensors: inconsistent shapes qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}."
        )
    if d_in % n_groups:
        raise ShapeError(f"from_gptq_tensors: D_in={d_in} is not divisible by the {n_groups} groups.")
    g = d_in // n_groups
    if not torch.equal(g_idx.to(torch.int64), torch.arange(d_in, dtype=torch.int64) // g):
        raise ConfigError("from_gptq_tensors: g_idx is not i // group_size (desc_act / act-order checkpoints are "
                          "not supported here).")
    codes = unpack_int32(qweight, bits).t().contiguous().to(torch.uint8)  # (D_out, D_in)
    stored = unpack_int32(qzeros.t().contiguous(), bits)  # (D_out, G)
    zero = (stored + 1).to(torch.float32).contiguous()
    scale = scales.to(torch.float32).t().contiguous()
    return codes, scale, zero


def quant_linear_from_gptq(tensors: dict, bits: int, group_size: int):
    """A QuantLinear (float32 scales, integer-valued zeros) from a layer's GPTQ tensors."""
    from .linear import QuantLinear
    from .scheme import QuantScheme

    codes, scale, zero = from_gptq_tensors(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                                           tensors["g_idx"], bits)
    scheme = QuantScheme("int", bits, group_size=group_size)
    return QuantLinear.from_quantized(codes, scheme, scales=scale, zeros=zero, bias=tensors.get("bias"))


# ----------------------------------------------------------------------------------------- model


def _quant_linears(model: nn.Module) -> dict:
    from .linear import QuantLinear

    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def export_gptq_checkpoint(model: nn.Module, out_dir: str | Path, bits: int, group_size: int, *,
                           dtype: torch.dtype | None = torch.float16, v1_safe: bool = True) -> dict:
    """Write ``model.safetensors`` + ``config.json`` (with ``quantization_config``) in the GPTQ layout.

    Every :class:`QuantLinear` of the model (all must be INT ``bits``, row groups of ``group_size``) is written
    as GPTQ tensors; every other parameter / buffer of the state dict as is, cast to ``dtype`` when floating
    (``None`` keeps it). Tensors that share storage (tied embeddings) are written once. Returns a summary
    ``{"layers": n, "n_zero_lifted": n, "n_constant_groups": n, "path": ...}`` (``n_constant_groups``: constant
    groups re-encoded exactly, :func:`gptq_layer_params`).
    """
    from safetensors.torch import save_file

    _check_bits(bits)
    qls = _quant_linears(model)
    if not qls:
        raise ConfigError("export_gptq_checkpoint: the model has no QuantLinear layers; quantize it first.")
    for name, ql in qls.items():
        if ql.scheme.kind != "int" or ql.scheme.bits != bits or ql.scheme.block() != (1, group_size):
            raise ConfigError(
                f"export_gptq_checkpoint: layer {name} is {ql.scheme.label()}, but the checkpoint is declared "
                f"as int{bits}-g{group_size}; all quantized layers must share bits and group_size."
            )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    n_lifted = n_const = 0
    for name, ql in qls.items():
        p = gptq_layer_params(ql, v1_safe=v1_safe)
        for key, t in _gptq_tensors(ql, p, group_size).items():
            if key == "bias" and dtype is not None:
                t = t.to(dtype)
            tensors[f"{name}.{key}"] = t.contiguous()
        n_lifted += p["n_zero_lifted"]
        n_const += p["n_constant_reencoded"]
    q_prefixes = tuple(f"{n}." for n in qls)
    seen_ptrs = {}
    for key, t in model.state_dict().items():
        if key.startswith(q_prefixes):
            continue
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ptr in seen_ptrs:
            continue  # tied weight, re-tied by transformers on load
        seen_ptrs[ptr] = key
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.contiguous().clone()
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    if dtype is not None:
        cfg["torch_dtype"] = str(dtype).replace("torch.", "")
        cfg["dtype"] = cfg["torch_dtype"]
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": False,
        "true_sequential": True,
        "checkpoint_format": "gptq",
        "meta": {"quantizer": ["qftbench"], "zero_points": "rounded from float zeros (lossy; see "
                 "zero_rounding_loss)", "n_zero_lifted_to_1": n_lifted,
                 "n_constant_groups": n_const,
                 "constant_groups": "groups with one value c re-encoded as scale=fp16(|c|), q-zero=sign(c)"},
    }
    # the quantized modules, if not every linear of the decoder blocks is quantized
    lin_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    block_lins = {n for n in lin_names if ".layers." in n}
    if block_lins:
        cfg["quantization_config"]["modules_in_block_to_quantize"] = [
            sorted({n.split(".layers.", 1)[1].split(".", 1)[1] for n in qls if ".layers." in n})
        ]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    return {"layers": len(qls), "n_zero_lifted": n_lifted, "n_constant_groups": n_const, "path": str(out_dir)}


def _ppl_and_logits(model: nn.Module, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(loss.item()), logits


@torch.no_grad()
def zero_rounding_loss(model: nn.Module, eval_input_ids: torch.Tensor, *, v1_safe: bool = True) -> dict:
    """Loss from storing the model's INT zero points as integers (GPTQ export), on ``eval_input_ids``.

    Compares the model as is (float zeros) with the same model whose zeros are ``export_zero_points(...)``
    (round, clamp to ``[0, 2^k-1]``, lift 0 to 1 with ``v1_safe``), codes and scales unchanged except in the
    constant groups that the export re-encodes (:func:`gptq_layer_params`: their codes, zero and fp16 scale are
    set as written); and, in the ``*_export`` entries, additionally with fp16 scales everywhere (everything the
    GPTQ export changes: the ``*_export`` model dequantizes like the exported checkpoint). Layers that the
    export cannot write (2-D tiles) only get their zeros rounded. ``max_abs_dzero`` is taken over the groups
    whose codes are kept. The model is restored afterwards.

    Returns ``{"max_abs_dlogit", "ppl_float_zeros", "ppl_rounded_zeros", "max_abs_dzero", "n_zero_lifted",
    "n_constant_groups", "max_abs_dlogit_export", "ppl_export", "n_layers"}``.
    """
    from .packing import pack

    ids = torch.as_tensor(eval_input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.shape[-1] < 2:
        raise ConfigError("zero_rounding_loss: eval_input_ids needs at least 2 tokens per row.")
    qls = {n: m for n, m in _quant_linears(model).items() if m.scheme.kind == "int"}
    if not qls:
        raise ConfigError("zero_rounding_loss: the model has no INT QuantLinear layers.")
    ids = ids.to(next(model.parameters(), next(model.buffers())).device)
    was_training = model.training
    model.eval()
    saved = {n: (m.zeros.clone(), m.scales.clone(), m.qweight.clone()) for n, m in qls.items()}
    try:
        ppl_f, logits_f = _ppl_and_logits(model, ids)
        n_lifted, n_const, max_dz = 0, 0, 0.0
        export_scales = {}
        for n, m in qls.items():
            if m.scheme.block()[0] == 1 and m.scheme.bits in GPTQ_BITS and m.scale_delta is None:
                p = gptq_layer_params(m, v1_safe=v1_safe)
                z, k, kept = p["zeros"].float(), p["n_zero_lifted"], ~p["reencoded"]
                n_const += p["n_constant_reencoded"]
                export_scales[n] = p["scales"].float()
                m.qweight.copy_(pack(p["codes"].to(torch.uint8), m.scheme.bits))
                m.scales.copy_(torch.where(p["reencoded"], export_scales[n], m.scales))
            else:
                z, k = export_zero_points(m.zeros, m.scheme.bits, v1_safe=v1_safe)
                kept = torch.ones_like(z, dtype=torch.bool)
                export_scales[n] = m.scales.to(torch.float16).float()
            n_lifted += k
            if kept.any():
                max_dz = max(max_dz, float((z - m.zeros)[kept].abs().max()))
            m.zeros.copy_(z)
        ppl_r, logits_r = _ppl_and_logits(model, ids)
        for n, m in qls.items():
            m.scales.copy_(export_scales[n])
        ppl_e, logits_e = _ppl_and_logits(model, ids)
    finally:
        for n, m in qls.items():
            m.zeros.copy_(saved[n][0])
            m.scales.copy_(saved[n][1])
            m.qweight.copy_(saved[n][2])
        model.train(was_training)
    return {
        "max_abs_dlogit": float((logits_r - logits_f).abs().max()),
        "ppl_float_zeros": ppl_f,
        "ppl_rounded_zeros": ppl_r,
        "max_abs_dzero": max_dz,
        "n_zero_lifted": n_lifted,
        "n_constant_groups": n_const,
        "max_abs_dlogit_export": float((logits_e - logits_f).abs().max()),
        "ppl_export": ppl_e,
        "n_layers": len(qls),
    }
