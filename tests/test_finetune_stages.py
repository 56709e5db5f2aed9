"""The three stages a user runs, through the real CLIs: pre-train on Python source, fine-tune from those
weights on prompt/response data (prompt tokens masked), score with `megalm-eval --tasks`.

The task is the shipped `megalm_larger` ("Which is larger, 59 or 66? Answer:" -> " 66"; chance 50%):
the pre-trained model is no better than chance on its held-out split, and fine-tuning from it (train.init_from,
fresh optimizer) on the task's train split reaches >= 90%, at (1,1,1,0) and at tp=2 x pp=2. The
held-out rows are pairs the fine-tuning data never shows."""
from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig

import pytest

from megalm.eval.task_files import SHIPPED_TASKS_DIR
from tests.harness import free_port, run_command
from tests.train_fixtures import TINY_RUN

ENV = {"OMP_NUM_THREADS": "1"}
SEQ_LEN = 32
FINETUNE = ["train.train_steps=400", "train.lr=3e-3", "train.min_lr=1e-3", "train.warmup_steps=10",
            "train.micro_batch_size=16", "train.global_batch_size=32", "train.save_interval=0"]


def _stdlib_corpus(path: str, limit_bytes: int = 400_000) -> str:
    """The pre-training corpus: this interpreter's standard library (the demo corpus), first files."""
    size = 0
    with open(path, "w") as f:
        for src in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
            text = open(src, encoding="utf-8", errors="replace").read()
            f.write(json.dumps({"text": text}) + "\n")
            size += len(text)
            if size > limit_bytes:
                break
    return path


def _prep(*args: str) -> None:
    run_command([sys.executable, "-m", "data_prep.cli", *args], timeout=300, env=ENV, check=True)


def _train(run_dir: str, *overrides: str, nproc: int = 1) -> str:
    base = ["--config", TINY_RUN, f"train.run_dir={run_dir}", *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "megalm.train", *base]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "megalm.train", *base]
    return run_command(cmd, timeout=600, env=ENV, check=True).output


def _accuracy(run_dir: str, tmp: str) -> float:
    out = os.path.join(tmp, os.path.basename(run_dir) + "-tasks.json")
    run_command([sys.executable, "-m", "megalm.eval.evaluate", "--checkpoint", run_dir, "--tasks", "megalm_larger",
                 "--output", out, "--no-tensorboard"], timeout=600, env=ENV, check=True)
    step_files = sorted(glob.glob(os.path.join(run_dir, "eval", "tasks_step_*.json")))
    assert step_files, f"megalm-eval --tasks wrote nothing under {run_dir}/eval"
    results = json.load(open(step_files[-1]))
    return float(results["megalm_larger"]["acc"]) if "megalm_larger" in results else \
        float(results["tasks"]["megalm_larger"]["acc"])


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Stage 1 (tokenizer, shards, pre-training) and the fine-tuning shards."""
    tmp = str(tmp_path_factory.mktemp("stages"))
    corpus = _stdlib_corpus(os.path.join(tmp, "stdlib.jsonl"))
    tok = os.path.join(tmp, "tokenizer.json")
    _prep("train-tokenizer", "--input", corpus, "--vocab-size", "512", "--split-digits", "--output", tok)
    _prep("tokenize", "--input", corpus, "--tokenizer", tok, "--output-prefix", os.path.join(tmp, "pre", "stdlib"),
          "--append-eod")
    pretrained = os.path.join(tmp, "pretrained")
    _train(pretrained, f"data.train_paths=[{tmp}/pre/stdlib]", f"data.tokenizer={tok}", f"data.seq_len={SEQ_LEN}",
           "train.train_steps=40", "train.save_interval=0")
    _prep("tokenize", "--sft", "--seq-len", str(SEQ_LEN), "--input",
          os.path.join(SHIPPED_TASKS_DIR, "larger_train.jsonl"), "--tokenizer", tok,
          "--output-prefix", os.path.join(tmp, "sft", "larger"))
    return {"tmp": tmp, "tok": tok, "pretrained": pretrained, "sft": os.path.join(tmp, "sft", "larger")}


@pytest.fixture(scope="module")
def pretrained_accuracy(stages) -> float:
    return _accuracy(stages["pretrained"], stages["tmp"])


@pytest.mark.parametrize("tp,pp,zero", [(1, 1, 0), (2, 2, 1)], ids=["tp1-pp1-z0", "tp2-pp2-z1"])
def test_finetuning_from_pretrained_weights_learns_the_task(stages, pretrained_accuracy, tp, pp, zero):
    # Cannot do the task: no better than chance (50%). It may be worse: numbers with small digits are more
    # frequent in source code, so the pre-trained model tends to prefer the smaller one (measured 0.23).
    assert pretrained_accuracy <= 0.6, f"pre-trained model already does the task: acc {pretrained_accuracy}"
    run_dir = os.path.join(stages["tmp"], f"finetuned-tp{tp}-pp{pp}")
    out = _train(run_dir, f"data.train_paths=[{stages['sft']}]", f"data.tokenizer={stages['tok']}",
                 f"data.seq_len={SEQ_LEN}", f"train.init_from={stages['pretrained']}", f"parallel.tp={tp}",
                 f"parallel.pp={pp}", f"parallel.zero_stage={zero}", *FINETUNE, nproc=tp * pp)
    assert "Traceback" not in out
    meta = json.load(open(glob.glob(os.path.join(run_dir, "checkpoints", "step_*", "megalm.json"))[-1]))
    assert os.path.abspath(meta["init_from"]["path"]).startswith(os.path.abspath(stages["pretrained"]))
    acc = _accuracy(run_dir, stages["tmp"])
    print(f"megalm_larger acc: pre-trained {pretrained_accuracy:.2f}, fine-tuned at tp={tp} pp={pp}: {acc:.2f}")
    assert acc >= 0.9, f"fine-tuned at tp={tp} pp={pp}: acc {acc} < 0.9 (pre-trained: {pretrained_accuracy})"
