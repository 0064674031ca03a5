"""The claims table (qftbench/claims.py): validation, the verdict rules, and claims over real tiny runs."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

from methods.errors import ConfigError
from qftbench import claims as K
from qftbench import report as R
from qftbench import sweep as S

sys.path.insert(0, str(Path(__file__).parent))

CLAIM = {"id": "x", "paper": "P, Table 1", "claim": "A beats B", "kind": "beats", "a": {"method": "qalora"},
         "b": {"method": "qlora"}}


@pytest.mark.parametrize("edit,msg", [
    (lambda c: c.update(kind="better"), r"kind='better' is not one of"),
    (lambda c: c.update(colour=1), r"unknown key 'colour'"),
    (lambda c: c.pop("id"), r"missing 'id'"),
    (lambda c: c["a"].update(method="qalorra"), r"a.method: unknown method 'qalorra'.*qalora"),
    (lambda c: c["b"].update(group_size=32), r"b: unknown key 'group_size'.*group"),
    (lambda c: c.update(kind="lower"), r"kind 'lower' compares a recorded number"),
    (lambda c: c.update(margin=-1), r"margin=-1 must be a number of points >= 0"),
    (lambda c: c.update(cell={"tasks": "x"}), r"cell: unknown key"),
])
def test_claims_are_validated_with_the_field_and_the_fix(edit, msg):
    c = copy.deepcopy(CLAIM)
    edit(c)
    with pytest.raises(ConfigError, match=msg):
        K.validate([c])
    with pytest.raises(ConfigError, match="used twice"):
        K.validate([CLAIM, CLAIM])


@pytest.mark.parametrize("kind,lo,hi,p,margin,want", [
    ("beats", 0.5, 3.0, 0.01, 2, "supported"),
    ("beats", 0.5, 3.0, 0.2, 2, "inconclusive"),      # the interval and the test must agree
    ("beats", -3.0, -0.5, 0.01, 2, "contradicted"),
    ("beats", -1.0, 2.0, 0.5, 2, "inconclusive"),
    ("not-worse", -1.5, 4.0, 0.6, 2, "supported"),    # lower end above -margin
    ("not-worse", -5.0, 1.0, 0.6, 2, "inconclusive"),
    ("not-worse", -5.0, -1.0, 0.01, 2, "contradicted"),
    ("matches", -1.0, 1.5, 0.7, 2, "supported"),
    ("matches", -3.0, 1.5, 0.7, 2, "inconclusive"),
    ("matches", 2.5, 6.0, 0.01, 2, "contradicted"),
    ("matches", -9.0, -2.1, 0.01, 2, "contradicted"),
])
def test_verdict_rules(kind, lo, hi, p, margin, want):
    assert K.verdict(kind, lo, hi, p, margin)[0] == want


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from qftbench import pipeline as P
    from test_pipeline import tiny_cfg

    root = tmp_path_factory.mktemp("claims")
    for m in ({"name": "qlora", "rank": 4, "alpha": 8},
              {"name": "qalora", "rank": 4, "alpha": 8, "group_size": 32}):
        P.run_all(tiny_cfg(root, m, eval={"modes": ["deploy", "4+16"]} if m["name"] == "qalora" else {}))
    return R.collect(root / "results")


@pytest.mark.slow
def test_claims_over_real_tiny_runs(runs):
    df = runs
    agg = R.aggregate(df)
    claims = [
        {**CLAIM, "id": "beats"},
        {**CLAIM, "id": "matches-wide", "kind": "matches", "margin": 100},
        {**CLAIM, "id": "matches-none", "kind": "matches", "margin": 0},
        {"id": "merge-exact", "paper": "QA-LoRA", "claim": "the merged INT model scores what the unmerged one does",
         "kind": "exact", "a": {"method": "qalora", "mode": "int-merge"}, "b": {"method": "qalora", "mode": "4+16"}},
        {"id": "lower", "paper": "QLoRA, Table 2", "claim": "NF4's error is below INT4's", "kind": "lower",
         "a": {"method": "qlora"}, "b": {"method": "qalora"}, "cell": {"metric": "weight_error"}},
        {**CLAIM, "id": "absent", "a": {"method": "peqa"}},
        # selectors by bits and group, on the deployed (int-merge: "4") and the unmerged ("4+16": its base's 4) rows
        {"id": "merge-exact-bits", "paper": "QA-LoRA", "claim": "the same, selected by bits and group",
         "kind": "exact", "a": {"method": "qalora", "mode": "int-merge", "bits": 4, "group": 32},
         "b": {"method": "qalora", "mode": "4+16", "bits": 4}},
        {**CLAIM, "id": "beats-bits", "a": {"method": "qalora", "bits": 4}, "b": {"method": "qlora", "bits": 4}},
        {**CLAIM, "id": "bits-none", "a": {"method": "qalora", "bits": 2}},
    ]
    K.validate(claims)
    t = K.claims_table(df, agg, claims).set_index("id")
    # the same difference as the paired table's for the same pair
    pt = R.paired_table(agg)
    row = pt[(pt["A"].str.startswith("qalora")) & (pt["B"].str.startswith("qlora"))].iloc[0]
    assert t.loc["beats", "A - B"] == row["A - B"] and t.loc["beats", "95% CI"] == row["95% CI"]
    lo, hi = (float(x) for x in t.loc["beats", "95% CI"].strip("[]").split(","))
    assert t.loc["beats", "verdict"] == K.verdict("beats", lo, hi, float(t.loc["beats", "p"]), 2)[0]
    assert t.loc["matches-wide", "verdict"] == "supported" and t.loc["matches-none", "verdict"] != "supported"
    # QA-LoRA's merge into the INT zero points is exact: every item scores the same
    assert t.loc["merge-exact", "verdict"] == "supported" and t.loc["merge-exact", "why"] == "identical on every item"
    assert t.loc["merge-exact-bits", "verdict"] == "supported"
    assert t.loc["beats-bits", "A - B"] == t.loc["beats", "A - B"] and t.loc["bits-none", "verdict"] == "not run"
    w = {m: json.loads((Path(d) / "accounting.json").read_text())["base_weight_error"]["mean"]
         for m, d in zip(df["method"], df["run_dir"])}
    assert t.loc["lower", "verdict"] == ("supported" if w["qlora"] < w["qalora"] else "contradicted")
    assert t.loc["absent", "verdict"] == "not run" and "match 0 / 1" in t.loc["absent", "why"]


def test_a_sweep_with_claims_validates_them_and_expects_the_table():
    sw = S.load(Path(__file__).parents[1] / "config" / "tiny.yaml")
    sw["claims"] = [dict(CLAIM)]
    runs = S.expand(sw)
    assert "claims" in S.expected_tables(sw, runs)
    sw["claims"] = [{**CLAIM, "kind": "wins"}]
    with pytest.raises(ConfigError, match=r"claims\[0\].kind='wins'"):
        S.expand(sw)


def test_a_selector_that_selects_no_run_is_an_error_before_any_job():
    """A claim whose a or b names a setting the sweep does not run (a typo in bits, a method left out) fails at
    expansion with the claim, the selector and what the sweep does run, instead of a 'not run' row hours later."""
    sw = S.load(Path(__file__).parents[1] / "config" / "tiny.yaml")
    sw["claims"] = [{**CLAIM, "a": {"method": "qalora", "bits": 3}}]
    with pytest.raises(ConfigError, match=r"claims\[0\] \(.*\)\.a=\{'method': 'qalora', 'bits': 3\} selects no run"
                                          r".*\{bits: 4\}"):
        S.expand(sw)
    sw["claims"] = [{**CLAIM, "b": {"method": "loftq"}}]
    with pytest.raises(ConfigError, match=r"the sweep runs no 'loftq'"):
        S.expand(sw)
    sw["claims"] = [{**CLAIM, "a": {"method": "qalora", "rank": 4, "model": "tiny-llama", "data": "synthetic"}}]
    assert len(S.expand(sw)) == 5  # model and data as the tables name them
    sw["claims"] = [{**CLAIM, "a": {"method": "qalora", "data": "alpaca"}}]
    with pytest.raises(ConfigError, match="selects no run"):
        S.expand(sw)


def test_claim_selectors_see_peft_methods_as_the_tables_name_them():
    """A claim selects a peft baseline by the row name, rank (peft's r) and bits (its base's) that the tables show:
    the sweep's selector check and the report derive them with one function (report.run_labels)."""
    from qftbench.report import run_labels

    sw = S.load(Path(__file__).parents[1] / "config" / "peft.yaml")
    runs = S.expand({**sw, "claims": []})
    dora = [run_labels(c) for c in runs.values() if (c["method"].get("peft") or {}).get("use_dora")]
    assert dora and all(d["rank"] == 16 and d["bits"] == 4 and d["method"].startswith("peft-") for d in dora)
    name = dora[0]["method"]
    sw["claims"] = [{**CLAIM, "a": {"method": name, "rank": 16, "bits": 4}, "b": {"method": "qlora"}}]
    assert len(S.expand(sw)) == len(runs)
    sw["claims"] = [{**CLAIM, "a": {"method": name, "rank": 8}, "b": {"method": "qlora"}}]
    with pytest.raises(ConfigError, match=r"selects no run.*\{rank: 16\}"):
        S.expand(sw)
