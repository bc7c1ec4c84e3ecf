"""The built-in task of `prefixlm train`: small string puzzles that reward reading the whole prompt.

Each answer depends on the entire instruction (the last letter of `reverse`, the smallest digit of
`sort`, every digit of `sum`), which the bidirectional prefix sees at once. Deterministic in the
seed, no download; held-out samples are drawn from the same generator and never overlap training.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from ..fsutil import write_atomic

__all__ = ["TASKS", "make_samples", "write_jsonl"]


def _reverse(rng: random.Random):
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 7)))
    return f"reverse {word}", word[::-1]


def _sort(rng: random.Random):
    digits = "".join(rng.choices(string.digits, k=rng.randint(3, 7)))
    return f"sort {digits}", "".join(sorted(digits))


def _digit_sum(rng: random.Random):
    digits = "".join(rng.choices(string.digits, k=rng.randint(2, 5)))
    return f"sum {digits}", str(sum(int(d) for d in digits))


def _replace(rng: random.Random):
    letters = rng.sample("abcdef", 3)
    word = "".join(rng.choices(letters, k=rng.randint(3, 7)))
    old, new = rng.choice(letters), rng.choice("xyz")
    return f"swap {old}{new} {word}", word.replace(old, new)


TASKS = {"reverse": _reverse, "sort": _sort, "sum": _digit_sum, "replace": _replace}


def make_samples(count: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """`count` distinct {"instruction", "response"} records, none whose instruction is in
    `exclude`, cycling through the tasks."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    tasks = list(TASKS.values())
    samples = []
    while len(samples) < count:
        instruction, response = tasks[len(samples) % len(tasks)](rng)
        if instruction in seen:
            continue
        seen.add(instruction)
        samples.append({"instruction": instruction, "response": response})
    return samples


def write_jsonl(samples: list[dict], path: str | Path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(sample) + "\n" for sample in samples).encode())


def make_split(train: int, held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    train_samples = make_samples(train, seed)
    held = make_samples(held_out, seed + 1, exclude={s["instruction"] for s in train_samples})
    return train_samples, held
