"""Shared fixtures: tiny random Llama models built in-process (nothing is downloaded)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_llama_config(hidden=96, intermediate=160, layers=2, heads=6, kv_heads=2, vocab=128):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=128, tie_word_embeddings=False)


def make_tiny_llama(seed: int = 0, **kw):
    """A random LlamaForCausalLM with GQA and non-power-of-two widths (96, 160; k/v out = 32)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).float().eval()
    return model


@pytest.fixture
def tiny_model():
    return make_tiny_llama()


def shared_data_root() -> Path | None:
    root = Path(os.environ.get("QFTBENCH_DATA_ROOT", REPO.parent / "shared" / "data"))
    return root if root.is_dir() else None
