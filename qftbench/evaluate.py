"""Evaluate an in-memory model with lm-evaluation-harness, online (hub tasks) or offline (qft_* tasks).

>>> from qftbench.evaluate import evaluate
>>> metrics = evaluate(model, tokenizer, ["qft_mmlu", "qft_arc_easy"], num_fewshot={"qft_mmlu": 5},
...                    data_root="/data/mirrors")            # doctest: +SKIP

Task names:

* lm-eval's own names (``mmlu``, ``hellaswag``, ``piqa``, ``winogrande``, ``arc_easy``,
  ``arc_challenge``, ``boolq``, ``openbookqa``, or any other registered task/group/tag): the
  datasets are fetched by lm-eval/`datasets` from the Hugging Face hub (or its local cache).
* the offline ``qft_*`` twins (``qft_mmlu``, ``qft_arc_easy``, ... see
  :data:`qftbench.tasks.OFFLINE_TASKS`) that render the same prompts from files under a local data
  root (see :mod:`qftbench.tasks`), and ``qft_synthetic`` over a synthetic ``eval.jsonl``.
"""
from __future__ import annotations

import difflib
import functools
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from qftbench import tasks as qtasks

log = logging.getLogger(__name__)

SUBJECT_TASK = re.compile(r"^(?P<suite>(?:qft_)?mmlu)_(?P<subject>[a-z_]+)$")


class UnknownTaskError(KeyError):
    """A task name that is neither an lm-eval task/group/tag nor an offline qft_* task."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


@functools.lru_cache(maxsize=1)
def builtin_task_manager():
    """lm-eval's TaskManager over its built-in task YAMLs (indexing takes a few seconds; cached)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _offline_names() -> list[str]:
    return list(qtasks.OFFLINE_TASKS)


def _unknown_task_message(name: str, data_root: Path | None) -> str:
    tm = builtin_task_manager()
    candidates = sorted(set(tm.all_tasks) | set(_offline_names()))
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    lower = name.lower()
    if lower != name and lower in candidates:
        close.insert(0, lower)
    root = str(data_root) if data_root is not None else "none found ($QFTBENCH_DATA_ROOT / ../shared/data)"
    msg = (f"unknown task {name!r}: not in lm-eval {_lm_eval_version()}'s task registry "
           f"({len(tm.all_tasks)} tasks/groups/tags) and not an offline task over the data root "
           f"({root}; offline tasks: {', '.join(_offline_names())}).")
    if close:
        msg += f" Did you mean: {', '.join(dict.fromkeys(close))}?"
    return msg


def check_task_names(names: Iterable[str], data_root: str | os.PathLike | None = None) -> None:
    """Raise :class:`UnknownTaskError` for a name that neither lm-eval's registry nor the offline tasks know.

    Cheap enough to run when a config is validated (lm-eval's index is built once per process): an unknown
    task stops a run before any training, not after it."""
    for name in names:
        if name in qtasks.OFFLINE_TASKS or (name.startswith("qft_mmlu_")
                                            and name[len("qft_mmlu_"):] in qtasks.mmlu_subjects()):
            continue
        if name.startswith("qft_") or name not in builtin_task_manager().task_index:
            root = Path(data_root) if data_root is not None else qtasks.default_data_root()
            raise UnknownTaskError(_unknown_task_message(name, root))


def _lm_eval_version() -> str:
    from importlib.metadata import version

    try:
        return version("lm_eval")
    except Exception:  # pragma: no cover
        import lm_eval

        return getattr(lm_eval, "__version__", "unknown")


