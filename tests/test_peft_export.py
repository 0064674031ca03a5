"""LoRA-shaped adapters exported in peft's layout load with PeftModel.from_pretrained and give our outputs."""
from __future__ import annotations

import copy

import pytest
import torch

import methods
from methods.adapter import AdapterLinear, PooledAdapter
from methods.peft_export import export_peft_adapter
from tests.conftest import make_tiny_llama

peft = pytest.importorskip("peft")


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, PooledAdapter):
            for p in m.parameters():
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("name", ["lora", "qlora", "loftq"])
def test_peft_loads_exported_adapter(tmp_path, name):
    hp = {"rank": 4, "alpha": 8} | ({"iters": 1} if name == "loftq" else {})
    m = methods.build(name, **hp)
    ours = m.prepare(make_tiny_llama())
    if name != "loftq":  # LoftQ's adapter is its initialisation: keep it, it must load as is
        _randomize(ours)
    export_peft_adapter(ours, tmp_path / "peft")
    # the method's base, without adapters: the 16-bit model, or the very same quantized base modules
    base = make_tiny_llama()
    if name != "lora":
        for n, mod in ours.named_modules():
            if isinstance(mod, AdapterLinear):
                parent, _, child = n.rpartition(".")
                setattr(base.get_submodule(parent), child, copy.deepcopy(mod.base))
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)
    assert loaded.peft_config["default"].r == 4 and loaded.peft_config["default"].lora_alpha == 8


def test_pooled_adapters_are_refused(tmp_path):
    model = methods.build("qalora", rank=4).prepare(make_tiny_llama())
    with pytest.raises(methods.ConfigError, match="only lora, qlora, loftq adapters are LoRA-shaped"):
        export_peft_adapter(model, tmp_path)
