"""The Snakemake DAG: dry runs of every config, the tiny sweep end to end, restart after a kill, bad configs, lint.

Every snakemake call is bounded with ``timeout -k`` (Snakemake ignores SIGTERM while jobs run).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from methods.errors import ConfigError
from qftbench import sweep as S
from tests.conftest import REPO, shared_data_root

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def snakemake(args, cwd, timeout=900, check=True):
    cmd = ["timeout", "-k", "10", str(timeout), *SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def job_stats(output: str) -> dict[str, int]:
    block = output.split("Job stats:")[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", block, re.M)}


# (config, expected jobs): derived by hand from the configs, see the comments
EXPECTED = {
    # 2 bases (INT4 g32 RTN shared by base and qalora; NF4), 5 runs (base + 2 ranks x {qlora, qalora})
    "tiny": {"quantize_base": 2, "finetune": 5, "evaluate": 5, "report": 1, "runs_table": 1, "all": 1, "total": 15},
    # 7 runs: base once (seeds: [0]) + 3 seeds x {qlora, qalora}; bases: 16-bit, NF4, INT4 g32
    "default": {"quantize_base": 3, "finetune": 7, "evaluate": 7, "report": 1, "runs_table": 1, "all": 1, "total": 20},
    # 25 runs: base once + 3 seeds x 8 methods; bases: 16-bit (base, lora), NF4 (qlora, qbara), INT4 g32
    # (qalora, qahira, peqa), INT4 8x4 (qahira-ref), LoftQ r16
    "methods": {"quantize_base": 5, "finetune": 25, "evaluate": 25, "report": 1, "runs_table": 1, "all": 1, "total": 58},
    # 4 runs x 3 evaluation groups (MMLU 0-shot, MMLU 5-shot, commonsense); bases: 16-bit, NF4, INT4 g32 (qalora
    # and qahira share it)
    "local": {"quantize_base": 3, "finetune": 5, "evaluate": 15, "report": 1, "runs_table": 1, "all": 1, "total": 26},
    # 1 base + (8 suite methods + 5 peft methods) x 4 learning rates, each evaluated once on the validation split
    "tune": {"finetune": 53, "evaluate": 53, "report": 1, "runs_table": 1, "all": 1},
    # 25 runs: base once + 3 seeds x (lora, qlora, qalora + 5 peft methods); bases: 16-bit (base, lora, PiSSA),
    # NF4 (qlora, DoRA, rsLoRA, VeRA, IA3: qlora's base, one job), INT4 g32 (qalora)
    "peft": {"quantize_base": 3, "finetune": 25, "evaluate": 25, "report": 1, "runs_table": 1, "all": 1, "total": 56},
    # 16 un-tuned bases, one run and one evaluation (commonsense + perplexity) each: 16-bit, NF4/NF3/NF2, and
    # INT4/3/2 x g32/g64 x RTN/GPTQ
    "damage": {"quantize_base": 16, "finetune": 16, "evaluate": 16, "report": 1, "runs_table": 1, "all": 1, "total": 51},
    # 30 runs: 3 un-tuned bases (16-bit, FP4, INT4 g64) + 3 seeds x 9 (lora, qlora, qlora NF2, loftq NF2, qbara,
    # qalora INT4 g64 / INT3 g32 / INT2 g32, qahira INT4 g64); 51 evaluations: qlora in 4 modes (4+16 and
    # requant w4g64 / w3g32 / w2g32), qalora and qahira in 2 (int-merge, 4+16); 9 bases: 16-bit, FP4, INT4 g64 RTN,
    # NF4, NF2, LoftQ NF2, GPTQ INT4 g64 (qalora and qahira share it), INT3 g32, INT2 g32
    "claims": {"quantize_base": 9, "finetune": 30, "evaluate": 51, "report": 1, "runs_table": 1, "all": 1, "total": 93},
    # 2 runs (the un-tuned INT4 g32 base and qalora share one base) x 3 evaluation groups
    "tiny-real": {"quantize_base": 1, "finetune": 2, "evaluate": 6, "report": 1, "runs_table": 1, "all": 1, "total": 12},
    # 172 configurations x 3 seeds = 516 runs (test_paper_grid_size); 3 evaluation groups each, qlora in four
    # deployment modes (4+16, requant-w4g32/w3g32/w2g32): (516 - 36) x 3 + 36 x 4 x 3 = 1872
    "paper": {"finetune": 516, "evaluate": 1872, "report": 1, "runs_table": 1, "all": 1},
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_dry_run_job_counts(tmp_path, name):
    p = snakemake(["-n", "--cores", "2", "--configfile", str(REPO / "config" / f"{name}.yaml")], cwd=tmp_path,
                  timeout=600)
    stats = job_stats(p.stdout)
    for k, v in EXPECTED[name].items():
        assert stats[k] == v, (k, stats)
    if name == "paper":  # the 65B runs ask for two GPUs, the others for one
        assert "gpu=2" in p.stdout and "gpu=1" in p.stdout


def test_paper_grid_size():
    runs = S.expand(S.load(REPO / "config" / "paper.yaml"))
    assert len(runs) == 516
    by = {}
    for cfg in runs.values():
        by.setdefault(cfg["method"]["name"], 0)
        by[cfg["method"]["name"]] += 1
    # per (model, data): base 1 + lora 1 + qlora 1 + qalora 3 + loftq 1 + qbara 1 + qahira 3 + qahira-ref 1; QA-LoRA
    # Table 5 (INT4/INT2 x g64/g128, 7B/13B, Alpaca) and PEQA (INT4, 7B/13B, Alpaca): the rows that were published
    assert by == {"base": (12 + 6 * 3) * 3, "lora": 36, "qlora": 36, "qalora": (36 + 8) * 3, "peqa": 2 * 3,
                  "loftq": 36, "qbara": 36, "qahira": 108, "qahira-ref": 36}
    a = next(c for c in runs.values() if c["method"]["name"] == "qalora" and c["sweep"]["model_label"] == "llama-65b"
             and c["sweep"]["data_label"] == "flan_v2")
    assert a["train"]["lr"] == 1e-5 and a["train"]["max_steps"] == 20000 and a["method"]["dropout"] == 0.05
    assert a["model"]["dtype"] == "float16" and a["train"]["precision"] == "fp32" and a["method"]["pool"] == "sum"
    assert a["data"]["source_max_len"] == 1024 and a["sweep"]["preset"] == "paper"
    # the released code's preset, as `snakemake --config preset=released-code` runs it
    code = S.expand({**S.load(REPO / "config" / "paper.yaml"), "preset": "released-code"})
    b = next(c for c in code.values() if c["method"]["name"] == "qalora" and c["sweep"]["model_label"] == "llama-65b"
             and c["sweep"]["data_label"] == "flan_v2")
    assert b["train"]["lr"] == 2e-4 and b["method"]["dropout"] == 0.0 and b["method"]["pool"] == "mean"
    assert b["eval"]["mmlu"]["average"] == "subjects" and b["model"]["dtype"] == "float16"
    lq = next(c for c in code.values() if c["method"]["name"] == "loftq")
    assert (lq["method"]["variant"], lq["method"]["iters"], lq["method"]["scale_compensation"]) == ("peft", 1, False)
    q = next(c for c in runs.values() if c["method"]["name"] == "qlora" and c["sweep"]["model_label"] == "llama-7b")
    assert q["train"]["lr"] == 2e-4 and q["method"]["dropout"] == 0.1 and q["eval"]["modes"] == ["4+16", "requant"]
    # "QLoRA w/ GPTQ" at 4, 3 and 2 bits from the same trained model: one evaluation mode per setting
    jobs = S.eval_jobs(q)
    assert [j.mode for j in jobs if j.key == "mmlu-5shot"] == ["4+16", "requant-w4g32", "requant-w3g32",
                                                               "requant-w2g32"]
    cs = "hellaswag+piqa+winogrande+arc_easy+arc_challenge+boolq+openbookqa"
    assert [j.path.split("/eval/")[1] for j in jobs if j.mode == "requant-w3g32"] == [
        "requant-w3g32/mmlu.json", "requant-w3g32/mmlu-5shot.json", f"requant-w3g32/{cs}.json"]
    from qftbench import report as R

    assert [R.deployment(q["method"], j.mode, q["eval"]) for j in jobs if j.key == "mmlu-5shot"] == [
        ("4+16", None), ("4", 32), ("3", 32), ("2", 32)]
    assert S.resources(S.load(REPO / "config" / "paper.yaml"), a)["gpu"] == 2


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    """The tiny sweep run once end to end (shared by the tests below)."""
    d = tmp_path_factory.mktemp("tiny-a")
    snakemake(["--cores", "2", "--configfile", str(REPO / "config" / "tiny.yaml")], cwd=d)
    return d


@pytest.mark.slow
def test_tiny_dag_runs_end_to_end_and_second_run_does_nothing(tiny_sweep):
    tmp_path = tiny_sweep
    cfg = str(REPO / "config" / "tiny.yaml")
    tables = tmp_path / "results" / "tables" / "tiny"
    for t in ("synthetic", "efficiency", "paper_vs_reproduced"):
        for ext in ("csv", "md", "tex"):
            assert (tables / f"{t}.{ext}").stat().st_size > 0
    for f in ("acc_vs_params", "acc_vs_flops", "acc_vs_rank", "loss_curves"):
        assert (tmp_path / "figures" / "tiny" / f"{f}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "figures" / "tiny" / f"{f}.pdf").read_bytes()[:4] == b"%PDF"
    text = (tables / "synthetic.csv").read_text()
    for method in ("base", "qlora", "qalora"):
        assert method in text
    # every run left a complete record, each file as its schema declares (qftbench/schemas)
    from qftbench import records

    for rd in (tmp_path / "results" / "runs").iterdir():
        assert {"train.json", "accounting.json", "provenance.json", "config.yaml", "eval"} <= {p.name for p in rd.iterdir()}
        assert len(records.validate_run(rd)) >= 4
    # the sweep's table of runs: one line per run folder, its base one of the built base folders
    runs = pd.read_csv(tables / "runs.tsv", sep="\t")
    assert list(runs.columns) == list(S.RUNS_COLUMNS)
    assert set(runs["run_id"]) == {rd.name for rd in (tmp_path / "results" / "runs").iterdir()}
    assert set(runs["base"]) == {b.name for b in (tmp_path / "results" / "cache" / "bases").iterdir()}
    assert sorted(runs["method"]) == ["base", "qalora", "qalora", "qlora", "qlora"]
    assert sorted(runs.loc[runs["method"] == "qlora", "rank"]) == [2, 4] and set(runs["evaluations"]) == {1}
    assert runs.loc[runs["method"] == "base", "lr"].isna().all()
    again = snakemake(["-n", "--cores", "2", "--configfile", cfg], cwd=tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_a_second_sweep_sharing_the_bases_leaves_the_first_with_nothing_to_do(tiny_sweep, tmp_path, monkeypatch,
                                                                              clean_registry):
    """A job's identity is what defines its output: after the tiny sweep, another sweep in the same results folder
    whose runs share tiny's quantized bases (claimed there by other methods, with other training settings) builds
    no base again, and a dry run of the tiny sweep afterwards has nothing to do.

    The second sweep also runs a method of one's own: a module in the working folder that defines it and registers
    it in one line, named by the sweep's ``plugins:``. Every job imports it (Snakemake runs each in a process of its
    own); it appears in the tables under its name and in the figures under its own label."""
    import shutil

    import yaml

    from qftbench import pipeline as P
    from qftbench import plots, report
    from qftbench import sweep as S
    from tests.conftest import PLUGIN_SOURCE

    work = tmp_path / "shared"
    shutil.copytree(tiny_sweep, work, symlinks=True)
    (work / "my_methods").mkdir()
    (work / "my_methods" / "mine.py").write_text(PLUGIN_SOURCE)
    monkeypatch.chdir(work)  # the plugin path is relative to the folder snakemake runs in
    tiny = REPO / "config" / "tiny.yaml"
    other = yaml.safe_load(tiny.read_text())
    other.update(name="tiny-other", outputs={"tables": "results/tables/tiny-other", "figures": "figures/tiny-other"},
                 plugins=["my_methods/mine.py"])
    # INT4 g32 RTN, NF4, NF4 (the plugin method is a QLoRA under another name)
    other["methods"] = [{"name": "peqa", "group_size": 32}, {"name": "qbara", "k": 2}, {"name": "myqlora"}]
    other.pop("claims")  # tiny's claims name its methods
    other["grid"] = {"rank": [2]}
    other["run"]["train"] = {**other["run"]["train"], "lr": 3e-3}
    other_cfg = tmp_path / "other.yaml"
    other_cfg.write_text(yaml.safe_dump(other))
    bases = lambda sw: {P.base_dir(c).name for c in S.expand(sw).values()}  # noqa: E731
    assert bases(other) <= bases(S.load(tiny)), "the second sweep must share the first one's bases"

    r = snakemake(["--cores", "2", "--configfile", str(other_cfg)], cwd=work)
    stats = job_stats(r.stdout + r.stderr)
    assert "quantize_base" not in stats, "a shared base was built again"
    assert stats["finetune"] == 3 and stats["evaluate"] == 3
    again = snakemake(["-n", "--cores", "2", "--configfile", str(tiny)], cwd=work)
    assert "Nothing to be done" in again.stdout + again.stderr, (again.stdout + again.stderr)[-3000:]

    # the plugin method's run: its record names the plugin, its row is in the tables, its label in the figures
    (mine,) = [rd for rd in (work / "results" / "runs").iterdir() if "-myqlora-" in rd.name]
    assert yaml.safe_load((mine / "config.yaml").read_text())["plugins"] == ["my_methods/mine.py"]
    tables = work / "results" / "tables" / "tiny-other"
    for name in ("synthetic", "efficiency"):
        frame = pd.read_csv(tables / f"{name}.csv")
        assert "myqlora" in set(frame["method"]), (name, frame["method"].tolist())
    # as in the report's own process, where nothing has registered it: the run's config.yaml brings it back
    clean_registry.REGISTRY.pop("myqlora")
    clean_registry._LOADED.clear()
    for module in [k for k in sys.modules if k.startswith("qftbench_plugin_mine_")]:
        monkeypatch.delitem(sys.modules, module)
    assert plots.method_label("myqlora") == "myqlora"
    legends = []
    real_save = plots._save

    def save_and_read_legend(fig, out_dir, name):  # the real figure, written; its legend texts noted
        legends.extend(t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts())
        legends.extend(t.get_text() for lg in fig.legends for t in lg.get_texts())
        return real_save(fig, out_dir, name)

    monkeypatch.setattr(plots, "_save", save_and_read_legend)
    frame = report.collect(work / "results")
    plots.make_figures(frame[frame["run_id"].isin([p.name for p in (work / "results" / "runs").iterdir()])],
                       tmp_path / "figs")
    assert any(t.startswith("My QLoRA") for t in legends), legends
    assert "report" in stats and not (work / "results" / "logs" / "report" / "tiny-other.log").read_text().count(
        "Warning")


TIMING = ("train time (s)", "peak mem (MB)", "tokens/s")


@pytest.mark.slow
def test_snakemake_report_is_one_browsable_html_file(tiny_sweep):
    """`snakemake --report` after the tiny sweep: one HTML file that embeds the tables page (accuracy with
    intervals, paired comparisons, provenance of the runs) and the figures."""
    import base64
    import urllib.parse

    out = tiny_sweep / "report.html"
    snakemake(["--report", str(out), "--configfile", str(REPO / "config" / "tiny.yaml")], cwd=tiny_sweep)
    text = out.read_text()
    assert out.stat().st_size > 50_000 and "<html" in text.lower()
    pages = []  # the embedded files (data URIs: base64 or percent-encoded)
    # e.g. data:text/html;charset=utf8;filename=index.html;base64,PGh0bWw+...
    for m in re.finditer(r"data:text/html(?:;[\w.=-]+?)*?(;base64)?,([A-Za-z0-9+/=%._~!$&'()*;:@-]+)", text):
        pages.append(base64.b64decode(m.group(2)).decode("utf-8", "replace") if m.group(1)
                     else urllib.parse.unquote(m.group(2)))
    page = next((p for p in pages if "qftbench sweep" in p and "id='runs'" in p), None)  # (not claims.html)
    assert page is not None, f"tables page not embedded ({len(pages)} html data URIs)"
    for anchor in ("claims", "synthetic", "paired", "efficiency", "runs"):
        assert f"id='{anchor}'" in page, anchor
    assert page.index("id='claims'") < page.index("id='synthetic'")  # the claims table comes first
    assert "qalora" in page and "git commit" in page and "torch cpu capability" in page
    # config/tiny.yaml's two claims, each with a verdict (a weight-error comparison is never inconclusive)
    claims = page[page.index("id='claims'"):page.index("id='synthetic'")]
    assert "qalora-matches-qlora" in claims and "nf4-below-int4-g32" in claims
    assert re.search(r"class='v-(supported|contradicted)'>(supported|contradicted)<", claims)
    assert text.count("data:image/png") >= 3 or text.count("image/png") >= 3  # the figures
    # the claims table is also its own report entry, an HTML page the report shows inline (a CSV it only offers
    # as a download): decode it and check it holds both claims with a verdict and nothing else
    assert "filename=claims.html" in text and "Claims" in text
    own = [p for p in pages if "id='claims'" in p and "id='synthetic'" not in p]
    assert len(own) == 1 and "qalora-matches-qlora" in own[0] and "nf4-below-int4-g32" in own[0]
    assert re.search(r"class='v-(supported|contradicted)'>(supported|contradicted)<", own[0])


@pytest.mark.slow
def test_rerun_gives_identical_adapters_records_and_tables(tiny_sweep, tmp_path):
    """The same config on the same machine gives the same bytes: a second run of the tiny sweep in another
    folder has bit-identical adapters, identical evaluation records (per-item results included; timing and
    provenance aside) and identical tables (timing columns aside)."""
    import pandas as pd

    snakemake(["--cores", "2", "--configfile", str(REPO / "config" / "tiny.yaml")], cwd=tmp_path)
    a_runs, b_runs = tiny_sweep / "results" / "runs", tmp_path / "results" / "runs"
    assert sorted(p.name for p in a_runs.iterdir()) == sorted(p.name for p in b_runs.iterdir())
    for rd in a_runs.iterdir():
        other = b_runs / rd.name
        for f in sorted((rd / "adapter").glob("*")) if (rd / "adapter").is_dir() else []:
            assert f.read_bytes() == (other / "adapter" / f.name).read_bytes(), f
        for ev in sorted(rd.glob("eval/*/*.json")):
            x, y = (json.loads(p.read_text()) for p in (ev, other / ev.relative_to(rd)))
            for k in ("seconds", "provenance"):
                x.pop(k), y.pop(k)
            assert x == y, ev
        losses = [json.loads(line)["loss"] for line in (rd / "train_log.jsonl").read_text().splitlines()] \
            if (rd / "train_log.jsonl").is_file() else []
        assert losses == ([json.loads(line)["loss"] for line in (other / "train_log.jsonl").read_text().splitlines()]
                          if losses else [])
    a_tab, b_tab = tiny_sweep / "results" / "tables" / "tiny", tmp_path / "results" / "tables" / "tiny"
    for name in ("synthetic", "paired", "paper_vs_reproduced"):
        assert (a_tab / f"{name}.csv").read_bytes() == (b_tab / f"{name}.csv").read_bytes(), name
    eff_a, eff_b = (pd.read_csv(d / "efficiency.csv").drop(columns=list(TIMING)) for d in (a_tab, b_tab))
    pd.testing.assert_frame_equal(eff_a, eff_b)
    prov = json.loads(next(b_runs.glob("*qalora*/provenance.json")).read_text())
    assert prov["hardware"]["cpu"]["torch_cpu_capability"] and "features" in prov["hardware"]["cpu"]


@pytest.mark.slow
def test_real_task_dag_evaluates_mmlu_and_commonsense_end_to_end(tmp_path):
    """config/tiny-real.yaml through Snakemake: Alpaca (with its 49 empty outputs) from the data root, MMLU 0- and
    5-shot and the seven commonsense tasks from the offline mirrors, per-task limits over three evaluation jobs
    per run; the MMLU and commonsense tables hold every expected cell."""
    import pandas as pd
    import yaml

    root = shared_data_root()
    if root is None or not (root / "alpaca" / "alpaca_data.json").is_file():
        pytest.skip(f"the offline data mirrors are absent ({REPO.parent / 'shared' / 'data'}; set QFTBENCH_DATA_ROOT)")
    sweep = yaml.safe_load((REPO / "config" / "tiny-real.yaml").read_text())
    sweep["data"]["alpaca"]["path"] = str(root / "alpaca" / "alpaca_data.json")
    sweep["run"]["eval"]["data_root"] = str(root)
    cfg = tmp_path / "tiny-real.yaml"
    cfg.write_text(yaml.safe_dump(sweep))
    snakemake(["--cores", "2", "--configfile", str(cfg)], cwd=tmp_path)

    runs = {p.name.split("-")[2]: p for p in (tmp_path / "results" / "runs").iterdir()}  # tiny-llama-<method>-...
    assert set(runs) == {"base", "qalora"}
    cs = ["qft_hellaswag", "qft_piqa", "qft_winogrande", "qft_arc_easy", "qft_arc_challenge", "qft_boolq",
          "qft_openbookqa"]
    for method, mode in (("base", "base"), ("qalora", "int-merge")):
        ev = runs[method] / "eval" / mode
        assert sorted(p.name for p in ev.iterdir()) == sorted(
            ["qft_mmlu.json", "qft_mmlu-5shot.json", "+".join(cs) + ".json"])
        for shots, name in ((0, "qft_mmlu.json"), (5, "qft_mmlu-5shot.json")):
            mmlu = json.loads((ev / name).read_text())["mmlu"]["qft_mmlu"]
            assert mmlu["n"] == 57 and mmlu["n_subjects"] == 57 and mmlu["num_fewshot"] == shots  # 1 per subject
            assert set(mmlu["categories"]) == {"stem", "other", "social_sciences", "humanities"}
        common = json.loads((ev / ("+".join(cs) + ".json")).read_text())
        assert {t: common["tasks"][t]["n"] for t in cs} == {t: 4 for t in cs}
        assert common["provenance"]["limit"] == {t: 4 for t in cs}  # its own tasks' limits, no others
    data = json.loads((runs["qalora"] / "provenance.json").read_text())["data"]
    assert (data["n_total"], data["n_empty_output_total"], data["n"]) == (52002, 49, 64)

    tables = tmp_path / "results" / "tables" / "tiny-real"
    mmlu = pd.read_csv(tables / "mmlu.csv")
    assert sorted(mmlu["method"]) == ["base", "qalora"]
    n_cat = {"Hums.": 13, "STEM": 19, "Social": 12, "Other": 13, "Avg.": 57}  # subjects per category, 1 each
    for shots in (0, 5):
        for cat, n in n_cat.items():
            col = f"{shots}-shot {cat} (n={n})"  # n items in the header, mean [95% interval] in the cell
            assert col in mmlu.columns and mmlu[col].notna().all(), (col, list(mmlu.columns))
            for cell in mmlu[col]:
                mean, lo, hi = map(float, re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cell).groups())
                assert lo <= mean <= hi and hi > lo  # one question per subject must not collapse the interval
    common = pd.read_csv(tables / "commonsense.csv")
    assert sorted(common["method"]) == ["base", "qalora"]
    for task in ("HellaSwag", "PIQA", "WinoGrande", "ARC-e", "ARC-c", "BoolQ", "OBQA"):
        assert any(c.startswith(task) for c in common.columns), (task, list(common.columns))
    assert common.drop(columns=[c for c in common.columns if not any(
        c.startswith(t) for t in ("HellaSwag", "PIQA", "WinoGrande", "ARC-e", "ARC-c", "BoolQ", "OBQA"))]).notna().all().all()


@pytest.mark.slow
def test_killed_run_restarts_without_redoing_finished_runs(tmp_path):
    cfg = str(REPO / "config" / "tiny.yaml")
    cmd = ["timeout", "-k", "10", "600", *SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--cores", "2",
           "--configfile", cfg]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    runs = tmp_path / "results" / "runs"
    deadline = time.time() + 400
    while time.time() < deadline and len(list(runs.glob("*/train.json"))) < 2:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job tree, mid-way
    proc.wait()
    def steps_trained(rd):  # optimizer steps recorded in the training log
        log = rd / "train_log.jsonl"
        return sum('"loss"' in line for line in log.read_text().splitlines()) if log.is_file() else 0

    finished = {p.parent: steps_trained(p.parent) for p in runs.glob("*/train.json")}
    assert 2 <= len(finished) < 5
    # what a user does after a kill: Snakemake's lock on the directory survives a SIGKILL, so unlock, then rerun
    snakemake(["--unlock", "--configfile", cfg], cwd=tmp_path)
    p = snakemake(["--cores", "2", "--configfile", cfg, "--rerun-incomplete"], cwd=tmp_path)
    assert len(list(runs.glob("*/train.json"))) == 5
    # A job killed between writing train.json and Snakemake recording it is "incomplete" to Snakemake and runs
    # again, but it resumes from its final checkpoint: no training step of a finished run is ever redone.
    for rd, steps in finished.items():
        assert steps_trained(rd) == steps, f"{rd} was trained again"
    assert (tmp_path / "results" / "tables" / "tiny" / "synthetic.csv").is_file()
    assert p.returncode == 0


# ------------------------------------------------------------------------------------------- bad configs
GOOD = {
    "name": "t", "models": ["tiny-llama"], "data": {"synthetic": {"source": "synthetic"}},
    "methods": [{"name": "qlora"}], "grid": {"rank": [2]}, "seeds": [0],
}

BAD = [
    ({"modles": ["tiny-llama"]}, r"unknown key 'modles' in \(top level\). Did you mean \"models\""),
    ({"methods": [{"name": "qlroa"}]}, r"unknown method 'qlroa'. Did you mean \"qlora\""),
    ({"methods": [{"name": "qalora", "rnak": 4}]}, r"'qalora' has no hyperparameter 'rnak'. Did you mean \"rank\""),
    ({"methods": [{"name": "qalora", "bits": [4, 5]}]}, r"bits=5 is not supported; choose one of \[2, 3, 4, 8\]"),
    ({"methods": [{"name": "qlora"}], "run": {"eval": {"modes": ["int-merge"]}}},
     r"eval.modes contains 'int-merge' but method 'qlora' has an bnb-nf4"),
    ({"run": {"train": {"lr": "fast"}}}, r"train.lr='fast'"),
    ({"run": {"trian": {}}}, r"unknown key 'trian' in run. Did you mean \"train\""),
    ({"run": {"train": {"max_step": 3}}}, r"unknown key 'train.max_step'. Did you mean \"max_steps\""),
    ({"data": {"alp": {"source": "alpacca"}}}, r"data.source='alpacca' is not allowed.*Did you mean \"alpaca\""),
    ({"seeds": []}, r"seeds: \[\] should be non-empty"),
    ({"overrides": {"method": {"qlroa": {}}}}, r"overrides.method.qlroa: unknown method. Did you mean \"qlora\""),
    ({"overrides": {"model": {"llama-7b": {}}}}, r"overrides.model.llama-7b: not a model of this sweep"),
    ({"resources": {"default": {"gpus": 1}}}, r"unknown key 'gpus' in resources.default. Did you mean \"gpu\""),
    ({"methods": [{"name": "qalora", "group_size": 32, "models": ["llama-7b"]}]},
     r"methods\[0\] \(qalora\).models: 'llama-7b' is not one of this sweep's models"),
    ({"run": {"train": {"batch_size": 6, "micro_batch_size": 4}}}, r"not a multiple of train.micro_batch_size=4"),
    ({"run": {"eval": {"tasks": []}}}, r"eval.tasks=\[\]"),
    ({"methods": [{"name": "qahira-ref"}], "models": ["tiny-llama"], "grid": {}}, None),  # valid: 8x4 tiles fit
]


@pytest.mark.parametrize("patch,msg", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_sweep_configs_rejected(patch, msg):
    raw = {**GOOD, **patch}
    if msg is None:
        assert S.expand(raw)
        return
    with pytest.raises(ConfigError, match=msg):
        S.expand(raw)


def test_bad_config_stops_snakemake_before_any_job(tmp_path):
    bad = tmp_path / "bad.yaml"
    for method, msg in [("{name: qalora, group_size: 7}", "in=96 is not divisible by group_size=7"),
                        ("{name: qalora, bits: 5}", "bits=5 is not supported")]:
        bad.write_text(f"name: bad\nmodels: [tiny-llama]\ndata: {{s: {{source: synthetic}}}}\nmethods: [{method}]\n")
        p = snakemake(["--cores", "1", "--configfile", str(bad)], cwd=tmp_path, check=False, timeout=300)
        assert p.returncode != 0 and msg in p.stdout + p.stderr
        assert not (tmp_path / "results").exists()
        assert "Building DAG" not in p.stdout + p.stderr and "rule " not in p.stdout  # no job was scheduled


def test_shape_errors_from_the_model_config_alone():
    raw = {**GOOD, "models": ["smollm2-135m"], "methods": [{"name": "qalora", "group_size": 128}]}
    from methods.errors import QFTError

    with pytest.raises(QFTError, match=r"model.layers.0.self_attn.q_proj with weight shape \(out=576, in=576\)"
                                          r": in=576 is not divisible by group_size=128"):
        S.expand(raw)


def test_lint_only_reports_the_documented_environment_lint(tmp_path):
    p = snakemake(["--lint", "--configfile", str(REPO / "config" / "tiny.yaml")], cwd=tmp_path, check=False)
    lints = set(re.findall(r"^\s+\* (.+?):?$", p.stdout + p.stderr, re.M))
    assert lints <= {"Specify a conda environment or container for each rule."}, lints


def test_plan_estimates_compute_before_submitting():
    out = subprocess.run([sys.executable, "-m", "qftbench.cli", "plan", "--sweep", str(REPO / "config" / "paper.yaml"),
                          "--gpu-tflops", "312", "--mfu", "0.4"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "516 runs, 1872 evaluation jobs" in out.stdout and "312 TFLOP/s x MFU 0.4" in out.stdout
    p = S.plan(S.load(REPO / "config" / "paper.yaml"), gpu_tflops=312, mfu=0.4)
    r = next(r for r in p["runs"] if r["model"] == "llama-7b" and r["method"] == "qalora" and r["bits"] == 4)
    assert r["trainable_params"] == 89_309_184
    assert r["train_tokens"] == 10000 * 16 * (1024 + 256)  # qalora.py's source / target lengths
    assert r["gpu_hours"] == pytest.approx(r["train_flops"] / (312e12 * 0.4) / 3600)
