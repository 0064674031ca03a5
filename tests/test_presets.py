"""Sweep presets (the settings on which a paper and its released code disagree), the MMLU protocol setting,
and job params that do not change when the suite gains a setting at the value runs already had."""
from __future__ import annotations

import copy
import json

import pytest

from methods.errors import ConfigError
from qftbench import config as C
from qftbench import sweep as S

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]

SWEEP = {
    "name": "p", "models": ["tiny-llama"], "data": {"synthetic": {"source": "synthetic"}},
    "methods": [{"name": "qlora", "rank": 4}, {"name": "qalora", "rank": 4, "group_size": 32},
                {"name": "lora", "rank": 4, "preset": "code"}],
    "run": {"train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "lr": 1.0e-3},
            "eval": {"tasks": ["qft_synthetic"]}},
    "overrides": {"match": [{"when": {"method": ["qalora"]}, "set": {"train": {"lr": 5.0e-3}}}]},
    "preset": "paper",
    "presets": {
        "paper": [{"when": {"method": ["qalora"]}, "set": {"train": {"lr": 2.0e-5}, "method": {"pool": "sum"}}},
                  {"when": {"method": ["qlora", "lora"]}, "set": {"eval": {"mmlu": {"average": "questions"}}}}],
        "code": [{"when": {"method": ["qalora"]}, "set": {"train": {"lr": 2.0e-4}}},
                 {"when": {"method": ["qlora", "lora"]}, "set": {"method": {"dropout": 0.0},
                                                                 "eval": {"mmlu": {"average": "subjects"}}}}],
    },
}


def _by_method(runs):
    return {cfg["method"]["name"]: cfg for cfg in runs.values()}


def test_a_preset_has_the_last_word_and_is_recorded():
    runs = _by_method(S.expand(copy.deepcopy(SWEEP)))
    # overrides.match sets qalora's lr 5e-3; the preset's rule applies after it
    assert runs["qalora"]["train"]["lr"] == 2.0e-5 and runs["qalora"]["method"]["pool"] == "sum"
    assert runs["qalora"]["sweep"]["preset"] == "paper" and runs["qlora"]["eval"]["mmlu"]["average"] == "questions"
    # an entry's own preset wins over the sweep's
    assert runs["lora"]["sweep"]["preset"] == "code" and runs["lora"]["eval"]["mmlu"]["average"] == "subjects"
    # switching the whole sweep (snakemake --config preset=code; qftbench plan --preset code)
    code = _by_method(S.expand({**copy.deepcopy(SWEEP), "preset": "code"}))
    assert code["qalora"]["train"]["lr"] == 2.0e-4 and code["qalora"]["method"]["pool"] == "mean"
    assert code["qlora"]["eval"]["mmlu"]["average"] == "subjects"
    # the run ids follow the values: qalora differs, qlora's training is the same under both presets
    assert C.run_id(code["qalora"]) != C.run_id(runs["qalora"])
    assert C.run_id(_by_method(S.expand({**copy.deepcopy(SWEEP), "preset": "code"}))["lora"]) == \
        C.run_id(runs["lora"])


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update(preset="papr"), r"preset: 'papr' is not a preset of this sweep \(presets: code, paper\)"
                                        r'. Did you mean "paper"'),
    (lambda s: s["methods"][0].update(preset="x"), r"methods\[0\] \(qlora\).preset: 'x' is not a preset"),
    (lambda s: s["presets"]["paper"][0]["when"].update(method=["qalorra"]),
     r"presets.paper\[0\].when.method: unknown method 'qalorra'"),
    (lambda s: (s.pop("presets"), s.update(preset="paper")), r"it has no `presets:` section"),
    (lambda s: s["presets"]["code"].append({"when": {"method": ["qlora"]}, "set": {"model": {"name": "x"}}}),
     None),
])
def test_preset_errors_name_the_key(edit, match):
    sw = copy.deepcopy(SWEEP)
    edit(sw)
    if match is None:  # an override may set the model's dtype only
        sw["preset"] = "code"
        with pytest.raises(ConfigError, match=r"overrides may set model.dtype only"):
            S.expand(sw)
        return
    with pytest.raises(ConfigError, match=match):
        S.expand(sw)


