"""Figures from :func:`qftbench.report.collect`'s long frame (PNG + PDF each, written atomically).

    from qftbench import report, plots
    plots.make_figures(report.collect("results"), "results/figures")

Accuracy figures use the sweep's main number (:func:`main_metric`): MMLU 5-shot question-weighted average if
present, else the plain mean of the seven commonsense tasks, else accuracy on qft_synthetic; every method in its
own deployment mode (QLoRA 4-bit base + 16-bit adapter, QA-LoRA merged INT4, LoRA fp16 merge, ...). Points are
means over seeds with their 95% interval over items and seeds as error bars (:mod:`qftbench.stats`); runs that
stored no per-item records get ± 1 std over seeds (none for a single seed).
"""
from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from methods.atomic import atomic_write  # noqa: E402

from . import report  # noqa: E402

_BARS = "95% interval over items and seeds (± 1 std over seeds for runs without per-item records)"


#: styles for methods without a plot_style of their own (peft's rows, a user's own method): stable per name, distinct from
#: the suite's colours, hollow-looking markers
_EXTRA_COLORS = ("#7f7f7f", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
                 "#e6550d", "#31a354")
_EXTRA_MARKERS = ("h", "<", ">", "8", "d", "H", "X", "1", "2", "3")


def method_label(method: str) -> str:
    """A method's legend name: its class's ``label`` (``QA-LoRA``), else the name as the tables write it (peft's
    rows, a method registered in another process)."""
    from methods.registry import find

    cls = find(method)
    return cls.display_label() if cls is not None else str(method)


