"""Benchmark (not a test): training-step time of every method, and the quantized linear's forward, on this CPU.

    python benchmarks/bench_methods.py                 # about 1-3 minutes on 2 CPU cores
    python benchmarks/bench_methods.py --csv           # also write results/benchmarks/bench_methods-<time>.csv
    python benchmarks/bench_methods.py --methods lora,qalora --layers 2 --repeats 3

(a) One training step (forward + backward + AdamW step) of every registered method that has trainable
    parameters, on a SmolLM2-sized stack of random decoder layers (hidden 576, intermediate 1536, 9 heads,
    3 kv heads; ``--layers`` of them, a small vocabulary so that the LM head does not dominate), batch x seq
    tokens, float32, every method at its default hyperparameters (rank 64, g=32; LoftQ with 1 iteration,
    which only changes the initial values, not the step). Median of ``--repeats`` steps after ``--warmup``
    steps; the time relative to ``lora`` on the same base; the accounted training FLOPs of the step
    (qftbench.accounting) and the rate they imply.
(b) The frozen base linear's forward, 576 -> 1536, at 1 and 512 tokens, no grad: a dense ``nn.Linear`` (fp32),
    ``methods.quant.linear.QuantLinear`` INT4 g32 (dequantize, then matmul), the bitsandbytes ``Linear4bit``
    NF4 + double quantization with its stock forward (``bnb.matmul_4bit``), and the suite's CPU ``Linear4bit``
    subclass (``methods.quant.bnb.to_linear4bit``: torch dequantization, then matmul).

Timings depend on the machine and its load: compare rows of one run, not runs of different machines.
"""
from __future__ import annotations

import argparse
import csv
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTER, HEADS, KV_HEADS = 576, 1536, 9, 3  # SmolLM2-135M


def llama_config(layers: int, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                       num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=2048,
                       tie_word_embeddings=True)


