"""Sweep configs: a grid of runs (models x data x methods x hyperparameter grid x seeds) for the Snakemake DAG.

A sweep config (``config/default.yaml``, ``config/paper.yaml``, ...) has these keys::

    name: default                 # labels tables/figures
    models:    [smollm2-135m]     # names, or {name, label, dtype, resources} entries
    data:      {synthetic: {source: synthetic}}          # label -> run-config data section
    methods:   [{name: qlora}, {name: qalora, bits: [4, 3, 2]}]   # a list value is a grid axis
               # an entry may also carry models: [labels], data: [labels] and seeds: [..] (a subset of the
               # sweep's seeds: e.g. {name: base, seeds: [0]}, the un-tuned pretrained model evaluated once),
               # and train: {...}, run-config settings of this entry's runs only (e.g. the learning rate of one
               # of several peft entries, which overrides.method, keyed by method name, cannot tell apart)
    grid:      {rank: [8, 16], train.lr: [5.0e-4, 2.0e-3]}   # crossed with every method that has it
    seeds:     [0]
    run:       {train: ..., eval: ..., calibration: ..., paths: ...}   # defaults of every run config
    overrides: {method: {qalora: {train: {lr: 2.0e-5}}}, model: {llama-33b: {train: {lr: 1.0e-4}}},
                match: [{when: {method: [qalora], model: [llama-33b, llama-65b]}, set: {train: {lr: 1.0e-5}}}]}
    presets:   {paper: [{when: {method: [qalora]}, set: {train: {lr: 2.0e-5}}}],     # named rule lists, the
                released-code: [{when: {method: [qalora]}, set: {train: {lr: 2.0e-4}}}]}   # shape of overrides.match
    preset:    paper              # the preset of every method entry without its own `preset:`
    resources: {default: {...}, models: {llama-65b: {gpu: 2, ...}}}
    outputs:   {tables: results/tables, figures: figures}
    plugins:   [my_methods/mine.py]   # modules (or .py files) that register methods of one's own, imported by
                                      # every job and the report (methods.load_plugins; README "Adding a method")

Presets hold the settings on which a paper and its released code disagree (config/paper.yaml,
docs/SETTINGS.md): a run takes its rules last, after ``overrides`` (so a preset's value is the one that runs),
from the entry's own ``preset:`` or else the sweep's. ``snakemake --configfile config/paper.yaml --config
preset=released-code`` (or ``qftbench plan --preset released-code``) switches the whole grid. The preset of
each run is recorded in its ``sweep`` section; runs whose settings come out equal under two presets are the same
run (one id).

:func:`expand` turns it into ``{run_id: resolved run config}``, each validated by :func:`qftbench.config.resolve`
before any job starts; every error names the sweep key, the run and the fix.

``grid`` axes. A plain key (``rank``, ``alpha``, ``bits``, ...) is a method hyperparameter: it is crossed with
every method that has it and does not set it itself. A dotted key ``<section>.<key>`` is a run-config setting
of a training section (``train.lr``, ``train.max_steps``, ``calibration.n_samples``, ...; see :data:`RUN_AXES`):
it is crossed with every run, except that ``train.*`` axes are not crossed with ``base`` (the un-tuned model is
never fine-tuned, so it keeps ``run.train``). Its value replaces ``run.<section>.<key>``. Precedence: a grid
axis is never overridden silently -- when ``overrides.method``, ``overrides.model`` or a matching
``overrides.match`` rule sets the same ``<section>.<key>`` for a run the axis applies to, :func:`expand` raises
a :class:`ConfigError` naming both (a researcher who sweeps the learning rate expects every run to train at the
grid's values; per-method rates belong in a sweep without the axis). Sweeps without dotted axes expand exactly
as before (same runs, same run ids).
"""
from __future__ import annotations

import copy
import itertools
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import jsonschema
import yaml

import math

from methods.errors import ConfigError, did_you_mean

