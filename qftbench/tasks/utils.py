"""`!function` hooks of the offline task YAMLs in this folder.

Every ``process_*`` function maps the layout of a local data mirror onto the field layout of the
Hugging Face dataset that lm-eval's built-in task reads (so that the prompt templates copied from
lm-eval's YAMLs render the same strings):

==============  ======================================  =============================================
task            local layout                            HF layout produced (lm-eval dataset)
==============  ======================================  =============================================
mmlu            hendrycks CSV question,A,B,C,D,letter   cais/mmlu: question, subject, choices[4],
                                                        answer (0-3)
arc             AI2 jsonl id, question{stem,choices},   allenai/ai2_arc: id, question, choices{text,
                answerKey                               label}, answerKey
openbookqa      jsonl idx, question{stem,choices},      allenai/openbookqa (main): id, question_stem,
                answerKey                               choices{text,label}, answerKey
piqa            valid.jsonl + valid-labels.lst          baber/piqa: goal, sol1, sol2, label (0/1)
boolq           jsonl question, passage, idx, label     aps/super_glue boolq: question, passage, idx,
                (true/false)                            label (0=False, 1=True)
winogrande      dev.jsonl sentence, option1, option2,   allenai/winogrande (xl): sentence, option1,
                answer "1"/"2"                          option2, answer
hellaswag       jsonl ind, activity_label, ctx,         Rowan/hellaswag + lm-eval's process_docs:
                endings, label                          ... ctx_a, ctx_b, query, choices, gold
synthetic       jsonl question, choices[4], answer,     cais/mmlu-like
                subject
==============  ======================================  =============================================
"""
from __future__ import annotations

import re
from pathlib import Path

import datasets

LETTERS = "ABCD"


def _answer_index(value, n_choices: int = 4) -> int:
    """An answer given as an int (0-based), a digit string, or a letter A-D -> 0-based index."""
    if isinstance(value, bool):
        raise ValueError(f"answer must be an index or a letter, got {value!r}")
    if isinstance(value, int):
        idx = value
    else:
        s = str(value).strip()
        if s.isdigit():
            idx = int(s)
        elif len(s) == 1 and s.upper() in LETTERS[:n_choices]:
            idx = LETTERS.index(s.upper())
        else:
            raise ValueError(f"cannot read answer {value!r}")
    if not 0 <= idx < n_choices:
        raise ValueError(f"answer index {idx} out of range for {n_choices} choices")
    return idx


# --------------------------------------------------------------------------------------- MMLU
def process_mmlu(dataset: datasets.Dataset, subject: str = "") -> datasets.Dataset:
    """hendrycks CSV rows (question, A, B, C, D, answer letter) -> cais/mmlu fields."""

    def _doc(row):
        return {
            "question": row["question"],
            "subject": subject,
            "choices": [row["A"], row["B"], row["C"], row["D"]],
            "answer": LETTERS.index(row["answer"].strip()),
        }

    return dataset.map(_doc, remove_columns=dataset.column_names)


def process_synthetic(dataset: datasets.Dataset) -> datasets.Dataset:
    """qftbench synthetic eval.jsonl -> cais/mmlu fields (validated: 4 choices, answer 0-3), plus ``fact`` where
    the file has it (generator version 3: the id shared by the questions about one fact; files without it give the
    same documents, and document hashes, as before)."""
    with_fact = "fact" in dataset.column_names

    def _doc(row):
        choices = [str(c) for c in row["choices"]]
        if len(choices) != 4:
            raise ValueError(f"qft_synthetic needs exactly 4 choices, got {len(choices)}: {row}")
        doc = {
            "question": str(row["question"]),
            "subject": str(row.get("subject") or ""),
            "choices": choices,
            "answer": _answer_index(row["answer"]),
        }
        if with_fact:
            doc["fact"] = int(row["fact"])
        return doc

    return dataset.map(_doc, remove_columns=dataset.column_names)


# ---------------------------------------------------------------------------------------- ARC
def _choices(question: dict) -> dict:
    return {
        "text": [c["text"] for c in question["choices"]],
        "label": [c["label"] for c in question["choices"]],
    }


def process_arc(dataset: datasets.Dataset) -> datasets.Dataset:
    """AI2 ARC jsonl -> allenai/ai2_arc fields (labels kept as they are: A-E or 1-5)."""

    def _doc(row):
        return {
            "id": row["id"],
            "question": row["question"]["stem"],
            "choices": _choices(row["question"]),
            "answerKey": row["answerKey"],
        }

    return dataset.map(_doc, remove_columns=dataset.column_names)


def process_openbookqa(dataset: datasets.Dataset) -> datasets.Dataset:
    """OpenBookQA (ARC-like) jsonl -> allenai/openbookqa "main" fields."""

    def _doc(row):
        return {
            "id": str(row.get("id", row.get("idx"))),
            "question_stem": row["question"]["stem"],
            "choices": _choices(row["question"]),
            "answerKey": row["answerKey"],
        }

    return dataset.map(_doc, remove_columns=dataset.column_names)


# --------------------------------------------------------------------------------------- PIQA
def process_piqa(dataset: datasets.Dataset, labels_file: str | None = None) -> datasets.Dataset:
    """valid.jsonl (goal, sol1, sol2) + valid-labels.lst (one 0/1 per line) -> goal, sol1, sol2, label."""
    keep = ["goal", "sol1", "sol2"]
    drop = [c for c in dataset.column_names if c not in keep + ["label"]]
    dataset = dataset.remove_columns(drop)
    if "label" in dataset.column_names:  # already labelled (e.g. a converted copy)
        return dataset.cast_column("label", datasets.Value("int64"))
    if labels_file is None:
        raise ValueError("qft_piqa: the PIQA jsonl has no labels and no labels_file was given")
    labels = [int(x) for x in Path(labels_file).read_text().split()]
    if len(labels) != len(dataset):
        raise ValueError(f"qft_piqa: {len(labels)} labels in {labels_file} for {len(dataset)} questions")
    return dataset.add_column("label", labels)


