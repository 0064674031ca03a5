"""qftbench.data: Alpaca prompt, tokenization masks, collation, loaders, subsampling and errors."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qftbench import data
from qftbench.data import (
    IGNORE_INDEX,
    PROMPT_DICT,
    DataError,
    InstructionCollator,
    format_prompt,
    load_alpaca,
    load_flan_v2,
    load_local_instructions,
    load_records,
    prepare_data,
    subsample,
    tokenize_example,
    tokenize_records,
)

REPO = Path(__file__).resolve().parents[1]


def _data_root() -> Path:
    env = os.environ.get("QFTBENCH_DATA_ROOT")
    return Path(env) if env else REPO.parent / "shared" / "data"


def _shared(rel: str) -> Path:
    path = _data_root() / rel
    if not path.is_file():
        pytest.skip(f"shared data mirror not available: {path}")
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from qftbench.models import load_tokenizer_smollm2

    cache = tmp_path_factory.getbasetemp() / "qftbench-cache"  # shared with test_models.py
    cache.mkdir(exist_ok=True)
    tok = load_tokenizer_smollm2(cache)
    tok.padding_side = "right"
    return tok


def _write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# ------------------------------------------------------------------------------------ prompt
def test_alpaca_prompt_strings_exact():
    assert PROMPT_DICT["prompt_input"] == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    )
    assert PROMPT_DICT["prompt_no_input"] == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    )


def test_format_prompt_with_and_without_input():
    p, r = format_prompt({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert p.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:") and r == "5"
    assert "paired with an input" in p
    p, r = format_prompt({"instruction": "Say hi.", "input": "", "output": "Hi"})
    assert p == ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:")


def test_released_code_prompt_ends_with_a_space(tokenizer):
    """data.prompt: alpaca-trailing-space is the released QLoRA/QA-LoRA template ('### Response: '), which
    tokenizes to one more token before the response than Stanford's."""
    rec = {"instruction": "Say hi.", "input": "", "output": "Hi"}
    p, r = format_prompt(rec, "alpaca-trailing-space")
    assert p == format_prompt(rec)[0] + " " and r == "Hi"
    p2, _ = format_prompt({**rec, "input": "now"}, "alpaca-trailing-space")
    assert p2.endswith("### Input:\nnow\n\n### Response: ")
    a = tokenize_records(tokenizer, [rec], 256, 64)[0]
    b = tokenize_records(tokenizer, [rec], 256, 64, template="alpaca-trailing-space")[0]
    assert len(b["input_ids"]) >= len(a["input_ids"]) and b["input_ids"] != a["input_ids"]
    with pytest.raises(DataError, match="data.prompt='qlora'"):
        format_prompt(rec, "qlora")


@pytest.mark.shared_data
def test_alpaca_prompt_matches_original_text_field():
    """The mirror's 'text' field is prompt + '\\n' + output; our prompt is its exact prefix."""
    recs = json.loads(_shared("alpaca/alpaca_tiny_original_100.json").read_text())
    for rec in recs:
        prompt, out = format_prompt(rec)
        assert rec["text"] == prompt + "\n" + out


# ------------------------------------------------------------------------------------ tokenization
def test_tokenize_example_masks_exactly_the_prompt(tokenizer):
    prompt, response = format_prompt({"instruction": "Name a color.", "input": "", "output": "Blue is a color."})
    ex = tokenize_example(tokenizer, prompt, response, source_max_len=512, target_max_len=64)
    prompt_ids = tokenizer(prompt)["input_ids"]
    n_p = len(prompt_ids)
    assert ex["input_ids"][:n_p] == prompt_ids
    assert ex["labels"][:n_p] == [IGNORE_INDEX] * n_p
    assert ex["labels"][n_p:] == ex["input_ids"][n_p:]
    assert IGNORE_INDEX not in ex["labels"][n_p:]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["input_ids"][n_p:]) == response + tokenizer.eos_token
    assert ex["attention_mask"] == [1] * len(ex["input_ids"])


