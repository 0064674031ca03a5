"""The workflow's collation step: tables and figures for exactly the runs of one sweep.

Every table and figure the DAG declares is written, also when the sweep has no data for it (a one-line table
or a figure saying so), so that Snakemake's outputs always exist and a second run has nothing to do.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from . import plots, report

FIGURES = ("acc_vs_params", "acc_vs_flops", "acc_vs_rank", "loss_curves")


def _placeholder_figure(path_stem: Path, text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    for ext in ("png", "pdf"):
        tmp = path_stem.with_name(f".{path_stem.name}.tmp.{ext}")
        fig.savefig(tmp, format=ext)
        os.replace(tmp, path_stem.with_suffix(f".{ext}"))
    plt.close(fig)


def report_step(results: str | os.PathLike, run_ids: list[str], tables_dir: str | os.PathLike,
                figures_dir: str | os.PathLike, name: str = "sweep", expect: list[str] | None = None) -> dict:
    df = report.collect(results)
    if len(df):
        df = df[df["run_id"].isin(set(run_ids))]
    tabs = report.tables(df) if len(df) else {}
    for t in expect or []:
        if t not in tabs:
            tabs[t] = pd.DataFrame({"note": [f"no {t} results in sweep {name!r}"]})
    Path(tables_dir).mkdir(parents=True, exist_ok=True)
    written = report.write_tables(tabs, tables_dir)
    fig_dir = Path(figures_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    figs = plots.make_figures(df, fig_dir) if len(df) else []
    for f in FIGURES:
        if not (fig_dir / f"{f}.png").is_file() or not (fig_dir / f"{f}.pdf").is_file():
            _placeholder_figure(fig_dir / f, f"{f}: no data for this figure in sweep {name!r}")
    missing = [r for r in run_ids if len(df) == 0 or r not in set(df["run_id"])]
    return {"tables": [str(p) for p in written], "figures": [str(p) for p in figs], "runs": len(run_ids),
            "runs_without_results": missing}
