"""The ``qftbench`` command."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_methods(args) -> int:
    import methods

    out = {}
    for name in methods.names():
        cls = methods.get(name)
        out[name] = {"summary": cls.summary, "deploy": cls.deploy,
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="qftbench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("methods", help="list the registered methods and their hyperparameters")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_methods)
    s = sub.add_parser("demo", help="fine-tune a tiny random model with every method and compare (about a minute)")
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--methods", default=None, help="comma-separated subset, default: all")
    s.add_argument("--threads", type=int, default=0)
    s.set_defaults(func=cmd_demo)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:  # clear one-line errors for the library's own error types
        from methods.errors import QFTError

        if isinstance(e, QFTError):
            print(f"qftbench: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
