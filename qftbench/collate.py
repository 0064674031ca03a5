"""The workflow's collation step: tables and figures for exactly the runs of one sweep.

Every table and figure the DAG declares is written, also when the sweep has no data for it (a one-line table
or a figure saying so), so that Snakemake's outputs always exist and a second run has nothing to do.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from methods.atomic import atomic_write

from . import plots, report
from .sweep import FIGURES



def _placeholder_figure(path_stem: Path, text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    for ext in ("png", "pdf"):
        atomic_write(path_stem.with_suffix(f".{ext}"), lambda tmp: fig.savefig(tmp, format=ext))
    plt.close(fig)


TABLE_NOTES = {
    "mmlu": "MMLU accuracy (%), question-weighted average over the subjects of each category.",
    "mmlu_subject_avg": "MMLU accuracy (%), every subject weighted equally.",
    "commonsense": "Zero-shot accuracy (%) on the seven commonsense tasks and their plain mean.",
    "synthetic": "Accuracy (%) on the synthetic world's held-out test phrasings (and its validation split).",
    "efficiency": "Trainable parameters, FLOPs, deployed bits per parameter, training time and memory.",
    "paired": ("Method vs method on the same items: difference with its paired 95% interval, sign-flip p-value, "
               "verdict (A > B or A < B only when the interval excludes 0 and p < 0.05, else inconclusive)."),
    "paper_vs_reproduced": "Reproduced numbers beside the published ones.",
    "lr_choice": "Validation accuracy per learning rate and the rate the protocol chose.",
    "damage": ("The un-tuned model under each quantizer beside its 16-bit self: relative weight error, accuracy, "
               "the paired difference to 16 bits (lossy / better only when the interval excludes 0 and p < 0.05) "
               "and the perplexity on held-out text with its paired ratio to 16 bits."),
    "claims": ("The papers' claims at this scale: A - B on the same items with its paired 95% interval, and the "
               "verdict by the written rule of its kind (qftbench/claims.py): supported, contradicted or "
               "inconclusive."),
}
CELLS_NOTE = ("Accuracy cells: mean over seeds [95% interval over items and seeds]; the header gives n items, "
              "`seeds` the number of seeds.")


def runs_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Provenance of every reported run: code, packages, hardware, seeds and timings (from provenance.json)."""
    import json

    rows = []
    for run_id, run_dir in sorted(set(zip(df["run_id"], df["run_dir"]))):
        try:
            prov = json.loads((Path(run_dir) / "provenance.json").read_text())
        except (OSError, ValueError):
            prov = {}
        git, ver, hw = prov.get("git") or {}, prov.get("versions") or {}, prov.get("hardware") or {}
        cpu = hw.get("cpu") or {}
        rows.append({"run": run_id, "seed": prov.get("seed"),
                     "git commit": (git.get("commit") or "")[:10] + (" (dirty)" if git.get("dirty") else ""),
                     "torch": ver.get("torch"), "transformers": ver.get("transformers"),
                     "lm_eval": ver.get("lm_eval"), "peft": ver.get("peft"), "bitsandbytes": ver.get("bitsandbytes"),
                     "host": hw.get("host"), "cpu": cpu.get("model"), "torch cpu capability":
                         cpu.get("torch_cpu_capability"), "cuda": hw.get("cuda"),
                     "finetune s": round(prov["finetune_seconds"], 1) if prov.get("finetune_seconds") else None})
    return pd.DataFrame(rows)


