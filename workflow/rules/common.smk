# Sweep expansion and lookups shared by the rules. No rule lives here.
#
# The sweep config is validated here, when the Snakefile is parsed, before any job: qftbench.sweep.specs checks
# it against workflow/schemas/sweep.schema.yaml and every run it expands to against config.schema.yaml (with
# did-you-mean messages that name the field, the value and the fix). workflow/schemas/ is a link to
# qftbench/schemas/, where the library (qftbench validate, every step) reads the same files.
import json
import sys
from pathlib import Path

import qftbench.config  # (not `from qftbench import config`: Snakemake's own `config` is the sweep given)
from methods.atomic import atomic_write
from qftbench import pipeline, sweep

PY = sys.executable  # the environment that runs snakemake runs every step (also inside SLURM jobs)

if config.get("models"):  # --configfile config/paper.yaml
    SWEEP = dict(config)
    SWEEP_SOURCE = "--configfile"
else:  # default, or --config sweep=path
    SWEEP_SOURCE = config.get("sweep", "config/default.yaml")
    if not Path(SWEEP_SOURCE).is_file() and (Path(workflow.basedir) / SWEEP_SOURCE).is_file():
        SWEEP_SOURCE = str(Path(workflow.basedir) / SWEEP_SOURCE)  # the repo's config/, from any --directory
    SWEEP = sweep.load(SWEEP_SOURCE)
    if config.get("preset"):  # --config preset=NAME also for the embedded default (e.g. preset=fp32)
        SWEEP["preset"] = config["preset"]
SWEEP = {k: v for k, v in SWEEP.items() if k != "sweep"}

# one RunSpec per run (qftbench/spec.py): resolved and validated once, its Method built once, with its run id, base
# and evaluation jobs; raises a ConfigError (with the fix) before any job
SPECS = sweep.specs(SWEEP, where=str(SWEEP_SOURCE))
RUNS = {rid: s.config for rid, s in SPECS.items()}  # the resolved run configs
if not RUNS:
    raise ValueError(f"{SWEEP_SOURCE}: the sweep has no runs")
RESULTS = {str(pipeline.results_dir(c)) for c in RUNS.values()}
if len(RESULTS) != 1:
    raise ValueError(f"{SWEEP_SOURCE}: every run must use the same paths.results (got {sorted(RESULTS)})")
RESULTS = RESULTS.pop()
OUT = {"tables": f"{RESULTS}/tables", "figures": "figures", **SWEEP.get("outputs", {})}
RES = {rid: sweep.resources(SWEEP, cfg) for rid, cfg in RUNS.items()}
for _m in sweep.memory_fit(SWEEP, RUNS, where=str(SWEEP_SOURCE)):  # a warning: resources.gpu_mem_gib is a guess
    if not _m["fits"]:
        print(f"qftbench WARNING: {_m['model']}: {_m['weights_gib']:.1f} GiB of {_m['dtype']} weights do not fit "
              f"on {_m['gpus']} x {_m['gpu_mem_gib']:g} GiB GPUs; its jobs will stop when loading. Fix: "
              f"{_m['fix']}.", file=sys.stderr)

_slow = sweep.emulated_half(RUNS)  # bf16/fp16 on a CPU that only emulates it: a warning with the fix, before any job
if _slow:
    print(f"qftbench WARNING: {len(_slow)} runs compute in bf16/fp16, but this CPU has no native bf16 (no AVX512-BF16 "
          f"or AMX) and there is no GPU: torch emulates it, about 20x slower than float32 (78 s vs 4 s per step "
          f"measured on an AVX2 machine). Fix: add --config preset=fp32 (the shipped CPU sweeps define it; results "
          f"then differ from bf16 ones in the low bits and get other run ids).", file=sys.stderr)

EVALS = {(rid, job.mode, job.key): job for rid, s in SPECS.items() for job in s.evals}  # -> qftbench.spec.EvalJob
BASES = {}  # base folder name -> a run that builds it
for _rid, _spec in SPECS.items():
    BASES.setdefault(_spec.base_id, _rid)
BASE_OF = {rid: s.base_id for rid, s in SPECS.items()}

TABLES = sweep.expected_tables(SWEEP, RUNS)
TABLES_ARG = ",".join(TABLES)
FIGURES = sweep.FIGURES
RUNS_TSV = sweep.runs_table(SPECS)


wildcard_constraints:
    run="[^/]+",
    base="[^/]+",
    mode="[^/]+",
    group="[^/]+",


# every job's params: its config without the settings added at the value runs already had
# (qftbench.config.job_view), so that upgrading the suite does not make Snakemake rerun (and delete) what a
# results folder holds
def training_json(rid):
    return json.dumps(qftbench.config.job_view(sweep.training_view(RUNS[rid])), sort_keys=True)


def base_json(base):
    """The quantize_base job's config: the base's spec alone (qftbench.pipeline.base_spec), so that the job has
    the same params in every sweep that shares the base, whichever run claimed it."""
    return json.dumps(qftbench.config.job_view(pipeline.base_spec(RUNS[BASES[base]])), sort_keys=True)


def full_json(rid):
    return json.dumps(qftbench.config.job_view(RUNS[rid]), sort_keys=True)


def res(rid, key, default=None):
    return RES[rid].get(key, default)


def all_targets():
    return (
        [f"{OUT['tables']}/{t}.{ext}" for t in TABLES for ext in ("csv", "md", "tex")]
        + [f"{OUT['tables']}/index.html", f"{OUT['tables']}/runs.tsv"]
        + ([f"{OUT['tables']}/claims.html"] if "claims" in TABLES else [])
        + [f"{OUT['figures']}/{f}.{ext}" for f in FIGURES for ext in ("png", "pdf")]
    )
