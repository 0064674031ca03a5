"""LoRA-shaped adapters exported in peft's layout: what the contract tester (tests/test_contract.py, every
peft-exportable method: loads with PeftModel.from_pretrained and gives our outputs) does not cover."""
from __future__ import annotations


import pytest
import torch

import methods
from methods.adapter import PooledAdapter
from methods.peft_export import export_peft_adapter
from tests.conftest import make_tiny_llama

peft = pytest.importorskip("peft")


def _randomize(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, PooledAdapter):
            for p in m.parameters():
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_pooled_adapters_are_refused(tmp_path):
    model = methods.build("qalora", rank=4).prepare(make_tiny_llama())
    with pytest.raises(methods.ConfigError, match="only lora, qlora, loftq adapters are LoRA-shaped"):
        export_peft_adapter(model, tmp_path)
