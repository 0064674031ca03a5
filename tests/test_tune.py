"""The learning-rate protocol: ``train.lr`` as a sweep grid axis (qftbench.sweep), the ``lr`` column of the report
and the ``lr_choice`` table (qftbench.report), which picks each configuration's learning rate on the synthetic
validation split only (highest mean validation accuracy; ties to the smaller lr), and config/tune.yaml."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from methods.errors import ConfigError
from qftbench import config as C
from qftbench import report as R
from qftbench import sweep as S

REPO = Path(__file__).resolve().parents[1]


def tiny_sweep(tmp_path: Path, run: dict | None = None, **over) -> dict:
    """A tiny-llama sweep over train.lr; ``over`` replaces top-level keys, ``run`` is merged into run."""
    sw = {
        "name": "t",
        "models": ["tiny-llama"],
        "data": {"synthetic": {"source": "synthetic", "synthetic": {"seed": 0, "n_entities": 6}}},
        "methods": [{"name": "base", "bits": 4, "group_size": 32}, {"name": "qlora"},
                    {"name": "qalora", "group_size": 32}],
        "grid": {"rank": [2], "train.lr": [1.0e-3, 4.0e-3]},
        "seeds": [0, 1],
        "run": {"train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "save_steps": 1, "lr": 5.0e-4},
                "eval": {"tasks": ["qft_synthetic_val"], "limit": 6, "batch_size": 8},
                "paths": {"results": str(tmp_path / "results"), "scratch": str(tmp_path / "scratch")}},
    }
    sw["run"] = C._merge(sw["run"], run or {})
    return {**sw, **over}


# ------------------------------------------------------------------------------------------ the grid axis
def test_grid_over_train_lr_expands_and_validates(tmp_path):
    runs = S.expand(tiny_sweep(tmp_path))
    by = {}
    for rid, cfg in runs.items():
        by.setdefault(cfg["method"]["name"], []).append((cfg["train"]["lr"], cfg["seed"]))
    # every trained method x every lr x every seed; base is never trained: no lr axis, run.train.lr kept
    assert sorted(by["qlora"]) == sorted(by["qalora"]) == [(1e-3, 0), (1e-3, 1), (4e-3, 0), (4e-3, 1)]
    assert sorted(by["base"]) == [(5e-4, 0), (5e-4, 1)]
    assert len(runs) == 10
    # the lr is part of the training config: distinct run ids, the rest of train untouched
    assert len({r for r in runs}) == 10
    assert all(c["train"]["max_steps"] == 2 and c["train"]["batch_size"] == 4 for c in runs.values())
    # a sweep without the axis gives the same run at the grid value it replaces
    plain = S.expand(tiny_sweep(tmp_path, grid={"rank": [2]}, run={"train": {"lr": 1.0e-3}}))
    with_axis = {r for r, c in runs.items() if c["train"]["lr"] == 1e-3}
    assert {r for r, c in plain.items() if c["method"]["name"] != "base"} <= with_axis
    # any setting of a training section is an axis (calibration.*), crossed with base too
    cal = S.expand(tiny_sweep(tmp_path, grid={"rank": [2], "calibration.n_samples": [8, 16]}, seeds=[0]))
    assert sorted(c["calibration"]["n_samples"] for c in cal.values() if c["method"]["name"] == "base") == [8, 16]
    # the expected tables include lr_choice when the validation split is evaluated
    tabs = S.expected_tables(tiny_sweep(tmp_path), runs)
    assert "lr_choice" in tabs and "synthetic" in tabs
    test_only = S.expand(tiny_sweep(tmp_path, run={"eval": {"tasks": ["qft_synthetic"]}}))
    assert "lr_choice" not in S.expected_tables({}, test_only)


@pytest.mark.parametrize("grid, match", [
    ({"trian.lr": [1e-3]}, r"unknown section 'trian' in grid key 'trian.lr'\. Did you mean \"train\"\?"),
    ({"train.lrr": [1e-3]}, r"unknown key 'lrr' in grid key 'train.lrr'\. Did you mean \"lr\"\?.*Allowed keys in "
                            r"train:.*lr"),
    ({"train.lr.x": [1e-3]}, r"unknown key 'lr.x' in grid key 'train.lr.x'"),
    ({"eval.limit": [2, 4]}, r"grid.eval.limit: eval.\* is not a grid axis \(evaluation settings"),
    ({"seed.x": [1]}, r"grid.seed.x: seed.\* is not a grid axis .*seeds:"),
    ({"train.lr": [1e-3, 1e-3]}, r"grid.train.lr lists 0.001 twice"),
    ({"train.lr": [-1e-3]}, r"run \(model=tiny-llama.*train.lr=-0.001\): train.lr=-0.001"),
    ({"train.optimizer": ["sgd"]}, r"train.optimizer='sgd' is not allowed"),
    ({"train.lr": []}, r"grid.train.lr: \[\] should be non-empty"),
])
def test_grid_axis_errors_name_the_key_and_the_fix(tmp_path, grid, match):
    sw = tiny_sweep(tmp_path)
    sw["grid"] = grid
    with pytest.raises(ConfigError, match=match):
        S.expand(sw)


@pytest.mark.parametrize("overrides, src", [
    ({"method": {"qalora": {"train": {"lr": 2e-2}}}}, "overrides.method.qalora"),
    ({"model": {"tiny-llama": {"train": {"lr": 2e-2}}}}, "overrides.model.tiny-llama"),
    ({"match": [{"when": {"method": ["qlora"], "seed": [1]}, "set": {"train": {"lr": 2e-2}}}]},
     r"overrides.match\[0\].set"),
])
def test_an_override_of_a_grid_axis_is_an_error(tmp_path, overrides, src):
    """Precedence: a grid axis is never overridden silently; an override that sets train.lr for a run the axis
    applies to is a ConfigError naming both and the fix."""
    with pytest.raises(ConfigError, match=rf"grid.train.lr and {src} both set train.lr for the run .*remove "
                                          rf"train.lr from {src}, or drop grid.train.lr"):
        S.expand(tiny_sweep(tmp_path, overrides=overrides))


def test_overrides_that_do_not_collide_with_the_axis_still_apply(tmp_path):
    runs = S.expand(tiny_sweep(tmp_path, overrides={
        "method": {"qalora": {"train": {"max_steps": 3}},
                   "base": {"train": {"lr": 2e-2}}},  # base has no lr axis: its override is no conflict
    }))
    qalora = [c for c in runs.values() if c["method"]["name"] == "qalora"]
    assert {c["train"]["max_steps"] for c in qalora} == {3} and {c["train"]["lr"] for c in qalora} == {1e-3, 4e-3}
    assert {c["train"]["lr"] for c in runs.values() if c["method"]["name"] == "base"} == {2e-2}
    # and without the axis, per-method lr overrides work as before
    runs = S.expand(tiny_sweep(tmp_path, grid={"rank": [2]}, overrides={"method": {"qalora": {"train": {"lr": 2e-2}}}}))
    assert {c["train"]["lr"] for c in runs.values() if c["method"]["name"] == "qalora"} == {2e-2}


#: run ids computed before the grid axis existed (commit 5d64c40): the shipped configs must keep them
SHIPPED_IDS = {
    # the default's data and methods changed on 2026-12-02 (issue 12: 300 test questions, 3 seeds, tuned rates):
    # new ids from then on
    "default": {"smollm2-135m-base-16b-g128-synthetic-s0-9d29426c": 4e-3,
                "smollm2-135m-qlora-r16-4b-synthetic-s1-07262c24": 4e-3,
                "smollm2-135m-qalora-r16-4b-g32-synthetic-s2-c1a8c8de": 1.6e-2},
    "tiny": {"tiny-llama-base-4b-g32-synthetic-s0-96870913": 1e-3,
             "tiny-llama-qalora-r2-4b-g32-synthetic-s0-a71f128f": 1e-3,
             "tiny-llama-qalora-r4-4b-g32-synthetic-s0-97ade1b9": 1e-3,
             "tiny-llama-qlora-r2-4b-synthetic-s0-082c1246": 1e-3,
             "tiny-llama-qlora-r4-4b-synthetic-s0-21fb8a35": 1e-3},
    # local's methods moved to lossy regimes on 2026-12-02 (issue 13: NF3 + QLoRA, INT2 g32 GPTQ + QA-LoRA) and its
    # GPTQ calibration (32 x 256, part of every run id) was set: new ids from then on (base ab632b2f -> 4a1d0317);
    # these are the ids of the measured run in the README
    "local": {"smollm2-135m-base-16b-g128-alpaca-s0-4a1d0317": 2e-4,
              "smollm2-135m-qlora-r8-3b-alpaca-s0-d857df5e": 2e-4,
              "smollm2-135m-qalora-r8-2b-g32-alpaca-s0-0d8b2033": 2e-4},
    # the paper grid fixed against config/sources.yaml (2026-12-02, issue 15): gptq_groups: released changed the
    # GPTQ runs' ids (llama-7b-qalora-r64-4b-g32-alpaca-s0-9940e347 -> afbafa16), then the released codes'
    # Alpaca holdout (1024), prompt (trailing space), float32 norms and QA-LoRA's float16 base / lengths / pooling
    # changed every id (base f008b819 -> 9a169cd5, qalora afbafa16 -> 2b2992ea)
    "paper": {"llama-7b-base-16b-g128-alpaca-s0-9a169cd5": 2e-4,
              "llama-7b-qalora-r64-4b-g32-alpaca-s0-2b2992ea": 2e-5},     # presets.paper
}


@pytest.mark.parametrize("name", sorted(SHIPPED_IDS))
def test_shipped_configs_keep_their_run_ids(name):
    runs = S.expand(S.load(REPO / "config" / f"{name}.yaml"))
    for rid, lr in SHIPPED_IDS[name].items():
        assert rid in runs, f"{name}: run {rid} is gone (run ids of shipped configs must not change)"
        assert runs[rid]["train"]["lr"] == lr
    if name == "tiny":
        assert set(runs) == set(SHIPPED_IDS["tiny"])


def test_tune_config():
    sweep = S.load(REPO / "config" / "tune.yaml")
    default = S.load(REPO / "config" / "default.yaml")
    runs = S.expand(sweep)
    assert len(runs) == 53  # base once + (8 suite methods + 5 peft methods) x 4 learning rates
    trained = [c for c in runs.values() if c["method"]["name"] != "base"]
    assert len(trained) == 52 and {c["method"].get("rank") for c in trained if c["method"]["name"] in
                                   ("lora", "qlora", "qalora", "loftq", "qbara")} == {16}
    lrs = sorted(sweep["grid"]["train.lr"])
    assert all(b / a == pytest.approx(4) for a, b in zip(lrs, lrs[1:]))
    # the same model, data, steps and precision as the default; the validation split only; no lr overrides
    d = next(iter(S.expand(default).values()))
    for c in runs.values():
        assert c["eval"]["tasks"] == ["qft_synthetic_val"] and c["seed"] == 0
        for key in ("max_steps", "batch_size", "micro_batch_size", "precision", "optimizer"):
            assert c["train"][key] == d["train"][key], key
        assert c["model"] == d["model"] and c["data"] == d["data"]
    assert sweep["data"] == default["data"] and sweep["models"] == default["models"]
    assert "overrides" not in sweep
    assert sweep["outputs"] == {"tables": "results/tables/tune", "figures": "figures/tune"}
    assert "lr_choice" in S.expected_tables(sweep, runs)


def test_methods_config_is_the_default_with_every_method():
    """config/methods.yaml = the default's task, steps and seeds with every method; both take every learning rate
    from the tuning grid (the values its rule chose, README "The tuning sweep"), and agree where they overlap
    (the default's runs are methods.yaml's runs: the same run ids)."""
    import methods

    tune = S.load(REPO / "config" / "tune.yaml")
    default, every = (S.load(REPO / "config" / f"{n}.yaml") for n in ("default", "methods"))
    d_runs, m_runs = S.expand(default), S.expand(every)
    assert set(d_runs) <= set(m_runs)
    # every registered method but peft (its methods are config/peft.yaml's: test_peft_config)
    assert {c["method"]["name"] for c in m_runs.values()} == set(methods.names()) - {"peft"}
    assert {c["method"]["name"] for c in S.expand(tune).values()} - {"peft"} == \
        {c["method"]["name"] for c in m_runs.values()}
    grid = set(tune["grid"]["train.lr"])
    for c in m_runs.values():
        if c["method"]["name"] != "base":
            assert c["train"]["lr"] in grid, (c["method"]["name"], c["train"]["lr"])
            assert c["seed"] in (0, 1, 2)
    assert sorted({c["seed"] for c in d_runs.values()}) == [0, 1, 2]
    assert sum(c["method"]["name"] == "base" for c in d_runs.values()) == 1
    assert every["data"] == default["data"] and every["run"] == default["run"]


def test_peft_config():
    """config/peft.yaml: the default's task, steps and seeds; its five peft entries are tune.yaml's five (so the
    tuning runs at the chosen rate are its seed-0 runs), each at a rate of the tuning grid; its suite methods are
    methods.yaml's runs (same run ids)."""
    from methods.peft_method import table_name

    tune, every, pft = (S.load(REPO / "config" / f"{n}.yaml") for n in ("tune", "methods", "peft"))
    t_runs, m_runs, p_runs = S.expand(tune), S.expand(every), S.expand(pft)
    peft_entries = [e for e in pft["methods"] if e["name"] == "peft"]
    assert [{k: v for k, v in e.items() if k != "train"} for e in peft_entries] == \
        [e for e in tune["methods"] if e["name"] == "peft"]
    labels = {table_name(e) for e in peft_entries}
    assert labels == {"peft-dora-nf4", "peft-rslora-nf4", "peft-pissa-16bit", "peft-vera-nf4", "peft-ia3-nf4"}
    grid = set(tune["grid"]["train.lr"])
    ours = {rid: c for rid, c in p_runs.items() if c["method"]["name"] != "peft"}
    assert set(ours) <= set(m_runs)  # lora, qlora, qalora, base: methods.yaml's runs
    for rid, c in p_runs.items():
        if c["method"]["name"] == "peft":
            assert c["train"]["lr"] in grid and c["seed"] in (0, 1, 2)
            if c["seed"] == 0:
                assert rid in t_runs  # the tuning run at the chosen rate
    assert sum(c["method"]["name"] == "peft" for c in p_runs.values()) == 15
    assert pft["data"] == every["data"] and pft["run"] == every["run"]