def test_tokenize_example_truncates_source_and_target_separately(tokenizer):
    prompt = "word " * 100
    response = "answer " * 50
    ex = tokenize_example(tokenizer, prompt, response, source_max_len=16, target_max_len=8)
    assert len(ex["input_ids"]) == 24
    assert ex["labels"][:16] == [IGNORE_INDEX] * 16
    assert ex["labels"][16:] == ex["input_ids"][16:]
    assert tokenizer.eos_token_id not in ex["input_ids"][16:], "a truncated target loses its EOS (QLoRA)"
    short = tokenize_example(tokenizer, "Q", "A", source_max_len=16, target_max_len=8)
    assert short["input_ids"][-1] == tokenizer.eos_token_id


def test_collator_pads(tokenizer):
    recs = [{"instruction": "Hi", "input": "", "output": "Hello there, friend."},
            {"instruction": "Explain gravity in detail please.", "input": "physics", "output": "Mass attracts."}]
    feats = tokenize_records(tokenizer, recs, 256, 64)
    batch = InstructionCollator.from_tokenizer(tokenizer)(feats)
    lens = [len(f["input_ids"]) for f in feats]
    assert batch["input_ids"].shape == (2, max(lens))
    for row, f in enumerate(feats):
        n = len(f["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == f["input_ids"]
        assert batch["labels"][row, :n].tolist() == f["labels"]
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lens) - n)
    b8 = InstructionCollator.from_tokenizer(tokenizer, pad_to_multiple_of=8)(feats)
    assert b8["input_ids"].shape[1] % 8 == 0 and b8["input_ids"].dtype == torch.long


def test_masked_loss_on_tiny_llama(tokenizer):
    """The labels work with a causal LM's loss: only response tokens count."""
    from qftbench.models import build_tiny_llama

    model = build_tiny_llama(seed=0, vocab_size=len(tokenizer))
    feats = tokenize_records(tokenizer, [{"instruction": "Hi", "input": "", "output": "Hello."}], 64, 16)
    batch = InstructionCollator.from_tokenizer(tokenizer)(feats)
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


# ------------------------------------------------------------------------------------ shared mirrors
@pytest.mark.shared_data
def test_load_alpaca_tiny_mirror():
    path = _shared("alpaca/alpaca_tiny_original_100.json")
    recs = load_alpaca(path)
    assert len(recs) == 100
    assert recs[0] == {"instruction": "Give three tips for staying healthy.", "input": "",
                       "output": recs[0]["output"]}
    assert set(recs[0]) == {"instruction", "input", "output"}  # the extra 'text' field is dropped
    assert sum(bool(r["input"]) for r in recs) > 10
    train, held, info = prepare_data("alpaca", path, n=20, seed=3, holdout=10)
    assert (len(train), len(held)) == (20, 10)
    assert info["source"] == "alpaca" and info["path"] == str(path.resolve()) and info["hub_id"] is None
    assert (info["n_total"], info["n"], info["n_holdout"], info["seed"]) == (100, 20, 10, 3)
    sums = _data_root() / "SHA256SUMS"
    if sums.is_file():
        expected = {ln.split()[1].lstrip("*").removeprefix("./"): ln.split()[0]
                    for ln in sums.read_text().splitlines() if ln.strip()}
        assert info["sha256"] == expected["alpaca/alpaca_tiny_original_100.json"]


@pytest.mark.shared_data
def test_load_flan_v2_cot_mirror():
    path = _shared("flan_v2_cot/flan_v2_cot_train.jsonl")
    recs = load_flan_v2(path)
    assert len(recs) == 33443
    first = recs[0]
    assert first["instruction"].startswith("Rs. 5600 is divided into three parts")
    assert "\nOptions:\n(A) 300" in first["instruction"] and "\\n" not in first["instruction"]
    assert first["input"] == ""
    assert first["output"].endswith("\nSo the answer is (C).")
    assert all(r["output"].strip() for r in recs)
    train, held, info = prepare_data("flan_v2", path, n=100, seed=0, holdout=50)
    assert len(train) == 100 and len(held) == 50 and info["sha256"] and len(info["sha256"]) == 64


