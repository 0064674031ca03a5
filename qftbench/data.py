"""Instruction data for fine-tuning: loaders, the Alpaca prompt, tokenization and collation.

Every loader returns records ``{"instruction", "input", "output"}`` (all strings) and validates every
record up front, so a bad file fails before any training step with a :class:`DataError` that names the
file, the record index, the field and the fix.

Sources (``load_records(source, path)``)
---------------------------------------
``alpaca``
    Stanford Alpaca: the hub dataset ``tatsu-lab/alpaca`` (``datasets.load_dataset``), or a local JSON list
    of ``{instruction, input, output}`` (extra fields such as ``text`` are ignored).
``flan_v2``
    FLAN v2. Two record layouts are accepted, per record:

    * templated FLAN collection records ``{inputs, targets, ...}`` (the hub mirror ``SirNeural/flan_v2``,
      file ``cot_zs_noopt_train.jsonl.gz`` by default, or a local JSONL of the same layout):
      instruction = ``inputs``, input = "", output = ``targets``;
    * the un-templated chain-of-thought source records ``{task, question, answer, rationale}`` (the local
      mirror ``flan_v2_cot/flan_v2_cot_train.jsonl``): instruction = ``question``, input = "",
      output = ``"{rationale}\\nSo the answer is {answer}."`` (rationale first, then the answer, as in
      FLAN's CoT targets). The mirror stores line breaks as the two characters backslash-n; they are
      turned back into real newlines.
``local``
    Any local ``.json`` (a list of objects) or ``.jsonl`` (one object per line) file with
    ``instruction`` and ``output`` strings and an optional ``input`` string (missing input = "").
``synthetic``
    The embedded fictional-facts task of :mod:`qftbench.synthetic`, generated from ``seed`` (no file).

``prepare_data`` adds deterministic subsampling and a hold-out split and returns a :class:`DataInfo`
dict recording exactly what was used.

Prompt and tokenization follow Stanford Alpaca (exact ``PROMPT_DICT``) and QLoRA (source and target are
tokenized and truncated separately; labels are -100 on the prompt).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

from methods.errors import QFTError, did_you_mean

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_DICT",
    "PROMPTS",
    "SOURCES",
    "ALPACA_HUB_ID",
    "FLAN_V2_HUB_ID",
    "FLAN_V2_HUB_FILE",
    "DataError",
    "DataInfo",
    "file_sha256",
    "format_prompt",
    "load_alpaca",
    "load_flan_v2",
    "load_local_instructions",
    "load_records",
    "subsample",
    "prepare_data",
    "is_empty_output",
    "EMPTY_OUTPUTS",
    "tokenize_example",
    "tokenize_records",
    "InstructionCollator",
]

IGNORE_INDEX = -100

# Exactly the PROMPT_DICT of Stanford Alpaca's train.py (tatsu-lab/stanford_alpaca).
PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}

#: ``data.prompt``: ``alpaca`` is Stanford Alpaca's template as it is; ``alpaca-trailing-space`` ends the prompt
#: with "### Response: " (one trailing space), as the released QLoRA, QA-LoRA and Q-BaRA/QA-HiRA code does
#: (qlora.py ALPACA_PROMPT_DICT; qalora.py:459-470; qbaraqahira.py = qlora.py). With a LLaMA tokenizer the space
#: becomes a token of its own before the response.
PROMPTS = {
    "alpaca": PROMPT_DICT,
    "alpaca-trailing-space": {k: v + " " for k, v in PROMPT_DICT.items()},
}

ALPACA_HUB_ID = "tatsu-lab/alpaca"
FLAN_V2_HUB_ID = "SirNeural/flan_v2"
FLAN_V2_HUB_FILE = "cot_zs_noopt_train.jsonl.gz"
SOURCES = ("alpaca", "flan_v2", "local", "synthetic")
#: what to do with a record whose output is empty (or whitespace only). ``keep``: train on it, the target
#: being EOS alone -- what Stanford Alpaca's train.py and QLoRA's qlora.py do with the 49 such records of
#: alpaca_data.json; ``drop``: remove them from the source before subsampling.
EMPTY_OUTPUTS = ("keep", "drop")


class DataError(QFTError, ValueError):
    """Bad or missing instruction data; the message names the file, record, field and the fix."""


class DataInfo(TypedDict, total=False):
    """What ``prepare_data`` used: enough to reproduce the exact training set."""

    source: str            # alpaca | flan_v2 | local | synthetic
    path: str | None       # local file (absolute), or None
    hub_id: str | None     # hub dataset id, or None
    hub_file: str | None   # data file inside the hub dataset, or None
    sha256: str | None     # sha256 of the local file, or None (hub, synthetic)
    n_total: int           # records available in the source
    n: int                 # training records used
    n_holdout: int         # hold-out records
    seed: int              # subsampling / split seed
    empty_outputs: str     # keep (train on EOS alone, as the papers' code does) | drop
    n_empty_output_total: int  # records with an empty output in the source (before a drop)
    n_empty_output: int    # of them, in the training set (0 with drop)
    synthetic: dict | None  # generator arguments for the synthetic source


# -------------------------------------------------------------------------------------- helpers
def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        return True
    if name.endswith((".json", ".jsonl", ".gz", ".csv", ".parquet", ".txt", ".tsv")):
        return True
    if name.count("/") > 1 or "\\" in name:
        return True
    return os.path.exists(name)


def _check_file(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            f"{what} file {str(path)!r} does not exist (resolved to {p.resolve()}). Fix: check the path; "
            f"shared mirrors live under a data root such as ../shared/data (set QFTBENCH_DATA_ROOT), or use "
            f"source 'synthetic' which needs no file."
        )
    if p.is_dir():
        raise DataError(f"{what} path {str(path)!r} is a folder, not a file. Fix: pass the .json or .jsonl file.")
    return p


def _read_json_records(path: Path) -> list[Any]:
    """Read a .json list or a .jsonl (optionally .gz) file; raise DataError for anything else."""
    name = path.name.lower()
    opener = gzip.open if name.endswith(".gz") else open
    base = name[:-3] if name.endswith(".gz") else name
    if base.endswith(".jsonl"):
        kind = "jsonl"
    elif base.endswith(".json"):
        kind = "json"
    else:
        raise DataError(
            f"Unknown data format of {str(path)!r}: expected a .json file (a list of objects) or a .jsonl "
            f"file (one JSON object per line), optionally gzipped. Fix: convert the file to one of these, "
            f"with fields instruction, input, output."
        )
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            if kind == "json":
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). "
                        f"Fix: a .json file must hold one JSON list of objects; use .jsonl for one object per line."
                    ) from exc
                if isinstance(data, dict):
                    keys = [k for k, v in data.items() if isinstance(v, list)]
                    hint = f' It is an object whose list is under key(s) {keys}: save that list alone.' if keys else ""
                    raise DataError(
                        f"{str(path)!r} holds a JSON object, not a list of records.{hint} Fix: the file must be a "
                        f"JSON list [{{\"instruction\": ..., \"input\": ..., \"output\": ...}}, ...]."
                    )
                if not isinstance(data, list):
                    raise DataError(
                        f"{str(path)!r} holds a JSON {type(data).__name__}, not a list of records. Fix: the "
                        f"file must be a JSON list of objects with instruction, input, output."
                    )
                return data
            records = []
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{str(path)!r} line {lineno} (record {len(records)}) is not valid JSON ({exc.msg}). "
                        f"Fix: a .jsonl file needs one complete JSON object per line."
                    ) from exc
            return records
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not UTF-8 text ({exc}). Fix: re-encode the file as UTF-8.") from exc
    except (OSError, EOFError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"Could not read {str(path)!r}: {exc}. Fix: check the file (a truncated .gz?).") from exc


def _field(rec: Any, i: int, field: str, where: str, fix: str, required: bool = True) -> str:
    if not isinstance(rec, dict):
        raise DataError(
            f"{where}: record {i} is a {type(rec).__name__}, not an object. Fix: every record must be a JSON "
            f"object ({fix})."
        )
    if field not in rec or rec[field] is None:
        if not required:
            return ""
        hint = did_you_mean(field, rec.keys())
        raise DataError(
            f"{where}: record {i} has no field {field!r} (it has {sorted(rec.keys())}).{hint} Fix: {fix}."
        )
    value = rec[field]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: record {i} field {field!r} is a {type(value).__name__}, not a string. Fix: {fix}."
        )
    return value


def _validate_instructions(raw: Sequence[Any], where: str) -> list[dict[str, str]]:
    """Every record checked (an object with string fields); an empty *output* is allowed (see
    :data:`EMPTY_OUTPUTS`), an empty *instruction* is not: there would be no prompt to learn from."""
    fix = "each record needs string fields 'instruction' and 'output' (and optionally 'input')"
    out = []
    for i, rec in enumerate(raw):
        instruction = _field(rec, i, "instruction", where, fix)
        inp = _field(rec, i, "input", where, fix, required=False)
        output = _field(rec, i, "output", where, fix)
        if not instruction.strip():
            raise DataError(f"{where}: record {i} field 'instruction' is empty. Fix: remove or fill the record.")
        out.append({"instruction": instruction, "input": inp, "output": output})
    if not out:
        raise DataError(f"{where}: no records. Fix: point at a non-empty data file.")
    return out


def is_empty_output(record: dict[str, str]) -> bool:
    """True when the record's output is empty or whitespace only (its target is then EOS alone)."""
    return not record["output"].strip()


