"""The installed console scripts work from any directory (not only from the repository root)."""
import os
import sys

import pytest

from tests.harness import run_command

SCRIPTS = ["megalm-prep", "megalm-train", "megalm-eval", "megalm-generate", "megalm-export", "megalm-reshard",
           "megalm-launch", "megalm-plan"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_runs_outside_the_repo(script, tmp_path):
    path = os.path.join(os.path.dirname(sys.executable), script)
    assert os.path.isfile(path), f"{script} is not installed: run scripts/bootstrap.sh (pip install -e .)"
    res = run_command([path, "--help"], timeout=120, cwd=str(tmp_path))
    assert res.returncode == 0 and "usage:" in res.output, res.output[-2000:]
