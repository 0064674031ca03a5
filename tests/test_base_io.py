"""A quantized base saved once and loaded into a fresh model gives the same model, for every base kind."""
from __future__ import annotations

import pytest
import torch

import methods
from methods.base_io import load_quantized_base, save_quantized_base
from tests.conftest import make_tiny_llama


@pytest.mark.parametrize("name,hp", [("qalora", {}), ("qahira-ref", {}), ("qlora", {}), ("lora", {}),
                                     ("loftq", {"iters": 2}), ("loftq", {"bits": 2, "iters": 1}), ("peqa", {"bits": 3})])
def test_quantized_base_roundtrip(tmp_path, name, hp):
    ids = torch.randint(0, 128, (2, 9))
    m = methods.build(name, **({"rank": 4} if name != "peqa" else {}), **hp)
    a = m.quantize(make_tiny_llama())
    save_quantized_base(a, tmp_path / "base", m)
    m.inject(a)
    m2 = methods.build(name, **({"rank": 4} if name != "peqa" else {}), **hp)
    b = m2.inject(load_quantized_base(make_tiny_llama(), tmp_path / "base", m2))
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
    assert methods.count_trainable(a) == methods.count_trainable(b) > 0


def test_base_of_another_method_is_refused(tmp_path):
    m = methods.build("qalora", bits=4)
    save_quantized_base(m.quantize(make_tiny_llama()), tmp_path / "b", m)
    other = methods.build("qalora", bits=3)
    with pytest.raises(methods.ConfigError, match=r"was built for qalora"):
        load_quantized_base(make_tiny_llama(), tmp_path / "b", other)
    # qahira with the same INT4 g32 RTN base shares it
    shared = methods.build("qahira", bits=4)
    assert shared.base_key() == m.base_key()
    load_quantized_base(make_tiny_llama(), tmp_path / "b", shared)
