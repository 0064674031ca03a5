"""Run configs: one YAML/dict per fine-tuning run, validated against a schema before any compute.

A run config has the sections ``model``, ``method``, ``data``, ``calibration``, ``train``, ``eval`` and
``paths`` (see ``config/run.example.yaml``). :func:`resolve` fills the defaults, validates every field
(unknown keys get a did-you-mean, the method's hyperparameters are checked by the method library) and checks
combinations (e.g. an exact INT merge asked of a method with an NF4 base). :func:`run_id` derives the run's
folder name from the training-relevant sections, so the same config always maps to the same run.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from methods.errors import ConfigError, did_you_mean

#: the run config's schema: types, allowed values and defaults of every setting, in one YAML file (read once)
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"
SCHEMA: dict = yaml.safe_load(SCHEMA_PATH.read_text())


def _defaults(node: dict) -> dict:
    """The ``default:`` values of a schema object, sections as nested dicts."""
    out = {}
    for k, p in node.get("properties", {}).items():
        if "default" in p:
            out[k] = copy.deepcopy(p["default"])
        elif p.get("type") == "object" and "properties" in p:
            out[k] = _defaults(p)
    return out


#: every default of a run config (from :data:`SCHEMA`)
DEFAULTS: dict[str, Any] = _defaults(SCHEMA)
_EVAL = SCHEMA["properties"]["eval"]["properties"]
DEPLOY_MODES = tuple(_EVAL["modes"]["items"]["enum"])
#: one re-quantization setting (``eval.requant``, or each entry of a list of them)
REQUANT_DEFAULTS = dict(DEFAULTS["eval"]["requant"])
#: the evaluation mode of one entry of an ``eval.requant`` list (see :func:`requant_mode_name`)
REQUANT_MODE_RE = re.compile(r"^requant-w(\d+)g(\d+)(-rtn)?$")

#: ``eval.mmlu``: the MMLU protocol, recorded with every evaluation (docs/SETTINGS.md, "MMLU protocol"): the split
#: (the test split, as the QLoRA and QA-LoRA papers report; lm-eval's ``mmlu`` and the offline ``qft_mmlu`` both
#: evaluate it), the script (lm-eval's MMLU task as pinned: the hendrycks prompt, dev items as shots, the
#: log-likelihood of each answer letter) and the headline average (``questions``: the original script's, or
#: ``subjects``: qlora.py's / qalora.py's mean over the 57 subjects). Both averages are computed from the
#: per-item records of every run; the paper comparison always uses the paper's own average.
MMLU_PROTOCOL = dict(DEFAULTS["eval"]["mmlu"])

#: the training settings' defaults and choices (``train.TrainConfig`` takes its defaults and checks from here)
TRAIN_DEFAULTS = dict(DEFAULTS["train"])
TRAIN_CHOICES = {k: tuple(p["enum"]) for k, p in SCHEMA["properties"]["train"]["properties"].items() if "enum" in p}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "num_fewshot":
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _branch(node: dict, want: str) -> dict:
    """The ``anyOf`` branch of JSON type ``want`` (eval.requant: a setting or a list of settings)."""
    if "anyOf" not in node:
        return node
    return next((b for b in node["anyOf"] if b.get("type") == want), {})


def _schema_at(path) -> dict:
    node = SCHEMA
    for p in path:
        if isinstance(p, int):
            node = _branch(node, "array").get("items", {})
        else:
            node = _branch(node, "object").get("properties", {}).get(p, {})
    return _branch(node, "object")


def _explain(err: jsonschema.ValidationError, where: str) -> str:
    if err.validator == "anyOf" and list(err.absolute_path) == ["eval", "requant"]:
        if isinstance(err.instance, (dict, list)):  # explain the branch of the value's own type
            branch = 1 if isinstance(err.instance, list) else 0
            sub = [e for e in err.context if e.relative_schema_path and e.relative_schema_path[0] == branch]
            if sub:
                return _explain(min(sub, key=lambda e: list(e.absolute_path)), where)
        return (f"{where}: eval.requant={err.instance!r} is neither a setting nor a list of settings; write "
                f"{{bits: 4, group_size: 32, quantizer: gptq}} or a non-empty list of such mappings.")
    path = ".".join(str(p) for p in err.absolute_path)
    field = path or "(top level)"
    if err.validator == "additionalProperties":
        props = _schema_at(list(err.absolute_path)).get("properties", {})
        extra = [k for k in err.instance if k not in props]
        k = extra[0] if extra else "?"
        full = f"{path}.{k}" if path else k
        return (f"{where}: unknown key {full!r}.{did_you_mean(k, props)} "
                f"Allowed keys{' in ' + path if path else ''}: {', '.join(sorted(props))}.")
    if err.validator == "enum":
        return (f"{where}: {field}={err.instance!r} is not allowed; choose one of {err.validator_value}."
                + (did_you_mean(err.instance, err.validator_value) if isinstance(err.instance, str) else ""))
    if err.validator == "required":
        return f"{where}: {err.message} (in {field}); add it."
    return f"{where}: {field}={err.instance!r}: {err.message}."


def resolve(raw: dict | None, where: str = "config") -> dict:
    """Defaults filled in and every field checked; raises :class:`ConfigError` naming field, value and fix."""
    return resolve_with_method(raw, where)[0]


def resolve_with_method(raw: dict | None, where: str = "config") -> tuple[dict, Any]:
    """:func:`resolve`, and the Method it built from the config's ``method`` section (so that a caller that needs
    it, the sweep's :class:`~qftbench.spec.RunSpec`, does not build it again)."""
    import methods

    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a run config must be a mapping, got {type(raw).__name__}.")
    top = set(SCHEMA["properties"])
    for k in raw:
        if k not in top:
            raise ConfigError(f"{where}: unknown key {k!r}.{did_you_mean(k, top)} Allowed keys: {', '.join(sorted(top))}.")
    cfg = _merge(DEFAULTS, raw)
    rq = cfg["eval"].get("requant")
    if isinstance(rq, list):  # a list of settings: the defaults filled into each entry
        cfg["eval"]["requant"] = [_merge(REQUANT_DEFAULTS, r) if isinstance(r, dict) else r for r in rq]
    errors = sorted(jsonschema.Draft202012Validator(SCHEMA).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(_explain(errors[0], where))
    methods.load_plugins(cfg["plugins"], where=f"{where}: plugins")  # before the method is looked up
    try:
        method = methods.from_config(cfg["method"])
    except ConfigError as e:
        raise ConfigError(f"{where}: method: {e}") from None
    cfg["method"] = {"name": method.name, **method.hp}
    _check_model(cfg["model"], method, where)
    _check_requant(cfg["eval"]["requant"], where)
    _check_task_keys(cfg, where)
    _check_combinations(cfg, method, where)
    _check_tasks(tuple(cfg["eval"]["tasks"]), cfg["eval"]["data_root"], where)
    return cfg, method


_SHAPES: dict[tuple, list | None] = {}


def _model_shapes(model: dict) -> list | None:
    """Target-layer shapes from the model's config alone (a built-in name, its hub id, a local folder's
    config.json), or None for a hub model whose config is not shipped (checked by its first job, before compute)."""
    key = (model["name"], model.get("label"))
    if key not in _SHAPES:
        from .accounting import linear_shapes, load_config

        cfg = None
        if model["name"] == "tiny-llama":
            from .models import tiny_llama_config

            cfg = tiny_llama_config().to_dict()
        else:
            for cand in (model.get("label"), model["name"]):
                try:
                    cfg = load_config(cand)[1]
                    break
                except Exception:  # noqa: BLE001 - not known from a config alone
                    continue
        _SHAPES[key] = linear_shapes(cfg) if cfg is not None else None
    return _SHAPES[key]


#: how a model name marks a local folder (qftbench.models.load_model reads it as a path, never from the hub)
LOCAL_PREFIXES = ("./", "../", "/", "~")


def _check_model(model: dict, method, where: str) -> None:
    """What can be checked of the model before any job: a local folder exists and holds a config.json; the
    method's groups and tiles divide every target layer's widths (from the model's config alone)."""
    import methods

    name = str(model["name"])
    if name.startswith(LOCAL_PREFIXES):
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            why = "does not exist" if not folder.exists() else "holds no config.json"
            raise ConfigError(f"{where}: model.name={name!r} is a local folder (it starts with "
                              f"{next(p for p in LOCAL_PREFIXES if name.startswith(p))!r}) that {why} (looked in "
                              f"{folder.resolve()}). Fix: give the folder of a saved model (config.json and weights), "
                              f"relative to the folder you run from, or a hub id / built-in name without ./ or /.")
    shapes = _model_shapes(model)
    if shapes is None:
        return
    targets = method.hp.get("targets", "all-linear")
    if targets != "all-linear":
        ts = [targets] if isinstance(targets, str) else targets
        shapes = [s for s in shapes if any(s[0] == t or s[0].endswith("." + t) for t in ts)]
    try:
        method.check_shapes(shapes)
    except methods.ShapeError as e:
        raise methods.ShapeError(f"{where}: {e}") from None


def _check_requant(rq, where: str) -> None:
    """A list of re-quantization settings must not name one setting twice (each becomes one evaluation mode)."""
    if not isinstance(rq, list):
        return
    seen: dict[str, int] = {}
    for i, r in enumerate(rq):
        name = requant_mode_name(r)
        if name in seen:
            raise ConfigError(
                f"{where}: eval.requant lists the setting {r!r} twice (entries {seen[name]} and {i}, both "
                f"evaluation mode {name!r}); remove the duplicate entry (each setting is evaluated once).")
        seen[name] = i


# ------------------------------------------------------------------------------------- evaluation modes
def requant_mode_name(rq: dict) -> str:
    """``requant-w<bits>g<group_size>``, with ``-rtn`` for the RTN quantizer: the evaluation mode (and results
    folder ``eval/<mode>/``) of one entry of an ``eval.requant`` list, e.g. ``requant-w3g32``."""
    rq = {**REQUANT_DEFAULTS, **rq}
    return f"requant-w{rq['bits']}g{rq['group_size']}" + ("-rtn" if rq["quantizer"] == "rtn" else "")


def requant_modes(eval_cfg: dict) -> dict[str, dict]:
    """``{mode: setting}`` of the run's re-quantization settings, in config order. One setting (a dict, as
    before lists were allowed) keeps the mode name ``requant``; a list gives one ``requant-w<b>g<g>[-rtn]``
    mode per entry."""
    rq = (eval_cfg or {}).get("requant")
    if isinstance(rq, list):
        return {requant_mode_name(r): {**REQUANT_DEFAULTS, **r} for r in rq}
    return {"requant": {**REQUANT_DEFAULTS, **(rq or {})}}


def is_requant_mode(mode: str) -> bool:
    """``requant`` or a ``requant-w<b>g<g>[-rtn]`` mode."""
    return mode == "requant" or bool(REQUANT_MODE_RE.match(str(mode)))


def eval_modes(cfg: dict) -> list[str]:
    """``eval.modes`` with ``requant`` expanded into one mode per ``eval.requant`` setting (``deploy`` is left
    as it is: its meaning depends on the method)."""
    out: list[str] = []
    for m in cfg["eval"]["modes"]:
        for x in (list(requant_modes(cfg["eval"])) if m == "requant" else [m]):
            if x not in out:
                out.append(x)
    return out


def check_mode(cfg: dict, mode: str, where: str = "eval mode") -> dict | None:
    """Check an evaluation mode against the run config (before any compute); returns the re-quantization
    setting of a requant mode, else None. Raises :class:`ConfigError` listing the valid modes."""
    rqm = requant_modes(cfg["eval"])
    valid = [m for m in DEPLOY_MODES if m != "requant"] + list(rqm)
    if mode in rqm:
        return rqm[mode]
    if mode in valid:
        return None
    if is_requant_mode(mode):
        if "requant" in rqm:
            fix = (f"this run has one eval.requant setting ({rqm['requant']}), evaluated as mode 'requant'; use "
                   f"--mode requant, or make eval.requant a list that includes this setting")
        else:
            fix = (f"the eval.requant settings of this run are modes {', '.join(rqm)}"
                   + ("" if mode != "requant" else " (a list of settings has one mode per setting)")
                   + "; use one of them, or add the setting to eval.requant")
        raise ConfigError(f"{where} {mode!r} is not a re-quantization setting of this run: {fix}.")
    raise ConfigError(f"{where} {mode!r} is not one of {', '.join(valid)}.{did_you_mean(mode, valid)}")


_CHECKED_TASKS: set = set()


def _check_tasks(tasks: tuple, data_root, where: str) -> None:
    """Unknown task names fail at validation, before any training (memoised per process)."""
    key = (tasks, data_root)
    if key in _CHECKED_TASKS:
        return
    from .evaluate import UnknownTaskError, check_task_names

    try:
        check_task_names(tasks, data_root)
    except UnknownTaskError as e:
        raise ConfigError(f"{where}: eval.tasks: {e}") from None
    _CHECKED_TASKS.add(key)


def limit_for(cfg: dict, tasks) -> float | dict | None:
    """``eval.limit`` as one evaluation job of ``tasks`` applies it: a number as it is; a per-task mapping
    restricted to the job's own tasks (None when it names none of them). Each task-group job (MMLU 0-shot,
    MMLU 5-shot, the commonsense tasks) thus gets exactly the limits of the tasks it evaluates."""
    limit = cfg["eval"]["limit"]
    if not isinstance(limit, dict):
        return limit
    own = {t: v for t, v in limit.items() if t in tasks}
    return own or None


def _check_task_keys(cfg: dict, where: str) -> None:
    """eval.limit and eval.num_fewshot may only name tasks of eval.tasks (a key that no job evaluates is
    almost always a typo, and would silently evaluate that task in full)."""
    tasks = cfg["eval"]["tasks"]
    for field in ("limit", "num_fewshot"):
        value = cfg["eval"][field]
        if not isinstance(value, dict):
            continue
        for k in value:
            if k not in tasks:
                raise ConfigError(
                    f"{where}: eval.{field} names task {k!r}, which is not in eval.tasks ({', '.join(tasks)})."
                    f"{did_you_mean(k, tasks)} Fix: add {k!r} to eval.tasks or remove eval.{field}.{k}.")


def _check_combinations(cfg: dict, method, where: str) -> None:
    scheme = method.scheme()
    for mode in cfg["eval"]["modes"]:
        if mode == "int-merge" and method.deploy != "int-merge":
            base = "a 16-bit" if scheme is None else f"an {scheme.kind} ({scheme.bits}-bit)"
            raise ConfigError(
                f"{where}: eval.modes contains 'int-merge' but method {method.name!r} has {base} base with no "
                f"zero points to merge into. Use 'deploy' (= {method.deploy!r}) or 'fp16-merge', or an "
                f"INT-merge method (qalora, qahira, qahira-ref, peqa).")
        if mode == "4+16" and scheme is None:
            raise ConfigError(f"{where}: eval.modes contains '4+16' but method {method.name!r} has no quantized "
                              f"base. Use 'deploy' or 'fp16-merge'.")
    mm = cfg["eval"]["mmlu"]
    if mm["split"] != "test" or mm["script"] != "lm-eval":
        raise ConfigError(
            f"{where}: eval.mmlu: split={mm['split']!r}, script={mm['script']!r} is not available: the suite "
            f"evaluates MMLU's test split with lm-eval's MMLU task (the hendrycks prompt and answer letters, as "
            f"pinned). The released codes' validation-split MMLU (qlora.py:137-139) is a monitor during training, "
            f"not what the papers report, and the original hendrycks script is not packaged. Fix: set "
            f"eval.mmlu.split: test and eval.mmlu.script: lm-eval (eval.mmlu.average may be questions or subjects).")
    if cfg["data"]["source"] == "local" and not cfg["data"]["path"]:
        raise ConfigError(f"{where}: data.source='local' needs data.path (a local instruction JSON/JSONL file).")
    if method.hp.get("quantizer") == "gptq" and cfg["calibration"]["n_samples"] < 1:
        raise ConfigError(f"{where}: calibration.n_samples must be >= 1 for quantizer='gptq'.")
    mb = cfg["train"]["micro_batch_size"]
    if cfg["train"]["batch_size"] % mb:
        raise ConfigError(f"{where}: train.batch_size={cfg['train']['batch_size']} is not a multiple of "
                          f"train.micro_batch_size={mb}.")


def apply_override(raw: dict, item: str) -> dict:
    """Apply ``section.key=value`` (value parsed as YAML) to a raw config."""
    key, eq, value = item.partition("=")
    if not eq or not key:
        raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. method.rank=8).")
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section.")
    node[leaf] = yaml.safe_load(value)
    return raw