def _hub_records(hub_id: str, **kw) -> list[dict[str, Any]]:
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, split="train", **kw)
    except Exception as exc:  # offline, unknown id, auth ...
        raise DataError(
            f"Could not load the hub dataset {hub_id!r} ({type(exc).__name__}: {exc}). Fix: check the id and "
            f"network access, or pass a local file path (e.g. a mirror under QFTBENCH_DATA_ROOT), or use "
            f"source 'synthetic' which needs no download."
        ) from exc
    return [dict(r) for r in ds]


# -------------------------------------------------------------------------------------- loaders
def load_alpaca(path_or_hub: str | os.PathLike = ALPACA_HUB_ID) -> list[dict[str, str]]:
    """Alpaca records from the hub (default ``tatsu-lab/alpaca``) or a local JSON/JSONL file."""
    name = os.fspath(path_or_hub)
    if _looks_like_path(name):
        p = _check_file(name, "Alpaca")
        return _validate_instructions(_read_json_records(p), str(p))
    return _validate_instructions(_hub_records(name), f"hub dataset {name}")


def _flan_record(rec: Any, i: int, where: str) -> dict[str, str]:
    if isinstance(rec, dict) and "inputs" in rec:
        fix = "a FLAN collection record needs string fields 'inputs' and 'targets'"
        return {"instruction": _field(rec, i, "inputs", where, fix), "input": "",
                "output": _field(rec, i, "targets", where, fix)}
    if isinstance(rec, dict) and "question" in rec:
        fix = "a FLAN CoT record needs string fields 'question', 'answer' and 'rationale'"
        question = _field(rec, i, "question", where, fix)
        answer = _field(rec, i, "answer", where, fix)
        rationale = _field(rec, i, "rationale", where, fix)
        unesc = (lambda s: s.replace("\\n", "\n"))
        rationale = unesc(rationale).strip()
        output = f"{rationale}\nSo the answer is {unesc(answer).strip()}." if rationale else \
            f"The answer is {unesc(answer).strip()}."
        return {"instruction": unesc(question).strip(), "input": "", "output": output}
    keys = sorted(rec.keys()) if isinstance(rec, dict) else type(rec).__name__
    raise DataError(
        f"{where}: record {i} is neither a FLAN collection record (fields 'inputs', 'targets') nor a FLAN CoT "
        f"record (fields 'question', 'answer', 'rationale'); it has {keys}. Fix: use one of these layouts, or "
        f"load the file as source 'local' with fields instruction, input, output."
    )


