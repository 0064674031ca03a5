"""GPTQ for INTk (methods/quant/gptq.py): layer-level error vs RTN, code ranges, model-level replacement,
true-sequential, calibration windows, determinism. Tiny random data and models only, built here (seeded)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from methods.errors import ConfigError, ShapeError
from methods.quant.gptq import (
    HessianAccumulator,
    calibration_from_texts,
    gptq_quantize_model,
    gptq_quantize_weight,
)
from methods.quant.intk import _blocks, int_dequantize, int_quantize

D_OUT, D_IN, N_TOK = 64, 128, 1024


def _layer_data(seed: int = 0):
    """Correlated inputs with a few large features (as in real LLM activations) and a weight."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D_IN, D_IN, generator=g) / D_IN**0.5 + torch.eye(D_IN)
    x = torch.randn(N_TOK, D_IN, generator=g) @ mix
    x[:, :4] *= 8.0
    w = torch.randn(D_OUT, D_IN, generator=g) * 0.05
    return w, x


def _rel_out_err(x, w, wq):
    return float((x @ w.T - x @ wq.T).norm() / (x @ w.T).norm())


@pytest.fixture(scope="module")
def layer():
    w, x = _layer_data()
    acc = HessianAccumulator(D_IN)
    acc.add_batch(x[:300])
    acc.add_batch(x[300:].reshape(2, -1, D_IN)[:, :, :])  # 3-D input is flattened
    return w, x, acc.H


# ------------------------------------------------------------------------------------------ Hessian

def test_hessian_accumulator_is_running_2_over_n_xtx():
    w, x = _layer_data(1)
    acc = HessianAccumulator(D_IN)
    for chunk in x.split(100):
        acc.add_batch(chunk)
    assert acc.n_samples == N_TOK
    torch.testing.assert_close(acc.H, 2.0 / N_TOK * x.T @ x, rtol=1e-4, atol=1e-4)

    lin = nn.Linear(D_IN, D_OUT)
    hook_acc = HessianAccumulator(D_IN)
    handle = hook_acc.attach(lin)
    with torch.no_grad():
        lin(x[:512].reshape(4, 128, D_IN))
        lin(x[512:])
    handle.remove()
    torch.testing.assert_close(hook_acc.H, acc.H, rtol=1e-4, atol=1e-4)
    with pytest.raises(ShapeError, match="in_features=128"):
        acc.add_batch(torch.zeros(3, 5))


# ------------------------------------------------------------------------------------------ one layer

