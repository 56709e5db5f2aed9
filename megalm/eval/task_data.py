"""The data of the tasks megalm ships (megalm/eval/tasks/*.jsonl), generated deterministically here.

    python -m megalm.eval.task_data [--out DIR]     # rewrites the shipped files (byte-identical)

megalm_larger: "Which is larger, 37 or 52? Answer:" with choices " 37" / " 52" (two-digit numbers,
never equal). A model pre-trained on source code has no reason to prefer the larger number (chance is
50%, and the test split is balanced so that "always the first" or "always the second" scores exactly
50%), but it is learnable by fine-tuning on the train split: every train row has `prompt` and
`response` (= the right choice), the form fine-tuning data takes. No (a, b) pair of the test split,
in either order, is in the train split.

megalm_copy: "Repeat: c a f ->" with target " c a f" (3 to 6 letters of a-j), scored by exact match
of the greedy generation up to a newline.

Rows are compact JSON (no spaces) so the shipped files stay small (package data, < 200 KB in all).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Optional

from .task_files import SHIPPED_TASKS_DIR

LARGER_TRAIN_ROWS, LARGER_TEST_ROWS = 2000, 100
COPY_TRAIN_ROWS, COPY_TEST_ROWS = 400, 100
COPY_LETTERS = "abcdefghij"

# file name -> rows, in the order the generators produce them
LARGER_TRAIN_FILE, LARGER_TEST_FILE = "larger_train.jsonl", "larger_test.jsonl"
COPY_TRAIN_FILE, COPY_TEST_FILE = "copy_train.jsonl", "copy_test.jsonl"


def larger_row(a: int, b: int) -> dict:
    """`a`/`b` are the two numbers in prompt order; `response` is the larger one as its choice text."""
    return {"a": a, "b": b, "prompt": f"Which is larger, {a} or {b}? Answer:", "response": f" {max(a, b)}"}


def larger_rows(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) rows of megalm_larger. The test split holds LARGER_TEST_ROWS pairs, half with the
    larger number first; the train split draws from the pairs the test split does not use."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(a + 1, 100)]  # a < b, unordered pairs
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[:LARGER_TEST_ROWS], pairs[LARGER_TEST_ROWS:LARGER_TEST_ROWS + LARGER_TRAIN_ROWS]
    # balanced test: exactly half the rows put the larger number first
    test = [larger_row(b, a) if i % 2 else larger_row(a, b) for i, (a, b) in enumerate(test_pairs)]
    rng.shuffle(test)
    train = [larger_row(b, a) if rng.random() < 0.5 else larger_row(a, b) for a, b in train_pairs]
    return train, test


def copy_row(letters: list[str]) -> dict:
    text = " ".join(letters)
    return {"prompt": f"Repeat: {text} ->", "response": f" {text}"}


def copy_rows(seed: int = 1) -> tuple[list[dict], list[dict]]:
    """(train, test) rows of megalm_copy; no letter sequence of the test split is in the train split."""
    rng = random.Random(seed)
    seen: set[tuple[str, ...]] = set()

    def draw(n: int) -> list[dict]:
        rows = []
        while len(rows) < n:
            letters = tuple(rng.choice(COPY_LETTERS) for _ in range(rng.randint(3, 6)))
            if letters not in seen:
                seen.add(letters)
                rows.append(copy_row(list(letters)))
        return rows

    test = draw(COPY_TEST_ROWS)
    return draw(COPY_TRAIN_ROWS), test


def _write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
    return path


def write_task_data(out_dir: str = SHIPPED_TASKS_DIR) -> list[str]:
    """Write every shipped task's JSONL splits into `out_dir`; the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    larger_train, larger_test = larger_rows()
    copy_train, copy_test = copy_rows()
    files = {LARGER_TRAIN_FILE: larger_train, LARGER_TEST_FILE: larger_test,
             COPY_TRAIN_FILE: copy_train, COPY_TEST_FILE: copy_test}
    return [_write_jsonl(os.path.join(out_dir, name), rows) for name, rows in files.items()]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megalm.eval.task_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=SHIPPED_TASKS_DIR, help="directory to write the JSONL files into")
    args = p.parse_args(argv)
    for path in write_task_data(args.out):
        print(f"{path}: {os.path.getsize(path)} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
