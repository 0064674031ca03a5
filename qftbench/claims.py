"""The papers' claims as comparisons with a written rule for the verdict (issue 13's claims table).

A sweep config may list ``claims``; the report turns each into one row of the ``claims`` table::

    claims:
      - id: qalora-matches-qlora
        paper: "QA-LoRA (arXiv 2309.14717), Table 1"
        claim: "at 4 bits QA-LoRA matches QLoRA (4+16)"
        kind: matches            # beats | not-worse | matches | exact | lower
        a: {method: qalora}      # selectors of one configuration each (method, mode, bits, group, quant, rank,
                                 # model, data: as the tables name them, for a grid with several)
        b: {method: qlora}
        cell: {task: commonsense_avg}   # the cell compared (task, shots, category, metric); default below
        margin: 2.0              # points: the equivalence / non-inferiority margin of matches / not-worse

Kinds and their rules (A - B on the same items, paired over items and seeds, :func:`qftbench.stats.paired`;
``lo``/``hi`` the 95% interval in points, ``p`` the sign-flip test, alpha = 0.05):

* ``beats``: supported if ``lo > 0`` and ``p < alpha``; contradicted if ``hi < 0`` and ``p < alpha``;
  else inconclusive.
* ``not-worse`` (A is at least as good as B): supported if ``lo > -margin``; contradicted if ``hi < 0`` and
  ``p < alpha``; else inconclusive.
* ``matches``: supported if the interval lies inside ``[-margin, +margin]``; contradicted if it lies wholly
  outside it (``lo > margin`` or ``hi < -margin``); else inconclusive.
* ``exact``: A's per-item results equal B's on every item (e.g. a merged INT model against the unmerged one):
  supported, else contradicted (with the number of items that differ).
* ``lower``: a recorded number of A is below B's (``cell: {metric: weight_error}`` or ``weight_error_max``:
  the base's relative weight error, mean or max over the layers; ``init_error``: the mean relative error of
  the layer fine-tuning starts from, LoftQ's quantized base plus its SVD initialisation, for every other method
  its base): a deterministic measurement, supported or contradicted.

A claim whose runs are missing from the sweep's results is reported as ``not run``. The verdict is the
measurement at this scale; the ``why`` column says which rule decided it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from methods.errors import ConfigError, did_you_mean

from .report import ALPHA  # the paired table's significance level: one alpha for every verdict

KINDS = ("beats", "not-worse", "matches", "exact", "lower")
CLAIM_KEYS = ("id", "paper", "claim", "kind", "a", "b", "cell", "margin")
SELECT_KEYS = ("method", "mode", "bits", "group", "quant", "rank", "model", "data")
CELL_KEYS = ("task", "shots", "category", "metric")
#: recorded numbers a ``lower`` claim compares (columns of the report's frame)
LOWER_METRICS = ("weight_error", "weight_error_max", "init_error")
DEFAULT_MARGIN = 2.0
COLUMNS = ["id", "paper", "claim", "comparison", "A", "B", "A - B", "95% CI", "p", "n items", "margin", "verdict",
           "why"]


def validate(claims: Any, where: str = "claims") -> None:
    """Check a sweep's ``claims`` list before any job (field, value and fix in every message)."""
    import methods

    if not isinstance(claims, list):
        raise ConfigError(f"{where}: claims must be a list of claims ({{id, paper, claim, kind, a, b}}).")
    seen = set()
    for i, c in enumerate(claims):
        w = f"{where}[{i}]"
        if not isinstance(c, Mapping):
            raise ConfigError(f"{w}: a claim is a mapping with keys {', '.join(CLAIM_KEYS)}.")
        for k in c:
            if k not in CLAIM_KEYS:
                raise ConfigError(f"{w}: unknown key {k!r}.{did_you_mean(k, CLAIM_KEYS)} Allowed: "
                                  f"{', '.join(CLAIM_KEYS)}.")
        for k in ("id", "paper", "claim", "kind", "a", "b"):
            if k not in c:
                raise ConfigError(f"{w}: missing {k!r}; a claim needs id, paper, claim, kind, a and b.")
        if c["id"] in seen:
            raise ConfigError(f"{w}: id {c['id']!r} is used twice; give every claim its own id.")
        seen.add(c["id"])
        if c["kind"] not in KINDS:
            raise ConfigError(f"{w}.kind={c['kind']!r} is not one of {list(KINDS)}.{did_you_mean(str(c['kind']), KINDS)}")
        for side in ("a", "b"):
            sel = c[side]
            if not isinstance(sel, Mapping) or "method" not in sel:
                raise ConfigError(f"{w}.{side}: a selector is a mapping with at least 'method', e.g. {{method: qlora}}.")
            for k in sel:
                if k not in SELECT_KEYS:
                    raise ConfigError(f"{w}.{side}: unknown key {k!r}.{did_you_mean(k, SELECT_KEYS)} Allowed: "
                                      f"{', '.join(SELECT_KEYS)}.")
            name = str(sel["method"])
            if name not in methods.names() and not name.startswith("peft-"):
                raise ConfigError(f"{w}.{side}.method: unknown method {name!r}.{did_you_mean(name, methods.names())}")
        cell = c.get("cell") or {}
        if not isinstance(cell, Mapping) or set(cell) - set(CELL_KEYS):
            bad = sorted(set(cell) - set(CELL_KEYS)) if isinstance(cell, Mapping) else [cell]
            raise ConfigError(f"{w}.cell: unknown key(s) {bad}; allowed: {', '.join(CELL_KEYS)}.")
        if c["kind"] == "lower" and cell.get("metric") not in LOWER_METRICS:
            raise ConfigError(f"{w}: kind 'lower' compares a recorded number: set cell.metric to one of "
                              f"{list(LOWER_METRICS)}.")
        m = c.get("margin", DEFAULT_MARGIN)
        if not isinstance(m, (int, float)) or isinstance(m, bool) or m < 0:
            raise ConfigError(f"{w}.margin={m!r} must be a number of points >= 0 (e.g. 2.0).")


