"""The pipeline steps behind ``qftbench prepare | finetune | evaluate | run``, one validated run config each.

Layout (``paths.results`` = ``results``, ``paths.scratch`` = ``scratch``)::

    results/cache/bases/<model>-<base hash>/      the quantized base, shared by every run with the same base
    results/cache/data/synthetic-<seed>-<n>/       the generated synthetic data
    results/runs/<run_id>/                         one finished run: config.yaml, adapter/, train_log.jsonl,
                                                   train.json, accounting.json, provenance.json,
                                                   eval/<mode>/<tasks>.json, metrics.json
    scratch/<run_id>/                              checkpoints (resume); never a workflow output

Every file is written atomically; ``train.json`` is written last by :func:`finetune_step`, so its presence
marks a finished run, which is never trained again or overwritten.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml

import methods
from methods.atomic import write_json
from methods.base_io import load_quantized_base, save_quantized_base

from . import config
from .provenance import record

log = logging.getLogger("qftbench")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ paths
def results_dir(cfg) -> Path:
    return Path(cfg["paths"]["results"])


def run_dir(cfg) -> Path:
    return results_dir(cfg) / "runs" / config.run_id(cfg)


def scratch_dir(cfg) -> Path:
    return Path(cfg["paths"]["scratch"]) / config.run_id(cfg)


def model_cache(cfg) -> Path | None:
    return Path(cfg["paths"]["cache"]) if cfg["paths"].get("cache") else None


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def base_dir(cfg, method=None) -> Path:
    """The folder of the run's quantized base, named by what defines it (model, quantizer, bits, group, and
    the calibration for GPTQ); ``method``: the run's Method when the caller has built it."""
    method = method if method is not None else build_method(cfg)
    key = {"model": cfg["model"], "base": method.base_key()}
    if method.hp.get("quantizer") == "gptq":
        key["calibration"] = calibration_spec(cfg)
    name = Path(str(cfg["model"]["name"])).name
    return results_dir(cfg) / "cache" / "bases" / f"{name}-{_hash(key)}"


def build_method(cfg):
    return methods.from_config(cfg["method"])


def _base_method(cfg) -> dict:
    """The smallest method entry that builds the same base as ``cfg``'s method (equal ``base_key``): the un-tuned
    ``base`` method where it can express the quantizer (16-bit, INTk groups, NF4), else the run's own method
    without the hyperparameters that do not change its base (rank, alpha, dropout, ... for every method but
    LoftQ, whose base depends on its initialisation)."""
    key = build_method(cfg).base_key()

    def same(entry) -> bool:
        try:
            return build_method({"method": entry}).base_key() == key
        except Exception:  # noqa: BLE001 - an entry that cannot be built is simply not a candidate
            return False

    s = key.get("scheme")
    targets = {"targets": key["targets"]} if key.get("targets", "all-linear") != "all-linear" else {}
    if s is None:
        candidate = {"name": "base", "bits": 16, **targets}
    elif s["kind"] == "int" and s.get("tile") is None:
        candidate = {"name": "base", "bits": s["bits"], "group_size": s["group_size"], "quant_type": "int",
                     "quantizer": key.get("quantizer", "rtn"), **targets}
    else:
        candidate = {"name": "base", "bits": s["bits"], "quant_type": "nf", **targets}
    if same(candidate):
        return candidate
    entry = dict(cfg["method"])
    for k in sorted(k for k in entry if k != "name"):
        trial = {kk: v for kk, v in entry.items() if kk != k}
        if same(trial):
            entry = trial
    return entry


def base_spec(cfg) -> dict:
    """The run-config fragment that defines ``cfg``'s quantized base and nothing else: the model, the smallest
    method entry with the same base (:func:`_base_method`), the calibration (and the data it may be drawn from)
    for GPTQ, and where results and caches live. Every run that shares the base gives the same spec, so the
    Snakemake job that builds it has the same identity in every sweep (its output folder is named by the same
    fields, :func:`base_dir`); resolved with every other setting at its default."""
    method = build_method(cfg)
    spec = {"model": cfg["model"], "method": _base_method(cfg),
            "paths": {"results": cfg["paths"]["results"], "cache": cfg["paths"].get("cache")}}
    if cfg.get("plugins") and spec["method"]["name"] not in methods.registry.BUILTIN:
        spec["plugins"] = cfg["plugins"]  # the job must import the module that defines the method
    if method.hp.get("quantizer") == "gptq":
        spec["calibration"] = cfg["calibration"]
        if cfg["calibration"]["source"] in (None, "synthetic"):  # drawn from the run's data (or its synthetic
            spec["data"] = cfg["data"]                            # world): that data defines the base too
    return spec


