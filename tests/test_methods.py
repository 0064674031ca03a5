"""The method library against independent computations of METHODS.md's formulas (table-driven, as in peft).

The expected geometry of every method is written out here again from METHODS.md (SPEC), not taken from the
library, and every Δy is recomputed with a Kronecker product ``s · c · kron(M, ones(q, p))``. What every
registered method must do alike (forward vs reference, save/load, merge, accounting, peft export) is the contract
tester's, tests/test_contract.py, one row per method.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import methods
from methods import AdapterLinear, PooledAdapter
from tests.conftest import make_tiny_llama

R, ALPHA = 8, 16.0

# name -> (hyperparameters, p, q, kind, inner rank) exactly as the table in METHODS.md reads
SPEC = {
    "lora": ({}, 1, 1, "BA", R),
    "qlora": ({}, 1, 1, "BA", R),
    "qalora": ({"group_size": 32}, 32, 1, "BA", R),
    "loftq": ({"iters": 1}, 1, 1, "BA", R),
    "qbara": ({"k": 2}, 2, 2, "BA", 2 * R),
    "qahira": ({"group_size": 32}, 32, 1, "H", None),
    "qahira-ref": ({}, 4, 8, "H", None),
}
ADAPTER_METHODS = list(SPEC)
INT_MERGE = ["qalora", "qahira", "qahira-ref"]


def build(name, **kw):
    hp = dict(SPEC[name][0]) if name in SPEC else {}
    hp.update(kw)
    if name != "peqa":
        hp.setdefault("rank", R)
        hp.setdefault("alpha", ALPHA)
    return methods.build(name, **hp)


def reference_delta(x: np.ndarray, M: np.ndarray, p: int, q: int, s: float, pool: str = "mean") -> np.ndarray:
    """Δy from the dense update ΔW[o, i] = s · c · M[o // q, i // p], in float64 numpy."""
    c = 1.0 / p if pool == "mean" else 1.0
    dW = s * c * np.kron(M.astype(np.float64), np.ones((q, p)))
    return x.astype(np.float64) @ dW.T


def randomize(adapter: PooledAdapter, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


def layer(model, name="model.layers.0.mlp.gate_proj"):  # (out=160, in=96): non-square
    return model.get_submodule(name)


# ------------------------------------------------------------------------------------------- registry
def test_registry_has_every_method():
    assert set(methods.names()) >= {"lora", "qlora", "qalora", "loftq", "qbara", "qahira", "qahira-ref", "peqa"}
    for name in methods.names():
        m = methods.get(name)
        assert m.name == name and m.summary
        if isinstance(m.deploy, str):
            assert m.deploy in ("fp16-merge", "int-merge", "4+16", "base")
        else:  # deployment set per entry (peft: by its base), described for listings
            assert m.deploy_summary
    lora = {"peft_type": "LORA", "r": 4}
    assert methods.build("peft", base="nf4", peft=lora).deploy == "4+16"
    assert methods.build("peft", base="16bit", peft=lora).deploy == "fp16-merge"


def test_public_interface_example():
    m = methods.build("qalora", rank=64, alpha=16, bits=4, group_size=32)
    model = m.prepare(make_tiny_llama())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert "lm_head" not in " ".join(n for n, _ in model.named_modules() if isinstance(_, AdapterLinear))
    merged = m.merge(model)
    assert not any(isinstance(mod, AdapterLinear) for mod in merged.modules())


# ------------------------------------------------------------------------------------ adapter formula
@pytest.mark.parametrize("p,q,rank", [(1, 1, 4), (32, 1, 4), (2, 2, 8), (32, 1, None), (4, 8, None), (3, 4, 5)])
@pytest.mark.parametrize("pool", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(5, 96), (2, 3, 96)])
def test_pooled_adapter_equals_dense_formula(p, q, rank, pool, shape):
    d_in, d_out = 96, 64
    ad = PooledAdapter(d_in, d_out, p=p, q=q, rank=rank, scaling=0.25, pool=pool, init="kaiming")
    randomize(ad)
    x = torch.randn(*shape)
    got = ad(x).detach().numpy()
    M = (ad.H if rank is None else ad.B @ ad.A).detach().numpy()
    assert M.shape == (d_out // q, d_in // p)
    want = reference_delta(x.numpy(), M, p, q, 0.25, pool)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ad.delta_weight().numpy(),
                               0.25 * (1 / p if pool == "mean" else 1) * np.kron(M, np.ones((q, p))), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adapter_any_float_dtype(dtype):
    ad = PooledAdapter(64, 32, p=4, q=2, rank=4, scaling=0.5)
    randomize(ad)
    x = torch.randn(2, 3, 64).to(dtype)
    y = ad(x)
    assert y.dtype == dtype and y.shape == (2, 3, 32)
    ref = ad(x.float())
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------------------------------- every method's Δy
@pytest.mark.parametrize("name", ADAPTER_METHODS)
@pytest.mark.parametrize("shape", [(4, 96), (2, 5, 96)])
def test_method_delta_matches_spec(name, shape):
    hp, p, q, kind, rho = SPEC[name]
    model = build(name).prepare(make_tiny_llama())
    mod = layer(model)
    assert isinstance(mod, AdapterLinear)
    ad = mod.adapter
    d_out, d_in = 160, 96
    if kind == "BA":
        assert tuple(ad.A.shape) == (rho, d_in // p) and tuple(ad.B.shape) == (d_out // q, rho)
    else:
        assert tuple(ad.H.shape) == (d_out // q, d_in // p)
    randomize(ad, seed=1)
    x = torch.randn(*shape)
    with torch.no_grad():
        delta = (mod(x) - mod.base(x)).numpy()
    M = (ad.H if kind == "H" else ad.B @ ad.A).detach().numpy()
    np.testing.assert_allclose(delta, reference_delta(x.numpy(), M, p, q, ALPHA / R), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ADAPTER_METHODS + ["peqa"])
def test_trainable_parameter_count(name):
    m = build(name)
    model = m.prepare(make_tiny_llama())
    shapes = [(m_.out_features, m_.in_features) for n, m_ in make_tiny_llama().named_modules()
              if isinstance(m_, torch.nn.Linear) and not n.endswith("lm_head")]
    if name == "peqa":
        want = sum(o * i // 32 for o, i in shapes)
    else:
        _, p, q, kind, rho = SPEC[name]
        want = sum((o // q) * (i // p) if kind == "H" else rho * (i // p + o // q) for o, i in shapes)
    assert methods.count_trainable(model) == want == sum(m.trainable_params(o, i) for o, i in shapes)
    # every other parameter is frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adapter." not in n
               and not n.endswith("scale_delta"))


def test_qbara_has_lora_parameter_count_for_any_k():
    for k in (1, 2, 4, 8):
        assert methods.build("qbara", rank=R, k=k).trainable_params(160, 96) == R * (160 + 96)


def test_init_choices():
    # LoRA-type: B = 0 so the model is unchanged at step 0; qahira-ref (kaiming H) changes it at step 0
    for name in ["lora", "qalora", "qbara", "qahira"]:
        ad = layer(build(name).prepare(make_tiny_llama())).adapter
        assert float(ad.delta_weight().abs().max()) == 0.0
    ad = layer(build("qahira-ref").prepare(make_tiny_llama())).adapter
    assert float(ad.delta_weight().abs().max()) > 0.0
    # initialisation is seeded per layer: same seed -> same init, other seed -> other init
    a1 = layer(build("lora", seed=3).prepare(make_tiny_llama())).adapter.A
    a2 = layer(build("lora", seed=3).prepare(make_tiny_llama())).adapter.A
    a3 = layer(build("lora", seed=4).prepare(make_tiny_llama())).adapter.A
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


def test_disabled_adapters_give_the_base(tiny_model):
    ids = torch.randint(0, 128, (2, 7))
    model = build("qahira-ref").prepare(tiny_model)  # kaiming-initialised H: a non-zero update at step 0
    with torch.no_grad():
        on = model(ids).logits
        with methods.disabled_adapters(model):
            off = model(ids).logits
        again = model(ids).logits
        for mod in model.modules():
            if isinstance(mod, PooledAdapter):
                mod.H.zero_()
        zeroed = model(ids).logits
    assert not torch.allclose(on, off)
    torch.testing.assert_close(on, again)
    torch.testing.assert_close(off, zeroed)


# ------------------------------------------------------------------------------------- qlora == peft
def test_qlora_adapter_equals_peft_lora():
    peft = pytest.importorskip("peft")
    m = build("qlora", dropout=0.0)
    ours = m.prepare(make_tiny_llama())
    theirs = make_tiny_llama()
    targets = [n for n, mod in ours.named_modules() if isinstance(mod, AdapterLinear)]
    for n in targets:  # the very same frozen NF4 modules under peft
        parent, _, child = n.rpartition(".")
        setattr(theirs.get_submodule(parent), child, ours.get_submodule(n).base)
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj",
                          "o_proj", "gate_proj", "up_proj", "down_proj"])
    theirs = peft.get_peft_model(theirs, cfg)
    for n in targets:
        ad = ours.get_submodule(n).adapter
        randomize(ad, seed=hash(n) % 1000)
        pl = theirs.base_model.model.get_submodule(n)
        assert "Linear4bit" in type(pl).__name__ or "Linear4bit" in type(pl.base_layer).__name__
        pl.lora_A["default"].weight.data.copy_(ad.A)
        pl.lora_B["default"].weight.data.copy_(ad.B)
    ids = torch.randint(0, 128, (2, 9))
    lo = ours(ids).logits
    lt = theirs(ids).logits
    torch.testing.assert_close(lo, lt, rtol=1e-5, atol=1e-5)
    lo.square().mean().backward()
    lt.square().mean().backward()
    for n in targets:
        ad = ours.get_submodule(n).adapter
        pl = theirs.base_model.model.get_submodule(n)
        torch.testing.assert_close(ad.A.grad, pl.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ad.B.grad, pl.lora_B["default"].weight.grad, rtol=1e-4, atol=1e-6)


def test_lora_init_equals_peft_default():
    """A's default init is nn.Linear's kaiming-uniform(a=sqrt 5): same bound as peft's, B = 0."""
    ad = layer(build("lora").prepare(make_tiny_llama())).adapter
    bound = 1 / math.sqrt(96)
    amax = float(ad.A.detach().abs().max())
    assert 0.8 * bound < amax <= bound
    assert float(ad.B.detach().abs().max()) == 0.0


# ------------------------------------------------------------------------------------------- merges
def _randomize_all(model, seed=0):
    for i, (n, mod) in enumerate(model.named_modules()):
        if isinstance(mod, PooledAdapter):
            randomize(mod, seed + i)
        elif getattr(mod, "scale_delta", None) is not None:
            g = torch.Generator().manual_seed(seed + i)
            mod.scale_delta.data.copy_(torch.randn(mod.scale_delta.shape, generator=g) * mod.scales.abs() * 0.1)


def _blocks(w, to, ti):
    o, i = w.shape
    return w.reshape(o // to, to, i // ti, ti).permute(0, 2, 1, 3).reshape(-1, to * ti)


@pytest.mark.parametrize("name,bits", [("qalora", 4), ("qalora", 2), ("qahira", 4), ("qahira", 3),
                                       ("qahira-ref", 4), ("peqa", 4), ("peqa", 2)])
def test_exact_int_merge(name, bits):
    from methods.quant.linear import QuantLinear

    m = build(name, bits=bits)
    model = m.prepare(make_tiny_llama())
    _randomize_all(model)
    before = {n: (mod.base if isinstance(mod, AdapterLinear) else mod) for n, mod in model.named_modules()
              if isinstance(mod, (AdapterLinear, QuantLinear)) and not n.endswith(".base")}
    before = {n: (b.codes().clone(), b.scales.clone(), b.zeros.clone()) for n, b in before.items()
              if isinstance(b, QuantLinear)}
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        want = model(ids).logits
        merged = m.merge(model)
        got = merged(ids).logits
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-5, rel
    tile = (8, 4) if name == "qahira-ref" else (1, 32)
    for n, (codes, scales, zeros) in before.items():
        ql = merged.get_submodule(n)
        assert isinstance(ql, QuantLinear)
        assert torch.equal(ql.codes(), codes)
        if name == "peqa":
            assert torch.equal(ql.zeros, zeros) and not torch.equal(ql.scales, scales)
        else:
            assert torch.equal(ql.scales, scales) and not torch.equal(ql.zeros, zeros)
        per_block = _blocks(ql.dequantize(), *tile)
        assert max(len(torch.unique(b)) for b in per_block) <= 2 ** bits
    assert methods.count_trainable(merged) == 0


# -------------------------------------------------------------------------------------------- LoftQ
@pytest.mark.parametrize("hp", [dict(bits=4), dict(bits=2), dict(bits=3), dict(bits=4, quant_type="int", group_size=32),
                                dict(bits=2, quant_type="int", group_size=32)])
def test_loftq_reduces_error_monotonically(hp):
    """||W − (Q + s·B·A)|| < ||W − Q||, and the prepared layer's error does not increase with iters."""
    from methods.loftq import loftq_decompose
    from methods.quant.modules import dequantize_module, make_linear

    torch.manual_seed(0)
    w = torch.randn(160, 96) * 0.05 + 0.2 * torch.randn(160, 4) @ torch.randn(4, 96) / 4  # some low-rank structure
    m = methods.build("loftq", rank=R, alpha=ALPHA, **hp)
    scheme = m.scheme()
    q_err = float((w - scheme.fake_quant(w)).norm())
    errs = loftq_decompose(w, scheme, R, m.scaling, iters=5)[3]
    assert errs[0] == pytest.approx(q_err)
    assert errs[1] < q_err and min(errs[1:]) < errs[1]  # the alternation helps beyond T=1
    achieved = []
    for t in range(1, 6):
        target, a, b, _ = loftq_decompose(w, scheme, R, m.scaling, iters=t)
        lin = torch.nn.Linear(96, 160, bias=False)
        lin.weight.data.copy_(target)
        recon = dequantize_module(make_linear(scheme, lin)) + m.scaling * b @ a  # the deployed base + adapter
        achieved.append(float((w - recon).norm()))
    assert achieved[0] < q_err
    for x, y in zip(achieved, achieved[1:]):
        assert y <= x * (1 + 1e-6), achieved


def test_loftq_prepared_layer_reconstructs_weight():
    from methods.quant.modules import dequantize_module

    orig = make_tiny_llama()
    w = layer(orig).weight.detach().clone()
    for comp in (True, False):
        m = methods.build("loftq", rank=R, alpha=ALPHA, iters=2, scale_compensation=comp)
        mod = layer(m.prepare(copy.deepcopy(orig)))
        err = float((w - dequantize_module(mod.base) - mod.adapter.delta_weight()).norm())
        q_err = float((w - m.scheme().fake_quant(w)).norm())
        errs = m.loftq_report["model.layers.0.mlp.gate_proj"]
        assert err == pytest.approx(min(errs[1:]), rel=1e-4)
        if comp:
            assert err < q_err
            with_comp = err
        else:  # peft's omission of 1/sqrt(s): only s times the correction, a larger error
            assert err > with_comp


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_method_did_you_mean():
    with pytest.raises(methods.ConfigError, match=r"unknown method 'qlroa'.*Did you mean \"qlora\"\?"):
        methods.build("qlroa")


def test_unknown_hyperparameter_did_you_mean():
    with pytest.raises(methods.ConfigError, match=r"'qalora' has no hyperparameter 'rnak'.*Did you mean \"rank\""):
        methods.build("qalora", rnak=8)
    with pytest.raises(methods.ConfigError, match=r"'lora' has no hyperparameter 'pool'"):
        methods.build("lora", pool="mean")


@pytest.mark.parametrize("name,hp,msg", [
    ("qlora", dict(bits=8), r"bits=8 is not supported; choose one of \[4, 3, 2\]"),
    ("qalora", dict(bits=5), r"bits=5 is not supported; choose one of \[2, 3, 4, 8\]"),
    ("lora", dict(bits=4), r"bits=4 is not supported; choose one of \[16\]"),
    ("loftq", dict(bits=8), r"bits=8 is not available with quant_type='nf'"),
    ("qalora", dict(rank="64"), r"rank='64' has type str; expected int"),
    ("qalora", dict(rank=0), r"rank=0 must be >= 1"),
    ("qalora", dict(dropout=1.5), r"dropout=1.5 must be < 1.0"),
    ("qalora", dict(pool="avg"), r"pool='avg' is not supported; choose one of \['mean', 'sum'\]"),
    ("qahira", dict(init="xavier"), r"init='xavier' is not supported; choose one of \['zeros', 'kaiming'\]"),
])
def test_bad_hyperparameter_values(name, hp, msg):
    with pytest.raises(methods.ConfigError, match=msg):
        methods.build(name, **hp)


def test_group_not_dividing_smollm2_width():
    """SmolLM2's hidden size 576 with group 128: the message names the layer, its shape, the value and a fix."""
    model = make_tiny_llama(hidden=576, intermediate=1536, layers=1, heads=9, kv_heads=3)
    before = copy.deepcopy(model.state_dict())
    for name in ["qalora", "qahira", "peqa"]:
        with pytest.raises(methods.ShapeError) as e:
            methods.build(name, group_size=128).prepare(model)
        msg = str(e.value)
        assert "model.layers.0.self_attn.q_proj" in msg and "(out=576, in=576)" in msg
        assert "group_size=128" in msg and "576" in msg and "32" in msg
    # nothing was touched: the check runs before any compute
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, AdapterLinear) for m in model.modules())


def test_tile_and_k_not_dividing():
    model = make_tiny_llama(hidden=100, intermediate=164, heads=5, kv_heads=1)  # k/v out = 20
    with pytest.raises(methods.ShapeError, match=r"q_proj.*\(out=100, in=100\).*out=100 is not divisible by tile_out=8"):
        methods.build("qahira-ref").prepare(model)
    with pytest.raises(methods.ShapeError, match=r"q_proj.*\(out=100, in=100\).*in=100 is not divisible by p=3 \(k\)"):
        methods.build("qbara", k=3).prepare(make_tiny_llama(hidden=100, intermediate=164, heads=5, kv_heads=1))


def test_gptq_needs_calibration(tiny_model):
    with pytest.raises(methods.ConfigError, match=r"quantizer='gptq' needs calibration data"):
        methods.build("qalora", quantizer="gptq").prepare(tiny_model)


def test_unknown_target_and_double_prepare(tiny_model):
    with pytest.raises(methods.ConfigError, match=r"targets entry 'q_prj'.*Did you mean \"q_proj\""):
        methods.build("lora", targets=["q_prj"]).prepare(tiny_model)
    model = methods.build("lora", targets=["q_proj", "v_proj"]).prepare(tiny_model)
    assert sum(isinstance(m, AdapterLinear) for m in model.modules()) == 4
    with pytest.raises(methods.ConfigError, match="already prepared"):
        methods.build("lora").prepare(model)


def test_gptq_groups_selects_the_released_group_statistics(tiny_model):
    """`gptq_groups: released` builds the base with the released GPTQ's group statistics (gptq.py's "reference"
    path); `updated` (the default) with the fully updated weights; the two differ when groups are narrower than
    GPTQ's 128-column batch, and the choice is part of the base's identity. Without GPTQ it is an error."""
    import copy

    from methods.quant.gptq import gptq_quantize_model
    from methods.quant.scheme import QuantScheme

    torch.manual_seed(0)
    calib = [torch.randint(0, tiny_model.config.vocab_size, (2, 16))]
    names = [n for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    out = {}
    for groups in ("updated", "released"):
        m = methods.build("qalora", quantizer="gptq", group_size=16, gptq_groups=groups)
        model = m.quantize(copy.deepcopy(tiny_model), calib)
        out[groups] = {n: model.get_submodule(n) for n in names}
        ref = gptq_quantize_model(copy.deepcopy(tiny_model), names, QuantScheme(kind="int", bits=4, group_size=16),
                                  calib, group_params={"updated": "updated", "released": "reference"}[groups])
        for n in names:
            assert torch.equal(out[groups][n].qweight, ref[n].qweight), (groups, n)
            assert torch.equal(out[groups][n].scales, ref[n].scales), (groups, n)
    assert any(not torch.equal(out["updated"][n].scales, out["released"][n].scales) for n in names)
    key = methods.build("qalora", quantizer="gptq", gptq_groups="released").base_key()
    assert key["gptq_groups"] == "released" and "gptq_groups" not in methods.build("qalora", quantizer="gptq").base_key()
    with pytest.raises(methods.ConfigError, match=r"gptq_groups='released' only applies to a GPTQ base"):
        methods.build("qalora", gptq_groups="released")


def test_an_adapter_saved_before_a_hyperparameter_existed_still_loads(tmp_path, tiny_model):
    """A hyperparameter added later (gptq_groups, 2026-12-02) is absent from older adapter_config.json files: such
    an adapter loads, into a fresh or an already prepared model, with the new hyperparameter at its default (the
    behaviour it was trained with); a real mismatch is still an error."""
    import json

    m = methods.build("qalora", rank=4, group_size=32)
    model = m.prepare(copy.deepcopy(tiny_model))
    methods.save_adapter(model, tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["hyperparameters"]["gptq_groups"]
    cfg_path.write_text(json.dumps(cfg))
    for target in (copy.deepcopy(tiny_model), methods.build("qalora", rank=4, group_size=32).prepare(copy.deepcopy(tiny_model))):
        loaded = methods.load_adapter(target, tmp_path / "a")
        assert loaded.qft_method.hp["gptq_groups"] == "updated"
    with pytest.raises(methods.ConfigError, match="holds an adapter of"):
        methods.load_adapter(methods.build("qalora", rank=8, group_size=32).prepare(copy.deepcopy(tiny_model)),
                             tmp_path / "a")
