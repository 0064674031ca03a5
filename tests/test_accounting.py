"""qftbench.accounting: METHODS.md's parameter table, FLOPs against torch's FlopCounterMode, bits, the CLI."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import methods
from methods.errors import ConfigError, ShapeError
from qftbench.accounting import (account, base_flops_per_token, base_params, bits_from_record, known_models,
                                 linear_shapes, load_config)

PAPER_MODELS = {  # model -> (qlora/lora/qbara, qalora g=32, qahira/qahira-ref), METHODS.md, as printed
    "llama-7b": ("159.9M", "89.3M", "202.4M"),
    "llama2-7b": ("159.9M", "89.3M", "202.4M"),
    "llama-13b": ("250.3M", "139.9M", "396.5M"),
    "llama2-13b": ("250.3M", "139.9M", "396.5M"),
    "llama-33b": ("487.6M", "272.4M", "1003.2M"),
    "llama-65b": ("799.5M", "446.5M", "2023.8M"),
}
TABLE_COLUMN = {"qlora": 0, "lora": 0, "qbara": 0, "qalora": 1, "qahira": 2, "qahira-ref": 2}


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M"


# ------------------------------------------------------------------------------------- parameter table
@pytest.mark.parametrize("model", list(PAPER_MODELS))
@pytest.mark.parametrize("method", list(TABLE_COLUMN))
def test_methods_md_parameter_table(model, method):
    hp = {"rank": 64} if method in ("qlora", "lora", "qbara") else {"rank": 64, "bits": 4}
    if method in ("qalora", "qahira"):
        hp["group_size"] = 32
    r = account(model, method, **hp)
    assert _m(r["trainable_params"]) == PAPER_MODELS[model][TABLE_COLUMN[method]]
    assert r["n_target_layers"] == 7 * r["dims"]["layers"]


@pytest.mark.parametrize("model, qlora_m, qalora_m", [
    ("llama-7b", 160, 89), ("llama-13b", 250, 140), ("llama-33b", 488, 272), ("llama-65b", 800, 447)])
def test_issue_check_rounded(model, qlora_m, qalora_m):
    assert round(account(model, "qlora", rank=64)["trainable_params"] / 1e6) == qlora_m
    assert round(account(model, "qalora", rank=64, group_size=32)["trainable_params"] / 1e6) == qalora_m


def test_exact_counts_llama7b():
    # r·(D_in + D_out) summed: 32 · 64 · (4·8192 + 3·15104); D_in·D_out/32 for QA-HiRA; 1/32 of the input for QA-LoRA
    assert account("llama-7b", "qlora")["trainable_params"] == 159_907_840
    assert account("llama-7b", "qahira")["trainable_params"] == 6_476_005_376 // 32
    assert account("llama-7b", "qalora")["trainable_params"] == 32 * 64 * (4 * (128 + 4096) + 2 * (128 + 11008)
                                                                            + (344 + 4096))
    assert account("llama-7b", "peqa")["trainable_params"] == 6_476_005_376 // 32
    # LoftQ is LoRA-shaped; Q-BaRA equals LoRA for any k that divides the widths
    assert account("llama-7b", "loftq")["trainable_params"] == 159_907_840
    assert account("llama-7b", "qbara", k=4)["trainable_params"] == 159_907_840


def test_builtin_configs_match_published_sizes():
    published = {"llama-7b": 6_738_415_616, "llama2-7b": 6_738_415_616, "llama-13b": 13_015_864_320,
                 "llama2-13b": 13_015_864_320, "llama-33b": 32_528_943_616, "llama-65b": 65_285_660_672,
                 "smollm2-135m": 134_515_008}
    assert sorted(known_models()) == sorted(published)
    for name, n in published.items():
        assert base_params(load_config(name)[1]) == n, name
    _, smol = load_config("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (smol["num_key_value_heads"], smol["tie_word_embeddings"], smol["vocab_size"]) == (3, True, 49152)
    assert load_config("huggyllama/llama-30b")[0] == "llama-33b"


def test_builtin_configs_build_the_same_model_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    for name in ("smollm2-135m", "llama-7b"):
        _, cfg = load_config(name)
        lc = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("name", "hub_id")})
        with torch.device("meta"):
            model = LlamaForCausalLM(lc)
        assert sum(p.numel() for p in model.parameters()) == base_params(cfg)
        got = [(n, m.out_features, m.in_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        assert got == linear_shapes(cfg)


# ------------------------------------------------------------------------------ tiny model, measured
HP = {"lora": {"rank": 8}, "qlora": {"rank": 8}, "qalora": {"rank": 8, "group_size": 32},
      "loftq": {"rank": 8, "iters": 1}, "qbara": {"rank": 8, "k": 2}, "qahira": {"group_size": 32},
      "qahira-ref": {}, "peqa": {"group_size": 32}, "base": {"bits": 4, "quant_type": "int", "group_size": 32},
      "peft": {"peft": {"peft_type": "LORA", "r": 8, "lora_alpha": 16}}}  # measured (methods.peft_method.measure)
B, S = 2, 24


def tiny_config(tied=False):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    cfg._attn_implementation = "eager"  # sdpa's CPU kernel has no FLOP formula; eager's bmm are counted
    return cfg


def tiny_model(seed=0, tied=False):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(tied)).float().eval()


def _gemm_4bit_flops(a_shape, b_shape, shape_b, *args, out_shape=None, **kwargs):
    rows = 1
    for d in a_shape[:-1]:
        rows *= d
    return 2 * rows * shape_b[0] * shape_b[1]


def _counter():
    mapping = {}
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
        mapping[torch.ops.bitsandbytes.gemm_4bit] = _gemm_4bit_flops
    except (ImportError, AttributeError):
        pass
    return FlopCounterMode(display=False, custom_mapping=mapping)


def measure(model, ids, backward=False):
    with _counter() as fc:
        out = model(ids).logits
    fwd = fc.get_total_flops()
    if not backward:
        return fwd
    loss = out.float().square().mean()
    with _counter() as fc:
        loss.backward()
    return fwd, fc.get_total_flops()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (B, S), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tied", [False, True])
def test_base_structure_and_forward_flops(ids, tied):
    model = tiny_model(tied=tied)
    cfg = tiny_config(tied)
    assert sum(p.numel() for p in model.parameters()) == base_params(cfg)
    got = [(n, m.out_features, m.in_features) for n, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert got == linear_shapes(cfg)
    assert ("model.layers.0.self_attn.k_proj", 32, 96) in got  # GQA: 2 kv heads of 16
    with torch.no_grad():
        assert measure(model, ids) == base_flops_per_token(cfg, seq_len=S)["total"] * B * S


@pytest.mark.parametrize("name", list(HP))
def test_account_matches_prepared_tiny_model(ids, name):
    """Forward: prepared - unprepared == adapter_flops_per_token x tokens, exactly. Training: autograd forms every
    gradient of the formula except the input gradients of layer 0's q/k/v (the frozen embeddings need none):
    measured = formula - base part - adapter input-gradient part, the latter at most the adapter forward of
    those three layers (exact for LoRA: 2·r·d_in per layer and token; none for PEQA)."""
    cfg, hp, tokens = tiny_config(), HP[name], B * S
    r = account(cfg, name, seq_len=S, **hp)
    method = methods.build(name, **hp)
    model = method.prepare(tiny_model()).train()
    assert r["trainable_params"] == methods.count_trainable(model)
    if r["trainable_params"] == 0:  # the un-tuned base: nothing to train, no backward
        assert r["train_flops_per_token"] == r["forward_flops_per_token"] == base_flops_per_token(cfg, S)["total"]
        with torch.no_grad():
            assert measure(model, ids) == r["forward_flops_per_token"] * tokens
        return
    fwd, bwd = measure(model, ids, backward=True)
    assert fwd - base_flops_per_token(cfg, seq_len=S)["total"] * tokens == r["adapter_flops_per_token"] * tokens
    assert fwd == r["forward_flops_per_token"] * tokens
    assert (r["adapter_flops_per_token"] == 0) == (name == "peqa")
    assert (r["flops"]["base_weight_grad"] > 0) == (name == "peqa")

    first_qkv = linear_shapes(cfg)[:3]
    missing = (r["train_flops_per_token"] - r["flops"]["first_layer_input_grad_base"]) * tokens - (fwd + bwd)
    assert 0 <= missing <= sum(method.adapter_flops_per_token(o, i) for _, o, i in first_qkv) * tokens
    if name in ("lora", "peqa", "peft"):
        rank = hp.get("rank", hp.get("peft", {}).get("r", 0))
        assert missing == sum(2 * rank * i for _, _, i in first_qkv) * tokens


def test_every_method_is_measured():
    missing = sorted(set(methods.names()) - set(HP))
    assert not missing, f"registered methods without a FLOP test: {missing}; add them to HP in this file"


# ------------------------------------------------------------------------------------------------ bits
def test_bits_per_param():
    q = account("llama-7b", "qlora")
    # the deployed format; NF4 + DQ as bitsandbytes stores it
    assert q["bits_per_param_target"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)  # ≈ 4.127
    assert round(q["bits_per_param_target"], 3) == 4.127 and q["bits_per_param_format"] == "deployed"
    assert q["bits_per_param_target_working"] == q["bits_per_param_target"]  # bnb's storage is the working copy
    assert q["bits_per_param_gptq"] is None and q["bits_per_param_target_gptq"] is None
    # non-target weights (embedding, LM head, norms: 262.4M) stay at 16 bits
    n, t = q["base_params"], q["target_params"]
    assert q["bits_per_param"] == pytest.approx((q["bits_per_param_target"] * t + 16 * (n - t)) / n)
    assert q["adapter_bits"] == 16 * q["trainable_params"]  # "4+16": the adapter ships beside the NF4 base
    lora = account("llama-7b", "lora")
    assert lora["bits_per_param"] == lora["bits_per_param_target"] == 16 and lora["adapter_bits"] == 0
    assert lora["bits_per_param_target_working"] == 16 and lora["bits_per_param_target_gptq"] is None
    qa = account("llama-7b", "qalora", bits=4, group_size=32)
    # int-merge, deployed: 4-bit codes + fp16 scale + fp16 float zero per group of 32, the adapter merged away
    assert qa["bits_per_param_target"] == 5.0 == 4 + 32 / 32 and qa["adapter_bits"] == 0
    assert qa["bits_per_param"] == pytest.approx((5.0 * qa["target_params"] + 16 * (n - t)) / n)
    # the suite's fp32 working copies (float32 scale and zero): 4 + 64/32
    assert qa["bits_per_param_target_working"] == 6.0
    # GPTQ's packed-integer-zero export: fp16 scale + 4-bit zero per group: 4 + 20/32
    assert qa["bits_per_param_target_gptq"] == 4.625
    assert qa["bits_per_param_gptq"] == pytest.approx((4.625 * t + 16 * (n - t)) / n)
    assert account("llama-7b", "qalora", bits=4, group_size=128)["bits_per_param_target"] == 4.25
    qa3 = account("llama-7b", "qalora", bits=3, group_size=32)
    assert qa3["bits_per_param_target"] == 4.0 and qa3["bits_per_param_target_gptq"] == 3 + 19 / 32
    assert account("llama-7b", "qalora", bits=2)["bits_per_param_target"] < qa["bits_per_param_target"]
    assert qa["deployed_bytes"] == pytest.approx(qa["bits_per_param"] * qa["base_params"] / 8)
    ref = account("llama-7b", "qahira-ref")  # 8x4 tiles: the g32 overhead; no GPTQ export of tiles
    assert ref["bits_per_param_target"] == 5.0 and ref["bits_per_param_target_gptq"] is None


def test_bits_from_old_records():
    """A record written before the formats were separated (bits_per_param counted the fp32 working copies) is
    recomputed in the current formats; a current record is taken as it is."""
    qa = account("llama-7b", "qalora", bits=4, group_size=32)
    assert bits_from_record(qa)["bits_per_param_target"] == 5.0
    old = {k: v for k, v in json.loads(json.dumps(qa)).items()
           if k not in ("bits_per_param_format", "bits_per_param_working", "bits_per_param_target_working",
                        "bits_per_param_gptq", "bits_per_param_target_gptq")}
    old.update(bits_per_param=qa["bits_per_param_working"], bits_per_param_target=6.0)
    got = bits_from_record(old)
    assert got["bits_per_param_target"] == 5.0 and got["bits_per_param"] == pytest.approx(qa["bits_per_param"])
    assert got["bits_per_param_target_working"] == 6.0 and got["deployed_bytes"] == qa["deployed_bytes"]
    with pytest.raises(ConfigError, match="re-run the accounting"):
        bits_from_record({"bits_per_param": 6.0})


def test_targets_subset_and_errors():
    r = account("llama-7b", "lora", targets=["q_proj", "v_proj"])
    assert r["n_target_layers"] == 64 and r["trainable_params"] == 32 * 2 * 64 * 8192
    # alpaca-lora's 4.2M: rank 8 on q and v of LLaMA-7B
    assert account("llama-7b", "lora", rank=8, targets=["q_proj", "v_proj"])["trainable_params"] == 4_194_304
    with pytest.raises(ConfigError, match='Did you mean "q_proj"'):
        account("llama-7b", "lora", targets=["q_prj"])
    with pytest.raises(ConfigError, match='Did you mean "llama-7b"'):
        account("lama-7b", "lora")
    with pytest.raises(ShapeError, match="group_size=48"):
        account("llama-7b", "qalora", group_size=48)
    with pytest.raises(ShapeError, match="p=7"):
        account("llama-7b", "qbara", k=7)
    with pytest.raises(ConfigError, match="seq_len"):
        account("llama-7b", "lora", seq_len=0)


def test_flops_formula_llama7b():
    r = account("llama-7b", "lora", seq_len=2048)
    f = r["flops"]
    assert f["base_linear"] == 2 * 6_476_005_376 and f["lm_head"] == 2 * 32000 * 4096
    assert f["attention"] == 4 * 2048 * 4096 * 32
    assert f["adapter"] == 2 * 159_907_840  # LoRA: 2 FLOPs per adapter parameter and token
    assert r["train_flops_per_token"] == 2 * (f["base_linear"] + f["lm_head"]) + 3 * f["attention"] + 3 * f["adapter"]
    peqa = account("llama-7b", "peqa", seq_len=2048)
    assert peqa["flops"]["base_weight_grad"] == f["base_linear"] and peqa["adapter_flops_per_token"] == 0


# ------------------------------------------------------------------------------------------------- CLI
def _qftbench(*args):
    return subprocess.run([sys.executable, "-m", "qftbench.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_json_subprocess():
    """``qftbench account`` (wired into qftbench/cli.py) in a fresh interpreter."""
    p = _qftbench("account", "--model", "llama-13b", "--method", "qalora", "--rank", "64", "--group-size", "32",
                  "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert _m(out["trainable_params"]) == "139.9M" and out["seq_len"] == 512 and out["model"] == "llama-13b"
    assert out["describe"]["hyperparameters"]["group_size"] == 32 and out["describe"]["method"] == "qalora"

    p = _qftbench("account", "--model", "lama-7b", "--method", "qlora", "--json")
    assert p.returncode == 2 and not p.stdout
    assert len(p.stderr.strip().splitlines()) == 1
    assert 'Did you mean "llama-7b"' in p.stderr and "llama2-13b" in p.stderr


def test_cli_in_process(tmp_path, capsys):
    from qftbench import cli_account

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(tiny_config().to_dict()))
    assert cli_account.main(["--model", str(cfg), "--method", "qahira-ref", "--seq-len", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trainable_params"] == account(tiny_config(), "qahira-ref")["trainable_params"] == 2 * 70656 // 32
    assert out["seq_len"] == 24 and out["model"] == tmp_path.name  # a config.json is named by its folder

    # only the given hyperparameters reach the method: qlora has no k, and says so in one line
    assert cli_account.main(["--model", "llama-7b", "--method", "qlora", "--k", "2"]) == 2
    err = capsys.readouterr().err
    assert "no hyperparameter 'k'" in err and len(err.strip().splitlines()) == 1
    assert cli_account.main(["--model", "llama-7b", "--method", "qalora", "--group-size", "48"]) == 2
    assert "group_size=48" in capsys.readouterr().err
    assert cli_account.main(["--model", "missing/config.json", "--method", "lora"]) == 2
    assert "does not exist" in capsys.readouterr().err

    assert cli_account.main(["--model", "llama-7b", "--method", "qbara", "--k", "4",
                             "--set", 'targets=["q_proj"]']) == 0
    text = capsys.readouterr().out
    assert "trainable  16,777,216" in text and "32 target layers" in text  # 32 · 64 · (4096 + 4096)