def check_selectors(claims: Sequence[Mapping], runs: Mapping[str, dict], where: str = "claims") -> None:
    """Every claim's ``a`` and ``b`` must select at least one run of the sweep by method, bits, group, rank, model
    and data (mode and quant are checked when the table is made): a selector that names a setting the sweep does
    not run is an error before any job, not a ``not run`` row after the sweep."""
    from .report import run_labels

    def facts(cfg: dict) -> dict:
        labels = run_labels(cfg)
        return {**labels, "group": labels["group_size"]}

    have = [facts(c) for c in runs.values()]
    for i, c in enumerate(claims):
        for side in ("a", "b"):
            sel = {k: v for k, v in c[side].items() if k in ("method", "bits", "group", "rank", "model", "data")}
            if not any(all(str(f[k]) == str(v) for k, v in sel.items()) for f in have):
                same = sorted({tuple((k, f[k]) for k in sel if k != "method") for f in have
                               if f["method"] == sel["method"]})
                hint = ("; its runs of that method have " + ", ".join(
                    "{" + ", ".join(f"{k}: {v}" for k, v in t) + "}" for t in same[:6])) if same else \
                    f"; the sweep runs no {sel['method']!r}"
                raise ConfigError(f"{where}[{i}] ({c['id']}).{side}={dict(c[side])} selects no run of this sweep"
                                  f"{hint}. Fix the selector or add the run to the sweep's methods.")


def _matches(row, sel: Mapping, quant_of: Mapping, deploy_of: Mapping | None = None) -> bool:
    """Does the selector pick this row? An aggregated row (``deploy_of`` given: config id -> the method's own
    deployment mode) has a mode and is matched on its deployed bits and group; a run row (``deploy_of`` None, for
    the recorded numbers of ``lower``) on the run's configured bits and group."""
    if row.method != sel["method"] or not _same_labels(row, sel):
        return False
    if deploy_of is not None:
        if "mode" in sel and row.mode != sel["mode"]:
            return False
        if "mode" not in sel and deploy_of.get(row.config_id) and row.mode != deploy_of[row.config_id]:
            return False  # by default the method's own deployment
        # bits: the deployed bits ("4", "16"), or the base's under a 16-bit adapter ("4" of "4+16")
        bits, group = str(row.deploy_bits), row.deploy_group_size
        if "bits" in sel and str(sel["bits"]) not in (bits, bits.split("+")[0]):
            return False
    else:
        group = row.group_size
        if "bits" in sel and str(row.bits) != str(sel["bits"]):
            return False
    if "group" in sel and (pd.isna(group) or int(group) != int(sel["group"])):
        return False
    if "rank" in sel and (pd.isna(row.rank) or int(row.rank) != int(sel["rank"])):
        return False
    return not ("quant" in sel and quant_of.get(row.config_id) != sel["quant"])