def _style(method: str):
    """(colour, marker): the method class's ``plot_style``, else stable per name (crc32, not hash())."""
    from methods.registry import find

    style = getattr(find(method), "plot_style", None)
    if style:
        return tuple(style)
    import zlib

    h = zlib.crc32(method.encode())  # stable across processes (unlike hash())
    return _EXTRA_COLORS[h % len(_EXTRA_COLORS)], _EXTRA_MARKERS[(h // len(_EXTRA_COLORS)) % len(_EXTRA_MARKERS)]


def main_metric(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """``(rows, description)`` of the sweep's main accuracy, each method in its own deployment mode."""
    rows, desc, _ = _main_metric(df)
    return rows, desc


def _main_metric(df: pd.DataFrame) -> tuple[pd.DataFrame, str, str]:
    d = df[df["mode"] == df["deploy_mode"]] if "deploy_mode" in df else df
    candidates = [
        ((d["task"] == "mmlu") & (d["shots"] == 5) & (d["category"] == "avg") & (d["metric"] == "acc_micro"),
         "MMLU 5-shot accuracy (%, question-weighted avg of 57 subjects)", "MMLU 5-shot acc (%)"),
        ((d["task"] == "commonsense_avg") & (d["metric"] == "acc"),
         "commonsense accuracy (%, plain mean of 7 zero-shot tasks)", "commonsense mean acc (%)"),
        ((d["task"] == "synthetic") & (d["metric"] == "acc"), "accuracy on qft_synthetic (%, held-out facts)",
         "qft_synthetic acc (%)"),
    ]
    for mask, desc, short in candidates:
        rows = d[mask.fillna(False)]
        if len(rows):
            return rows, desc, short
    return d.iloc[:0], "", ""


def _per_config(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and the 95% interval over items and seeds (:func:`qftbench.report.aggregate`) of the accuracy,
    and the mean accounting, per configuration. ``err_lo``/``err_hi``: the error bar below/above the mean (the
    interval where the runs stored per-item records, else ± 1 std over seeds, else none)."""
    keys = ["model", "data", "method", "mode", "deploy_bits", "deploy_group_size", "rank", "alpha", "config_id",
            "quant"]
    r = rows.copy()
    if "quant" not in r:
        r["quant"] = None
    r[keys] = r[keys].astype(object).where(r[keys].notna(), "")
    agg = report.aggregate(r, keys=keys + ["task", "shots", "category", "metric"])
    out = agg.groupby(keys, sort=True)[["mean", "std", "ci_lo", "ci_hi", "n_seeds"]].first()
    g = r.groupby(keys, sort=True)
    for c in ("trainable_params", "train_flops_total"):
        out[c] = g[c].agg(lambda s: s.astype("float64").mean())
    out = out.reset_index()
    has_ci = out["ci_lo"].notna() & out["ci_hi"].notna()
    out["err_lo"] = np.where(has_ci, out["mean"] - out["ci_lo"], out["std"])
    out["err_hi"] = np.where(has_ci, out["ci_hi"] - out["mean"], out["std"])
    return out


def _series_label(row, multi_bits: bool) -> str:
    lab = method_label(row.method)
    if multi_bits and row.method not in ("lora",):
        g = f" g{int(row.deploy_group_size)}" if str(row.deploy_group_size) not in ("", "<NA>") else ""
        lab += f" ({row.deploy_bits}-bit{g})"
    return lab


FILLSTYLES = ("full", "none", "left", "bottom", "right", "top")


def _fills(conf: pd.DataFrame, multi_bits: bool) -> dict[str, str]:
    """Series label -> marker fill: one method's several settings (QA-LoRA at 4, 3 and 2 bits) share its colour
    and marker, so each gets its own fill (full, open, half) and the legend tells them apart."""
    out: dict[str, str] = {}
    for _, g in conf.groupby("method", sort=True):
        labels = sorted({_series_label(r, multi_bits) for r in g.itertuples(index=False)})
        out.update({lab: FILLSTYLES[i % len(FILLSTYLES)] for i, lab in enumerate(labels)})
    return out


def _facets(conf: pd.DataFrame):
    combos = sorted({(m, d) for m, d in zip(conf["model"], conf["data"])})
    return [(m, d, conf[(conf["model"] == m) & (conf["data"] == d)]) for m, d in combos]


def _grid(n: int, width: float = 6.0, height: float = 4.4):
    ncols = min(n, 3)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(width * ncols, 7.5), height * nrows + 0.9), squeeze=False,
                             layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext, kw in (("png", {"dpi": 150}), ("pdf", {})):
        paths.append(atomic_write(out_dir / f"{name}.{ext}",
                                  lambda tmp: fig.savefig(tmp, format=ext, bbox_inches="tight", **kw)))
    plt.close(fig)
    return paths


def base_label(r) -> str:
    """The un-tuned model's legend entry, with its quantizer where it has one (two 4-bit bases, e.g. FP4 and INT4
    g64, are told apart): ``base (un-tuned, 16-bit)``, ``base (un-tuned, int4-g64 rtn)``."""
    quant = str(getattr(r, "quant", "") or "")
    return f"base (un-tuned, {quant})" if quant and str(r.deploy_bits) != "16" else \
        f"base (un-tuned, {r.deploy_bits}-bit)"


def _flat_refs(ax, sub: pd.DataFrame, skip) -> None:
    """Configurations with no x value (the un-tuned base, PEQA without rank): horizontal reference lines."""
    dashes = [(5, 2), (2, 2), (8, 2, 2, 2), (1, 1), (6, 3, 1, 3)]  # one dash pattern per un-tuned base
    for i, r in enumerate(sub[skip].itertuples(index=False)):
        color, _ = _style(r.method)
        ax.axhline(r.mean, color=color, lw=1.2, **({"dashes": dashes[i % len(dashes)]} if r.method == "base"
                                                  else {"ls": ":"}),
                   label=base_label(r) if r.method == "base" else method_label(r.method))
        if not pd.isna(r.err_lo):
            ax.axhspan(r.mean - r.err_lo, r.mean + r.err_hi, color=color, alpha=0.08)


def _scatter_figure(conf: pd.DataFrame, desc: str, short: str, x: str, xlabel: str, title: str, out_dir: Path, name: str):
    facets = _facets(conf)
    fig, axes = _grid(len(facets))
    multi_bits = conf.groupby("method")["deploy_bits"].nunique().max() > 1
    for ax, (model, data, sub) in zip(axes, facets):
        xs = pd.to_numeric(sub[x], errors="coerce")
        has_x = (xs > 0).to_numpy()
        seen = set()
        # configurations at the same x (same trainable parameters): dodged side by side, 1.5% apart on the log
        # axis, so that their error bars do not hide each other; the x value each stands for is unchanged
        same_x: dict[float, int] = {}
        fills = _fills(sub[has_x], multi_bits)
        for r, xv in zip(sub[has_x].itertuples(index=False), xs[has_x]):
            k = same_x[float(xv)] = same_x.get(float(xv), -1) + 1
            xv = float(xv) * 1.015 ** k
            color, marker = _style(r.method)
            lab = _series_label(r, multi_bits)
            ax.errorbar(xv, r.mean, yerr=None if pd.isna(r.err_lo) else [[r.err_lo], [r.err_hi]], fmt=marker,
                        color=color, ms=7, fillstyle=fills[lab], mfc="white" if fills[lab] == "none" else color,
                        capsize=3, label=None if lab in seen else lab)
            seen.add(lab)
            if str(r.rank) not in ("", "<NA>"):
                ax.annotate(f"r{int(r.rank)}", (xv, r.mean), textcoords="offset points", xytext=(5, 4), fontsize=8,
                            color=color)
        _flat_refs(ax, sub, ~has_x)
        if has_x.any():
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(short)
        ax.set_title(f"model: {model}, fine-tuned on: {data}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{title}\n{desc}\neach method in its own deployment mode; mean over seeds, bars: {_BARS}", fontsize=11)
    return _save(fig, out_dir, name)


def _rank_figure(conf: pd.DataFrame, desc: str, short: str, out_dir: Path):
    facets = _facets(conf)
    fig, axes = _grid(len(facets))
    multi_bits = conf.groupby("method")["deploy_bits"].nunique().max() > 1
    for ax, (model, data, sub) in zip(axes, facets):
        ranked = sub["rank"].astype(str).isin(["", "<NA>"]).to_numpy() == False  # noqa: E712
        s = sub[ranked].copy()
        s["rank_f"] = s["rank"].astype(float)
        s["series"] = [_series_label(r, multi_bits) for r in s.itertuples(index=False)]
        fills = _fills(s, multi_bits)
        for lab, line in s.groupby("series", sort=False):
            line = line.sort_values("rank_f")
            color, marker = _style(line["method"].iloc[0])
            err = None if line["err_lo"].isna().all() else [line["err_lo"].fillna(0), line["err_hi"].fillna(0)]
            ax.errorbar(line["rank_f"], line["mean"], yerr=err, fmt=f"-{marker}", color=color, capsize=3, ms=6,
                        fillstyle=fills[lab], mfc="white" if fills[lab] == "none" else color, label=lab)
        _flat_refs(ax, sub, ~ranked)
        ranks = sorted(s["rank_f"].unique())
        if ranks:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ranks)
            ax.set_xticklabels([str(int(r)) for r in ranks])
        ax.set_xlabel("adapter rank r")
        ax.set_ylabel(short)
        ax.set_title(f"model: {model}, fine-tuned on: {data}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Accuracy vs adapter rank\n{desc}\neach method in its own deployment mode; "
                 f"mean over seeds, bars: {_BARS}", fontsize=11)
    return _save(fig, out_dir, "acc_vs_rank")


def _loss_figure(df: pd.DataFrame, out_dir: Path):
    runs = df.drop_duplicates("run_id")
    runs = runs[runs["method"] != "base"]
    logs = []
    for r in runs.itertuples(index=False):
        log = report.read_train_log(Path(r.run_dir) / "train_log.jsonl")
        if len(log):
            logs.append(log[["step", "loss"]].assign(run_id=r.run_id, method=r.method, model=r.model, data=r.data,
                                                     rank=r.rank, bits=r.bits, group_size=r.group_size,
                                                     config_id=r.config_id, seed=r.seed))
    if not logs:
        return []
    L = pd.concat(logs, ignore_index=True)
    L["rank_s"] = L["rank"].map(lambda v: "" if pd.isna(v) else f"rank {int(v)}")
    panel_by = "rank_s" if L["rank_s"].nunique() > 1 else ("model" if L["model"].nunique() > 1 else "data")
    panels = sorted(L[panel_by].unique(), key=lambda v: (len(str(v)), str(v)))
    fig, axes = _grid(len(panels), width=5.5, height=4.0)
    multi_bits = L.groupby("method")["bits"].nunique().max() > 1
    for ax, pv in zip(axes, panels):
        sub = L[L[panel_by] == pv]
        for (method, bits, cid), cur in sub.groupby(["method", "bits", "config_id"], sort=False):
            color, _ = _style(method)
            stats = cur.groupby("step")["loss"].agg(["mean", "std", "count"]).reset_index()
            lab = method_label(method) + (f" ({bits}-bit)" if multi_bits else "")
            n = cur["seed"].nunique()
            if sub[sub["method"] == method]["config_id"].nunique() > 1:
                lab += f" [{cid}]"
            ax.plot(stats["step"], stats["mean"], color=color, lw=1.5, label=lab + (f", {n} seeds" if n > 1 else ""),
                    marker="o" if len(stats) < 20 else None, ms=3)
            band = stats["std"].where(stats["count"] > 1)
            if band.notna().any():
                ax.fill_between(stats["step"], stats["mean"] - band, stats["mean"] + band, color=color, alpha=0.15)
        models = ", ".join(sorted(sub["model"].unique()))
        datas = ", ".join(sorted(sub["data"].unique()))
        ranks = ", ".join(sorted(x for x in sub["rank_s"].unique() if x)) or "no rank"
        ax.set_title(f"{ranks}; model: {models}; data: {datas}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("training loss (token cross-entropy)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("Training loss per optimizer step (mean over seeds, band: ± 1 std)", fontsize=11)
    return _save(fig, out_dir, "loss_curves")


def make_figures(df: pd.DataFrame, out_dir: str | os.PathLike) -> list[Path]:
    """acc_vs_params, acc_vs_flops, acc_vs_rank and loss_curves (each .png and .pdf) under ``out_dir``;
    figures without data are skipped. Returns the paths written."""
    out = Path(out_dir)
    paths: list[Path] = []
    if df.empty:
        return paths
    rows, desc, short = _main_metric(df)
    if len(rows):
        conf = _per_config(rows)
        paths += _scatter_figure(conf, desc, short, "trainable_params", "trainable parameters (log scale)",
                                 "Accuracy vs trainable parameters", out, "acc_vs_params")
        paths += _scatter_figure(conf, desc, short, "train_flops_total", "total training FLOPs (log scale)",
                                 "Accuracy vs training compute", out, "acc_vs_flops")
        paths += _rank_figure(conf, desc, short, out)
    paths += _loss_figure(df, out)
    return paths


__all__ = ["main_metric", "make_figures"]
