"""Quantizers (METHODS.md, "Quantizers"): NFk codebook vs bitsandbytes, INTk RTN vs an independent reference,
packing, QuantLinear, bitsandbytes NF4 + double quantization, QuantScheme errors."""
from __future__ import annotations

import math
import re
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.errors import ConfigError, ShapeError
from methods.quant import (
    QuantLinear, QuantScheme, bnb_nf4_fake_quant, dequantize_linear4bit, dequantize_module, int_quantize,
    is_quantized, make_linear, codebook, nf_codebook, nf_dequantize, nf_fake_quant, nf_quantize, pack, packed_nbytes, to_linear4bit, unpack,
)

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402


def rand_w(d_out, d_in, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_out, d_in, generator=g) * 0.05).to(dtype)


def linear_from(w, bias=True, seed=1):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.randn(w.shape[0], generator=torch.Generator().manual_seed(seed)) * 0.1)
    return lin


def bnb_unpack_nf4(packed, numel):
    """bitsandbytes packs two 4-bit codes per byte, the first code in the high nibble."""
    p = packed.reshape(-1)
    codes = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)
    return codes[:numel]


# ---------------------------------------------------------------------------------------------- NFk codebook

def reference_codebook(bits):
    """Independent construction with the standard library's normal quantile function."""
    nd = statistics.NormalDist()
    off, half = 0.9677083, 2 ** (bits - 1)

    def lin(n):
        return [off + (0.5 - off) * i / (n - 1) for i in range(n)]

    pos = [nd.inv_cdf(p) for p in lin(half + 1)[:-1]]
    neg = [-nd.inv_cdf(p) for p in lin(half)[:-1]]
    v = sorted(pos + [0.0] + neg)
    return torch.tensor([x / max(v) for x in v], dtype=torch.float64)


def test_nf4_codebook_equals_bitsandbytes_table():
    ours = nf_codebook(4)
    theirs = BF.get_4bit_type("nf4", device="cpu").float()
    assert ours.dtype == torch.float32 and ours.shape == (16,)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-7)  # float32 precision (bnb used float32 linspace)


def test_fp4_codebook_is_e2m1_and_equals_bitsandbytes_table():
    """FP4 (QLoRA's Table 2): sign, 2 exponent bits, 1 mantissa bit, bias 1, the subnormal 001 = 0.0625 (of 12):
    magnitudes 0, 0.0625, 2, 3, 4, 6, 8, 12 over 12, both signs; the same 16 values as bitsandbytes' table."""
    e2m1 = sorted(s * m / 12 for s in (1, -1) for m in [0, 0.0625] + [2 ** (e - 1) * (1 + f / 2)
                                                                      for e in (2, 3, 4) for f in (0, 1)])
    ours = codebook("fp", 4)
    assert ours.shape == (16,) and torch.all(ours[1:] >= ours[:-1])
    torch.testing.assert_close(ours.double(), torch.tensor(e2m1, dtype=torch.float64), rtol=0, atol=1e-7)
    assert torch.equal(ours, BF.get_4bit_type("fp4", device="cpu").float().sort().values)


@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (96, 96)])
def test_fp4_quantization_equals_bitsandbytes(shape):
    """The own FP4 quantizer dequantizes to exactly what bitsandbytes' quantize_4bit(quant_type='fp4',
    no double quantization) does, and its error on normal weights is above NF4's (QLoRA's Table 2 ordering)."""
    w = rand_w(*shape, seed=sum(shape) + 1)
    packed, qs = BF.quantize_4bit(w, blocksize=64, quant_type="fp4", compress_statistics=False)
    from bitsandbytes.backends.default import ops

    fn = getattr(ops._dequantize_4bit_compute, "__wrapped__", ops._dequantize_4bit_compute)
    theirs = fn(packed.reshape(-1), qs.absmax, BF.get_4bit_type("fp4", device="cpu"), 64, shape, torch.float32)
    ours = QuantScheme("fp", 4).fake_quant(w)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    err = {k: float((w - QuantScheme(k, 4).fake_quant(w)).norm() / w.norm()) for k in ("fp", "nf")}
    assert err["nf"] < err["fp"]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_codebook_shape_and_values(bits):
    cb = nf_codebook(bits)
    assert cb.dtype == torch.float32 and cb.shape == (2**bits,)
    assert torch.all(cb[1:] > cb[:-1])
    assert cb[0] == -1 and cb[-1] == 1
    assert (cb == 0).sum() == 1 and cb[2 ** (bits - 1) - 1] == 0  # one more positive than negative value
    torch.testing.assert_close(cb.double(), reference_codebook(bits), rtol=0, atol=1e-7)