# ------------------------------------------------------------------------------------------------- data
def synthetic_dir(cfg) -> Path:
    s = cfg["data"]["synthetic"]
    parts = [s["seed"], s.get("n_entities") or "default"]
    if s.get("phrasings_per_fact") or s.get("eval_per_fact"):
        parts += [s.get("phrasings_per_fact") or "d", s.get("eval_per_fact") or "d"]
    return results_dir(cfg) / "cache" / "data" / ("synthetic-" + "-".join(str(p) for p in parts))


def ensure_synthetic(cfg) -> Path:
    from . import synthetic

    d = synthetic_dir(cfg)
    if not (d / "manifest.json").is_file() or not (d / "validation.jsonl").is_file():  # (v1 had no validation)
        s = cfg["data"]["synthetic"]
        kw = {k: v for k, v in s.items()
              if v is not None and k in ("n_entities", "phrasings_per_fact", "eval_per_fact")}
        synthetic.write_synthetic(d, seed=s["seed"], **kw)
    return d


def load_records(cfg) -> tuple[list, list, dict]:
    from .data import prepare_data

    d = cfg["data"]
    if d["source"] == "synthetic":
        path = ensure_synthetic(cfg) / "train.json"
        train, held, info = prepare_data("local", path, n=d["n"], seed=d["seed"], holdout=d["holdout"],
                                         empty_outputs=d["empty_outputs"])
        info["source"] = "synthetic"
        info["synthetic"] = json.loads((synthetic_dir(cfg) / "manifest.json").read_text())
        return train, held, info
    return prepare_data(d["source"], d["path"], n=d["n"], seed=d["seed"], holdout=d["holdout"],
                        empty_outputs=d["empty_outputs"])


def calibration_spec(cfg) -> dict:
    c = dict(cfg["calibration"])
    if c["source"] is None:  # default: the fine-tuning data
        c["source"], c["path"] = cfg["data"]["source"], cfg["data"]["path"]
    if c["source"] == "synthetic":  # the generated world is the data: its settings define the calibration windows
        c["synthetic"] = dict(cfg["data"]["synthetic"])
    return c


def calibration_batches(cfg, tokenizer) -> list[torch.Tensor]:
    from methods.quant.gptq import calibration_from_texts

    from .data import format_prompt, prepare_data

    c = calibration_spec(cfg)
    if c["source"] == "synthetic":
        records, _, _ = prepare_data("local", ensure_synthetic(cfg) / "train.json")
    else:
        records, _, _ = prepare_data(c["source"], c["path"])
    texts = ["".join(format_prompt(r)) for r in records]
    return calibration_from_texts(tokenizer, texts, c["n_samples"], c["seq_len"], c["seed"])


# ------------------------------------------------------------------------------------------------ model
def load_model(cfg):
    from .models import load_model as _load

    # the model is the same for every run seed (tiny-llama's random weights are seed 0's: the training seed
    # must not change the pretrained model, which the runs of all seeds share through one quantized base)
    model, tok = _load(cfg["model"]["name"], dtype=DTYPES.get(cfg["model"]["dtype"], torch.float32),
                       cache_dir=model_cache(cfg), seed=0)
    if torch.cuda.is_available() and not getattr(model, "hf_device_map", None):
        from .gpus import check_fits_one_gpu

        check_fits_one_gpu(model, cfg["model"]["name"])
        model.to("cuda")  # one GPU: quantize, train and evaluate there (several GPUs: device_map="auto")
    return model, tok