def base_model(cfg, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def _sync_time() -> float:
    return time.perf_counter()


def time_steps(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = _sync_time()
        fn()
        out.append(_sync_time() - t)
    return out


DEFAULT_HP = {"loftq": {"iters": 1}}


def bench_training(names, layers, batch, seq, vocab, warmup, repeats):
    import methods
    from qftbench.accounting import account

    cfg = llama_config(layers, vocab)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in names:
        hp = DEFAULT_HP.get(name, {})
        method = methods.build(name, **hp)
        acc = account(cfg.to_dict(), method, seq_len=seq)
        if acc["trainable_params"] == 0:
            print(f"  {name}: no trainable parameters, skipped", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        model = method.prepare(base_model(cfg)).train()
        prep = time.perf_counter() - t0
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()

        times = time_steps(step, warmup, repeats)
        med = statistics.median(times)
        flops = acc["train_flops_per_token"] * batch * seq
        rows.append({"part": "train-step", "method": name, "median_s": med, "min_s": min(times),
                     "trainable_params": acc["trainable_params"], "train_gflop": flops / 1e9,
                     "gflops_per_s": flops / 1e9 / med, "prepare_s": prep})
        print(f"  {name:10s} {med * 1e3:8.1f} ms/step  (prepare {prep:.1f} s)", file=sys.stderr)
        del model, opt, params
    ref = next((r["median_s"] for r in rows if r["method"] == "lora"), None)
    for r in rows:
        r["vs_lora"] = r["median_s"] / ref if ref else float("nan")
    return rows


def bench_linear(tokens_list, min_time: float, max_iters: int):
    from bitsandbytes.nn import Linear4bit

    from methods.quant.bnb import to_linear4bit
    from methods.quant.linear import QuantLinear
    from methods.quant.scheme import QuantScheme

    torch.manual_seed(0)
    dense = nn.Linear(HIDDEN, INTER, bias=False).float().requires_grad_(False)
    qlin = QuantLinear.from_linear(dense, QuantScheme(kind="int", bits=4, group_size=32))
    nf4 = to_linear4bit(dense)
    variants = [
        ("nn.Linear fp32 (dense)", dense),
        ("QuantLinear int4 g32", qlin),
        ("bnb Linear4bit nf4-dq, stock forward", lambda x: Linear4bit.forward(nf4, x)),
        ("bnb Linear4bit nf4-dq, suite CPU forward", nf4),
    ]
    rows = []
    for tokens in tokens_list:
        x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(1))
        ref_out = None
        for label, fn in variants:
            with torch.no_grad():
                out = fn(x)
                if ref_out is None:
                    ref_out = out
                err = float((out.float() - ref_out).norm() / ref_out.norm())
                times, t_end = [], time.perf_counter() + min_time
                for _ in range(3):
                    fn(x)
                while (time.perf_counter() < t_end or len(times) < 5) and len(times) < max_iters:
                    t = time.perf_counter()
                    fn(x)
                    times.append(time.perf_counter() - t)
            rows.append({"part": "linear-forward", "method": label, "tokens": tokens,
                         "median_s": statistics.median(times), "min_s": min(times), "iters": len(times),
                         "rel_err_vs_dense": err})
    for tokens in tokens_list:
        ref = next(r["median_s"] for r in rows if r["tokens"] == tokens and r["method"].startswith("nn.Linear"))
        for r in rows:
            if r["tokens"] == tokens:
                r["vs_dense"] = r["median_s"] / ref
    return rows


def markdown(train_rows, lin_rows, args) -> str:
    out = [f"(a) one training step (fwd + bwd + AdamW), {args.layers} decoder layers of SmolLM2 width "
           f"(576/1536, 9 heads, 3 kv), vocab {args.vocab}, batch {args.batch} x seq {args.seq}, float32, "
           f"median of {args.repeats} after {args.warmup} warm-up steps, {torch.get_num_threads()} threads",
           "",
           "| method | ms / step | vs lora | trainable params | accounted GFLOP / step | GFLOP/s |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in train_rows:
        out.append(f"| {r['method']} | {r['median_s'] * 1e3:.1f} | {r['vs_lora']:.2f} | "
                   f"{r['trainable_params'] / 1e6:.2f}M | {r['train_gflop']:.1f} | {r['gflops_per_s']:.1f} |")
    out += ["", f"(b) base linear forward 576 -> 1536, no grad, median over >= {args.min_time:g} s", "",
            "| layer | tokens | µs / call | vs dense | rel. error vs dense |", "|---|---:|---:|---:|---:|"]
    for r in lin_rows:
        out.append(f"| {r['method']} | {r['tokens']} | {r['median_s'] * 1e6:.1f} | {r['vs_dense']:.2f} | "
                   f"{r['rel_err_vs_dense']:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated subset (default: every registered method)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--min-time", dest="min_time", type=float, default=0.5,
                   help="seconds of timed calls per linear-forward row")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-linear", action="store_true")
    p.add_argument("--csv", nargs="?", const="", default=None, metavar="PATH",
                   help="write a CSV (default path: results/benchmarks/bench_methods-<UTC time>.csv)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import methods

    names = args.methods.split(",") if args.methods else methods.names()
    for n in names:
        methods.get(n)  # unknown names fail here, with a did-you-mean
    t0 = time.perf_counter()
    train_rows = [] if args.skip_train else bench_training(names, args.layers, args.batch, args.seq, args.vocab,
                                                           args.warmup, args.repeats)
    lin_rows = [] if args.skip_linear else bench_linear([1, 512], args.min_time, 20000)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; total {time.perf_counter() - t0:.0f} s\n")
    print(markdown(train_rows, lin_rows, args))
    if args.csv is not None:
        path = Path(args.csv) if args.csv else (
            REPO / "results" / "benchmarks" / f"bench_methods-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = sorted({k for r in train_rows + lin_rows for k in r})
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(train_rows + lin_rows)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
