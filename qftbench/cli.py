"""The ``qftbench`` command."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_methods(args) -> int:
    import methods

    methods.load_plugins([x for x in (args.plugins or "").split(",") if x], where="--plugins")
    out = {}
    for name in methods.names():
        cls = methods.get(name)
        out[name] = {"label": cls.display_label(), "summary": cls.summary, "builtin": name in methods.registry.BUILTIN,
                     "deploy": getattr(cls, "deploy_summary", cls.deploy),
                     "hyperparameters": {k: {"default": h.default, "doc": h.doc,
                                             **({"choices": list(h.choices)} if h.choices else {})}
                                         for k, h in cls.hyperparameters.items()}}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for name, d in out.items():
            print(f"{name:11s} [{d['deploy']}] {d['summary']}")
            for k, h in d["hyperparameters"].items():
                ch = f" {h['choices']}" if "choices" in h else ""
                print(f"    {k:18s} = {h['default']!r:14}{ch}  {h['doc']}")
    return 0


def cmd_demo(args) -> int:
    import torch

    from . import demo

    torch.set_num_threads(max(1, args.threads)) if args.threads else None
    names = args.methods.split(",") if args.methods else None
    print(f"qftbench demo: a tiny random Llama learns a token permutation; {args.steps} steps per method, "
          f"rank {args.rank}.")
    rows = demo.run(names, steps=args.steps, rank=args.rank)
    print()
    print(demo.format_table(rows))
    print("\nacc0/acc: next-token accuracy before/after fine-tuning (chance = 1/64); merged: accuracy of the "
          "deployable model (exact INT merge or fp16 merge); max|Δlogit|: merged vs. unmerged.")
    return 0


def _cfg(args):
    if getattr(args, "gpus", None) is not None:  # before anything can initialise CUDA
        from .gpus import claim

        used = claim(args.gpus)
        print(f"qftbench: --gpus {args.gpus}: CUDA_VISIBLE_DEVICES={','.join(used)!r}", file=sys.stderr)
    from . import config

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.config_json:
        raw = json.loads(args.config_json)
        raw.pop("sweep", None)
        for item in args.set or []:
            config.apply_override(raw, item)
        return config.resolve(raw, where="--config-json")
    if not args.config:
        from methods.errors import ConfigError

        raise ConfigError("give --config FILE (or --config-json JSON).")
    return config.load(args.config, overrides=args.set or [])


def cmd_validate(args) -> int:
    from . import pipeline, spec

    cfg = _cfg(args)
    run = spec.from_config(cfg)
    print(f"{args.config}: valid. run_id={run.run_id}\n  run folder: {pipeline.run_dir(cfg)}\n"
          f"  base:       {pipeline.base_dir(cfg, run.method)}")
    for job in run.evals:
        print(f"  evaluation: {job.path}  ({job.mode}; {', '.join(job.tasks)}"
              + (f"; {job.shots}-shot" if job.shots is not None else "") + ")")
    return 0


def cmd_prepare(args) -> int:
    from . import pipeline

    print(pipeline.prepare_step(_cfg(args), base_only=args.base_only))
    return 0


def cmd_finetune(args) -> int:
    from . import pipeline

    print(pipeline.finetune_step(_cfg(args), stop_after=args.stop_after))
    return 0


def cmd_evaluate(args) -> int:
    from . import pipeline

    cfg = _cfg(args)
    tasks = args.tasks.split(",") if args.tasks else None
    if args.num_fewshot is not None and args.num_fewshot < 0:
        args.num_fewshot = None
    print(pipeline.evaluate_step(cfg, args.mode, tasks, args.num_fewshot))
    return 0


def cmd_run(args) -> int:
    from . import pipeline

    rd = pipeline.run_all(_cfg(args))
    print(rd)
    print(json.dumps(json.loads((rd / "metrics.json").read_text()), indent=1)[:4000])
    return 0


def cmd_report(args) -> int:
    from .collate import report_step

    out = report_step(args.results, [r for r in args.runs.split(",") if r], args.tables, args.figures,
                      args.name, [t for t in (args.expect or "").split(",") if t],
                      claims=json.loads(args.claims) if args.claims else None)
    print(json.dumps(out, indent=1))
    return 0


def cmd_plan(args) -> int:
    from . import sweep

    raw = sweep.load(args.sweep)
    if args.preset:  # as `snakemake --config preset=NAME`: the preset of every entry without its own
        raw["preset"] = args.preset
    if args.gpu_mem_gib:
        raw.setdefault("resources", {})["gpu_mem_gib"] = args.gpu_mem_gib
    print(sweep.plan_text(raw, args.sweep, gpu_tflops=args.gpu_tflops, mfu=args.mfu))
    return 0


def _add_config(s):
    s.add_argument("--config", help="a run config (YAML), see config/run.example.yaml")
    s.add_argument("--config-json", help="a run config as a JSON string (what the Snakemake rules pass)")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    s.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="use exactly N GPUs (the rules pass the job's resources: gpu): 0 hides every GPU, "
                        "N of several visible GPUs are claimed with a lock so that concurrent local jobs "
                        "never share one, a model is spread over N > 1 (default: use what is visible)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set method.rank=8 --set train.max_steps=20")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qftbench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("methods", help="list the registered methods and their hyperparameters")
    s.add_argument("--json", action="store_true")
    s.add_argument("--plugins", default=None,
                   help="comma-separated modules or .py files that register methods of one's own (a sweep's plugins:)")
    s.set_defaults(func=cmd_methods)
    s = sub.add_parser("demo", help="fine-tune a tiny random model with every method and compare (about a minute)")
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--methods", default=None, help="comma-separated subset, default: all")
    s.add_argument("--threads", type=int, default=0)
    s.set_defaults(func=cmd_demo)
    s = sub.add_parser("validate", help="check a run config and print its run id and folders")
    _add_config(s)
    s.set_defaults(func=cmd_validate)
    s = sub.add_parser("prepare", help="load the model, make the data and the quantized base (cached)")
    _add_config(s)
    s.add_argument("--base-only", action="store_true",
                   help="only the quantized base (the Snakemake job: its config is the base's spec alone)")
    s.set_defaults(func=cmd_prepare)
    s = sub.add_parser("finetune", help="fine-tune one run (resumes from its last checkpoint)")
    _add_config(s)
    s.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (smoke tests)")
    s.set_defaults(func=cmd_finetune)
    s = sub.add_parser("evaluate", help="evaluate a finished run with lm-eval in a deployment mode")
    _add_config(s)
    s.add_argument("--mode", default="deploy", help="deploy | 4+16 | int-merge | fp16-merge | requant (one eval.requant setting) | requant-w<bits>g<group>[-rtn] (one of a list) | base")
    s.add_argument("--tasks", default=None, help="comma-separated task names (default: eval.tasks)")
    s.add_argument("--num-fewshot", type=int, default=None)
    s.set_defaults(func=cmd_evaluate)
    s = sub.add_parser("run", help="prepare, finetune and evaluate one run config")
    _add_config(s)
    s.set_defaults(func=cmd_run)
    s = sub.add_parser("report", help="tables and figures for a set of runs (the workflow's collation step)")
    s.add_argument("--results", required=True)
    s.add_argument("--runs", required=True, help="comma-separated run ids")
    s.add_argument("--tables", required=True)
    s.add_argument("--figures", required=True)
    s.add_argument("--name", default="sweep")
    s.add_argument("--expect", default="", help="comma-separated table names that must be written")
    s.add_argument("--claims", default="", help="the sweep's claims as a JSON list (qftbench/claims.py)")
    s.set_defaults(func=cmd_report)
    s = sub.add_parser("plan", help="dry-run summary of a sweep: runs, FLOPs and GPU-hours, before any job")
    s.add_argument("--sweep", required=True, help="a sweep config (config/*.yaml)")
    s.add_argument("--gpu-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s of the GPU (default: the sweep's resources.gpu_tflops or 989, H100 SXM)")
    s.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation assumed (default 0.3)")
    s.add_argument("--gpu-mem-gib", type=float, default=None,
                   help="memory of one GPU in GiB for the fit check (default: the sweep's resources.gpu_mem_gib or 80)")
    s.add_argument("--preset", default=None, metavar="NAME",
                   help="the sweep's preset (e.g. paper or released-code in config/paper.yaml), as snakemake "
                        "--config preset=NAME")
    s.set_defaults(func=cmd_plan)
    from .cli_account import add_parser as add_account

    add_account(sub)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # clear one-line errors for the library's own error types
        from methods.errors import QFTError

        if isinstance(e, (QFTError, FileNotFoundError)):
            print(f"qftbench: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