def resolve_tasks(names: str | Iterable[str], data_root: str | os.PathLike | None = None,
                  synthetic_path: str | os.PathLike | None = None,
                  limit: int | float | Mapping[str, int | float] | None = None) -> list:
    """Turn task names into things ``lm_eval.simple_evaluate(tasks=...)`` accepts.

    Returns one entry per name, in order:

    * offline leaf tasks (``qft_arc_easy``, ..., ``qft_synthetic``): a task config dict
      (:func:`qftbench.tasks.task_config`; data files resolved under ``data_root`` and checked);
    * ``qft_mmlu``: an ``lm_eval.api.group.Group`` (``qft_mmlu`` > 4 categories > 57 subjects;
      built eagerly, because lm-eval namespaces nested inline group dicts);
    * lm-eval names (tasks, groups, tags): the name itself, checked against lm-eval's registry
      (the dataset is fetched by lm-eval when the task is built).

    ``limit`` is only validated here (a positive number, or a mapping whose keys are among
    ``names``); :func:`evaluate` applies it.

    Raises :class:`UnknownTaskError` for a name found nowhere, with the closest known names.
    """
    if isinstance(names, str):
        names = [n for n in re.split(r"[,\s]+", names) if n]
    names = list(names)
    if not names:
        raise ValueError("no task names given")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate task names in {names}")
    _check_limit(limit, names)
    specs: list = []
    for name in names:
        if name == "qft_mmlu":
            specs.append(qtasks.build_task("qft_mmlu", data_root))
        elif name in qtasks.OFFLINE_TASKS or (
                name.startswith("qft_mmlu_") and name[len("qft_mmlu_"):] in qtasks.mmlu_subjects()):
            specs.append(qtasks.task_config(name, data_root, synthetic_path=synthetic_path))
        elif name in builtin_task_manager().task_index:
            specs.append(name)
        else:
            root = Path(data_root) if data_root is not None else qtasks.default_data_root()
            raise UnknownTaskError(_unknown_task_message(name, root))
    return specs


def _check_limit(limit, names) -> None:
    if limit is None:
        return
    if isinstance(limit, Mapping):
        bad = [k for k in limit if k not in names]
        if bad:
            raise ValueError(f"limit given for task(s) {bad} that are not among the requested {names}")
        for v in limit.values():
            _check_limit(v, names)
        return
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0:
        raise ValueError(f"limit must be a positive int (documents) or a fraction in (0, 1), got {limit!r}")


# ---------------------------------------------------------------------------------- evaluation
def _load(specs: list, names: list[str], task_manager) -> dict[str, tuple[Any, list]]:
    """name -> (top-level Task/Group object, [leaf tasks])."""
    from lm_eval.api.group import Group

    out = {}
    for name, spec in zip(names, specs, strict=True):
        loaded = task_manager.load([spec])
        if isinstance(spec, Group):
            top = spec
        elif isinstance(spec, str) and spec in loaded["groups"]:
            top = loaded["groups"][spec]
        elif len(loaded["tasks"]) == 1 and not loaded["groups"]:
            top = next(iter(loaded["tasks"].values()))
        else:  # a tag, or a group spec lm-eval expanded: keep the leaves
            top = list(loaded["tasks"].values())
        out[name] = (top, list(loaded["tasks"].values()))
    return out


