"""Offline lm-evaluation-harness tasks over a local data root.

The YAML files in this package are templates of lm-eval (0.4.13) task configs: prompt, choices,
target, few-shot and metric settings are copied from lm-eval's built-in task YAMLs, while the data
comes from local files (``dataset_path: json`` / ``csv`` + ``data_files``) whose layout is mapped
onto the built-in task's Hugging Face fields by the ``process_docs`` hooks in :mod:`.utils`.

Because ``data_files`` must point into the user's data root, configs are generated at run time:
:func:`task_config` fills the ``${data_root}`` / ``${subject}`` / ``${synthetic_path}``
placeholders of a template and returns a plain dict that lm-eval accepts anywhere a task config is
accepted (``TaskManager.load([cfg])``, ``simple_evaluate(tasks=[cfg])``,
``ConfigurableTask(config=cfg)``). MMLU is a nested group, which lm-eval's inline-dict loader
would namespace ("qft_mmlu::qft_mmlu_stem::..."), so :func:`build_task` returns an
``lm_eval.api.group.Group`` built directly for it (``simple_evaluate`` accepts Group objects).

Data root: argument, else ``$QFTBENCH_DATA_ROOT``, else ``<repo>/../shared/data``
(:func:`default_data_root`). Nothing here is downloaded.
"""
from __future__ import annotations

import copy
import functools
import importlib
import os
import re
from pathlib import Path
from typing import Any

import yaml

TASKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TASKS_DIR.parents[1]

# offline name -> lm-eval built-in name it reproduces
BUILTIN_OF = {
    "qft_mmlu": "mmlu",
    "qft_arc_easy": "arc_easy",
    "qft_arc_challenge": "arc_challenge",
    "qft_piqa": "piqa",
    "qft_boolq": "boolq",
    "qft_winogrande": "winogrande",
    "qft_openbookqa": "openbookqa",
    "qft_hellaswag": "hellaswag",
}
#: offline tasks with no lm-eval built-in twin: perplexity on held-out Alpaca text (qft_alpaca_ppl.yaml)
PERPLEXITY_TASKS = ("qft_alpaca_ppl",)
OFFLINE_TASKS = (*BUILTIN_OF, "qft_synthetic", "qft_synthetic_letter", "qft_synthetic_val", *PERPLEXITY_TASKS)
SYNTHETIC_TASKS = ("qft_synthetic", "qft_synthetic_letter", "qft_synthetic_val")
#: the synthetic tasks' data file, beside the eval.jsonl passed as ``synthetic_path``
SYNTHETIC_FILES = {"qft_synthetic": "eval.jsonl", "qft_synthetic_letter": "eval.jsonl",
                   "qft_synthetic_val": "validation.jsonl"}
COMMONSENSE_TASKS = ("arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "openbookqa", "hellaswag")
MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")

_PLACEHOLDER = re.compile(r"\$\{(\w+)\}")


# ------------------------------------------------------------------------------ data root
def default_data_root() -> Path | None:
    """``$QFTBENCH_DATA_ROOT`` if set, else ``<repo>/../shared/data``; None when not a directory."""
    env = os.environ.get("QFTBENCH_DATA_ROOT")
    root = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    return root.resolve() if root.is_dir() else None


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data root {str(root)!r} is not a directory")
        return root.resolve()
    root = default_data_root()
    if root is None:
        raise FileNotFoundError(
            "no data root for the offline qft_* tasks: pass data_root=..., or set QFTBENCH_DATA_ROOT, "
            f"or provide {REPO_ROOT.parent / 'shared' / 'data'}")
    return root


# ------------------------------------------------------------------------------ templates
class _TemplateLoader(yaml.SafeLoader):
    """SafeLoader + lm-eval's ``!function module.fn`` tag, resolved inside this package."""


def _function_ctor(loader: yaml.SafeLoader, node: yaml.Node):
    qual = loader.construct_scalar(node)
    mod, _, fn = str(qual).rpartition(".")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), fn)


_TemplateLoader.add_constructor("!function", _function_ctor)


@functools.lru_cache(maxsize=None)
def _load_yaml(name: str) -> dict:
    with open(TASKS_DIR / f"{name}.yaml", encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_TemplateLoader)  # noqa: S506 (SafeLoader subclass)


def load_template(name: str) -> dict:
    """The raw template ``<name>.yaml`` (functions resolved, placeholders not filled)."""
    return copy.deepcopy(_load_yaml(name))


def mmlu_subjects() -> dict[str, str]:
    """MMLU subject -> category (lm-eval's map), in alphabetical order."""
    return dict(_load_yaml("qft_mmlu")["subjects"])


def _fill(obj: Any, values: dict[str, str]) -> Any:
    if isinstance(obj, str):
        def sub(m):
            if m.group(1) not in values:
                raise KeyError(f"template placeholder ${{{m.group(1)}}} has no value")
            return str(values[m.group(1)])
        return _PLACEHOLDER.sub(sub, obj)
    if isinstance(obj, dict):
        return {k: _fill(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, values) for v in obj]
    return obj


