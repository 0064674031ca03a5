"""Report tables and figures from real run folders (tiny-llama pipeline runs) plus hand-written evaluate()
outputs for the MMLU / commonsense rows that a tiny model cannot produce offline."""
from __future__ import annotations

import json
import re
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from qftbench import config as C
from qftbench import pipeline as P
from qftbench import plots
from qftbench import report as R

REAL = [("qalora", 0), ("qalora", 1), ("qlora", 0)]


def tiny_cfg(root: Path, method: str, seed: int) -> dict:
    return C.resolve({
        "model": {"name": "tiny-llama"},
        "method": {"name": method, "rank": 4, "alpha": 8},
        "data": {"source": "synthetic", "synthetic": {"seed": 0, "n_entities": 6}},
        "train": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 4, "save_steps": 1, "lr": 1e-3},
        "eval": {"tasks": ["qft_synthetic"], "limit": 6, "batch_size": 8, "modes": ["deploy"]},
        "seed": seed,
        "paths": {"results": str(root / "results"), "scratch": str(root / "scratch")},
    })


@pytest.fixture(scope="session")
def real_results(tmp_path_factory) -> Path:
    """Three finished tiny-llama runs (qalora seeds 0 and 1, qlora seed 0), evaluated on qft_synthetic."""
    root = tmp_path_factory.mktemp("report_real")
    for method, seed in REAL:
        P.run_all(tiny_cfg(root, method, seed))
    return root / "results"


# ---------------------------------------------------------------------------------- hand-written eval files
def _cat(acc_micro: float, acc_macro: float, n: int) -> dict:
    return {"acc_micro": acc_micro, "acc_micro_stderr": 0.01, "acc_macro": acc_macro, "acc_macro_stderr": 0.01,
            "n": n, "n_subjects": 10, "lm_eval_group_acc": acc_micro}


def mmlu_eval(avg: float, cats: dict, mode: str, shots: int = 5, suite: str = "qft_mmlu") -> dict:
    """evaluate()'s output for an MMLU run (the format of qftbench.evaluate.summarize + pipeline keys)."""
    block = _cat(avg, avg + 0.01, 14042)
    block.update(n_subjects=57, num_fewshot=shots,
                 categories={c: _cat(v, v + 0.01, 3000) for c, v in cats.items()},
                 subjects={"abstract_algebra": {"acc": 0.3, "acc_stderr": 0.04, "acc_norm": None,
                                                "acc_norm_stderr": None, "n": 100, "num_fewshot": shots,
                                                "version": 1.0, "alias": "abstract_algebra",
                                                "category": "stem"}})
    return {"tasks": {}, "mmlu": {suite: block}, "commonsense": None, "mode": mode, "num_fewshot": shots,
            "seconds": 1.0, "provenance": {"lm_eval_version": "0.4.13"}}


def commonsense_eval(accs: dict, mode: str) -> dict:
    tasks = {f"qft_{t}": {"acc": a, "acc_stderr": 0.01, "acc_norm": (a + 0.02 if t not in ("boolq", "winogrande")
                                                                      else None),
                          "acc_norm_stderr": 0.01, "n": 1000, "num_fewshot": 0, "version": 1.0, "alias": t}
             for t, a in accs.items()}
    mean = sum(accs.values()) / len(accs)
    return {"tasks": tasks, "mmlu": {}, "commonsense": {"acc_mean": mean, "acc_norm_else_acc_mean": mean,
                                                        "tasks": {t: f"qft_{t}" for t in accs}},
            "mode": mode, "num_fewshot": None, "seconds": 1.0, "provenance": {}}


CATS0 = {"humanities": 0.37, "stem": 0.32, "social_sciences": 0.44, "other": 0.45}
CATS1 = {"humanities": 0.36, "stem": 0.33, "social_sciences": 0.45, "other": 0.44}
CS = {"hellaswag": 0.58, "piqa": 0.78, "winogrande": 0.67, "arc_easy": 0.71, "arc_challenge": 0.44,
      "boolq": 0.80, "openbookqa": 0.34}


