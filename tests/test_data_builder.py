"""build_datasets: Megatron's document split, weighted blending of train shards, separate valid shards."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from megalm.config import ConfigError, DataConfig, expand_shard_path
from megalm.data import BlendedDataset, GPTDataset, build_datasets, split_document_ranges
from tests.test_data_indexed import write_shard


def test_split_ranges_follow_megatron_rounding():
    assert split_document_ranges(1000, "969,30,1") == [(0, 969), (969, 999), (999, 1000)]
    assert split_document_ranges(10, "8,1,1") == [(0, 8), (8, 9), (9, 10)]
    assert split_document_ranges(7, "1,1,1") == [(0, 3), (3, 5), (5, 7)]  # rounding drift shifts every end
    assert split_document_ranges(5, "100,0,0") == [(0, 5), (5, 5), (5, 5)]


def tagged_shard(path, tag: int, n_docs: int, dtype=np.uint16) -> str:
    """Document d of shard `tag` holds only the token tag*1000 + d: every token names its source."""
    return write_shard(path, [[tag * 1000 + d] * (4 + d % 5) for d in range(n_docs)], dtype)


def sources(ds) -> set:
    return set(np.concatenate([ds[i] for i in range(len(ds))]).tolist())


def test_split_of_one_shard(tmp_path):
    prefix = tagged_shard(tmp_path / "a", 1, 100)
    cfg = DataConfig(train_paths=[prefix], split="80,15,5", seq_len=8, seed=3, cache_dir=str(tmp_path / "c"))
    train, valid, test = build_datasets(cfg, 50, 12, 4)
    assert isinstance(train, GPTDataset) and (len(train), len(valid), len(test)) == (50, 12, 4)
    assert sources(train) <= {1000 + d for d in range(80)}
    assert sources(valid) <= {1000 + d for d in range(80, 95)}
    assert sources(test) <= {1000 + d for d in range(95, 100)}
    _, none_valid, none_test = build_datasets(cfg, 50, 0, 0)
    assert none_valid is None and none_test is None
    cfg.split = "100,0,0"
    assert build_datasets(cfg, 10, 5, 5)[1:] == (None, None)  # no documents for valid/test


def test_weighted_blend_of_two_shards(tmp_path):
    a, b = tagged_shard(tmp_path / "a", 1, 60), tagged_shard(tmp_path / "b", 2, 90, np.int32)
    cfg = DataConfig(train_paths=[a, b], train_weights=[3.0, 1.0], split="90,10,0", seq_len=4, seed=1,
                     cache_dir=str(tmp_path / "c"))
    train, valid, test = build_datasets(cfg, 400, 20, 10)
    assert isinstance(train, BlendedDataset) and len(train) == 400 and test is None
    taken = np.bincount(train.dataset_index, minlength=2)
    assert abs(taken[0] - 300) <= 1 and abs(taken[1] - 100) <= 1
    # Items from component 0 hold tokens of shard a only, and only its train documents.
    for i in range(0, 400, 7):
        toks = set(train[i].tolist())
        assert toks <= ({1000 + d for d in range(54)} if train.dataset_index[i] == 0
                        else {2000 + d for d in range(81)})
    assert sources(valid) <= {1000 + d for d in range(54, 60)} | {2000 + d for d in range(81, 90)}
    # Rebuilding with the same config reuses every cached index.
    again = build_datasets(cfg, 400, 20, 10)[0]
    assert not again.built_indices and not any(d.built_indices for d in again.datasets)


def test_separate_valid_paths(tmp_path):
    a = tagged_shard(tmp_path / "a", 1, 40)
    v1, v2 = tagged_shard(tmp_path / "v1", 5, 10), tagged_shard(tmp_path / "v2", 6, 30)
    cfg = DataConfig(train_paths=[a], valid_paths=[v1, v2], seq_len=4, seed=2)  # default cache beside shards
    train, valid, test = build_datasets(cfg, 30, 40, 10)
    assert test is None  # test_paths empty: no test set (the split applies only without separate lists)
    assert sources(train) <= {1000 + d for d in range(40)}  # all train documents, none held out
    assert isinstance(valid, BlendedDataset) and len(valid) == 40
    assert sources(valid) <= {5000 + d for d in range(10)} | {6000 + d for d in range(30)}
    assert (tmp_path / "index-cache").is_dir()


def test_bad_config_and_missing_shard(tmp_path):
    a = tagged_shard(tmp_path / "a", 1, 10)
    with pytest.raises(ConfigError, match="train_weights"):
        build_datasets(DataConfig(train_paths=[a], train_weights=[1.0, 2.0]), 5, 0, 0)
    with pytest.raises(Exception, match="missing.idx"):
        build_datasets(DataConfig(train_paths=[str(tmp_path / "missing")]), 5, 0, 0)


# --------------------------------------------------------- entries naming several shards (prep outputs, globs)

@pytest.fixture
def multi_shard_output(tmp_path):
    """A real `megalm-prep tokenize` output written as several shards, with its manifest."""
    from data_prep.pipeline import TokenizeOptions, tokenize
    from tests.prep_fixtures import make_texts, train_tiny_tokenizer, write_jsonl

    tok = train_tiny_tokenizer(str(tmp_path / "tokenizer.json"))
    src = write_jsonl(str(tmp_path / "a.jsonl"), [{"text": t} for t in make_texts(80, seed=5)])
    prefix = str(tmp_path / "out" / "corpus")
    manifest = tokenize(TokenizeOptions(inputs=[src], tokenizer=tok, output_prefix=prefix, append_eod=True,
                                        progress=False, shard_size=1500), out=io.StringIO(), err=io.StringIO())
    shards = [str(tmp_path / "out" / s["name"]) for s in manifest["shards"]]
    assert len(shards) >= 3 and not os.path.exists(prefix + ".idx")
    return prefix, shards, [s["tokens"] for s in manifest["shards"]]


def samples(ds) -> list[list[int]]:
    return [ds[i].tolist() for i in range(len(ds))]


def test_prep_output_prefix_names_all_its_shards(tmp_path, multi_shard_output):
    prefix, shards, tokens = multi_shard_output
    assert expand_shard_path(prefix) == shards
    assert expand_shard_path(str(tmp_path / "out" / "corpus_*")) == shards  # a glob, sorted
    other = tagged_shard(tmp_path / "other", 7, 50)

    def build(paths, weights):
        cfg = DataConfig(train_paths=paths, train_weights=weights, split="90,10,0", seq_len=16, seed=2,
                         cache_dir=str(tmp_path / "cache" / str(len(paths))))
        return build_datasets(cfg, 300, 30, 0)

    # the entry's weight is shared by its shards in proportion to their tokens
    explicit = build(shards + [other], [1.0 * t / sum(tokens) for t in tokens] + [0.5])
    for entry in (prefix, str(tmp_path / "out" / "corpus_000*")):
        expanded = build([entry, other], [1.0, 0.5])
        assert samples(expanded[0]) == samples(explicit[0]) and samples(expanded[1]) == samples(explicit[1])
    DataConfig(train_paths=[prefix]).check_files()


def test_unusable_shard_entries_name_the_entry_and_the_fix(tmp_path, multi_shard_output):
    prefix, shards, _ = multi_shard_output

    def error(paths) -> str:
        with pytest.raises(ConfigError) as e:
            DataConfig(train_paths=paths, seq_len=8).check_files()
        return str(e.value)

    assert error([str(tmp_path / "nope")]).startswith(f"data.train_paths[0]: no shard '{tmp_path}/nope'")
    assert "matches no shard" in error([prefix, str(tmp_path / "out" / "zzz_*")])
    os.remove(shards[1] + ".bin")
    assert "lists shard files that do not exist" in error([prefix])
    manifest = json.load(open(prefix + ".manifest.json"))
    manifest["complete"] = False
    with open(prefix + ".manifest.json", "w") as f:
        json.dump(manifest, f)
    msg = error([prefix])
    assert "prep run is not complete" in msg and "re-run the same `megalm-prep tokenize`" in msg