def test_flan_templated_layout(tmp_path):
    p = tmp_path / "flan.jsonl.gz"
    with gzip.open(p, "wt") as fh:
        fh.write(json.dumps({"inputs": "Translate: chat", "targets": "cat", "task_name": "t"}) + "\n")
    assert load_flan_v2(p) == [{"instruction": "Translate: chat", "input": "", "output": "cat"}]


# ------------------------------------------------------------------------------------ local files
def test_local_json_and_jsonl(tmp_path):
    recs = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"}]
    expect = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "input": "", "output": "e"}]
    assert load_local_instructions(_write(tmp_path / "x.json", recs)) == expect
    jl = tmp_path / "x.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")
    assert load_records("local", jl) == expect


def test_subsample_deterministic_disjoint_and_stable_holdout():
    recs = list(range(1000))
    t1, h1 = subsample(recs, 100, seed=7, holdout=50)
    t2, h2 = subsample(recs, 100, seed=7, holdout=50)
    assert (t1, h1) == (t2, h2)
    assert not set(t1) & set(h1) and t1 == sorted(t1)
    t3, h3 = subsample(recs, 300, seed=7, holdout=50)
    assert h3 == h1 and set(t1) <= set(t3), "the hold-out set and smaller subsets are stable in n"
    t4, _ = subsample(recs, 100, seed=8, holdout=50)
    assert t4 != t1
    all_train, none_held = subsample(recs, None, seed=0)
    assert all_train == recs and none_held == []


def test_prepare_synthetic():
    train, held, info = prepare_data("synthetic", n=100, seed=1, holdout=20, n_entities=40)
    assert (len(train), len(held)) == (100, 20)
    assert info["source"] == "synthetic" and info["path"] is None and info["sha256"] is None
    assert info["synthetic"]["n_entities"] == 40 and info["n_total"] == 160


# ------------------------------------------------------------------------------------ errors
def test_error_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError) as exc:
        load_alpaca(missing)
    assert str(missing) in str(exc.value) and "does not exist" in str(exc.value) and "Fix:" in str(exc.value)
    with pytest.raises(DataError, match="does not exist"):
        prepare_data("local", "./no/such/data.jsonl")


