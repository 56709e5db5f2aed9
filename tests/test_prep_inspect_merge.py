"""`megalm-prep inspect` (counts, lengths, decoded sample) and `megalm-prep merge` (atomic concatenation)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_prep.cli import main
from data_prep.mmidx import ShardWriter
from tests.prep_fixtures import expected_ids, make_texts, parse_idx, read_docs, train_tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("im")
    tok = train_tiny_tokenizer(str(d / "tokenizer.json"))
    texts = make_texts(30, seed=2)
    src = write_jsonl(str(d / "a.jsonl"), [{"text": t} for t in texts])
    assert main(["tokenize", "--input", src, "--tokenizer", tok, "--output-prefix", str(d / "one/c"), "--append-eod"]) == 0
    assert main(["tokenize", "--input", src, "--tokenizer", tok, "--output-prefix", str(d / "many/c"),
                 "--append-eod", "--num-shards", "3"]) == 0
    return d, tok, texts


def test_inspect_prints_counts_lengths_and_a_decoded_sample(built, capsys):
    d, tok, texts = built
    capsys.readouterr()
    assert main(["inspect", str(d / "many/c"), "--sample", "4", "--max-chars", "10000"]) == 0
    out = capsys.readouterr().out
    lengths = [len(x) for x in expected_ids(tok, texts)]
    assert f"{d}/many/c: 3 shard(s), dtype uint16, 30 documents, {sum(lengths)} tokens" in out
    assert f"min {min(lengths)}, mean {np.mean(lengths):.1f}" in out and f"max {max(lengths)}" in out
    assert f"{d}/many/c_00001: 10 documents" in out and "manifest: complete, 1 input file(s), skipped: none" in out
    # the tokenizer recorded in the manifest decodes document 4 back to its text (+ the end-of-document token)
    assert f"--- document 4 ({lengths[4]} tokens) ---\n{texts[4]}<|endoftext|>\n---" in out
    assert main(["inspect", str(d / "one/c"), "--json", "--tokenizer", tok, "--max-chars", "20"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents"] == 30 and stats["tokens"] == sum(lengths) and stats["dtype"] == "uint16"
    assert stats["sample"] == {"document": 0, "tokens": lengths[0], "text": texts[0][:20], "truncated": True}
    assert stats["length"]["max"] == max(lengths)


def test_inspect_without_manifest_and_errors(built, tmp_path, capsys):
    prefix = str(tmp_path / "raw")
    with ShardWriter(prefix, np.uint16) as w:
        w.add_document([1, 2, 3])
    assert main(["inspect", prefix]) == 0
    out = capsys.readouterr().out
    assert "1 shard(s), dtype uint16, 1 documents, 3 tokens" in out and "pass --tokenizer to decode" in out
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "no shards found for prefix" in capsys.readouterr().err
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(4)
    assert main(["inspect", prefix]) == 2
    assert "raw.bin: 4 bytes but" in capsys.readouterr().err


def test_merge_concatenates_in_order_atomically(built, tmp_path, capsys):
    d, tok, texts = built
    out = str(tmp_path / "merged/all")
    assert main(["merge", "--inputs", str(d / "one/c"), str(d / "many/c"), "--output-prefix", out]) == 0
    assert "merged 4 shard(s) from 2 input(s): 60 documents" in capsys.readouterr().out
    assert read_docs([out]) == expected_ids(tok, texts) * 2
    parsed = parse_idx(out + ".idx")
    assert parsed["doc_idx"] == list(range(61)) and parsed["code"] == 8
    manifest = json.load(open(out + ".manifest.json"))
    assert manifest["documents"] == 60 and manifest["shards"][0]["name"] == "all"
    assert manifest["tokenizer"]["sha256"] == json.load(open(str(d / "one/c.manifest.json")))["tokenizer"]["sha256"]
    assert [m["prefix"] for m in manifest["merged_from"]] == [str(d / "one/c")] + [str(d / f"many/c_{i:05d}") for i in range(3)]
    assert sorted(os.listdir(tmp_path / "merged")) == ["all.bin", "all.idx", "all.manifest.json"]
    # the result is readable by inspect
    assert main(["inspect", out]) == 0


def test_merge_refuses_mixed_dtypes_and_self(built, tmp_path, capsys):
    d, _, _ = built
    big = str(tmp_path / "big")
    with ShardWriter(big, np.int32) as w:
        w.add_document([70000, 1])
    out = str(tmp_path / "m")
    assert main(["merge", "--inputs", str(d / "one/c"), big, "--output-prefix", out]) == 2
    err = capsys.readouterr().err
    assert f"{big} holds int32 tokens but {d}/one/c holds uint16" in err
    assert not os.path.exists(out + ".bin") and not os.path.exists(out + ".bin.tmp")
    assert main(["merge", "--inputs", str(d / "one/c"), "--output-prefix", str(d / "one/c")]) == 2
    assert "is also an input" in capsys.readouterr().err
