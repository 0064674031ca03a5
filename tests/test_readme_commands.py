"""Every command the README documents is run by a test or by CI, so a documented command cannot break silently.

The list lives in one place: the README's table "Documented commands and what runs them". These tests check that
(1) every command in a ```bash block of the README is in that table, (2) every test the table names exists, and
(3) run the commands that no other test runs, as a user would type them (the installed ``qftbench`` entry point,
``snakemake`` from the environment), with small settings where the full command takes long (``--set
train.max_steps=2``, ``eval.limit``): the same code path, fewer steps.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
BIN = Path(sys.executable).parent
EXAMPLE = str(REPO / "config" / "run.example.yaml")


def readme_commands() -> list[str]:
    """Each command line of the README's ```bash blocks (comments stripped, whitespace collapsed)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def coverage_table() -> dict[str, str]:
    """The README's table: ``command -> what runs it``."""
    text = README.read_text()
    start = text.index("## Documented commands and what runs them")
    rows = {}
    for line in text[start:].split("\n## ")[0].splitlines():
        m = re.match(r"^\| `(.+?)` \| (.+?) \|$", line.strip())
        if m:
            rows[" ".join(m.group(1).split())] = m.group(2)
    return rows


def test_every_readme_command_is_in_the_coverage_table():
    table = coverage_table()
    missing = [c for c in readme_commands() if c not in table]
    assert not missing, f"README commands missing from 'Documented commands and what runs them': {missing}"


def test_every_test_the_table_names_exists():
    sources = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    for cmd, runner in coverage_table().items():
        names = re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", runner)
        assert names or ".ci/run" in runner or "measured" in runner, (cmd, runner)
        for name in names:
            assert re.search(rf"^def {name}\(", sources, re.M), f"{cmd}: {name} is not a test"


def _run(args, cwd, timeout=600, env=None, check=True):
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0 or not check, f"{' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _qftbench(*args, cwd, timeout=600, check=True):
    exe = BIN / "qftbench"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "qftbench.cli"]
    return _run([*cmd, *args], cwd=cwd, timeout=timeout, check=check)


@pytest.mark.slow
def test_example_run_config_steps_as_documented(tmp_path):
    """validate -> prepare -> finetune -> evaluate -> run on config/run.example.yaml (the real SmolLM2-135M), in
    the README's order, 2 training steps and 8 evaluation documents instead of 200 steps and the full set."""
    small = ["--set", "train.max_steps=2", "--set", "train.batch_size=8", "--set", "eval.limit=8"]
    v = _qftbench("validate", "--config", EXAMPLE, *small, cwd=tmp_path)
    run_id = re.search(r"run_id=(\S+)", v.stdout).group(1)
    assert run_id.startswith("smollm2-135m-qalora-r16-4b-g32-synthetic-s0-")
    _qftbench("prepare", "--config", EXAMPLE, *small, cwd=tmp_path)
    assert list((tmp_path / "results" / "cache" / "bases").glob("*/base_manifest.json"))
    _qftbench("finetune", "--config", EXAMPLE, *small, cwd=tmp_path)
    rd = tmp_path / "results" / "runs" / run_id
    assert json.loads((rd / "train.json").read_text())["steps"] == 2
    _qftbench("evaluate", "--config", EXAMPLE, *small, "--mode", "int-merge", "--tasks", "qft_synthetic",
              cwd=tmp_path)
    res = json.loads((rd / "eval" / "int-merge" / "qft_synthetic.json").read_text())
    assert res["mode"] == "int-merge" and res["tasks"]["qft_synthetic"]["n"] == 8
    out = _qftbench("run", "--config", EXAMPLE, *small, "--set", "method.rank=8", cwd=tmp_path)
    rank8 = [p for p in (tmp_path / "results" / "runs").iterdir() if p.name != run_id]
    assert len(rank8) == 1 and "-qalora-r8-" in rank8[0].name and rank8[0].name in out.stdout
    assert (rank8[0] / "metrics.json").is_file() and (rank8[0] / "adapter").is_dir()


def test_account_as_documented(tmp_path):
    p = _qftbench("account", "--model", "llama-7b", "--method", "qalora", "--rank", "64", "--group-size", "32",
                  "--json", cwd=tmp_path)
    acc = json.loads(p.stdout)
    assert acc["trainable_params"] == 89_309_184  # QA-LoRA on LLaMA-7B, r=64, g=32 (METHODS.md)


def test_plan_as_documented():
    p = _qftbench("plan", "--sweep", "config/paper.yaml", cwd=REPO)
    assert "516 runs, 1872 evaluation jobs" in p.stdout
    # the released code's preset: the same runs, other settings (so other run ids for the runs that differ)
    q = _qftbench("plan", "--sweep", "config/paper.yaml", "--preset", "released-code", cwd=REPO)
    assert "516 runs, 1872 evaluation jobs" in q.stdout and q.stdout != p.stdout
    bad = _qftbench("plan", "--sweep", "config/paper.yaml", "--preset", "relased-code", cwd=REPO, check=False)
    assert bad.returncode != 0 and "Did you mean \"released-code\"" in bad.stdout + bad.stderr


def test_methods_and_demo_as_documented(tmp_path):
    m = _qftbench("methods", cwd=tmp_path)
    import methods

    for name in methods.names():  # every registered method is listed
        assert re.search(rf"^{re.escape(name)}\s+\[", m.stdout, re.M), name
    d = _qftbench("demo", "--steps", "40", "--methods", "qlora,qalora,base", cwd=tmp_path)
    assert "acc0/acc" in d.stdout
    for name in ("qlora", "qalora", "base"):
        assert re.search(rf"^\s*{re.escape(name)}\b", d.stdout, re.M), d.stdout


def test_embedded_default_parses_without_a_configfile(tmp_path):
    """`snakemake --cores 2` with no --configfile runs the embedded default (config/default.yaml), also from
    another working directory (-s Snakefile); dry run, the same DAG as --configfile config/default.yaml."""
    p = _run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "-s", str(REPO / "Snakefile")], cwd=tmp_path,
             env={"PYTHONPATH": str(REPO)})
    assert re.search(r"^finetune\s+7$", p.stdout, re.M) and re.search(r"^evaluate\s+7$", p.stdout, re.M), p.stdout
    # on a CPU without native bf16 the warning names the fix; the fp32 preset: the same 7 runs, in float32, no warning
    from qftbench.provenance import native_bf16

    assert ("preset=fp32" in p.stderr) == (not native_bf16() and not __import__("torch").cuda.is_available())
    q = _run([sys.executable, "-m", "snakemake", "-n", "--cores", "2", "-s", str(REPO / "Snakefile"), "--config",
              "preset=fp32"], cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
    assert re.search(r"^finetune\s+7$", q.stdout, re.M) and "qftbench WARNING" not in q.stderr, q.stderr
    from qftbench import sweep as S

    fp32 = S.expand({**S.load(REPO / "config" / "default.yaml"), "preset": "fp32"})
    assert {c["train"]["precision"] for c in fp32.values()} == {"fp32"} and all(r in q.stdout for r in fp32)