def html_page(tabs: dict, runs: pd.DataFrame | None, name: str) -> str:
    """One self-contained HTML page with every table and the runs' provenance (for ``snakemake --report``);
    ``runs=None``: the tables only (the claims page)."""
    import html

    parts = [f"<html><head><meta charset='utf-8'><title>qftbench: {html.escape(name)}</title>"
             "<style>body{font-family:sans-serif;margin:1.5em} table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left} h2{margin-top:1.6em}"
             " .v-supported{background:#d9f2d9} .v-contradicted{background:#f7d4d4}"
             " .v-inconclusive{background:#eeeeee} nav a{margin-right:1em}</style></head><body>",
             f"<h1>qftbench sweep <code>{html.escape(name)}</code></h1><p>{html.escape(CELLS_NOTE)}</p>",
             "<nav>" + "".join(f"<a href='#{html.escape(t)}'>{html.escape(t)}</a>"
                               for t in [*tabs, *(["runs"] if runs is not None else [])]) + "</nav>"]
    for t, frame in tabs.items():
        parts.append(f"<h2 id='{html.escape(t)}'>{html.escape(t)}</h2>")
        if t in TABLE_NOTES:
            parts.append(f"<p>{html.escape(TABLE_NOTES[t])}</p>")
        table = report.display_frame(frame).to_html(index=False, escape=True, border=0)
        if t == "claims":  # colour each verdict cell (supported / contradicted / inconclusive)
            for v in ("supported", "contradicted", "inconclusive"):
                table = table.replace(f"<td>{v}</td>", f"<td class='v-{v}'>{v}</td>")
        parts.append(table)
    if runs is not None:
        parts.append("<h2 id='runs'>runs and provenance</h2>")
        parts.append(runs.to_html(index=False, escape=True, border=0, na_rep=""))
    parts.append("</body></html>")
    return "\n".join(parts)


def report_step(results: str | os.PathLike, run_ids: list[str], tables_dir: str | os.PathLike,
                figures_dir: str | os.PathLike, name: str = "sweep", expect: list[str] | None = None,
                claims: list | None = None) -> dict:
    df = report.collect(results)
    if len(df):
        df = df[df["run_id"].isin(set(run_ids))]
    tabs = report.tables(df) if len(df) else {}
    if claims:  # the sweep's claims (qftbench.claims), first in the report
        from .claims import claims_table

        tabs = {"claims": claims_table(df, report.aggregate(df) if len(df) else df, claims), **tabs}
    for t in expect or []:
        if t not in tabs:
            tabs[t] = pd.DataFrame({"note": [f"no {t} results in sweep {name!r}"]})
    Path(tables_dir).mkdir(parents=True, exist_ok=True)
    written = report.write_tables(tabs, tables_dir)
    index = Path(tables_dir) / "index.html"
    atomic_write(index, html_page(tabs, runs_frame(df) if len(df) else pd.DataFrame(), name))
    written.append(index)
    if "claims" in tabs:  # the claims table alone: the Claims entry of snakemake --report
        page = Path(tables_dir) / "claims.html"
        atomic_write(page, html_page({"claims": tabs["claims"]}, None, name))
        written.append(page)
    fig_dir = Path(figures_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    figs = plots.make_figures(df, fig_dir) if len(df) else []
    for f in FIGURES:
        if not (fig_dir / f"{f}.png").is_file() or not (fig_dir / f"{f}.pdf").is_file():
            _placeholder_figure(fig_dir / f, f"{f}: no data for this figure in sweep {name!r}")
    missing = [r for r in run_ids if len(df) == 0 or r not in set(df["run_id"])]
    return {"tables": [str(p) for p in written], "figures": [str(p) for p in figs], "runs": len(run_ids),
            "runs_without_results": missing}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m qftbench.collate",
                                 description="tables and figures of every finished run under a results folder")
    ap.add_argument("results", help="results folder (holding runs/)")
    ap.add_argument("out", help="output folder: long.csv, tables/, figures/")
    ap.add_argument("--paper-csv", default=None, help=f"published numbers (default: {report.PAPER_CSV})")
    ap.add_argument("--no-figures", action="store_true")
    a = ap.parse_args(argv)
    df = report.collect(a.results)
    out = Path(a.out)
    atomic_write(out / "long.csv", df.to_csv(index=False))
    paths = report.write_tables(report.tables(df, a.paper_csv), out / "tables")
    if not a.no_figures:
        paths += plots.make_figures(df, out / "figures")
    print(f"{df['run_id'].nunique()} finished runs, {len(df)} rows; wrote {len(paths)} files under {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