@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("tile", [(1, 32), (8, 4)])
def test_gptq_beats_rtn_and_codes_are_valid(layer, bits, tile):
    w, x, H = layer
    codes, scale, zero = gptq_quantize_weight(w, H, bits, tile)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert scale.shape == zero.shape == (D_OUT // tile[0], D_IN // tile[1])
    assert int(codes.max()) <= 2**bits - 1
    wq = int_dequantize(codes, scale, zero, tile)
    # at most 2^k distinct values per block
    blocks = _blocks(wq, tile)
    n_distinct = max(len(torch.unique(blocks[i, j])) for i in range(blocks.shape[0]) for j in range(blocks.shape[1]))
    assert n_distinct <= 2**bits
    # zero points are floats (not rounded): at least some are non-integer
    assert (zero != torch.round(zero)).any()

    err_gptq = _rel_out_err(x, w, wq)
    err_rtn = _rel_out_err(x, w, int_dequantize(*int_quantize(w, bits, tile), tile))
    print(f"bits={bits} tile={tile}: rel. layer-output error GPTQ {err_gptq:.4f}  RTN {err_rtn:.4f}")
    assert err_gptq < 0.85 * err_rtn


def test_group_params_reference_equals_updated_when_batch_is_one_group(layer):
    w, x, H = layer
    a = gptq_quantize_weight(w, H, 4, (1, 32), block_size=32, group_params="updated")
    b = gptq_quantize_weight(w, H, 4, (1, 32), block_size=32, group_params="reference")
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_lazy_batch_size_only_changes_rounding(layer):
    # block_size 20 does not align with the groups of 32: exercises the pending-update path for groups that
    # straddle a batch boundary; the algorithm is the same, only float rounding differs
    w, x, H = layer
    c1, s1, z1 = gptq_quantize_weight(w, H, 3, (1, 32), block_size=128)
    c2, s2, z2 = gptq_quantize_weight(w, H, 3, (1, 32), block_size=20)
    assert (c1 == c2).float().mean() > 0.99
    e1 = _rel_out_err(x, w, int_dequantize(c1, s1, z1, (1, 32)))
    e2 = _rel_out_err(x, w, int_dequantize(c2, s2, z2, (1, 32)))
    assert abs(e1 - e2) < 0.01 * e1


def test_dead_inputs_and_determinism(layer):
    w, x, _ = layer
    x = x.clone()
    x[:, [3, 50, 51]] = 0.0  # inputs never active in the calibration data
    acc = HessianAccumulator(D_IN)
    acc.add_batch(x)
    assert (torch.diagonal(acc.H)[[3, 50, 51]] == 0).all()
    for dead in ("zero", "keep"):
        codes, scale, zero = gptq_quantize_weight(w, acc.H, 4, (1, 32), dead=dead)
        wq = int_dequantize(codes, scale, zero, (1, 32))
        assert torch.isfinite(wq).all()
        err = _rel_out_err(x, w, wq)
        assert err < _rel_out_err(x, w, int_dequantize(*int_quantize(w, 4, (1, 32)), (1, 32)))
    # dead="keep": the dead columns still approximate the original weights
    codes, scale, zero = gptq_quantize_weight(w, acc.H, 4, (1, 32), dead="keep")
    wq = int_dequantize(codes, scale, zero, (1, 32))
    assert (wq[:, 50] - w[:, 50]).abs().max() < 0.05
    again = gptq_quantize_weight(w, acc.H, 4, (1, 32), dead="keep")
    assert all(torch.equal(u, v) for u, v in zip((codes, scale, zero), again))


def test_all_dead_hessian_falls_back_to_rtn_like():
    w, _ = _layer_data(2)
    codes, scale, zero = gptq_quantize_weight(w, torch.zeros(D_IN, D_IN), 4, (1, 32), dead="keep")
    rtn = int_quantize(w, 4, (1, 32))
    assert torch.equal(codes, rtn[0])  # identity Hessian: no error propagation at all


def test_weight_level_errors(layer):
    w, x, H = layer
    with pytest.raises(ShapeError, match="expected \\(128, 128\\)"):
        gptq_quantize_weight(w, H[:64, :64], 4, (1, 32))
    with pytest.raises(ShapeError, match="divisible"):
        gptq_quantize_weight(w, H, 4, (1, 48))
    with pytest.raises(ConfigError, match="bits=5"):
        gptq_quantize_weight(w, H, 5, (1, 32))
    with pytest.raises(ConfigError, match="group_params"):
        gptq_quantize_weight(w, H, 4, (1, 32), group_params="fresh")


# ------------------------------------------------------------------------------------------ model level

VOCAB = 128


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float().eval()


def _markov_tokens(n_seq, seq_len, seed):
    """Token sequences from a fixed random Markov chain (structured, unlike uniform noise)."""
    g = torch.Generator().manual_seed(1234)
    trans = torch.softmax(torch.randn(VOCAB, VOCAB, generator=g) * 3, dim=-1)
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, VOCAB, (n_seq,), generator=g)]
    for _ in range(seq_len - 1):
        cols.append(torch.multinomial(trans[cols[-1]], 1, generator=g)[:, 0])
    return list(torch.stack(cols, dim=1))


def _targets(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def _rtn_model(model, scheme):
    from methods.quant.linear import QuantLinear

    m = copy.deepcopy(model)
    for name in _targets(model):
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent), child, QuantLinear.from_linear(model.get_submodule(name), scheme))
    return m


@pytest.fixture(scope="module")
def llama_and_data():
    model = _tiny_llama()
    calib = [s.unsqueeze(0) for s in _markov_tokens(16, 64, seed=1)]
    held_out = torch.stack(_markov_tokens(4, 64, seed=2))
    return model, calib, held_out


