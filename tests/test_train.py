"""Fine-tuning: exact resume after a real SIGKILL, NaN guard, logging, configuration errors."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from methods.errors import ConfigError
from qftbench.train import TrainConfig, TrainingDiverged, batch_indices, finetune

WORKER = textwrap.dedent('''
    import os, signal, sys, torch
    sys.path.insert(0, {repo!r})
    torch.set_num_threads(1)
    import methods
    from qftbench.train import TrainConfig, finetune, trainable_state
    from safetensors.torch import save_file
    from tests.conftest import make_tiny_llama
    scratch, out, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    model = methods.build("qalora", rank=4, alpha=8, dropout=0.1).prepare(make_tiny_llama())
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(13):
        ids = torch.randint(1, 128, (6 + i % 5,), generator=g).tolist()
        examples.append({{"input_ids": ids, "labels": [-100, -100] + ids[2:]}})
    cfg = TrainConfig(max_steps=8, batch_size=4, micro_batch_size=2, lr=1e-2, save_steps=2, seed=3)
    def cb(step, rec):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a scheduler kill: no clean-up, no final save
    finetune(model, examples, cfg, scratch, scratch + "/train_log.jsonl", callback=cb)
    save_file({{k: v.contiguous() for k, v in trainable_state(model).items()}}, out)
''')


def _run(tmp_path, name, kill_at):
    from tests.conftest import REPO

    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    scratch = tmp_path / name
    return subprocess.run([sys.executable, str(script), str(scratch), str(tmp_path / f"{name}.safetensors"),
                           str(kill_at)], capture_output=True, text=True, timeout=300, cwd=REPO), scratch


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(tmp_path):
    full, _ = _run(tmp_path, "full", kill_at=-1)
    assert full.returncode == 0, full.stderr[-2000:]
    killed, scratch = _run(tmp_path, "resumed", kill_at=5)  # killed after the step-4 checkpoint, mid-way
    assert killed.returncode == -9
    assert sorted(p.name for p in scratch.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    again, _ = _run(tmp_path, "resumed", kill_at=-1)
    assert again.returncode == 0, again.stderr[-2000:]
    a = load_file(str(tmp_path / "full.safetensors"))
    b = load_file(str(tmp_path / "resumed.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    records = [json.loads(x) for x in (scratch / "train_log.jsonl").read_text().splitlines()]
    assert {"event": "resume", "step": 4} in records
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 ran twice: once before the kill, once after resume
    for r in records:
        if "loss" in r:
            assert set(r) >= {"loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb"}


def _tiny(method="lora"):
    import methods
    from tests.conftest import make_tiny_llama

    return methods.build(method, rank=4, alpha=8).prepare(make_tiny_llama())


def _examples(n=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(1, 128, (8,), generator=g).tolist()), "labels": ids} for _ in range(n)]


def test_nan_loss_stops_with_clear_error(tmp_path):
    model = _tiny()
    cfg = TrainConfig(max_steps=3, batch_size=2, micro_batch_size=2, lr=1e-3, save_steps=1)
    finetune(model, _examples(), TrainConfig(max_steps=1, batch_size=2, micro_batch_size=2, save_steps=1),
             tmp_path / "s", tmp_path / "log.jsonl")
    model.model.norm.weight.data.fill_(float("nan"))  # frozen, so the resume does not restore it
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 2.*Lower train.lr"):
        finetune(model, _examples(), cfg, tmp_path / "s", tmp_path / "log.jsonl")
    assert sorted(p.name for p in (tmp_path / "s").glob("checkpoint-*")) == ["checkpoint-1"]


def test_training_reduces_loss_and_batches_are_deterministic(tmp_path):
    model = _tiny("qlora")
    ex = _examples(4)
    summary = finetune(model, ex, TrainConfig(max_steps=25, batch_size=4, micro_batch_size=2, lr=5e-3,
                                              save_steps=100), tmp_path / "s", tmp_path / "log.jsonl")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.8 * losses[0]
    assert summary["finished"] and summary["optimizer"] == "adamw_32bit"  # paged needs CUDA: logged fallback
    assert batch_indices(10, 4, 7, 0) == batch_indices(10, 4, 7, 0)
    seen = sum((batch_indices(10, 5, s, 1) for s in range(2)), [])
    assert sorted(seen) == list(range(10))  # one epoch covers every example once


@pytest.mark.parametrize("kw,msg", [
    (dict(batch_size=6, micro_batch_size=4), r"train.batch_size=6 is not a multiple of train.micro_batch_size=4"),
    (dict(optimizer="adam"), r"train.optimizer='adam' is not one of"),
    (dict(max_steps=0), r"train.max_steps=0 must be >= 1"),
])
def test_bad_train_config(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        TrainConfig(**kw)
