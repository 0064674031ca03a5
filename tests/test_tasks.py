"""The offline qft_* tasks render exactly what lm-eval's BUILT-IN tasks render for the same document.

How the reference is obtained without the hub: lm-eval's TaskManager locates the built-in task YAML
(e.g. lm_eval/tasks/arc/arc_easy.yaml); lm-eval's own YAML loader reads it (with `include:` and
`!function` resolved, i.e. the built-in process_docs/doc_to_* callables). Only the data source is
replaced: `dataset_path: json` over a temporary jsonl holding the sampled documents converted to the
Hugging Face field layout of the built-in dataset (by small converters in this file, independent of
qftbench.tasks.utils), and the split names the temporary file provides. lm-eval's ConfigurableTask
built from that config is the reference; its fewshot_context / doc_to_choice / doc_to_target are
compared with those of our offline task on the same document.

HellaSwag: the mirror has `ctx` but not the official ctx_a/ctx_b split, and lm-eval builds the
query from `ctx_a + " " + ctx_b.capitalize()`. Our task re-derives ctx_b (the trailing unterminated
fragment of ctx). Asserted: choices and gold are identical; our query equals lm-eval's query for
the re-derived (ctx_a, ctx_b); and against the only split the mirror literally gives
(ctx_a = ctx, ctx_b = "") it differs at most in the LETTER CASE of that trailing fragment, nothing
else (same length, same text case-insensitively, identical prefix).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from qftbench import tasks as qtasks

DATA = qtasks.default_data_root()
needs_data = pytest.mark.skipif(DATA is None, reason="no local data root (QFTBENCH_DATA_ROOT / ../shared/data)")
N_DOCS = 20


# ----------------------------------------------------------------------------- lm-eval built-ins
@pytest.fixture(scope="session")
def builtin_tm():
    from qftbench.evaluate import builtin_task_manager

    return builtin_task_manager()


def builtin_config(tm, name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(tm.task_index[name].yaml_path, resolve_func=True)


def reference_task(tm, name: str, splits: dict[str, list[dict]], tmp: Path, **split_cfg):
    """lm-eval's built-in task `name`, reading HF-layout docs from a temporary jsonl per split."""
    from lm_eval.api.task import ConfigurableTask

    files = {}
    for split, docs in splits.items():
        files[split] = str(tmp / f"{name}_{split}.jsonl")
        with open(files[split], "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    cfg = builtin_config(tm, name)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files},
               training_split=None, validation_split=None, test_split=None, fewshot_split=None)
    cfg.update(split_cfg)
    return ConfigurableTask(config=cfg)


def sample_indices(n: int, k: int = N_DOCS, extra=()) -> list[int]:
    step = max(1, n // k)
    return sorted(set(list(range(0, n, step))[:k]) | {i for i in extra if i < n})


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def assert_same_rendering(ours, ref, our_idx: list[int], shots: int = 0):
    ours.set_fewshot_seed(1234)
    ref.set_fewshot_seed(1234)
    our_docs, ref_docs = ours.eval_docs, ref.eval_docs  # (a property that re-runs process_docs)
    assert len(ref_docs) == len(our_idx)
    for j, i in enumerate(our_idx):
        d, r = our_docs[i], ref_docs[j]
        assert ours.fewshot_context(d, shots) == ref.fewshot_context(r, shots), (ours.task_name, i)
        assert ours.doc_to_choice(d) == ref.doc_to_choice(r), (ours.task_name, i)
        assert ours.doc_to_target(d) == ref.doc_to_target(r), (ours.task_name, i)
    for key in ("target_delimiter", "fewshot_delimiter", "output_type", "description"):
        if key != "description" or not ours.task_name.startswith("qft_mmlu"):
            assert ours.config[key] == ref.config[key], key
    assert sorted(ours._metric_fn_list) == sorted(ref._metric_fn_list)


# --------------------------------------------------------------------- no-data (template) checks
def test_templates_copy_builtin_prompt_fields(builtin_tm):
    """The YAML templates carry lm-eval's prompt/choice/target/metric fields verbatim."""
    pairs = {"qft_mmlu_subject": "mmlu_abstract_algebra", **{k: v for k, v in qtasks.BUILTIN_OF.items()
                                                             if k != "qft_mmlu"}}
    for ours_name, builtin in pairs.items():
        ours, ref = qtasks.load_template(ours_name), builtin_config(builtin_tm, builtin)
        for key in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "target_delimiter",
                    "fewshot_delimiter", "should_decontaminate", "doc_to_decontamination_query",
                    "fewshot_config", "num_fewshot"):
            a, b = ours.get(key), ref.get(key)
            if callable(b):  # winogrande: same function body
                assert a.__code__.co_code == b.__code__.co_code, (ours_name, key)
            else:
                assert a == b, (ours_name, key, a, b)
        assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in ref["metric_list"]]
        assert ours["metadata"]["version"] == ref["metadata"]["version"], ours_name


