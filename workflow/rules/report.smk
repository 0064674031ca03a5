# Collation: tables (CSV, Markdown, LaTeX from one DataFrame each) and figures (PNG, PDF); and the sweep's
# table of runs, written before any run starts.


rule runs_table:
    # which run is which: id, model, method, rank, bits, group, data, lr, seed, base folder (qftbench.sweep.runs_table)
    output:
        f"{OUT['tables']}/runs.tsv",
    params:
        text=RUNS_TSV,
    log:
        f"{RESULTS}/logs/runs_table/{SWEEP.get('name', 'sweep')}.log",
    localrule: True
    run:
        atomic_write(output[0], params.text)
        atomic_write(log[0], f"{len(RUNS)} runs -> {output[0]}\n")


rule report:
    input:
        evals=[job.path for job in EVALS.values()],
        trained=[f"{RESULTS}/runs/{rid}/train.json" for rid in RUNS],
    output:
        tables=[f"{OUT['tables']}/{t}.{ext}" for t in TABLES for ext in ("csv", "md", "tex")]
        # the claims table as its own page: the report shows an HTML result inline (a CSV only as a download)
        + (
            [report(f"{OUT['tables']}/claims.html", caption="../report/claims.rst", category="Claims")]
            if "claims" in TABLES
            else []
        ),
        figures=[
            report(f"{OUT['figures']}/{f}.png", caption="../report/figure.rst", category="Figures")
            if ext == "png" else f"{OUT['figures']}/{f}.{ext}"
            for f in FIGURES for ext in ("png", "pdf")
        ],
        html=report(f"{OUT['tables']}/index.html", caption="../report/tables.rst", category="Tables"),
    params:
        py=PY,
        runs=lambda w: ",".join(sorted(RUNS)),
        name=SWEEP.get("name", "sweep"),
        results=lambda w, input: str(Path(input.trained[0]).parents[2]),  # <results>/runs/<run>/train.json
        tables=lambda w, output: str(Path(output.tables[0]).parent),
        figures=lambda w, output: str(Path(output.figures[0]).parent),
        expect=TABLES_ARG,
        claims=json.dumps(SWEEP.get("claims") or []),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        gpu=0,
        cpus_per_task=1,
    log:
        f"{RESULTS}/logs/report/{SWEEP.get('name', 'sweep')}.log",
    benchmark:
        f"{RESULTS}/benchmarks/report/{SWEEP.get('name', 'sweep')}.tsv"
    shell:
        "{params.py} -m qftbench.cli report --results {params.results:q} --runs {params.runs:q} --tables {params.tables:q} "
        "--figures {params.figures:q} --name {params.name:q} --expect {params.expect:q} --claims {params.claims:q} "
        "> {log:q} 2>&1"
