"""The shape of the code (issue 11): imports run one way, and a Method is built from a config in one place.

Both are read from the source with :mod:`ast` (imports inside functions count too: a lazy import that closes a
circle is still a circle for a reader following the code)."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = ("qftbench", "methods")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    return mods


def _imports(mod: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules ``mod`` imports anywhere in its file (``from . import x`` names module ``x``)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != mod and not mod.startswith(name + "."):  # a parent package is always imported
                found.add(name)
    return found


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module in the project's import graph (Tarjan)."""
    mods = _modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return cycles


def test_no_import_circles():
    """Quantizer value objects (scheme) <- QuantLinear (linear) <- module factories (modules); report <- plots <-
    collate. A circle, even through a function-level import, fails here with the modules in it."""
    assert import_cycles() == []


def test_the_detector_finds_a_circle(tmp_path, monkeypatch):
    """The check above can fail: two modules that import each other inside functions are a circle."""
    pkg = tmp_path / "qftbench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    (tmp_path / "methods").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert import_cycles() == [["qftbench.a", "qftbench.b"]]


def test_one_place_builds_a_method_from_a_config():
    """``methods.from_config`` (methods/registry.py) is the only caller of ``build``/the registry's classes in the
    library and the workflow: the sweep, the pipeline, the accounting and the adapter records go through it."""
    callers = []
    files = [p for pkg in PACKAGES + ("workflow",) for p in (ROOT / pkg).rglob("*.py")]
    for p in files:
        tree = ast.parse(p.read_text())
        # a bare build(...) counts where the file imports the registry's build (not a local helper of that name)
        imported = any(isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[-1] in ("registry", "methods")
                       and any(a.name == "build" for a in n.names) for n in ast.walk(tree)) \
            or p == ROOT / "methods" / "registry.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "build" and isinstance(f.value, ast.Name)
                    and f.value.id in ("methods", "registry")) or \
                    (isinstance(f, ast.Name) and f.id == "build" and imported):
                callers.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert callers == ["methods/registry.py:" + str(_line_of(ROOT / "methods" / "registry.py", "return build("))]


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_the_sweep_builds_each_method_once(monkeypatch):
    """Parsing the Snakefile builds one Method per run (qftbench.sweep.specs: resolve builds it, the RunSpec keeps
    it for the base folder, the evaluation jobs and the table of runs), not one per consumer."""
    import methods.registry
    from qftbench import sweep

    calls = []
    real = methods.registry.build
    monkeypatch.setattr(methods.registry, "build", lambda name, **hp: calls.append(name) or real(name, **hp))
    specs = sweep.specs(sweep.load(ROOT / "config" / "claims.yaml"))
    assert len(calls) == len(specs) == 30
    one = next(s for s in specs.values() if s.config["method"]["name"] == "qlora" and s.config["method"]["bits"] == 4)
    assert one.method.hp["rank"] == 16 and [j.mode for j in one.evals] == [
        "4+16", "requant-w4g64", "requant-w3g32", "requant-w2g32"]
    assert len(calls) == 30 and sweep.runs_table(specs).count("\n") == 31


def test_each_method_owns_its_label_and_figure_style():
    """Tables and figures read a method's name and style from its class (``label``, ``plot_style``): every
    registered method has its own, and no two share a (colour, marker)."""
    import methods
    from qftbench import plots

    styles = {}
    for name in methods.names():
        if name == "peft":  # one row per peft method and base, styled by name (plots._style)
            continue
        cls = methods.get(name)
        assert cls.label and cls.plot_style, name
        assert plots.method_label(name) == cls.label and plots._style(name) == tuple(cls.plot_style)
        styles[name] = tuple(cls.plot_style)
    assert len(set(styles.values())) == len(styles), styles


