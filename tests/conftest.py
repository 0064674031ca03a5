"""Shared fixtures: tiny random Llama models built in-process (nothing is downloaded)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def tiny_llama_config(hidden=96, intermediate=160, layers=2, heads=6, kv_heads=2, vocab=128):
    """``qftbench.models``' tiny-llama config at unit-test scale: a 128-token vocabulary, untied head, no pad token,
    the transformers defaults for the rest (the same weights for a seed as before this helper used it)."""
    from qftbench.models import tiny_llama_config as suite_tiny

    return suite_tiny(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                      max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6, pad_token_id=None)


def make_tiny_llama(seed: int = 0, **kw):
    """A random LlamaForCausalLM with GQA and non-power-of-two widths (96, 160; k/v out = 32)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**kw)).float().eval()
    return model


@pytest.fixture
def tiny_model():
    return make_tiny_llama()


def shared_data_root() -> Path | None:
    root = Path(os.environ.get("QFTBENCH_DATA_ROOT", REPO.parent / "shared" / "data"))
    return root if root.is_dir() else None


# ------------------------------------------------------------------- tests leave nothing in the repository
def _repo_litter() -> set[str] | None:
    """Untracked, not-ignored files in the repository, plus SLURM's default job logs at its top level
    (ignored, but never meant to be there); None outside a git checkout."""
    import subprocess

    try:
        p = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO,
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if p.returncode != 0:
        return None
    out = {line[3:] for line in p.stdout.splitlines() if line.startswith("?? ")}
    return out | {p.name for p in REPO.glob("slurm-*.out")}


def pytest_sessionstart(session):
    session.config._qft_litter = _repo_litter()


def pytest_sessionfinish(session, exitstatus):
    """Fail the run when the tests left new files in the repository (they must write under tmp_path)."""
    before = getattr(session.config, "_qft_litter", None)
    after = _repo_litter()
    if before is None or after is None or hasattr(session.config, "workerinput"):
        return
    new = sorted(after - before)
    if new:
        print(f"\nERROR: the test run left {len(new)} new file(s) in the repository {REPO}: {new[:20]}. "
              f"Tests must write under tmp_path (or ignore the file in .gitignore if it is a cache).")
        session.exitstatus = 1


def _readme_plugin() -> str:
    """The README's plugin example ("Or, outside the repository: a plugin module"), the ```python block that starts
    with ``# my_methods/mine.py``: the tests run exactly the code the README shows."""
    import re

    blocks = re.findall(r"```python\n(# my_methods/mine\.py\n.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) == 1, "README.md: the plugin example (# my_methods/mine.py) is missing or given twice"
    return blocks[0]


#: a method of one's own in a module of its own, registered by its last line: a QLoRA under another name (so that
#: it shares QLoRA's NF4 base), label "My QLoRA", style ("#000000", "P")
PLUGIN_SOURCE = _readme_plugin()


@pytest.fixture
def clean_registry():
    """Restores the method registry (and the record of imported plugins) after a test that registers a method."""
    from methods import registry

    saved, loaded = dict(registry.REGISTRY), dict(registry._LOADED)
    yield registry
    registry.REGISTRY.clear()
    registry.REGISTRY.update(saved)
    registry._LOADED.clear()
    registry._LOADED.update(loaded)
