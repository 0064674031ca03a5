"""End-to-end pipeline steps on tiny-llama: prepare, fine-tune, merge, evaluate with real lm-eval, records."""
from __future__ import annotations

import json

import pytest
import torch

import methods
from methods.errors import ConfigError
from qftbench import config as C
from qftbench import pipeline as P


def tiny_cfg(tmp_path, method: dict, **over) -> dict:
    raw = {
        "model": {"name": "tiny-llama"},
        "method": method,
        "data": {"source": "synthetic", "synthetic": {"seed": 0, "n_entities": 6}},
        "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "save_steps": 1, "lr": 1e-3},
        "eval": {"tasks": ["qft_synthetic"], "limit": 6, "batch_size": 8},
        "paths": {"results": str(tmp_path / "results"), "scratch": str(tmp_path / "scratch")},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return C.resolve(raw)


METHODS = [
    {"name": "lora", "rank": 4, "alpha": 8},
    {"name": "qlora", "rank": 4, "alpha": 8},
    {"name": "qalora", "rank": 4, "alpha": 8},
    {"name": "loftq", "rank": 4, "alpha": 8, "iters": 1},
    {"name": "qbara", "rank": 4, "alpha": 8},
    {"name": "qahira", "rank": 4, "alpha": 8},
    {"name": "qahira-ref", "rank": 4, "alpha": 8},
    {"name": "peqa"},
    {"name": "base", "bits": 4, "group_size": 32},
    # peft's methods through the same pipeline (methods/peft_method.py): rsLoRA on the NF4 base, VeRA on 16 bits
    {"name": "peft", "base": "nf4", "peft": {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True}},
    {"name": "peft", "base": "16bit", "peft": {"peft_type": "VERA", "r": 8}},
]


def test_every_registered_method_runs_end_to_end_below():
    import methods

    assert {m["name"] for m in METHODS} == set(methods.names()), "add the method to METHODS (test_end_to_end_per_method)"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS, ids=[m["name"] + ("-" + m["peft"]["peft_type"].lower() if "peft" in m
                                                                 else "") for m in METHODS])