def prepare_step(cfg, *, base_only: bool = False) -> Path:
    """Make the model, the data and the quantized base available (each computed once, then reused).
    ``base_only``: the quantized base alone (the Snakemake job of a :func:`base_spec`; each run's own jobs make
    its data)."""
    if not base_only and (cfg["data"]["source"] == "synthetic"
                          or any(t.startswith("qft_synthetic") for t in cfg["eval"]["tasks"])):
        ensure_synthetic(cfg)
    d = base_dir(cfg)
    if (d / "base_manifest.json").is_file():
        return d
    t0 = time.perf_counter()
    model, tok = load_model(cfg)
    method = build_method(cfg)
    calib = calibration_batches(cfg, tok) if method.hp.get("quantizer") == "gptq" else None
    method.quantize(model, calib)
    save_quantized_base(model, d, method)
    write_json(d / "provenance.json", record(step="prepare", seconds=time.perf_counter() - t0,
                                                    model=cfg["model"], base_key=method.base_key(),
                                                    calibration=calibration_spec(cfg) if calib else None))
    return d


def prepared_model(cfg):
    """``(model, tokenizer, method)``: the fresh model with the cached quantized base and this method's adapters."""
    d = prepare_step(cfg)
    model, tok = load_model(cfg)
    method = build_method(cfg)
    load_quantized_base(model, d, method)
    cast_norms(model, cfg["train"]["norm_dtype"])
    method.inject(model, DTYPES[cfg["train"]["adapter_dtype"]])
    return model, tok, method


def cast_norms(model, norm_dtype: str) -> list[str]:
    """``train.norm_dtype: float32``: every module whose name contains ``norm`` (the RMSNorms, the final norm) holds
    float32 weights, as qlora.py:400-401 casts them before training (``model`` leaves them in the model's dtype).
    Each such norm hands its output on in the dtype of its input: under bf16 autocast (qlora.py's setting) that is
    exactly what the next matmul computes in anyway, and without autocast the next layer (a bf16 / fp16 linear,
    e.g. lm_head) gets the dtype it needs. Returns the names cast."""
    if norm_dtype == "model":
        return []
    names = [n for n, m in model.named_modules() if "norm" in n.rsplit(".", 1)[-1] and not list(m.children())]
    for n in names:
        mod = model.get_submodule(n).to(DTYPES[norm_dtype])
        mod.register_forward_hook(_output_in_input_dtype)
    return names


def _output_in_input_dtype(module, args, output):
    return output.to(args[0].dtype) if torch.is_tensor(output) and args and torch.is_tensor(args[0]) else output


# --------------------------------------------------------------------------------------------- finetune
def is_finished(cfg) -> bool:
    return (run_dir(cfg) / "train.json").is_file()