from . import config, spec
from .spec import RunSpec

#: the sweep config's schema (qftbench/schemas/sweep.schema.yaml; workflow/schemas/ links to it)
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "sweep.schema.yaml"
SCHEMA: dict = yaml.safe_load(SCHEMA_PATH.read_text())
#: a job's resource keys and their types (the schema's $defs.resources)
RESOURCE_KEYS = {k: int if p["type"] == "integer" else str
                 for k, p in SCHEMA["$defs"]["resources"]["properties"].items()}
DEFAULT_RESOURCES = {"mem_mb": 8000, "runtime": 60, "gpu": 0, "cpus": 1, "threads": 1}


def _explain(err: jsonschema.ValidationError, where: str) -> str:
    path = ".".join(str(p) for p in err.absolute_path) or "(top level)"
    if err.validator == "additionalProperties":
        node = SCHEMA
        for p in err.absolute_path:
            node = node.get("properties", {}).get(p, node.get("additionalProperties", {})) if isinstance(p, str) \
                else node.get("items", {})
        allowed = node.get("properties", {})
        extra = [k for k in err.instance if k not in allowed]
        k = extra[0] if extra else "?"
        return (f"{where}: unknown key {k!r} in {path}.{did_you_mean(k, allowed)} "
                f"Allowed: {', '.join(sorted(allowed))}.")
    if err.validator == "anyOf" and isinstance(err.instance, dict):
        allowed = {"name", "label", "dtype", "resources"}
        extra = [k for k in err.instance if k not in allowed]
        if extra:
            return (f"{where}: unknown key {extra[0]!r} in {path}.{did_you_mean(extra[0], allowed)} "
                    f"Allowed: {', '.join(sorted(allowed))}.")
    return f"{where}: {path}: {err.message}."


def load(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep config {p} does not exist.")
    raw = yaml.safe_load(p.read_text()) or {}
    if overrides:
        raw = config._merge(raw, overrides)
    return raw


def _model_entries(sweep: dict) -> list[dict]:
    out = []
    for m in sweep["models"]:
        m = {"name": m} if isinstance(m, str) else dict(m)
        m.setdefault("label", Path(m["name"]).name)
        out.append(m)
    return out


#: sections whose settings a dotted ``grid`` key may sweep: the training-relevant sections (they enter the run id;
#: an axis over eval.* or paths.* would give several runs the same id). data comes from ``data:``, the seed from
#: ``seeds:``, the model and method from ``models:``/``methods:``.
RUN_AXES = ("train", "calibration")


def _run_axes(grid: dict, where: str) -> dict[tuple[str, str], list]:
    """``{(section, key): values}`` of the grid's dotted keys, each checked against the run-config schema."""
    out = {}
    for name, values in grid.items():
        if "." not in name:
            continue
        section, _, key = name.partition(".")
        if section not in RUN_AXES:
            if section in config.SCHEMA["properties"]:
                why = {"eval": "evaluation settings do not change the run, so every value would map to the same "
                               "run id; put one value in run.eval, or use one sweep per setting",
                       "paths": "paths do not change the run; set them in run.paths",
                       "data": "the data are a sweep axis of their own; add entries to data:",
                       "model": "the models are a sweep axis of their own; list them in models:",
                       "method": "method hyperparameters are plain grid keys (grid: {rank: [8, 16]})",
                       "seed": "the seeds are a sweep axis of their own; list them in seeds:"}.get(section, "")
                raise ConfigError(f"{where}: grid.{name}: {section}.* is not a grid axis ({why}). Run-config "
                                  f"axes may be in: {', '.join(RUN_AXES)}.")
            raise ConfigError(f"{where}: unknown section {section!r} in grid key {name!r}."
                              f"{did_you_mean(section, RUN_AXES)} A dotted grid key is <section>.<key> with "
                              f"<section> one of {', '.join(RUN_AXES)} (e.g. train.lr).")
        allowed = config.SCHEMA["properties"][section]["properties"]
        if "." in key or key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r} in grid key {name!r}.{did_you_mean(key, allowed)} "
                              f"Allowed keys in {section}: {', '.join(sorted(allowed))}.")
        seen = set()
        for v in values:
            marker = repr(v)
            if marker in seen:
                raise ConfigError(f"{where}: grid.{name} lists {v!r} twice; remove the duplicate (each value is "
                                  f"one run per method, model, data and seed).")
            seen.add(marker)
        out[(section, key)] = list(values)
    return out