def bnb_reference_dequantize_4bit(packed, absmax, shape):
    """bitsandbytes' own plain-torch dequantization (default backend), not its native CPU kernel, which is wrong
    for in_features % 16 == 0 but % 64 != 0 in bitsandbytes 0.50.2."""
    from bitsandbytes.backends.default import ops

    fn = getattr(ops._dequantize_4bit_compute, "__wrapped__", ops._dequantize_4bit_compute)  # skip torch.compile
    return fn(packed.reshape(-1), absmax, BF.get_4bit_type("nf4", device="cpu"), 64, shape, torch.float32)


@pytest.mark.parametrize("shape", [(64, 128), (33, 70), (7, 9), (3, 5), (96, 96), (2, 160)])
def test_nf4_codes_and_dequant_equal_bitsandbytes(shape):
    w = rand_w(*shape, seed=sum(shape))
    codes, absmax = nf_quantize(w, 4, blocksize=64)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(w.numel() / 64),)
    packed, qs = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    assert not qs.nested and qs.quant_type == "nf4"
    assert torch.equal(codes.reshape(-1), bnb_unpack_nf4(packed, w.numel()))
    assert torch.equal(absmax, qs.absmax)
    ours = nf_dequantize(codes, absmax, 4, 64)
    theirs = bnb_reference_dequantize_4bit(packed, qs.absmax, shape)
    assert ours.shape == w.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    if shape[1] % 64 == 0 or shape[1] % 16:  # shapes where bnb's native CPU kernel is right
        torch.testing.assert_close(ours, BF.dequantize_4bit(packed, qs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("blocksize", [64, 48])
def test_nf_quantize_picks_nearest_value_per_block(bits, blocksize):
    w = rand_w(20, 30, seed=bits)  # 600 weights: a partial last block for both block sizes
    codes, absmax = nf_quantize(w, bits, blocksize)
    cb = nf_codebook(bits).double()
    flat = w.reshape(-1).double()
    for b in range(absmax.numel()):
        blk = flat[b * blocksize:(b + 1) * blocksize]
        assert absmax[b].item() == pytest.approx(blk.abs().max().item(), rel=1e-7)
        scaled = blk / absmax[b].double()
        dist = (scaled[:, None] - cb[None]).abs()
        chosen = dist.gather(1, codes.reshape(-1)[b * blocksize:(b + 1) * blocksize].long()[:, None])[:, 0]
        assert torch.all(chosen <= dist.min(dim=1).values + 1e-6)
    deq = nf_dequantize(codes, absmax, bits, blocksize)
    assert deq.reshape(-1)[:blocksize].unique().numel() <= 2**bits
    torch.testing.assert_close(nf_fake_quant(w, bits, blocksize), deq)
    # the absmax of each block is represented exactly (codebook holds +-1)
    assert torch.all((deq.reshape(-1).abs().max() - w.abs().max()).abs() < 1e-7)


def test_nf_zero_block_dequantizes_to_zero():
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)
    codes, absmax = nf_quantize(w, 3)
    assert absmax[0] == 0
    assert torch.all(nf_dequantize(codes, absmax, 3)[0] == 0)


# ---------------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 13, 1001])
def test_pack_roundtrip(bits, numel):
    g = torch.Generator().manual_seed(numel * 10 + bits)
    codes = torch.randint(0, 2**bits, (numel,), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(numel * bits / 8) == packed_nbytes(numel, bits)
    assert torch.equal(unpack(packed, bits, numel), codes)
    # any shape
    if numel % 7 == 0:
        assert torch.equal(unpack(pack(codes.reshape(7, -1), bits), bits, numel), codes)


@pytest.mark.parametrize("bits,codes,expected", [
    (4, [1, 2, 15], [0x21, 0x0F]),
    (2, [1, 2, 3, 0, 3], [0b00111001, 0b11]),
    (3, [1, 2, 3, 4, 5, 6, 7, 0], [0b11010001, 0b01011000, 0b00011111]),
    (8, [200, 3], [200, 3]),
])
def test_pack_bit_order_lowest_bits_first(bits, codes, expected):
    assert pack(torch.tensor(codes, dtype=torch.uint8), bits).tolist() == expected


def test_pack_rejects_out_of_range_codes_and_bits():
    with pytest.raises(ConfigError, match=r"codes must be < 2\^2=4"):
        pack(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(ConfigError, match=r"bits=5 cannot be packed; supported: \[2, 3, 4, 8\]"):
        pack(torch.tensor([1], dtype=torch.uint8), 5)


# ---------------------------------------------------------------------------------------------- INTk RTN

def reference_int_rtn(w, bits, tile):
    """METHODS.md formula, block by block, in numpy float32."""
    w = w.numpy().astype(np.float32)
    to, ti = tile
    d_out, d_in = w.shape
    codes = np.zeros(w.shape, dtype=np.uint8)
    deq = np.zeros(w.shape, dtype=np.float32)
    qmax = np.float32(2**bits - 1)
    for bo in range(d_out // to):
        for bi in range(d_in // ti):
            sl = (slice(bo * to, (bo + 1) * to), slice(bi * ti, (bi + 1) * ti))
            blk = w[sl]
            mn, mx = blk.min(), blk.max()
            scale = np.float32((mx - mn) / qmax)
            if scale == 0:
                scale = np.float32(1.0)
            zero = np.float32(-mn / scale)
            q = np.clip(np.round(blk / scale + zero), 0, qmax)
            codes[sl] = q.astype(np.uint8)
            deq[sl] = scale * (q.astype(np.float32) - zero)
    return torch.from_numpy(codes), torch.from_numpy(deq)


INT_SCHEMES = [
    dict(group_size=32), dict(group_size=16), dict(tile=(8, 4)), dict(tile=(2, 8)),
]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("blk", INT_SCHEMES, ids=lambda d: str(d))
def test_int_rtn_matches_reference(bits, blk):
    scheme = QuantScheme("int", bits, **blk)
    w = rand_w(16, 64, seed=bits)
    w[:8, :32] = 0.125  # constant blocks for every tiling: scale 1, represented exactly
    ref_codes, ref_deq = reference_int_rtn(w, bits, scheme.block())
    m = make_linear(scheme, linear_from(w))
    assert torch.equal(m.codes(), ref_codes)
    torch.testing.assert_close(m.dequantize(), ref_deq, rtol=0, atol=1e-6)
    torch.testing.assert_close(scheme.fake_quant(w), ref_deq, rtol=0, atol=1e-6)
    assert torch.equal(m.dequantize()[:8, :32], w[:8, :32])
    # error bound: half a step per block
    to, ti = scheme.block()
    step = m.scales.repeat_interleave(to, 0).repeat_interleave(ti, 1)
    assert torch.all((m.dequantize() - w).abs() <= step / 2 + 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("blk", [dict(group_size=32), dict(tile=(8, 4))], ids=["g32", "tile8x4"])
def test_int_at_most_2k_distinct_values_per_block(bits, blk):
    scheme = QuantScheme("int", bits, **blk)
    w = rand_w(32, 64, seed=7)
    deq = make_linear(scheme, linear_from(w)).dequantize()
    to, ti = scheme.block()
    blocks = deq.reshape(32 // to, to, 64 // ti, ti).permute(0, 2, 1, 3).reshape(-1, to * ti)
    counts = [b.unique().numel() for b in blocks]
    assert max(counts) <= 2**bits
    assert max(counts) > 2 ** (bits - 1)  # not degenerate: random weights use most of the grid


# ---------------------------------------------------------------------------------------------- QuantLinear

LINEAR_SCHEMES = [
    QuantScheme("int", 4, group_size=32), QuantScheme("int", 3, tile=(8, 4)), QuantScheme("int", 2, group_size=16),
    QuantScheme("int", 8, group_size=64), QuantScheme("nf", 4), QuantScheme("nf", 3),
    QuantScheme("nf", 2, blocksize=48), QuantScheme("fp", 4),
]


@pytest.mark.parametrize("scheme", LINEAR_SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ndim", [2, 3])
def test_quantlinear_forward_equals_linear_with_dequantized_weight(scheme, dtype, ndim):
    w = rand_w(48, 64, seed=3)
    lin = linear_from(w)
    m = make_linear(scheme, lin)
    assert isinstance(m, QuantLinear) and is_quantized(m)
    assert list(m.parameters()) == []
    torch.testing.assert_close(m.dequantize(), scheme.fake_quant(w), rtol=0, atol=0)
    torch.testing.assert_close(dequantize_module(m), scheme.fake_quant(w), rtol=0, atol=0)
    x = torch.randn((2, 5, 64) if ndim == 3 else (5, 64), generator=torch.Generator().manual_seed(4)).to(dtype)
    y = m(x)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], 48)
    ref = F.linear(x, scheme.fake_quant(w).to(dtype), lin.bias.detach().to(dtype))
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    # and close to the unquantized layer
    err = (m(x.float()) - lin(x.float())).abs().max() / lin(x.float()).abs().max()
    assert err < {8: 0.02, 4: 0.2, 3: 0.4, 2: 1.0}[scheme.bits]


def test_quantlinear_compute_dtype_and_float32_statistics():
    w = rand_w(16, 32)
    m = QuantLinear.from_linear(linear_from(w), QuantScheme("int", 4, group_size=16), compute_dtype=torch.bfloat16)
    x = torch.randn(3, 32)
    y = m(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x.bfloat16(), m.dequantize(torch.bfloat16), m.bias.bfloat16()).float())
    m2 = QuantLinear.from_linear(linear_from(w), QuantScheme("nf", 4)).to(torch.bfloat16)
    assert m2.absmax.dtype == m2.codebook.dtype == m2.bias.dtype == torch.float32
    m.half()
    assert m.scales.dtype == m.zeros.dtype == torch.float32
    assert m.qweight.dtype == torch.uint8


@pytest.mark.parametrize("scheme", LINEAR_SCHEMES, ids=lambda s: s.label())
@pytest.mark.parametrize("bias", [True, False])
def test_quantlinear_state_dict_roundtrip(scheme, bias):
    m = make_linear(scheme, linear_from(rand_w(40, 64, seed=5), bias=bias))
    sd = m.state_dict()
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].dim() == 1
    assert sd["qweight"].numel() == packed_nbytes(40 * 64, scheme.bits)
    if scheme.kind == "int":
        to, ti = scheme.block()
        assert sd["scales"].shape == sd["zeros"].shape == (40 // to, 64 // ti)
    else:
        assert sd["absmax"].shape == (math.ceil(40 * 64 / scheme.blocksize),)
    assert ("bias" in sd) == bias
    skel = QuantLinear(64, 40, scheme, bias=bias)
    skel.load_state_dict(sd)
    assert torch.equal(skel.codes(), m.codes())
    x = torch.randn(4, 64)
    assert torch.equal(skel(x), m(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        QuantLinear(128, 40, scheme, bias=bias).load_state_dict(sd)


def test_from_quantized_equals_from_linear_and_checks_inputs():
    scheme = QuantScheme("int", 3, tile=(8, 4))
    lin = linear_from(rand_w(16, 32))
    codes, scale, zero = int_quantize(lin.weight, 3, (8, 4))
    a = QuantLinear.from_quantized(codes, scheme, scales=scale, zeros=zero, bias=lin.bias)
    b = make_linear(scheme, lin)
    assert torch.equal(a.dequantize(), b.dequantize()) and torch.equal(a.bias, b.bias)
    nf = QuantScheme("nf", 2)
    c, am = nf_quantize(lin.weight, 2)
    assert torch.equal(QuantLinear.from_quantized(c, nf, absmax=am).dequantize(), nf.fake_quant(lin.weight))
    with pytest.raises(ConfigError, match="needs both scales= and zeros="):
        QuantLinear.from_quantized(codes, scheme, scales=scale)
    with pytest.raises(ConfigError, match="needs absmax="):
        QuantLinear.from_quantized(c, nf)
    with pytest.raises(ConfigError, match="codes reach 8, but bits=3 allows at most 7"):
        QuantLinear.from_quantized(codes + 8 - codes.max(), scheme, scales=scale, zeros=zero)
    with pytest.raises(ShapeError, match=r"scales has shape \(2, 4\), expected \(2, 8\)"):
        QuantLinear.from_quantized(codes, scheme, scales=scale[:, :4], zeros=zero)


# ---------------------------------------------------------------------------------------------- PEQA scale_delta

def test_scale_delta_is_the_only_trainable_parameter_and_merges_exactly():
    scheme = QuantScheme("int", 4, group_size=16)
    lin = linear_from(rand_w(24, 32))
    m = make_linear(scheme, lin)
    scales0, zeros0, q0 = m.scales.clone(), m.zeros.clone(), m.qweight.clone()
    delta = m.enable_scale_training()
    assert [n for n, p in m.named_parameters()] == ["scale_delta"]
    assert delta.dtype == torch.float32 and delta.shape == m.scales.shape and torch.all(delta == 0)
    m.requires_grad_(True)  # buffers stay frozen whatever happens
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["scale_delta"]
    x = torch.randn(2, 3, 32, requires_grad=True)
    m(x).pow(2).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    assert all(not b.requires_grad and b.grad is None for b in m.buffers())
    # gradient matches the analytic one: d/dS of sum(y^2) where W = S*(q - z)
    with torch.no_grad():
        y = m(x)
        gW = 2 * torch.einsum("bto,bti->oi", y, x)
        qz = m.codes().float() - m.zeros.repeat_interleave(16, 1)
        expected = (gW * qz).reshape(24, 2, 16).sum(-1)
    torch.testing.assert_close(delta.grad, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        delta.add_(torch.randn_like(delta) * 1e-3)
    x = torch.randn(5, 32)
    y_before = m(x).detach()
    m.scale_delta_disabled = True  # frozen base, as methods.adapter.disabled_adapters does
    torch.testing.assert_close(m(x), F.linear(x, scheme.fake_quant(lin.weight), lin.bias.detach()))
    m.scale_delta_disabled = False
    m.merge_scale_delta()
    assert list(m.parameters()) == [] and m.scale_delta is None
    torch.testing.assert_close(m(x), y_before, rtol=0, atol=1e-6)
    assert not torch.equal(m.scales, scales0)
    assert torch.equal(m.zeros, zeros0) and torch.equal(m.qweight, q0)


def test_state_dict_with_scale_delta_loads_into_skeleton():
    scheme = QuantScheme("int", 2, tile=(8, 4))
    m = make_linear(scheme, linear_from(rand_w(16, 16)))
    with torch.no_grad():
        m.enable_scale_training().fill_(0.01)
    skel = QuantLinear(16, 16, scheme, bias=True)
    skel.load_state_dict(m.state_dict())
    assert isinstance(skel.scale_delta, nn.Parameter)
    x = torch.randn(3, 16)
    assert torch.equal(skel(x), m(x))


@pytest.mark.parametrize("scheme", [QuantScheme("nf", 4), QuantScheme("nf", 2)], ids=lambda s: s.label())
def test_scale_training_needs_int_kind(scheme):
    m = make_linear(scheme, linear_from(rand_w(8, 64)))
    with pytest.raises(ConfigError, match=r"scale training \(PEQA\) needs kind='int' scales; this layer is kind='nf'"):
        m.enable_scale_training()


# ---------------------------------------------------------------------------------------------- bitsandbytes NF4

@pytest.mark.parametrize("shape", [(96, 128), (100, 64), (64, 96)])  # 100 outputs: not a multiple of 32;
# 96 inputs: bitsandbytes' native CPU dequantization kernel is wrong there, the module must not use it
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bnb_linear4bit_is_nf4_double_quant_block64(shape, dtype):
    scheme = QuantScheme("bnb-nf4", 4)
    w = rand_w(*shape, seed=11, dtype=dtype)
    lin = linear_from(w)
    w_before = lin.weight.detach().clone()
    m = make_linear(scheme, lin)
    assert isinstance(m, bnb.nn.Linear4bit) and is_quantized(m)
    assert torch.equal(lin.weight, w_before)
    assert all(not p.requires_grad for p in m.parameters())
    qs = m.weight.quant_state
    assert qs.quant_type == "nf4" and qs.blocksize == 64
    assert qs.nested and qs.absmax.dtype == torch.uint8 and qs.state2.blocksize == 256
    assert qs.absmax.numel() == math.ceil(w.numel() / 64)
    assert tuple(qs.shape) == shape
    fq = bnb_nf4_fake_quant(w)
    assert fq.dtype == torch.float32
    torch.testing.assert_close(dequantize_linear4bit(m), fq, rtol=0, atol=0)
    torch.testing.assert_close(dequantize_module(m), scheme.fake_quant(w), rtol=0, atol=0)
    # double quantization really is applied: close to, but not the same as, plain NF4 absmax
    plain = nf_fake_quant(w, 4, 64)
    assert not torch.equal(fq, plain)
    assert (fq - plain).abs().max() < 0.02 * w.abs().max()
    err_bnb, err_plain = ((fq - w.float()).norm() / w.float().norm()), ((plain - w.float()).norm() / w.float().norm())
    assert abs(err_bnb - err_plain) < 0.05 * err_plain
    x = torch.randn(2, 3, shape[1], generator=torch.Generator().manual_seed(2)).to(dtype)
    ref = F.linear(x, fq.to(dtype), lin.bias.detach().to(dtype))
    torch.testing.assert_close(m(x), ref)  # training mode
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref)  # eval + no grad: no CPU repacking with bf16 absmax
    torch.testing.assert_close(dequantize_linear4bit(m), fq, rtol=0, atol=0)


def test_dequantize_linear4bit_reads_cpu_packed_format():
    import copy

    w = rand_w(64, 128, seed=12)
    m = to_linear4bit(linear_from(w), torch.float32)
    qs = copy.deepcopy(m.weight.quant_state)
    expected_codes = bnb_unpack_nf4(m.weight.data, w.numel()).reshape(64, 128)
    absmax = BF.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    data, qs_packed = BF._convert_weight_packed_for_cpu(m.weight.data.clone(), qs)
    m.weight.data, m.weight.quant_state = data, qs_packed
    expected = (nf_codebook(4)[expected_codes.long()] * absmax.bfloat16().float().repeat_interleave(64)
                .reshape(64, 128))
    torch.testing.assert_close(dequantize_linear4bit(m), expected, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------- storage size

@pytest.mark.parametrize("scheme,shape,expected", [
    # the deployed format: NF4 + DQ as bitsandbytes stores it (incl. the float32 offset)
    (QuantScheme("bnb-nf4", 4), (4096, 4096), 4 + 8 / 64 + 32 / (64 * 256) + 32 / 4096**2),
    # INTk: k-bit codes + fp16 scale + fp16 float zero per group: k + 32/g
    (QuantScheme("int", 4, group_size=32), (4096, 4096), 5.0),
    (QuantScheme("int", 4, group_size=128), (4096, 4096), 4.25),
    (QuantScheme("int", 3, group_size=32), (4096, 4096), 4.0),
    (QuantScheme("int", 2, group_size=32), (4096, 11008), 3.0),
    (QuantScheme("int", 3, tile=(8, 4)), (16, 8), 4.0),  # 8x4 tile = 32 weights: the same overhead as g32
    # own NFk: fp32 absmax per block (bitsandbytes' layout without double quantization)
    (QuantScheme("nf", 2, blocksize=64), (3, 7), (2 * 21 + 32) / 21),
    (QuantScheme("nf", 4, blocksize=64), (64, 64), 4.5),
])
def test_stored_bits_per_param_formula(scheme, shape, expected):
    assert scheme.stored_bits_per_param(*shape) == pytest.approx(expected, rel=1e-12)
    assert scheme.stored_bits_per_param(*shape, format="deployed") == scheme.stored_bits_per_param(*shape)


def test_stored_bits_per_param_reported_numbers():
    """The numbers the efficiency table compares, exactly."""
    b = QuantScheme("bnb-nf4", 4).stored_bits_per_param(4096, 4096)
    assert round(b, 3) == 4.127
    assert QuantScheme("int", 4, group_size=32).stored_bits_per_param(4096, 4096) == 5.0
    assert QuantScheme("int", 4, group_size=128).stored_bits_per_param(4096, 4096) == 4.25
    assert QuantScheme("int", 3, group_size=32).stored_bits_per_param(4096, 4096) == 4.0
    # the fp32 working copies, for comparison (what the old numbers counted)
    assert QuantScheme("int", 4, group_size=32).stored_bits_per_param(4096, 4096, format="working") == 6.0
    assert QuantScheme("int", 3, group_size=32).stored_bits_per_param(4096, 4096, format="working") == 5.0
    assert QuantScheme("bnb-nf4", 4).stored_bits_per_param(4096, 4096, format="working") == b


@pytest.mark.parametrize("bits,g,expected", [
    (4, 32, 4.625), (4, 128, 4.15625), (3, 32, 3.59375), (2, 32, 2.5625), (8, 32, 8.75), (3, 128, 3.1484375),
])
def test_stored_bits_per_param_gptq_format(bits, g, expected):
    """GPTQ's packed-integer-zero checkpoint: k-bit codes, fp16 scale and k-bit zero per group: k + (16 + k)/g."""
    scheme = QuantScheme("int", bits, group_size=g)
    assert scheme.stored_bits_per_param(4096, 4096, format="gptq") == expected == bits + (16 + bits) / g


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_stored_bits_per_param_gptq_counts_what_the_export_writes(bits):
    from methods.quant.export import to_gptq_tensors

    d_out, d_in = 64, 256
    scheme = QuantScheme("int", bits, group_size=32)
    ql = make_linear(scheme, linear_from(rand_w(d_out, d_in), bias=False))
    t = to_gptq_tensors(ql)
    written = sum(t[k].numel() * t[k].element_size() * 8 for k in ("qweight", "qzeros", "scales"))
    assert scheme.stored_bits_per_param(d_out, d_in, format="gptq") == written / (d_out * d_in)
    # g_idx (one int32 per input, i // g without act-order) is not counted: 32 / D_out bits per weight
    assert t["g_idx"].numel() * 32 / (d_out * d_in) == 32 / d_out


@pytest.mark.parametrize("scheme", [QuantScheme("int", 4, group_size=32), QuantScheme("int", 3, tile=(8, 4)),
                                    QuantScheme("int", 2, group_size=16)], ids=lambda s: s.label())
def test_stored_bits_per_param_deployed_counts_fp16_statistics(scheme):
    """Deployed INT: the module's codes at k bits each and its scales and float zeros cast to fp16."""
    d_out, d_in = 40, 128
    m = make_linear(scheme, linear_from(rand_w(d_out, d_in), bias=False))
    bits = scheme.bits * m.codes().numel() + sum(b.half().numel() * 16 for b in (m.scales, m.zeros))
    assert scheme.stored_bits_per_param(d_out, d_in) == pytest.approx(bits / (d_out * d_in), rel=1e-12)


@pytest.mark.parametrize("scheme", LINEAR_SCHEMES + [QuantScheme("bnb-nf4", 4)], ids=lambda s: s.label())
def test_stored_bits_per_param_counts_what_the_module_stores(scheme):
    """format='working': the suite's fp32 working copies, exactly what the module holds in memory."""
    d_out, d_in = 40, 128
    m = make_linear(scheme, linear_from(rand_w(d_out, d_in), bias=False))
    if scheme.kind == "bnb-nf4":
        qs = m.weight.quant_state
        bits = 8 * m.weight.numel() + 8 * qs.absmax.numel() + 32 * qs.state2.absmax.numel() + 32 * qs.offset.numel()
        assert scheme.stored_bits_per_param(d_out, d_in) == pytest.approx(bits / (d_out * d_in), rel=1e-12)
    else:  # every buffer except the constant codebook
        bits = sum(b.numel() * b.element_size() * 8 for n, b in m.named_buffers() if n != "codebook")
        assert "bits_per_param=" in repr(m) and "(deployed)" in repr(m)
        assert f"working_bits_per_param={bits / (d_out * d_in):.3f}" in repr(m)
    assert scheme.stored_bits_per_param(d_out, d_in, format="working") == pytest.approx(bits / (d_out * d_in),
                                                                                         rel=1e-12)


def test_stored_bits_per_param_format_errors():
    with pytest.raises(ConfigError, match=r"format='fp32' is not a bits-per-weight format.*'working'"):
        QuantScheme("int", 4, group_size=32).stored_bits_per_param(64, 64, format="fp32")
    for scheme in (QuantScheme("int", 4, tile=(8, 4)), QuantScheme("nf", 4), QuantScheme("bnb-nf4", 4)):
        assert scheme.bit_formats() == ("deployed", "working")
        with pytest.raises(ConfigError, match=r"format='gptq' .* row groups"):
            scheme.stored_bits_per_param(64, 64, format="gptq")
    assert QuantScheme("int", 4, group_size=32).bit_formats() == ("deployed", "working", "gptq")


# ---------------------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="nf4", bits=4), r"kind='nf4' is not a quantizer kind; set kind to one of 'int', 'nf', 'bnb-nf4', 'fp'\. "
                               r"Did you mean \"nf\"\?"),
    (dict(kind="integer", bits=4, group_size=32), r"kind='integer' .*Did you mean \"int\"\?"),
    (dict(kind="int", bits=5, group_size=32), r"bits=5 is not supported by kind='int'; supported: \[2, 3, 4, 8\]"),
    (dict(kind="nf", bits=8), r"bits=8 is not supported by kind='nf'; supported: \[2, 3, 4\]"),
    (dict(kind="bnb-nf4", bits=2), r"bits=2 is not supported by kind='bnb-nf4'; supported: \[4\].*kind='nf'"),
    (dict(kind="int", bits=4), r"kind='int' needs exactly one of group_size .* got neither\. Set e\.g\. group_size=32"),
    (dict(kind="int", bits=4, group_size=32, tile=(8, 4)),
     r"got both group_size=32 and tile=\(8, 4\)\. Set the other one to None"),
    (dict(kind="int", bits=4, group_size=0), r"group_size=0 must be a positive integer"),
    (dict(kind="int", bits=4, group_size=-32), r"group_size=-32 must be a positive integer"),
    (dict(kind="int", bits=4, tile=(8, 0)), r"tile=\(8, 0\) must be two positive integers \(tile_out, tile_in\)"),
    (dict(kind="int", bits=4, tile=(8,)), r"tile=\(8,\) must be two positive integers"),
    (dict(kind="nf", bits=4, group_size=32), r"group_size=32 applies only to kind='int', not kind='nf'; "
                                             r"set group_size=None"),
    (dict(kind="bnb-nf4", bits=4, tile=(8, 4)), r"tile=\(8, 4\) applies only to kind='int'"),
    (dict(kind="nf", bits=4, blocksize=0), r"blocksize=0 must be a positive integer"),
    (dict(kind="bnb-nf4", bits=4, blocksize=32), r"blocksize=32 is not supported by kind='bnb-nf4'.*blocksize=64"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantScheme(**kwargs)


def test_other_config_errors():
    with pytest.raises(ConfigError, match=r"block\(\) is defined for kind='int' only, not kind='nf'"):
        QuantScheme("nf", 4).block()
    with pytest.raises(ConfigError, match=r"QuantLinear does not store kind='bnb-nf4'"):
        QuantLinear(64, 64, QuantScheme("bnb-nf4", 4))
    assert QuantScheme("int", 4, tile=[8, 4]).tile == (8, 4)  # lists from YAML become tuples
    assert QuantScheme("int", 4, group_size=32).block() == (1, 32)
    assert QuantScheme("int", 4, tile=(8, 4)).block() == (8, 4)
    with pytest.raises(TypeError, match="dequantize_module\\(\\) takes a QuantLinear"):
        dequantize_module(nn.ReLU())


def test_shape_error_smollm2_hidden_576_group_128():
    scheme = QuantScheme("int", 4, group_size=128)
    msg = ("layer model.layers.0.self_attn.q_proj with weight shape (out=576, in=576): in=576 is not divisible by "
           "group_size=128; choose a group_size that divides every target layer's in-features, e.g. 32, 64, 192")
    with pytest.raises(ShapeError, match=re.escape(msg) + "$"):
        scheme.check_layer("model.layers.0.self_attn.q_proj", 576, 576)
    with pytest.raises(ShapeError, match=re.escape(msg)):
        make_linear(scheme, nn.Linear(576, 576), name="model.layers.0.self_attn.q_proj")
    scheme.check_layer("model.layers.0.mlp.down_proj", 576, 1536)  # 1536 = 12 * 128 is fine


@pytest.mark.parametrize("scheme,shape,message", [
    (QuantScheme("int", 4, tile=(8, 4)), (100, 64),
     r"layer L with weight shape \(out=100, in=64\): out=100 is not divisible by tile_out=8 \(tile=\(8, 4\)\); "
     r"choose a tile_out that divides every target layer's out-features, e.g\. 2, 4, 10"),
    (QuantScheme("int", 2, tile=(8, 4)), (64, 30),
     r"in=30 is not divisible by tile_in=4 \(tile=\(8, 4\)\); choose a tile_in .* e\.g\. 2, 5"),
    (QuantScheme("int", 3, group_size=32), (64, 48), r"in=48 is not divisible by group_size=32; .* e\.g\. 8, 16, 48"),
])
def test_shape_errors(scheme, shape, message):
    with pytest.raises(ShapeError, match=message):
        scheme.check_layer("L", *shape)


@pytest.mark.parametrize("scheme", [QuantScheme("nf", 4), QuantScheme("nf", 3), QuantScheme("bnb-nf4", 4)],
                         ids=lambda s: s.label())
def test_nf_kinds_accept_any_shape(scheme):
    scheme.check_layer("odd", 7, 9)
    lin = linear_from(rand_w(7, 9))
    m = make_linear(scheme, lin)
    x = torch.randn(2, 9)
    torch.testing.assert_close(m(x), F.linear(x, scheme.fake_quant(lin.weight), lin.bias.detach()))


def test_dequantize_module_and_is_quantized_on_plain_linear():
    lin = linear_from(rand_w(4, 8, dtype=torch.bfloat16))
    assert not is_quantized(lin)
    w = dequantize_module(lin)
    assert w.dtype == torch.float32 and torch.equal(w, lin.weight.float())


# ---------------------------------------------------------------------------------------------- whole model

@pytest.mark.parametrize("scheme", [QuantScheme("int", 4, group_size=32), QuantScheme("int", 4, tile=(8, 4)),
                                    QuantScheme("nf", 4), QuantScheme("bnb-nf4", 4)], ids=lambda s: s.label())
def test_quantize_all_projections_of_tiny_llama(tiny_model, scheme):
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model(ids).logits
    targets = [(n, m) for n, m in tiny_model.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[-1] in
               {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}]
    assert len(targets) == 14
    for name, lin in targets:
        parent = tiny_model.get_submodule(name.rsplit(".", 1)[0])
        setattr(parent, name.rsplit(".", 1)[1], make_linear(scheme, lin, name=name))
    assert sum(is_quantized(m) for m in tiny_model.modules()) == 14
    assert all(not p.requires_grad or "lm_head" in n or "embed" in n or "norm" in n
               for n, p in tiny_model.named_parameters())
    with torch.no_grad():
        out = tiny_model(ids).logits
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2


def test_bnb_module_backward_and_torch_save_roundtrip(tmp_path):
    w = rand_w(32, 96, seed=13)
    lin = linear_from(w)
    m = to_linear4bit(lin, torch.float32)
    x = torch.randn(4, 96, requires_grad=True)
    m(x).sum().backward()
    torch.testing.assert_close(x.grad, bnb_nf4_fake_quant(w).sum(0).expand(4, 96))
    torch.save(m, tmp_path / "m.pt")
    m2 = torch.load(tmp_path / "m.pt", weights_only=False)
    assert isinstance(m2, bnb.nn.Linear4bit)
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))
