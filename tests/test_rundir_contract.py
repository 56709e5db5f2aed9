"""Contract: the run directory's names are spelled only in megalm/rundir.py.

Scans the Python source of megalm/, launcher/, bench/ and the launcher's stub trainer (and the sbatch
template) for string literals that spell a run-directory name, and fails naming file:line for each
one outside megalm/rundir.py. What counts (chosen to be precise, not to flag prose):
  * file names of the run directory anywhere in a string: heartbeat.json, megalm.json, restarts.jsonl, ...;
  * step names as code builds or matches them: `step_` before `{`, `%`, `(`, `\\d`, `*` or at the end of
    a literal (f"step_{s:08d}", "step_%08d", r"^step_(\\d+)", startswith("step_"));
  * the `.tmp` / `.deleting` suffixes (a literal ending in `.tmp`, a regex `\\.tmp`);
  * a literal that is exactly a run-directory folder or pointer name ("latest", "checkpoints", "stacks",
    "rng", "tensorboard"), and "slurm" / "eval" given to os.path.join or assigned to an UPPER_CASE
    constant (elsewhere they are a launcher kind and a subcommand);
  * per-rank file names: an f-string piece ending in `rank` before a value (f"rank{r:05d}"), "rank%05d".
Docstrings and comments are documentation and are not scanned; help texts that show users a path
("RUN_DIR/checkpoints/step_N") are prose and not flagged.
"""
from __future__ import annotations

import ast
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWNER = os.path.join(REPO, "megalm", "rundir.py")
SCANNED_DIRS = ("megalm", "launcher", "bench")
SCANNED_FILES = (os.path.join("tests", "launcher_stub_trainer.py"),)

_ANYWHERE = re.compile(
    r"heartbeat\.json|megalm\.json|restarts\.jsonl|metrics\.jsonl|attempts\.jsonl|config\.yaml|jobs\.txt"
    r"|job\.sbatch(?!\.tmpl)|job-%j|hostfile-$"
    r"|\bstep_(?:[{%(*]|\\d|$)"
    r"|\.tmp$|\\\.tmp|\.deleting"
    r"|(?:^|/)rank%0?\d*d|(?:^|/)rank\{")
_EXACT = {"latest", "checkpoints", "stacks", "rng", "tensorboard"}
_JOIN_ONLY = {"slurm", "eval"}
_TEMPLATE = re.compile(r"heartbeat\.json|megalm\.json|restarts\.jsonl|attempts\.jsonl|jobs\.txt|/slurm/|job-%j"
                       r"|hostfile-|/checkpoints/|/stacks/")


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _is_path_join(node: ast.Call) -> bool:
    f = node.func
    return isinstance(f, ast.Attribute) and f.attr == "join" and (
        (isinstance(f.value, ast.Attribute) and f.value.attr == "path") or (isinstance(f.value, ast.Name) and f.value.id == "path"))


def scan_source(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, literal) of every run-directory name spelled in `source`."""
    tree = ast.parse(source, filename)
    docs = _docstring_nodes(tree)
    hits: list[tuple[int, str]] = []
    before_value: set[int] = set()  # f-string pieces directly followed by a {value}
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for a, b in zip(node.values, node.values[1:]):
                if isinstance(a, ast.Constant) and isinstance(b, ast.FormattedValue):
                    before_value.add(id(a))
        elif isinstance(node, ast.Call) and _is_path_join(node):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and arg.value in _JOIN_ONLY:
                    hits.append((arg.lineno, arg.value))
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value in _JOIN_ONLY \
                and any(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets):
            hits.append((node.lineno, node.value.value))  # a module constant naming the folder: EVAL_DIRNAME = "eval"
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docs:
            continue
        s = node.value
        if _ANYWHERE.search(s) or s in _EXACT or (id(node) in before_value and re.search(r"(?:^|/)rank$", s)):
            hits.append((node.lineno, s))
    return sorted(hits)


def _scanned_files() -> list[str]:
    files = [os.path.join(REPO, f) for f in SCANNED_FILES]
    for top in SCANNED_DIRS:
        for dirpath, dirnames, names in os.walk(os.path.join(REPO, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            files += [os.path.join(dirpath, n) for n in names if n.endswith((".py", ".tmpl"))]
    return sorted(f for f in files if os.path.abspath(f) != OWNER)


def test_scanner_flags_the_old_spellings():
    # The literals the two old definitions used; if the scanner missed them the contract would be empty.
    old = '''
import os, re
_ENTRY = re.compile(r"^step_(\\d+)(\\.tmp)?$")
def tag_for(step): return f"step_{step:08d}"
def old(step): return "step_%08d" % step
def rng(d, r): return os.path.join(d, "rng", f"rank{r:05d}.pt")
def stack(d, r): return os.path.join(d, f"stacks/rank{r:05d}.txt")
def latest(root): return os.path.join(root, "latest")
def jobs(run_dir): return os.path.join(run_dir, "slurm", "jobs.txt")
def ev(run_dir): return os.path.join(run_dir, "eval")
HB = "heartbeat.json"
def tmp(path): return path + ".tmp"
def done(names): return [n for n in names if n.startswith("step_") and not n.endswith(".tmp")]
def aside(p): return p + ".deleting"
EVAL_DIRNAME = "eval"
'''
    hits = [s for _, s in scan_source(old)]
    for literal in (r"^step_(\d+)(\.tmp)?$", "step_", "step_%08d", "rng", "rank", "stacks/rank", "latest", "slurm",
                    "jobs.txt", "eval", "heartbeat.json", ".tmp", ".deleting"):
        assert literal in hits, (literal, hits)
    assert hits.count("eval") == 2  # in os.path.join and as EVAL_DIRNAME
    # docstrings, prose and other meanings of the same words are not flagged
    fine = '''
"""Writes RUN_DIR/heartbeat.json and checkpoints/step_NNNNNNNN.tmp (a docstring)."""
import os
def f(kind, r, model):
    """megalm.json, latest"""
    model.eval()
    sub = {"slurm": 1, "rank": r, "eval/loss": 2}
    help = "RUN_DIR (or RUN_DIR/checkpoints/step_N); default: latest"
    return kind == "slurm", f"mp_rank_{r:02d}_model_states.pt", f"{r}.tmp-{os.getpid()}", "megalm_step", "step_time_s"
'''
    assert scan_source(fine) == []
    assert len(scan_source(open(OWNER).read())) >= 15  # the owner itself spells them all


def test_run_dir_names_are_spelled_only_in_megalm_rundir():
    problems = []
    for path in _scanned_files():
        rel = os.path.relpath(path, REPO)
        with open(path) as f:
            text = f.read()
        if path.endswith(".tmpl"):
            problems += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                         if _TEMPLATE.search(line)]
        else:
            problems += [f"{rel}:{line}: {literal!r}" for line, literal in scan_source(text, rel)]
    assert not problems, ("run-directory names spelled outside megalm/rundir.py; use its constants and path "
                          "helpers (rundir.heartbeat_file, rundir.tag_for, ...) instead:\n  " + "\n  ".join(problems))