def _sets(node: dict | None, section: str, key: str) -> bool:
    return isinstance(node, dict) and isinstance(node.get(section), dict) and key in node[section]


#: keys of a method entry that are not method hyperparameters (where, at which seeds, and run settings of its runs)
ENTRY_KEYS = ("models", "data", "seeds", "train", "preset")


def _method_variants(entry: dict, grid: dict, where: str) -> list[dict]:
    import methods

    try:
        cls = methods.get(entry["name"])
    except ConfigError as e:
        raise ConfigError(f"{where}: methods: {e}") from None
    entry = {k: v for k, v in entry.items() if k not in ENTRY_KEYS}
    axes = {k: v for k, v in entry.items() if k != "name" and isinstance(v, list) and k != "targets"}
    fixed = {k: v for k, v in entry.items() if k not in axes}
    for k, values in grid.items():
        if k in cls.hyperparameters and k not in entry and k not in cls.not_grid_axes:
            axes[k] = values
    keys = sorted(axes)
    return [{**fixed, **dict(zip(keys, combo))} for combo in itertools.product(*(axes[k] for k in keys))]


def expand(sweep: dict, where: str = "sweep") -> dict[str, dict]:
    """``{run_id: resolved run config}`` for every run of the sweep, each validated."""
    return {rid: cfg for rid, (cfg, _) in _expand(sweep, where).items()}


def specs(sweep: dict, where: str = "sweep") -> dict[str, RunSpec]:
    """``{run_id: RunSpec}`` for every run of the sweep (:mod:`qftbench.spec`): each run resolved and validated
    once, its Method built once, with its base and its evaluation jobs. What the Snakefile reads its jobs from."""
    return {rid: spec.from_config(cfg, method) for rid, (cfg, method) in _expand(sweep, where).items()}


