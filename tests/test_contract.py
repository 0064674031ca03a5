"""The method contract: one table of cases (CASES) drives one shared tester that every registered method passes,
as peft's ``TEST_CASES`` drive its ``PeftCommonTester``.

A method registered without a row here fails :func:`test_every_registered_method_has_a_case`: adding a method is
one file, one registry line and one row below (README, "Adding a method"). Each row says how the method is built
for the tests and what the contract expects of it; the checks are against computations that do not use the
method's own forward:

- ``reference``: ``pooled``: Δy = s·c·x·kron(M, ones(q, p))ᵀ from the geometry in ``tests/test_methods.SPEC``
  (written out from METHODS.md); ``scales``: PEQA's y = x·((S + ΔS)·(Q − Z))ᵀ from the layer's codes, scales and
  zero points; ``quantized``: the un-tuned base, y = x·Q(W)ᵀ with each layer's own weight quantized by the scheme
  (the identity for 16 bits); ``peft``: peft's own layers, compared with peft's own model in
  tests/test_peft_method.py (not repeated here);
- ``merge``: ``int`` (an INT model again: codes unchanged, the output exactly the unmerged one's), ``dense``
  (16-bit weights, the output the unmerged one's to float32 rounding), ``none`` (nothing to merge);
- every trained method: save/load gives the same logits, the trainable parameters are exactly the adapter's and
  their number equals the accounting's (qftbench.accounting, from the model's config alone) and the method's
  own per-layer formula; ``peft_exportable`` methods load in peft's ``PeftModel`` with the same logits, the others
  are refused with the reason.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import methods
from methods import AdapterLinear
from methods.quant.linear import QuantLinear
from tests.conftest import make_tiny_llama, tiny_llama_config
from tests.test_methods import SPEC, reference_delta

R, ALPHA = 8, 16.0
LORA = {"rank": R, "alpha": ALPHA}

#: name -> (hyperparameters, reference, merge); the table every registered method must have a row in
CASES = {
    "lora": ({**LORA}, "pooled", "dense"),
    "qlora": ({**LORA}, "pooled", "dense"),
    "loftq": ({**LORA, "iters": 1}, "pooled", "dense"),
    "qbara": ({**LORA, "k": 2}, "pooled", "dense"),
    "qalora": ({**LORA, "group_size": 32}, "pooled", "int"),
    "qahira": ({**LORA, "group_size": 32}, "pooled", "int"),
    "qahira-ref": ({**LORA}, "pooled", "int"),
    "peqa": ({"group_size": 32}, "scales", "int"),
    "base": ({"bits": 4, "group_size": 32}, "quantized", "none"),
    "peft": ({"base": "16bit", "peft": {"peft_type": "LORA", "r": 4, "lora_alpha": 8}}, "peft", "dense"),
}
NAMES = list(CASES)
TRAINED = [n for n in NAMES if CASES[n][1] != "quantized"]
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def build(name):
    return methods.build(name, **copy.deepcopy(CASES[name][0]))


def randomize(model, seed=0):
    """Every trainable tensor random (B = 0 at init would hide the adapter from every check)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.02)


def prepared(name, seed=0):
    m = build(name)
    model = m.prepare(make_tiny_llama())
    randomize(model, seed)
    return m, model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_every_registered_method_has_a_case():
    missing = [n for n in methods.names() if n not in CASES]
    assert not missing, (f"registered methods without a row in tests/test_contract.py's CASES: {missing}; add "
                         f"(hyperparameters, reference, merge) for each")
    assert set(CASES) <= set(methods.names()), "a row for a method that is not registered"


