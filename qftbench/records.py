"""The run records and their declared schemas (``qftbench/schemas/*.schema.yaml``).

A run folder holds ``config.yaml`` (the configuration that trained it; ``config.schema.yaml``, the run config's own
schema), ``accounting.json``, ``train.json`` and ``provenance.json`` (written by the finetune step) and one
``eval/<mode>/<tasks>.json`` per evaluation job (the evaluate step). Each has a JSON schema beside this module;
:func:`validate` checks one record against its schema and, for evaluation records, that the per-item results are
whole (every list of a task has one entry per item, and as many items as lm-eval's ``n`` for that task), which the
paired statistics (:mod:`qftbench.stats`) rely on. :func:`validate_run` checks every record of a run folder.

    from qftbench import records
    records.validate_run("results/runs/<run_id>")      # raises RecordError naming the file, field and value
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from methods.errors import QFTError

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
KINDS = ("config", "accounting", "train", "provenance", "eval")


class RecordError(QFTError, ValueError):
    """A record does not have the shape its schema declares."""


@functools.lru_cache(maxsize=None)
def schema(kind: str) -> dict:
    """The JSON schema of a record kind (one of :data:`KINDS`)."""
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {kind!r}; one of {', '.join(KINDS)}")
    return yaml.safe_load((SCHEMA_DIR / f"{kind}.schema.yaml").read_text())


def validate(kind: str, record: Mapping[str, Any], where: str = "") -> None:
    """Check ``record`` against the schema of ``kind``; for ``eval``, also that its per-item results are whole."""
    import jsonschema

    where = where or kind
    errors = sorted(jsonschema.Draft202012Validator(schema(kind)).iter_errors(record),
                    key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        path = ".".join(str(p) for p in e.absolute_path) or "<top>"
        raise RecordError(f"{where}: {path}: {e.message}")
    if kind == "eval":
        if not record["tasks"] and not record["mmlu"]:
            raise RecordError(f"{where}: no scores (tasks and mmlu are both empty)")
        for group, block in record["mmlu"].items():  # its subjects' items add up to its n
            n_items = sum(len(cols["doc_id"]) for t, cols in record["items"].items() if t.startswith(group + "_"))
            if isinstance(block, Mapping) and block.get("n") is not None and n_items != block["n"]:
                raise RecordError(f"{where}: mmlu.{group}.n is {block['n']} but its subjects' items hold {n_items}")
        for task, cols in record["items"].items():
            lengths = {name: len(v) for name, v in cols.items()}
            if len(set(lengths.values())) > 1:
                raise RecordError(f"{where}: items.{task}: per-item lists of different lengths {lengths}")
            n = (record["tasks"].get(task) or {}).get("n")
            if n is not None and lengths and n != lengths["doc_id"]:
                raise RecordError(f"{where}: items.{task} holds {lengths['doc_id']} items but tasks.{task}.n is "
                                  f"{n}")


def validate_run(run_dir: str | os.PathLike) -> list[Path]:
    """Validate every record of a finished run folder; returns the files checked."""
    rd = Path(run_dir)
    checked = []
    if (rd / "config.yaml").is_file():
        validate("config", yaml.safe_load((rd / "config.yaml").read_text()), where=str(rd / "config.yaml"))
        checked.append(rd / "config.yaml")
    for kind in ("accounting", "train", "provenance"):
        p = rd / f"{kind}.json"
        if p.is_file():
            validate(kind, json.loads(p.read_text()), where=str(p))
            checked.append(p)
    for p in sorted((rd / "eval").glob("*/*.json")):
        validate("eval", json.loads(p.read_text()), where=str(p))
        checked.append(p)
    return checked