def _expand(sweep: dict, where: str) -> dict[str, tuple[dict, Any]]:
    if not isinstance(sweep, dict):
        raise ConfigError(f"{where}: a sweep config must be a mapping.")
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(sweep), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_explain(errors[0], where))
    grid = {k: v for k, v in sweep.get("grid", {}).items() if "." not in k}
    run_axes = _run_axes(sweep.get("grid", {}), where)
    base = sweep.get("run", {})
    for k in base:
        if k not in config.SCHEMA["properties"] or k in ("model", "method", "data", "seed"):
            allowed = sorted(set(config.SCHEMA["properties"]) - {"model", "method", "data", "seed"})
            raise ConfigError(f"{where}: unknown key {k!r} in run.{did_you_mean(k, allowed)} Allowed: "
                              f"{', '.join(allowed)} (model, method, data and seed come from the grid).")
    ov = sweep.get("overrides", {})
    import methods as _m

    if "plugins" in base:
        raise ConfigError(f"{where}: run.plugins: list the plugin modules at the top of the sweep (plugins: [...]), "
                          f"where every run and the report see them.")
    plugins = list(sweep.get("plugins", []))
    _m.load_plugins(plugins, where=f"{where}: plugins")  # before any method name is looked up

    for name in ov.get("method", {}):
        if name not in _m.names():
            raise ConfigError(f"{where}: overrides.method.{name}: unknown method.{did_you_mean(name, _m.names())}")
    labels = [m["label"] for m in _model_entries(sweep)]
    for name in ov.get("model", {}):
        if name not in labels:
            raise ConfigError(f"{where}: overrides.model.{name}: not a model of this sweep "
                              f"(labels: {', '.join(labels)}).{did_you_mean(name, labels)}")
    for i, entry in enumerate(sweep["methods"]):
        for key, known in (("models", labels), ("data", list(sweep["data"]))):
            for lab in entry.get(key, []):
                if lab not in known:
                    raise ConfigError(f"{where}: methods[{i}] ({entry['name']}).{key}: {lab!r} is not one of this "
                                      f"sweep's {key} ({', '.join(known)}).{did_you_mean(lab, known)}")
        if "seeds" in entry:
            seeds = sweep.get("seeds", [0])
            bad = entry["seeds"] if not isinstance(entry["seeds"], list) or not entry["seeds"] else \
                [x for x in entry["seeds"] if x not in seeds or isinstance(x, bool)]
            if bad:
                raise ConfigError(f"{where}: methods[{i}] ({entry['name']}).seeds: {bad!r} is not a non-empty list of "
                                  f"this sweep's seeds ({seeds}). Fix: list some of {seeds}, e.g. "
                                  f"seeds: [{seeds[0]}], or drop the key to run at every seed.")
    if "claims" in sweep:
        from .claims import validate as validate_claims

        validate_claims(sweep["claims"], where=f"{where}: claims")
    presets = sweep.get("presets", {})
    rule_lists = [("overrides.match", ov.get("match", []))] + [(f"presets.{k}", v) for k, v in presets.items()]
    for key, rules in rule_lists:
        for j, rule in enumerate(rules):
            for lab in rule["when"].get("model", []):
                if lab not in labels:
                    raise ConfigError(f"{where}: {key}[{j}].when.model: {lab!r} is not a model of this sweep."
                                      f"{did_you_mean(lab, labels)}")
            for name in rule["when"].get("method", []):
                if name not in _m.names():
                    raise ConfigError(f"{where}: {key}[{j}].when.method: unknown method {name!r}."
                                      f"{did_you_mean(name, _m.names())}")
    for key, name in [("preset", sweep.get("preset"))] + [(f"methods[{i}] ({e['name']}).preset", e.get("preset"))
                                                          for i, e in enumerate(sweep["methods"])]:
        if name is not None and name not in presets:
            known = sorted(presets)
            raise ConfigError(f"{where}: {key}: {name!r} is not a preset of this sweep"
                              + (f" (presets: {', '.join(known)}).{did_you_mean(str(name), known)}" if known else
                                 "; it has no `presets:` section. Fix: define presets: {" + str(name) +
                                 ": [{when: .., set: ..}]} or drop the preset key."))
    runs: dict[str, dict] = {}
    built: dict[str, Any] = {}  # run id -> its Method (built once, by resolve)
    for model in _model_entries(sweep):
        for data_label, data in sweep["data"].items():
            for mi, entry in enumerate(sweep["methods"]):
                if "models" in entry and model["label"] not in entry["models"]:
                    continue
                if "data" in entry and data_label not in entry["data"]:
                    continue
                for variant0 in _method_variants(entry, grid, where):
                    # the dotted grid axes of this method: train.* is not crossed with base (it is never trained)
                    own = {sk: vs for sk, vs in run_axes.items()
                           if not (sk[0] == "train" and variant0["name"] == "base")}
                    # without dotted axes: one empty combo, so the runs (and their order) are those of before
                    seeds = [x for x in sweep.get("seeds", [0]) if x in entry.get("seeds", [x])]
                    for combo, seed in itertools.product(itertools.product(*own.values()), seeds):
                        variant = variant0
                        setting = dict(zip(own, combo))
                        raw = copy.deepcopy(base)
                        sources = [(f"overrides.method.{variant['name']}", ov.get("method", {}).get(variant["name"])),
                                   (f"overrides.model.{model['label']}", ov.get("model", {}).get(model["label"]))]
                        raw = config._merge(raw, ov.get("method", {}).get(variant["name"], {}))
                        raw = config._merge(raw, ov.get("model", {}).get(model["label"], {}))
                        if "train" in entry:  # this entry's own run settings (after the by-name overrides)
                            sources.append((f"methods[{mi}].train", {"train": entry["train"]}))
                            raw = config._merge(raw, {"train": entry["train"]})
                        facts = {"method": variant["name"], "model": model["label"], "data": data_label,
                                 "bits": variant.get("bits"), "rank": variant.get("rank"), "seed": seed}
                        preset = entry.get("preset", sweep.get("preset"))
                        rules = [(f"overrides.match[{j}]", r) for j, r in enumerate(ov.get("match", []))]
                        rules += [(f"presets.{preset}[{j}]", r) for j, r in enumerate(presets.get(preset, []))]
                        for src, rule in rules:  # the preset's rules last: its values are the ones that run
                            if all(facts[k] in v for k, v in rule["when"].items()):
                                sources.append((f"{src}.set", rule["set"]))
                                extra = copy.deepcopy(rule["set"])
                                variant = {**variant, **extra.pop("method", {})}
                                raw = config._merge(raw, extra)
                        for (section, key), value in setting.items():
                            for src, node in sources:
                                if _sets(node, section, key):
                                    raise ConfigError(
                                        f"{where}: grid.{section}.{key} and {src} both set {section}.{key} for the "
                                        f"run (model={model['label']}, data={data_label}, method={variant['name']}"
                                        f", seed={seed}). A grid axis is never overridden: remove {section}.{key} "
                                        f"from {src}, or drop grid.{section}.{key} and keep the per-run values.")
                            raw.setdefault(section, {})
                            raw[section] = {**raw[section], key: copy.deepcopy(value)}
                        # an override may set the model's dtype for some runs (e.g. QA-LoRA's float16 base)
                        own_model = raw.pop("model", {}) or {}
                        if set(own_model) - {"dtype"}:
                            bad = sorted(set(own_model) - {"dtype"})[0]
                            raise ConfigError(f"{where}: an override sets model.{bad} for the run (model="
                                              f"{model['label']}, method={variant['name']}); overrides may set "
                                              f"model.dtype only (the model itself comes from models:).")
                        raw["model"] = {"name": model["name"], **({"dtype": model["dtype"]} if "dtype" in model else {}),
                                        **own_model}
                        if model["label"] != Path(model["name"]).name:
                            raw["model"]["label"] = model["label"]
                        raw["method"] = variant
                        raw["data"] = config._merge(raw.get("data", {}), data)
                        raw["seed"] = seed
                        if plugins:
                            raw["plugins"] = plugins
                        label = (f"{where}: run (model={model['label']}, data={data_label}, method={variant}"
                                 + "".join(f", {sec}.{k}={v!r}" for (sec, k), v in setting.items()) + ")")
                        cfg, method = config.resolve_with_method(raw, where=label)
                        cfg["sweep"] = {"name": sweep.get("name", "sweep"), "model_label": model["label"],
                                        "data_label": data_label}
                        if preset is not None:
                            cfg["sweep"]["preset"] = preset
                        rid = config.run_id(cfg)
                        if rid in runs and _placement(runs[rid]) != _placement(cfg):
                            raise ConfigError(f"{label}: the same run appears twice in the sweep ({rid}).")
                        runs.setdefault(rid, cfg)  # equal under two presets: one run (the first preset named)
                        built.setdefault(rid, method)
    if sweep.get("claims"):
        from .claims import check_selectors

        check_selectors(sweep["claims"], runs, where=f"{where}: claims")
    return {rid: (cfg, built[rid]) for rid, cfg in runs.items()}


