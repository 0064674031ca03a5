"""qftbench.models: tiny-llama, the SmolLM2-135M conversion, path/hub errors and linear_shapes.

The SmolLM2 conversion runs for real (about 20-30 s on 2 cores), once per pytest session, into a
temporary cache folder shared by this session's tests.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qftbench import models
from qftbench.models import (
    ModelLoadError,
    build_tiny_llama,
    ensure_smollm2,
    linear_shapes,
    load_model,
    tiny_llama_config,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def qft_cache(tmp_path_factory) -> Path:
    """One qftbench cache folder for the whole pytest session (shared with test_data.py)."""
    path = tmp_path_factory.getbasetemp() / "qftbench-cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def smollm2_dir(qft_cache) -> Path:
    t0 = time.perf_counter()
    folder = ensure_smollm2(qft_cache)
    print(f"SmolLM2-135M conversion/check took {time.perf_counter() - t0:.1f} s -> {folder}")
    return folder


# ------------------------------------------------------------------------------------ tiny-llama
def test_tiny_llama_config_widths_and_gqa():
    cfg = tiny_llama_config()
    assert cfg.num_attention_heads == 6 and cfg.num_key_value_heads == 2  # grouped-query attention
    assert cfg.hidden_size == 96 and cfg.intermediate_size == 160 and cfg.num_hidden_layers == 2
    assert cfg.tie_word_embeddings
    shapes = linear_shapes(cfg)
    assert len(shapes) == 2 * 7
    widths = {d for _, d_out, d_in in shapes for d in (d_out, d_in)}
    assert widths == {96, 32, 160}
    for w in widths:
        assert w % 32 == 0 and w % 8 == 0, w
    assert any(w & (w - 1) for w in widths), "some width must not be a power of two"
    assert dict((n, (o, i)) for n, o, i in shapes)["model.layers.0.self_attn.k_proj"] == (32, 96)


def test_tiny_llama_is_deterministic_for_its_seed():
    state = torch.random.get_rng_state()
    a = build_tiny_llama(seed=0).state_dict()
    b = build_tiny_llama(seed=0).state_dict()
    c = build_tiny_llama(seed=1).state_dict()
    assert torch.equal(state, torch.random.get_rng_state()), "global RNG must be left untouched"
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


def test_load_tiny_llama_with_real_tokenizer(qft_cache):
    model, tok = load_model("tiny-llama", cache_dir=qft_cache)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert len(tok) == model.config.vocab_size == 49152
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None and tok.padding_side == "right"
    linears = {n: tuple(m.weight.shape) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert linears == {n: (o, i) for n, o, i in linear_shapes(model.config)}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    n_params = sum(p.numel() for p in model.parameters())
    assert 4_000_000 < n_params < 6_000_000
    ids = tok("Hello world", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    m2, _ = load_model("tiny-llama", cache_dir=qft_cache)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), m2.parameters()))
    m16, _ = load_model("tiny-llama", dtype=torch.bfloat16, cache_dir=qft_cache)
    assert m16.model.embed_tokens.weight.dtype == torch.bfloat16


def test_tiny_tokenizer_alone_is_extracted_atomically(tmp_path):
    """Without a converted SmolLM2 folder the tokenizer is extracted from the GGUF on its own."""
    tok = models.load_tokenizer_smollm2(tmp_path)
    assert len(tok) == 49152
    folder = tmp_path / "smollm2-tokenizer"
    assert (folder / "tokenizer.json").is_file() and (folder / "qftbench_conversion.json").is_file()
    assert not list(tmp_path.glob(".*tmp-*"))
    assert tok("The capital of France").input_ids == models.load_tokenizer_smollm2(tmp_path)("The capital of France").input_ids


# ------------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_smollm2_conversion_config(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"]) == (576, 30, 9, 3)
    assert (smollm2_dir / "model.safetensors").is_file() and (smollm2_dir / "tokenizer.json").is_file()
    assert not list(smollm2_dir.parent.glob(".smollm2-135m.tmp-*")), "no temporary folder may remain"


@pytest.mark.slow
def test_smollm2_generates_sensible_text_and_is_reused(smollm2_dir, qft_cache):
    weights = smollm2_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m", cache_dir=qft_cache)
    load_s = time.perf_counter() - t0
    assert weights.stat().st_mtime_ns == mtime, "a second call must reuse the converted folder"
    assert load_s < 15, f"reloading the converted folder took {load_s:.1f} s"
    assert model.hf_quantizer is None if hasattr(model, "hf_quantizer") else True
    assert not hasattr(model.config, "quantization_config")
    assert model.config.hidden_size == 576 and model.config.num_key_value_heads == 3
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids.shape[1]:])
    assert "Paris" in text, text
    shapes = linear_shapes(model.config)
    assert len(shapes) == 30 * 7
    actual = {n: tuple(m.weight.shape) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert actual == {n: (o, i) for n, o, i in shapes}
    assert dict((n, (o, i)) for n, o, i in shapes)["model.layers.29.self_attn.v_proj"] == (192, 576)


@pytest.mark.slow
def test_smollm2_dtype(smollm2_dir, qft_cache):
    model, _ = load_model("smollm2-135m", dtype=torch.bfloat16, cache_dir=qft_cache)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.slow
def test_killed_conversion_leaves_no_model_folder(tmp_path):
    """SIGKILL in the middle of a conversion: no half folder; the stale temp folder is cleaned later."""
    code = ("import sys; from qftbench.models import ensure_smollm2; ensure_smollm2(sys.argv[1])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(tmp_path.glob(".smollm2-135m.tmp-*")):
            if proc.poll() is not None:
                pytest.fail(f"conversion subprocess exited early with {proc.returncode}")
            time.sleep(0.05)
        assert list(tmp_path.glob(".smollm2-135m.tmp-*")), "the conversion never started"
        time.sleep(1.0)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "smollm2-135m").exists()
    stale = list(tmp_path.glob(".smollm2-135m.tmp-*"))
    assert stale, "the killed process's temp folder should still be there"
    models._remove_stale_tmp(tmp_path, "smollm2-135m")
    assert not list(tmp_path.glob(".smollm2-135m.tmp-*"))


def test_failed_build_leaves_nothing(tmp_path):
    def build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("conversion failed half way")

    with pytest.raises(RuntimeError, match="half way"):
        models._atomic_build(tmp_path, "thing", build, {})
    assert list(tmp_path.iterdir()) == []


def test_incomplete_folder_is_replaced(tmp_path):
    (tmp_path / "thing").mkdir()
    (tmp_path / "thing" / "junk.bin").write_text("half")
    out = models._atomic_build(tmp_path, "thing", lambda tmp: (tmp / "ok.txt").write_text("ok"), {"x": 1})
    assert sorted(p.name for p in out.iterdir()) == ["ok.txt", "qftbench_conversion.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model-dir", "~/no-such-qftbench-model"])
def test_missing_local_path_error(name):
    with pytest.raises(ModelLoadError) as exc:
        load_model(name)
    msg = str(exc.value)
    assert repr(name) in msg and "does not exist" in msg and "Fix:" in msg and "huggyllama/llama-7b" in msg
    assert isinstance(exc.value, OSError)


def test_folder_without_config_error(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"has no config.json.*weights.gguf.*Fix:"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        load_model(str(tmp_path / "model.safetensors"))


def test_offline_hub_id_not_cached_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as exc:
        load_model("huggyllama/llama-7b", cache_dir=tmp_path)
    msg = str(exc.value)
    assert "'huggyllama/llama-7b'" in msg and "offline" in msg and "Fix:" in msg


def test_local_folder_roundtrip(tmp_path, qft_cache):
    """A saved tiny-llama folder loads back through the ordinary from_pretrained path."""
    model, tok = load_model("tiny-llama", cache_dir=qft_cache)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, t2 = load_model(str(tmp_path / "m"))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), m2.parameters()))
    assert t2("abc").input_ids == tok("abc").input_ids


# ------------------------------------------------------------------------------------ shapes
def test_linear_shapes_from_config_alone():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32)  # llama-7b, no weights built
    shapes = linear_shapes(cfg)
    assert len(shapes) == 32 * 7
    assert shapes[0] == ("model.layers.0.self_attn.q_proj", 4096, 4096)
    assert shapes[4:7] == [("model.layers.0.mlp.gate_proj", 11008, 4096),
                           ("model.layers.0.mlp.up_proj", 11008, 4096),
                           ("model.layers.0.mlp.down_proj", 4096, 11008)]
    assert shapes[-1][0] == "model.layers.31.mlp.down_proj"


def test_typo_of_builtin_name_error():
    with pytest.raises(ModelLoadError, match=r"Unknown model 'tiny_llama'\. Did you mean \"tiny-llama\"\?.*Fix:"):
        load_model("tiny_llama")
