"""The bad-input drill, run straight from `tests/fault_table.DRILL`: every row calls the real console
script's `main` (from the installed entry points) on real bad inputs, and must end with its exit code,
an error matching its pattern, no traceback, and no process group left behind. Rows that start one
(`megalm-train` past the config checks) run as subprocesses."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from importlib.metadata import entry_points

import pytest

from tests.fault_table import DRILL, DrillCase
from tests.harness import run_command
from tests.train_fixtures import TINY_RUN, write_synthetic_shard


def _jsonl(tmp: str, run_dir: str) -> None:
    with open(os.path.join(tmp, "a.jsonl"), "w") as f:
        f.write(json.dumps({"text": "hello world"}) + "\n")


def _bad_tokenizer(tmp: str, run_dir: str) -> None:
    with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
        f.write("{bad")


def _random_jsonl(tmp: str, run_dir: str) -> None:
    # Seeded, so every run feeds the same bytes: ten lines that are not UTF-8 (each starts with 0xff).
    rng = random.Random(0)
    with open(os.path.join(tmp, "random.jsonl"), "wb") as f:
        for _ in range(10):
            f.write(b"\xff" + rng.randbytes(300).replace(b"\n", b"\xff") + b"\n")


def _bad_magic_shard(tmp: str, run_dir: str) -> None:
    prefix = write_synthetic_shard(os.path.join(tmp, "bad"), documents=20)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"XXXXXXXXX")


def _config(tmp: str, run_dir: str) -> None:
    # The tiny run config with a shard that exists (rows override what they break).
    shard = write_synthetic_shard(os.path.join(tmp, "good"), documents=50)
    text = open(TINY_RUN).read().replace("data/tiny/tokens", shard).replace("runs/tiny", os.path.join(tmp, "r"))
    with open(os.path.join(tmp, "run.yaml"), "w") as f:
        f.write(text)


def _bad_yaml(tmp: str, run_dir: str) -> None:
    with open(os.path.join(tmp, "run.yaml"), "w") as f:
        f.write("model: {name: tiny\n")


def _run_missing_file(tmp: str, run_dir: str) -> None:
    # A copy of the shared run whose newest step lost its model file (DeepSpeed's loader would assert).
    shutil.copytree(run_dir, os.path.join(tmp, "run"))
    os.remove(os.path.join(tmp, "run", "checkpoints", "step_00000004", "mp_rank_00_model_states.pt"))


def _hf_rope_scaling(tmp: str, run_dir: str) -> None:
    # A Llama config.json with an option megalm does not implement (weights are never reached).
    os.makedirs(os.path.join(tmp, "hf"))
    with open(os.path.join(tmp, "hf", "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                   "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 300, "rope_scaling": {"type": "linear", "factor": 2.0}}, f)


SETUPS = {
    "jsonl": _jsonl,
    "bad_tokenizer": _bad_tokenizer,
    "empty_dir": lambda tmp, run_dir: os.makedirs(os.path.join(tmp, "empty_dir")),
    "random_jsonl": _random_jsonl,
    "bad_magic_shard": _bad_magic_shard,
    "config": _config,
    "bad_yaml": _bad_yaml,
    "run_missing_file": _run_missing_file,
    "hf_rope_scaling": _hf_rope_scaling,
}
# Rows that get past megalm-train's config checks start a process group: keep it out of pytest's process.
IN_SUBPROCESS = {"train: --resume of a step that does not exist", "train: a shard with a foreign magic",
                 "train: --resume auto with a deleted checkpoint file"}


def _console_main(name: str):
    found = [ep for ep in entry_points(group="console_scripts") if ep.name == name]
    assert found, f"console script {name} is not installed: run `pip install -e .` (scripts/bootstrap.sh does)"
    return found[0].value


def _run_in_process(target: str, argv: list[str], capfd) -> tuple[int, str]:
    module, func = target.split(":")
    main = getattr(__import__(module, fromlist=[func]), func)
    # megalm-train exports RANK/WORLD_SIZE/MASTER_PORT for the process group it is about to start; left
    # in pytest's environment they would be inherited by every later test's srun/mpirun ranks.
    saved = dict(os.environ)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse and some CLIs exit instead of returning
        code = e.code if isinstance(e.code, int) else 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out, err = capfd.readouterr()
    return int(code or 0), out + err


def _run_subprocess(target: str, argv: list[str]) -> tuple[int, str]:
    module, func = target.split(":")
    code = f"import sys, {module} as m; sys.exit(m.{func}(sys.argv[1:]))"
    res = run_command([sys.executable, "-c", code, *argv], timeout=180, env={"OMP_NUM_THREADS": "1"})
    return res.returncode, res.output


@pytest.mark.parametrize("row", DRILL, ids=[r.name for r in DRILL])
def test_bad_input(row: DrillCase, tiny_run_dir, tmp_path, capfd):
    tmp = str(tmp_path)
    for name in filter(None, row.setup.split(",")):
        SETUPS[name](tmp, tiny_run_dir)
    argv = [a.format(tmp=tmp, run=tiny_run_dir) for a in row.argv]
    before = sorted(os.listdir(tiny_run_dir))
    target = _console_main(row.cli)
    if row.name in IN_SUBPROCESS:
        code, output = _run_subprocess(target, argv)
    else:
        code, output = _run_in_process(target, argv, capfd)
        import torch.distributed as dist
        assert not dist.is_initialized(), f"{row.name}: left a process group in this process"
    assert "Traceback" not in output, output
    assert code == row.exit_code, f"{row.name}: exit {code}, expected {row.exit_code}:\n{output[-3000:]}"
    assert re.search(row.error, output), f"{row.name}: error does not match {row.error!r}:\n{output[-3000:]}"
    assert sorted(os.listdir(tiny_run_dir)) == before, f"{row.name}: changed the run directory"
    shutil.rmtree(os.path.join(tmp, "out"), ignore_errors=True)