def test_a_method_registered_in_one_line_is_listed_and_labelled(tmp_path, monkeypatch, capsys, clean_registry):
    """A method in a module of one's own, registered by one line in it, is listed by ``qftbench methods --plugins
    FILE`` and gets its own label and style in the figures: nothing else in the suite names it. (The same module
    through the Snakemake DAG: tests/test_workflow.py.)"""
    import json

    import methods
    from qftbench import cli, plots
    from tests.conftest import PLUGIN_SOURCE

    (tmp_path / "my_methods").mkdir()
    (tmp_path / "my_methods" / "mine.py").write_text(PLUGIN_SOURCE)
    monkeypatch.chdir(tmp_path)  # a plugin path is relative to the folder one runs from
    assert cli.main(["methods", "--json"]) == 0
    assert "myqlora" not in json.loads(capsys.readouterr().out)
    assert cli.main(["methods", "--json", "--plugins", "my_methods/mine.py"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["myqlora"]["label"] == "My QLoRA" and listed["myqlora"]["deploy"] == "4+16"
    assert not listed["myqlora"]["builtin"] and listed["qlora"]["builtin"]
    assert plots.method_label("myqlora") == "My QLoRA" and plots._style("myqlora") == ("#000000", "P")
    assert methods.from_config({"name": "myqlora", "rank": 4}).hp["rank"] == 4
    # a run config that names the plugin resolves (and keeps the plugin in what its jobs get, not in its run id)
    from qftbench import config

    cfg = config.resolve({"method": {"name": "myqlora"}, "plugins": ["my_methods/mine.py"]})
    assert config.training_view(cfg)["plugins"] == ["my_methods/mine.py"]
    assert "plugins" not in config.training_view(config.resolve({"method": {"name": "qlora"}}))
    assert "plugins" not in config.job_view(config.resolve({"method": {"name": "qlora"}}))
    same = config.resolve({"method": {"name": "myqlora"}})  # (registered in this process by now)
    assert config.run_id(cfg) == config.run_id(same)


@pytest.mark.parametrize("spec, msg", [
    ("nowhere/mine.py", "the file 'nowhere/mine.py' does not exist"),
    ("no_such_module_xyz", "cannot import 'no_such_module_xyz'"),
])
def test_a_plugin_that_cannot_be_imported_is_named_with_the_fix(spec, msg, clean_registry):
    from methods.errors import ConfigError
    from qftbench import config

    with pytest.raises(ConfigError, match=re.escape(msg)) as e:
        config.resolve({"method": {"name": "qlora"}, "plugins": [spec]}, where="run.yaml")
    assert "run.yaml: plugins[0]" in str(e.value) and "Fix:" in str(e.value)


def test_a_plugin_cannot_take_a_builtin_name(clean_registry):
    import methods
    from methods.errors import ConfigError

    with pytest.raises(ConfigError, match="one of the suite's own methods"):
        methods.register("qlora", "somewhere:Else")


def test_published_rows_map_to_the_methods_that_claim_them():
    """The paper-vs-reproduced table joins a published row to the method class that names it in ``paper_rows``
    (no list of paper names in report.py); checked against the mapping written out by hand."""
    from qftbench import report

    assert report.paper_methods() == {
        "QLoRA": ("qlora", "4+16"), "QLoRA (NF4+DQ)": ("qlora", "4+16"), "QLoRA w/ GPTQ": ("qlora", "requant"),
        "QA-LoRA": ("qalora", "int-merge"), "PEQA": ("peqa", "int-merge"), "LoRA (BF16 base)": ("lora", "fp16-merge"),
        "LoRA 16-bit": ("lora", "fp16-merge"), "LoftQ": ("loftq", "4+16"), "base": ("base", "base"),
        "base w/ GPTQ": ("base", "base")}
    published = set(report.load_paper()["method"])
    assert set(report.paper_methods()) <= published  # every claimed row exists in the published numbers
    assert published - set(report.paper_methods()) == {"QLoRA (FP4)"}  # no suite method reproduces it yet