def load_flan_v2(path_or_hub: str | os.PathLike = FLAN_V2_HUB_ID,
                 hub_file: str | None = FLAN_V2_HUB_FILE) -> list[dict[str, str]]:
    """FLAN v2 records from a local JSONL (either layout, see the module docstring) or the hub."""
    name = os.fspath(path_or_hub)
    if _looks_like_path(name):
        p = _check_file(name, "FLAN v2")
        raw, where = _read_json_records(p), str(p)
    else:
        raw = _hub_records(name, **({"data_files": hub_file} if hub_file else {}))
        where = f"hub dataset {name}" + (f" ({hub_file})" if hub_file else "")
    recs = [_flan_record(r, i, where) for i, r in enumerate(raw)]
    return _validate_instructions(recs, where)


def load_local_instructions(path: str | os.PathLike) -> list[dict[str, str]]:
    """Records of a local .json list / .jsonl file with instruction, (input,) output fields."""
    p = _check_file(path, "Instruction data")
    return _validate_instructions(_read_json_records(p), str(p))


def load_records(source: str, path: str | os.PathLike | None = None, **synthetic_kw) -> list[dict[str, str]]:
    """Records of ``source`` (see ``SOURCES``); ``path`` is a local file or a hub id (alpaca, flan_v2).

    For ``synthetic``, ``synthetic_kw`` are passed to :func:`qftbench.synthetic.generate_world`
    (``seed``, ``n_entities``) and ``phrasings_per_fact``.
    """
    if source == "alpaca":
        return load_alpaca(path if path is not None else ALPACA_HUB_ID)
    if source == "flan_v2":
        return load_flan_v2(path if path is not None else FLAN_V2_HUB_ID)
    if source == "local":
        if path is None:
            raise DataError("Source 'local' needs a path. Fix: pass path=<file.json or file.jsonl>.")
        return load_local_instructions(path)
    if source == "synthetic":
        from qftbench import synthetic

        world = synthetic.generate_world(synthetic_kw.get("seed", 0),
                                         synthetic_kw.get("n_entities", synthetic.DEFAULT_N_ENTITIES))
        recs = synthetic.training_records(world, synthetic_kw.get("phrasings_per_fact",
                                                                  synthetic.DEFAULT_PHRASINGS))
        return _validate_instructions(recs, "synthetic")
    raise DataError(
        f"Unknown data source {source!r}.{did_you_mean(source, SOURCES)} Fix: use one of {list(SOURCES)}."
    )


