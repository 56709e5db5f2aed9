"""The fault table is whole: every case names an outcome and tests that exist, and README lists it."""
from __future__ import annotations

import ast
import os

from tests.fault_table import DRILL, FAULT_CASES, OUTCOMES, readme_section

TESTS = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(TESTS), "README.md")


def _test_functions(filename: str) -> set[str]:
    tree = ast.parse(open(os.path.join(TESTS, filename)).read())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_case_names_an_outcome_and_existing_tests():
    problems = []
    for case in FAULT_CASES:
        if case.outcome not in OUTCOMES:
            problems.append(f"{case.fault}: outcome {case.outcome!r} is not one of {OUTCOMES}")
        if not case.tests:
            problems.append(f"{case.fault}: no test feeds it")
        for ref in case.tests:
            filename, _, name = ref.partition("::")
            if not os.path.isfile(os.path.join(TESTS, filename)) or name not in _test_functions(filename):
                problems.append(f"{case.fault}: {ref} does not exist")
    for row in DRILL:
        if row.outcome not in OUTCOMES:
            problems.append(f"drill {row.name}: outcome {row.outcome!r} is not one of {OUTCOMES}")
    assert not problems, "\n".join(problems)
    assert len({r.name for r in DRILL}) == len(DRILL), "drill rows need unique names (they are the test ids)"


def test_readme_lists_the_table():
    text = open(README).read()
    section = readme_section()
    assert section in text, ("README's 'What happens when things go wrong' is out of date: replace its tables "
                             "with the output of `python -m tests.fault_table`")