def _placement(cfg: dict) -> dict:
    """Where a run sits in its sweep (model and data labels), its preset aside: two presets may name one run."""
    return {k: v for k, v in cfg["sweep"].items() if k != "preset"}


def resources(sweep: dict, cfg: dict) -> dict[str, Any]:
    """Job resources of a run: sweep default, then the model's entry in resources.models and in models."""
    res = dict(DEFAULT_RESOURCES)
    res.update(sweep.get("resources", {}).get("default", {}))
    label = cfg["sweep"]["model_label"]
    res.update(sweep.get("resources", {}).get("models", {}).get(label, {}))
    for m in _model_entries(sweep):
        if m["label"] == label:
            res.update(m.get("resources", {}))
    res.setdefault("threads", res.get("cpus", 1))
    return res


training_view = config.training_view  # (the finetune job's config; defined next to TRAINING_KEYS)


eval_jobs = spec.eval_jobs  # one evaluation job per (deployment mode, task group): qftbench.spec.EvalJob


RUNS_COLUMNS = ("run_id", "model", "method", "rank", "bits", "group", "data", "lr", "seed", "base", "evaluations")


def runs_table(run_specs: Mapping[str, RunSpec]) -> str:
    """The sweep's runs as a readable TSV (``<tables>/runs.tsv``), one line per run in the sweep's order: its id
    (= its folder under ``results/runs/``), model and data labels, method, rank, bits, group, learning rate, seed,
    the folder of its quantized base (``results/cache/bases/``, shared by the runs that name the same one) and its
    number of evaluation jobs (:meth:`qftbench.spec.RunSpec.row`). Empty cells for what a method does not have."""
    lines = ["\t".join(RUNS_COLUMNS)]
    for s in run_specs.values():
        row = s.row()
        lines.append("\t".join("" if row[c] is None else str(row[c]) for c in RUNS_COLUMNS))
    return "\n".join(lines) + "\n"


