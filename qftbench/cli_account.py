"""``qftbench account``: trainable parameters, FLOPs and deployed bits of a method on a model (no weights).

    qftbench account --model llama-7b --method qalora --rank 64 --group-size 32 --json
    qftbench account --model path/to/config.json --method qlora --set targets='["q_proj","v_proj"]'

Only the hyperparameters given on the command line are passed to the method (the rest keep its defaults).
Errors (unknown model or method, a bad hyperparameter) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from .accounting import DEFAULT_SEQ_LEN

# command-line flag -> method hyperparameter
_HP_FLAGS = (("rank", "rank", int), ("alpha", "alpha", float), ("bits", "bits", int),
             ("group_size", "group_size", int), ("k", "k", int))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``account`` subcommand to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    s = subparsers.add_parser(
        "account", help="trainable parameters, FLOPs per token and deployed bits of a method on a model",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", required=True,
                   help="built-in model name (see qftbench/model_configs), or a path to a config.json")
    s.add_argument("--method", required=True, help="registered method name (qftbench methods)")
    s.add_argument("--rank", type=int, default=None, help="nominal rank r")
    s.add_argument("--alpha", type=float, default=None, help="lora_alpha (does not change the counts)")
    s.add_argument("--bits", type=int, default=None, help="bits of the quantized base")
    s.add_argument("--group-size", dest="group_size", type=int, default=None, help="quantization group g")
    s.add_argument("--k", type=int, default=None, help="Q-BaRA balance factor k")
    s.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="any other hyperparameter; VALUE is parsed as JSON when possible (repeatable)")
    s.add_argument("--seq-len", dest="seq_len", type=int, default=DEFAULT_SEQ_LEN,
                   help=f"sequence length for the attention FLOPs (default {DEFAULT_SEQ_LEN})")
    s.add_argument("--json", action="store_true", help="print the full JSON object")
    s.set_defaults(func=cmd_account)
    return s


def _hyperparameters(args) -> dict:
    hp = {name: getattr(args, dest) for dest, name, _ in _HP_FLAGS if getattr(args, dest, None) is not None}
    for item in args.extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            from methods.errors import ConfigError
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set quant_type=int")
        try:
            hp[key] = json.loads(value)
        except ValueError:
            hp[key] = value
    return hp


def format_text(r: dict) -> str:
    f = r["flops"]
    lines = [
        f"model      {r['model']}" + (f" ({r['hub_id']})" if r.get("hub_id") else ""),
        f"method     {r['method']}  deploy={r['deploy']}  {r['describe']['hyperparameters']}",
        f"base       {r['base_params'] / 1e6:,.1f}M parameters, {r['n_target_layers']} target layers "
        f"({r['target_params'] / 1e6:,.1f}M weights)",
        f"trainable  {r['trainable_params']:,} ({r['trainable_params'] / 1e6:.1f}M, "
        f"{r['trainable_percent']:.3f}% of the base)",
        f"FLOPs/tok  adapter {r['adapter_flops_per_token'] / 1e6:,.2f}M, "
        f"forward {r['forward_flops_per_token'] / 1e9:,.3f}G, "
        f"train {r['train_flops_per_token'] / 1e9:,.3f}G (seq_len {r['seq_len']})",
        f"           {f['formula']}",
        f"bits/param {r['bits_per_param']:.3f} whole model, {r['bits_per_param_target']:.3f} target layers "
        f"(deployed format; fp32 working copy {r['bits_per_param_target_working']:.3f}"
        + (f", GPTQ export {r['bits_per_param_target_gptq']:.3f}" if r.get("bits_per_param_target_gptq") else "")
        + f"); deployed {r['deployed_bytes'] / 2**30:,.2f} GiB" + (" (adapter included)" if r["adapter_bits"] else ""),
    ]
    return "\n".join(lines)


def cmd_account(args) -> int:
    from methods.errors import QFTError

    from .accounting import account

    try:
        result = account(args.model, args.method, seq_len=args.seq_len, **_hyperparameters(args))
    except QFTError as e:
        print(f"qftbench account: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_text(result))
    return 0


def main(argv=None) -> int:
    """Stand-alone entry point (``python -m qftbench.cli_account ...``), the same as ``qftbench account``."""
    p = argparse.ArgumentParser(prog="qftbench")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_parser(sub)
    args = p.parse_args(["account", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
