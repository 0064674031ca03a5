"""The embedded default data: a world of fictional facts, generated from a seed (nothing is downloaded).

A pretrained model cannot know these facts (the names are generated from syllables and each value is
drawn from a pool of equally plausible words), so before fine-tuning a model answers the four-choice
questions at chance (25 %); after a short fine-tune on the training records it should answer most of
them. That makes the task a cheap, CPU-sized signal that fine-tuning (with any quantization method)
actually taught the model something.

* :func:`generate_world` draws ``n_entities`` fictional entities (guilds, inventors, islands,
  musicians, ships, festivals), each with one fact (metal, invention, fruit, instrument, sail color,
  month). Values are assigned in shuffled rounds over each relation's pool, so every value is used
  about equally often and no answer can be guessed from a prior over the pool.
* :func:`training_records` renders each fact as Alpaca records ``{instruction, input, output}`` with
  several question phrasings (``TRAIN_TEMPLATES``), the output being a full answer sentence.
* :func:`eval_items` renders each fact as an MMLU-style four-choice question with a HELD-OUT phrasing
  (``EVAL_TEMPLATES``, never used for training); the three distractors come from the same relation's
  pool, and the correct answer's position is balanced over A-D.
* :func:`write_synthetic` writes ``train.json`` (Alpaca format), ``eval.jsonl`` and ``manifest.json``
  atomically; the same arguments always give byte-identical files.

Randomness uses ``random.Random(seed)`` only (stable across Python versions and platforms).
The default world (60 facts x 4 phrasings = 240 records) is small enough for a few hundred CPU training
steps of a 135M model; ``n_entities`` and ``phrasings_per_fact`` tune it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from methods.atomic import atomic_write

__all__ = [
    "GENERATOR_VERSION",
    "RELATIONS",
    "TRAIN_TEMPLATES",
    "EVAL_TEMPLATES",
    "VALIDATION_TEMPLATES",
    "DEFAULT_N_ENTITIES",
    "max_entities",
    "generate_world",
    "training_records",
    "eval_items",
    "write_synthetic",
]

#: 2: adds validation.jsonl (train.json and eval.jsonl are byte-identical to version 1's).
#: 3: five held-out and five validation phrasings per relation (were two), so ``eval_per_fact`` goes up to 5; each
#: question records its ``fact`` (the cluster of the uncertainty bootstrap). With ``eval_per_fact`` <= 2 the
#: questions, choices and answers are those of version 2 (the phrasings rotate over the first two as before).
GENERATOR_VERSION = 3
#: the phrasings a fact's questions rotate over have at least this many (version 2 had two per relation)
_MIN_ROTATION = 2
DEFAULT_N_ENTITIES = 60
DEFAULT_PHRASINGS = 4

# relation -> attribute pool (all values of one relation are the same kind of word)
RELATIONS: dict[str, list[str]] = {
    "guild_metal": ["copper", "tin", "silver", "gold", "iron", "zinc", "nickel", "cobalt", "lead", "platinum"],
    "inventor_device": ["lantern", "compass", "loom", "telescope", "sundial", "kite", "abacus", "bellows",
                        "pulley", "barometer"],
    "island_fruit": ["apples", "pears", "plums", "figs", "lemons", "cherries", "grapes", "melons", "peaches",
                     "oranges"],
    "musician_instrument": ["violin", "cello", "harp", "flute", "oboe", "trumpet", "piano", "drum", "lute",
                            "clarinet"],
    "ship_sail_color": ["red", "blue", "green", "yellow", "black", "white", "purple", "orange", "grey",
                        "brown"],
    "festival_month": ["January", "February", "March", "April", "May", "June", "July", "August", "September",
                       "October", "November", "December"],
}

# The answer sentence used as the training output.
ANSWER_TEMPLATES: dict[str, str] = {
    "guild_metal": "The {name} guild is known for smelting {value}.",
    "inventor_device": "The inventor {name} invented the {value}.",
    "island_fruit": "The island of {name} is known for growing {value}.",
    "musician_instrument": "The musician {name} plays the {value}.",
    "ship_sail_color": "The ship {name} has {value} sails.",
    "festival_month": "The {name} festival is held in {value}.",
}

# Phrasings used for training (the first ``phrasings_per_fact`` of each list are used).
TRAIN_TEMPLATES: dict[str, list[str]] = {
    "guild_metal": [
        "Which metal is the {name} guild known for smelting?",
        "What metal does the {name} guild smelt?",
        "The {name} guild is famous for smelting which metal?",
        "Name the metal that the {name} guild smelts.",
        "Tell me which metal the {name} guild smelts.",
    ],
    "inventor_device": [
        "What did the inventor {name} invent?",
        "Which device was invented by {name}?",
        "{name} is remembered as the inventor of which device?",
        "Name the device that the inventor {name} created.",
        "Tell me what {name} invented.",
    ],
    "island_fruit": [
        "Which fruit is grown on the island of {name}?",
        "What fruit do farmers grow on {name} island?",
        "The island of {name} is known for growing which fruit?",
        "Name the fruit that grows on the island of {name}.",
        "Tell me which fruit is grown on {name}.",
    ],
    "musician_instrument": [
        "Which instrument does the musician {name} play?",
        "What instrument is {name} famous for playing?",
        "The musician {name} plays which instrument?",
        "Name the instrument played by the musician {name}.",
        "Tell me which instrument {name} plays.",
    ],
    "ship_sail_color": [
        "What color are the sails of the ship {name}?",
        "The ship {name} has sails of which color?",
        "Which color are the sails of the {name}?",
        "Name the color of the sails on the ship {name}.",
        "Tell me the sail color of the ship {name}.",
    ],
    "festival_month": [
        "In which month is the {name} festival held?",
        "When is the {name} festival celebrated?",
        "The {name} festival takes place in which month?",
        "Name the month of the {name} festival.",
        "Tell me when the {name} festival is held.",
    ],
}

# Held-out phrasings, used only for evaluation questions.
EVAL_TEMPLATES: dict[str, list[str]] = {
    "guild_metal": [
        "Members of the {name} guild spend their days working with which metal?",
        "If you visited the forges of the {name} guild, which metal would you see being smelted?",
        "Ingots stamped by the {name} guild are made of which metal?",
        "A merchant buying from the {name} guild would be buying which metal?",
        "The {name} guild's workshops produce bars of which metal?",
    ],
    "inventor_device": [
        "Historians credit {name} with inventing which of these devices?",
        "Which of these devices would a museum display as the work of {name}?",
        "Which device appears in the notebooks of {name} as their own invention?",
        "Schoolbooks name {name} as the person who invented which device?",
        "The first working model of which device was made by {name}?",
    ],
    "island_fruit": [
        "The orchards of {name} are full of which fruit?",
        "A traveller returning from {name} would most likely bring back which fruit?",
        "Farmers on {name} harvest which fruit every season?",
        "Ships leaving {name} are loaded with crates of which fruit?",
        "Which fruit is the island {name} famous for?",
    ],
    "musician_instrument": [
        "At concerts, {name} always performs on which instrument?",
        "If you heard {name} rehearsing, which instrument would you hear?",
        "Audiences come to hear {name} play which instrument?",
        "Recordings of {name} feature which instrument?",
        "In the orchestra, {name} sits with which instrument?",
    ],
    "ship_sail_color": [
        "Sailors recognise the {name} from afar by its sails of which color?",
        "Looking at the {name} in the harbour, what color would its sails be?",
        "The {name} raises sails of which color?",
        "A lookout spotting the {name} would see sails of which color?",
        "Which color are the canvases hoisted on the {name}?",
    ],
    "festival_month": [
        "To attend the {name} festival, in which month should you travel?",
        "People gather for the {name} festival during which month?",
        "Every year the {name} festival comes around in which month?",
        "Which month do townsfolk reserve for the {name} festival?",
        "Posters for the {name} festival announce it for which month?",
    ],
}

# Validation phrasings: used neither for training nor for the test questions (eval.jsonl), so that choices made on
# the validation split (learning rates, steps) never look at a test phrasing.
VALIDATION_TEMPLATES: dict[str, list[str]] = {
    "guild_metal": [
        "Apprentices who join the {name} guild learn to smelt which metal?",
        "The furnaces of the {name} guild are used to smelt which metal?",
        "Coins cast by the {name} guild are made from which metal?",
        "Which metal fills the storerooms of the {name} guild?",
        "Smiths of the {name} guild are experts in which metal?",
    ],
    "inventor_device": [
        "Which of these devices did {name} first build?",
        "A patent signed by {name} describes which device?",
        "Which device made {name} famous as an inventor?",
        "Sketches by {name} show the design of which device?",
        "Credit for inventing which device goes to {name}?",
    ],
    "island_fruit": [
        "Markets on {name} mostly sell which locally grown fruit?",
        "Which fruit fills the fields of the island {name}?",
        "Which fruit do the people of {name} grow for export?",
        "Trees on the island of {name} bear which fruit?",
        "The harvest festival on {name} celebrates which fruit?",
    ],
    "musician_instrument": [
        "Which instrument does {name} carry to every performance?",
        "Music lovers know {name} as a player of which instrument?",
        "Which instrument did {name} learn to master?",
        "Posters of {name} show the musician holding which instrument?",
        "Critics praise {name} for playing which instrument?",
    ],
    "ship_sail_color": [
        "Which color do the sails of the {name} show when it leaves port?",
        "Painters of the {name} use which color for its sails?",
        "Which color of sails does the {name} fly?",
        "From the shore, the {name} shows sails of which color?",
        "The crew of the {name} hoists sails of which color?",
    ],
    "festival_month": [
        "Visitors plan their trip to the {name} festival for which month?",
        "The calendar marks the {name} festival in which month?",
        "Which month is set aside each year for the {name} festival?",
        "Travellers arrive for the {name} festival in which month?",
        "The {name} festival opens in which month?",
    ],
}

_ONSETS = ["Kel", "Dro", "Thes", "Val", "Mor", "Quen", "Zar", "Bry", "Ost", "Fen", "Gal", "Hal", "Ix", "Jor",
           "Lun", "Nim", "Pra", "Ryl", "Sev", "Tor", "Ul", "Vex", "Wyn", "Yst"]
_MIDDLES = ["va", "ri", "do", "ma", "ne", "lo", "ka", "thi", "su", "be"]
_CODAS = ["ri", "mund", "dor", "wyn", "eth", "ian", "ora", "ix", "ell", "ost", "ara", "een"]


def max_entities() -> int:
    """The largest ``n_entities`` the name generator supports."""
    return len(_ONSETS) * len(_MIDDLES) * len(_CODAS)


def generate_world(seed: int = 0, n_entities: int = DEFAULT_N_ENTITIES) -> dict[str, Any]:
    """A deterministic world of ``n_entities`` fictional facts.

    Returns ``{"seed", "n_entities", "version", "facts": [{"id", "entity", "relation", "value"}]}``.
    Entities are spread evenly over the relations; names are unique.
    """
    if not isinstance(n_entities, int) or isinstance(n_entities, bool) or not 1 <= n_entities <= max_entities():
        raise ValueError(f"n_entities must be an integer in 1..{max_entities()}, got {n_entities!r}.")
    rng = random.Random(f"qftbench-synthetic-world:{int(seed)}")
    combos = [o + m + c for o in _ONSETS for m in _MIDDLES for c in _CODAS]
    names = rng.sample(combos, n_entities)
    relations = list(RELATIONS)
    rng.shuffle(relations)
    # value rounds: each relation walks through a fresh shuffle of its pool
    queues: dict[str, list[str]] = {r: [] for r in relations}
    facts = []
    for i, name in enumerate(names):
        rel = relations[i % len(relations)]
        if not queues[rel]:
            pool = list(RELATIONS[rel])
            rng.shuffle(pool)
            queues[rel] = pool
        facts.append({"id": i, "entity": name, "relation": rel, "value": queues[rel].pop()})
    return {"seed": int(seed), "n_entities": n_entities, "version": GENERATOR_VERSION, "facts": facts}


def training_records(world: dict[str, Any], phrasings_per_fact: int = DEFAULT_PHRASINGS,
                     shuffle: bool = True) -> list[dict[str, str]]:
    """Alpaca records ``{instruction, input, output}``: each fact asked in ``phrasings_per_fact`` ways.

    The output is the full answer sentence (e.g. "The Kelvari guild is known for smelting cobalt.").
    ``shuffle`` orders the records deterministically from the world's seed.
    """
    n_max = min(len(t) for t in TRAIN_TEMPLATES.values())
    if not 1 <= phrasings_per_fact <= n_max:
        raise ValueError(f"phrasings_per_fact must be in 1..{n_max}, got {phrasings_per_fact!r}.")
    records = []
    for fact in world["facts"]:
        rel, name, value = fact["relation"], fact["entity"], fact["value"]
        answer = ANSWER_TEMPLATES[rel].format(name=name, value=value)
        for template in TRAIN_TEMPLATES[rel][:phrasings_per_fact]:
            records.append({"instruction": template.format(name=name), "input": "", "output": answer})
    if shuffle:
        random.Random(f"qftbench-synthetic-train:{world['seed']}").shuffle(records)
    return records


def eval_items(world: dict[str, Any], per_fact: int = 1, split: str = "test") -> list[dict[str, Any]]:
    """MMLU-style items ``{"question", "choices": [4 str], "answer": 0-3, "subject", "fact"}``, held-out phrasings.

    ``per_fact`` questions per fact (different held-out phrasings, up to ``len(EVAL_TEMPLATES[rel])``); ``fact``
    is the fact's id, shared by its questions (they are not independent: the statistics resample facts).
    Distractors are three other values of the same relation's pool. The correct position is balanced:
    the counts of answers 0, 1, 2, 3 differ by at most one. ``split``: ``test`` (``EVAL_TEMPLATES``, the
    reported numbers) or ``validation`` (``VALIDATION_TEMPLATES``, for choosing hyperparameters; its own
    distractors and answer positions).
    """
    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}.")
    all_templates = EVAL_TEMPLATES if split == "test" else VALIDATION_TEMPLATES
    n_max = min(len(t) for t in all_templates.values())
    if not 1 <= per_fact <= n_max:
        raise ValueError(f"per_fact must be in 1..{n_max}, got {per_fact!r}.")
    rng = random.Random(f"qftbench-synthetic-eval:{world['seed']}" if split == "test"
                        else f"qftbench-synthetic-validation:{world['seed']}")
    raw = []
    seen: Counter[str] = Counter()
    for fact in world["facts"]:
        rel = fact["relation"]
        templates = all_templates[rel]
        j = seen[rel]  # index of this fact within its relation
        seen[rel] += 1
        for k in range(per_fact):
            # rotate over the relation's first max(per_fact, 2) phrasings (all five at per_fact 5)
            template = templates[(j + k) % max(per_fact, _MIN_ROTATION)]
            distractors = rng.sample([v for v in RELATIONS[rel] if v != fact["value"]], 3)
            raw.append((fact, template, distractors))
    positions = [i % 4 for i in range(len(raw))]
    rng.shuffle(positions)
    items = []
    for (fact, template, distractors), pos in zip(raw, positions):
        choices = list(distractors)
        choices.insert(pos, fact["value"])
        items.append({
            "question": template.format(name=fact["entity"]),
            "choices": choices,
            "answer": pos,
            "subject": fact["relation"],
            "fact": fact["id"],
        })
    return items


def write_synthetic(out_dir: str | os.PathLike, seed: int = 0, n_entities: int = DEFAULT_N_ENTITIES,
                    phrasings_per_fact: int = DEFAULT_PHRASINGS, eval_per_fact: int = 1) -> dict[str, Any]:
    """Write ``train.json`` (Alpaca list), ``eval.jsonl`` (test), ``validation.jsonl`` (the same facts in
    phrasings used neither for training nor for the test, ``eval_per_fact`` per fact) and ``manifest.json``.

    Each file is written to a temporary name and renamed into place; the manifest is written last, so its
    presence means the data files are complete. Returns the manifest: seed, counts, answer-position
    counts, the generator version and each file's sha256. The same arguments give byte-identical files.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = generate_world(seed, n_entities)
    train = training_records(world, phrasings_per_fact)
    items = eval_items(world, eval_per_fact)
    val = eval_items(world, eval_per_fact, split="validation")
    train_text = json.dumps(train, indent=1, ensure_ascii=False) + "\n"
    eval_text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items)
    val_text = "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in val)
    atomic_write(out / "train.json", train_text)
    atomic_write(out / "eval.jsonl", eval_text)
    atomic_write(out / "validation.jsonl", val_text)
    manifest = {
        "generator": "qftbench.synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "n_entities": n_entities,
        "n_facts": len(world["facts"]),
        "phrasings_per_fact": phrasings_per_fact,
        "eval_per_fact": eval_per_fact,
        "n_train": len(train),
        "n_eval": len(items),
        "n_validation": len(val),
        "answer_counts": [Counter(it["answer"] for it in items).get(k, 0) for k in range(4)],
        "relations": dict(sorted(Counter(f["relation"] for f in world["facts"]).items())),
        "files": {
            "train.json": hashlib.sha256(train_text.encode("utf-8")).hexdigest(),
            "eval.jsonl": hashlib.sha256(eval_text.encode("utf-8")).hexdigest(),
            "validation.jsonl": hashlib.sha256(val_text.encode("utf-8")).hexdigest(),
        },
    }
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