def finetune_step(cfg, *, stop_after: int | None = None) -> Path:
    """Fine-tune one run (resuming from scratch checkpoints); a finished run is left untouched."""
    from .accounting import account
    from .data import tokenize_records
    from .train import TrainConfig, finetune

    rd = run_dir(cfg)
    if is_finished(cfg):
        log.info("run %s is finished; not training it again", rd)
        return rd
    t0 = time.perf_counter()
    train_recs, _, data_info = load_records(cfg)  # bad data fails here, before any model work
    if data_info.get("n_empty_output_total"):
        log.warning("data: %d of the source's records have an empty output; %s (%d in this run's %d training "
                    "records, each trained on EOS alone)", data_info["n_empty_output_total"],
                    "kept" if data_info["empty_outputs"] == "keep" else "dropped (data.empty_outputs: drop)",
                    data_info["n_empty_output"], data_info["n"])
    model, tok, method = prepared_model(cfg)
    t_prep = time.perf_counter() - t0
    examples = tokenize_records(tok, train_recs, cfg["data"]["source_max_len"], cfg["data"]["target_max_len"],
                                cfg["data"]["prompt"])
    rd.mkdir(parents=True, exist_ok=True)
    # exactly the configuration that trained the run (what the finetune job got); each evaluation records its own
    # settings in its eval/<mode>/<tasks>.json ("eval_config"), so no section here can disagree with a job
    trained = config.training_view(cfg)
    (rd / "config.yaml").write_text("# the configuration that trained this run; each evaluation's settings are in "
                                    "its eval/<mode>/<tasks>.json (eval_config)\n"
                                    + yaml.safe_dump(trained, sort_keys=False))
    tcfg = TrainConfig(**cfg["train"], seed=cfg["seed"])
    n_trainable = methods.count_trainable(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if n_trainable:
        summary = finetune(model, examples, tcfg, scratch_dir(cfg), rd / "train_log.jsonl", pad_id=pad,
                           stop_after=stop_after)
        if not summary["finished"]:
            return rd
        methods.save_adapter(model, rd / "adapter")
    elif method.hp.get("adapter"):  # a trained adapter evaluated as it is (peft's adapter=): kept with the run
        summary = {"steps": 0, "finished": True, "note": f"not trained: the adapter {method.hp['adapter']}"}
        methods.save_adapter(model, rd / "adapter")
    else:  # the un-tuned base: nothing to train
        summary = {"steps": 0, "finished": True, "note": "no trainable parameters (un-tuned base)"}
    spec = cfg["model"]["name"] if _known(cfg) else model.config.to_dict()
    acc = account(spec, method.name, **method.hp)
    tokens = sum(sum(1 for x in e["input_ids"]) for e in examples)
    acc["train_tokens_per_epoch"] = tokens
    acc["measured_trainable_params"] = n_trainable
    acc["train_flops_total"] = acc["train_flops_per_token"] * _trained_tokens(rd)
    acc.update(base_quality(cfg, method))
    write_json(rd / "accounting.json", acc)
    write_json(rd / "provenance.json", record(step="finetune", run_id=config.run_id(cfg), seed=cfg["seed"],
                                                     data=data_info, method=method.describe(),
                                                     prepare_seconds=t_prep,
                                                     finetune_seconds=time.perf_counter() - t0 - t_prep))
    write_json(rd / "train.json", summary)  # last: marks the run finished
    return rd


def base_quality(cfg, method) -> dict:
    """What the run's frozen base is and how far it is from the 16-bit weights: ``base_quant`` (the quantizer's
    label, e.g. ``int4-g32 rtn``, ``bnb-nf4-dq-b64``, ``16-bit``) and ``base_weight_error`` (``mean``, ``max``,
    ``n_layers`` of ``||W - W_base||_F / ||W||_F`` over the target layers, from the base's manifest; None for a
    base built before the suite recorded it); for LoftQ also ``init_error``, the same summary of
    ``||W - (W_base + s·B·A)||_F / ||W||_F`` at the start of fine-tuning."""
    scheme = method.scheme()
    quant = "16-bit" if scheme is None else scheme.label()
    if scheme is not None and scheme.kind == "int":
        quant += f" {method.hp.get('quantizer', 'rtn')}"
    manifest = base_dir(cfg) / "base_manifest.json"
    record = json.loads(manifest.read_text()) if manifest.is_file() else {}
    errs = record.get("weight_error") or None
    out = {"base_quant": quant, "base_weight_error": _error_summary(errs)}
    if record.get("init_error"):  # LoftQ: the error its initialisation starts from (else the weight error's)
        out["init_error"] = _error_summary(record["init_error"])
    return out


def _error_summary(errs: dict | None) -> dict | None:
    return None if not errs else {"mean": sum(errs.values()) / len(errs), "max": max(errs.values()),
                                  "n_layers": len(errs)}


def _known(cfg) -> bool:
    from .accounting import known_models

    return cfg["model"]["name"] in known_models()


def _trained_tokens(rd: Path) -> int:
    p = rd / "train_log.jsonl"
    if not p.is_file():
        return 0
    steps = {}
    for line in p.read_text().splitlines():
        r = json.loads(line)
        if "tokens" in r:
            steps[r["step"]] = r["tokens"]  # a step repeated after a resume counts once
    return sum(steps.values())


# --------------------------------------------------------------------------------------------- evaluate
def deployed_model(cfg, mode: str):
    """The model as evaluated in ``mode`` (``deploy`` resolves to the method's own deployment; ``requant`` or
    ``requant-w<bits>g<group>[-rtn]``: merged to fp16, then re-quantized at that ``eval.requant`` setting)."""
    rq = config.check_mode(cfg, mode)  # an unknown mode or requant setting fails before any model work
    model, tok, method = prepared_model(cfg)
    if method.name != "base":
        rd = run_dir(cfg)
        if not is_finished(cfg):
            raise FileNotFoundError(f"run {rd} is not finished (no train.json): run `qftbench finetune` first.")
        methods.load_adapter(model, rd / "adapter")
    mode = method.deploy if mode == "deploy" else mode
    layers = list(model.qft_base["layers"])
    if mode in ("4+16", "base"):
        pass
    elif mode == "int-merge":
        method.merge(model)
    elif mode == "fp16-merge" or rq is not None:
        method.merge_dense(model, dtype=torch.float16) if method.name != "base" else None
        model.to(DTYPES.get(cfg["model"]["dtype"], torch.float32))
        if rq is not None:
            from methods.quant.scheme import QuantScheme
            from methods.requant import requantize

            scheme = QuantScheme(kind="int", bits=rq["bits"], group_size=rq["group_size"])
            calib = calibration_batches(cfg, tok) if rq["quantizer"] == "gptq" else None
            requantize(model, layers, scheme, rq["quantizer"], calib)
    else:
        raise methods.ConfigError(f"eval mode {mode!r} is not one of {config.DEPLOY_MODES}")  # (checked above)
    model.eval()
    return model, tok, mode


def _tasks_key(tasks, num_fewshot) -> str:
    return "+".join(tasks) + (f"-{num_fewshot}shot" if num_fewshot else "")


def evaluate_step(cfg, mode: str = "deploy", tasks: list[str] | None = None, num_fewshot: int | None = None) -> Path:
    """Evaluate one run in one deployment mode on a task group; writes eval/<mode>/<tasks>.json atomically.

    ``mode``: ``deploy``, ``4+16``, ``int-merge``, ``fp16-merge``, ``base``, and ``requant`` (one
    ``eval.requant`` setting) or ``requant-w<bits>g<group>[-rtn]`` (one entry of an ``eval.requant`` list);
    a requant result records its setting under ``"requant"``."""
    from .evaluate import evaluate

    rq = config.check_mode(cfg, mode)
    tasks = tasks or cfg["eval"]["tasks"]
    rd = run_dir(cfg)
    method = build_method(cfg)
    resolved_mode = method.deploy if mode == "deploy" else mode
    out = rd / "eval" / resolved_mode / f"{_tasks_key(tasks, num_fewshot)}.json"
    if out.is_file():
        return out
    t0 = time.perf_counter()
    model, tok, resolved_mode = deployed_model(cfg, mode)
    synth = ensure_synthetic(cfg) / "eval.jsonl" if any(t.startswith("qft_synthetic") for t in tasks) else None
    res = evaluate(model, tok, tasks, num_fewshot=num_fewshot, limit=config.limit_for(cfg, tasks),
                   batch_size=cfg["eval"]["batch_size"], data_root=cfg["eval"]["data_root"],
                   seed=cfg["eval"]["seed"], synthetic_path=synth)
    res["mode"] = resolved_mode
    if rq is not None:
        res["requant"] = rq
    res["num_fewshot"] = num_fewshot
    res["eval_config"] = {**cfg["eval"], "tasks": list(tasks), "limit": config.limit_for(cfg, tasks),
                          "num_fewshot": num_fewshot}
    res["seconds"] = time.perf_counter() - t0
    res["provenance"] = {**res.get("provenance", {}), **record(step="evaluate")}
    write_json(out, res)
    collect_metrics(rd)
    return out


def collect_metrics(rd: Path) -> Path:
    """``metrics.json``: every evaluation of the run, keyed by mode and task group."""
    out: dict[str, Any] = {}
    for p in sorted((rd / "eval").glob("*/*.json")):
        out.setdefault(p.parent.name, {})[p.stem] = json.loads(p.read_text())
    return write_json(rd / "metrics.json", out)


def run_all(cfg) -> Path:
    """prepare, finetune and evaluate (every mode in eval.modes, ``requant`` once per eval.requant setting, every
    few-shot setting)."""
    prepare_step(cfg)
    rd = finetune_step(cfg)
    for mode in config.eval_modes(cfg):
        for tasks, shots in eval_groups(cfg):
            evaluate_step(cfg, mode, tasks, shots)
    return rd


def eval_groups(cfg) -> list[tuple[list[str], int | None]]:
    """Task groups: tasks with the same few-shot setting evaluate together; a list of shots splits a task."""
    groups: dict[int | None, list[str]] = {}
    for t in cfg["eval"]["tasks"]:
        shots = cfg["eval"]["num_fewshot"].get(t)
        for s in (shots if isinstance(shots, list) else [shots]):
            groups.setdefault(s, []).append(t)
    return [(ts, s) for s, ts in groups.items()]


def copy_cfg(cfg) -> dict:
    return copy.deepcopy(cfg)