def test_an_entry_train_setting_applies_to_its_runs_only_and_never_overrides_a_grid_axis():
    sweep = {"models": ["tiny-llama"], "data": {"s": {"source": "synthetic"}},
             "methods": [{"name": "lora", "rank": 4}, {"name": "lora", "rank": 8, "train": {"lr": 1.0e-2}}],
             "run": {"train": {"lr": 1.0e-3, "max_steps": 2}}}
    runs = S.expand(sweep)
    assert sorted((c["method"]["rank"], c["train"]["lr"]) for c in runs.values()) == [(4, 1e-3), (8, 1e-2)]
    with pytest.raises(ConfigError, match=r"grid.train.lr and methods\[1\].train both set train.lr"):
        S.expand({**sweep, "grid": {"train.lr": [1e-3, 2e-3]}})


# ---------------------------------------------------------------------------------------- the lr_choice rule
def test_choose_lr():
    assert R.choose_lr({1e-3: 50.0, 4e-3: 75.0, 1.6e-2: 62.5}) == 4e-3
    assert R.choose_lr({1.6e-2: 75.0, 4e-3: 75.0, 1e-3: 50.0}) == 4e-3          # a tie: the smaller lr
    assert R.choose_lr({4e-3: 75.0, 1.6e-2: 75.0 + 1e-12}) == 4e-3              # equal up to rounding
    assert R.choose_lr({4e-3: 75.0, 1.6e-2: 75.1}) == 1.6e-2
    with pytest.raises(ValueError):
        R.choose_lr({})


