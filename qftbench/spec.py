"""The run specification: one run of a sweep, resolved and validated once, with everything the DAG needs.

:func:`qftbench.sweep.specs` turns a sweep into ``{run_id: RunSpec}``; the Snakefile reads its jobs from these
(``workflow/rules/common.smk``): the run id (its folder), the quantized base it shares (``base_id``, its folder under
``results/cache/bases/``), its evaluation jobs, and the Method, built once from the resolved config. The
``config`` is the resolved run config (``qftbench/schemas/config.schema.yaml``, every default filled in): the jobs
get views of it as JSON (``qftbench.config.training_view`` for the finetune job, the whole for evaluation), and
the run folder's ``config.yaml`` is its training view, exactly what trained the run.

    from qftbench import sweep
    spec = sweep.specs(sweep.load("config/tiny.yaml"))["tiny-llama-qlora-r4-4b-synthetic-s0-21fb8a35"]
    spec.method.hp["rank"], spec.base_id, [job.path for job in spec.evals]
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from . import config


@dataclasses.dataclass(frozen=True)
class EvalJob:
    """One evaluation job: a deployment mode and a task group (``shots``: None for the tasks' own few-shot
    settings), its key (the file name, e.g. ``mmlu-5shot``) and its record's path."""

    mode: str
    tasks: tuple[str, ...]
    shots: int | None
    key: str
    path: str


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One run: ``config`` (resolved; not to be modified), the ``method`` built from it, and what derives from it."""

    run_id: str
    config: Mapping[str, Any]
    method: Any  # methods.Method
    base_id: str
    evals: tuple[EvalJob, ...]

    @property
    def model_label(self) -> str:
        return self.config["sweep"]["model_label"] if "sweep" in self.config else self.config["model"]["name"]

    @property
    def data_label(self) -> str:
        return self.config["sweep"]["data_label"] if "sweep" in self.config else self.config["data"]["source"]

    def row(self) -> dict[str, Any]:
        """The run's line of the sweep's ``runs.tsv`` (:func:`qftbench.sweep.runs_table`)."""
        m, cfg = self.config["method"], self.config
        return {"run_id": self.run_id, "model": self.model_label, "method": m["name"], "rank": m.get("rank"),
                "bits": m.get("bits"), "group": m.get("group_size"), "data": self.data_label,
                "lr": None if m["name"] == "base" else cfg["train"]["lr"], "seed": cfg["seed"],
                "base": self.base_id, "evaluations": len(self.evals)}


def eval_jobs(cfg: Mapping[str, Any], method=None) -> tuple[EvalJob, ...]:
    """One evaluation job per (deployment mode, task group). ``deploy`` is the method's own mode; ``requant``
    becomes one mode per ``eval.requant`` setting when that is a list (``requant-w3g32``, ...); the un-tuned base
    is evaluated as ``base``. ``method``: the run's built Method (built here when not given)."""
    import methods

    from . import pipeline

    method = method if method is not None else methods.from_config(cfg["method"])
    modes: list[str] = []
    for m in config.eval_modes(cfg):
        m = method.deploy if m == "deploy" else m
        if method.name == "base":
            m = "base"
        if m not in modes:
            modes.append(m)
    out = []
    for mode in modes:
        for tasks, shots in pipeline.eval_groups(cfg):
            key = pipeline._tasks_key(tasks, shots)
            out.append(EvalJob(mode=mode, tasks=tuple(tasks), shots=shots, key=key,
                               path=str(pipeline.run_dir(cfg) / "eval" / mode / f"{key}.json")))
    return tuple(out)


def from_config(cfg: Mapping[str, Any], method=None) -> RunSpec:
    """The RunSpec of a resolved run config (:func:`qftbench.config.resolve`); ``method``: its Method when the
    caller has built it already (resolve does), so that each run's Method is built once."""
    import methods

    from . import pipeline

    method = method if method is not None else methods.from_config(cfg["method"])
    return RunSpec(run_id=config.run_id(cfg), config=cfg, method=method,
                   base_id=pipeline.base_dir(cfg, method).name, evals=eval_jobs(cfg, method))