#: the figures every sweep produces (qftbench.plots; the report rule's outputs and qftbench.collate's list)
FIGURES = ("acc_vs_params", "acc_vs_flops", "acc_vs_rank", "loss_curves")

COMMONSENSE = {"hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge", "boolq", "openbookqa"}


def expected_tables(sweep: dict, runs: dict[str, dict]) -> list[str]:
    """The tables a sweep produces (the report always writes each of them)."""
    tasks = {t[4:] if t.startswith("qft_") else t for cfg in runs.values() for t in cfg["eval"]["tasks"]}
    out = []
    if "mmlu" in tasks:
        out += ["mmlu", "mmlu_subject_avg"]
    if tasks & COMMONSENSE:
        out.append("commonsense")
    if tasks & {"synthetic", "synthetic_val"}:
        out.append("synthetic")
    if "synthetic_val" in tasks:  # the learning-rate choice on the validation split (report.lr_choice_table)
        out.append("lr_choice")
    bases = [cfg["method"] for cfg in runs.values() if cfg["method"]["name"] == "base"]
    if any(m.get("bits") == 16 for m in bases) and any(m.get("bits") != 16 for m in bases):
        out.append("damage")  # the un-tuned model quantized beside its 16-bit self (report.damage_table)
    if sweep.get("claims"):
        out.append("claims")  # one row per claim of the sweep (qftbench.claims)
    return out + ["efficiency", "paired", "paper_vs_reproduced"]


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
#: the share of a GPU that transformers' device_map="auto" fills with weights (it keeps 10% for buffers)
GPU_FILL = 0.9


