"""Interrupted runs: shards appear only when complete, and a re-run keeps them and finishes the rest."""
from __future__ import annotations

import glob
import io
import json
import os

import pytest

from data_prep.manifest import shard_problem
from data_prep.pipeline import TokenizeOptions, tokenize
from data_prep.sharding import KILL_HOOK_ENV
from tests.harness import run_command
from tests.prep_fixtures import REPO, expected_ids, file_bytes, make_texts, prep_cli, read_docs, train_tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture
def corpus(tmp_path):
    texts = make_texts(80, seed=5)
    return texts, [write_jsonl(str(tmp_path / "a.jsonl"), [{"text": t} for t in texts[:50]]),
                   write_jsonl(str(tmp_path / "b.jsonl.gz"), [{"text": t} for t in texts[50:]], compress="gz")]


def _run(inputs, tok, prefix, **kw):
    out, err = io.StringIO(), io.StringIO()
    manifest = tokenize(TokenizeOptions(inputs=inputs, tokenizer=tok, output_prefix=prefix, append_eod=True,
                                        shard_size=1500, progress=False, batch_documents=4, **kw), out=out, err=err)
    return manifest, out.getvalue() + err.getvalue()


def _prefixes(prefix, manifest):
    return [os.path.join(os.path.dirname(prefix), s["name"]) for s in manifest["shards"]]


def _stamp(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns


def test_sigkill_mid_run_then_resume(tmp_path, tok, corpus):
    texts, inputs = corpus
    reference, _ = _run(inputs, tok, str(tmp_path / "ref/c"))
    assert len(reference["shards"]) >= 4
    prefix = str(tmp_path / "out/c")
    args = prep_cli("tokenize", "--input", *inputs, "--tokenizer", tok, "--output-prefix", prefix, "--append-eod",
                    "--shard-size", "1500", "--workers", "2")
    killed = run_command(args, timeout=120, cwd=REPO, env={KILL_HOOK_ENV: "2"})
    assert killed.returncode == -9, killed.output
    manifest = json.load(open(prefix + ".manifest.json"))
    assert manifest["complete"] is False and [s["name"] for s in manifest["shards"]] == ["c_00000", "c_00001"]
    # the half-written third shard exists only under its temporary name
    assert os.path.exists(tmp_path / "out/c_00002.bin.tmp")
    assert sorted(glob.glob(str(tmp_path / "out/*.idx"))) == [prefix + "_00000.idx", prefix + "_00001.idx"]
    for entry in manifest["shards"]:
        assert shard_problem(os.path.join(tmp_path, "out", entry["name"]), entry, "uint16") is None
    stamps = [_stamp(prefix + "_00000.bin"), _stamp(prefix + "_00001.idx")]

    resumed = run_command(args, timeout=120, cwd=REPO).check()
    assert "resume: keeping 2 complete shard(s)" in resumed.output
    assert [_stamp(prefix + "_00000.bin"), _stamp(prefix + "_00001.idx")] == stamps  # not rewritten
    final = json.load(open(prefix + ".manifest.json"))
    assert final["complete"] is True and final["shards"] == reference["shards"]
    assert file_bytes(_prefixes(prefix, final)) == file_bytes(_prefixes(str(tmp_path / "ref/c"), reference))
    assert read_docs(_prefixes(prefix, final)) == expected_ids(tok, texts)
    assert not glob.glob(str(tmp_path / "out/*.tmp"))


def test_leftovers_and_a_corrupt_shard_are_redone(tmp_path, tok, corpus):
    _, inputs = corpus
    prefix = str(tmp_path / "out/c")
    reference, _ = _run(inputs, tok, prefix)
    want = file_bytes(_prefixes(prefix, reference))
    n = len(reference["shards"])
    # simulate a crash: shard 2's index torn, the last shard gone, temporary files lying around
    with open(prefix + "_00002.idx", "r+b") as f:
        f.truncate(20)
    os.unlink(prefix + f"_{n - 1:05d}.idx")
    open(prefix + f"_{n - 1:05d}.bin.tmp", "wb").write(b"\x00" * 7)
    open(prefix + "_00003.idx.tmp", "wb").write(b"MMIDIDX")
    m = json.load(open(prefix + ".manifest.json"))
    m["complete"] = False
    json.dump(m, open(prefix + ".manifest.json", "w"))
    kept = [_stamp(prefix + "_00000.bin"), _stamp(prefix + "_00001.bin")]

    final, log = _run(inputs, tok, prefix)
    assert "redoing from shard c_00002" in log and "truncated index header" in log
    assert "keeping 2 complete shard(s)" in log
    assert [_stamp(prefix + "_00000.bin"), _stamp(prefix + "_00001.bin")] == kept
    assert final["complete"] and final["shards"] == reference["shards"]
    assert file_bytes(_prefixes(prefix, final)) == want
    assert not glob.glob(str(tmp_path / "out/*.tmp"))


def test_complete_output_is_left_alone_and_changed_input_redone(tmp_path, tok, corpus):
    texts, inputs = corpus
    prefix = str(tmp_path / "out/c")
    first, _ = _run(inputs, tok, prefix)
    stamps = [_stamp(p + ".bin") for p in _prefixes(prefix, first)]
    again, log = _run(inputs, tok, prefix)
    assert "already complete" in log and again == first
    assert [_stamp(p + ".bin") for p in _prefixes(prefix, first)] == stamps
    # new input bytes -> new fingerprint -> nothing is reused
    write_jsonl(inputs[0], [{"text": t} for t in texts[:10]])
    changed, log = _run(inputs, tok, prefix)
    assert "keeping" not in log and changed["documents"] == 40
    assert read_docs(_prefixes(prefix, changed)) == expected_ids(tok, texts[:10] + texts[50:])
    listed = {p + ext for p in _prefixes(prefix, changed) for ext in (".bin", ".idx")}
    assert set(glob.glob(prefix + "_*")) == listed  # shards of the old output that are no longer listed are gone