def _handmade_run(src: Path, runs: Path, name: str, method: dict, seed: int, evals: dict[str, dict]) -> Path:
    """A run folder from a real one: its train log and train.json, a llama-7b config, real llama-7b
    accounting, and the given eval files."""
    from qftbench.accounting import account

    rd = runs / name
    shutil.copytree(src, rd)
    shutil.rmtree(rd / "eval")
    cfg = yaml.safe_load((rd / "config.yaml").read_text())
    cfg["model"]["name"] = "huggyllama/llama-7b"
    cfg["data"]["source"] = "alpaca"
    cfg["method"] = {**cfg["method"], **method}
    cfg["seed"] = seed
    (rd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    hp = {k: v for k, v in cfg["method"].items() if k not in ("name",)}
    acc = account("llama-7b", cfg["method"]["name"], **hp)
    acc.update(train_flops_total=acc["train_flops_per_token"] * 1000, deploy=P.build_method(cfg).deploy)
    (rd / "accounting.json").write_text(json.dumps(acc))
    for rel, res in evals.items():
        (rd / "eval" / rel).parent.mkdir(parents=True, exist_ok=True)
        (rd / "eval" / rel).write_text(json.dumps(res))
    return rd


@pytest.fixture(scope="session")
def results(real_results, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report_all") / "results"
    shutil.copytree(real_results / "runs", root / "runs")
    runs = root / "runs"
    qalora = next(runs.glob("tiny-llama-qalora-*-s0-*"))
    qlora = next(runs.glob("tiny-llama-qlora-*-s0-*"))
    for seed, avg, cats in ((0, 0.390, CATS0), (1, 0.400, CATS1)):
        _handmade_run(qalora, runs, f"llama-7b-qalora-r64-4b-g32-alpaca-s{seed}-hand", {"rank": 64, "alpha": 16},
                      seed, {"int-merge/qft_mmlu-5shot.json": mmlu_eval(avg, cats, "int-merge"),
                             "int-merge/commonsense.json": commonsense_eval(
                                 {t: a + 0.01 * seed for t, a in CS.items()}, "int-merge")})
    _handmade_run(qlora, runs, "llama-7b-qlora-r64-4b-alpaca-s0-hand", {"rank": 64, "alpha": 16}, 0,
                  {"4+16/qft_mmlu-5shot.json": mmlu_eval(0.385, CATS0, "4+16"),
                   "requant/qft_mmlu-5shot.json": mmlu_eval(0.370, CATS1, "requant")})
    # a run without train.json (not finished): never reported
    unfinished = runs / "llama-7b-qbara-r64-4b-alpaca-s0-unfinished"
    shutil.copytree(runs / "llama-7b-qlora-r64-4b-alpaca-s0-hand", unfinished)
    (unfinished / "train.json").unlink()
    return root


@pytest.fixture(scope="session")
def df(results) -> pd.DataFrame:
    return R.collect(results)


@pytest.fixture(scope="session")
def tabs(df) -> dict:
    return R.tables(df)


# ------------------------------------------------------------------------------------------------- tests
def test_collect_real_runs(real_results):
    df = R.collect(real_results)
    assert set(R.COLUMNS) <= set(df.columns)
    assert df["run_id"].nunique() == 3 and set(df["task"]) == {"synthetic"}
    for rd in (real_results / "runs").iterdir():
        rows = df[df["run_id"] == rd.name]
        ev = next((rd / "eval").glob("*/qft_synthetic.json"))
        res = json.loads(ev.read_text())
        acc = rows[(rows["metric"] == "acc")].iloc[0]
        assert acc["value"] == pytest.approx(100 * res["tasks"]["qft_synthetic"]["acc"])
        assert acc["mode"] == res["mode"] == ev.parent.name and acc["shots"] == 0 and acc["category"] == ""
        assert acc["n"] == 6
        accounting = json.loads((rd / "accounting.json").read_text())
        train = json.loads((rd / "train.json").read_text())
        cfg = yaml.safe_load((rd / "config.yaml").read_text())
        assert acc["trainable_params"] == accounting["trainable_params"]
        assert acc["train_flops_total"] == accounting["train_flops_total"]
        assert acc["train_time_s"] == pytest.approx(train["wall_time_s"])
        assert (acc["model"], acc["method"], acc["data"], acc["rank"], acc["seed"]) == (
            "tiny-llama", cfg["method"]["name"], "synthetic", 4, cfg["seed"])
        assert sorted(rows["metric"].tolist()) == ["acc", "acc_norm"]  # qft_synthetic reports both
    qa = df[df["method"] == "qalora"]
    assert qa["config_id"].nunique() == 1 and sorted(qa["seed"].unique()) == [0, 1]
    assert set(qa["deploy_bits"]) == {"4"} and set(df[df["method"] == "qlora"]["deploy_bits"]) == {"4+16"}


def test_long_format_mmlu_and_commonsense(df):
    assert "llama-7b-qbara-r64-4b-alpaca-s0-unfinished" not in set(df["run_id"])
    r = df[df["run_id"] == "llama-7b-qalora-r64-4b-g32-alpaca-s0-hand"]
    m = r[(r["task"] == "mmlu")].set_index(["category", "metric"])["value"]
    assert m[("avg", "acc_micro")] == pytest.approx(39.0)
    assert m[("social", "acc_micro")] == pytest.approx(44.0)
    assert m[("social", "acc_macro")] == pytest.approx(45.0)
    assert set(r[r["task"] == "mmlu"]["category"]) == {"humanities", "stem", "social", "other", "avg"}
    assert set(r[r["task"] == "mmlu"]["shots"]) == {5}
    cs = r[r["task"] == "commonsense_avg"].set_index("metric")["value"]
    assert cs["acc"] == pytest.approx(100 * sum(CS.values()) / 7)
    piqa = r[(r["task"] == "piqa")].set_index("metric")["value"]
    assert piqa["acc"] == pytest.approx(78.0) and piqa["acc_norm"] == pytest.approx(80.0)
    assert r[r["task"] == "boolq"]["metric"].tolist() == ["acc"]
    assert set(r["model"]) == {"llama-7b"} and set(r["data"]) == {"alpaca"} and set(r["group_size"]) == {32}
    src = json.loads((Path(r["run_dir"].iloc[0]) / "accounting.json").read_text())
    assert r["trainable_params"].iloc[0] == src["trainable_params"] > 80e6  # llama-7b qalora r64 g32


def test_commonsense_mean_across_files(tmp_path, results):
    src = results / "runs" / "llama-7b-qalora-r64-4b-g32-alpaca-s0-hand"
    rd = tmp_path / "runs" / src.name
    shutil.copytree(src, rd)
    whole = json.loads((rd / "eval" / "int-merge" / "commonsense.json").read_text())
    (rd / "eval" / "int-merge" / "commonsense.json").unlink()
    for t, v in whole["tasks"].items():  # each task in its own file: no commonsense block in any file
        (rd / "eval" / "int-merge" / f"{t}.json").write_text(json.dumps(
            {**whole, "tasks": {t: v}, "commonsense": None}))
    d = R.collect(tmp_path)
    cs = d[(d["task"] == "commonsense_avg") & (d["metric"] == "acc")]["value"]
    assert cs.tolist() == [pytest.approx(100 * sum(CS.values()) / 7)]


def test_mean_std_over_seeds(df, tabs):
    agg = R.aggregate(df)
    a = agg[(agg["method"] == "qalora") & (agg["model"] == "llama-7b") & (agg["task"] == "mmlu")
            & (agg["category"] == "avg") & (agg["metric"] == "acc_micro")].iloc[0]
    assert a["mean"] == pytest.approx(39.5) and a["std"] == pytest.approx(math.sqrt(0.5)) and a["n_seeds"] == 2
    mmlu = tabs["mmlu"]
    row = mmlu[(mmlu["method"] == "qalora") & (mmlu["model"] == "llama-7b")].iloc[0]
    assert row["5-shot Avg."] == "39.5 ± 0.7" and row["seeds"] == 2 and row["bits"] == "4" and row["group"] == 32
    assert row["5-shot Social"] == "44.5 ± 0.7" and row["5-shot Hums."] == "36.5 ± 0.7"
    assert "0-shot Avg." not in mmlu.columns  # no 0-shot evaluation in these runs
    one = mmlu[(mmlu["method"] == "qlora") & (mmlu["mode"] == "4+16")].iloc[0]
    assert one["5-shot Avg."] == "38.5" and one["seeds"] == 1 and one["bits"] == "4+16"
    sub = tabs["mmlu_subject_avg"]
    assert sub[(sub["method"] == "qalora")].iloc[0]["5-shot Avg."] == "40.5 ± 0.7"  # acc_macro = micro + 1
    cs = tabs["commonsense"]
    row = cs[cs["method"] == "qalora"].iloc[0]
    assert list(cs.columns[-9:]) == ["HellaSwag", "PIQA", "WinoGrande", "ARC-e", "ARC-c", "BoolQ", "OBQA",
                                     "Avg.", "seeds"]
    assert row["PIQA"] == "78.5 ± 0.7" and row["Avg."] == f"{100 * sum(CS.values()) / 7 + 0.5:.1f} ± 0.7"
    syn = tabs["synthetic"]
    q = syn[syn["method"] == "qalora"].iloc[0]
    vals = df[(df["method"] == "qalora") & (df["task"] == "synthetic") & (df["metric"] == "acc")]["value"]
    # real runs store per-item records: the cell is the mean over seeds with its 95% interval over items and
    # seeds, and the header carries n (6 items, evaluated by both seeds)
    cell = re.fullmatch(r"(\d+\.\d) \[(\d+\.\d), (\d+\.\d)\]", q["acc (%) (n=6)"])
    assert cell and cell[1] == f"{vals.mean():.1f}" and float(cell[2]) <= vals.mean() <= float(cell[3])
    assert q["seeds"] == 2
    assert set(syn["method"]) == {"qalora", "qlora"} and set(syn["rank"]) == {4}
    eff = tabs["efficiency"]
    assert {"trainable params", "adapter FLOPs/token", "train FLOPs/token", "total train FLOPs",
            "bits/param (deployed)", "train time (s)", "peak mem (MB)", "tokens/s", "seeds"} <= set(eff.columns)
    n = df[(df["model"] == "llama-7b") & (df["method"] == "qalora")]["trainable_params"].iloc[0]
    assert eff[(eff["model"] == "llama-7b") & (eff["method"] == "qalora")]["trainable params"].tolist() == [str(n)]


def test_paper_join(tabs):
    pv = tabs["paper_vs_reproduced"]
    key = (pv["model"] == "llama-7b") & (pv["task"] == "mmlu") & (pv["shots"] == 5) & (pv["category"] == "avg")
    qa = pv[key & (pv["method"] == "qalora") & (pv["metric"] == "acc_micro")]
    t1 = qa[qa["paper_source"] == "QA-LoRA Table 1"].iloc[0]
    assert t1["paper"] == 39.4 and t1["reproduced"] == 39.5 and t1["diff"] == pytest.approx(0.1)
    assert t1["std"] == pytest.approx(0.71) and t1["n_seeds"] == 2 and t1["paper_method"] == "QA-LoRA"
    t5 = qa[qa["paper_source"] == "QA-LoRA Table 5"].iloc[0]  # the same number published twice: both rows
    assert t5["paper"] == 38.4 and "duplicates" in t5["paper_note"]
    # subject-weighted average: nothing published for QA-LoRA -> empty paper value, row kept
    macro = pv[key & (pv["method"] == "qalora") & (pv["metric"] == "acc_macro")].iloc[0]
    assert math.isnan(macro["paper"]) and macro["reproduced"] == 40.5 and math.isnan(macro["diff"])
    ql = pv[key & (pv["method"] == "qlora")]
    q416 = ql[(ql["mode"] == "4+16") & (ql["metric"] == "acc_micro")].iloc[0]
    assert q416["paper_method"] == "QLoRA" and q416["paper"] == 38.4 and q416["diff"] == pytest.approx(0.1)
    # QLoRA's Table 4 (the original MMLU script, averaged over questions) meets the run's question average too
    nf4 = ql[(ql["mode"] == "4+16") & (ql["metric"] == "acc_micro") & (ql["paper_method"] == "QLoRA (NF4+DQ)")].iloc[0]
    assert nf4["paper_source"].startswith("QLoRA Table 4") and nf4["protocol"] == "like with like: test split, over questions"
    assert not (ql[(ql["metric"] == "acc_macro")]["paper_method"] != "").any()  # nothing published over subjects
    assert macro["protocol"].endswith("no published number at this average")
    gptq = ql[(ql["mode"] == "requant") & (ql["metric"] == "acc_micro")].iloc[0]
    assert gptq["paper_method"] == "QLoRA w/ GPTQ" and gptq["bits"] == "4" and gptq["group"] == 32
    assert gptq["reproduced"] == 37.0
    cs = pv[(pv["model"] == "llama-7b") & (pv["method"] == "qalora") & (pv["task"] == "commonsense_avg")]
    assert {"QA-LoRA Table 3"} <= set(cs["paper_source"])
    # efficiency: trainable parameters against QA-LoRA's Table 2 (89M for llama-7b rank 64)
    eff = pv[(pv["task"] == "efficiency") & (pv["model"] == "llama-7b") & (pv["method"] == "qalora")].iloc[0]
    assert eff["paper"] == 89e6 and eff["reproduced"] == pytest.approx(89.3e6, rel=0.01)
    # reproduced but never published: kept with an empty paper value; published but not reproduced: absent
    syn = pv[pv["task"] == "synthetic"]
    assert len(syn) == 2 and syn["paper"].isna().all()
    assert not (pv["model"] == "llama-13b").any() and not (pv["method"] == "peqa").any()


def test_write_tables_three_formats(tabs, tmp_path):
    paths = R.write_tables(tabs, tmp_path / "tables")
    assert len(paths) == 3 * len(tabs) and all(p.stat().st_size > 0 for p in paths)
    assert not list((tmp_path / "tables").glob(".*"))  # no temporary files left
    for name in tabs:
        csv = pd.read_csv(tmp_path / "tables" / f"{name}.csv", dtype=str, keep_default_na=False)
        md = (tmp_path / "tables" / f"{name}.md").read_text()
        tex = (tmp_path / "tables" / f"{name}.tex").read_text()
        assert "\\toprule" in tex and "\\bottomrule" in tex
        assert csv.shape == tabs[name].shape and list(csv.columns) == [str(c) for c in tabs[name].columns]
        md_rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()[2:]]
        assert md_rows == csv.to_numpy().tolist()
        for cell in set(csv.to_numpy().ravel()) - {""}:
            assert cell.replace("_", "\\_").replace("±", "$\\pm$").replace("%", "\\%") in tex, (name, cell)
    pv = pd.read_csv(tmp_path / "tables" / "paper_vs_reproduced.csv", dtype=str, keep_default_na=False)
    assert "39.40" in set(pv["paper"]) and "39.50" in set(pv["reproduced"])


def test_read_train_log_after_resume(tmp_path):
    lines = [{"step": 1, "loss": 3.0, "tokens": 10}, {"step": 2, "loss": 2.5, "tokens": 10},
             {"event": "resume", "step": 1}, {"step": 2, "loss": 2.4, "tokens": 10},
             {"step": 3, "loss": 2.0, "tokens": 10}]
    (tmp_path / "train_log.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    log = R.read_train_log(tmp_path / "train_log.jsonl")
    assert log["step"].tolist() == [1, 2, 3] and log["loss"].tolist() == [3.0, 2.4, 2.0]


def test_figures(df, tmp_path):
    paths = plots.make_figures(df, tmp_path / "fig")
    names = {p.name for p in paths}
    for stem in ("acc_vs_params", "acc_vs_flops", "acc_vs_rank", "loss_curves"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= names
    for p in paths:
        head = p.read_bytes()[:8]
        assert p.stat().st_size > 5000 and head.startswith(b"\x89PNG" if p.suffix == ".png" else b"%PDF")
    rows, desc = plots.main_metric(df)
    assert desc.startswith("MMLU 5-shot") and set(rows["metric"]) == {"acc_micro"}
    rows, desc = plots.main_metric(df[df["model"] == "tiny-llama"])
    assert "qft_synthetic" in desc and len(rows) == 3


def test_report_cli(results, tmp_path):
    """``python -m qftbench.collate results out`` writes the long frame and the tables that the library computes
    from the same runs (contents compared, not only existence)."""
    from qftbench import collate

    assert collate.main([str(results), str(tmp_path / "out"), "--no-figures"]) == 0
    long = pd.read_csv(tmp_path / "out" / "long.csv")
    df = R.collect(results)
    assert long["run_id"].nunique() == 6 and len(long) == len(df)
    pd.testing.assert_frame_equal(long[["run_id", "task", "metric", "value"]].reset_index(drop=True),
                                  df[["run_id", "task", "metric", "value"]].reset_index(drop=True),
                                  check_dtype=False)
    tabs = R.tables(df)
    for name in ("mmlu", "commonsense", "efficiency"):
        written = pd.read_csv(tmp_path / "out" / "tables" / f"{name}.csv", dtype=str, keep_default_na=False)
        want = R.display_frame(tabs[name])
        assert list(written.columns) == [str(c) for c in want.columns]
        assert len(written) == len(want) and (tmp_path / "out" / "tables" / f"{name}.md").is_file()


def test_deployment_of_requant_modes():
    qlora = {"name": "qlora", "bits": 4}
    assert R.deployment(qlora, "requant", {"requant": {"bits": 3, "group_size": 64}}) == ("3", 64)
    assert R.deployment(qlora, "requant", {}) == ("4", 32)  # the default setting
    # a list of settings: the mode's name carries the setting (qftbench.config.requant_mode_name)
    lst = {"requant": [{"bits": 4, "group_size": 32, "quantizer": "gptq"}, {"bits": 3, "group_size": 32,
                                                                              "quantizer": "gptq"}]}
    for rq in ({"bits": 3, "group_size": 32, "quantizer": "gptq"}, {"bits": 2, "group_size": 128, "quantizer": "rtn"},
               {"bits": 8, "group_size": 32, "quantizer": "gptq"}):
        mode = C.requant_mode_name(rq)
        assert R.deployment(qlora, mode, lst) == (str(rq["bits"]), rq["group_size"])
        assert R.mode_family(mode) == "requant" and C.is_requant_mode(mode)
    assert C.requant_mode_name({"bits": 2, "group_size": 128, "quantizer": "rtn"}) == "requant-w2g128-rtn"
    # the setting an eval file records wins over the config (which may have changed since the run was trained)
    assert R.deployment(qlora, "requant", {"requant": {"bits": 4}}, {"bits": 2, "group_size": 32}) == ("2", 32)
    assert R.deployment(qlora, "4+16", lst) == ("4+16", None) and R.mode_family("4+16") == "4+16"


def test_requant_list_rows_match_the_papers_3_and_2_bit_rows(results, tmp_path):
    """QLoRA w/ GPTQ at 4, 3 and 2 bits (QA-LoRA Table 1, llama-7b, Alpaca) from one run with an eval.requant
    list: each mode is its own table row and is joined with the published row of its bits."""
    runs = tmp_path / "results" / "runs"
    src = results / "runs" / "llama-7b-qlora-r64-4b-alpaca-s0-hand"
    rd = runs / src.name
    shutil.copytree(src, rd)
    shutil.rmtree(rd / "eval")
    cfg = yaml.safe_load((rd / "config.yaml").read_text())
    cfg.setdefault("eval", {})  # a run folder written before config.yaml held the training settings only
    cfg["eval"]["modes"] = ["4+16", "requant"]
    cfg["eval"]["requant"] = [{"bits": b, "group_size": 32, "quantizer": "gptq"} for b in (4, 3, 2)]
    (rd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    for bits, avg in ((4, 0.370), (3, 0.330), (2, 0.255)):
        mode = f"requant-w{bits}g32"
        res = mmlu_eval(avg, CATS1, mode)
        if bits != 2:  # what evaluate_step writes; without it the mode's name gives the setting
            res["requant"] = {"bits": bits, "group_size": 32, "quantizer": "gptq"}
        (rd / "eval" / mode).mkdir(parents=True)
        (rd / "eval" / mode / "qft_mmlu-5shot.json").write_text(json.dumps(res))
    df = R.collect(tmp_path / "results")
    assert sorted(set(zip(df["mode"], df["deploy_bits"], df["deploy_group_size"]))) == [
        ("requant-w2g32", "2", 32), ("requant-w3g32", "3", 32), ("requant-w4g32", "4", 32)]
    tabs = R.tables(df)
    mmlu = tabs["mmlu"]
    assert mmlu["mode"].tolist() == ["requant-w4g32", "requant-w3g32", "requant-w2g32"]
    assert mmlu["bits"].tolist() == ["4", "3", "2"] and mmlu["5-shot Avg."].tolist() == ["37.0", "33.0", "25.5"]
    pv = tabs["paper_vs_reproduced"]
    avg = pv[(pv["task"] == "mmlu") & (pv["category"] == "avg") & (pv["metric"] == "acc_micro")]
    got = {r.bits: (r.mode, r.paper_method, r.paper, r.reproduced, r.group) for r in avg.itertuples()}
    assert got == {"4": ("requant-w4g32", "QLoRA w/ GPTQ", 36.0, 37.0, 32),
                   "3": ("requant-w3g32", "QLoRA w/ GPTQ", 34.0, 33.0, 32),
                   "2": ("requant-w2g32", "QLoRA w/ GPTQ", 25.8, 25.5, 32)}


def test_efficiency_bits_are_the_deployed_format():
    """bits/param (deployed): INT with fp16 scale + fp16 zero per group (int4 g32: 5.0 on the target layers),
    NF4 + DQ as bitsandbytes stores it (4.127), for new records and for records written before the formats were
    separated (their bits_per_param counted the fp32 working copies, 6.0 for int4 g32)."""
    from qftbench.accounting import account

    qa, ql = account("llama-7b", "qalora", bits=4, group_size=32), account("llama-7b", "qlora")
    assert qa["bits_per_param_target"] == 5.0 and round(ql["bits_per_param_target"], 3) == 4.127
    assert R._deployed_bits(qa) == qa["bits_per_param"]
    new_keys = ("bits_per_param_format", "bits_per_param_working", "bits_per_param_target_working",
                "bits_per_param_gptq", "bits_per_param_target_gptq")
    legacy = {k: v for k, v in qa.items() if k not in new_keys}
    legacy.update(bits_per_param=qa["bits_per_param_working"], bits_per_param_target=6.0)
    assert R._deployed_bits(legacy) == pytest.approx(qa["bits_per_param"], rel=1e-12)
    assert R._deployed_bits({"bits_per_param": 6.0, "method": "qalora"}) is None  # unreadable: empty, never 6.0
    assert R._deployed_bits({}) is None

    rows = []
    for run_id, acc, method in (("a", qa, "qalora"), ("b", ql, "qlora")):
        rows.append({"run_id": run_id, "model": "llama-7b", "method": method, "data": "alpaca", "bits": 4,
                     "group_size": 32 if method == "qalora" else pd.NA, "rank": 64, "alpha": 16.0,
                     "config_id": run_id, "seed": 0, "bits_per_param": R._deployed_bits(acc)})
    df = pd.DataFrame(rows, columns=R.COLUMNS)
    eff = R._efficiency_table(df).set_index("method")
    assert eff.loc["qalora", "bits/param (deployed)"] == R.fmt_pm(qa["bits_per_param"], None, 2) == "5.43"
    assert eff.loc["qlora", "bits/param (deployed)"] == R.fmt_pm(ql["bits_per_param"], None, 2) == "4.59"
    assert eff.loc["qalora", R.SCALING_LABEL] == "0.25"  # alpha 16 / nominal rank 64: the effective scaling


# ------------------------------------------------------------------------------ intervals and paired tables
def _items(acc, prefix="d") -> dict:
    return {"doc_id": list(range(len(acc))), "doc_hash": [f"{prefix}{i}" for i in range(len(acc))],
            "target": [0] * len(acc), "pred": [0] * len(acc), "acc": [float(x) for x in acc]}


def test_intervals_and_paired_table_from_item_records(real_results, tmp_path):
    """Hand-made per-item records with known answers: a 2000-item task whose two seeds agree gives the binomial
    interval; MMLU micro/macro weight the subjects by items/equally; a method right on 10% more of the same items
    is 'A > B' in the paired table, identical records are 'inconclusive' with p = 1."""
    runs = tmp_path / "results" / "runs"
    qalora = next((real_results / "runs").glob("tiny-llama-qalora-*-s0-*"))
    qlora = next((real_results / "runs").glob("tiny-llama-qlora-*-s0-*"))
    n = 2000
    rng = np.random.default_rng(0)
    u = rng.random(n)
    b = (u < 0.5).astype(float)
    a = (u < 0.6).astype(float)  # right wherever b is, and on ~10% more items

    def piqa_eval(acc, mode):
        res = commonsense_eval({"piqa": float(np.mean(acc))}, mode)
        res["commonsense"] = None
        res["items"] = {"qft_piqa": _items(acc)}
        return res

    def mmlu_items_eval(mode):
        res = mmlu_eval(0.48, CATS0, mode)
        res["items"] = {"qft_mmlu_abstract_algebra": _items([1] * 6 + [0] * 24, "aa"),    # stem, 30 items, 0.2
                        "qft_mmlu_world_religions": _items([1] * 42 + [0] * 28, "wr")}  # humanities, 70, 0.6
        return res

    for seed in (0, 1):  # two seeds with identical records: no seed variance
        _handmade_run(qalora, runs, f"llama-7b-qalora-r64-4b-g32-alpaca-s{seed}-ci", {"rank": 64, "alpha": 16}, seed,
                      {"int-merge/piqa.json": piqa_eval(a, "int-merge"),
                       "int-merge/qft_mmlu-5shot.json": mmlu_items_eval("int-merge")})
    _handmade_run(qlora, runs, "llama-7b-qlora-r64-4b-alpaca-s0-ci", {"rank": 64, "alpha": 16}, 0,
                  {"4+16/piqa.json": piqa_eval(b, "4+16"), "4+16/qft_mmlu-5shot.json": mmlu_items_eval("4+16")})
    df = R.collect(tmp_path / "results")
    agg = R.aggregate(df)
    row = agg[(agg["method"] == "qalora") & (agg["task"] == "piqa") & (agg["metric"] == "acc")].iloc[0]
    p = a.mean()
    half = 100 * 1.959964 * math.sqrt(p * (1 - p) / n)
    assert row["n_items"] == n and row["n_seeds"] == 2 and row["mean"] == pytest.approx(100 * p)
    assert row["ci_lo"] == pytest.approx(100 * p - half, abs=0.3) and row["ci_hi"] == pytest.approx(100 * p + half,
                                                                                                    abs=0.3)
    # MMLU: the interval's own mean weights subjects by items (micro) or equally (macro)
    mm = agg[(agg["method"] == "qalora") & (agg["task"] == "mmlu") & (agg["category"] == "avg")]
    for metric, want in (("acc_micro", (6 + 42) / 100), ("acc_macro", (0.2 + 0.6) / 2)):
        r = mm[mm["metric"] == metric].iloc[0]
        assert R.cell_interval(r)[0].mean == pytest.approx(want) and r["n_items"] == 100
    stem = agg[(agg["method"] == "qalora") & (agg["task"] == "mmlu") & (agg["category"] == "stem")
               & (agg["metric"] == "acc_micro")].iloc[0]
    assert stem["n_items"] == 30
    # the table cell: mean [lo, hi], n in the header
    cs = R.tables(df)["commonsense"]
    cell = cs[cs["method"] == "qalora"].iloc[0][f"PIQA (n={n})"]
    assert cell == R.fmt_ci(row["mean"], row["ci_lo"], row["ci_hi"])
    # paired: QA-LoRA vs QLoRA on the same 2000 items
    pt = R.paired_table(agg)
    piqa = pt[(pt["task"] == "piqa")].iloc[0]
    assert piqa["A"].startswith("qalora") and piqa["B"].startswith("qlora") and piqa["verdict"] == "A > B"
    assert float(piqa["A - B"]) == pytest.approx(100 * (a.mean() - b.mean()), abs=0.05)
    assert float(piqa["p"]) < 1e-3 and piqa["n items"] == n and piqa["seeds A/B"] == "2/1"
    mmlu = pt[(pt["task"] == "mmlu")].iloc[0]  # identical records: no difference
    assert mmlu["verdict"] == "inconclusive" and float(mmlu["p"]) == 1.0 and mmlu["A - B"] == "+0.0"


def test_run_records_follow_their_declared_schemas(real_results, tmp_path):
    """Every record the pipeline writes (accounting, train, provenance, each evaluation with its per-item results)
    validates against qftbench/schemas/*.schema.yaml; a record with a missing field, a wrong type or per-item
    lists cut short is rejected with the file, the field and the value."""
    import copy

    from qftbench import records

    run_dirs = sorted(p for p in (real_results / "runs").iterdir() if (p / "train.json").is_file())
    assert run_dirs
    checked = [f for rd in run_dirs for f in records.validate_run(rd)]
    assert {"accounting.json", "train.json", "provenance.json"} <= {f.name for f in checked}
    evals = [f for f in checked if f.parent.parent.name == "eval"]
    assert evals
    rec = json.loads(evals[0].read_text())
    task = next(t for t, cols in rec["items"].items() if cols["doc_id"])
    bad = copy.deepcopy(rec)
    bad["items"][task]["doc_id"] = bad["items"][task]["doc_id"][:-1]  # one item lost
    with pytest.raises(records.RecordError, match=rf"items\.{task}: per-item lists of different lengths"):
        records.validate("eval", bad, where="x.json")
    bad = copy.deepcopy(rec)
    del bad["provenance"]["task_versions"]
    with pytest.raises(records.RecordError, match=r"x\.json: provenance: 'task_versions' is a required property"):
        records.validate("eval", bad, where="x.json")
    acc = json.loads((run_dirs[0] / "accounting.json").read_text())
    acc["trainable_params"] = -1
    with pytest.raises(records.RecordError, match=r"trainable_params: -1 is less than the minimum of 0"):
        records.validate("accounting", acc)
