"""Write the data the recipes in configs/ train on, the same every time: ``python configs/make_data.py``.

- ``dates_{train,eval}.jsonl``: the demo's task (smolora.demo), dates written any way -> ISO 8601,
  prompt/completion records; the held-out dates are not in the training set.
- ``past_tense_{train,eval}.jsonl``: chat records with a system prompt, a present-tense sentence
  rewritten in the past tense (irregular verbs included), a quarter of them two turns long.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from smolora.demo import make_examples

HERE = Path(__file__).resolve().parent / "data"

SYSTEM = "Rewrite the user's sentence in the past tense. Reply with the sentence only."
SUBJECTS = [
    "The cat",
    "My sister",
    "The old man",
    "Our team",
    "The teacher",
    "A small dog",
    "The farmer",
    "Her brother",
    "The pilot",
    "The baker",
]
VERBS = [  # third person present -> past
    ("chases", "chased"),
    ("opens", "opened"),
    ("paints", "painted"),
    ("carries", "carried"),
    ("watches", "watched"),
    ("cleans", "cleaned"),
    ("fixes", "fixed"),
    ("finds", "found"),
    ("writes", "wrote"),
    ("buys", "bought"),
    ("catches", "caught"),
    ("sells", "sold"),
    ("breaks", "broke"),
    ("builds", "built"),
    ("drives", "drove"),
    ("holds", "held"),
    ("throws", "threw"),
    ("takes", "took"),
    ("brings", "brought"),
    ("draws", "drew"),
    ("leaves", "left"),
    ("keeps", "kept"),
    ("sends", "sent"),
    ("forgets", "forgot"),
]
OBJECTS = [
    "the red ball",
    "a long letter",
    "the old car",
    "the kitchen door",
    "a new house",
    "the blue box",
    "the map",
    "the small boat",
    "a heavy bag",
    "the wooden fence",
    "a funny picture",
    "the last ticket",
]
WHEN = [
    ("", ""),
    (" every day", " yesterday"),
    (" every morning", " yesterday morning"),
    (" on Sundays", " last Sunday"),
]


def _sentence_pair(rng: random.Random) -> tuple[str, str]:
    subject, (now, then), thing, (every, once) = (
        rng.choice(SUBJECTS),
        rng.choice(VERBS),
        rng.choice(OBJECTS),
        rng.choice(WHEN),
    )
    return f"{subject} {now} {thing}{every}.", f"{subject} {then} {thing}{once}."


def past_tense_records(count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """Chat records, each sentence new (not in ``exclude``, nor earlier in the list)."""
    rng = random.Random(seed)
    seen, records = set(exclude), []
    while len(records) < count:
        turns = [_sentence_pair(rng) for _ in range(2 if rng.random() < 0.25 else 1)]
        if any(present in seen for present, _ in turns):
            continue
        seen.update(present for present, _ in turns)
        messages = [{"role": "system", "content": SYSTEM}]
        for present, past in turns:
            messages += [{"role": "user", "content": present}, {"role": "assistant", "content": past}]
        records.append({"messages": messages})
    return records


def date_records(train_size: int = 600, eval_size: int = 50) -> tuple[list[dict], list[dict]]:
    """The demo's split: distinct training dates (seed 0), held-out ones not among them (seed 1)."""
    distinct = lambda records: list({json.dumps(r): r for r in records}.values())  # noqa: E731
    train = distinct(make_examples(train_size, 0))
    held_out = [r for r in distinct(make_examples(eval_size * 3, 1)) if r not in train][:eval_size]
    return train, held_out


def write_all(folder: Path = HERE) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    dates_train, dates_eval = date_records()
    tense_train = past_tense_records(400, 0)
    used = {m["content"] for r in tense_train for m in r["messages"] if m["role"] == "user"}
    tense_eval = past_tense_records(50, 1, exclude=used)
    files = {
        "dates_train.jsonl": dates_train,
        "dates_eval.jsonl": dates_eval,
        "past_tense_train.jsonl": tense_train,
        "past_tense_eval.jsonl": tense_eval,
    }
    for name, records in files.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    return [folder / name for name in files]


if __name__ == "__main__":
    for path in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