# ------------------------------------------------------------------------------ subsample / split
def _order(n: int, seed: int) -> list[int]:
    """A seeded permutation of range(n), stable across Python versions and platforms (sha256 keys)."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())


def subsample(records: Sequence[Any], n: int | None, seed: int = 0,
              holdout: int = 0) -> tuple[list[Any], list[Any]]:
    """Deterministic ``(train, holdout)``: disjoint, drawn by a seeded permutation.

    The hold-out set is the first ``holdout`` records of the permutation, so it does not change with ``n``;
    the training set is the next ``n`` (all remaining when ``n`` is None). Both keep the file order.
    """
    total = len(records)
    if holdout < 0 or (n is not None and n < 1):
        raise DataError(f"Need n >= 1 and holdout >= 0, got n={n}, holdout={holdout}.")
    if holdout + (n or 1) > total:
        raise DataError(
            f"Asked for {n if n is not None else 'all'} training + {holdout} hold-out records, but the source "
            f"has only {total}. Fix: lower n or holdout."
        )
    perm = _order(total, seed)
    held = sorted(perm[:holdout])
    rest = perm[holdout:]
    train = sorted(rest if n is None else rest[:n])
    return [records[i] for i in train], [records[i] for i in held]


def prepare_data(source: str, path: str | os.PathLike | None = None, n: int | None = None, seed: int = 0,
                 holdout: int = 0, empty_outputs: str = "keep",
                 **synthetic_kw) -> tuple[list[dict[str, str]], list[dict[str, str]], DataInfo]:
    """Load, validate, subsample and split: ``(train_records, holdout_records, DataInfo)``.

    ``empty_outputs`` (:data:`EMPTY_OUTPUTS`): ``keep`` trains on records with an empty output (target = EOS
    alone), ``drop`` removes them before subsampling; either way ``DataInfo`` counts them."""
    if empty_outputs not in EMPTY_OUTPUTS:
        raise DataError(f"empty_outputs={empty_outputs!r} is not allowed.{did_you_mean(str(empty_outputs), EMPTY_OUTPUTS)} "
                        f"Fix: use one of {list(EMPTY_OUTPUTS)}.")
    records = load_records(source, path, **synthetic_kw)
    n_empty_total = sum(map(is_empty_output, records))
    if empty_outputs == "drop" and n_empty_total:
        records = [r for r in records if not is_empty_output(r)]
        if not records:
            raise DataError(f"{source} {path}: every record has an empty output. Fix: use empty_outputs='keep' "
                            f"or other data.")
    train, held = subsample(records, n, seed=seed, holdout=holdout)
    info: DataInfo = {"source": source, "path": None, "hub_id": None, "hub_file": None, "sha256": None,
                      "n_total": len(records), "n": len(train), "n_holdout": len(held), "seed": int(seed),
                      "empty_outputs": empty_outputs, "n_empty_output_total": n_empty_total,
                      "n_empty_output": sum(map(is_empty_output, train)), "synthetic": None}
    if source == "synthetic":
        from qftbench import synthetic

        info["synthetic"] = {"seed": synthetic_kw.get("seed", 0),
                             "n_entities": synthetic_kw.get("n_entities", synthetic.DEFAULT_N_ENTITIES),
                             "phrasings_per_fact": synthetic_kw.get("phrasings_per_fact", synthetic.DEFAULT_PHRASINGS),
                             "version": synthetic.GENERATOR_VERSION}
    else:
        name = os.fspath(path) if path is not None else (ALPACA_HUB_ID if source == "alpaca" else FLAN_V2_HUB_ID)
        if _looks_like_path(name):
            p = Path(name).expanduser().resolve()
            info["path"] = str(p)
            info["sha256"] = file_sha256(p)
        else:
            info["hub_id"] = name
            info["hub_file"] = FLAN_V2_HUB_FILE if source == "flan_v2" else None
    return train, held, info


# ------------------------------------------------------------------------------------ tokenization
def format_prompt(record: dict[str, str], template: str = "alpaca") -> tuple[str, str]:
    """``(prompt, response)`` of an instruction record with the Stanford Alpaca prompt (``template``: a key of
    :data:`PROMPTS`, the run's ``data.prompt``)."""
    if template not in PROMPTS:
        raise DataError(f"data.prompt={template!r} is not one of {list(PROMPTS)}.")
    t = PROMPTS[template]
    prompt = (t["prompt_input"] if record.get("input", "") else t["prompt_no_input"]).format_map(record)
    return prompt, record["output"]


def tokenize_example(tokenizer, prompt: str, response: str, source_max_len: int = 384,
                     target_max_len: int = 128) -> dict[str, list[int]]:
    """Tokenize one example QLoRA-style: ``{input_ids, labels, attention_mask}`` (lists of ints).

    The prompt is tokenized with the tokenizer's special tokens (e.g. Llama's BOS; SmolLM2 adds none) and
    truncated to ``source_max_len`` tokens; the response is tokenized without special tokens, followed by
    the EOS id, and the whole target is truncated to ``target_max_len`` (so a very long response loses its
    EOS, as in QLoRA). ``labels`` is -100 on every prompt token and equals ``input_ids`` on the target.
    """
    if tokenizer.eos_token_id is None:
        raise DataError("The tokenizer has no EOS token. Fix: set tokenizer.eos_token before tokenizing.")
    if source_max_len < 1 or target_max_len < 1:
        raise DataError(f"source_max_len and target_max_len must be >= 1, got {source_max_len}, {target_max_len}.")
    src = tokenizer(prompt, add_special_tokens=True)["input_ids"][:source_max_len]
    tgt = (tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:target_max_len]
    input_ids = list(src) + list(tgt)
    labels = [IGNORE_INDEX] * len(src) + list(tgt)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": [1] * len(input_ids)}


def tokenize_records(tokenizer, records: Sequence[dict[str, str]], source_max_len: int = 384,
                     target_max_len: int = 128, template: str = "alpaca") -> list[dict[str, list[int]]]:
    """:func:`tokenize_example` over Alpaca-formatted records (a list usable as a torch Dataset)."""
    return [tokenize_example(tokenizer, *format_prompt(r, template), source_max_len, target_max_len)
            for r in records]


@dataclass
class InstructionCollator:
    """Right-pads a batch: input_ids with ``pad_token_id``, labels with -100, attention_mask with 0."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer, pad_to_multiple_of: int | None = None) -> InstructionCollator:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise DataError("The tokenizer has neither a pad nor an EOS token. Fix: set tokenizer.pad_token.")
        return cls(int(pad), pad_to_multiple_of)

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise DataError("Cannot collate an empty batch.")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        ids = torch.full((len(features), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long)
            mask[row, :n] = torch.as_tensor(f.get("attention_mask", [1] * n), dtype=torch.long)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
