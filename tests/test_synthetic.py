"""qftbench.synthetic: determinism, held-out phrasings, answer balance, answers grounded in training."""
from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from qftbench import synthetic
from qftbench.synthetic import (
    EVAL_TEMPLATES,
    RELATIONS,
    TRAIN_TEMPLATES,
    eval_items,
    generate_world,
    training_records,
    write_synthetic,
)


def test_write_is_byte_identical_for_the_same_seed(tmp_path):
    m1 = write_synthetic(tmp_path / "a", seed=5)
    m2 = write_synthetic(tmp_path / "b", seed=5)
    for name in ("train.json", "eval.jsonl", "validation.jsonl", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert m1 == m2
    write_synthetic(tmp_path / "c", seed=6)
    assert (tmp_path / "c" / "train.json").read_bytes() != (tmp_path / "a" / "train.json").read_bytes()
    # only the four files, no temporary leftovers
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["eval.jsonl", "manifest.json", "train.json",
                                                                   "validation.jsonl"]


def test_files_and_manifest(tmp_path):
    man = write_synthetic(tmp_path, seed=0)
    train = json.loads((tmp_path / "train.json").read_text())
    items = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert man["seed"] == 0 and man["n_train"] == len(train) == 60 * 4 and man["n_eval"] == len(items) == 60
    assert json.loads((tmp_path / "manifest.json").read_text()) == man
    assert all(set(r) == {"instruction", "input", "output"} and r["input"] == "" for r in train)
    for it in items:
        assert set(it) == {"question", "choices", "answer", "subject", "fact"}
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert it["answer"] in range(4) and it["subject"] in RELATIONS
        assert set(it["choices"]) <= set(RELATIONS[it["subject"]]), "distractors come from the same pool"
    # the data loader accepts the training file as Alpaca data
    from qftbench.data import load_alpaca

    assert len(load_alpaca(tmp_path / "train.json")) == len(train)


def test_world_is_deterministic_and_names_unique():
    w = generate_world(3, 80)
    assert w == generate_world(3, 80) and w != generate_world(4, 80)
    names = [f["entity"] for f in w["facts"]]
    assert len(set(names)) == 80
    rel_counts = Counter(f["relation"] for f in w["facts"])
    assert max(rel_counts.values()) - min(rel_counts.values()) <= 1
    for rel in RELATIONS:  # values used evenly within each relation
        vals = Counter(f["value"] for f in w["facts"] if f["relation"] == rel)
        assert max(vals.values()) - min(vals.values()) <= 1
    with pytest.raises(ValueError, match="n_entities"):
        generate_world(0, 0)


def _strip(text: str, names) -> str:
    return re.sub("|".join(map(re.escape, names)), "{name}", text)


@pytest.mark.parametrize("per_fact", [1, 2, 5])
def test_heldout_phrasings_never_in_training(per_fact):
    world = generate_world(0)
    names = sorted((f["entity"] for f in world["facts"]), key=len, reverse=True)
    train = training_records(world, phrasings_per_fact=max(len(t) for t in TRAIN_TEMPLATES.values()))
    train_prompts = {r["instruction"] for r in train}
    train_templates = {_strip(r["instruction"], names) for r in train}
    items = eval_items(world, per_fact=per_fact)
    used = set()
    for it in items:
        assert it["question"] not in train_prompts
        tmpl = _strip(it["question"], names)
        assert tmpl not in train_templates
        assert tmpl in EVAL_TEMPLATES[it["subject"]]
        used.add(tmpl)
    pool = max(per_fact, 2)  # the phrasings rotate over the first max(per_fact, 2) of each relation
    assert used == {t for ts in EVAL_TEMPLATES.values() for t in ts[:pool]}, "every phrasing of the pool is used"
    # the questions about one fact share its id and ask it in per_fact different phrasings
    by_fact: dict = {}
    for it in items:
        by_fact.setdefault(it["fact"], []).append(_strip(it["question"], names))
    assert len(by_fact) == len(world["facts"]) and all(len(set(q)) == per_fact for q in by_fact.values())
    assert not {t for ts in EVAL_TEMPLATES.values() for t in ts} & {t for ts in TRAIN_TEMPLATES.values() for t in ts}


@pytest.mark.parametrize("n_entities,per_fact", [(60, 1), (61, 1), (43, 2), (7, 1)])
def test_answer_positions_balanced(n_entities, per_fact):
    items = eval_items(generate_world(1, n_entities), per_fact=per_fact)
    counts = Counter(it["answer"] for it in items)
    assert sum(counts.values()) == n_entities * per_fact
    assert max(counts.get(k, 0) for k in range(4)) - min(counts.get(k, 0) for k in range(4)) <= 1


def test_every_eval_answer_is_taught_in_training():
    world = generate_world(2, 50)
    for k in (1, 4):
        train = training_records(world, phrasings_per_fact=k)
        assert len(train) == 50 * k
        for it in eval_items(world):
            entity = next(f["entity"] for f in world["facts"] if f["entity"] in it["question"])
            answer = it["choices"][it["answer"]]
            teaching = [r for r in train if entity in r["instruction"]]
            assert len(teaching) == k
            assert all(re.search(rf"\b{re.escape(answer)}\b", r["output"]) for r in teaching)
            for wrong in (c for i, c in enumerate(it["choices"]) if i != it["answer"]):
                assert not any(re.search(rf"\b{re.escape(wrong)}\b", r["output"]) for r in teaching)


def test_tunable_sizes_and_bad_arguments():
    world = generate_world(0, 12)
    assert len(training_records(world, phrasings_per_fact=2)) == 24
    assert len(eval_items(world, per_fact=2)) == 24
    with pytest.raises(ValueError, match="phrasings_per_fact"):
        training_records(world, phrasings_per_fact=99)
    with pytest.raises(ValueError, match="per_fact"):
        eval_items(world, per_fact=0)
    assert synthetic.max_entities() >= 1000


def test_validation_split_is_disjoint_in_phrasing_and_recorded(tmp_path):
    """validation.jsonl asks the same facts in phrasings used neither for training nor for the test; the test
    file is byte-identical to generator version 1's (same items, same RNG stream)."""
    man = synthetic.write_synthetic(tmp_path, seed=0, n_entities=30, eval_per_fact=2)
    test = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (tmp_path / "validation.jsonl").read_text().splitlines()]
    train = json.loads((tmp_path / "train.json").read_text())
    assert man["n_validation"] == len(val) == len(test) == 60 and man["version"] == 3
    assert {q["question"] for q in val}.isdisjoint({q["question"] for q in test})
    assert {q["question"] for q in val}.isdisjoint({r["instruction"] for r in train})
    all_templates = [t for ts in synthetic.VALIDATION_TEMPLATES.values() for t in ts]
    used = [t for ts in list(synthetic.TRAIN_TEMPLATES.values()) + list(synthetic.EVAL_TEMPLATES.values()) for t in ts]
    assert not set(all_templates) & set(used)
    # every validation answer is the fact's value, balanced over A-D
    world = synthetic.generate_world(0, 30)
    values = {f["entity"]: f["value"] for f in world["facts"]}
    for q in val:
        name = next(n for n in values if n in q["question"])
        assert q["choices"][q["answer"]] == values[name]
    counts = [sum(q["answer"] == k for q in val) for k in range(4)]
    assert max(counts) - min(counts) <= 1
    assert test == synthetic.eval_items(world, 2)  # the test split did not move


