"""Token ids past model.vocab_size are refused before training starts (issue 14, case 1): at tp>1 the
vocab-parallel embedding would embed them as another rank's rows, i.e. silently as zeros."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from data_prep.mmidx import Shard, ShardWriter
from megalm.parallel.layers import TokenIdError, VocabParallelEmbedding
from tests.harness import free_port, run_command
from tests.train_fixtures import TINY_RUN


@pytest.fixture(scope="module")
def wide_shard(tmp_path_factory):
    """Ids up to 999, as a 1000-token tokenizer makes them; the tiny model has 512 entries."""
    prefix = str(tmp_path_factory.mktemp("wide") / "tokens")
    rng = np.random.default_rng(0)
    with ShardWriter(prefix, np.uint16) as w:
        for _ in range(300):
            w.add_document(rng.integers(1, 1000, size=int(rng.integers(20, 80))))
    return prefix


def test_max_token_id_is_computed_and_cached(wide_shard):
    shard = Shard(wide_shard)
    assert shard.max_token_id() == int(shard.tokens().max()) == 999
    cache = os.path.join(os.path.dirname(wide_shard), "index-cache", "tokens.max_token_id.json")
    assert os.path.isfile(cache) and Shard(wide_shard).max_token_id() == 999


@pytest.mark.parametrize("tp", [1, 2])
def test_training_refuses_ids_past_the_vocabulary_before_any_process_group(wide_shard, tmp_path, tp):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={tp}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "megalm.train", "--config", TINY_RUN,
           f"data.train_paths=[{wide_shard}]", f"train.run_dir={tmp_path / 'run'}", f"parallel.tp={tp}",
           "train.train_steps=2"]
    res = run_command(cmd, timeout=120, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode != 0, res.output[-3000:]
    assert "holds token id 999, outside model.vocab_size=512" in res.output, res.output[-3000:]
    assert "megalm-train: config error: data.train_paths[0]" in res.output  # one line, not a rank's traceback
    assert "IndexError" not in res.output and not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_embedding_guard_catches_ids_that_get_through():
    emb = VocabParallelEmbedding(512, 8, num_embeddings=500, init_key="embedding.weight", seed=0)
    emb(torch.tensor([[0, 499]]))
    with pytest.raises(TokenIdError, match=r"token id 500 .* outside the model's vocabulary \[0, 500\)"):
        emb(torch.tensor([[3, 500]]))
    with pytest.raises(TokenIdError):
        emb(torch.tensor([[-1]]))
