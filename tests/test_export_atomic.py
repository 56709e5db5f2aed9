"""`megalm-export` writes OUT completely or not at all: into `OUT.tmp-<pid>`, renamed into place when
complete, removed on failure; an existing OUT is refused unless --overwrite, and never half-replaced.
A real checkpoint from a real (1-process) trainer run."""
from __future__ import annotations

import os
import sys

import pytest

from tests.harness import run_command


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir):
    return tiny_run_dir


def _export(*args: str):
    return run_command([sys.executable, "-m", "megalm.export.hf", *args], timeout=300, env={"OMP_NUM_THREADS": "1"})


def _bad_tokenizer(tmp_path) -> str:
    path = str(tmp_path / "tokenizer.json")
    with open(path, "w") as f:
        f.write("{not a tokenizer")
    return path


def test_failed_tokenizer_check_leaves_no_output(run_dir, tmp_path):
    out = str(tmp_path / "hf")
    res = _export("--checkpoint", run_dir, "--output", out, "--tokenizer", _bad_tokenizer(tmp_path))
    assert res.returncode == 2 and "megalm-export:" in res.output, res.output
    assert sorted(os.listdir(tmp_path)) == ["tokenizer.json"], "partial output or temporary directory left behind"


def test_existing_output_is_refused_unless_overwrite(run_dir, tmp_path):
    out = str(tmp_path / "hf")
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write("old")
    res = _export("--checkpoint", run_dir, "--output", out)
    assert res.returncode == 2 and f"--output {out} already exists: pass --overwrite" in res.output, res.output
    # --overwrite with a failing tokenizer: the old export stays whole, no sibling is left.
    res = _export("--checkpoint", run_dir, "--output", out, "--overwrite", "--tokenizer", _bad_tokenizer(tmp_path))
    assert res.returncode == 2, res.output
    assert os.listdir(out) == ["config.json"] and open(os.path.join(out, "config.json")).read() == "old"
    assert sorted(os.listdir(tmp_path)) == ["hf", "tokenizer.json"]
    # --overwrite that succeeds replaces it whole.
    _export("--checkpoint", run_dir, "--output", out, "--overwrite").check()
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(out))
    assert open(os.path.join(out, "config.json")).read() != "old"
    assert sorted(os.listdir(tmp_path)) == ["hf", "tokenizer.json"]
