"""megalm-eval with no --data evaluates the run's own validation documents (data.split), i.e. exactly
the documents training never drew from."""
import json
import sys

import numpy as np

from megalm.data.builder import split_document_ranges
from megalm.data.indexed_dataset import IndexedDataset
from tests.harness import run_command
from tests.train_fixtures import TINY_RUN, write_synthetic_shard


def test_eval_defaults_to_the_runs_validation_documents(tmp_path):
    shard = write_synthetic_shard(str(tmp_path / "shard" / "tokens"), documents=120)
    run_dir = str(tmp_path / "run")
    run_command([sys.executable, "-m", "megalm.train", "--config", TINY_RUN, f"data.train_paths=[{shard}]",
                 f"train.run_dir={run_dir}", "train.train_steps=2", "data.split=80,20,0"], timeout=300,
                env={"OMP_NUM_THREADS": "1"}, check=True)
    out = str(tmp_path / "eval.json")
    run_command([sys.executable, "-m", "megalm.eval.evaluate", "--checkpoint", run_dir, "--output", out,
                 "--no-tensorboard"], timeout=300, check=True)
    (result,) = json.load(open(out))
    start, end = split_document_ranges(120, "80,20,0")[1]
    assert (start, end) == (96, 120)
    valid_tokens = int(np.sum(IndexedDataset(shard).sequence_lengths[start:end]))
    assert result["tokens"] == valid_tokens - 1  # every token of the valid documents but the first
    assert np.isfinite(result["loss"]) and result["loss"] < np.log(512) + 1