def load(path: str | os.PathLike, overrides=()) -> dict:
    """Read and resolve a run config file (YAML or JSON), with ``KEY=VALUE`` overrides applied first."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist.")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    for item in overrides:
        apply_override(raw, item)
    return resolve(raw, where=str(p))


TRAINING_KEYS = ("model", "method", "data", "calibration", "train", "seed")
#: settings added after run ids were first published: at these values they are left out of the hash, so that
#: the runs of existing configs keep their ids (the value is the behaviour those runs already had).
HASH_NEUTRAL = {("data", "empty_outputs"): "keep", ("method", "gptq_groups"): "updated",
                ("method", "variant"): "suite", ("data", "prompt"): "alpaca",
                ("train", "adapter_dtype"): "float32", ("train", "norm_dtype"): "model"}


#: settings that a job's params leave out at these values (see :func:`job_view`): every setting added since
#: job params stopped growing with the suite. (The HASH_NEUTRAL settings added before -- data.empty_outputs,
#: method.gptq_groups, method.variant -- are in the params of jobs that ran since and stay there.)
JOB_NEUTRAL = {**{k: HASH_NEUTRAL[k] for k in (("data", "prompt"), ("train", "adapter_dtype"),
                                                ("train", "norm_dtype"))},
               ("eval", "mmlu"): MMLU_PROTOCOL}


def _drop_neutral(view: dict, neutral_values: dict) -> dict:
    """``view`` (modified in place) without the settings of ``neutral_values`` that are at their neutral value."""
    for (section, key), neutral in neutral_values.items():
        if isinstance(view.get(section), dict) and view[section].get(key, neutral) == neutral:
            view[section].pop(key, None)
    return view


def _drop_empty_plugins(view: dict) -> dict:
    if not view.get("plugins"):
        view.pop("plugins", None)
    return view


def job_view(cfg: dict) -> dict:
    """The config a Snakemake job carries as its params (JSON on its command line): the run config without the
    ``sweep`` section and without the settings of :data:`JOB_NEUTRAL` at their neutral values. A setting added
    to the suite at the value that runs already had therefore leaves every existing job's params as they were,
    so Snakemake does not rerun (and delete) what a results folder already holds; the job resolves the same
    config from it (:func:`resolve` fills the defaults back in)."""
    return _drop_empty_plugins(_drop_neutral({k: copy.deepcopy(v) for k, v in cfg.items() if k != "sweep"},
                                             JOB_NEUTRAL))


def training_view(cfg: dict) -> dict:
    """The part of a run config that determines the base and the training (what prepare/finetune get, and what a
    run folder's config.yaml records), with the plugins that define its method when it has any."""
    return _drop_empty_plugins({k: cfg[k] for k in (*TRAINING_KEYS, "paths", "plugins") if k in cfg})


def hash_view(cfg: dict) -> dict:
    """The training-relevant sections (:data:`TRAINING_KEYS`) with the :data:`HASH_NEUTRAL` settings at their
    neutral values left out: what a run id (and the report's configuration ids) hash."""
    return _drop_neutral({k: copy.deepcopy(cfg[k]) for k in TRAINING_KEYS if k in cfg}, HASH_NEUTRAL)


def run_id(cfg: dict) -> str:
    """``<model>-<method>-r<rank>-<bits>b[-g<g>]-<data>-s<seed>-<hash8>`` from the training-relevant sections."""
    m = cfg["method"]
    canon = json.dumps(hash_view(cfg), sort_keys=True, default=str)
    h = hashlib.sha256(canon.encode()).hexdigest()[:8]
    parts = [cfg["model"].get("label") or Path(str(cfg["model"]["name"])).name, m["name"]]
    if m["name"] == "peft":  # which peft method, its rank and base: peft-dora-r16-nf4
        from methods.peft_method import label

        parts.append(label(m))
        if isinstance((m.get("peft") or {}).get("r"), int):
            parts.append(f"r{m['peft']['r']}")
        parts.append(m.get("base", "16bit"))
    if "rank" in m:
        parts.append(f"r{m['rank']}")
    if "bits" in m:
        parts.append(f"{m['bits']}b")
    if "group_size" in m:
        parts.append(f"g{m['group_size']}")
    parts += [cfg["data"]["source"], f"s{cfg['seed']}", h]
    return "-".join(str(p) for p in parts)