@pytest.mark.parametrize("name", NAMES)
def test_trainable_parameters_are_the_adapter_and_the_accounting_counts_them(name):
    from qftbench.accounting import account

    m = build(name)
    model = m.prepare(make_tiny_llama())
    n = methods.count_trainable(model)
    acc = account(tiny_llama_config().to_dict(), m)
    assert acc["trainable_params"] == n, (acc["trainable_params"], n)
    if name != "peft":  # (peft's layers: counted by peft, tests/test_peft_method.py)
        shapes = [(x.out_features, x.in_features) for k, x in make_tiny_llama().named_modules()
                  if isinstance(x, torch.nn.Linear) and not k.endswith("lm_head")]
        assert n == sum(m.trainable_params(o, i) for o, i in shapes)
    if name == "base":
        assert n == 0
    else:
        assert n > 0
        frozen_ok = ("adapter", "scale_delta", "lora_", "base_layer")
        assert all(any(t in k for t in frozen_ok) for k, p in model.named_parameters() if p.requires_grad)
    assert "lm_head" not in {k.rsplit(".", 1)[0] for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", NAMES)
def test_forward_equals_the_reference(name):
    reference = CASES[name][1]
    if reference == "peft":
        pytest.skip("peft's layers are compared with peft's own model in tests/test_peft_method.py")
    m, model = prepared(name, seed=1)
    orig = make_tiny_llama()
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(2))
    checked = 0
    for k, lin in orig.named_modules():
        if not isinstance(lin, torch.nn.Linear) or k.endswith("lm_head"):
            continue
        mod = model.get_submodule(k)
        with torch.no_grad():
            if lin.in_features != 96:
                continue
            got = mod(x).double().numpy()
            if reference == "pooled":
                _, p, q, kind, _ = SPEC[name]
                ad = mod.adapter
                M = (ad.H if kind == "H" else ad.B @ ad.A).detach().numpy()
                want = mod.base(x).double().numpy() + reference_delta(x.numpy(), M, p, q, ALPHA / R)
            elif reference == "scales":  # (S + ΔS)·(Q − Z), the groups expanded along the input
                g = CASES[name][0]["group_size"]
                s = (mod.scales + mod.scale_delta).double().repeat_interleave(g, dim=1)
                z = mod.zeros.double().repeat_interleave(g, dim=1)
                assert not torch.equal(mod.scale_delta, torch.zeros_like(mod.scale_delta))
                want = x.double().numpy() @ (s * (mod.codes().double() - z)).numpy().T
            else:  # the un-tuned base: the layer's own weight through the scheme's quantizer
                w = lin.weight.detach().float()
                want = (x.double() @ m.scheme().fake_quant(w).double().T).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=k)
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("name", TRAINED)
def test_save_and_load_give_the_same_model(tmp_path, name):
    m, model = prepared(name, seed=5)
    methods.save_adapter(model, tmp_path)
    fresh = methods.load_adapter(make_tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model))
    if name != "peft":
        sd = methods.adapter_state_dict(model)
        assert sum(v.numel() for v in sd.values()) == methods.count_trainable(model)


@pytest.mark.parametrize("name", NAMES)
def test_merge_keeps_the_output(name):
    kind = CASES[name][2]
    m, model = prepared(name, seed=3)
    want = logits(model)
    if kind == "int":
        codes = {k: x.codes().clone() for k, x in model.named_modules() if isinstance(x, QuantLinear)}
        merged = m.merge(model)
        got = logits(merged)
        assert float((got - want).norm() / want.norm()) < 1e-5
        for k, c in codes.items():  # an INT model again, with the same codes
            key = k[: -len(".base")] if k.endswith(".base") else k
            assert isinstance(merged.get_submodule(key), QuantLinear)
            assert torch.equal(merged.get_submodule(key).codes(), c)
    elif kind == "dense":
        merged = m.merge(copy.deepcopy(model), dtype=torch.float32)
        torch.testing.assert_close(logits(merged), want, rtol=1e-4, atol=1e-4)
        assert not any(isinstance(x, (AdapterLinear, QuantLinear)) for x in merged.modules())
    else:
        merged = m.merge(model)
        torch.testing.assert_close(logits(merged), want, rtol=0, atol=0)
    assert methods.count_trainable(merged) == 0


@pytest.mark.parametrize("name", TRAINED)
def test_peft_export_where_the_method_says_it_applies(tmp_path, name):
    peft = pytest.importorskip("peft")
    from methods.peft_export import export_peft_adapter

    m, model = prepared(name, seed=7)
    if not getattr(m, "peft_exportable", False):
        with pytest.raises(methods.ConfigError, match="LoRA-shaped"):
            export_peft_adapter(model, tmp_path)
        return
    export_peft_adapter(model, tmp_path / "peft")
    base = make_tiny_llama()  # the method's base, without adapters: the very same base modules
    for k, mod in model.named_modules():
        if isinstance(mod, AdapterLinear):
            parent, _, child = k.rpartition(".")
            setattr(base.get_submodule(parent), child, copy.deepcopy(mod.base))
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    assert loaded.peft_config["default"].r == m.hp["rank"] and loaded.peft_config["default"].lora_alpha == m.hp["alpha"]
