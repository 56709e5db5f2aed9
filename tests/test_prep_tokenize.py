"""`megalm-prep tokenize`: ids equal the tokenizer's, every input kind, sharding, determinism, manifest."""
from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest

from data_prep.pipeline import TokenizeOptions, tokenize
from data_prep.tokenizer import file_sha256
from tests.prep_fixtures import (expected_ids, file_bytes, make_texts, parse_idx, read_docs, train_tiny_tokenizer,
                                 write_jsonl)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def run(tmp_path, inputs, tok, prefix="out/corpus", **kw):
    out, err = io.StringIO(), io.StringIO()
    opts = TokenizeOptions(inputs=[str(i) for i in inputs], tokenizer=tok, output_prefix=str(tmp_path / prefix),
                           append_eod=kw.pop("append_eod", True), progress=False, **kw)
    manifest = tokenize(opts, out=out, err=err)
    return manifest, out.getvalue(), err.getvalue()


def shard_prefixes(tmp_path, manifest, prefix="out/corpus"):
    base = os.path.dirname(str(tmp_path / prefix))
    return [os.path.join(base, s["name"]) for s in manifest["shards"]]


def test_jsonl_ids_equal_tokenizer_encode_plus_eod(tmp_path, tok):
    texts = make_texts(60)
    src = write_jsonl(str(tmp_path / "a.jsonl"), [{"text": t, "id": i} for i, t in enumerate(texts)])
    manifest, out, _ = run(tmp_path, [src], tok)
    assert os.path.isfile(tmp_path / "out/corpus.bin") and os.path.isfile(tmp_path / "out/corpus.idx")
    want = expected_ids(tok, texts)
    assert read_docs([str(tmp_path / "out/corpus")]) == want
    # manifest: the schema the README documents
    on_disk = json.load(open(tmp_path / "out/corpus.manifest.json"))
    assert on_disk == manifest
    assert manifest["complete"] is True and manifest["format"] == "megalm-prep-manifest"
    assert manifest["documents"] == 60 and manifest["tokens"] == sum(map(len, want))
    assert manifest["dtype"] == "uint16" and manifest["dtype_code"] == 8
    assert manifest["inputs"] == [{"path": src, "bytes": os.path.getsize(src), "sha256": file_sha256(src)}]
    assert manifest["tokenizer"]["sha256"] == file_sha256(tok) and manifest["tokenizer"]["eod_token"] == "<|endoftext|>"
    assert manifest["skipped"] == {} and manifest["elapsed_seconds"] >= 0 and manifest["records"] == 60
    assert manifest["shards"] == [{"name": "corpus", "documents": 60, "tokens": manifest["tokens"],
                                   "bin_bytes": 2 * manifest["tokens"],
                                   "idx_sha256": file_sha256(str(tmp_path / "out/corpus.idx")), "records": [0, 60]}]
    assert "60 documents" in out and "docs/s" in out and "tokens/s" in out and "MB/s" in out
    # without --append-eod: exactly tokenizer.encode(text).ids
    manifest, _, _ = run(tmp_path, [src], tok, prefix="noeod/c", append_eod=False)
    assert read_docs([str(tmp_path / "noeod/c")]) == expected_ids(tok, texts, eod=False)