def test_end_to_end_per_method(tmp_path, method):
    cfg = tiny_cfg(tmp_path, method)
    rd = P.run_all(cfg)
    files = {p.name for p in rd.iterdir()}
    assert {"config.yaml", "train.json", "accounting.json", "provenance.json", "metrics.json", "eval"} <= files
    m = build = methods.build(method["name"], **{k: v for k, v in method.items() if k != "name"})
    if method["name"] != "base":
        assert {"adapter", "train_log.jsonl"} <= files
        log = [json.loads(x) for x in (rd / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log)
    metrics = json.loads((rd / "metrics.json").read_text())
    res = metrics[build.deploy]["qft_synthetic"]
    task = res["tasks"]["qft_synthetic"]
    assert 0.0 <= task["acc"] <= 1.0 and task["n"] == 6 and "acc_norm" in task
    assert res["mode"] == m.deploy and res["provenance"]["lm_eval_version"]
    # the records are the configuration that ran: config.yaml is what trained the run (no eval section that a
    # sweep's evaluation jobs could contradict); each evaluation records its own settings
    import yaml

    from qftbench import sweep as S

    text = (rd / "config.yaml").read_text()
    assert yaml.safe_load(text) == json.loads(json.dumps(S.training_view(cfg))) and "eval" not in yaml.safe_load(text)
    assert res["eval_config"]["batch_size"] == cfg["eval"]["batch_size"] == 8
    assert res["eval_config"]["tasks"] == ["qft_synthetic"] and res["eval_config"]["limit"] == 6
    acc = json.loads((rd / "accounting.json").read_text())
    assert acc["trainable_params"] == acc["measured_trainable_params"]
    assert acc["train_flops_total"] == acc["train_flops_per_token"] * sum(r["tokens"] for r in log) \
        if method["name"] != "base" else acc["trainable_params"] == 0
    prov = json.loads((rd / "provenance.json").read_text())
    assert {"git", "versions", "hardware", "seed", "data", "method"} <= set(prov)
    assert prov["versions"]["torch"] and prov["data"]["synthetic"]["seed"] == 0
    # a finished run is never trained again or overwritten
    def files():
        return (rd / "train.json").read_bytes(), {p.name: p.read_bytes() for p in sorted(rd.glob("adapter/*"))}

    before = files()
    assert before[1] or method["name"] == "base"
    P.finetune_step(cfg)
    assert before == files()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qalora", "qahira"])
def test_exact_merge_evaluation_equals_unmerged(tmp_path, name):
    from qftbench.evaluate import evaluate

    cfg = tiny_cfg(tmp_path, {"name": name, "rank": 4, "alpha": 8, "init": "kaiming"} if name == "qahira"
                   else {"name": name, "rank": 4, "alpha": 8}, train={"max_steps": 3, "lr": 3e-2})
    P.finetune_step(cfg)
    synth = P.ensure_synthetic(cfg) / "eval.jsonl"
    out = {}
    for mode in ("4+16", "int-merge"):
        model, tok, resolved = P.deployed_model(cfg, mode)
        assert resolved == mode
        if mode == "int-merge":
            assert not any(isinstance(x, methods.AdapterLinear) for x in model.modules())
        out[mode] = evaluate(model, tok, ["qft_synthetic"], synthetic_path=synth, return_samples=True, batch_size=8)
    a, b = (out[m]["samples"]["qft_synthetic"] for m in ("4+16", "int-merge"))
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        la = [float(r[0]) for r in x["filtered_resps"]]
        lb = [float(r[0]) for r in y["filtered_resps"]]
        assert max(range(4), key=la.__getitem__) == max(range(4), key=lb.__getitem__)  # same chosen answer
        assert max(abs(p - q) for p, q in zip(la, lb)) < 1e-3
    assert out["4+16"]["tasks"]["qft_synthetic"]["acc"] == out["int-merge"]["tasks"]["qft_synthetic"]["acc"]


def test_finetune_resume_through_pipeline(tmp_path):
    cfg = tiny_cfg(tmp_path, {"name": "qlora", "rank": 4, "alpha": 8}, train={"max_steps": 4, "save_steps": 2})
    P.finetune_step(cfg, stop_after=2)  # as if killed right after the step-2 checkpoint
    assert not P.is_finished(cfg)
    assert (P.scratch_dir(cfg) / "checkpoint-2").is_dir()
    rd = P.finetune_step(cfg)
    log = [json.loads(x) for x in (rd / "train_log.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 2} in log
    assert json.loads((rd / "train.json").read_text())["resumed_from_step"] == 2


@pytest.mark.parametrize("raw,msg", [
    ({"method": {"name": "qlora"}, "modle": {}}, r"unknown key 'modle'. Did you mean \"model\""),
    ({"method": {"name": "qlora"}, "train": {"lr": -1}}, r"train.lr=-1"),
    ({"method": {"name": "qlora"}, "train": {"max_step": 3}}, r"unknown key 'train.max_step'. Did you mean \"max_steps\""),
    ({"method": {"name": "qlora"}, "eval": {"modes": ["int-merge"]}},
     r"eval.modes contains 'int-merge' but method 'qlora' has an bnb-nf4 \(4-bit\) base"),
    ({"method": {"name": "lora"}, "eval": {"modes": ["4+16"]}}, r"'4\+16' but method 'lora' has no quantized base"),
    ({"method": {"name": "qalora", "group_size": 0}}, r"group_size=0 must be >= 1"),
    ({"method": {"name": "qlroa"}}, r"unknown method 'qlroa'"),
    ({"method": {"name": "qlora"}, "data": {"source": "jsonl"}}, r"data.source='jsonl' is not allowed"),
    ({"method": {"name": "qlora"}, "data": {"source": "local"}}, r"data.source='local' needs data.path"),
    ({"method": {"name": "qlora"}, "train": {"batch_size": 6, "micro_batch_size": 4}}, r"not a multiple"),
    ({"method": {"name": "qlora"}, "eval": {"tasks": ["hellaswagg"]}},
     r"eval.tasks: unknown task 'hellaswagg'.*Did you mean: hellaswag"),
    ({"method": {"name": "qlora"}, "eval": {"tasks": ["qft_mmluu"]}}, r"unknown task 'qft_mmluu'.*Did you mean: qft_mmlu"),
    ({"method": {"name": "qlora"}, "eval": {"requant": [{"bits": 3}, {"bits": 3, "group_size": 32}]}},
     r"eval.requant lists the setting \{'bits': 3, 'group_size': 32, 'quantizer': 'gptq'\} twice \(entries 0 and 1, "
     r"both evaluation mode 'requant-w3g32'\); remove the duplicate"),
    ({"method": {"name": "qlora"}, "eval": {"requant": [{"bits": 4}, {"bits": 5}]}},
     r"eval.requant.1.bits=5 is not allowed; choose one of \[2, 3, 4, 8\]"),
    ({"method": {"name": "qlora"}, "eval": {"requant": [{"bits": 4, "groupsize": 32}]}},
     r"unknown key 'eval.requant.0.groupsize'. Did you mean \"group_size\""),
    ({"method": {"name": "qlora"}, "eval": {"requant": []}}, r"eval.requant=\[\]: \[\] should be non-empty"),
    ({"method": {"name": "qlora"}, "eval": {"requant": "gptq"}}, r"eval.requant='gptq' is neither a setting nor a list"),
    ({"method": {"name": "qlora"}, "eval": {"tasks": ["qft_synthetic"], "limit": {"qft_synthetc": 3}}},
     r"eval.limit names task 'qft_synthetc', which is not in eval.tasks \(qft_synthetic\).*Did you mean.*"
     r"Fix: add 'qft_synthetc' to eval.tasks or remove eval.limit.qft_synthetc"),
    ({"method": {"name": "qlora"}, "eval": {"tasks": ["qft_synthetic"], "num_fewshot": {"qft_mmlu": 5}}},
     r"eval.num_fewshot names task 'qft_mmlu', which is not in eval.tasks"),
    ({"method": {"name": "qlora"}, "data": {"empty_outputs": "skip"}},
     r"data.empty_outputs='skip' is not allowed; choose one of \['keep', 'drop'\]"),
])
def test_bad_run_configs(raw, msg):
    with pytest.raises(ConfigError, match=msg):
        C.resolve(raw)


def test_run_id_is_stable_and_config_sensitive(tmp_path):
    a = tiny_cfg(tmp_path, {"name": "qalora", "rank": 4})
    b = tiny_cfg(tmp_path, {"name": "qalora", "rank": 4})
    c = tiny_cfg(tmp_path, {"name": "qalora", "rank": 8})
    d = tiny_cfg(tmp_path, {"name": "qalora", "rank": 4}, eval={"limit": 3})  # evaluation does not change the run
    assert C.run_id(a) == C.run_id(b) == C.run_id(d) != C.run_id(c)
    assert C.run_id(a).startswith("tiny-llama-qalora-r4-4b-g32-synthetic-s0-")


def test_run_ids_of_existing_configs_unchanged_by_empty_outputs(tmp_path):
    """data.empty_outputs was added later: its default (the behaviour earlier runs had) leaves run ids as they
    were; 'drop' trains on other records and gets its own id."""
    a = tiny_cfg(tmp_path, {"name": "qalora", "rank": 4})
    assert C.run_id(a) == "tiny-llama-qalora-r4-4b-g32-synthetic-s0-97ade1b9"  # as before the setting existed
    assert C.run_id(tiny_cfg(tmp_path, {"name": "qalora", "rank": 4}, data={"empty_outputs": "drop"})) != C.run_id(a)


def test_each_eval_job_applies_its_own_tasks_limits(tmp_path):
    """Per-task limits over several task groups (one job per few-shot setting): every group runs, each with the
    limit of its own task (this failed before: each job rejected the limits of the other jobs' tasks)."""
    cfg = tiny_cfg(tmp_path, {"name": "qalora", "rank": 4},
                   eval={"tasks": ["qft_synthetic", "qft_synthetic_letter"],
                         "num_fewshot": {"qft_synthetic": 0, "qft_synthetic_letter": 1},
                         "limit": {"qft_synthetic": 3, "qft_synthetic_letter": 5}})
    assert P.eval_groups(cfg) == [(["qft_synthetic"], 0), (["qft_synthetic_letter"], 1)]
    assert C.limit_for(cfg, ["qft_synthetic"]) == {"qft_synthetic": 3}
    assert C.limit_for(cfg, ["qft_mmlu"]) is None
    rd = P.run_all(cfg)
    zero = json.loads((rd / "eval" / "int-merge" / "qft_synthetic.json").read_text())
    one = json.loads((rd / "eval" / "int-merge" / "qft_synthetic_letter-1shot.json").read_text())
    assert zero["tasks"]["qft_synthetic"]["n"] == 3 and zero["provenance"]["limit"] == {"qft_synthetic": 3}
    assert one["tasks"]["qft_synthetic_letter"]["n"] == 5 and one["num_fewshot"] == 1


@pytest.mark.parametrize("content,name,msg", [
    ('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]', "d.json",
     r"d.json.*record 1.*output"),
    ("a,b\n1,2\n", "d.csv", r"d.csv"),
])
def test_bad_data_fails_before_training(tmp_path, content, name, msg):
    from methods.errors import QFTError

    path = tmp_path / name
    path.write_text(content)
    cfg = tiny_cfg(tmp_path, {"name": "qlora"}, data={"source": "local", "path": str(path)})
    with pytest.raises(QFTError, match=msg):
        P.finetune_step(cfg)
    assert not P.run_dir(cfg).exists() and not P.scratch_dir(cfg).exists()


def test_missing_model_path_fails_before_training(tmp_path):
    """A local model folder that does not exist fails when the config is resolved (qftbench validate, the
    Snakefile, every step), naming the field, the folder and the fix; one that appears only after validation (or
    is removed) still fails the step before any training."""
    from methods.errors import ConfigError

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match=r"model.name='.*no-such-model' is a local folder .* does not exist.*Fix"):
        tiny_cfg(tmp_path, {"name": "qlora"}, model={"name": missing})
    (tmp_path / "no-such-model").mkdir()
    with pytest.raises(ConfigError, match="holds no config.json"):
        tiny_cfg(tmp_path, {"name": "qlora"}, model={"name": missing})
    (tmp_path / "no-such-model" / "config.json").write_text("{}")
    cfg = tiny_cfg(tmp_path, {"name": "qlora"}, model={"name": missing})
    (tmp_path / "no-such-model" / "config.json").unlink()
    with pytest.raises(OSError, match="no-such-model"):
        P.finetune_step(cfg)
    assert not P.run_dir(cfg).exists()


@pytest.mark.slow
@pytest.mark.parametrize("name,quantizer", [("qlora", "gptq"), ("loftq", "rtn"), ("peft", "rtn")])
def test_merge_then_requantize(tmp_path, name, quantizer):
    """The "QLoRA w/ GPTQ" row: merge to fp16, then GPTQ (calibration from the fine-tuning data) or RTN at k bits;
    for peft (its LoRA on the NF4 base) the merge is peft's merge_and_unload into the de-quantized NF4 weights."""
    from methods.quant.linear import QuantLinear

    method = {"name": name, "rank": 4, "alpha": 8} | ({"iters": 1} if name == "loftq" else {})
    if name == "peft":
        method = {"name": "peft", "base": "nf4", "peft": {"peft_type": "LORA", "r": 4, "lora_alpha": 8}}
    cfg = tiny_cfg(tmp_path, method, train={"max_steps": 2, "lr": 1e-2},
                   eval={"modes": ["fp16-merge", "requant"], "requant": {"bits": 4, "group_size": 32,
                                                                         "quantizer": quantizer}},
                   calibration={"n_samples": 4, "seq_len": 16})
    P.finetune_step(cfg)
    dense, _, _ = P.deployed_model(cfg, "fp16-merge")
    requant, _, mode = P.deployed_model(cfg, "requant")
    assert mode == "requant"
    layers = [m for m in requant.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(q.scheme.kind == "int" and q.scheme.bits == 4 for q in layers)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        a, b = dense(ids).logits, requant(ids).logits
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.2, rel  # quantization error, small but not zero
    if name == "peft":  # the 16-bit merge is the 4+16 model's function, up to fp16 rounding of the weights
        unmerged, _, _ = P.deployed_model(cfg, "4+16")
        with torch.no_grad():
            c = unmerged(ids).logits
        assert float((a - c).norm() / c.norm()) < 5e-3
    out = P.evaluate_step(cfg, "requant")
    res = json.loads(out.read_text())
    assert res["mode"] == "requant" and res["tasks"]["qft_synthetic"]["n"] == 6


def test_requant_list_fills_defaults_and_names_one_mode_per_setting():
    one = C.resolve({"method": {"name": "qlora"}, "eval": {"modes": ["4+16", "requant"], "requant": {"bits": 3}}})
    assert one["eval"]["requant"] == {"bits": 3, "group_size": 32, "quantizer": "gptq"}
    assert C.eval_modes(one) == ["4+16", "requant"]  # one setting: the mode keeps its name (eval/requant/)
    assert C.check_mode(one, "requant") == {"bits": 3, "group_size": 32, "quantizer": "gptq"}
    cfg = C.resolve({"method": {"name": "qlora"}, "eval": {"modes": ["4+16", "requant"], "requant": [
        {"bits": 4}, {"bits": 3, "group_size": 64}, {"bits": 2, "quantizer": "rtn"}]}})
    assert cfg["eval"]["requant"] == [{"bits": 4, "group_size": 32, "quantizer": "gptq"},
                                      {"bits": 3, "group_size": 64, "quantizer": "gptq"},
                                      {"bits": 2, "group_size": 32, "quantizer": "rtn"}]
    assert C.eval_modes(cfg) == ["4+16", "requant-w4g32", "requant-w3g64", "requant-w2g32-rtn"]
    assert C.check_mode(cfg, "requant-w3g64") == {"bits": 3, "group_size": 64, "quantizer": "gptq"}
    assert C.check_mode(cfg, "4+16") is None
    assert C.resolve(cfg) == cfg  # a resolved config (what the workflow passes as JSON) resolves to itself
    with pytest.raises(ConfigError, match=r"eval mode 'requant-w3g32' is not a re-quantization setting of this "
                                          r"run: .* modes requant-w4g32, requant-w3g64, requant-w2g32-rtn"):
        C.check_mode(cfg, "requant-w3g32")
    with pytest.raises(ConfigError, match=r"eval mode 'requant' is not .* one mode per setting"):
        C.check_mode(cfg, "requant")
    with pytest.raises(ConfigError, match=r"'requant-w2g32-rtn' is not .* evaluated as mode 'requant'; use --mode "
                                          r"requant"):
        C.check_mode(one, "requant-w2g32-rtn")
    with pytest.raises(ConfigError, match=r"eval mode 'fp16merge' is not one of .*Did you mean \"fp16-merge\""):
        C.check_mode(cfg, "fp16merge")


@pytest.mark.slow
def test_requant_list_evaluates_every_setting(tmp_path, capsys):
    """A list of eval.requant settings: one evaluation per setting from the same trained model, each in its own
    folder, recorded and collated with its own bits."""
    from qftbench import report as R
    from qftbench.cli import main

    cfg = tiny_cfg(tmp_path, {"name": "qlora", "rank": 4, "alpha": 8}, train={"max_steps": 2, "lr": 1e-2},
                   eval={"modes": ["requant"], "requant": [{"bits": 4, "quantizer": "rtn"},
                                                           {"bits": 2, "quantizer": "rtn"}]})
    with pytest.raises(ConfigError, match=r"requant-w3g32.*requant-w4g32-rtn, requant-w2g32-rtn"):
        P.evaluate_step(cfg, "requant-w3g32")  # before any compute: nothing trained, nothing written
    assert not P.run_dir(cfg).exists()
    rd = P.run_all(cfg)
    files = sorted(p.relative_to(rd / "eval").as_posix() for p in (rd / "eval").glob("*/*.json"))
    assert files == ["requant-w2g32-rtn/qft_synthetic.json", "requant-w4g32-rtn/qft_synthetic.json"]
    for mode, bits in (("requant-w4g32-rtn", 4), ("requant-w2g32-rtn", 2)):
        res = json.loads((rd / "eval" / mode / "qft_synthetic.json").read_text())
        assert res["mode"] == mode and res["requant"] == {"bits": bits, "group_size": 32, "quantizer": "rtn"}
        assert res["tasks"]["qft_synthetic"]["n"] == 6
    assert set(json.loads((rd / "metrics.json").read_text())) == {"requant-w4g32-rtn", "requant-w2g32-rtn"}
    df = R.collect(P.results_dir(cfg))
    got = df[df["task"] == "synthetic"].drop_duplicates("mode").set_index("mode")
    assert got.loc["requant-w4g32-rtn", "deploy_bits"] == "4" and got.loc["requant-w2g32-rtn", "deploy_bits"] == "2"
    assert set(got["deploy_group_size"]) == {32}
    syn = R.tables(df, paper_csv=False)["synthetic"]
    assert syn["mode"].tolist() == ["requant-w4g32-rtn", "requant-w2g32-rtn"] and syn["bits"].tolist() == ["4", "2"]
    # the workflow's command line: a known setting (already evaluated: nothing is recomputed), an unknown one
    js = json.dumps(cfg)
    assert main(["evaluate", "--config-json", js, "--mode", "requant-w2g32-rtn"]) == 0
    assert capsys.readouterr().out.strip() == str(rd / "eval" / "requant-w2g32-rtn" / "qft_synthetic.json")
    assert main(["evaluate", "--config-json", js, "--mode", "requant-w3g32"]) == 2
    assert "use one of them" in capsys.readouterr().err


def test_provenance_records_cpu_features_and_torch_capability():
    """What makes bf16 (and some fp32) kernels differ between machines is recorded with every result."""
    from pathlib import Path

    from qftbench.provenance import CPU_FEATURES, hardware

    cpu = hardware()["cpu"]
    assert cpu["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            flags = set(line.split(":", 1)[1].split())
            break
    assert cpu["features"] == [f for f in CPU_FEATURES if f in flags]


def test_provenance_records_an_instruction_set_cap(monkeypatch):
    """ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA make this machine run the kernels of a CPU without AVX512/AMX (how
    the README's cross-machine comparison was made): a result computed under such a cap says so."""
    from qftbench.provenance import cpu_info

    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert cpu_info()["isa_overrides"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert cpu_info()["isa_overrides"] == {}


DTYPE_CASES = [  # (method, model dtype, train settings, expected trainable dtype): the released codes' dtypes
    ({"name": "qlora", "rank": 4, "alpha": 8}, "bfloat16",
     {"adapter_dtype": "bfloat16", "norm_dtype": "float32", "precision": "bf16"}, torch.bfloat16),   # qlora.py
    ({"name": "qalora", "rank": 4, "alpha": 8, "group_size": 32}, "float16",
     {"norm_dtype": "float32", "precision": "fp32"}, torch.float32),                                  # qalora.py
    ({"name": "peft", "base": "nf4", "peft": {"peft_type": "LORA", "r": 4, "lora_alpha": 8}}, "bfloat16",
     {"adapter_dtype": "bfloat16", "norm_dtype": "float32", "precision": "bf16"}, torch.bfloat16),
]


@pytest.mark.slow
@pytest.mark.parametrize("method,dtype,train,want", DTYPE_CASES, ids=["qlora-bf16", "qalora-fp16", "peft-bf16"])
def test_adapter_and_norm_dtypes_train_and_evaluate(tmp_path, method, dtype, train, want):
    from safetensors import safe_open

    cfg = tiny_cfg(tmp_path, method, model={"name": "tiny-llama", "dtype": dtype}, train=train)
    model, _, _ = P.prepared_model(cfg)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {want}
    norms = {n: m.weight.dtype for n, m in model.named_modules() if "norm" in n.rsplit(".", 1)[-1]}
    assert len(norms) == 2 * model.config.num_hidden_layers + 1 and set(norms.values()) == {torch.float32}
    # a float32 norm hands on its input's dtype (what the next matmul computes in under autocast anyway)
    layer = model.model.layers[0].input_layernorm
    x = torch.randn(2, 3, model.config.hidden_size).to(getattr(torch, dtype))
    assert layer(x).dtype == x.dtype
    rd = P.run_all(cfg)
    log = [json.loads(x) for x in (rd / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    f = next((rd / "adapter").glob("*.safetensors"))
    with safe_open(str(f), "pt") as sf:
        assert {sf.get_tensor(k).dtype for k in sf.keys()} == {want}
    import yaml

    rec = yaml.safe_load((rd / "config.yaml").read_text())
    assert rec["train"]["norm_dtype"] == "float32" and rec["model"]["dtype"] == dtype
    assert json.loads((rd / "metrics.json").read_text())


def test_dtype_settings_leave_existing_run_ids_alone(tmp_path):
    m = {"name": "qlora", "rank": 4, "alpha": 8}
    plain = tiny_cfg(tmp_path, m)
    same = tiny_cfg(tmp_path, m, train={"adapter_dtype": "float32", "norm_dtype": "model"}, data={"prompt": "alpaca"})
    assert C.run_id(plain) == C.run_id(same)
    assert C.run_id(tiny_cfg(tmp_path, m, train={"adapter_dtype": "bfloat16"})) != C.run_id(plain)
    assert C.run_id(tiny_cfg(tmp_path, m, data={"prompt": "alpaca-trailing-space"})) != C.run_id(plain)
    with pytest.raises(ConfigError, match=r"train.adapter_dtype='bf16' is not allowed; choose one of"):
        tiny_cfg(tmp_path, m, train={"adapter_dtype": "bf16"})