def test_overrides_may_set_the_model_dtype_of_some_runs():
    sw = copy.deepcopy(SWEEP)
    sw["overrides"]["method"] = {"qalora": {"model": {"dtype": "float16"}}}
    runs = _by_method(S.expand(sw))
    assert runs["qalora"]["model"]["dtype"] == "float16" and runs["qlora"]["model"]["dtype"] == "float32"


def test_mmlu_protocol_is_a_checked_setting():
    raw = {"method": {"name": "qlora"}, "eval": {"tasks": ["qft_synthetic"]}}
    assert C.resolve(raw)["eval"]["mmlu"] == {"split": "test", "script": "lm-eval", "average": "questions"}
    assert C.resolve({**raw, "eval": {**raw["eval"], "mmlu": {"average": "subjects"}}})["eval"]["mmlu"]["average"] \
        == "subjects"
    with pytest.raises(ConfigError, match=r"eval.mmlu: split='validation'.*not available.*Fix: set eval.mmlu.split"):
        C.resolve({**raw, "eval": {**raw["eval"], "mmlu": {"split": "validation"}}})
    with pytest.raises(ConfigError, match=r"eval.mmlu.average='mean' is not allowed"):
        C.resolve({**raw, "eval": {**raw["eval"], "mmlu": {"average": "mean"}}})


def test_job_params_leave_out_settings_at_the_value_runs_already_had():
    """A setting added to the suite at the behaviour runs already had (data.prompt, train.adapter_dtype,
    train.norm_dtype, eval.mmlu) is not in a job's params at that value: upgrading the suite leaves the params
    of every existing job as they were, so Snakemake reruns nothing; a non-default value is carried."""
    cfg = C.resolve({"method": {"name": "qlora"}, "eval": {"tasks": ["qft_synthetic"]}})
    view = C.job_view(cfg)
    assert "prompt" not in view["data"] and "mmlu" not in view["eval"]
    assert not {"adapter_dtype", "norm_dtype"} & set(view["train"])
    assert C.resolve(json.loads(json.dumps(view))) == cfg  # the job resolves the same config
    odd = C.resolve({"method": {"name": "qlora"}, "eval": {"tasks": ["qft_synthetic"], "mmlu": {"average": "subjects"}},
                     "train": {"norm_dtype": "float32"}, "data": {"prompt": "alpaca-trailing-space"}})
    ov = C.job_view(odd)
    assert ov["eval"]["mmlu"]["average"] == "subjects" and ov["train"]["norm_dtype"] == "float32"
    assert ov["data"]["prompt"] == "alpaca-trailing-space" and C.resolve(ov) == odd


@pytest.mark.parametrize("name", ["default", "methods", "peft", "tune"])
def test_cpu_sweeps_offer_float32_where_bf16_is_emulated(name):
    """The shipped CPU sweeps train in bf16 autocast, which a CPU without AVX512-BF16/AMX emulates (about 20x
    slower): emulated_half names those runs on such a CPU (never the un-tuned base, never on a GPU or a bf16 CPU),
    and each sweep's `fp32` preset (`snakemake --config preset=fp32`) puts every run in float32."""
    sweep = S.load(REPO / "config" / f"{name}.yaml")
    runs = S.expand(sweep)
    avx2 = {"features": ["avx", "avx2", "fma"]}
    slow = S.emulated_half(runs, info=avx2, cuda=False)
    assert slow and set(slow) == {r for r, c in runs.items() if c["method"]["name"] != "base"}
    assert S.emulated_half(runs, info={"features": ["avx512f", "avx512_bf16"]}, cuda=False) == []
    assert S.emulated_half(runs, info={"features": ["amx_bf16"]}, cuda=False) == []
    assert S.emulated_half(runs, info=avx2, cuda=True) == []
    fp32 = S.expand({**sweep, "preset": "fp32"})
    assert len(fp32) == len(runs) and {c["train"]["precision"] for c in fp32.values()} == {"fp32"}
    assert {c["sweep"]["preset"] for c in fp32.values()} == {"fp32"}
    assert S.emulated_half(fp32, info=avx2, cuda=False) == []
