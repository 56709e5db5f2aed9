"""Rules that training owns are defined once; export/eval read them instead of restating them.

A source scan, because the failure this guards against is a copy that still happens to agree today:
the ignore label, the perplexity clamp, the data split default, the weight-decay rule, and checkpoint
metadata read as raw dicts with copied defaults. Each finding names the file, line and the fix.
"""
from __future__ import annotations

import re

from tests.source_files import read_sources
from tests.train_fixtures import REPO

SOURCE_DIRS = ("megalm", "data_prep", "launcher", "bench", "scripts")

# (what, regex, files allowed to match (repo-relative), the fix)
RULES = [
    ("the ignore label", re.compile(r"(?<![\w.])-100(?!\d)"), {"megalm/parallel/cross_entropy.py"},
     "import IGNORE_INDEX from megalm.parallel.cross_entropy"),
    ("an IGNORE_INDEX definition", re.compile(r"^[ \t]*IGNORE_INDEX[ \t]*(:[^=\n]*)?=", re.M),
     {"megalm/parallel/cross_entropy.py"}, "import IGNORE_INDEX from megalm.parallel.cross_entropy"),
    ("a perplexity clamp", re.compile(r"exp\(\s*min\("), {"megalm/parallel/cross_entropy.py"},
     "call megalm.parallel.cross_entropy.perplexity"),
    ("the data split default", re.compile(r"969\s*,\s*30\s*,\s*1"), {"megalm/config/data.py"},
     "read DataConfig.split (e.g. CheckpointRef.run_config().data.split)"),
    ("a weight-decay test on parameter names", re.compile(r"""["']embedding["']\s+(not\s+)?in\b"""), set(),
     "use megalm.training.param_groups.decays / group_names"),
]

# Checkpoint tools read the run config typed (RunConfig.from_checkpoint_meta), not from the raw dict.
RAW_CONFIG_READ = re.compile(r"""meta\s*(\.get\(\s*["']config["']|\[\s*["']config["']\s*\](?!\s*=[^=]))""")
TOOL_DIRS = ("megalm/eval", "megalm/export")


def _sources() -> list[tuple[str, str]]:
    return read_sources(SOURCE_DIRS, (".py", ".sh", ".sbatch"))


def _findings(text: str, pattern: re.Pattern) -> list[int]:
    return [text.count("\n", 0, m.start()) + 1 for m in pattern.finditer(text)]


def test_training_rules_are_not_restated():
    sources = _sources()
    assert any(rel == "megalm/parallel/cross_entropy.py" for rel, _ in sources), "scan found no sources"
    problems = []
    for what, pattern, allowed, fix in RULES:
        for rel, text in sources:
            if rel not in allowed:
                problems += [f"{rel}:{line}: {what} restated; {fix}" for line in _findings(text, pattern)]
    for rel, text in sources:
        if rel.startswith(TOOL_DIRS):
            problems += [f"{rel}:{line}: checkpoint config read as a raw dict; use CheckpointRef.run_config()"
                         for line in _findings(text, RAW_CONFIG_READ)]
    assert not problems, "\n".join(problems)


def test_the_one_definitions_exist_and_agree_with_torch():
    import math

    import torch
    import torch.nn.functional as F

    from megalm.parallel.cross_entropy import IGNORE_INDEX, perplexity

    # F.cross_entropy's default ignore_index is the same label, so reference losses agree
    logits, labels = torch.zeros(2, 3), torch.tensor([1, IGNORE_INDEX])
    assert F.cross_entropy(logits, labels).item() == F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).item()
    assert math.isclose(perplexity(math.log(7.0)), 7.0)
    assert math.isfinite(perplexity(1e9)) and perplexity(1e9) > 1e300  # clamped below float64 overflow
    assert math.isnan(perplexity(float("nan")))