def _label(sel: Mapping) -> str:
    return " ".join(f"{k}={v}" if k != "method" else str(v) for k, v in sel.items())


def _headline(agg: pd.DataFrame) -> dict:
    for task, cat, metric in (("commonsense_avg", "", "acc"), ("synthetic", "", "acc"), ("mmlu", "avg", "acc_micro")):
        if ((agg["task"] == task) & (agg["metric"] == metric)).any():
            return {"task": task, "category": cat, "metric": metric}
    return {"task": "synthetic", "category": "", "metric": "acc"}


def verdict(kind: str, lo: float, hi: float, p: float, margin: float) -> tuple[str, str]:
    """``(verdict, why)`` of a paired comparison by the rules of the module docstring (points)."""
    if kind == "beats":
        if lo > 0 and p < ALPHA:
            return "supported", f"the 95% interval excludes 0 (lo {lo:+.1f}) and p < {ALPHA}"
        if hi < 0 and p < ALPHA:
            return "contradicted", f"B is better: the interval lies below 0 (hi {hi:+.1f}) and p < {ALPHA}"
        return "inconclusive", "the interval covers 0 or p >= 0.05"
    if kind == "not-worse":
        if lo > -margin:
            return "supported", f"the interval's lower end {lo:+.1f} is above -{margin:g} (the margin)"
        if hi < 0 and p < ALPHA:
            return "contradicted", f"A is worse: the interval lies below 0 (hi {hi:+.1f}) and p < {ALPHA}"
        return "inconclusive", f"the interval reaches below -{margin:g} but does not exclude 0"
    if kind == "matches":
        if -margin < lo and hi < margin:
            return "supported", f"the interval lies inside +-{margin:g} (the margin)"
        if lo > margin or hi < -margin:
            return "contradicted", f"the interval lies wholly outside +-{margin:g}"
        return "inconclusive", f"the interval is wider than +-{margin:g}: too few items or seeds to tell"
    raise ValueError(kind)