@pytest.mark.parametrize("scheme_kw", [dict(bits=4, group_size=32), dict(bits=3, tile=(8, 4))])
def test_model_level_gptq_closer_to_fp32_than_rtn(llama_and_data, scheme_kw):
    from methods.quant.linear import QuantLinear
    from methods.quant.scheme import QuantScheme

    model, calib, held_out = llama_and_data
    scheme = QuantScheme("int", **scheme_kw)
    targets = _targets(model)
    assert len(targets) == 14
    mg = copy.deepcopy(model)
    out = gptq_quantize_model(mg, targets, scheme, calib)
    assert list(out) == targets
    for name in targets:
        assert isinstance(mg.get_submodule(name), QuantLinear)
        assert mg.get_submodule(name) is out[name]
        assert int(out[name].codes().max()) <= 2**scheme.bits - 1
    mr = _rtn_model(model, scheme)
    with torch.no_grad():
        ref = model(held_out).logits
        err_g = float((mg(held_out).logits - ref).pow(2).mean().sqrt())
        err_r = float((mr(held_out).logits - ref).pow(2).mean().sqrt())
    print(f"{scheme.label()}: held-out logit RMSE vs fp32: GPTQ {err_g:.4f}  RTN {err_r:.4f}")
    assert err_g < 0.9 * err_r

    # determinism: the same inputs give bit-identical layers
    mg2 = copy.deepcopy(model)
    out2 = gptq_quantize_model(mg2, targets[:3], scheme, calib)  # block 0 q/k/v: same first stage
    for name in targets[:3]:
        assert torch.equal(out2[name].codes(), out[name].codes())
        assert torch.equal(out2[name].zeros, out[name].zeros)


def test_true_sequential_uses_quantized_inputs(llama_and_data):
    from methods.quant.scheme import QuantScheme

    model, calib, _ = llama_and_data
    scheme = QuantScheme("int", 2, group_size=32)
    targets = _targets(model)
    a = gptq_quantize_model(copy.deepcopy(model), targets, scheme, calib[:4], true_sequential=True)
    b = gptq_quantize_model(copy.deepcopy(model), targets, scheme, calib[:4], true_sequential=False)
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(a[first].codes(), b[first].codes())  # same (unquantized) inputs in both modes
    later = "model.layers.0.mlp.down_proj"
    assert not torch.equal(a[later].codes(), b[later].codes())  # inputs from quantized q..up vs fp32
    # block 1 sees the outputs of the quantized block 0 in both modes, which differ
    assert not torch.equal(a["model.layers.1.self_attn.q_proj"].codes(), b["model.layers.1.self_attn.q_proj"].codes())


def test_model_level_errors(llama_and_data):
    from methods.quant.scheme import QuantScheme

    model, calib, _ = llama_and_data
    m = copy.deepcopy(model)
    scheme = QuantScheme("int", 4, group_size=32)
    with pytest.raises(ConfigError, match="decoder blocks"):
        gptq_quantize_model(m, ["lm_head"], scheme, calib[:1])
    with pytest.raises(ConfigError, match="no module named"):
        gptq_quantize_model(m, ["model.layers.0.self_attn.q_prj"], scheme, calib[:1])
    with pytest.raises(ConfigError, match="calibration is empty"):
        gptq_quantize_model(m, ["model.layers.0.self_attn.q_proj"], scheme, [])
    with pytest.raises(ConfigError, match="kind='int'"):
        gptq_quantize_model(m, ["model.layers.0.self_attn.q_proj"], QuantScheme("nf", 4), calib[:1])
    assert all(isinstance(m.get_submodule(t), nn.Linear) for t in _targets(model))  # nothing replaced


# ------------------------------------------------------------------------------------------ calibration

def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab["<unk>"] = VOCAB - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def test_calibration_from_texts_windows_are_deterministic():
    tok = _tiny_tokenizer()
    texts = [" ".join(f"w{(7 * i + j) % 100}" for j in range(40)) for i in range(10)]
    stream = tok("\n\n".join(texts), return_tensors="pt")["input_ids"][0]
    rng_before = torch.random.get_rng_state()
    a = calibration_from_texts(tok, texts, n_samples=6, seq_len=16, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # no global RNG used
    b = calibration_from_texts(tok, texts, n_samples=6, seq_len=16, seed=3)
    c = calibration_from_texts(tok, texts, n_samples=6, seq_len=16, seed=4)
    assert len(a) == 6 and all(t.shape == (1, 16) and t.dtype == torch.long for t in a)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    windows = stream.unfold(0, 16, 1)
    for t in a:  # each sample is a contiguous window of the token stream
        assert (windows == t[0]).all(dim=1).any()
    with pytest.raises(ConfigError, match="fewer than seq_len"):
        calibration_from_texts(tok, texts[:1], n_samples=1, seq_len=1000, seed=0)