def test_validation_task_reads_the_validation_file(tmp_path):
    from qftbench import tasks as qtasks

    synthetic.write_synthetic(tmp_path, seed=0, n_entities=12)
    cfg = qtasks.task_config("qft_synthetic_val", synthetic_path=tmp_path / "eval.jsonl")
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "validation.jsonl").resolve())
    cfg = qtasks.task_config("qft_synthetic", synthetic_path=tmp_path / "eval.jsonl")
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str((tmp_path / "eval.jsonl").resolve())


# sha256 of json.dumps(items, sort_keys=True) of generator version 2's eval_items (commit 5839c26), without the
# `fact` field that version 3 adds: up to two questions per fact, version 3 asks exactly the same questions.
V2_ITEMS = {(0, 24, 2, "test"): "a051270d26c6871e", (0, 24, 2, "validation"): "dfc0826693c539f4",
            (1, 61, 1, "test"): "f68fca23d19a229a", (0, 60, 1, "validation"): "eacb7786361e3254"}


@pytest.mark.parametrize("seed,n,per_fact,split", list(V2_ITEMS))
def test_items_up_to_two_per_fact_are_version_2s(seed, n, per_fact, split):
    import hashlib

    items = [{k: v for k, v in it.items() if k != "fact"}
             for it in eval_items(generate_world(seed, n), per_fact, split=split)]
    digest = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]
    assert digest == V2_ITEMS[(seed, n, per_fact, split)]


def test_five_phrasings_per_fact_give_300_test_and_300_validation_questions(tmp_path):
    man = synthetic.write_synthetic(tmp_path, seed=0, n_entities=60, eval_per_fact=5)
    test = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    val = [json.loads(x) for x in (tmp_path / "validation.jsonl").read_text().splitlines()]
    assert len(test) == len(val) == 300 and man["n_validation"] == 300
    assert {q["question"] for q in test}.isdisjoint({q["question"] for q in val})
    assert Counter(q["fact"] for q in test) == Counter({i: 5 for i in range(60)})