def memory_fit(sweep: dict, runs: dict[str, dict] | None = None, gpu_mem_gib: float | None = None,
               where: str = "sweep") -> list[dict]:
    """Whether each model's weights fit on the GPUs its jobs ask for, before any job.

    A job loads the model's 16-bit (``model.dtype``) weights onto its GPUs -- spread over them with
    ``device_map="auto"`` when it has several -- and then quantizes them in place, so the 16-bit weights must
    fit into ``gpu x gpu_mem_gib x 0.9`` (``resources.gpu_mem_gib``, default 80, an H100/A100-80GB). One row
    per model: ``{model, params, weights_gib, gpus, capacity_gib, fits, fix}``; jobs without GPUs are skipped.
    """
    from .accounting import base_params, known_models, load_config

    runs = expand(sweep, where) if runs is None else runs
    mem = float(gpu_mem_gib or sweep.get("resources", {}).get("gpu_mem_gib") or 80.0)
    rows: dict[str, dict] = {}
    for cfg in runs.values():
        label = cfg["sweep"]["model_label"]
        if label in rows:
            continue
        gpus = resources(sweep, cfg).get("gpu", 0)
        if not gpus:
            continue
        model = label if label in known_models() else cfg["model"]["name"]
        try:
            n = base_params(load_config(model)[1])
        except ConfigError:  # a hub model without a shipped config: not guessed
            continue
        gib = n * DTYPE_BYTES.get(cfg["model"]["dtype"], 2) / 2**30
        cap = gpus * mem * GPU_FILL
        need = max(1, math.ceil(gib / (mem * GPU_FILL)))
        rows[label] = {"model": label, "params": n, "dtype": cfg["model"]["dtype"], "weights_gib": gib,
                       "gpus": gpus, "gpu_mem_gib": mem, "capacity_gib": cap, "fits": gib <= cap,
                       "fix": None if gib <= cap else (
                           f"set resources.models.{label}.gpu: {need} (its {cfg['model']['dtype']} weights, "
                           f"{gib:.1f} GiB, need {need} GPUs of {mem:g} GiB), or set resources.gpu_mem_gib to "
                           f"your GPUs' memory if it is larger")}
    return list(rows.values())


def plan(sweep: dict, where: str = "sweep", gpu_tflops: float | None = None, mfu: float | None = None) -> dict:
    """Runs and a compute estimate from the accounting, before any job: ``{"runs": [...], "total": {...}}``.

    Training FLOPs = ``train_flops_per_token`` (at seq_len = source_max_len + target_max_len) x tokens, with
    tokens = max_steps x batch_size x (source_max_len + target_max_len): an upper bound, since real examples
    are shorter than the maximum lengths. GPU-hours = FLOPs / (gpu_tflops x 1e12 x mfu) / 3600. Evaluation is
    not included (it is forward-only and usually far smaller than training)."""
    from .accounting import account, known_models

    runs = expand(sweep, where)
    res = sweep.get("resources", {})
    tflops = gpu_tflops or res.get("gpu_tflops") or 989.0
    mfu = mfu or res.get("mfu") or 0.3
    rows = []
    for rid, cfg in runs.items():
        label = cfg["sweep"]["model_label"]
        model = label if label in known_models() else cfg["model"]["name"]
        seq = cfg["data"]["source_max_len"] + cfg["data"]["target_max_len"]
        hp = {k: v for k, v in cfg["method"].items() if k != "name"}
        try:
            acc = account(model, cfg["method"]["name"], seq_len=seq, **hp)
        except Exception as e:  # a hub model without a shipped config: reported, not guessed
            acc = {"error": str(e)}
        tokens = cfg["train"]["max_steps"] * cfg["train"]["batch_size"] * seq
        if cfg["method"]["name"] == "base":
            tokens = 0
        flops = acc.get("train_flops_per_token", 0) * tokens if "error" not in acc else None
        r = resources(sweep, cfg)
        rows.append({"run_id": rid, "model": label, "method": cfg["method"]["name"],
                     "rank": cfg["method"].get("rank"), "bits": cfg["method"].get("bits"), "lr": cfg["train"]["lr"],
                     "data": cfg["sweep"]["data_label"], "seed": cfg["seed"], "steps": cfg["train"]["max_steps"],
                     "trainable_params": acc.get("trainable_params"), "train_tokens": tokens,
                     "train_flops": flops, "gpu_hours": flops / (tflops * 1e12 * mfu) / 3600 if flops else 0.0,
                     "gpus": r.get("gpu", 0), "runtime_min": r.get("runtime"), "mem_mb": r.get("mem_mb"),
                     "error": acc.get("error")})
    total = {"runs": len(rows), "train_flops": sum(r["train_flops"] or 0 for r in rows),
             "gpu_hours": sum(r["gpu_hours"] for r in rows), "gpu_tflops": tflops, "mfu": mfu,
             "requested_gpu_hours": sum((r["runtime_min"] or 0) / 60 * max(1, r["gpus"]) for r in rows
                                        if r["gpus"]),
             "evaluations": sum(len(eval_jobs(c)) for c in runs.values())}
    return {"runs": rows, "total": total, "memory": memory_fit(sweep, runs, where=where)}


