"""A one-minute demo of the method library: fine-tune a tiny random Llama with every method and compare.

The task is a fixed random permutation of a 64-token vocabulary: the model sees sequences where every next
token is ``perm[token]`` and has to learn the map. The base model is random, so before fine-tuning it is at
chance (1/64); every method trains only its adapter (or, for PEQA, its scales) over a frozen quantized base,
and the table shows what each learns in the same number of steps, together with the merge check.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

import methods

VOCAB = 64


def toy_model(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


def toy_batches(n: int, batch: int = 16, seq: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(VOCAB, generator=g)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.empty(batch, seq, dtype=torch.long)
        x[:, 0] = torch.randint(0, VOCAB, (batch,), generator=g)
        for t in range(1, seq):
            x[:, t] = perm[x[:, t - 1]]
        out.append(x)
    return out


@torch.no_grad()
def evaluate(model, batches):
    model.eval()
    loss, correct, total = 0.0, 0, 0
    for x in batches:
        out = model(x, labels=x)
        loss += float(out.loss)
        pred = out.logits[:, :-1].argmax(-1)
        correct += int((pred == x[:, 1:]).sum())
        total += pred.numel()
    return loss / len(batches), correct / total


DEFAULT_LR = {"peqa": 2e-3, "qahira": 1e-2, "qahira-ref": 1e-2}


def run(method_names=None, steps: int = 60, rank: int = 8, lr: float = 3e-3, seed: int = 0, log=print):
    method_names = method_names or methods.names()
    train = toy_batches(steps, seed=seed)
    test = toy_batches(4, seed=seed + 1)
    base = toy_model(seed)
    rows = []
    for name in method_names:
        cls = methods.get(name)
        hp = {"rank": rank, "alpha": 2 * rank} if "rank" in cls.hyperparameters else {}
        if name == "loftq":
            hp["iters"] = 2
        if name == "peft":  # peft's LoRA on the NF4 base, as qlora (any peft config fits here)
            hp = {"base": "nf4", "peft": {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}}
        m = methods.from_config({"name": name, **hp})
        t0 = time.perf_counter()
        model = m.prepare(copy.deepcopy(base))
        loss0, acc0 = evaluate(model, test)
        params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(seed)
        model.train()
        opt = torch.optim.AdamW(params, lr=DEFAULT_LR.get(name, lr), weight_decay=0.0) if params else None
        for x in (train if params else []):  # the un-tuned base has nothing to train
            loss = model(x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss1, acc1 = evaluate(model, test)
        with torch.no_grad():
            ref = model(test[0]).logits
            merged = m.merge(model, dtype=torch.float32) if m.deploy != "int-merge" else m.merge(model)
            dlogit = float((merged(test[0]).logits - ref).abs().max())
        _, acc_m = evaluate(merged, test)
        rows.append(dict(method=name, deploy=m.deploy, trainable=sum(p.numel() for p in params),
                         loss_before=loss0, loss_after=loss1, acc_before=acc0, acc_after=acc1,
                         acc_merged=acc_m, max_dlogit_merge=dlogit, seconds=time.perf_counter() - t0))
        log(f"  {name:11s} loss {loss0:.3f} -> {loss1:.3f}   acc {acc0:.3f} -> {acc1:.3f}"
            f"   ({rows[-1]['seconds']:.1f} s)")
    return rows


def format_table(rows) -> str:
    head = (f"{'method':11s} {'deploy':10s} {'trainable':>9s} {'loss0':>6s} {'loss':>6s} {'acc0':>6s} "
            f"{'acc':>6s} {'merged':>6s} {'max|Δlogit|':>11s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:11s} {r['deploy']:10s} {r['trainable']:9d} {r['loss_before']:6.3f} "
                     f"{r['loss_after']:6.3f} {r['acc_before']:6.3f} {r['acc_after']:6.3f} "
                     f"{r['acc_merged']:6.3f} {r['max_dlogit_merge']:11.2e}")
    return "\n".join(lines)
