"""GPTQ checkpoint export (methods/quant/export.py): packing, layer round trips, checkpoint files, and the
measured loss of rounding float zero points. Loading through transformers needs optimum + gptqmodel, which
are not in the main environment; that path is tested in test_gptq_parity.py (separate env)."""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from torch import nn

from methods.errors import ConfigError, ShapeError
from methods.quant.export import (
    export_gptq_checkpoint,
    export_zero_points,
    from_gptq_tensors,
    pack_int32,
    quant_linear_from_gptq,
    to_gptq_tensors,
    unpack_int32,
    zero_rounding_loss,
)
from methods.quant.linear import QuantLinear
from methods.quant.scheme import QuantScheme

VOCAB = 128


def _int32(v: int) -> int:
    return v - 2**32 if v >= 2**31 else v


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    v = torch.randint(0, 2**bits, (96, 40), generator=g)
    p = pack_int32(v, bits)
    assert p.dtype == torch.int32 and p.shape == (96 * bits // 32, 40)
    assert torch.equal(unpack_int32(p, bits), v)
    # all-ones codes exercise the sign bit of the int32 words
    ones = torch.full((96, 3), 2**bits - 1)
    assert torch.equal(unpack_int32(pack_int32(ones, bits), bits), ones)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_a_little_endian_bit_stream(bits):
    """Entry k of each run of 32 sits at bits k*bits.. of the run's bit stream, lowest bits first (3-bit values
    straddle words like AutoGPTQ's packer)."""
    g = torch.Generator().manual_seed(10 + bits)
    v = torch.randint(0, 2**bits, (32, 2), generator=g)
    p = pack_int32(v, bits)
    for col in range(2):
        stream = sum(int(v[k, col]) << (k * bits) for k in range(32))
        words = [_int32((stream >> (32 * j)) & 0xFFFFFFFF) for j in range(bits)]
        assert p[:, col].tolist() == words
    if bits == 4:  # the familiar form: word |= q[k] << (4 k)
        assert int(p[0, 0]) == _int32(sum(int(v[k, 0]) << (4 * k) for k in range(8)))


def test_pack_errors():
    with pytest.raises(ShapeError, match="multiple of 32"):
        pack_int32(torch.zeros(16, 2, dtype=torch.long), 3)
    with pytest.raises(ConfigError, match=r"\[0, 15\]"):
        pack_int32(torch.full((8, 1), 16), 4)
    with pytest.raises(ConfigError, match="bits=5"):
        pack_int32(torch.zeros(32, 1, dtype=torch.long), 5)


def _int_zero_layer(bits, d_out=64, d_in=96, g=32, seed=0, bias=True):
    """A QuantLinear whose zeros are integers in [1, 2^k-1] and whose scales are fp16-representable."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (d_out, d_in), generator=gen).to(torch.uint8)
    scales = (torch.rand(d_out, d_in // g, generator=gen) * 0.02 + 1e-3).half().float()
    zeros = torch.randint(1, 2**bits, (d_out, d_in // g), generator=gen).float()
    b = torch.randn(d_out, generator=gen) if bias else None
    return QuantLinear.from_quantized(codes, QuantScheme("int", bits, group_size=g), scales=scales, zeros=zeros,
                                      bias=b)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_integer_zero_layer_exports_and_unpacks_exactly(bits):
    ql = _int_zero_layer(bits)
    t = to_gptq_tensors(ql)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (96 * bits // 32, 64)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (3, 64 * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (3, 64)
    assert t["g_idx"].dtype == torch.int32 and t["g_idx"].tolist() == [i // 32 for i in range(96)]
    # qzeros hold zero - 1
    stored = unpack_int32(t["qzeros"].t().contiguous(), bits)
    assert torch.equal(stored + 1, ql.zeros.long())

    codes, scale, zero = from_gptq_tensors(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert torch.equal(codes, ql.codes())
    assert torch.equal(scale, ql.scales) and torch.equal(zero, ql.zeros)
    back = quant_linear_from_gptq(t, bits, 32)
    assert torch.equal(back.dequantize(), ql.dequantize())
    x = torch.randn(5, 96)
    assert torch.equal(back(x), ql(x))


def test_zero_point_rounding_rules():
    z = torch.tensor([[-0.7, 0.2, 0.5, 1.49, 14.6, 15.2, 17.0]])
    r, lifted = export_zero_points(z, 4, v1_safe=False)
    assert r.tolist() == [[0.0, 0.0, 0.0, 1.0, 15.0, 15.0, 15.0]]  # round half to even, clamp to [0, 15]
    r, lifted = export_zero_points(z, 4)
    assert r.tolist() == [[1.0, 1.0, 1.0, 1.0, 15.0, 15.0, 15.0]] and lifted == 3  # v1 cannot store 0


def test_tiles_cannot_be_exported():
    lin = nn.Linear(32, 16)
    ql = QuantLinear.from_linear(lin, QuantScheme("int", 4, tile=(8, 4)))
    with pytest.raises(ConfigError, match="row groups"):
        to_gptq_tensors(ql)


# ------------------------------------------------------------------------------------------ model level

def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float().eval()


def _quantize_rtn(model, scheme):
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and ".layers." in name:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantLinear.from_linear(mod, scheme))
    return model


def _round_zeros_in_place(model, bits):
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.zeros.copy_(export_zero_points(m.zeros, bits)[0])
            m.scales.copy_(m.scales.half().float())


@pytest.fixture(scope="module")
def eval_ids():
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))


def test_zero_rounding_loss_is_measured(eval_ids):
    model = _quantize_rtn(_tiny_llama(), QuantScheme("int", 3, group_size=32))
    zeros_before = {n: m.zeros.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    with torch.no_grad():
        logits_before = model(eval_ids).logits
    rep = zero_rounding_loss(model, eval_ids)
    print("float zeros (RTN int3 g32):", rep)
    assert rep["n_layers"] == 14
    assert rep["max_abs_dlogit"] > 0 and rep["ppl_rounded_zeros"] != rep["ppl_float_zeros"]
    assert 0 < rep["max_abs_dzero"] <= 0.5 + 1e-6
    assert rep["ppl_float_zeros"] > 1 and rep["ppl_export"] > 1
    # the model is restored
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.zeros, zeros_before[n])
    with torch.no_grad():
        assert torch.equal(model(eval_ids).logits, logits_before)

    _round_zeros_in_place(model, 3)
    rep = zero_rounding_loss(model, eval_ids)
    assert rep["max_abs_dlogit"] == 0.0 and rep["max_abs_dlogit_export"] == 0.0
    assert rep["ppl_rounded_zeros"] == rep["ppl_float_zeros"] == rep["ppl_export"]
    assert rep["max_abs_dzero"] == 0.0


@pytest.mark.parametrize("bits", [4, 3])
def test_checkpoint_round_trip_through_files(tmp_path, eval_ids, bits):
    from safetensors.torch import load_file

    model = _quantize_rtn(_tiny_llama(), QuantScheme("int", bits, group_size=32))
    summary = export_gptq_checkpoint(model, tmp_path, bits, 32, dtype=torch.float32)
    assert summary["layers"] == 14
    cfg = json.loads((tmp_path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "desc_act", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq"}
    assert cfg["model_type"] == "llama"
    sd = load_file(str(tmp_path / "model.safetensors"))
    assert sd["model.layers.0.mlp.down_proj.qweight"].shape == (128 * bits // 32, 64)
    assert sd["model.layers.0.mlp.down_proj.scales"].dtype == torch.float16
    assert "model.layers.0.mlp.down_proj.weight" not in sd

    # load back without transformers' GPTQ integration: the suite's own unpacker into a fresh model
    fresh = _tiny_llama(seed=123)
    plain = {k: v for k, v in sd.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    for name in [k[: -len(".qweight")] for k in sd if k.endswith(".qweight")]:
        t = {key: sd[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")}
        parent, _, child = name.rpartition(".")
        setattr(fresh.get_submodule(parent), child, quant_linear_from_gptq(t, bits, 32))
    missing, unexpected = fresh.load_state_dict(plain, strict=False)
    assert not unexpected
    assert not [k for k in missing if not k.endswith(("qweight", "scales", "zeros"))]  # QuantLinear buffers

    expected = copy.deepcopy(model)
    _round_zeros_in_place(expected, bits)  # what the checkpoint can represent
    with torch.no_grad():
        torch.testing.assert_close(fresh(eval_ids).logits, expected(eval_ids).logits, rtol=0, atol=1e-5)


def test_transformers_gptq_loading_in_main_env(tmp_path):
    """transformers loads GPTQ checkpoints only through optimum + gptqmodel; the main env pins neither."""
    missing = [m for m in ("optimum", "gptqmodel") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed in this env: transformers cannot load GPTQ "
                    f"checkpoints here; checked with from_gptq_tensors above and, with envs/gptqmodel-parity.sh, "
                    f"through transformers in tests/test_gptq_parity.py")
    from transformers import AutoModelForCausalLM

    model = _quantize_rtn(_tiny_llama(), QuantScheme("int", 4, group_size=32))
    _round_zeros_in_place(model, 4)
    export_gptq_checkpoint(model, tmp_path, 4, 32, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-2)


# ------------------------------------------------------------------------------------------ constant groups

def _constant_group_layer(bits, d_out=64, d_in=128, g=32, seed=3, quantizer="rtn"):
    """A weight whose groups (for every row) 0 and 2 are constant: group 0 all zeros (as GPTQ's zeroed dead
    columns), group 2 all 0.37 (rows < 32) / -1.25 (rows >= 32); groups 1 and 3 random."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen) * 0.05
    w[:, 0:g] = 0.0
    w[: d_out // 2, 2 * g:3 * g] = 0.37
    w[d_out // 2:, 2 * g:3 * g] = -1.25
    scheme = QuantScheme("int", bits, group_size=g)
    if quantizer == "rtn":
        ql = QuantLinear.from_linear(_linear_with(w), scheme)
    else:
        from methods.quant.gptq import gptq_quantize_weight

        x = torch.randn(256, d_in, generator=gen)
        x[:, 0:g] = 0.0  # dead inputs: GPTQ zeroes these columns
        codes, s, z = gptq_quantize_weight(w, 2 / 256 * x.t() @ x, bits, (1, g))
        ql = QuantLinear.from_quantized(codes, scheme, scales=s, zeros=z)
    return w, ql


def _linear_with(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_float_zero_format_represents_constant_groups_exactly(bits):
    w, ql = _constant_group_layer(bits)
    deq = ql.dequantize()
    assert torch.equal(deq[:, 0:32], torch.zeros(64, 32))
    assert torch.equal(deq[:, 64:96], w[:, 64:96])  # 0.37 and -1.25 bit for bit
    for c in (0.0, -0.0, 1e-30, -3.3, 1234.5, 7e-45):  # more constants, incl. a float32 subnormal
        lin = _linear_with(torch.full((2, 32), c))
        assert torch.equal(QuantLinear.from_linear(lin, QuantScheme("int", bits, group_size=32)).dequantize(),
                           torch.full((2, 32), c))
        tile = QuantLinear.from_linear(_linear_with(torch.full((8, 8), c)), QuantScheme("int", bits, tile=(8, 4)))
        assert torch.equal(tile.dequantize(), torch.full((8, 8), c))


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
@pytest.mark.parametrize("v1_safe", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_constant_groups_survive_gptq_export(bits, v1_safe, quantizer):
    w, ql = _constant_group_layer(bits, quantizer=quantizer)
    before = ql.dequantize()
    t = to_gptq_tensors(ql, v1_safe=v1_safe)
    back = quant_linear_from_gptq(t, bits, 32).dequantize()
    # all-zero group (GPTQ: the zeroed dead inputs): exactly 0.0 (it came back as 1 * (0 - 1) = -1.0 before)
    assert torch.equal(before[:, 0:32], torch.zeros(64, 32))
    assert torch.equal(back[:, 0:32], torch.zeros(64, 32))
    # every (row, group) whose codes are all equal is a constant c = scale * (q - zero): c up to the fp16
    # rounding of one scale; every other group is what the export did before (integer zeros, fp16 scales,
    # codes kept)
    codes = ql.codes().view(64, 4, 32)
    const = (codes == codes[..., :1]).all(-1)  # (D_out, G)
    if quantizer == "rtn":
        assert const[:, 0].all() and const[:, 2].all() and not const[:, [1, 3]].any()
        assert torch.equal(before[:, 64:96], w[:, 64:96])
    else:
        assert const[:, 0].all() and not const[:, 1:].all()
    z, _ = export_zero_points(ql.zeros, bits, v1_safe=v1_safe)
    z = torch.where(z == 0, 2.0**bits, z)  # v1_safe=False: a zero of 0 is stored as -1 & mask, read as 2^k
    ref = ql.scales.half().float()[..., None] * (codes.float() - z[..., None])
    b, f = back.view(64, 4, 32), before.view(64, 4, 32)
    assert torch.equal(b[~const], ref[~const])
    torch.testing.assert_close(b[const], f[const], rtol=2**-11, atol=0)
    assert torch.equal(b[const] == 0, f[const] == 0)
    # re-encoded groups use zeros the v1 format holds (zero - 1 >= 0) also with v1_safe=False; scales finite, > 0
    _, scale, zero = from_gptq_tensors(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert int(zero[const].min()) >= 1 and int(zero[const].max()) <= 2**bits - 1
    if v1_safe:
        assert int(zero.min()) >= 1 and int(zero.max()) <= 2**bits - 1
    assert torch.isfinite(scale).all() and (scale > 0).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_constant_groups_survive_checkpoint_files(bits, tmp_path):
    from safetensors.torch import load_file

    model = nn.Sequential()
    model.add_module("layers", nn.ModuleList([nn.Module()]))
    _, ql = _constant_group_layer(bits)
    model.layers[0].add_module("proj", ql)
    summary = export_gptq_checkpoint(model, tmp_path, bits, 32, dtype=torch.float32)
    sd = load_file(str(tmp_path / "model.safetensors"))
    t = {k: sd[f"layers.0.proj.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
    back = quant_linear_from_gptq(t, bits, 32).dequantize()
    assert torch.equal(back[:, 0:32], torch.zeros(64, 32))
    torch.testing.assert_close(back[:, 64:96], ql.dequantize()[:, 64:96], rtol=2**-11, atol=0)
    meta = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["n_constant_groups"] == summary["n_constant_groups"] == 64 * 2


@pytest.mark.parametrize("c", [3e5, -3e5, 1e-3, -7.5])
def test_constant_group_scale_stays_finite(c):
    """|c| above fp16's 65504: the step |q - Z| grows so that the fp16 scale stays finite."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    w[:, 32:] = c
    ql = QuantLinear.from_linear(_linear_with(w), QuantScheme("int", 8, group_size=32))
    t = to_gptq_tensors(ql)
    assert torch.isfinite(t["scales"].float()).all()
    back = quant_linear_from_gptq(t, 8, 32).dequantize()
    torch.testing.assert_close(back[:, 32:], w[:, 32:], rtol=2**-11, atol=0)


def test_zero_rounding_loss_export_matches_the_checkpoint_with_constant_groups(tmp_path, eval_ids):
    """The ``*_export`` model of zero_rounding_loss dequantizes like the written checkpoint, constant groups
    (here: inputs 0..31 of every down_proj are all-zero, as GPTQ leaves dead inputs) included."""
    from safetensors.torch import load_file

    model = _tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :32] = 0.0
    model = _quantize_rtn(model, QuantScheme("int", 4, group_size=32))
    rep = zero_rounding_loss(model, eval_ids)
    assert rep["n_constant_groups"] == 2 * 64  # 2 layers x 64 rows
    summary = export_gptq_checkpoint(model, tmp_path, 4, 32, dtype=torch.float32)
    assert summary["n_constant_groups"] == rep["n_constant_groups"]
    sd = load_file(str(tmp_path / "model.safetensors"))
    fresh = copy.deepcopy(model)
    for name in [k[: -len(".qweight")] for k in sd if k.endswith(".qweight")]:
        t = {key: sd[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")}
        parent, _, child = name.rpartition(".")
        back = quant_linear_from_gptq(t, 4, 32)
        if name.endswith("down_proj"):
            assert torch.equal(back.dequantize()[:, :32], torch.zeros(64, 32))
        setattr(fresh.get_submodule(parent), child, back)
    with torch.no_grad():
        logits = fresh(eval_ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), eval_ids[:, 1:].reshape(-1))
    assert rep["ppl_export"] == pytest.approx(float(loss.exp()), rel=1e-6)
