"""config/sources.yaml: the paper grid, setting by setting (qftbench.sources)."""
from __future__ import annotations

import copy

import pytest
import yaml

from qftbench import sources as Q


@pytest.fixture(scope="module")
def data():
    return Q.load()


@pytest.fixture(scope="module")
def paper_runs():
    from qftbench import sweep as S

    return Q.expand_presets(S.load(Q.PAPER_YAML), where=str(Q.PAPER_YAML))  # as written, and under each preset


def test_sources_yaml_loads_and_validates(data):
    assert set(Q.PAPERS) <= set(data["papers"])
    n = 0
    for pid, s in Q.settings(data):
        n += 1
        for k in ("paper", "code", "ours"):
            assert "value" in s[k], (pid, s["setting"], k)
        assert s["status"] in Q.STATUSES, (pid, s["setting"])
        assert s["ours"]["field"]
        if s["status"] == "paper-vs-code-disagree":
            assert s["follows"] in ("paper", "code", "preset")
        if s["status"] == "deliberate-difference":
            assert s["why"]
        if s["status"] == "mismatch":
            assert s["fix"]
    assert n >= 40
    # paper.yaml fixed against the table: every value matches its source or is a documented, deliberate
    # difference; where paper and code disagree, both are presets (one setting, the MMLU split, follows the paper:
    # the released codes' validation-split MMLU is a training-time monitor the suite does not run)
    statuses = [s["status"] for _, s in Q.settings(data)]
    assert "mismatch" not in statuses
    follows = [s["follows"] for _, s in Q.settings(data) if s["status"] == "paper-vs-code-disagree"]
    assert follows.count("preset") >= 8 and set(follows) <= {"preset", "paper"}
    for pid in Q.PAPERS:
        assert data["papers"][pid]["code"] in data["sources"]


@pytest.mark.parametrize("edit, msg", [
    (lambda s: s.update(status="typo"), "is not one of"),
    (lambda s: s.update(status="deliberate-difference", why=None), "needs 'why'"),
    (lambda s: s.update(status="mismatch", fix=None), "needs 'fix'"),
    (lambda s: s.update(status="paper-vs-code-disagree", follows=None), "follows: paper|code|preset"),
    (lambda s: s.update(status="paper-vs-code-disagree", follows="preset"), "needs ours.check selectors with preset"),
    (lambda s: s["ours"].update(check=[{"path": "train.lr", "preset": "papr"}]), "preset must be one of"),
    (lambda s: s.pop("code"), "needs 'code'"),
    (lambda s: s["paper"].update(value=None, note=None), "add a 'note'"),
    (lambda s: s["code"].update(value=1, file=None), "add 'file' and 'line'"),
    (lambda s: s["ours"].update(check=[{"path": "train.lr", "mode": "some"}]), "mode must be one of"),
])
def test_validation_rejects_malformed_entries(data, edit, msg):
    bad = copy.deepcopy(data)
    edit(bad["papers"]["qlora"]["settings"][0])
    with pytest.raises(Q.SourcesError, match=msg):
        Q.validate(bad)


def test_validation_requires_every_paper(data):
    bad = copy.deepcopy(data)
    del bad["papers"]["loftq"]
    with pytest.raises(Q.SourcesError, match="missing"):
        Q.validate(bad)


def test_settings_md_is_the_rendering(data):
    """docs/SETTINGS.md cannot go stale: regenerate with python -m qftbench.sources > docs/SETTINGS.md."""
    assert Q.SETTINGS_MD.read_text() == Q.render_markdown(data)


def test_render_has_one_table_per_paper(data):
    md = Q.render_markdown(data)
    assert md.splitlines()[0].startswith("_Generated from `config/sources.yaml` by `python -m qftbench.sources")
    header = "| setting | paper (where) | released code (file:line) | ours (field) | status / why |"
    assert md.count(header) == len(data["papers"])
    heads = {header, "| source | repository | commit | note |"}
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and ln not in heads]
    assert len(rows) == sum(1 for _ in Q.settings(data)) + len(data["sources"])


def test_paper_config_agrees_with_the_table(data, paper_runs):
    """Every run of config/paper.yaml has the value sources.yaml records as `ours` (drift, not correctness:
    a wrong value is fine as long as the table records it, with status mismatch)."""
    found = Q.check_paper_config(paper_runs, data)
    assert found == [], "\n" + Q.format_disagreements(found)


def test_check_catches_drift(data, paper_runs):
    runs = copy.deepcopy(paper_runs)
    rid = next(r for r, c in runs["paper"].items()
               if c["method"]["name"] == "qalora" and c["sweep"]["model_label"] == "llama-7b")
    runs["paper"][rid]["train"]["lr"] = 2.0e-4
    del runs["paper"][rid]["method"]["pool"]
    found = Q.check_paper_config(runs, data)
    by_path = {(d["path"], d["setting"]): d for d in found}
    lr = by_path[("train.lr", "learning rate")]
    assert lr["paper"] == "qalora" and lr["runs"] == [rid] and lr["actual"] == 2.0e-4
    assert lr["selector"]["preset"] == "paper"
    assert by_path[("method.pool", "group pooling scale")]["actual"] == "<missing>"
    # the released-code preset is checked on its own runs: swapping the presets breaks both
    swapped = {None: runs[None], "paper": paper_runs["released-code"], "released-code": paper_runs["paper"]}
    bad = {d["setting"] for d in Q.check_paper_config(swapped, data)}
    assert {"learning rate", "LoRA dropout", "alternating iterations T", "MMLU average"} <= bad
    # a selector that no longer selects anything is reported too
    gone = {k: {r: c for r, c in v.items() if c["method"]["name"] != "loftq"} for k, v in runs.items()}
    assert any(d["paper"] == "loftq" and d["actual"] == "<no run selected>"
               for d in Q.check_paper_config(gone, data))


def test_set_mode_reports_extra_values(data, paper_runs):
    runs = copy.deepcopy(paper_runs)
    rid = next(r for r, c in runs[None].items() if c["method"]["name"] == "peqa")
    runs[None][rid]["method"]["group_size"] = 64
    found = [d for d in Q.check_paper_config(runs, data) if d["path"] == "method.group_size"]
    assert len(found) == 1 and found[0]["actual"] == [64, 128]


def test_load_reports_bad_yaml(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"sources": {"x": {"repo": "a/b", "commit": "c"}}, "papers": {}}))
    with pytest.raises(Q.SourcesError, match="missing"):
        Q.load(p)