# -------------------------------------------------------------------------------------- BoolQ
def process_boolq(dataset: datasets.Dataset) -> datasets.Dataset:
    """BoolQ jsonl (label true/false) -> super_glue boolq fields (label 0=False, 1=True)."""

    def _doc(row, i):
        label = row["label"] if "label" in row else row["answer"]
        if isinstance(label, str):
            label = {"true": 1, "false": 0}[label.strip().lower()]
        return {
            "question": row["question"],
            "passage": row["passage"],
            "idx": int(row["idx"]) if row.get("idx") is not None else i,
            "label": int(label),
        }

    return dataset.map(_doc, with_indices=True, remove_columns=dataset.column_names)


# --------------------------------------------------------------------------------- WinoGrande
def process_winogrande(dataset: datasets.Dataset) -> datasets.Dataset:
    """WinoGrande dev.jsonl -> allenai/winogrande fields (answer stays the string "1"/"2")."""

    def _doc(row):
        return {
            "sentence": row["sentence"],
            "option1": row["option1"],
            "option2": row["option2"],
            "answer": str(row["answer"]).strip(),
        }

    return dataset.map(_doc, remove_columns=dataset.column_names)


# Verbatim copies of lm_eval/tasks/winogrande/preprocess_winogrande.py (lm-eval 0.4.13).
def winogrande_doc_to_text(doc):
    answer_to_num = {"1": 0, "2": 1}
    return answer_to_num[doc["answer"]]


def winogrande_doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    options = [doc["option1"], doc["option2"]]
    return [doc["sentence"][:idx] + opt for opt in options]


# ---------------------------------------------------------------------------------- HellaSwag
def hellaswag_preprocess(text: str) -> str:
    """Verbatim copy of lm_eval/tasks/hellaswag/utils.py:preprocess (lm-eval 0.4.13)."""
    text = text.strip()
    # NOTE: Brackets are artifacts of the WikiHow dataset portion of HellaSwag.
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_TERMINATED = re.compile(r"[.!?][\"')\]]*$")


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """Re-derive HellaSwag's (ctx_a, ctx_b) from ``ctx = ctx_a + " " + ctx_b`` (or ``ctx_a`` alone).

    In the official files ctx_b is the unterminated beginning of the sentence the endings complete
    (ActivityNet items: "he", "the lady", ...) and is empty when ctx ends a sentence (most WikiHow
    items). The guess: ctx_b is the text after the last sentence end, unless ctx itself ends with
    sentence punctuation. lm-eval only uses ctx_b through ``ctx_b.capitalize()``, so a wrong guess
    changes nothing but the letter case inside the trailing fragment.
    """
    ctx = ctx.strip()
    if not ctx or _TERMINATED.search(ctx):
        return ctx, ""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return "", ctx
    cut = ends[-1].end()
    return ctx[:cut].rstrip(), ctx[cut:]


def process_hellaswag(dataset: datasets.Dataset) -> datasets.Dataset:
    """Mirror jsonl (ind, activity_label, ctx, endings, label) -> Rowan/hellaswag fields + lm-eval's
    processed fields (query, choices, gold), computed exactly as lm_eval/tasks/hellaswag/utils.py
    does from ctx_a/ctx_b (see split_hellaswag_ctx for the one re-derived piece)."""

    def _doc(row):
        if row.get("ctx_a") is not None and row.get("ctx_b") is not None:  # official layout
            ctx_a, ctx_b = row["ctx_a"], row["ctx_b"]
        else:
            ctx_a, ctx_b = split_hellaswag_ctx(row["ctx"])
        ctx = ctx_a + " " + ctx_b.capitalize()  # lm-eval's process_docs from here on
        return {
            "ind": row["ind"],
            "activity_label": row["activity_label"],
            "ctx_a": ctx_a,
            "ctx_b": ctx_b,
            "ctx": row["ctx"],
            "endings": list(row["endings"]),
            "label": str(row["label"]),
            "query": hellaswag_preprocess(row["activity_label"] + ": " + ctx),
            "choices": [hellaswag_preprocess(e) for e in row["endings"]],
            "gold": int(row["label"]),
        }

    return dataset.map(_doc, remove_columns=dataset.column_names)


#: the held-out Alpaca records of qft_alpaca_ppl: the last 1,000 of the 52,002
ALPACA_PPL_DOCS = 1000


def process_alpaca_ppl(dataset: datasets.Dataset) -> datasets.Dataset:
    """The last :data:`ALPACA_PPL_DOCS` Alpaca records, each one ``text``: instruction, input (when not empty)
    and output joined by newlines."""
    n = len(dataset)
    tail = dataset.select(range(max(0, n - ALPACA_PPL_DOCS), n))

    def _doc(row):
        parts = [row["instruction"], row.get("input") or "", row["output"]]
        return {"text": "\n".join(p for p in parts if p)}

    return tail.map(_doc)


def rolling_ppl_results(doc, results):
    """lm-eval's wikitext scoring (lm_eval/tasks/wikitext/preprocess_wikitext.py process_results) on ``text``:
    the document's log-likelihood with its word and byte counts."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["text"]))
    nbytes = len(doc["text"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
