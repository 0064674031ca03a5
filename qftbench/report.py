"""Result tables: collect finished runs into one long DataFrame, aggregate over seeds, lay out the papers' tables.

    from qftbench import report, plots
    df = report.collect("results")                      # one row per (run, mode, task, shots, category, metric)
    tabs = report.tables(df)                            # {name: DataFrame}, joined with the published numbers
    report.write_tables(tabs, "results/tables")         # <name>.csv, <name>.md, <name>.tex for every table
    plots.make_figures(df, "results/figures")

or ``python -m qftbench.collate results results/report`` (long.csv, tables/ and figures/ of every run under
``results/runs``; the workflow's own step is :func:`qftbench.collate.report_step`).

Values are accuracies in percent (as the papers print them). Runs that differ only in their seeds (the
top-level ``seed``, ``method.seed``, ``data.seed``, ``calibration.seed``) share a ``config_id``; every table
shows the mean over those seeds with its 95% interval over items and seeds (``mean [lo, hi]``, n items in the
column header; :mod:`qftbench.stats`) where the runs stored per-item records, else ``± std`` (sample standard
deviation) where there are several seeds.
Only finished runs (``train.json`` present) are read. Each run's learning rate (``train.lr``) is a column
(``lr``); the tables show it where it varies.

**The learning-rate rule** (:func:`lr_choice_table`, table ``lr_choice``): within each configuration group that
differs only in ``train.lr`` (same model, data, method, evaluation mode, bits, group size, rank, alpha and every
other training setting), the chosen learning rate is the one with the highest mean accuracy over seeds on the
synthetic **validation** split (``qft_synthetic_val``); equal means (within 1e-9 percentage points) go to the
smaller learning rate. The test split (``qft_synthetic``) and every other task are never read by the rule. The
un-tuned ``base`` is not trained and has no learning rate to choose.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd
import yaml

# the requantization setting's defaults and its mode names (requant-w<bits>g<group>[-rtn]): the config's own
from methods.atomic import atomic_write

from .config import REQUANT_DEFAULTS as DEFAULT_REQUANT, REQUANT_MODE_RE

PAPER_CSV = Path(__file__).resolve().parent / "reference" / "paper_results.csv"

#: the seven zero-shot commonsense tasks, in the column order of QA-LoRA's Table 3
COMMONSENSE_TASKS = ("hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa")
COMMONSENSE_LABELS = {"hellaswag": "HellaSwag", "piqa": "PIQA", "winogrande": "WinoGrande", "arc_easy": "ARC-e",
                      "arc_challenge": "ARC-c", "boolq": "BoolQ", "openbookqa": "OBQA"}
#: evaluate()'s MMLU category keys -> the papers' (and this module's) category names
MMLU_CATEGORIES = {"humanities": "humanities", "stem": "stem", "social_sciences": "social", "other": "other"}
CATEGORY_ORDER = ("humanities", "stem", "social", "other", "avg")
CATEGORY_LABELS = {"humanities": "Hums.", "stem": "STEM", "social": "Social", "other": "Other", "avg": "Avg."}

RUN_COLUMNS = ["run_id", "model", "method", "data", "bits", "group_size", "rank", "lr", "seed"]
EVAL_COLUMNS = ["mode", "task", "shots", "category", "metric", "value", "stderr", "n"]
EXTRA_COLUMNS = ["alpha", "deploy_mode", "deploy_bits", "deploy_group_size", "config_id", "lr_group", "run_dir"]
ACCOUNTING_COLUMNS = ["trainable_params", "adapter_flops_per_token", "train_flops_per_token", "train_flops_total",
                      "bits_per_param", "train_time_s", "peak_mem_mb", "tokens_per_s", "train_steps",
                      "quant", "weight_error", "weight_error_max", "init_error"]
COLUMNS = RUN_COLUMNS + EVAL_COLUMNS + EXTRA_COLUMNS + ACCOUNTING_COLUMNS

#: replicates (seeds) of one configuration are averaged over these keys
GROUP_KEYS = ["model", "method", "data", "mode", "deploy_bits", "deploy_group_size", "rank", "alpha", "lr", "config_id",
              "task", "shots", "category", "metric"]

def paper_methods() -> dict[str, tuple[str, str]]:
    """Published row name -> (suite method, mode), from each registered method's ``paper_rows``; a published row
    no method claims (e.g. QLoRA (FP4)) has no reproduced value. ``requant`` stands for the whole family:
    ``requant`` and every ``requant-w<bits>g<group>[-rtn]`` mode (see :func:`mode_family`); the published bits
    and group size then pick the matching setting."""
    import methods

    out: dict[str, tuple[str, str]] = {}
    for name in methods.names():
        for row, mode in getattr(methods.get(name), "paper_rows", {}).items():
            out[row] = (name, mode)
    return out


def _own_deploy(name: str | None) -> str:
    """A registered method's own deployment mode (its class attribute ``deploy``), for runs whose accounting
    lacks it; "" for a name the registry does not know (peft's table names: their accounting records it) or
    whose deployment depends on its settings (peft's ``deploy`` is a property)."""
    from methods.registry import find

    deploy = getattr(find(name), "deploy", "")
    return deploy if isinstance(deploy, str) else ""


# ------------------------------------------------------------------------------------------------ helpers
def norm_task(name: str) -> str:
    """``qft_X`` -> ``X`` (the offline mirrors are named after lm-eval's tasks)."""
    return name[4:] if name.startswith("qft_") else name


def paper_model(name: str) -> str:
    """A model name as the reference CSV spells it: ``huggyllama/llama-7b`` -> ``llama-7b``,
    ``meta-llama/Llama-2-7b-hf`` -> ``llama2-7b``."""
    n = Path(str(name)).name.lower()
    n = n.replace("llama-2-", "llama2-")
    return n[:-3] if n.endswith("-hf") else n


def _pct(v) -> float:
    return float(v) * 100.0 if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _int_or_none(v):
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _float_or_none(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def fmt_lr(v) -> str:
    """A learning rate as the tables print it (``0.002``, ``3.2e-05``); '' when missing."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return ""
    return "" if math.isnan(f) else f"{f:g}"


def config_id(cfg: Mapping, without_lr: bool = False) -> str:
    """Hash of the training-relevant config with every seed removed: runs that differ only in seeds share it.
    ``without_lr``: ``train.lr`` removed too (the ``lr_group`` column: runs that differ only in seeds and the
    learning rate share it)."""
    from .config import hash_view

    c = hash_view({k: cfg[k] for k in ("model", "method", "data", "calibration", "train") if k in cfg})
    c = {k: c.get(k) for k in ("model", "method", "data", "calibration", "train")}
    c = json.loads(json.dumps(c, default=str))
    for sec in ("method", "data", "calibration", "train"):
        if isinstance(c.get(sec), dict):
            c[sec].pop("seed", None)
    if without_lr and isinstance(c.get("train"), dict):
        c["train"].pop("lr", None)
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:8]


def mode_family(mode: str) -> str:
    """``requant`` for ``requant`` and every ``requant-w<bits>g<group>[-rtn]`` mode; other modes unchanged."""
    return "requant" if REQUANT_MODE_RE.match(str(mode)) else str(mode)


def deployment(method: Mapping, mode: str, eval_cfg: Mapping | None = None,
               requant: Mapping | None = None) -> tuple[str, int | None]:
    """``(bits, group_size)`` of the weights as evaluated in ``mode``, in the papers' notation: ``"4+16"`` for a
    4-bit base with a 16-bit adapter, ``"16"`` for an fp16 merge, the requantization's bits for ``requant`` and
    ``requant-w<bits>g<group>[-rtn]``. The requantization setting is, in this order: ``requant`` (the one an
    eval file records), the mode's name (``requant-w3g32``: 3 bits, groups of 32), ``eval_cfg["requant"]``
    (one setting; of a list, the first), the default."""
    bits, group = method.get("bits"), method.get("group_size")
    if mode == "4+16":
        return f"{bits}+16", _int_or_none(group)
    if mode == "fp16-merge":
        return "16", None
    if mode_family(mode) == "requant":
        named = REQUANT_MODE_RE.match(str(mode))
        if isinstance(requant, Mapping) and requant.get("bits") is not None:
            rq = {**DEFAULT_REQUANT, **requant}
        elif named:
            rq = {"bits": int(named.group(1)), "group_size": int(named.group(2))}
        else:
            cfg_rq = (eval_cfg or {}).get("requant") or {}
            if isinstance(cfg_rq, list):
                cfg_rq = cfg_rq[0] if cfg_rq else {}
            rq = {**DEFAULT_REQUANT, **cfg_rq}
        return str(rq["bits"]), _int_or_none(rq["group_size"])
    if bits is None:
        return "", None
    return str(bits), (_int_or_none(group) if int(bits) < 16 else None)


def read_train_log(path: str | os.PathLike) -> pd.DataFrame:
    """``train_log.jsonl`` as a DataFrame, one row per step (a step logged twice around a resume: the last
    wins; ``{"event": ...}`` lines are skipped)."""
    p = Path(path)
    steps: dict[int, dict] = {}
    if p.is_file():
        for line in p.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if "event" in r or "step" not in r or "loss" not in r:
                continue
            steps[int(r["step"])] = r
    df = pd.DataFrame([steps[k] for k in sorted(steps)])
    return df if len(df) else pd.DataFrame(columns=["step", "loss"])


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


# ------------------------------------------------------------------------------------------------ collect
def _shots(block: Mapping, file_shots: int) -> int:
    """The few-shot count of one task or MMLU block of an eval file: its own ``num_fewshot`` when it records one,
    else the file's (0 when the file records none either)."""
    return block.get("num_fewshot") if isinstance(block.get("num_fewshot"), int) else file_shots


def _eval_rows(res: Mapping, mode: str) -> list[dict]:
    """Long rows of one ``evaluate()`` output (values in percent)."""
    file_shots = _shots(res, 0)
    rows: list[dict] = []

    def add(task, shots, category, metric, value, stderr=None, n=None, raw=False):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        rows.append({"mode": mode, "task": task, "shots": shots, "category": category, "metric": metric,
                     "value": value if raw else _pct(value), "stderr": stderr if raw else _pct(stderr), "n": n})

    for task, r in (res.get("tasks") or {}).items():
        shots = _shots(r, file_shots)
        for metric in ("acc", "acc_norm"):
            add(norm_task(task), shots, "", metric, r.get(metric), r.get(f"{metric}_stderr"), r.get("n"))
        for metric in ("word_perplexity", "bits_per_byte"):  # perplexity tasks: as they are, not percent
            add(norm_task(task), shots, "", metric, r.get(metric), None, r.get("n"), raw=True)
    for suite, block in (res.get("mmlu") or {}).items():
        shots = _shots(block, file_shots)
        task = norm_task(suite)
        for metric in ("acc_micro", "acc_macro"):
            add(task, shots, "avg", metric, block.get(metric), block.get(f"{metric}_stderr"), block.get("n"))
            for cat, label in MMLU_CATEGORIES.items():
                c = (block.get("categories") or {}).get(cat) or {}
                add(task, shots, label, metric, c.get(metric), c.get(f"{metric}_stderr"), c.get("n"))
    cs = res.get("commonsense")
    if isinstance(cs, Mapping) and cs.get("acc_mean") is not None:
        add("commonsense_avg", file_shots, "", "acc", cs["acc_mean"])
        add("commonsense_avg", file_shots, "", "acc_norm_else_acc", cs.get("acc_norm_else_acc_mean"))
    elif isinstance(res.get("commonsense_avg"), (int, float)):
        add("commonsense_avg", file_shots, "", "acc", res["commonsense_avg"])
    return rows


def _deployed_bits(acc: dict) -> float | None:
    """Bits per parameter of the deployed model (fp16 scales and zeros for INT, bitsandbytes' storage for NF4;
    :mod:`qftbench.accounting`). Records written before the formats were separated counted the fp32 working
    copies; their bits are recomputed (:func:`~qftbench.accounting.bits_from_record`), or left empty."""
    from .accounting import bits_from_record

    if not acc or acc.get("bits_per_param") is None:
        return None
    try:
        return bits_from_record(acc)["bits_per_param"]
    except (ValueError, KeyError, TypeError):  # an unreadable old record (ConfigError is a ValueError): an empty
        return None                             # cell, never a working-copy number under the deployed label


def table_method(cfg: Mapping) -> dict:
    """A run config's method section as the tables name it: peft's methods get one row name per method and base
    (``peft-dora-nf4``), their rank is peft's ``r`` and their bits the base's."""
    m = dict(cfg.get("method") or {})
    if m.get("name") == "peft":
        from methods.peft_method import table_name

        m = {**m, "name": table_name(m), "rank": (m.get("peft") or {}).get("r"),
             "bits": 4 if m.get("base") == "nf4" else 16}
    return m


def run_labels(cfg: Mapping) -> dict:
    """The labels a run's rows carry in every table (and that claims select by): model (the last part of its
    name), method, data source, bits, group size and rank. One derivation for the report and for the sweep's
    check of claim selectors before any job."""
    m = table_method(cfg)
    return {
        "model": Path(str(cfg["model"]["name"])).name,
        "method": m.get("name"),
        "data": (cfg.get("data") or {}).get("source"),
        "bits": _int_or_none(m.get("bits")),
        "group_size": _int_or_none(m.get("group_size")),
        "rank": _int_or_none(m.get("rank")),
    }


def _load_plugins(cfg: dict, rd: Path) -> None:
    """The modules that registered the run's method (its config.yaml's ``plugins``), so that the tables and figures
    use the method's own label, style and order; a module that cannot be imported here leaves the method's name
    in their place (with a warning), not a failed report."""
    if not cfg.get("plugins"):
        return
    import warnings

    import methods
    from methods.errors import ConfigError

    try:
        methods.load_plugins(cfg["plugins"], where=f"{rd}/config.yaml: plugins")
    except ConfigError as e:
        warnings.warn(f"{e} (the run's method is labelled by its name)")


def _run_info(rd: Path) -> dict | None:
    cfg = yaml.safe_load((rd / "config.yaml").read_text()) if (rd / "config.yaml").is_file() else None
    if not cfg:
        return None
    _load_plugins(cfg, rd)
    m, train, acc = table_method(cfg), _read_json(rd / "train.json"), _read_json(rd / "accounting.json")
    return {
        "run_id": rd.name,
        **run_labels(cfg),
        "lr": _float_or_none((cfg.get("train") or {}).get("lr")),
        "seed": _int_or_none(cfg.get("seed")),
        "alpha": float(m["alpha"]) if isinstance(m.get("alpha"), (int, float)) else None,
        "deploy_mode": acc.get("deploy") or _own_deploy(m.get("name")),
        "config_id": config_id(cfg),
        "lr_group": config_id(cfg, without_lr=True),
        "run_dir": str(rd.resolve()),
        "trainable_params": acc.get("trainable_params"),
        "adapter_flops_per_token": acc.get("adapter_flops_per_token"),
        "train_flops_per_token": acc.get("train_flops_per_token"),
        "train_flops_total": acc.get("train_flops_total"),
        "bits_per_param": _deployed_bits(acc),
        "train_time_s": train.get("wall_time_s"),
        "peak_mem_mb": train.get("peak_mem_mb"),
        "tokens_per_s": train.get("tokens_per_s"),
        "train_steps": train.get("steps"),
        "quant": acc.get("base_quant"),
        "weight_error": (acc.get("base_weight_error") or {}).get("mean"),
        "weight_error_max": (acc.get("base_weight_error") or {}).get("max"),
        # where fine-tuning starts: LoftQ's base + SVD initialisation, else the base itself (B = 0)
        "init_error": (acc.get("init_error") or acc.get("base_weight_error") or {}).get("mean"),
        "_method_cfg": m,
        "_eval_cfg": cfg.get("eval") or {},
    }


def collect(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every evaluation of every finished run under ``results_dir/runs`` (or ``results_dir`` itself when it
    holds run folders), long format: one row per (run, mode, task, shots, category, metric).

    Columns: see :data:`COLUMNS`. ``task`` has ``qft_`` stripped; ``category`` is humanities/stem/social/
    other/avg for MMLU, '' otherwise; ``value``/``stderr`` are percent. ``commonsense_avg`` (plain mean of the
    seven tasks' acc) is taken from the eval file, or computed when the seven tasks were evaluated in separate
    files of the same run, mode and shots.
    """
    root = Path(results_dir)
    runs_root = root / "runs" if (root / "runs").is_dir() else root
    rows: list[dict] = []
    for rd in sorted(p for p in runs_root.iterdir() if p.is_dir()) if runs_root.is_dir() else []:
        if not (rd / "train.json").is_file():
            continue
        info = _run_info(rd)
        if info is None:
            continue
        mcfg, ecfg = info.pop("_method_cfg"), info.pop("_eval_cfg")
        run_rows: dict[tuple, dict] = {}
        requant_of: dict[str, Mapping] = {}  # mode -> the re-quantization setting its eval files record
        ecfg_of: dict[str, Mapping] = {}     # mode -> the evaluation settings its files record (eval_config)
        for p in sorted((rd / "eval").glob("*/*.json")):
            res = _read_json(p)
            mode = res.get("mode") or p.parent.name
            if isinstance(res.get("requant"), Mapping):
                requant_of[mode] = res["requant"]
            if isinstance(res.get("eval_config"), Mapping):
                ecfg_of[mode] = res["eval_config"]
            for r in _eval_rows(res, mode):
                key = (r["mode"], r["task"], r["shots"], r["category"], r["metric"])
                run_rows[key] = r  # the same number evaluated twice: the last file (by name) wins
        # commonsense mean computed across files
        by = {}
        for (mode, task, shots, cat, metric), r in run_rows.items():
            if task in COMMONSENSE_TASKS and metric == "acc":
                by.setdefault((mode, shots), {})[task] = r["value"]
        for (mode, shots), vals in by.items():
            if all(t in vals for t in COMMONSENSE_TASKS) and (mode, "commonsense_avg", shots, "", "acc") not in run_rows:
                run_rows[(mode, "commonsense_avg", shots, "", "acc")] = {
                    "mode": mode, "task": "commonsense_avg", "shots": shots, "category": "", "metric": "acc",
                    "value": sum(vals[t] for t in COMMONSENSE_TASKS) / len(COMMONSENSE_TASKS),
                    "stderr": math.nan, "n": None}
        for r in run_rows.values():
            # the evaluation's own record first; a run folder written before eval_config existed: its config.yaml
            dbits, dgroup = deployment(mcfg, r["mode"], ecfg_of.get(r["mode"], ecfg), requant_of.get(r["mode"]))
            rows.append({**info, **r, "deploy_bits": dbits, "deploy_group_size": dgroup})
    df = pd.DataFrame(rows, columns=COLUMNS)
    for c in ("bits", "group_size", "rank", "seed", "shots", "n", "deploy_group_size", "trainable_params",
              "train_steps"):
        df[c] = df[c].astype("Int64")
    for c in ("value", "stderr", "alpha", "lr", "adapter_flops_per_token", "train_flops_per_token", "train_flops_total",
              "bits_per_param", "train_time_s", "peak_mem_mb", "tokens_per_s", "weight_error", "weight_error_max", "init_error"):
        df[c] = df[c].astype("float64")
    for c in ("run_id", "model", "method", "data", "mode", "task", "category", "metric", "deploy_mode",
              "deploy_bits", "config_id", "lr_group", "run_dir", "quant"):
        df[c] = df[c].astype(object).where(df[c].notna(), "").astype(str)
    return df


# ------------------------------------------------------------------------------------------------ aggregate
def aggregate(df: pd.DataFrame, value: str = "value", keys: Iterable[str] = GROUP_KEYS,
              intervals: bool = True) -> pd.DataFrame:
    """Mean, sample std and number of seeds of ``value`` per configuration (``keys``), plus, for the accuracy
    metrics (:data:`CI_METRICS`) whose runs stored per-item records, the 95% interval over items and seeds
    (``ci_lo``, ``ci_hi``, percent; ``n_items`` questions, ``n_units`` the bootstrap's units: fewer where the
    items form clusters, see :func:`strata_args`; :mod:`qftbench.stats`). ``run_dirs``: the runs behind each row."""
    keys = list(keys)
    if df.empty:
        return pd.DataFrame(columns=keys + ["mean", "std", "n_seeds", "seeds", "run_dirs", "ci_lo", "ci_hi",
                                            "n_items", "n_units"])
    g = df.groupby(keys, dropna=False, sort=True)
    out = g[value].agg(["mean", "std"]).reset_index()
    out["n_seeds"] = g["seed"].nunique(dropna=False).to_numpy()
    out["seeds"] = g["seed"].agg(lambda s: ",".join(str(x) for x in sorted(s.dropna().unique()))).to_numpy()
    out.loc[out["n_seeds"] < 2, "std"] = math.nan
    out["run_dirs"] = g["run_dir"].agg(lambda s: tuple(sorted(set(s)))).to_numpy() if "run_dir" in df else None
    lo, hi, n, units = [], [], [], []
    for r in out.itertuples(index=False):
        res = cell_interval(r) if intervals and "run_dir" in df and "task" in keys else None
        iv, n_q = res if res is not None else (None, None)
        lo.append(math.nan if iv is None else 100 * iv.lo)
        hi.append(math.nan if iv is None else 100 * iv.hi)
        n.append(pd.NA if iv is None else n_q)
        units.append(pd.NA if iv is None else iv.n_items)
    out["ci_lo"], out["ci_hi"] = pd.Series(lo, dtype="float64"), pd.Series(hi, dtype="float64")
    out["n_items"] = pd.Series(n, dtype="Int64")
    out["n_units"] = pd.Series(units, dtype="Int64")
    return out


# ------------------------------------------------------------------------------------------------ intervals
#: the metrics whose cells carry an interval over items and seeds
CI_METRICS = ("acc", "acc_micro", "acc_macro")


@functools.lru_cache(maxsize=8192)
def _file_items(path: str, mtime_ns: int) -> dict:
    """``{(task, shots): {stratum: {"key": [...], "acc": [...], "acc_norm": [...]}}}`` of one eval file."""
    from .evaluate import SUBJECT_TASK

    res = _read_json(Path(path))
    file_shots = _shots(res, 0)
    out: dict = {}
    for leaf, cols in (res.get("items") or {}).items():
        m = SUBJECT_TASK.match(leaf)
        if m:
            block = (res.get("mmlu") or {}).get(m["suite"]) or {}
            task, stratum = norm_task(m["suite"]), m["subject"]
            shots = _shots(block, file_shots)
        else:
            r = (res.get("tasks") or {}).get(leaf) or {}
            task = stratum = norm_task(leaf)
            shots = _shots(r, file_shots)
        keys = cols.get("doc_hash") if all(cols.get("doc_hash") or [None]) else cols.get("doc_id")
        out.setdefault((task, shots), {})[stratum] = {"key": list(keys), "acc": cols.get("acc"),
                                                      "acc_norm": cols.get("acc_norm"),
                                                      "cluster": cols.get("cluster"),
                                                      "loglikelihood": cols.get("loglikelihood"),
                                                      "words": cols.get("words")}
    return out


def run_items(run_dir: str, mode: str) -> dict:
    """Per-item records of every evaluation of one run in one mode (see :func:`_file_items`)."""
    out: dict = {}
    for p in sorted((Path(run_dir) / "eval" / mode).glob("*.json")):
        for k, strata in _file_items(str(p), p.stat().st_mtime_ns).items():
            out.setdefault(k, {}).update(strata)
    return out


@functools.lru_cache(maxsize=1)
def _subject_category() -> dict[str, str]:
    from .tasks import mmlu_subjects

    return {s: MMLU_CATEGORIES.get(c, c) for s, c in mmlu_subjects().items()}


def cell_strata(items: Mapping, task: str, shots, category: str, metric: str):
    """``(strata, weights)`` of one table cell from a run's items: ``strata`` maps a stratum name to its records
    (``key``, values of ``metric``'s item column); None when the records are missing.

    A task: one stratum. MMLU: its subjects (of ``category``, all for ``avg``), weighted by their item counts
    for ``acc_micro`` (question-weighted) and equally for ``acc_macro`` (subject-weighted). ``commonsense_avg``:
    the seven tasks, equally weighted (their plain mean)."""
    if metric not in CI_METRICS or pd.isna(shots):
        return None
    shots = int(shots)
    if task == "mmlu" and metric in ("acc_micro", "acc_macro"):
        subjects = (items.get(("mmlu", shots)) or {})
        cat = _subject_category()
        strata = {s: r for s, r in subjects.items() if category == "avg" or cat.get(s) == category}
        weighted = metric == "acc_micro"
    elif task == "commonsense_avg" and metric == "acc":
        strata = {t: (items.get((t, shots)) or {}).get(t) for t in COMMONSENSE_TASKS}
        weighted = False
    elif metric == "acc" and task not in ("mmlu", "commonsense_avg"):
        strata = {task: (items.get((task, shots)) or {}).get(task)}
        weighted = False
    else:
        return None
    if not strata or any(r is None or r.get("acc") is None for r in strata.values()):
        return None
    recs = {k: {"key": r["key"], "values": r["acc"], "cluster": r.get("cluster")} for k, r in sorted(strata.items())}
    weights = [len(r["key"]) for r in recs.values()] if weighted else [1.0] * len(recs)
    return recs, weights


def seed_matrices(per_seed: list[tuple]) -> dict | None:
    """Align the strata of several seeds' runs item by item: ``{stratum: (keys, matrix, clusters)}`` with one
    ``(seeds, items)`` matrix per stratum over the items every seed evaluated (in the first seed's order) and
    each item's cluster (or None where the task records none; see :func:`strata_args`), plus ``"_weighted"``:
    whether the strata are weighted by their item counts. None without item records."""
    import numpy as np

    if not per_seed or any(c is None for c in per_seed):
        return None
    names = list(per_seed[0][0])
    if any(list(c[0]) != names for c in per_seed):
        return None
    out: dict = {"_weighted": per_seed[0][1] != [1.0] * len(names)}
    for name in names:
        recs = [c[0][name] for c in per_seed]
        common = set(recs[0]["key"]).intersection(*(r["key"] for r in recs[1:]))
        order = [k for k in recs[0]["key"] if k in common]
        if not order:
            return None
        rows = []
        for r in recs:
            pos = {k: i for i, k in enumerate(r["key"])}
            rows.append([r["values"][pos[k]] for k in order])
        cl = recs[0].get("cluster")
        clusters = None
        if cl is not None and all(c is not None for c in cl):
            of = dict(zip(recs[0]["key"], cl))
            clusters = [of[k] for k in order]
        out[name] = (order, np.asarray(rows, dtype=np.float64), clusters)
    return out


def _by_cluster(m, clusters):
    """Columns of ``m`` averaged within each cluster (in first-appearance order) when every cluster has the same
    number of items; ``m`` unchanged otherwise (unequal clusters would re-weight the items)."""
    import numpy as np

    if clusters is None:
        return m
    groups: dict = {}
    for i, c in enumerate(clusters):
        groups.setdefault(c, []).append(i)
    if len(groups) == len(clusters) or len({len(g) for g in groups.values()}) != 1:
        return m
    return np.stack([m[:, g].mean(axis=1) for g in groups.values()], axis=1)


def strata_args(aligned: dict, keep: Mapping[str, list] | None = None) -> tuple[list, list]:
    """``(matrices, weights)`` for :mod:`qftbench.stats` from :func:`seed_matrices`' output, restricted to the
    item keys ``keep[stratum]`` (in that order) when given.

    Items of one cluster (the synthetic task's questions about one fact, in several held-out phrasings) are not
    independent: a model that learned the fact tends to answer all of them. Each cluster is therefore one unit of
    the bootstrap and of the paired test (its items' mean), so the interval is over facts, not phrasings."""
    mats, weights = [], []
    for name, (keys, m, clusters) in ((k, v) for k, v in aligned.items() if k != "_weighted"):
        if keep is not None:
            pos = {k: i for i, k in enumerate(keys)}
            idx = [pos[k] for k in keep[name]]
            m = m[:, idx]
            clusters = None if clusters is None else [clusters[i] for i in idx]
        weights.append(m.shape[1])
        mats.append(_by_cluster(m, clusters))
    if not aligned["_weighted"]:
        weights = [1.0] * len(mats)
    return mats, weights


def cell_interval(row):
    """``(Interval, n questions)`` of one aggregated row (a row of :func:`aggregate`, as a Series or an
    ``itertuples`` tuple) over its runs' items and seeds, or None without item records. Memoised per (runs, their eval files' mtimes,
    cell): :func:`aggregate` is called by several tables and the figures on the same rows."""
    get = row.__getitem__ if isinstance(row, pd.Series) else (lambda k: getattr(row, k))
    mode, task, shots, category, metric = (get(k) for k in ("mode", "task", "shots", "category", "metric"))
    if metric not in CI_METRICS or pd.isna(shots):
        return None
    run_dirs = tuple(get("run_dirs") or ())
    stamp = tuple(tuple(sorted((p.name, p.stat().st_mtime_ns) for p in (Path(rd) / "eval" / mode).glob("*.json")))
                  for rd in run_dirs)
    return _cell_interval(run_dirs, stamp, str(mode), str(task), int(shots), str(category), str(metric),
                          str(get("config_id")))


def aligned_cell(run_dirs, mode: str, task: str, shots, category: str, metric: str) -> dict | None:
    """One cell's per-item records over the seeds' runs, aligned item by item (:func:`seed_matrices`)."""
    return seed_matrices([cell_strata(run_items(rd, mode), task, shots, category, metric) for rd in run_dirs])


def common_items(run_dirs_a, mode_a: str, run_dirs_b, mode_b: str, task: str, shots, category: str,
                 metric: str) -> tuple[dict, dict, dict] | None:
    """``(cell A, cell B, keep)``: two cells' per-item records (:func:`aligned_cell`) and, per stratum, the keys
    of the items both evaluated (in A's order); None when either lacks records, their strata differ, or a
    stratum has no item in common. What every paired comparison (:func:`paired_on`) is computed on."""
    ca = aligned_cell(run_dirs_a, mode_a, task, shots, category, metric)
    cb = aligned_cell(run_dirs_b, mode_b, task, shots, category, metric)
    if ca is None or cb is None or set(ca) != set(cb):
        return None
    keep = {}
    for name in (k for k in ca if k != "_weighted"):
        in_b = set(cb[name][0])
        keep[name] = [k for k in ca[name][0] if k in in_b]
    return (ca, cb, keep) if all(keep.values()) else None


def paired_on(common: tuple[dict, dict, dict], key=()):
    """:func:`qftbench.stats.paired` (A - B) on the common items of :func:`common_items`."""
    from . import stats

    ca, cb, keep = common
    mats_a, w = strata_args(ca, keep)
    mats_b, _ = strata_args(cb, keep)
    return stats.paired(mats_a, mats_b, w, key=key)


@functools.lru_cache(maxsize=65536)
def _cell_interval(run_dirs: tuple, stamp: tuple, mode, task, shots, category, metric, config_id):
    from . import stats

    aligned = aligned_cell(run_dirs, mode, task, shots, category, metric)
    if aligned is None:
        return None
    mats, weights = strata_args(aligned)
    iv = stats.interval(mats, weights, key=(config_id, mode, task, shots, category, metric))
    return iv, n_questions(aligned)


def n_questions(aligned: dict, keep: Mapping[str, list] | None = None) -> int:
    """Items (questions) behind a cell; the bootstrap's units are fewer where items form clusters
    (:func:`strata_args`)."""
    return sum(len(keep[k]) if keep is not None else len(v[0]) for k, v in aligned.items() if k != "_weighted")


def with_n_facts(cols: list[str], t: pd.DataFrame) -> list[str]:
    """``cols`` with ``n facts`` (the bootstrap's units) after ``n items`` where the two differ in ``t`` (items that
    form clusters: the synthetic task's facts); unchanged otherwise."""
    if "n facts" not in t or not (t["n facts"] != t["n items"]).any():
        return cols
    i = cols.index("n items") + 1
    return cols[:i] + ["n facts"] + cols[i:]


def fmt_n(n_items, n_units) -> str:
    """``n=300`` or, where the items form clusters (the synthetic task's facts), ``n=300 (60 facts)``."""
    if n_items is None or pd.isna(n_items):
        return ""
    if n_units is None or pd.isna(n_units) or int(n_units) == int(n_items):
        return f"n={int(n_items)}"
    return f"n={int(n_items)} ({int(n_units)} facts)"


def fmt_pm(mean: float, std: float, digits: int = 1) -> str:
    """``38.4`` or ``38.4 ± 0.3`` (std shown when there are several seeds); '' for a missing value."""
    if mean is None or pd.isna(mean):
        return ""
    s = f"{mean:.{digits}f}"
    return s if std is None or pd.isna(std) else f"{s} ± {std:.{digits}f}"


def fmt_ci(mean: float, lo: float, hi: float, std: float | None = None, digits: int = 1) -> str:
    """``38.4 [35.1, 41.7]`` (mean over seeds and its 95% interval over items and seeds); without an interval
    (runs that stored no per-item records) as :func:`fmt_pm`."""
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return fmt_pm(mean, std, digits)
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


ROW_KEYS = ["model", "method", "mode", "data", "deploy_bits", "deploy_group_size", "rank", "lr"]
ROW_LABELS = {"deploy_bits": "bits", "deploy_group_size": "group"}


def _show_lr(t: pd.DataFrame) -> pd.DataFrame:
    """The ``lr`` column printed (:func:`fmt_lr`) where it varies within the table, else dropped."""
    if "lr" not in t:
        return t
    t = t.copy()
    t["lr"] = [fmt_lr(v) for v in t["lr"]]
    return t.drop(columns="lr") if t["lr"].nunique() <= 1 else t


def _wide(agg: pd.DataFrame, col_of, order: list[str], digits: int = 1) -> pd.DataFrame:
    """Pivot aggregated rows to one row per configuration, one string cell per column ``col_of(row)``. ``lr``
    is a column only where it varies within the table; ``config`` (the config hash) only where two rows would
    otherwise look the same."""
    if agg.empty:
        return pd.DataFrame(columns=[ROW_LABELS.get(k, k) for k in ROW_KEYS if k != "lr"] + order + ["seeds"])
    agg = agg.copy()
    if "lr" not in agg:
        agg["lr"] = math.nan
    agg["col"] = [col_of(r) for r in agg.itertuples(index=False)]
    agg = agg[agg["col"].notna()]
    agg["cell"] = [fmt_ci(m, lo, hi, s, digits) for m, lo, hi, s in zip(agg["mean"], agg["ci_lo"], agg["ci_hi"],
                                                                         agg["std"])]
    # n items in the column header when every row of that column has the same n, else in the cell
    if "n_units" not in agg:
        agg["n_units"] = agg["n_items"]
    agg["n_label"] = [fmt_n(n, u) if not pd.isna(n) else None for n, u in zip(agg["n_items"], agg["n_units"])]
    n_of = agg.groupby("col")["n_label"].agg(lambda x: sorted({v for v in x.dropna()}))
    rename = {c: f"{c} ({ns[0]})" for c, ns in n_of.items() if len(ns) == 1}
    for c, ns in n_of.items():
        if len(ns) > 1:
            mask = (agg["col"] == c) & agg["n_label"].notna()
            agg.loc[mask, "cell"] = [f"{cell} {lab}" for cell, lab in zip(agg.loc[mask, "cell"],
                                                                        agg.loc[mask, "n_label"])]
    rk = ROW_KEYS + ["config_id"]
    agg[rk] = agg[rk].astype(object).where(agg[rk].notna(), "")
    wide = agg.pivot_table(index=rk, columns="col", values="cell", aggfunc="first").reindex(
        columns=[c for c in order if c in set(agg["col"])])
    seeds = agg.groupby(rk)["n_seeds"].max()
    wide["seeds"] = seeds.reindex(wide.index).astype(int)
    wide = wide.fillna("").reset_index()
    # a config hash only where two configurations would otherwise look the same
    if wide.duplicated(ROW_KEYS).any():
        wide = wide.rename(columns={"config_id": "config"})
    else:
        wide = wide.drop(columns="config_id")
    wide = _sort_rows(_show_lr(wide))
    wide.columns.name = None
    return wide.rename(columns={**ROW_LABELS, **rename})


def method_order() -> list[str]:
    """Row order of the tables: the un-tuned base, then the registry's order (methods/registry.py), so that a
    method registered later (a user's own) comes after the suite's; peft's rows (peft-<label>-<base>) last."""
    import methods

    return ["base"] + [n for n in methods.names() if n not in ("base", "peft")]


def _method_rank():
    """method -> its place in :func:`method_order` (unknown methods after all of them), looked up once per sort."""
    order = {m: i for i, m in enumerate(method_order())}
    return lambda m: order.get(m, len(order))


MODE_ORDER = ["base", "fp16-merge", "4+16", "int-merge", "requant"]


def _sort_rows(t: pd.DataFrame) -> pd.DataFrame:
    def key(col: pd.Series):
        if col.name == "method":
            return col.map(_method_rank())
        if col.name == "mode":  # requant-w<b>g<g>: beside requant, then by deploy_bits (descending)
            return col.map(lambda m: (MODE_ORDER.index(mode_family(m)) if mode_family(m) in MODE_ORDER
                                      else len(MODE_ORDER)))
        if col.name in ("deploy_bits", "bits"):
            return col.map(lambda b: -float(str(b).split("+")[0]) if str(b) not in ("", "<NA>") else 0.0)
        if col.name in ("rank", "deploy_group_size", "group", "group_size", "lr"):
            return col.map(lambda v: float(v) if str(v) not in ("", "<NA>", "nan") else -1.0)
        return col.astype(str)

    cols = [c for c in ("model", "data", "method", "mode", "deploy_bits", "deploy_group_size", "rank", "lr")
            if c in t]
    return t.sort_values(cols, key=key, kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ tables
def _mmlu_table(agg: pd.DataFrame, metric: str) -> pd.DataFrame:
    a = agg[(agg["task"] == "mmlu") & (agg["metric"] == metric)]
    shots = sorted({int(s) for s in a["shots"].dropna()})
    order = [f"{s}-shot {CATEGORY_LABELS[c]}" for s in shots for c in CATEGORY_ORDER]
    return _wide(a, lambda r: f"{int(r.shots)}-shot {CATEGORY_LABELS.get(r.category, r.category)}", order)


def _commonsense_table(agg: pd.DataFrame) -> pd.DataFrame:
    a = agg[agg["task"].isin(COMMONSENSE_TASKS + ("commonsense_avg",)) & (agg["metric"] == "acc")]
    multi = a["shots"].nunique() > 1

    def col(r):
        label = COMMONSENSE_LABELS.get(r.task, "Avg.")
        return f"{label} ({int(r.shots)}-shot)" if multi else label

    labels = [COMMONSENSE_LABELS[t] for t in COMMONSENSE_TASKS] + ["Avg."]
    shots = sorted({int(s) for s in a["shots"].dropna()})
    order = [f"{lab} ({s}-shot)" for s in shots for lab in labels] if multi else labels
    return _wide(a, col, order)


def _synthetic_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Accuracy on the synthetic test questions, and on the validation split where it was evaluated."""
    a = agg[agg["task"].isin(["synthetic", "synthetic_val"])]
    names = {"synthetic": "acc (%)", "synthetic_val": "validation acc (%)"}
    return _wide(a, lambda r: names[r.task] if r.metric == "acc" else None, ["acc (%)", "validation acc (%)"])


#: ``bits/param (deployed)``: the whole deployed model in the format a user deploys (INT: fp16 scale + fp16
#: float zero per group, k + 32/g; NF4 + double quantization: bitsandbytes' storage, 4.127 on target layers;
#: everything else 16), not the suite's fp32 working copies (``bits_per_param_working`` in accounting.json)
EFFICIENCY_LABELS = {
    "trainable_params": "trainable params", "adapter_flops_per_token": "adapter FLOPs/token",
    "train_flops_per_token": "train FLOPs/token", "train_flops_total": "total train FLOPs",
    "bits_per_param": "bits/param (deployed)", "train_time_s": "train time (s)", "peak_mem_mb": "peak mem (MB)",
    "tokens_per_s": "tokens/s",
}


def _fmt_sci(v: float) -> str:
    if pd.isna(v):
        return ""
    return f"{int(round(v))}" if abs(v) < 1e6 else f"{v:.3g}"


SCALING_LABEL = "scaling s=alpha/r"


def _efficiency_table(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["model", "method", "data", "bits", "group_size", "rank", "alpha", "lr", "config_id"]
    cols = list(EFFICIENCY_LABELS)
    if "lr" not in df:
        df = df.assign(lr=math.nan)
    runs = df.drop_duplicates("run_id")[keys + ["seed"] + cols]
    if runs.empty:
        return pd.DataFrame(columns=["model", "method", "data", "bits", "group", "rank", SCALING_LABEL]
                            + list(EFFICIENCY_LABELS.values()) + ["seeds"])
    runs = runs.copy()
    runs[keys] = runs[keys].astype(object).where(runs[keys].notna(), "")
    g = runs.groupby(keys, sort=False)
    out = g.size().rename("seeds").reset_index()[keys]

    def scaling(alpha, rank):  # s = alpha / nominal rank (METHODS.md); under Adam it scales a full H's update
        try:                   # exactly as the learning rate does, so it belongs beside lr
            return f"{float(alpha) / float(rank):g}"
        except (TypeError, ValueError, ZeroDivisionError):
            return ""

    out[SCALING_LABEL] = [scaling(a, r) for a, r in zip(out["alpha"], out["rank"])]
    for c in cols:
        vals = runs[c].astype("float64")
        mean, std, n = vals.groupby([runs[k] for k in keys], sort=False).agg(["mean", "std", "count"]).T.to_numpy()
        cells = []
        for m, s, k in zip(mean, std, n):
            if c in ("trainable_params",):
                cells.append("" if pd.isna(m) else f"{int(round(m))}")
            elif c in ("adapter_flops_per_token", "train_flops_per_token", "train_flops_total"):
                cells.append(_fmt_sci(m))
            elif c == "bits_per_param":
                cells.append(fmt_pm(m, None, 2))
            else:
                cells.append(fmt_pm(m, s if k > 1 else None, 1))
        out[EFFICIENCY_LABELS[c]] = cells
    out["seeds"] = g["seed"].nunique().to_numpy()
    out = _sort_rows(_show_lr(out))
    if out.duplicated([c for c in ("model", "method", "data", "bits", "group_size", "rank", "alpha", "lr")
                       if c in out]).any():
        out = out.rename(columns={"config_id": "config"})
    else:
        out = out.drop(columns="config_id")
    if out["alpha"].astype(str).nunique() <= 1:
        out = out.drop(columns="alpha")
    else:
        out["alpha"] = [f"{a:g}" if isinstance(a, float) else str(a) for a in out["alpha"]]
    return out.rename(columns={"group_size": "group"})


def load_paper(paper_csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """The published numbers (default: the packaged copy :data:`PAPER_CSV`)."""
    p = pd.read_csv(paper_csv or PAPER_CSV, dtype=str, keep_default_na=False)
    p["value"] = pd.to_numeric(p["value"], errors="coerce")
    return p


#: the MMLU protocol behind each paper's published numbers (docs/SETTINGS.md, "MMLU split and script", "MMLU
#: average", "MMLU protocol"): QLoRA's authors used the original MMLU script on the test split (artidoro/qlora#194),
#: whose average is over questions (hendrycks/test evaluate.py:133); QA-LoRA reports the same protocol. Every run
#: records both averages (acc_micro over questions, acc_macro over subjects) from its per-item results and
#: evaluates the test split with lm-eval's MMLU task (config.MMLU_PROTOCOL), so a paper row is compared with the
#: run's number at the paper's own average.
PAPER_MMLU = {"QLoRA": {"split": "test", "average": "questions"}, "QA-LoRA": {"split": "test", "average": "questions"}}
MMLU_AVERAGE_METRIC = {"questions": "acc_micro", "subjects": "acc_macro"}


def _paper_protocol(source: str) -> dict | None:
    return next((v for k, v in PAPER_MMLU.items() if str(source).startswith(k)), None)


def _paper_metric(row) -> str:
    if row["metric"] == "acc" and row["task"] == "mmlu":
        proto = _paper_protocol(row["source"]) or {"average": "questions"}
        return MMLU_AVERAGE_METRIC[proto["average"]]
    return row["metric"]


def _protocol_note(task: str, metric: str, pr) -> str:
    """What the comparison of one MMLU row compares: like with like, or why it cannot."""
    if task != "mmlu":
        return ""
    avg = {v: k for k, v in MMLU_AVERAGE_METRIC.items()}.get(metric, metric)
    if pr is None:
        return f"test split, lm-eval, over {avg}; no published number at this average"
    proto = _paper_protocol(pr["source"])
    if proto is None:
        return f"not comparable: the protocol of {pr['source']} is not known"
    return f"like with like: {proto['split']} split, over {proto['average']}"


def _num_bits(b) -> float | None:
    s = str(b).split("+")[0].strip()
    try:
        return float(s)
    except ValueError:
        return None


def paper_vs_reproduced(df: pd.DataFrame, paper_csv: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per reproduced headline number (MMLU acc_micro/acc_macro, task acc, commonsense_avg acc,
    trainable params) and matching published row; reproduced numbers that were not published keep an empty
    ``paper`` (several published rows for one number, e.g. QA-LoRA Table 1 and Table 5: one row each)."""
    cols = ["model", "method", "mode", "data", "bits", "group", "rank", "task", "shots", "category", "metric",
            "paper", "reproduced", "ci_lo", "ci_hi", "n_items", "std", "n_seeds", "diff", "paper_method",
            "paper_source", "paper_note", "protocol"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    head = df[(df["metric"].isin(["acc_micro", "acc_macro"]) & (df["task"] == "mmlu"))
              | ((df["metric"] == "acc") & (df["task"] != "mmlu"))]
    rep = aggregate(head)
    # trainable parameters, once per configuration (the mode does not matter)
    runs = df.drop_duplicates("run_id").copy()
    runs["mode"], runs["deploy_bits"], runs["deploy_group_size"] = "", "", pd.NA
    runs["bits"] = runs["bits"].astype(object)
    runs["deploy_bits"] = [("" if pd.isna(b) else str(b)) for b in runs["bits"]]
    runs["deploy_group_size"] = runs["group_size"]
    runs["task"], runs["shots"], runs["category"], runs["metric"] = "efficiency", pd.NA, "", "trainable_params"
    runs["value"] = runs["trainable_params"].astype("float64")
    rep = pd.concat([rep, aggregate(runs[runs["value"].notna()])], ignore_index=True)

    paper = load_paper(paper_csv)
    paper_of = paper_methods()
    paper = paper.assign(suite=[paper_of.get(m) for m in paper["method"]])
    paper = paper[paper["suite"].notna()]
    index: dict[tuple, list] = {}
    for _, pr in paper.iterrows():
        method, mode = pr["suite"]
        shots = int(pr["shots"]) if pr["shots"] != "" else None
        key = (pr["model"], method, pr["task"], shots, pr["category"], _paper_metric(pr))
        index.setdefault(key, []).append((mode, pr))

    out = []
    for r in rep.itertuples(index=False):
        shots = None if pd.isna(r.shots) else int(r.shots)
        matches = []
        for mode, pr in index.get((paper_model(r.model), r.method, r.task, shots, r.category, r.metric), []):
            if r.task != "efficiency" and mode != mode_family(r.mode):
                continue
            if str(r.mode).endswith("-rtn"):  # an RTN re-quantization is not the papers' "w/ GPTQ" number
                continue
            pbits, rbits = _num_bits(pr["bits"]), _num_bits(r.deploy_bits)
            if pbits is not None and rbits is not None and pbits != rbits:
                continue
            if pr["group_size"] != "" and not pd.isna(r.deploy_group_size) and int(pr["group_size"]) != int(
                    r.deploy_group_size):
                continue
            pdata = pr["finetune_data"].replace("(presumed)", "").strip()
            if r.method != "base" and pdata and pdata != r.data:
                continue
            matches.append(pr)
        base = {"model": r.model, "method": r.method, "mode": r.mode, "data": r.data, "bits": r.deploy_bits,
                "group": r.deploy_group_size, "rank": r.rank, "task": r.task, "shots": r.shots,
                "category": r.category, "metric": r.metric, "reproduced": r.mean, "std": r.std,
                "n_seeds": r.n_seeds, "ci_lo": r.ci_lo, "ci_hi": r.ci_hi, "n_items": r.n_items}
        for pr in matches or [None]:
            row = dict(base, paper=math.nan, paper_method="", paper_source="", paper_note="")
            if pr is not None:
                row.update(paper=pr["value"], paper_method=pr["method"],
                           paper_source=f"{pr['source'].split(' (')[0]} {pr['table'].split(' (')[0]}",
                           paper_note=pr["note"].lstrip("; ") or ("unreadable in the source" if pd.isna(
                               pr["value"]) else ""))
            row["diff"] = row["reproduced"] - row["paper"]
            row["protocol"] = _protocol_note(r.task, r.metric, pr)
            out.append(row)
    res = pd.DataFrame(out, columns=cols)
    res["n_items"] = res["n_items"].astype("Int64")
    for c in ("paper", "reproduced", "ci_lo", "ci_hi", "std", "diff"):
        res[c] = res[c].astype("float64").round(2)
    res["n_seeds"] = res["n_seeds"].astype(int)
    for c in ("group", "rank", "shots"):
        res[c] = res[c].astype("Int64")
    order = {"mmlu": 0, **{t: i + 1 for i, t in enumerate(COMMONSENSE_TASKS)}, "commonsense_avg": 8,
             "efficiency": 10}
    res = res.assign(_t=res["task"].map(lambda t: order.get(t, 9)),
                     _m=res["metric"].map(lambda m: {"acc_micro": 0, "acc_macro": 1}.get(m, 2)),
                     _c=res["category"].map(lambda c: CATEGORY_ORDER.index(c) if c in CATEGORY_ORDER else -1))
    res = res.sort_values(["_t", "shots", "_m", "_c"], kind="stable", na_position="first")
    res = _sort_rows(res.rename(columns={"bits": "deploy_bits", "group": "deploy_group_size"})).rename(
        columns={"deploy_bits": "bits", "deploy_group_size": "group"})
    return res.drop(columns=["_t", "_m", "_c"]).reset_index(drop=True)


#: the significance level of the paired verdicts (together with the 95% interval, see :func:`paired_table`)
ALPHA = 0.05
#: the comparisons the papers make (A, B, what they claim); every other method is also compared with 16-bit LoRA
PAPER_PAIRS = [
    ("qlora", "lora", "QLoRA: NF4 + double quantization fine-tuning matches 16-bit LoRA"),
    ("qalora", "qlora", "QA-LoRA: matches QLoRA 4+16, beats QLoRA merged then GPTQ-quantized"),
    ("loftq", "qlora", "LoftQ: its initialisation beats QLoRA's at low bits"),
    ("qbara", "qlora", "Q-BaRA: at least as good as QLoRA at the same trainable parameters"),
    ("qahira", "qalora", "QA-HiRA: at least as good as QA-LoRA, still merges exactly"),
    ("qahira-ref", "qalora", "QA-HiRA (released code's reading) vs QA-LoRA"),
    ("peqa", "qalora", "PEQA vs QA-LoRA (both merge exactly into the INT base)"),
]
#: the cells compared pairwise: (task, category, metric); MMLU question-weighted, every task's acc, their mean
PAIRED_CELLS = [("mmlu", "avg", "acc_micro"), *((t, "", "acc") for t in COMMONSENSE_TASKS),
                ("commonsense_avg", "", "acc"), ("synthetic", "", "acc")]


def _pairs(methods: Iterable[str]) -> list[tuple[str, str, str]]:
    present = set(methods)
    out = [(a, b, claim) for a, b, claim in PAPER_PAIRS if a in present and b in present]
    seen = {(a, b) for a, b, _ in out}
    for a in sorted(present, key=_method_rank()):
        if a not in ("lora", "base") and "lora" in present and (a, "lora") not in seen:
            out.append((a, "lora", "vs 16-bit LoRA"))
        if a.startswith("peft-") and a.endswith("-nf4") and "qlora" in present:  # same NF4 base as QLoRA
            out.append((a, "qlora", "peft method vs QLoRA (the same NF4 base)"))
    return out


def paired_table(agg: pd.DataFrame) -> pd.DataFrame:
    """Method-vs-method differences on the same items (:func:`qftbench.stats.paired`), for the pairs of
    :data:`PAPER_PAIRS` and every method vs 16-bit LoRA: A in its own deployment mode, B in each mode it was
    evaluated in (so QA-LoRA meets both QLoRA 4+16 and "QLoRA w/ GPTQ"). Configurations pair by equal rank when
    both methods ran that rank, else every combination. ``verdict``: ``A > B`` / ``A < B`` when the 95% interval
    of the difference excludes 0 *and* the paired test gives p < :data:`ALPHA`, else ``inconclusive``. (On few
    items the percentile interval and the exact sign-flip test can disagree at the margin; a difference is only
    called when both agree.)"""
    cols = ["model", "data", "task", "shots", "metric", "A", "B", "A acc", "B acc", "A - B", "95% CI", "p",
            "n items", "seeds A/B", "verdict", "claim"]
    if agg.empty or "run_dirs" not in agg:
        return pd.DataFrame(columns=cols)
    a = agg[[(t, c, m) in set(PAIRED_CELLS) for t, c, m in zip(agg["task"], agg["category"], agg["metric"])]]
    # (.astype(bool): an empty object mask would select columns, leaving a frame without any)
    a = a[a["run_dirs"].map(bool).astype(bool)]
    if a.empty:  # no pairable cell (e.g. a sweep that evaluates only the validation split)
        return pd.DataFrame(columns=cols)
    deploy = {}
    for r in a.itertuples(index=False):  # a method's own deployment mode: the one that is not requant/base
        deploy.setdefault(r.method, set()).add(r.mode)

    def own(method, mode):
        modes = deploy.get(method, set())
        native = [m for m in modes if mode_family(m) not in ("requant",)]
        return mode in native if native else True

    # the learning rate in a label only where one method ran several (an lr grid)
    several_lr = {m for m, lrs in a.groupby("method")["lr"].agg(lambda x: x.dropna().nunique()).items()
                  if lrs > 1} if "lr" in a else set()

    def label(r):
        rank = "" if pd.isna(r.rank) or str(r.rank) in ("", "<NA>") else f" r{int(r.rank)}"
        lr = f" lr={fmt_lr(r.lr)}" if r.method in several_lr else ""
        return f"{r.method}{rank}{lr} [{r.mode}]"

    out = []
    for (model, data, task, shots, metric), grp in a.groupby(["model", "data", "task", "shots", "metric"],
                                                              dropna=False, sort=False):
        grp = grp[grp["category"].isin(["avg", ""])]
        for ma, mb, claim in _pairs(grp["method"].unique()):
            rows_a = [r for r in grp[grp["method"] == ma].itertuples(index=False) if own(ma, r.mode)]
            rows_b = list(grp[grp["method"] == mb].itertuples(index=False))
            ranks_a = {r.rank for r in rows_a if not pd.isna(r.rank)}
            ranks_b = {r.rank for r in rows_b if not pd.isna(r.rank)}
            same_rank = bool(ranks_a & ranks_b)
            for ra in rows_a:
                for rb in rows_b:
                    if same_rank and ra.rank != rb.rank:
                        continue
                    common = common_items(ra.run_dirs, ra.mode, rb.run_dirs, rb.mode, task, shots, ra.category,
                                          metric)
                    if common is None:
                        continue
                    ca, cb, keep = common
                    res = paired_on(common, key=(str(ra.config_id), str(ra.mode), str(rb.config_id),
                                                 str(rb.mode), str(task), int(shots), str(metric)))
                    verdict = (("A > B" if res.lo > 0 else "A < B") if res.distinguishable and res.p < ALPHA
                               else "inconclusive")
                    out.append({"model": model, "data": data, "task": task, "shots": shots, "metric": metric,
                                "A": label(ra), "B": label(rb),
                                "A acc": fmt_ci(ra.mean, ra.ci_lo, ra.ci_hi), "B acc": fmt_ci(rb.mean, rb.ci_lo,
                                                                                              rb.ci_hi),
                                "A - B": f"{100 * res.diff:+.1f}",
                                "95% CI": f"[{100 * res.lo:+.1f}, {100 * res.hi:+.1f}]",
                                "p": f"{res.p:.3g}", "n items": n_questions(ca, keep), "n facts": res.n_items,
                                "seeds A/B": f"{res.n_seeds_a}/{res.n_seeds_b}", "verdict": verdict,
                                "claim": claim})
    t = pd.DataFrame(out, columns=cols + ["n facts"])
    return t[with_n_facts(cols, t)]


#: the cells of the damage table, in column order: (task, category, metric, label); the first present one with
#: per-item records is the headline that the paired difference to the 16-bit model is computed on
DAMAGE_CELLS = [("commonsense_avg", "", "acc", "commonsense avg"),
                *((t, "", "acc", COMMONSENSE_LABELS[t]) for t in COMMONSENSE_TASKS),
                ("mmlu", "avg", "acc_micro", "MMLU"), ("synthetic", "", "acc", "synthetic")]
DAMAGE_COLUMNS = ["model", "data", "quant", "bits/param", "weight err. mean (%)", "weight err. max (%)"]
#: the perplexity task of the damage table (qftbench/tasks/qft_alpaca_ppl.yaml), its column label
DAMAGE_PPL = ("alpaca_ppl", "Alpaca ppl")
PPL_BOOT = 2000


def _ppl_docs(run_dirs, mode: str, task: str, shots) -> dict | None:
    """``{doc key: (log-likelihood, words)}`` of a perplexity task over a cell's runs (pooled), or None."""
    out = {}
    for rd in run_dirs or ():
        rec = ((run_items(rd, mode).get((task, int(shots))) or {}).get(task)) or {}
        if rec.get("loglikelihood") is None or rec.get("words") is None:
            return None
        for k, ll, w in zip(rec["key"], rec["loglikelihood"], rec["words"]):
            out[(rd, k)] = (ll, w)
    return out or None


def ppl_interval(docs: Mapping, key=()) -> tuple[float, float, float]:
    """Word perplexity ``exp(-sum ll / sum words)`` of the documents and its 95% bootstrap interval over
    documents (:data:`PPL_BOOT` resamples, seeded by ``key``)."""
    import numpy as np

    from . import stats

    ll = np.array([v[0] for v in docs.values()])
    w = np.array([v[1] for v in docs.values()], dtype=float)
    rng = np.random.default_rng(stats.seed_of("ppl", *key))
    idx = rng.integers(0, len(ll), size=(PPL_BOOT, len(ll)))
    boot = np.exp(-ll[idx].sum(1) / w[idx].sum(1))
    return float(np.exp(-ll.sum() / w.sum())), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def ppl_ratio(a: Mapping, b: Mapping, key=()) -> tuple[float, float, float, int] | None:
    """Paired ratio of word perplexities ``ppl(a) / ppl(b)`` on the documents both scored (by document key), with
    its 95% bootstrap interval over those documents, and their number. ``a`` and ``b`` are :func:`_ppl_docs`
    records keyed ``(run dir, document)``: a side with several runs (seeds) enters with each document's mean
    log-likelihood over its runs, so every document counts once on each side."""
    import numpy as np

    from . import stats

    def per_doc(d: Mapping) -> dict:
        acc: dict = {}
        for (_, k), (ll, w) in d.items():
            acc.setdefault(k, ([], w))[0].append(ll)
        return {k: (float(np.mean(lls)), w) for k, (lls, w) in acc.items()}

    ka, kb = per_doc(a), per_doc(b)
    common = sorted(set(ka) & set(kb), key=str)
    if not common:
        return None
    lla, llb = (np.array([d[k][0] for k in common]) for d in (ka, kb))
    w = np.array([ka[k][1] for k in common], dtype=float)
    rng = np.random.default_rng(stats.seed_of("ppl-ratio", *key))
    idx = rng.integers(0, len(common), size=(PPL_BOOT, len(common)))
    boot = np.exp(-(lla[idx].sum(1) - llb[idx].sum(1)) / w[idx].sum(1))
    return (float(np.exp(-(lla.sum() - llb.sum()) / w.sum())), float(np.quantile(boot, 0.025)),
            float(np.quantile(boot, 0.975)), len(common))


def damage_table(df: pd.DataFrame, agg: pd.DataFrame | None = None) -> pd.DataFrame:
    """Quantization damage: the un-tuned model (method ``base``) under each quantizer beside its 16-bit self.

    One row per (model, data, quantizer): ``quant`` (the base's label, e.g. ``int4-g32 rtn``, ``bnb-nf4-dq-b64``),
    deployed bits per parameter, the relative weight error ``||W - W_base||_F / ||W||_F`` over the target layers
    (mean and max, percent; recorded when the base was quantized), the accuracy of every evaluated cell of
    :data:`DAMAGE_CELLS` with its 95% interval, and the paired difference to the 16-bit model on the headline
    cell (the first of :data:`DAMAGE_CELLS` present): ``Δ vs 16-bit`` with its interval, p, n items and a
    verdict (``lossy``, ``better``, ``identical`` when every item scores the same, or ``inconclusive`` when the
    interval covers 0 or p >= :data:`ALPHA`).
    Where the runs scored held-out text (``qft_alpaca_ppl``): its word perplexity with a 95% bootstrap interval
    over documents, and the paired ratio to the 16-bit model's perplexity on the same documents (a more
    sensitive measure of damage than accuracy on a few hundred questions). Empty without a 16-bit ``base`` run
    beside a quantized one."""
    if df.empty:
        return pd.DataFrame(columns=DAMAGE_COLUMNS)
    agg = aggregate(df) if agg is None else agg
    b = agg[agg["method"] == "base"]
    if b.empty:
        return pd.DataFrame(columns=DAMAGE_COLUMNS)
    runs = df[df["method"] == "base"].drop_duplicates("config_id").set_index("config_id")
    out = []
    for (model, data), grp in b.groupby(["model", "data"], sort=False):
        if grp["config_id"].nunique() < 2:  # nothing to compare with
            continue
        cells = [c for c in DAMAGE_CELLS
                 if ((grp["task"] == c[0]) & (grp["category"] == c[1]) & (grp["metric"] == c[2])).any()]
        shots_of = {c: sorted({int(x) for x in grp[(grp["task"] == c[0]) & (grp["metric"] == c[2])]["shots"].dropna()})
                    for c in cells}
        cols = [(c, sh) for c in cells for sh in shots_of[c]]
        ref_ids = [cid for cid in grp["config_id"].unique() if runs.loc[cid, "quant"] == "16-bit"]
        ref = ref_ids[0] if ref_ids else None
        head = cols[0] if cols else None
        for cid in grp["config_id"].unique():
            r = runs.loc[cid]
            row = {"model": model, "data": data, "quant": r["quant"] or "?",
                   "bits/param": "" if pd.isna(r["bits_per_param"]) else f"{r['bits_per_param']:.3f}",
                   "weight err. mean (%)": "" if pd.isna(r["weight_error"]) else f"{100 * r['weight_error']:.2f}",
                   "weight err. max (%)": "" if pd.isna(r["weight_error_max"]) else f"{100 * r['weight_error_max']:.2f}"}
            for (task, cat, metric, label), sh in cols:
                name = label if len(shots_of[(task, cat, metric, label)]) == 1 else f"{label} ({sh}-shot)"
                c = grp[(grp["config_id"] == cid) & (grp["task"] == task) & (grp["category"] == cat)
                        & (grp["metric"] == metric) & (grp["shots"] == sh)]
                row[name] = fmt_ci(c.iloc[0]["mean"], c.iloc[0]["ci_lo"], c.iloc[0]["ci_hi"]) if len(c) else ""
            pt, plab = DAMAGE_PPL
            pc = grp[(grp["config_id"] == cid) & (grp["task"] == pt) & (grp["metric"] == "word_perplexity")]
            docs = _ppl_docs(pc.iloc[0]["run_dirs"], pc.iloc[0]["mode"], pt, pc.iloc[0]["shots"]) if len(pc) else None
            if docs:
                v, lo, hi = ppl_interval(docs, key=(str(cid),))
                row[f"{plab} [95% CI]"] = f"{v:.4g} [{lo:.4g}, {hi:.4g}]"
                row[f"{plab} ratio vs 16-bit"] = ""
                rc = grp[(grp["config_id"] == ref) & (grp["task"] == pt) & (grp["metric"] == "word_perplexity")] \
                    if ref is not None and cid != ref else grp.iloc[0:0]
                ref_docs = _ppl_docs(rc.iloc[0]["run_dirs"], rc.iloc[0]["mode"], pt, rc.iloc[0]["shots"]) \
                    if len(rc) else None
                ratio = ppl_ratio(docs, ref_docs, key=(str(cid), str(ref))) if ref_docs else None
                if ratio is not None:
                    row[f"{plab} ratio vs 16-bit"] = f"{ratio[0]:.4g} [{ratio[1]:.4g}, {ratio[2]:.4g}] (n={ratio[3]})"
            row.update({"Δ vs 16-bit": "", "95% CI": "", "p": "", "n items": "", "verdict": ""})
            if ref is not None and cid != ref and head is not None:
                (task, cat, metric, label), sh = head
                sel = (grp["task"] == task) & (grp["category"] == cat) & (grp["metric"] == metric) & (grp["shots"] == sh)
                ra, rb = grp[sel & (grp["config_id"] == cid)], grp[sel & (grp["config_id"] == ref)]
                common = common_items(ra.iloc[0]["run_dirs"], ra.iloc[0]["mode"], rb.iloc[0]["run_dirs"],
                                      rb.iloc[0]["mode"], task, sh, cat, metric) if len(ra) and len(rb) else None
                if common is not None:
                    res = paired_on(common, key=("damage", str(cid), str(ref), task, sh, metric))
                    row.update({
                        "Δ vs 16-bit": f"{100 * res.diff:+.1f} ({label})",
                        "95% CI": f"[{100 * res.lo:+.1f}, {100 * res.hi:+.1f}]", "p": f"{res.p:.3g}",
                        "n items": n_questions(common[0], common[2]),
                        "verdict": ("identical" if res.lo == res.hi == 0 else
                                    ("better" if res.lo > 0 else "lossy") if res.distinguishable
                                    and res.p < ALPHA else "inconclusive")})
            out.append(row)
    if not out:
        return pd.DataFrame(columns=DAMAGE_COLUMNS)
    t = pd.DataFrame(out)

    def order(q):
        q = str(q)
        if q == "16-bit":
            return (0, 0, q)
        bits = next((int(ch) for ch in q if ch.isdigit()), 9)
        return (1, -bits, q)

    t = t.iloc[sorted(range(len(t)), key=lambda i: (str(t.iloc[i]["model"]), str(t.iloc[i]["data"]),
                                                    order(t.iloc[i]["quant"])))].reset_index(drop=True)
    return t


#: the task the learning-rate rule reads (the synthetic validation split); never the test task ``synthetic``
LR_CHOICE_TASK = "synthetic_val"
#: runs that differ only in these keys' values are one configuration group of :func:`lr_choice_table`;
#: ``lr_group`` (the config hash without seeds and train.lr) keeps apart groups that differ in anything else
LR_GROUP_KEYS = ["model", "data", "method", "mode", "deploy_bits", "deploy_group_size", "rank", "alpha", "lr_group",
                 "shots"]
#: two mean accuracies (percent) closer than this are equal for the rule
LR_TIE_TOL = 1e-9
LR_CHOICE_COLUMNS = ["model", "data", "method", "mode", "bits", "group", "rank", "lr", "validation acc (%)",
                     "ci_lo", "ci_hi", "n items", "seeds", "chosen", "edge"]


def choose_lr(scores: Mapping[float, float]) -> float:
    """The learning-rate rule: of ``{lr: mean validation accuracy}``, the lr with the highest mean; equal means
    (within :data:`LR_TIE_TOL`) go to the smaller lr."""
    if not scores:
        raise ValueError("no learning rate to choose from")
    best = max(scores.values())
    return min(lr for lr, acc in scores.items() if acc >= best - LR_TIE_TOL)


def lr_choice_table(df: pd.DataFrame) -> pd.DataFrame:
    """The learning rate the rule picks for each configuration group, from the **validation** split only.

    A configuration group is the runs that differ only in ``train.lr`` and the seeds: same model, data,
    method, evaluation mode, bits, group size, rank, alpha and every other training setting (:data:`LR_GROUP_KEYS`).
    One row per (group, lr): ``validation acc (%)`` -- the mean over seeds of the accuracy on
    ``qft_synthetic_val`` (task ``synthetic_val``) --, its 95% interval over items and seeds (``ci_lo``,
    ``ci_hi``, from :func:`aggregate`; empty without per-item records), ``n items`` and ``seeds``, and
    ``chosen`` = ``yes`` on the lr the rule picks: the **highest mean validation accuracy; equal means go to
    the smaller lr** (:func:`choose_lr`); ``edge`` = ``top`` / ``bottom`` on a chosen lr at the end of the
    group's grid (a rate beyond it was not tried and might do better). No other task is read -- in particular never the test split
    ``synthetic`` --, so the choice cannot look at a test item. ``base`` (never trained) has no row. ``alpha``
    and ``shots`` are columns only where they vary, ``config`` (the group's hash) only where two groups would
    otherwise look the same."""
    empty = pd.DataFrame(columns=LR_CHOICE_COLUMNS)
    if df.empty or "lr_group" not in df or "lr" not in df:
        return empty
    v = df[(df["task"] == LR_CHOICE_TASK) & (df["metric"] == "acc") & (df["category"] == "")
           & (df["method"] != "base") & df["lr"].notna()]
    if v.empty:
        return empty
    agg = aggregate(v, keys=GROUP_KEYS + ["lr_group"])
    rows = []
    for _, grp in agg.groupby(LR_GROUP_KEYS, dropna=False, sort=False):
        scores = {float(r.lr): float(r.mean) for r in grp.itertuples(index=False)}
        chosen = choose_lr(scores)
        # a choice at the end of the grid: a rate beyond it might have done better (the grid may cut it short)
        edge = ("top" if chosen == max(scores) else "bottom" if chosen == min(scores) else "") \
            if len(scores) > 1 else ""
        for r in grp.itertuples(index=False):
            rows.append({"model": r.model, "data": r.data, "method": r.method, "mode": r.mode,
                         "deploy_bits": r.deploy_bits, "deploy_group_size": r.deploy_group_size, "rank": r.rank,
                         "alpha": r.alpha, "shots": r.shots, "config": r.lr_group, "lr": float(r.lr),
                         "validation acc (%)": float(r.mean), "ci_lo": r.ci_lo, "ci_hi": r.ci_hi,
                         "n items": r.n_items, "n facts": getattr(r, "n_units", r.n_items),
                         "seeds": int(r.n_seeds), "chosen": "yes" if float(r.lr) == chosen else "",
                         "edge": edge if float(r.lr) == chosen else ""})
    out = pd.DataFrame(rows)
    out = _sort_rows(out).rename(columns={"deploy_bits": "bits", "deploy_group_size": "group"})
    for c in ("group", "rank", "n items", "n facts"):
        out[c] = out[c].astype("Int64")
    shown = ["model", "data", "method", "mode", "bits", "group", "rank"]
    cols = with_n_facts(LR_CHOICE_COLUMNS[LR_CHOICE_COLUMNS.index("lr"):], out)
    for c in ("alpha", "shots"):
        if out[c].astype(str).nunique() > 1:
            shown.append(c)
    out["alpha"] = [f"{a:g}" if isinstance(a, float) and not math.isnan(a) else "" for a in out["alpha"]]
    if out.duplicated(shown + ["lr"]).any():
        shown.append("config")
    out["lr"] = [fmt_lr(x) for x in out["lr"]]
    return out[shown + cols].reset_index(drop=True)


def tables(df: pd.DataFrame, paper_csv: str | os.PathLike | None = None) -> dict[str, pd.DataFrame]:
    """The papers' tables from :func:`collect`'s frame.

    ``mmlu`` (question-weighted, ``acc_micro``) and ``mmlu_subject_avg`` (``acc_macro``): one row per
    model x method x mode x data x bits x group x rank (x lr where the learning rate varies), columns
    ``<k>-shot Hums./STEM/Social/Other/Avg.``; ``commonsense``: the seven tasks' acc and their plain mean;
    ``synthetic``: acc on qft_synthetic (and on qft_synthetic_val); ``lr_choice``: the learning rate chosen on
    the validation split (:func:`lr_choice_table`; only when some run evaluated qft_synthetic_val);
    ``efficiency``: accounting and training cost per configuration; ``paper_vs_reproduced``: see
    :func:`paper_vs_reproduced`. Cells are ``mean [lo, hi]`` (95% interval over items and seeds) where per-item
    records exist, else ``mean`` or ``mean ± std`` over seeds (percent, one decimal), and
    ``seeds`` counts the seeds. Tables with no data are left out; ``paper_vs_reproduced`` is left out when
    ``paper_csv`` is False.
    """
    agg = aggregate(df)
    out = {
        "mmlu": _mmlu_table(agg, "acc_micro"),
        "mmlu_subject_avg": _mmlu_table(agg, "acc_macro"),
        "commonsense": _commonsense_table(agg),
        "synthetic": _synthetic_table(agg),
        "lr_choice": lr_choice_table(df),
        "efficiency": _efficiency_table(df),
        "paired": paired_table(agg),
        "damage": damage_table(df, agg),
    }
    if paper_csv is not False:
        out["paper_vs_reproduced"] = paper_vs_reproduced(df, paper_csv)
    return {k: v for k, v in out.items() if len(v)}


# ------------------------------------------------------------------------------------------------ writing
def _cell(v) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return ""
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) >= 1000 else f"{v:.2f}"
    return str(v)


def display_frame(t: pd.DataFrame) -> pd.DataFrame:
    """Every cell as the string all three formats print (floats: 2 decimals; NA: empty)."""
    d = t.copy()
    for c in d.columns:
        d[c] = [_cell(v) for v in d[c].astype(object)]
    return d.astype(str)


def to_latex(d: pd.DataFrame, caption: str | None = None) -> str:
    """booktabs tabular of a display frame (``±`` as ``$\\pm$``)."""
    text = d.to_latex(index=False, escape=True, column_format="l" * len(d.columns), caption=caption)
    return text.replace("±", r"$\pm$")


def write_tables(tabs: Mapping[str, pd.DataFrame], out_dir: str | os.PathLike) -> list[Path]:
    """``<name>.csv``, ``<name>.md`` and ``<name>.tex`` for every table, all from one display frame, each
    written atomically. Returns the paths."""
    out = Path(out_dir)
    paths = []
    for name, t in tabs.items():
        d = display_frame(t)
        for suffix, text in (
                (".csv", d.to_csv(index=False)),
                (".md", d.to_markdown(index=False, disable_numparse=True) + "\n"),
                (".tex", to_latex(d))):
            p = out / f"{name}{suffix}"
            atomic_write(p, text)
            paths.append(p)
    return paths