def evaluate(model, tokenizer, tasks: str | Iterable[str], num_fewshot: int | Mapping[str, int] | None = None,
             limit: int | float | Mapping[str, int | float] | None = None, batch_size: int | str = 8,
             data_root: str | os.PathLike | None = None, seed: int = 1234,
             synthetic_path: str | os.PathLike | None = None, bootstrap_iters: int = 100_000,
             return_samples: bool = False, **simple_evaluate_kwargs) -> dict:
    """Run lm-eval's ``simple_evaluate`` on an in-memory ``transformers`` model.

    Args:
        model: a ``PreTrainedModel`` (any device; lm-eval uses ``model.device``).
        tokenizer: its tokenizer (lm-eval may set a pad token on it).
        tasks: names, see :func:`resolve_tasks`.
        num_fewshot: an int for every task, or ``{requested name: shots}`` (others 0), or None
            (lm-eval default: 0). MMLU's few-shot examples are the first k dev items, in order.
        limit: documents per task (int), a fraction (<1), or ``{requested name: limit}``
            (per-task; applied through lm-eval's ``samples=`` so other tasks run in full).
        batch_size: lm-eval batch size (int or "auto").
        data_root: root of the local mirrors for ``qft_*`` tasks (default: see
            :func:`qftbench.tasks.default_data_root`).
        seed: few-shot sampler, numpy and torch seed (lm-eval's defaults are 1234; python's
            ``random`` keeps lm-eval's default 0).
        synthetic_path: the ``eval.jsonl`` for ``qft_synthetic``.
        return_samples: keep lm-eval's per-document samples under ``"samples"``.

    Returns a dict::

        {"tasks": {task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "num_fewshot",
                          "version", "alias"}},      # every leaf task except MMLU subjects
         "mmlu": {"qft_mmlu" | "mmlu": {"acc_micro", "acc_micro_stderr", "acc_macro",
                  "acc_macro_stderr", "n", "n_subjects", "num_fewshot", "lm_eval_group_acc",
                  "categories": {cat: {same keys}}, "subjects": {subject: {"acc", ...}}}},
         "commonsense": {"acc_mean", "acc_norm_else_acc_mean", "tasks": {...}} or None,
         "provenance": {...}}

    ``acc_norm`` is None for tasks whose lm-eval config has no ``acc_norm`` (MMLU, BoolQ,
    WinoGrande). ``acc_micro`` weights every question equally (lm-eval's group ``acc``);
    ``acc_macro`` weights every subject equally.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = [n for n in re.split(r"[,\s]+", tasks) if n] if isinstance(tasks, str) else list(tasks)
    specs = resolve_tasks(names, data_root=data_root, synthetic_path=synthetic_path, limit=limit)
    tm = builtin_task_manager() if any(isinstance(s, str) for s in specs) else TaskManager(include_defaults=False)
    loaded = _load(specs, names, tm)

    # per-task few-shot counts
    if isinstance(num_fewshot, Mapping):
        unknown = [k for k in num_fewshot if k not in names]
        if unknown:
            raise ValueError(f"num_fewshot given for task(s) {unknown} that are not among {names}")
        for name, (_, leaves) in loaded.items():
            for t in leaves:
                t.set_config(key="num_fewshot", value=int(num_fewshot.get(name, 0)))
        se_fewshot = None
    else:
        se_fewshot = num_fewshot

    # per-task limits -> lm-eval `samples` (first k docs of the named tasks only)
    se_limit, se_samples = limit, None
    if isinstance(limit, Mapping):
        se_limit, se_samples = None, {}
        for name, lim in limit.items():
            for t in loaded[name][1]:
                n_docs = len(t.eval_docs)
                k = math.ceil(n_docs * lim) if lim < 1 else min(int(lim), n_docs)
                se_samples[t.task_name] = list(range(k))

    top_objects = []
    for top, _ in loaded.values():
        top_objects.extend(top if isinstance(top, list) else [top])

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=top_objects, num_fewshot=se_fewshot, limit=se_limit, samples=se_samples,
        task_manager=tm, bootstrap_iters=bootstrap_iters, log_samples=True,
        random_seed=0, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        **simple_evaluate_kwargs)

    out = summarize(results, loaded)
    leaf_tasks = {t.task_name: t for _, leaves in loaded.values() for t in leaves}
    out["provenance"].update({
        "requested_tasks": names,
        "fewshot_seed": seed,
        "seeds": {"random": 0, "numpy": seed, "torch": seed, "fewshot": seed},
        "limit": dict(limit) if isinstance(limit, Mapping) else limit,
        "num_fewshot_arg": dict(num_fewshot) if isinstance(num_fewshot, Mapping) else num_fewshot,
        "batch_size": batch_size,
        "data_root": str(qtasks.resolve_data_root(data_root))
        if any(n.startswith("qft_") and n not in qtasks.SYNTHETIC_TASKS for n in names) else None,
        "synthetic_path": str(Path(synthetic_path).resolve()) if set(names) & set(qtasks.SYNTHETIC_TASKS) and synthetic_path else None,
        "data_files": _data_file_hashes(leaf_tasks),
        "model_class": type(model).__name__,
        "model_dtype": str(getattr(model, "dtype", "")),
        "model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "tokenizer_name_or_path": getattr(tokenizer, "name_or_path", None),
    })
    if return_samples:
        out["samples"] = results.get("samples")
    return out


# ----------------------------------------------------------------------------------- summaries
def _metric(res: Mapping, metric: str) -> float | None:
    v = res.get(f"{metric},none")
    return float(v) if isinstance(v, (int, float)) else None


def _stderr(res: Mapping, metric: str) -> float | None:
    v = res.get(f"{metric}_stderr,none")
    return float(v) if isinstance(v, (int, float)) else None


def _n(results: Mapping, task: str) -> int | None:
    ns = results.get("n-samples", {}).get(task)
    return int(ns["effective"]) if ns else None


def _hash_config(cfg: Mapping) -> str:
    cfg = json.loads(json.dumps(cfg, default=str, sort_keys=True))
    dk = cfg.get("dataset_kwargs") or {}
    if isinstance(dk.get("data_files"), dict):  # machine-specific paths: hash the names only
        dk["data_files"] = {k: Path(str(v)).name for k, v in dk["data_files"].items()}
    (cfg.get("metadata") or {}).pop("config_source", None)
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", json.dumps(cfg, sort_keys=True))
    text = text.replace(str(qtasks.REPO_ROOT), "<repo>")
    return hashlib.sha256(text.encode()).hexdigest()


def _prompt_hash(samples: list[dict]) -> str:
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        for args in s["arguments"]:
            h.update(json.dumps([str(a) for a in args], ensure_ascii=False).encode())
        h.update(str(s["target"]).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=256)
def _sha256_file(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data_file_hashes(leaf_tasks: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    out = {}
    for name, task in leaf_tasks.items():
        cfg = {"dataset_kwargs": task.config.dataset_kwargs, "process_docs": task.config.process_docs}
        files = [p for p in qtasks.data_files(cfg) if p.is_file()] if name.startswith("qft_") else []
        if files:
            out[name] = {str(p): _sha256_file(str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files}
    return out


def _mmlu_block(rows: dict[str, dict], categories: Mapping[str, str]) -> dict:
    def agg(items: list[dict]) -> dict:
        items = [r for r in items if r["acc"] is not None and r["n"]]
        if not items:
            return {"acc_micro": None, "acc_micro_stderr": None, "acc_macro": None,
                    "acc_macro_stderr": None, "n": 0, "n_subjects": 0}
        n = sum(r["n"] for r in items)
        se = [r["acc_stderr"] or 0.0 for r in items]
        return {
            "acc_micro": sum(r["acc"] * r["n"] for r in items) / n,
            "acc_micro_stderr": math.sqrt(sum((r["n"] * s) ** 2 for r, s in zip(items, se))) / n,
            "acc_macro": sum(r["acc"] for r in items) / len(items),
            "acc_macro_stderr": math.sqrt(sum(s * s for s in se)) / len(items),
            "n": n,
            "n_subjects": len(items),
        }

    block = agg(list(rows.values()))
    block["categories"] = {
        cat: agg([r for s, r in rows.items() if categories.get(s) == cat]) for cat in qtasks.MMLU_CATEGORIES
    }
    block["subjects"] = {s: dict(r, category=categories.get(s)) for s, r in sorted(rows.items())}
    return block


def summarize(results: Mapping, loaded: Mapping[str, tuple[Any, list]] | None = None) -> dict:
    """Clean metrics + provenance from an lm-eval ``simple_evaluate`` result dict."""
    res = results["results"]
    groups = results.get("groups", {})
    nshot = results.get("n-shot", {})
    versions = results.get("versions", {})
    subjects = qtasks.mmlu_subjects()

    per_task: dict[str, dict] = {}
    mmlu_rows: dict[str, dict[str, dict]] = {}
    leaf_names = [t.task_name for _, leaves in loaded.values() for t in leaves] if loaded else [
        k for k in res if k not in groups]
    for task in leaf_names:
        r = res.get(task, {})
        row = {
            "acc": _metric(r, "acc"), "acc_stderr": _stderr(r, "acc"),
            "acc_norm": _metric(r, "acc_norm"), "acc_norm_stderr": _stderr(r, "acc_norm"),
            "n": _n(results, task), "num_fewshot": nshot.get(task), "version": versions.get(task),
            "alias": r.get("alias", task),
        }
        for metric in PERPLEXITY_METRICS:  # a rolling log-likelihood task (qft_alpaca_ppl, wikitext)
            if _metric(r, metric) is not None:
                row[metric] = _metric(r, metric)
        m = SUBJECT_TASK.match(task)
        if m and m["subject"] in subjects:
            mmlu_rows.setdefault(m["suite"], {})[m["subject"]] = row
        else:
            per_task[task] = row

    mmlu = {}
    for suite, rows in mmlu_rows.items():
        block = _mmlu_block(rows, subjects)
        shots = {r["num_fewshot"] for r in rows.values()}
        block["num_fewshot"] = shots.pop() if len(shots) == 1 else sorted(shots)
        g = groups.get(suite) or res.get(suite) or {}
        block["lm_eval_group_acc"] = _metric(g, "acc")
        for cat in qtasks.MMLU_CATEGORIES:
            cg = groups.get(f"{suite}_{cat}") or res.get(f"{suite}_{cat}") or {}
            block["categories"][cat]["lm_eval_group_acc"] = _metric(cg, "acc")
        mmlu[suite] = block

    # commonsense plain mean (the seven zero-shot tasks of the QLoRA/QA-LoRA family of papers)
    canon: dict[str, str] = {}
    for task in per_task:
        base = task[4:] if task.startswith("qft_") else task
        if base in qtasks.COMMONSENSE_TASKS and per_task[task]["acc"] is not None:
            canon.setdefault(base, task)
    commonsense = None
    if all(t in canon for t in qtasks.COMMONSENSE_TASKS):
        rows = [per_task[canon[t]] for t in qtasks.COMMONSENSE_TASKS]
        commonsense = {
            "acc_mean": sum(r["acc"] for r in rows) / len(rows),
            "acc_norm_else_acc_mean": sum(r["acc_norm"] if r["acc_norm"] is not None else r["acc"]
                                          for r in rows) / len(rows),
            "tasks": {t: canon[t] for t in qtasks.COMMONSENSE_TASKS},
        }

    configs = results.get("configs", {})
    samples = results.get("samples") or {}
    provenance = {
        "lm_eval_version": _lm_eval_version(),
        "transformers_version": _version("transformers"),
        "torch_version": _version("torch"),
        "task_versions": dict(versions),
        "task_config_sha256": {t: _hash_config(c) for t, c in configs.items()},
        "prompts_sha256": {t: _prompt_hash(s) for t, s in samples.items() if s},
        "num_fewshot": dict(nshot),
        "n_samples": {t: dict(v) for t, v in results.get("n-samples", {}).items()},
        "lm_eval_config": {k: v for k, v in (results.get("config") or {}).items()
                           if k in ("limit", "bootstrap_iters", "random_seed", "numpy_seed",
                                    "torch_seed", "fewshot_seed", "batch_size")},
    }
    return {"tasks": per_task, "mmlu": mmlu, "commonsense": commonsense, "items": items_of(samples),
            "provenance": provenance}


#: the metrics of a rolling log-likelihood (perplexity) task, as lm-eval's wikitext reports them
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first maximum, as numpy's argmax


def items_of(samples: Mapping[str, list[dict]]) -> dict[str, dict[str, list]]:
    """Per-item results of every leaf task, columnar and sorted by ``doc_id``: ``doc_id``, ``doc_hash`` (lm-eval's
    hash of the document, so that two evaluations can be checked to score the same items), ``target``, ``pred``
    (the choice with the highest log-likelihood; ``pred_norm`` by length-normalised log-likelihood where the task
    reports ``acc_norm``), ``acc`` and ``acc_norm`` (0/1), and ``cluster`` where the documents name one (the
    synthetic task's ``fact``: questions about one fact are resampled together). Paired statistics between runs
    need exactly this. A perplexity task records each document's ``loglikelihood`` with its ``words`` and
    ``bytes`` instead (what its word/byte perplexity aggregates)."""
    out: dict[str, dict[str, list]] = {}
    for task, rows in samples.items():
        if not rows:
            continue
        rows = sorted(rows, key=lambda r: r["doc_id"])
        cols: dict[str, list] = {"doc_id": [int(r["doc_id"]) for r in rows],
                                 "doc_hash": [r.get("doc_hash") for r in rows],
                                 "target": [r.get("target") for r in rows]}
        lls = []
        for r in rows:
            resps = r.get("filtered_resps") or []
            try:
                lls.append([float(x[0] if isinstance(x, (list, tuple)) else x) for x in resps])
            except (TypeError, ValueError):  # not a log-likelihood task (e.g. generation): no prediction index
                lls.append(None)
        cols["pred"] = [_argmax(v) if v else None for v in lls]
        facts = [r["doc"].get("fact") if isinstance(r.get("doc"), dict) else None for r in rows]
        if all(f is not None for f in facts):
            cols["cluster"] = [int(f) for f in facts]
        for metric in ("acc", "acc_norm"):
            if all(metric in r for r in rows):
                cols[metric] = [float(r[metric]) for r in rows]
        if all(isinstance(r.get("word_perplexity"), (list, tuple)) for r in rows):  # perplexity: per document
            cols["loglikelihood"] = [float(r["word_perplexity"][0]) for r in rows]
            cols["words"] = [int(r["word_perplexity"][1]) for r in rows]
            if all(isinstance(r.get("byte_perplexity"), (list, tuple)) for r in rows):
                cols["bytes"] = [int(r["byte_perplexity"][1]) for r in rows]
        out[task] = cols
    return out


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:  # pragma: no cover
        return None


__all__ = ["UnknownTaskError", "builtin_task_manager", "evaluate", "items_of", "resolve_tasks", "summarize"]
