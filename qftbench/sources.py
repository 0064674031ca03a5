"""The paper grid, setting by setting: every value of ``config/paper.yaml`` next to its sources.

``config/sources.yaml`` is the data: for each paper (``qlora``, ``qalora``, ``loftq``, ``qbara_qahira``) and
each setting a paper row depends on, what the paper states (``paper: {value, where}``), what the released code
does (``code: {value, file, line}`` at the commit listed under ``sources``), what the suite runs
(``ours: {value, field}``) and a ``status``:

* ``match`` -- ours equals every source that states a value;
* ``paper-vs-code-disagree`` -- paper and code differ; ``follows`` says which one ours follows;
* ``deliberate-difference`` -- ours differs on purpose; ``why`` says why;
* ``mismatch`` -- ours matches neither source: a bug; ``fix`` says what to change.

A setting that maps to a field of the resolved run configs carries ``ours.check``: a list of selectors
``{path, methods, models, data, where, mode, value}``. :func:`check_paper_config` resolves every run of
``config/paper.yaml`` and reports each run whose value at ``path`` differs from the recorded ``ours.value``
(or the selector's own ``value``), so that an edit of ``paper.yaml`` that drifts from the table is caught.
Modes: ``each`` (default: every selected run has the value), ``set`` (the values over the selected runs are
exactly the listed ones), ``contains`` (the run's list contains the value).

``python -m qftbench.sources`` prints the Markdown tables (``docs/SETTINGS.md`` is that output);
``python -m qftbench.sources --check [SWEEP]`` checks a sweep config against the table.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

from methods.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SOURCES_YAML = ROOT / "config" / "sources.yaml"
PAPER_YAML = ROOT / "config" / "paper.yaml"
SETTINGS_MD = ROOT / "docs" / "SETTINGS.md"

PAPERS = ("qlora", "qalora", "loftq", "qbara_qahira")
STATUSES = ("match", "paper-vs-code-disagree", "deliberate-difference", "mismatch")
MODES = ("each", "set", "contains")
SETTING_KEYS = {"setting", "paper", "code", "ours", "status", "follows", "why", "fix"}
PAPER_KEYS = {"value", "where", "note"}
CODE_KEYS = {"value", "file", "line", "repo", "note", "also"}
OURS_KEYS = {"value", "field", "note", "check"}
CHECK_KEYS = {"path", "methods", "models", "data", "where", "mode", "value", "preset"}
#: the presets of config/paper.yaml that a setting on which paper and code disagree selects between
PRESETS = ("paper", "released-code")
_MISSING = object()


class SourcesError(ConfigError):
    """config/sources.yaml is malformed (the message names the paper, the setting and the fix)."""


# ------------------------------------------------------------------------------------------ loading
def load(path: str | Path | None = None) -> dict:
    """Read and validate ``config/sources.yaml`` (or ``path``); raises :class:`SourcesError`."""
    p = Path(path) if path is not None else SOURCES_YAML
    if not p.is_file():
        raise SourcesError(f"{p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SourcesError(f"{p}: not valid YAML: {e}") from None
    validate(data, where=str(p))
    return data


def _need(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise SourcesError(f"{where}: {msg}")


def _is_str_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(v, (str, int)) for v in x)


def validate(data: Any, where: str = "sources") -> None:
    """Check the structure: every setting has paper/code/ours/status, the status is allowed, each status has
    its explanation (``follows``/``why``/``fix``), a null value has a note, a stated value has its location."""
    _need(isinstance(data, dict), where, "the top level must be a mapping with 'sources' and 'papers'.")
    srcs = data.get("sources")
    _need(isinstance(srcs, dict) and srcs, where, "'sources' must map a source id to {repo, commit}.")
    for sid, s in srcs.items():
        _need(isinstance(s, dict) and s.get("repo") and s.get("commit"), f"{where}: sources.{sid}",
              "needs 'repo' and 'commit' (the commit that was read).")
    papers = data.get("papers")
    _need(isinstance(papers, dict), where, "'papers' must be a mapping.")
    missing = [p for p in PAPERS if p not in papers]
    _need(not missing, where, f"papers {missing} are missing; expected {list(PAPERS)}.")
    for pid, paper in papers.items():
        pw = f"{where}: papers.{pid}"
        _need(pid in PAPERS, pw, f"unknown paper; expected one of {list(PAPERS)}.")
        _need(isinstance(paper, dict) and paper.get("title"), pw, "needs a 'title'.")
        code = paper.get("code")
        _need(code in srcs, pw, f"'code' must name an entry of 'sources' (got {code!r}).")
        settings = paper.get("settings")
        _need(isinstance(settings, list) and settings, pw, "needs a non-empty list 'settings'.")
        names = set()
        for i, s in enumerate(settings):
            _validate_setting(s, f"{pw}.settings[{i}]", srcs)
            _need(s["setting"] not in names, f"{pw}.settings[{i}]", f"setting {s['setting']!r} appears twice.")
            names.add(s["setting"])


def _validate_setting(s: Any, w: str, srcs: dict) -> None:
    _need(isinstance(s, dict), w, "a setting must be a mapping.")
    _need(isinstance(s.get("setting"), str) and s["setting"], w, "needs a 'setting' name.")
    w = f"{w} ({s['setting']})"
    extra = set(s) - SETTING_KEYS
    _need(not extra, w, f"unknown keys {sorted(extra)}; allowed: {sorted(SETTING_KEYS)}.")
    for k in ("paper", "code", "ours"):
        _need(isinstance(s.get(k), dict), w, f"needs '{k}' as a mapping.")
        _need("value" in s[k], w, f"'{k}' needs a 'value' (null plus a 'note' when it is not stated).")
    paper, code, ours = s["paper"], s["code"], s["ours"]
    _need(not set(paper) - PAPER_KEYS, w, f"paper: allowed keys {sorted(PAPER_KEYS)}.")
    _need(not set(code) - CODE_KEYS, w, f"code: allowed keys {sorted(CODE_KEYS)}.")
    _need(not set(ours) - OURS_KEYS, w, f"ours: allowed keys {sorted(OURS_KEYS)}.")
    if paper["value"] is None:
        _need(bool(paper.get("note")), w, "paper.value is null: add a 'note' (not stated / not obtainable).")
    else:
        _need(bool(paper.get("where")), w, "paper.value is stated: add 'where' (table, section, or the "
                                           "secondary source it was read from).")
    if code["value"] is None:
        _need(bool(code.get("note")), w, "code.value is null: add a 'note' (not in the released code, or why).")
    else:
        _need(bool(code.get("file")) and code.get("line") is not None, w,
              "code.value is stated: add 'file' and 'line'.")
    if code.get("repo") is not None:
        _need(code["repo"] in srcs, w, f"code.repo {code['repo']!r} is not an entry of 'sources'.")
    for j, a in enumerate(code.get("also") or []):
        _need(isinstance(a, dict) and a.get("file") and a.get("line") is not None, f"{w}: code.also[{j}]",
              "needs 'file' and 'line'.")
        _need(a.get("repo") is None or a["repo"] in srcs, f"{w}: code.also[{j}]",
              f"repo {a.get('repo')!r} is not an entry of 'sources'.")
    _need(isinstance(ours.get("field"), str) and ours["field"], w,
          "ours needs 'field' (the paper.yaml field path, or the default that holds the value).")
    st = s.get("status")
    _need(st in STATUSES, w, f"status {st!r} is not one of {list(STATUSES)}.")
    if st == "paper-vs-code-disagree":
        _need(s.get("follows") in ("paper", "code", "preset"), w,
              "status paper-vs-code-disagree needs follows: paper|code|preset.")
        if s.get("follows") == "preset":  # both values selectable: a check under each preset
            have = {c.get("preset") for c in (s["ours"].get("check") or [])}
            _need(set(PRESETS) <= have, w, f"follows: preset needs ours.check selectors with preset: "
                                           f"{' and '.join(PRESETS)} (one value per preset).")
    if st == "deliberate-difference":
        _need(bool(s.get("why")), w, "status deliberate-difference needs 'why'.")
    if st == "mismatch":
        _need(bool(s.get("fix")), w, "status mismatch needs 'fix' (what to change).")
    checks = ours.get("check")
    if checks is not None:
        _need(isinstance(checks, list) and checks, w, "ours.check must be a non-empty list of selectors.")
        for j, c in enumerate(checks):
            cw = f"{w}: ours.check[{j}]"
            _need(isinstance(c, dict) and isinstance(c.get("path"), str), cw, "needs a dotted 'path'.")
            _need(not set(c) - CHECK_KEYS, cw, f"allowed keys {sorted(CHECK_KEYS)}.")
            _need(c.get("mode", "each") in MODES, cw, f"mode must be one of {list(MODES)}.")
            _need(c.get("preset") is None or c["preset"] in PRESETS, cw, f"preset must be one of {list(PRESETS)}.")
            for k in ("methods", "models", "data"):
                _need(c.get(k) is None or _is_str_list(c[k]), cw, f"'{k}' must be a list of names.")
            _need(c.get("where") is None or (isinstance(c["where"], dict)
                                              and all(isinstance(v, list) for v in c["where"].values())),
                  cw, "'where' must map a dotted path to a list of allowed values.")
            mode = c.get("mode", "each")
            value = c.get("value", ours["value"])
            if mode == "set":
                _need(isinstance(value, list), cw, "mode 'set' needs a list value.")


def settings(data: dict | None = None):
    """``(paper_id, setting)`` pairs in file order."""
    data = data if data is not None else load()
    for pid in data["papers"]:
        for s in data["papers"][pid]["settings"]:
            yield pid, s


# ---------------------------------------------------------------------------------------- rendering
def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-3:  # 2e-4, not 0.0002 (as the papers write learning rates)
            mant, exp = f"{v:.6e}".split("e")
            return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
        return f"{v:.6g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _loc(ref: dict, data: dict, default_src: str) -> str:
    src = ref.get("repo") or default_src
    prefix = "" if src == default_src else f"{data['sources'][src]['repo']}@{_short(data['sources'][src])} "
    return f"{prefix}{ref['file']}:{ref['line']}"


def _short(src: dict) -> str:
    return src.get("label") or str(src["commit"])[:7]


def _paper_cell(p: dict) -> str:
    if p["value"] is None:
        return f"— {p['note']}"
    out = f"{_fmt(p['value'])} ({p['where']})"
    return out + (f"; {p['note']}" if p.get("note") else "")


def _code_cell(c: dict, data: dict, default_src: str) -> str:
    if c["value"] is None:
        out = f"— {c['note']}"
        locs = [_loc(a, data, default_src) for a in c.get("also") or []]
        return out + (f" (see {', '.join(locs)})" if locs else "")
    locs = [_loc(c, data, default_src)] + [_loc(a, data, default_src) for a in c.get("also") or []]
    out = f"{_fmt(c['value'])} ({'; '.join(locs)})"
    return out + (f"; {c['note']}" if c.get("note") else "")


def _ours_cell(o: dict) -> str:
    out = f"{_fmt(o['value'])} (`{o['field']}`)"
    return out + (f"; {o['note']}" if o.get("note") else "")


def _status_cell(s: dict) -> str:
    st = s["status"]
    out = f"**{st}**"
    if st == "paper-vs-code-disagree":
        out += (" (both are presets: `preset: paper` runs the paper's value, `preset: released-code` the code's)"
                if s["follows"] == "preset" else f" (ours follows the {s['follows']})")
    if s.get("why"):
        out += f" — why: {s['why']}"
    if s.get("fix"):
        out += f" — fix: {s['fix']}"
    return out


def render_markdown(data: dict | None = None) -> str:
    """One Markdown table per paper: setting | paper (where) | released code (file:line) | ours (field) |
    status/why; preceded by the list of sources read (repository and commit)."""
    data = data if data is not None else load()
    lines = [
        "_Generated from `config/sources.yaml` by `python -m qftbench.sources > docs/SETTINGS.md`: "
        "edit the YAML, not this file._",
        "",
        "# The paper grid, setting by setting",
        "",
        "Every setting that a paper row of `config/paper.yaml` depends on, with what the paper states, what the "
        "released code does (file:line at the commit below) and what the suite runs (the `config/paper.yaml` "
        "field, or the default that holds it). Status: **match** (ours equals every source that states a "
        "value), **paper-vs-code-disagree** (both are presets of `config/paper.yaml`: `preset: paper` runs the "
        "paper's value, `preset: released-code` the code's; or ours follows the one named), "
        "**deliberate-difference** (with why), **mismatch** (ours matches neither: a bug, with the fix). "
        "`tests/test_sources.py` checks every run of `config/paper.yaml`, as written and under each preset "
        "(`qftbench plan --preset released-code`; `snakemake --config preset=released-code`), against the `ours` "
        "values (`qftbench.sources.check_paper_config`).",
        "",
        "## Sources read",
        "",
        "| source | repository | commit | note |",
        "|---|---|---|---|",
    ]
    for sid, s in data["sources"].items():
        lines.append(f"| {_cell(sid)} | {_cell(s['repo'])} | {_cell(s['commit'])} | {_cell(s.get('note', ''))} |")
    for pid, paper in data["papers"].items():
        src = data["sources"][paper["code"]]
        lines += ["", f"## {paper['title']}", "",
                  f"Released code: {src['repo']} @ {str(src['commit'])[:7]}."
                  + (f" {paper['note']}" if paper.get("note") else ""), "",
                  "| setting | paper (where) | released code (file:line) | ours (field) | status / why |",
                  "|---|---|---|---|---|"]
        for s in paper["settings"]:
            cells = [s["setting"], _paper_cell(s["paper"]), _code_cell(s["code"], data, paper["code"]),
                     _ours_cell(s["ours"]), _status_cell(s)]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ checking
def _get(cfg: dict, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return _MISSING
    return node


def _canon(v: Any) -> Any:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _canon(x) for k, x in v.items()}
    return str(v)


def _equal(a: Any, b: Any) -> bool:
    a, b = _canon(a), _canon(b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def _key(v: Any) -> str:
    return json.dumps(_canon(v), sort_keys=True)


def _order(v: Any) -> tuple:
    """Sort key: numbers numerically, then strings, then anything else by its JSON form."""
    c = _canon(v)
    if isinstance(c, float):
        return (0, c, "")
    if isinstance(c, str):
        return (1, 0.0, c)
    return (2, 0.0, _key(v))


def _selected(cfg: dict, c: dict) -> bool:
    sw = cfg.get("sweep", {})
    if c.get("methods") is not None and cfg["method"]["name"] not in c["methods"]:
        return False
    if c.get("models") is not None and sw.get("model_label") not in c["models"]:
        return False
    if c.get("data") is not None and sw.get("data_label") not in c["data"]:
        return False
    for path, allowed in (c.get("where") or {}).items():
        v = _get(cfg, path)
        if v is _MISSING or not any(_equal(v, a) for a in allowed):
            return False
    return True


def _show(v: Any) -> Any:
    return "<missing>" if v is _MISSING else v


def check_paper_config(runs: dict, data: dict | None = None) -> list[dict]:
    """Disagreements between the resolved runs (``qftbench.sweep.expand(...)``: ``{run_id: cfg}``, or
    ``{preset: {run_id: cfg}}`` with ``None`` for the sweep as written, see :func:`expand_presets`) and the
    ``ours`` values recorded in sources.yaml, one entry per (setting, selector, actual value):
    ``{paper, setting, path, selector, expected, actual, runs}`` (``runs``: the run ids with that value). A
    selector with ``preset: P`` is checked on the runs of preset P, the others on the sweep as written.
    A selector that selects no run is reported too (``actual: "<no run selected>"``). Empty: no drift."""
    data = data if data is not None else load()
    by_preset = runs if None in runs else {None: runs}
    out: list[dict] = []
    for pid, s in settings(data):
        for c in s["ours"].get("check") or []:
            expected = c.get("value", s["ours"]["value"])
            mode = c.get("mode", "each")
            sel = {k: c[k] for k in ("methods", "models", "data", "where", "preset") if c.get(k) is not None}
            pool = by_preset.get(c.get("preset"), {})
            picked = {rid: cfg for rid, cfg in pool.items() if _selected(cfg, c)}
            base = {"paper": pid, "setting": s["setting"], "path": c["path"], "selector": sel,
                    "expected": expected}
            if not picked:
                out.append({**base, "actual": "<no run selected>", "runs": []})
                continue
            if mode == "set":
                values: dict[str, Any] = {}
                for cfg in picked.values():
                    v = _get(cfg, c["path"])
                    values.setdefault(_key(_show(v)), _show(v))
                want = {_key(x) for x in expected}
                if set(values) != want:
                    out.append({**base, "actual": sorted(values.values(), key=_order), "runs": sorted(picked)})
                continue
            bad: dict[str, dict] = {}
            for rid, cfg in picked.items():
                v = _get(cfg, c["path"])
                if mode == "contains":
                    ok = isinstance(v, list) and any(_equal(x, expected) for x in v)
                else:
                    ok = v is not _MISSING and _equal(v, expected)
                if not ok:
                    entry = bad.setdefault(_key(_show(v)), {**base, "actual": _show(v), "runs": []})
                    entry["runs"].append(rid)
            out.extend(bad.values())
    return out


def format_disagreements(found: list[dict], max_runs: int = 3) -> str:
    """Readable lines, one per disagreement (for test failures and ``--check``)."""
    lines = []
    for d in found:
        runs = d["runs"][:max_runs] + ([f"... {len(d['runs']) - max_runs} more"] if len(d["runs"]) > max_runs else [])
        lines.append(f"{d['paper']}: {d['setting']}: {d['path']} {d['selector']} expected {d['expected']!r}, "
                     f"got {d['actual']!r} in {len(d['runs'])} run(s): {', '.join(runs)}")
    return "\n".join(lines)


def expand_presets(sweep: dict, where: str = "sweep") -> dict:
    """``{None: runs as written, preset: runs with every entry under that preset}`` for each of the sweep's
    ``presets`` (as ``snakemake --config preset=P`` runs it, entries' own ``preset:`` keys set aside)."""
    from . import sweep as sweeps

    out = {None: sweeps.expand(sweep, where=where)}
    for name in sweep.get("presets") or {}:
        forced = {**sweep, "preset": name,
                  "methods": [{k: v for k, v in e.items() if k != "preset"} for e in sweep["methods"]]}
        out[name] = sweeps.expand(forced, where=f"{where} (preset {name})")
    return out


def check_sweep(path: str | Path = PAPER_YAML, data: dict | None = None) -> list[dict]:
    """:func:`check_paper_config` over every run of the sweep config at ``path``, under each of its presets."""
    from . import sweep as sweeps

    return check_paper_config(expand_presets(sweeps.load(path), where=str(path)), data)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qftbench.sources", description=__doc__.splitlines()[0])
    ap.add_argument("--check", nargs="?", const=str(PAPER_YAML), metavar="SWEEP",
                    help="check a sweep config (default config/paper.yaml) against the table instead of printing")
    ap.add_argument("--sources", default=None, help="sources YAML (default config/sources.yaml)")
    args = ap.parse_args(argv)
    data = load(args.sources)
    if args.check:
        found = check_sweep(args.check, copy.deepcopy(data))
        if found:
            print(format_disagreements(found))
            return 1
        print(f"{args.check}: every run agrees with {args.sources or 'config/sources.yaml'}.")
        return 0
    sys.stdout.write(render_markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