def plan_text(sweep: dict, where: str = "sweep", **kw) -> str:
    p = plan(sweep, where, **kw)
    lines = [f"{'run':70s} {'trainable':>12s} {'tokens':>10s} {'train FLOPs':>12s} {'GPU-h':>8s} {'gpus':>4s} "
             f"{'lr':>8s}"]
    for r in p["runs"]:
        tp = f"{r['trainable_params']:,}" if r["trainable_params"] is not None else "n/a"
        fl = f"{r['train_flops']:.3g}" if r["train_flops"] else ("n/a" if r["error"] else "0")
        lines.append(f"{r['run_id'][:70]:70s} {tp:>12s} {r['train_tokens']:>10,d} {fl:>12s} "
                     f"{r['gpu_hours']:8.2f} {r['gpus']:>4d} {r['lr']:>8g}")
    t = p["total"]
    lines.append("")
    lines.append(f"{t['runs']} runs, {t['evaluations']} evaluation jobs; training {t['train_flops']:.3g} FLOPs "
                 f"= {t['gpu_hours']:.1f} GPU-hours at {t['gpu_tflops']:g} TFLOP/s x MFU {t['mfu']:g} "
                 f"(an upper bound: every example counted at the maximum length; evaluation not included).")
    if t["requested_gpu_hours"]:
        lines.append(f"The runtime limits requested from the scheduler add up to {t['requested_gpu_hours']:.0f} "
                     f"GPU-hours (runtime x GPUs per fine-tuning job).")
    if p["memory"]:
        lines.append("")
        lines.append("GPU memory (the 16-bit weights are loaded onto a job's GPUs, spread over several with "
                     "device_map='auto', then quantized in place):")
        for m in p["memory"]:
            lines.append(f"  {m['model']:12s} {m['params'] / 1e9:6.1f}B params, {m['dtype']} {m['weights_gib']:7.1f} GiB "
                         f"on {m['gpus']} x {m['gpu_mem_gib']:g} GiB ({m['capacity_gib']:.0f} GiB usable): "
                         + ("fits" if m["fits"] else f"DOES NOT FIT -- {m['fix']}"))
    errs = [r for r in p["runs"] if r["error"]]
    if errs:
        lines.append(f"{len(errs)} runs have no estimate: {errs[0]['error']}")
    return "\n".join(lines)


#: training precisions and model dtypes that a CPU without native bf16 / fp16 arithmetic emulates
HALF_PRECISIONS = ("bf16", "fp16")
HALF_DTYPES = ("bfloat16", "float16")


def emulated_half(runs: Mapping[str, dict], info: dict | None = None, cuda: bool | None = None) -> list[str]:
    """The runs that would compute in bf16/fp16 on a CPU that only emulates it (no CUDA device, no native bf16:
    :func:`qftbench.provenance.native_bf16`), where each step is about 20x slower than in float32. Empty on a GPU
    or on a CPU with AVX512-BF16 / AMX. The Snakefile warns with the fix before any job starts."""
    from .provenance import native_bf16

    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda or native_bf16(info):
        return []
    return sorted(rid for rid, c in runs.items() if c["method"]["name"] != "base" and (
        c["train"].get("precision") in HALF_PRECISIONS or c["model"].get("dtype") in HALF_DTYPES))