def _items(acc: list[int], prefix: str) -> dict:
    return {"doc_id": list(range(len(acc))), "doc_hash": [f"{prefix}{i}" for i in range(len(acc))],
            "target": [0] * len(acc), "pred": [0 if a else 1 for a in acc], "acc": [float(a) for a in acc]}


def _task(acc: list[int]) -> dict:
    return {"acc": sum(acc) / len(acc), "acc_stderr": 0.1, "acc_norm": None, "n": len(acc), "num_fewshot": 0}


def _right(k: int, n: int = 8) -> list[int]:
    return [1] * k + [0] * (n - k)


def _run(runs: Path, method: str, lr: float, seed: int, val: int | None, test: int | None,
         rank: int = 2) -> str:
    """A finished run folder with a resolved config.yaml and one eval file: ``val``/``test`` items right of 8 on
    qft_synthetic_val / qft_synthetic (None: that task not evaluated)."""
    hp = {} if method == "base" else {"rank": rank}
    cfg = C.resolve({"model": {"name": "tiny-llama"}, "method": {"name": method, **hp},
                     "data": {"source": "synthetic", "synthetic": {"seed": 0, "n_entities": 6}},
                     "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 4, "lr": lr},
                     "eval": {"tasks": ["qft_synthetic", "qft_synthetic_val"]}, "seed": seed})
    rid = C.run_id(cfg)
    rd = runs / rid
    rd.mkdir(parents=True)
    (rd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (rd / "train.json").write_text(json.dumps({"steps": 2, "wall_time_s": 1.0}))
    mode = {"qlora": "4+16", "qalora": "int-merge"}.get(method, "base")
    res = {"tasks": {}, "items": {}, "mode": mode, "num_fewshot": 0}
    for task, k in (("qft_synthetic_val", val), ("qft_synthetic", test)):
        if k is not None:
            res["tasks"][task] = _task(_right(k))
            res["items"][task] = _items(_right(k), "v" if task.endswith("val") else "t")
    (rd / "eval" / mode).mkdir(parents=True)
    (rd / "eval" / mode / "qft_synthetic+qft_synthetic_val.json").write_text(json.dumps(res))
    return rid


@pytest.fixture
def tuned(tmp_path) -> pd.DataFrame:
    """Hand-made runs whose test accuracy always disagrees with the validation accuracy.

    qlora at lr 1e-3, 4e-3, 1.6e-2: validation 4/8, 6/8 (mean of seeds at 5/8 and 7/8), 5/8; test best at 1e-3
    -> the rule picks 4e-3. qalora: validation 4/8, 6/8 (seeds at 5/8 and 7/8), 6/8: a tie of 4e-3 and 1.6e-2,
    test best at 1.6e-2 -> the rule picks the smaller, 4e-3. A qlora run at 6.4e-2 with only a (perfect) test
    score, and a base run, are never rows."""
    runs = tmp_path / "results" / "runs"
    _run(runs, "qlora", 1e-3, 0, val=4, test=8)
    _run(runs, "qlora", 4e-3, 0, val=5, test=2)
    _run(runs, "qlora", 4e-3, 1, val=7, test=2)
    _run(runs, "qlora", 1.6e-2, 0, val=5, test=3)
    _run(runs, "qlora", 6.4e-2, 0, val=None, test=8)
    _run(runs, "qalora", 1e-3, 0, val=4, test=4)
    _run(runs, "qalora", 4e-3, 0, val=5, test=1)
    _run(runs, "qalora", 4e-3, 1, val=7, test=1)
    _run(runs, "qalora", 1.6e-2, 0, val=6, test=8)
    _run(runs, "base", 1e-3, 0, val=8, test=8)
    return R.collect(tmp_path / "results")


def test_lr_column_in_the_long_frame_and_tables(tuned):
    assert "lr" in R.COLUMNS and "lr_group" in R.COLUMNS
    assert sorted(tuned.loc[tuned["method"] == "qlora", "lr"].unique()) == [1e-3, 4e-3, 1.6e-2, 6.4e-2]
    # runs that differ only in lr and seed share lr_group, not config_id
    q = tuned[tuned["method"] == "qlora"]
    assert q["lr_group"].nunique() == 1 and q["config_id"].nunique() == 4
    tabs = R.tables(tuned, paper_csv=False)
    syn = tabs["synthetic"]
    assert "lr" in syn.columns and "config" not in syn.columns  # lr varies: shown, and tells the rows apart
    qs = syn[syn["method"] == "qlora"].set_index("lr")
    assert list(qs.index) == ["0.001", "0.004", "0.016", "0.064"]  # sorted by lr
    assert qs.loc["0.004", "seeds"] == 2
    eff = tabs["efficiency"]
    assert "lr" in eff.columns and "config" not in eff.columns
    # a table whose runs share one lr has no lr column (as before)
    one = R.tables(tuned[tuned["lr"] == 4e-3], paper_csv=False)
    assert "lr" not in one["synthetic"].columns and "lr" not in one["efficiency"].columns


def test_lr_choice_follows_validation_never_test(tuned, tmp_path):
    t = R.lr_choice_table(tuned)
    assert list(t.columns) == R.LR_CHOICE_COLUMNS
    assert set(t["method"]) == {"qlora", "qalora"}  # base: never trained, no row
    q = t[t["method"] == "qlora"].set_index("lr")
    assert list(q.index) == ["0.001", "0.004", "0.016"]  # 6.4e-2 has no validation score: no row
    assert list(q["validation acc (%)"]) == pytest.approx([50.0, 75.0, 62.5])
    assert list(q["seeds"]) == [1, 2, 1] and list(q["n items"]) == [8, 8, 8]
    assert (q["ci_lo"] <= q["validation acc (%)"]).all() and (q["validation acc (%)"] <= q["ci_hi"]).all()
    assert list(q["chosen"]) == ["", "yes", ""]  # test was best at 0.001 (and perfect at 0.064)
    assert list(q["edge"]) == ["", "", ""]  # chosen inside the grid
    a = t[t["method"] == "qalora"].set_index("lr")
    assert list(a["validation acc (%)"]) == pytest.approx([50.0, 75.0, 75.0])
    assert list(a["chosen"]) == ["", "yes", ""]  # tie of 0.004 and 0.016: the smaller; test favoured 0.016
    assert list(a["mode"]) == ["int-merge"] * 3 and list(q["mode"]) == ["4+16"] * 3
    # the table does not depend on the test split at all
    pd.testing.assert_frame_equal(t, R.lr_choice_table(tuned[tuned["task"] != "synthetic"]))
    flipped = tuned.copy()
    flipped.loc[flipped["task"] == "synthetic", "value"] = 100.0 - flipped.loc[flipped["task"] == "synthetic", "value"]
    pd.testing.assert_frame_equal(t, R.lr_choice_table(flipped))
    # and it is one of the report's tables, written like the others
    tabs = R.tables(tuned, paper_csv=False)
    pd.testing.assert_frame_equal(tabs["lr_choice"], t)
    paths = R.write_tables({"lr_choice": t}, tmp_path / "tables")
    assert {p.name for p in paths} == {"lr_choice.csv", "lr_choice.md", "lr_choice.tex"}
    csv = pd.read_csv(tmp_path / "tables" / "lr_choice.csv", dtype=str, keep_default_na=False)
    assert csv.loc[csv["chosen"] == "yes", ["method", "lr"]].values.tolist() == [["qlora", "0.004"],
                                                                                 ["qalora", "0.004"]]
    # a choice at the top of the grid says so
    top = tuned.copy()
    sel = (top["task"] == "synthetic_val") & (top["method"] == "qlora") & (top["lr"] == 1.6e-2)
    top.loc[sel, "value"] = 100.0
    tq = R.lr_choice_table(top).query("method == 'qlora'").set_index("lr")
    assert list(tq["chosen"]) == ["", "", "yes"] and list(tq["edge"]) == ["", "", "top"]
    # without validation numbers there is no lr_choice table
    assert "lr_choice" not in R.tables(tuned[tuned["task"] != "synthetic_val"], paper_csv=False)


def test_lr_choice_groups_apart_what_differs_beyond_lr(tmp_path):
    """Runs that differ in anything but lr and seed (here the rank) are separate groups, each with its own
    choice; two groups that would look the same get the config hash."""
    runs = tmp_path / "results" / "runs"
    _run(runs, "qlora", 1e-3, 0, val=6, test=0, rank=2)
    _run(runs, "qlora", 4e-3, 0, val=5, test=8, rank=2)
    _run(runs, "qlora", 1e-3, 0, val=3, test=8, rank=4)
    _run(runs, "qlora", 4e-3, 0, val=7, test=0, rank=4)
    t = R.lr_choice_table(R.collect(tmp_path / "results"))
    chosen = {(int(r.rank), r.lr) for r in t.itertuples() if r.chosen == "yes"}
    assert chosen == {(2, "0.001"), (4, "0.004")}
    assert "config" not in t.columns


# ------------------------------------------------------------------------------------ one tiny end to end run
def test_lr_grid_end_to_end_on_tiny_llama(tmp_path):
    """A two-lr sweep of tiny-llama QLoRA runs through the pipeline; the report's lr_choice has one row per lr
    and marks the rule's pick."""
    from qftbench import pipeline as P

    sw = tiny_sweep(tmp_path, methods=[{"name": "qlora"}], seeds=[0])
    runs = S.expand(sw)
    assert len(runs) == 2
    for cfg in runs.values():
        P.run_all(copy.deepcopy(cfg))
    df = R.collect(tmp_path / "results")
    assert set(df["task"]) == {"synthetic_val"} and sorted(df["lr"].unique()) == [1e-3, 4e-3]
    t = R.tables(df, paper_csv=False)["lr_choice"]
    assert list(t["lr"]) == ["0.001", "0.004"] and list(t["n items"]) == [6, 6]
    means = dict(zip([1e-3, 4e-3], t["validation acc (%)"]))
    assert t.loc[t["chosen"] == "yes", "lr"].tolist() == [R.fmt_lr(R.choose_lr(means))]


def test_a_method_entry_can_run_at_some_seeds_only(tmp_path):
    """`{name: base, seeds: [0]}`: the un-tuned pretrained model is evaluated once, not once per training seed;
    a seed the sweep does not have is a ConfigError naming the entry and the fix."""
    sweep = tiny_sweep(tmp_path, grid={"rank": [2]})
    sweep["seeds"] = [0, 1, 2]
    sweep["methods"] = [{"name": "base", "seeds": [0]}, {"name": "qlora"}]
    runs = S.expand(sweep)
    assert sorted((c["method"]["name"], c["seed"]) for c in runs.values()) == [
        ("base", 0), ("qlora", 0), ("qlora", 1), ("qlora", 2)]
    sweep["methods"][0]["seeds"] = [5]
    with pytest.raises(ConfigError, match=r"methods\[0\] \(base\)\.seeds: \[5\].*Fix"):
        S.expand(sweep)


def test_claims_config_takes_every_rate_from_the_tuning_rule():
    """config/claims.yaml: the default's task, steps and seeds; every method at the rate config/methods.yaml gives
    it (the tuning rule's choice), on every base; its claims validate and name only methods it runs, and the runs
    it shares with config/methods.yaml (base, lora, qlora, qbara at rank 16) differ from methods.yaml's only in the
    GPTQ calibration windows (part of every run id: "QLoRA w/ GPTQ" calibrates the merged model with them) and in
    float32 training (bf16 is emulated on AVX2-only CPUs)."""
    every, claims = (S.load(REPO / "config" / f"{n}.yaml") for n in ("methods", "claims"))
    m_runs, c_runs = S.expand(every), S.expand(claims)
    rate = {c["method"]["name"]: c["train"]["lr"] for c in m_runs.values()}
    for c in c_runs.values():
        assert c["train"]["lr"] == rate[c["method"]["name"]], c["method"]
        for key in ("max_steps", "batch_size", "optimizer"):
            assert c["train"][key] == every["run"]["train"][key]
        assert c["train"]["precision"] == "fp32"  # bf16 is emulated (about 20x slower) on AVX2-only CPUs
    assert claims["data"] == every["data"] and sorted({c["seed"] for c in c_runs.values()}) == [0, 1, 2]
    shared = {rid for rid, c in c_runs.items() if c["method"]["name"] in ("lora", "qbara")
              or (c["method"]["name"] == "qlora" and c["method"]["bits"] == 4)
              or (c["method"]["name"] == "base" and c["method"]["bits"] == 16)}
    assert len(shared) == 10  # base once, lora, qlora, qbara x 3 seeds
    for rid in shared:
        twin = next(c for c in m_runs.values() if c["method"] == c_runs[rid]["method"] and c["seed"] == c_runs[rid]["seed"])
        assert {k: v for k, v in c_runs[rid].items() if k not in ("calibration", "eval", "sweep", "resources", "train")} \
            == {k: v for k, v in twin.items() if k not in ("calibration", "eval", "sweep", "resources", "train")}
    named = {c[s]["method"] for c in claims["claims"] for s in ("a", "b")}
    assert named <= {c["method"]["name"] for c in c_runs.values()} and len(claims["claims"]) >= 12