def test_error_unknown_format(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text("instruction,output\na,b\n")
    with pytest.raises(DataError, match=r"Unknown data format of .*data\.csv.*\.json.*\.jsonl.*Fix:"):
        load_local_instructions(p)


def test_error_json_object_not_list(tmp_path):
    p = _write(tmp_path / "d.json", {"data": [{"instruction": "a", "output": "b"}]})
    with pytest.raises(DataError, match=r"holds a JSON object.*\['data'\].*Fix:"):
        load_local_instructions(p)


def test_error_missing_field_names_file_index_field(tmp_path):
    recs = [{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": "", "outptu": "d"}]
    p = _write(tmp_path / "d.json", recs)
    with pytest.raises(DataError) as exc:
        load_local_instructions(p)
    msg = str(exc.value)
    assert str(p) in msg and "record 1" in msg and "'output'" in msg and "Fix:" in msg
    assert 'Did you mean "outptu"' in msg


def test_error_wrong_type_and_empty(tmp_path):
    with pytest.raises(DataError, match=r"record 0 field 'output' is a int, not a string"):
        load_local_instructions(_write(tmp_path / "a.json", [{"instruction": "a", "output": 3}]))
    with pytest.raises(DataError, match=r"record 0 is a str, not an object"):
        load_local_instructions(_write(tmp_path / "b.json", ["just text"]))
    with pytest.raises(DataError, match=r"record 0 field 'instruction' is empty"):
        load_local_instructions(_write(tmp_path / "c.json", [{"instruction": " ", "output": "x"}]))
    with pytest.raises(DataError, match="no records"):
        load_local_instructions(_write(tmp_path / "d.json", []))


def test_error_bad_jsonl_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{broken\n")
    with pytest.raises(DataError, match=r"d\.jsonl' line 2 \(record 1\) is not valid JSON"):
        load_local_instructions(p)


def test_error_flan_unknown_layout(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "a", "rationale": "r"}) + "\n"
                 + json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    with pytest.raises(DataError, match=r"f\.jsonl: record 1 is neither a FLAN collection record.*Fix:"):
        load_flan_v2(p)
    p.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"record 0 has no field 'rationale'"):
        load_flan_v2(p)


def test_error_unknown_source_and_sizes():
    with pytest.raises(DataError, match=r"Unknown data source 'alpacca'.*Did you mean \"alpaca\""):
        load_records("alpacca")
    with pytest.raises(DataError, match="needs a path"):
        load_records("local")
    with pytest.raises(DataError, match="has only 10"):
        subsample(list(range(10)), 8, holdout=5)


def test_error_hub_offline(tmp_path):
    """A hub id that cannot be fetched gives a DataError naming it (subprocess: offline before import)."""
    code = ("from qftbench.data import load_alpaca, DataError\n"
            "try:\n    load_alpaca('tatsu-lab/alpaca')\n"
            "except DataError as e:\n    print('ERR', e)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HOME=str(tmp_path / "hf-home"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=120)
    assert "ERR Could not load the hub dataset 'tatsu-lab/alpaca'" in out.stdout, out.stdout + out.stderr
    assert "Fix:" in out.stdout


# ------------------------------------------------------------------------------------- empty outputs
def test_empty_outputs_keep_trains_on_eos_alone(tmp_path, tokenizer):
    """An empty output is kept by default (Stanford Alpaca's train.py and QLoRA do the same): its target is EOS
    alone; the counts are recorded in DataInfo."""
    recs = [{"instruction": "Say hi.", "output": "hi"},
            {"instruction": "Standardize the date.", "input": "July 26th, 2021", "output": ""},
            {"instruction": "Say nothing.", "output": "  \n"}]
    p = _write(tmp_path / "e.json", recs)
    train, _, info = prepare_data("local", p)
    assert [r["output"] for r in train] == ["hi", "", "  \n"]  # the records as written, none altered
    assert (info["empty_outputs"], info["n_empty_output_total"], info["n_empty_output"]) == ("keep", 2, 2)
    ex = tokenize_records(tokenizer, train)[1]
    target = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE_INDEX]
    assert target == [tokenizer.eos_token_id]
    # a subsample counts the empty outputs it actually trains on
    train, held, info = prepare_data("local", p, n=1, holdout=1, seed=3)
    assert info["n_empty_output_total"] == 2
    assert info["n_empty_output"] == sum(not r["output"].strip() for r in train)


def test_empty_outputs_drop(tmp_path):
    recs = [{"instruction": "a", "output": "x"}, {"instruction": "b", "output": ""},
            {"instruction": "c", "output": "z"}]
    p = _write(tmp_path / "e.json", recs)
    train, _, info = prepare_data("local", p, empty_outputs="drop")
    assert [r["instruction"] for r in train] == ["a", "c"]
    assert (info["n_total"], info["n_empty_output_total"], info["n_empty_output"]) == (2, 1, 0)
    with pytest.raises(DataError, match=r"empty_outputs='dorp' is not allowed.*Did you mean \"drop\".*Fix"):
        prepare_data("local", p, empty_outputs="dorp")
    with pytest.raises(DataError, match="every record has an empty output"):
        prepare_data("local", _write(tmp_path / "f.json", [{"instruction": "a", "output": ""}]),
                     empty_outputs="drop")


def test_alpaca_mirror_loads_with_its_49_empty_outputs():
    path = _shared("alpaca/alpaca_data.json")
    train, _, info = prepare_data("alpaca", path, n=2000, seed=0)
    assert info["n_total"] == 52002 and info["n_empty_output_total"] == 49 and len(train) == 2000
    assert info["n_empty_output"] == sum(not r["output"].strip() for r in train)
    _, _, dropped = prepare_data("alpaca", path, n=2000, seed=0, empty_outputs="drop")
    assert dropped["n_total"] == 52002 - 49 and dropped["n_empty_output"] == 0