def _finalize(cfg: dict) -> dict:
    """Turn the qftbench-only template keys into what lm-eval's TaskConfig understands."""
    kwargs = cfg.pop("process_docs_kwargs", None)
    if kwargs:
        cfg["process_docs"] = functools.partial(cfg["process_docs"], **kwargs)
    dkw = cfg.get("dataset_kwargs") or {}
    if isinstance(dkw.get("features"), dict):
        import datasets

        dkw["features"] = datasets.Features({k: datasets.Value(v) for k, v in dkw["features"].items()})
    return cfg


def data_files(cfg: dict) -> list[Path]:
    """The local files a generated config reads."""
    files = list(((cfg.get("dataset_kwargs") or {}).get("data_files") or {}).values())
    pdk = cfg.get("process_docs")
    if isinstance(pdk, functools.partial) and "labels_file" in pdk.keywords:
        files.append(pdk.keywords["labels_file"])
    return [Path(f) for f in files]


def _check_files(cfg: dict, name: str) -> None:
    missing = [str(p) for p in data_files(cfg) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: missing local data file(s): {', '.join(missing)}")


def task_config(name: str, data_root: str | os.PathLike | None = None, *,
                synthetic_path: str | os.PathLike | None = None, subject: str | None = None,
                check_files: bool = True) -> dict:
    """A ready-to-use lm-eval task config dict for one offline LEAF task.

    ``name``: one of ``qft_arc_easy``, ``qft_arc_challenge``, ``qft_piqa``, ``qft_boolq``,
    ``qft_winogrande``, ``qft_openbookqa``, ``qft_hellaswag``, ``qft_synthetic`` (needs
    ``synthetic_path``), or ``qft_mmlu_<subject>`` / ``qft_mmlu`` with ``subject=``.
    """
    if name.startswith("qft_mmlu_") and subject is None and name[len("qft_mmlu_"):] in mmlu_subjects():
        subject = name[len("qft_mmlu_"):]
    if subject is not None:
        if subject not in mmlu_subjects():
            raise KeyError(f"unknown MMLU subject {subject!r}")
        values = {"data_root": str(resolve_data_root(data_root)), "subject": subject,
                  "subject_words": subject.replace("_", " ")}
        cfg = _fill(load_template("qft_mmlu_subject"), values)
    elif name in SYNTHETIC_TASKS:
        if synthetic_path is None:
            raise ValueError(f"{name} needs synthetic_path (the eval.jsonl written by qftbench.synthetic)")
        path = Path(synthetic_path).expanduser().resolve()
        if path.name != SYNTHETIC_FILES[name] and path.name in SYNTHETIC_FILES.values():
            path = path.with_name(SYNTHETIC_FILES[name])  # the validation split lives beside eval.jsonl
        cfg = _fill(load_template(name), {"synthetic_path": str(path)})
    elif name in OFFLINE_TASKS and name != "qft_mmlu":
        cfg = _fill(load_template(name), {"data_root": str(resolve_data_root(data_root))})
    else:
        raise KeyError(f"{name!r} is not an offline leaf task; known: {', '.join(OFFLINE_TASKS)}")
    cfg = _finalize(cfg)
    if check_files:
        _check_files(cfg, cfg["task"])
    return cfg


def mmlu_task_configs(data_root: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """category -> [subject task config dicts], categories in lm-eval's order."""
    by_cat: dict[str, list[dict]] = {c: [] for c in MMLU_CATEGORIES}
    for subject, cat in mmlu_subjects().items():
        by_cat[cat].append(task_config("qft_mmlu", data_root, subject=subject))
    return by_cat


def build_task(name: str, data_root: str | os.PathLike | None = None, *,
               synthetic_path: str | os.PathLike | None = None):
    """Instantiate (and load the local data of) an offline task.

    Returns a ``ConfigurableTask`` for leaf tasks and an ``lm_eval.api.group.Group`` for
    ``qft_mmlu`` (children: ``qft_mmlu_<category>`` groups of ``qft_mmlu_<subject>`` tasks, with
    lm-eval's question-weighted acc aggregation). Both can be passed to ``simple_evaluate``.
    """
    from lm_eval.api.group import Group
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.config.group import AggMetricConfig

    if name != "qft_mmlu":
        return ConfigurableTask(config=task_config(name, data_root, synthetic_path=synthetic_path))
    tmpl = load_template("qft_mmlu")
    agg = [AggMetricConfig(**a) for a in tmpl["aggregate_metric_list"]]
    top = Group(name="qft_mmlu", alias="qft_mmlu", aggregate_metric_list=agg, metadata=dict(tmpl["metadata"]))
    for cat, cfgs in mmlu_task_configs(data_root).items():
        sub = Group(name=f"qft_mmlu_{cat}", alias=cat, aggregate_metric_list=copy.deepcopy(agg),
                    metadata=dict(tmpl["metadata"], builtin=f"mmlu_{cat}"))
        for cfg in sorted(cfgs, key=lambda c: c["task"]):
            sub.add(ConfigurableTask(config=cfg))
        top.add(sub)
    return top


__all__ = [
    "BUILTIN_OF", "SYNTHETIC_TASKS", "SYNTHETIC_FILES", "COMMONSENSE_TASKS", "MMLU_CATEGORIES", "OFFLINE_TASKS", "TASKS_DIR",
    "build_task", "data_files", "default_data_root", "load_template", "mmlu_subjects",
    "mmlu_task_configs", "resolve_data_root", "task_config",
]
