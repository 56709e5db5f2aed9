"""The installed console scripts work from any directory (not only from the repository root), and a
non-editable install (`pip install .`) carries everything a run reads at run time, e.g. the named model
configs (`model: tiny`), so it trains from outside the repository."""
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.harness import free_port, run_command
from tests.train_fixtures import REPO, write_synthetic_shard

SCRIPTS = ["megalm-prep", "megalm-train", "megalm-eval", "megalm-generate", "megalm-export", "megalm-reshard",
           "megalm-import", "megalm-launch", "megalm-plan"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_runs_outside_the_repo(script, tmp_path):
    path = os.path.join(os.path.dirname(sys.executable), script)
    assert os.path.isfile(path), f"{script} is not installed: run scripts/bootstrap.sh (pip install -e .)"
    res = run_command([path, "--help"], timeout=120, cwd=str(tmp_path))
    assert res.returncode == 0 and "usage:" in res.output, res.output[-2000:]


# What setup.py packages; copied so that the build's build/ and *.egg-info never land in the checkout.
SOURCES = ["setup.py", "MANIFEST.in", "megalm", "data_prep", "launcher"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> str:
    """A fresh venv with megalm installed from a wheel built from this tree (no downloads: the
    dependencies come from this interpreter's site-packages through a .pth path line). Not
    `--system-site-packages`: from a venv that would expose the base interpreter's packages, not the
    venv's. A .pth *path* line does not run the editable install's finder (.pth `import` lines run only
    in real site dirs), so `import megalm` can only find the copy installed here."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif os.path.isfile(path):
            src.mkdir(exist_ok=True)
            shutil.copy2(path, src / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with open(os.path.join(site, "megalm_test_deps.pth"), "w") as f:
        f.write("\n".join(sorted(deps)) + "\n")
    # pip finds this interpreter's editable megalm on the path and leaves it alone ("outside environment").
    run_command([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                 "--disable-pip-version-check", str(src)], timeout=180, check=True)
    return str(venv / "bin")


def test_non_editable_install_trains_a_named_model_outside_the_repo(installed, tmp_path):
    env = {"PYTHONPATH": "", "OMP_NUM_THREADS": "1"}  # an empty PYTHONPATH adds nothing to sys.path
    where = run_command([os.path.join(installed, "python"), "-c",
                         "import megalm.config.model as m; print(m.__file__); print(m.load_model_config('tiny'))"],
                        timeout=60, env=env, cwd=str(tmp_path), check=True).output
    module = where.splitlines()[0]
    assert module.startswith(os.path.dirname(installed)), where
    assert not os.path.realpath(module).startswith(os.path.realpath(REPO) + os.sep), where

    shard = write_synthetic_shard(str(tmp_path / "data" / "tokens"))
    (tmp_path / "run.yaml").write_text(
        "model: tiny\n"
        f"data: {{train_paths: [{shard}], seq_len: 32, split: '90,10,0'}}\n"
        "train: {micro_batch_size: 2, global_batch_size: 4, train_steps: 3, log_interval: 1, tensorboard: false,"
        " run_dir: run}\n")
    launch = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    res = run_command([os.path.join(installed, "megalm-train"), "--config", "run.yaml"], timeout=150,
                      env={**env, **launch}, cwd=str(tmp_path))
    assert res.returncode == 0, res.output[-4000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000003", res.output[-4000:]
    assert (checkpoints / "step_00000003" / "megalm.json").is_file()
