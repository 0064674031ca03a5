"""The shape of the code (issue 11): imports run one way, and a Method is built from a config in one place.

Both are read from the source with :mod:`ast` (imports inside functions count too: a lazy import that closes a
circle is still a circle for a reader following the code)."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

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


def test_a_method_registered_in_one_line_is_listed_and_labelled(tmp_path, monkeypatch, capsys):
    """A method in a module of one's own, registered with one line, is listed by ``qftbench methods`` and gets
    its own label and style in the figures: nothing else in the suite names it."""
    import json

    import methods
    from qftbench import cli, plots

    (tmp_path / "my_method.py").write_text(
        "from methods.lora import LoRA\n\n\n"
        "class MyLoRA(LoRA):\n"
        "    name = 'mylora'\n"
        "    label = 'My LoRA'\n"
        "    plot_style = ('#000000', 'o')\n"
        "    summary = 'LoRA under another name (a test)'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(methods.REGISTRY, "mylora", "my_method:MyLoRA")  # = methods.register("mylora", ...)
    assert cli.main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["mylora"]["label"] == "My LoRA" and listed["mylora"]["deploy"] == "fp16-merge"
    assert plots.method_label("mylora") == "My LoRA" and plots._style("mylora") == ("#000000", "o")
    assert methods.from_config({"name": "mylora", "rank": 4}).hp["rank"] == 4


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