def claims_table(df: pd.DataFrame, agg: pd.DataFrame, claims: Sequence[Mapping]) -> pd.DataFrame:
    """One row per claim (see the module docstring): the comparison run, the measured difference with its 95%
    interval, p and n items, and the verdict with the rule that decided it."""
    from . import report

    rows = []
    quant_of = dict(zip(df["config_id"], df["quant"])) if len(df) and "quant" in df else {}
    deploy_of = dict(zip(df["config_id"], df["deploy_mode"])) if len(df) and "deploy_mode" in df else {}
    for c in claims:
        kind, margin = c["kind"], float(c.get("margin", DEFAULT_MARGIN))
        cell = {**_headline(agg), **(c.get("cell") or {})} if len(agg) else dict(c.get("cell") or {})
        base = {"id": c["id"], "paper": c["paper"], "claim": c["claim"], "A": _label(c["a"]), "B": _label(c["b"]),
                "A - B": "", "95% CI": "", "p": "", "n items": "", "margin": f"{margin:g}" if kind in (
                    "matches", "not-worse") else "", "verdict": "not run", "why": ""}
        if kind == "lower":
            metric = cell["metric"]
            base["comparison"] = f"{metric} of A vs B"
            va, vb = (_recorded(df, c[s], metric, quant_of) for s in ("a", "b"))
            if va is None or vb is None:
                base["why"] = "no run of A or B records it"
            else:
                base.update({"A - B": f"{100 * (va - vb):+.2f} (A {100 * va:.2f}%, B {100 * vb:.2f}%)",
                             "verdict": "supported" if va < vb else "contradicted",
                             "why": f"A's {metric} is {'below' if va < vb else 'not below'} B's"})
            rows.append(base)
            continue
        a = agg[(agg["task"] == cell["task"]) & (agg["metric"] == cell["metric"])
                & (agg["category"] == cell.get("category", ""))]
        if "shots" in cell:
            a = a[a["shots"] == cell["shots"]]
        base["comparison"] = f"{cell['task']}" + (f" {int(cell['shots'])}-shot" if "shots" in cell else "") \
            + f" {cell['metric']}"
        ra = [r for r in a.itertuples(index=False) if _matches(r, c["a"], quant_of, deploy_of)]
        rb = [r for r in a.itertuples(index=False) if _matches(r, c["b"], quant_of, deploy_of)]
        if len(ra) != 1 or len(rb) != 1:
            base["why"] = (f"selectors match {len(ra)} / {len(rb)} configurations (need one each)"
                           if ra or rb else "no run of A and B in this sweep")
            rows.append(base)
            continue
        ra, rb = ra[0], rb[0]
        if str(ra.seeds) != str(rb.seeds) and c["kind"] == "exact":
            # an exact claim compares the same seeds item by item; other kinds pair what both sides have
            base["why"] = f"A has seeds {ra.seeds}, B {rb.seeds}: an exact comparison needs the same seeds"
            rows.append(base)
            continue
        common = report.common_items(ra.run_dirs, ra.mode, rb.run_dirs, rb.mode, ra.task, ra.shots, ra.category,
                                ra.metric)
        if common is None:
            base["why"] = "no per-item records on the same items"
            rows.append(base)
            continue
        ca, cb, keep = common
        if kind == "exact":
            n_diff, n = _differing(ca, cb, keep)
            base.update({"A - B": f"{ra.mean - rb.mean:+.2f}", "n items": n,
                         "verdict": "supported" if n_diff == 0 else "contradicted",
                         "why": "identical on every item" if n_diff == 0 else f"{n_diff} of {n} items differ"})
            rows.append(base)
            continue
        res = report.paired_on(common, key=("claim", str(c["id"]), str(ra.config_id), str(rb.config_id)))
        lo, hi = 100 * res.lo, 100 * res.hi
        v, why = verdict(kind, lo, hi, res.p, margin)
        base.update({"A - B": f"{100 * res.diff:+.1f}", "95% CI": f"[{lo:+.1f}, {hi:+.1f}]", "p": f"{res.p:.3g}",
                     "n items": report.n_questions(ca, keep), "verdict": v, "why": why})
        rows.append(base)
    return pd.DataFrame(rows, columns=COLUMNS)


def _recorded(df: pd.DataFrame, sel: Mapping, metric: str, quant_of: Mapping) -> float | None:
    runs = df.drop_duplicates("run_id")
    vals = [getattr(r, metric) for r in runs.itertuples(index=False)
            if _matches(r, sel, quant_of) and not pd.isna(getattr(r, metric))]
    return float(vals[0]) if vals else None


def _same_labels(row, sel: Mapping) -> bool:
    """The model and data as the tables name them (``model``: the last part of the model's name, e.g. ``llama-7b`` for
    huggyllama/llama-7b, ``Llama-2-7b-hf``; ``data``: its source, e.g. ``alpaca``), where the selector names them."""
    return all(str(getattr(row, k)) == str(sel[k]) for k in ("model", "data") if k in sel)


def _differing(ca: dict, cb: dict, keep: Mapping) -> tuple[int, int]:
    """Items (over every seed) whose per-item result differs between A and B."""
    import numpy as np

    n_diff = n = 0
    for name, (keys, m, _) in ((k, v) for k, v in ca.items() if k != "_weighted"):
        pos_a = {k: i for i, k in enumerate(keys)}
        pos_b = {k: i for i, k in enumerate(cb[name][0])}
        idx_a = [pos_a[k] for k in keep[name]]
        idx_b = [pos_b[k] for k in keep[name]]
        xa, xb = np.asarray(m)[:, idx_a], np.asarray(cb[name][1])[:, idx_b]
        if xa.shape != xb.shape:
            return max(xa.size, xb.size), max(xa.size, xb.size)
        n_diff += int((~np.isclose(xa, xb)).sum())
        n += xa.shape[1]
    return n_diff, n


__all__ = ["KINDS", "check_selectors", "claims_table", "validate", "verdict"]