def test_every_input_kind_in_one_run(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = make_texts(40, seed=3)
    order = []
    # 1. a glob over compressed JSONL (sorted: a before b)
    os.makedirs(tmp_path / "j")
    write_jsonl(str(tmp_path / "j/b.jsonl.zst"), [{"text": t} for t in texts[5:10]], compress="zst")
    write_jsonl(str(tmp_path / "j/a.jsonl.gz"), [{"text": t} for t in texts[0:5]], compress="gz")
    order += texts[0:10]
    # 2. Parquet, text in a column named "text", 2 row groups
    pq.write_table(pa.table({"text": texts[10:20], "n": list(range(10))}), str(tmp_path / "p.parquet"), row_group_size=4)
    order += texts[10:20]
    # 3. a text tree: one document per file, --glob '*.py', pruned dirs never read
    tree = tmp_path / "tree"
    for rel, t in [("z.py", texts[20]), ("a.py", texts[21]), ("sub/m.py", texts[22]), ("sub/deeper/x.py", texts[23]),
                   ("notes.txt", "not matched by the glob"), ("__pycache__/c.py", "cache"),
                   ("site-packages/pkg.py", "third party"), (".git/h.py", "hidden")]:
        os.makedirs(os.path.dirname(tree / rel), exist_ok=True)
        (tree / rel).write_text(t)
    order += [texts[21], texts[23], texts[22], texts[20]]  # a.py, sub/deeper/x.py, sub/m.py, z.py
    # 4. a single compressed plain-text file
    import zstandard

    (tmp_path / "readme.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(texts[24].encode()))
    order += [texts[24]]
    manifest, _, _ = run(tmp_path, [tmp_path / "j/*.jsonl.*", tmp_path / "p.parquet", tree, tmp_path / "readme.txt.zst"],
                         tok, glob="*.py")
    assert read_docs(shard_prefixes(tmp_path, manifest)) == expected_ids(tok, order)
    assert [os.path.relpath(i["path"], tmp_path) for i in manifest["inputs"]] == [
        "j/a.jsonl.gz", "j/b.jsonl.zst", "p.parquet", "tree/a.py", "tree/sub/deeper/x.py", "tree/sub/m.py",
        "tree/z.py", "readme.txt.zst"]
    # a Parquet column chosen with --json-keys/--column
    pq.write_table(pa.table({"content": texts[:3]}), str(tmp_path / "c.parquet"))
    manifest, _, _ = run(tmp_path, [tmp_path / "c.parquet"], tok, prefix="col/c", json_key="content")
    assert read_docs([str(tmp_path / "col/c")]) == expected_ids(tok, texts[:3])


def _corpus(tmp_path, n=80):
    texts = make_texts(n, seed=11)
    a = write_jsonl(str(tmp_path / "a.jsonl"), [{"text": t} for t in texts[: n // 2]])
    b = write_jsonl(str(tmp_path / "b.jsonl.gz"), [{"text": t} for t in texts[n // 2:]], compress="gz")
    return texts, [a, b]


def test_same_bytes_for_any_number_of_workers(tmp_path, tok):
    texts, inputs = _corpus(tmp_path)
    results = []
    for workers in (1, 2, 3):
        manifest, _, _ = run(tmp_path, inputs, tok, prefix=f"w{workers}/c", workers=workers, shard_size=2000,
                             batch_documents=3)
        prefixes = shard_prefixes(tmp_path, manifest, f"w{workers}/c")
        assert len(prefixes) > 2
        results.append(file_bytes(prefixes))
        assert read_docs(prefixes) == expected_ids(tok, texts)
    assert results[0] == results[1] == results[2]


def test_shards_by_size(tmp_path, tok):
    texts, inputs = _corpus(tmp_path)
    manifest, _, _ = run(tmp_path, inputs, tok, shard_size=1500)
    names = [s["name"] for s in manifest["shards"]]
    assert names == [f"corpus_{i:05d}" for i in range(len(names))] and len(names) >= 3
    assert not os.path.exists(tmp_path / "out/corpus.bin")
    prefixes = shard_prefixes(tmp_path, manifest)
    assert read_docs(prefixes) == expected_ids(tok, texts)
    sizes = [s["tokens"] for s in manifest["shards"]]
    assert all(t >= 1500 for t in sizes[:-1]) and sum(sizes) == manifest["tokens"]
    # a shard closes at the first document that brings it to >= 1500 tokens
    for p in prefixes[:-1]:
        lengths = parse_idx(p + ".idx")["lengths"]
        assert sum(lengths[:-1]) < 1500 <= sum(lengths)
    # shards tile the records
    records = [s["records"] for s in manifest["shards"]]
    assert records[0][0] == 0 and records[-1][1] == 80 and all(a[1] == b[0] for a, b in zip(records, records[1:]))
    # everything fits in one shard: the bare prefix is used
    manifest, _, _ = run(tmp_path, inputs, tok, prefix="one/c", shard_size=10**9)
    assert [s["name"] for s in manifest["shards"]] == ["c"]
    assert sorted(os.listdir(tmp_path / "one")) == ["c.bin", "c.idx", "c.manifest.json"]


def test_shards_by_count(tmp_path, tok):
    texts, inputs = _corpus(tmp_path)
    manifest, _, _ = run(tmp_path, inputs, tok, num_shards=4)
    assert [s["documents"] for s in manifest["shards"]] == [20, 20, 20, 20]
    assert read_docs(shard_prefixes(tmp_path, manifest)) == expected_ids(tok, texts)
    # more shards than documents: the extra ones are empty but valid
    manifest, _, _ = run(tmp_path, [inputs[0]], tok, prefix="many/c", num_shards=45)
    assert len(manifest["shards"]) == 45 and sum(s["documents"] for s in manifest["shards"]) == 40
    assert manifest["shards"][0]["documents"] == 0 and parse_idx(str(tmp_path / "many/c_00000.idx"))["doc_idx"] == [0]
    assert read_docs(shard_prefixes(tmp_path, manifest, "many/c")) == expected_ids(tok, texts[:40])


def test_large_vocab_writes_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = 70_000
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(["<|endoftext|>"])
    path = str(tmp_path / "big.json")
    t.save(path)
    src = write_jsonl(str(tmp_path / "a.jsonl"), [{"text": "w69999 w1 w65535"}, {"text": "w0 nope"}])
    manifest, _, _ = run(tmp_path, [src], path)
    assert manifest["dtype"] == "int32" and parse_idx(str(tmp_path / "out/corpus.idx"))["code"] == 4
    assert read_docs([str(tmp_path / "out/corpus")]) == [[69999, 1, 65535, 70001], [0, 70000, 70001]]
    assert np.fromfile(str(tmp_path / "out/corpus.bin"), dtype="<i4").tolist()[:3] == [69999, 1, 65535]