def test_mmlu_subject_map_matches_lm_eval(builtin_tm):
    ours = qtasks.mmlu_subjects()
    assert len(ours) == 57
    for subject, cat in ours.items():
        cfg = builtin_config(builtin_tm, f"mmlu_{subject}")
        assert cfg["tag"] == f"mmlu_{cat}_tasks", subject
        desc = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        assert cfg["description"] == desc
    mmlu = builtin_config(builtin_tm, "mmlu")
    assert mmlu["task"] == [f"mmlu_{c}" for c in qtasks.MMLU_CATEGORIES]


def test_missing_data_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing local data file"):
        qtasks.task_config("qft_arc_easy", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        qtasks.task_config("qft_piqa", tmp_path / "nope")
    with pytest.raises(ValueError, match="synthetic_path"):
        qtasks.task_config("qft_synthetic", tmp_path)


def test_hellaswag_ctx_split():
    split = qtasks.utils.split_hellaswag_ctx
    assert split("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split("A lady walks. She bends down. the lady") == ("A lady walks. She bends down.", "the lady")
    assert split("How to do x. Choose a base color.") == ("How to do x. Choose a base color.", "")
    assert split("a man is seen") == ("", "a man is seen")


# ------------------------------------------------------------------------------ data-root checks
def _mmlu_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _mmlu_hf(row, subject):
    return {"question": row[0], "subject": subject, "choices": row[1:5], "answer": "ABCD".index(row[5])}


@pytest.mark.parametrize("shots", [0, 5])
@pytest.mark.shared_data
@needs_data
def test_mmlu_every_subject_matches_builtin(builtin_tm, tmp_path, shots):
    group = qtasks.build_task("qft_mmlu", DATA)
    leaves = {t.task_name: t for t in group.get_all_tasks()}
    assert len(leaves) == 57
    assert [g.name for g in group.get_all_groups()] == [f"qft_mmlu_{c}" for c in qtasks.MMLU_CATEGORIES]
    for subject, cat in qtasks.mmlu_subjects().items():
        ours = leaves[f"qft_mmlu_{subject}"]
        assert subject in [t.task_name[len("qft_mmlu_"):] for t in group.get(f"qft_mmlu_{cat}").get_all_tasks()]
        test_rows = _mmlu_rows(DATA / "mmlu" / "test" / f"{subject}_test.csv")
        dev_rows = _mmlu_rows(DATA / "mmlu" / "dev" / f"{subject}_dev.csv")
        assert len(ours.eval_docs) == len(test_rows)
        idx = sample_indices(len(test_rows), 3, extra=[len(test_rows) - 1])
        ref = reference_task(builtin_tm, f"mmlu_{subject}",
                             {"test": [_mmlu_hf(test_rows[i], subject) for i in idx],
                              "dev": [_mmlu_hf(r, subject) for r in dev_rows]},
                             tmp_path, test_split="test", fewshot_split="dev")
        assert_same_rendering(ours, ref, idx, shots)
        if shots:  # the first 5 dev items, in file order, each with its answer letter
            ctx = ours.fewshot_context(ours.eval_docs[0], 5)
            pos = 0
            for r in dev_rows[:5]:  # in order (some subjects repeat a dev question)
                pos = ctx.index(f"{r[0].strip()}\nA. {r[1]}\nB. {r[2]}\nC. {r[3]}\nD. {r[4]}\nAnswer: {r[5]}\n\n",
                                pos) + 1
            assert ctx.count("\nAnswer:") == 6



def _arc_hf(d):
    q = d["question"]
    return {"id": d["id"], "question": q["stem"],
            "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]},
            "answerKey": d["answerKey"]}


def _obqa_hf(d):
    a = _arc_hf({**d, "id": str(d["idx"])})
    return {"id": a["id"], "question_stem": a["question"], "choices": a["choices"], "answerKey": a["answerKey"]}


def _boolq_hf(d):
    label = d["label"]
    label = {"true": 1, "false": 0}[label.lower()] if isinstance(label, str) else int(label)
    return {"question": d["question"], "passage": d["passage"], "idx": d["idx"], "label": label}


def _wino_hf(d):
    return {k: d[k] for k in ("sentence", "option1", "option2", "answer")}


CASES = {
    # offline task: (built-in, raw file, converter, split of the built-in it reproduces)
    "qft_arc_easy": ("arc_easy", "arc/ARC-Easy-Test.jsonl", _arc_hf, "test"),
    "qft_arc_challenge": ("arc_challenge", "arc/ARC-Challenge-Test.jsonl", _arc_hf, "test"),
    "qft_openbookqa": ("openbookqa", "openbookqa/test.jsonl", _obqa_hf, "test"),
    "qft_boolq": ("boolq", "boolq/val.jsonl", _boolq_hf, "validation"),
    "qft_winogrande": ("winogrande", "winogrande/dev.jsonl", _wino_hf, "validation"),
    "qft_piqa": ("piqa", "piqa/valid.jsonl", None, "validation"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.shared_data
@needs_data
def test_task_matches_builtin(builtin_tm, tmp_path, name):
    builtin, rel, conv, split = CASES[name]
    raw = read_jsonl(DATA / rel)
    if name == "qft_piqa":
        labels = (DATA / "piqa" / "valid-labels.lst").read_text().split()
        raw = [{"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(y)} for d, y in zip(raw, labels)]
        conv = dict
    # add awkward ARC items: 3 or 5 choices, numeric labels
    odd = [i for i, d in enumerate(raw) if "question" in d and isinstance(d["question"], dict)
           and (len(d["question"]["choices"]) != 4 or d["answerKey"].isdigit())][:5]
    idx = sample_indices(len(raw), extra=odd)
    ours = qtasks.build_task(name, DATA)
    assert len(ours.eval_docs) == len(raw)
    ref = reference_task(builtin_tm, builtin, {split: [conv(raw[i]) for i in idx]}, tmp_path,
                         **{f"{split}_split": split})
    assert_same_rendering(ours, ref, idx)
    if name == "qft_winogrande":  # partial evaluation: one context per option
        assert isinstance(ours.fewshot_context(ours.eval_docs[0], 0), list)
    if odd:
        assert any(len(ours.doc_to_choice(ours.eval_docs[i])) != 4 for i in odd) or any(
            raw[i]["answerKey"].isdigit() for i in odd)



@pytest.mark.shared_data
@needs_data
def test_hellaswag_matches_builtin_up_to_ctx_b_case(builtin_tm, tmp_path):
    raw = read_jsonl(DATA / "hellaswag" / "hellaswag_val.jsonl")
    idx = sample_indices(len(raw), k=200)
    ours = qtasks.build_task("qft_hellaswag", DATA)
    assert len(ours.eval_docs) == len(raw)

    def hf(d, ctx_a, ctx_b):
        return {"ind": d["ind"], "activity_label": d["activity_label"], "ctx_a": ctx_a, "ctx_b": ctx_b,
                "ctx": d["ctx"], "endings": d["endings"], "source_id": "", "split": "val",
                "split_type": "indomain", "label": str(d["label"])}

    split = qtasks.utils.split_hellaswag_ctx
    same_split = reference_task(builtin_tm, "hellaswag", {"validation": [hf(raw[i], *split(raw[i]["ctx"]))
                                                                          for i in idx]},
                                tmp_path, validation_split="validation")
    assert_same_rendering(ours, same_split, idx)  # lm-eval's process_docs given the re-derived split

    (tmp_path / "b").mkdir()
    literal = reference_task(builtin_tm, "hellaswag", {"validation": [hf(raw[i], raw[i]["ctx"], "") for i in idx]},
                             tmp_path / "b", validation_split="validation")
    n_case_only = 0
    our_docs, lit_docs = ours.eval_docs, literal.eval_docs
    for j, i in enumerate(idx):
        d, r = our_docs[i], lit_docs[j]
        assert ours.doc_to_choice(d) == literal.doc_to_choice(r)
        assert ours.doc_to_target(d) == literal.doc_to_target(r) == raw[i]["label"]
        q_ours, q_ref = ours.fewshot_context(d, 0), literal.fewshot_context(r, 0)
        assert len(q_ours) == len(q_ref) and q_ours.lower() == q_ref.lower()
        frag = len(d["ctx_b"])
        assert q_ours[:len(q_ours) - frag] == q_ref[:len(q_ref) - frag]
        n_case_only += q_ours != q_ref
    assert 0 < n_case_only < len(idx)
    assert ours.fewshot_context(ours.eval_docs[0], 0) == "Roof shingle removal: A man is sitting on a roof. He"



def test_synthetic_task(tmp_path):
    path = tmp_path / "eval.jsonl"
    docs = [{"question": " What is 2+2? ", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "basic_math"},
            {"question": "Pick C", "choices": ["a", "b", "c", "d"], "answer": "C", "subject": ""}]
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    t = qtasks.build_task("qft_synthetic_letter", synthetic_path=path)  # MMLU's letter format
    d0, d1 = t.eval_docs[0], t.eval_docs[1]
    assert t.fewshot_context(d0, 0) == ("The following are multiple choice questions (with answers) about basic math."
                                        "\n\nWhat is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    assert t.fewshot_context(d1, 0) == "Pick C\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    assert t.doc_to_choice(d0) == ["A", "B", "C", "D"] and t.doc_to_target(d0) == 1 and t.doc_to_target(d1) == 2
    c = qtasks.build_task("qft_synthetic", synthetic_path=path)  # the default: the answer texts, as ARC
    e0, e1 = c.eval_docs[0], c.eval_docs[1]
    assert c.fewshot_context(e0, 0) == "Question: What is 2+2?\nAnswer:"
    assert c.doc_to_choice(e0) == ["3", "4", "5", "6"] and c.doc_to_target(e0) == 1 and c.doc_to_target(e1) == 2
