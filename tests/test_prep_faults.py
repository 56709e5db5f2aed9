"""Damaged inputs found by the fault drill: truncated or mislabelled .zst/.gz files and inputs that
yield no documents. Each is a one-line error naming the file (exit 2), in `tokenize` and in
`train-tokenizer` alike (they share data_prep.sources' readers), and a re-run after the input is fixed
works. The bad inputs are real files: made with zstandard/gzip in tmp_path, then cut or mislabelled.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
import os

import pytest
import zstandard

from data_prep.cli import main
from tests.prep_fixtures import expected_ids, file_bytes, make_texts, read_docs, train_tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


TEXTS = make_texts(200, seed=11)


def _jsonl_bytes(texts: list[str]) -> bytes:
    return b"".join(json.dumps({"text": t}, ensure_ascii=False).encode() + b"\n" for t in texts)


def _zst_streamed(data: bytes) -> bytes:
    """How `zstd` on a pipe (and most corpus tools) write: frames without a content size."""
    buf = io.BytesIO()
    with zstandard.ZstdCompressor(write_checksum=True).stream_writer(buf, closefd=False) as w:
        w.write(data)
    return buf.getvalue()


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def _run(command: str, inputs: list[str], tmp_path, tok: str, *extra: str) -> list[str]:
    if command == "tokenize":
        return ["tokenize", "--input", *inputs, "--tokenizer", tok, "--output-prefix", str(tmp_path / "out/c"),
                "--append-eod", *extra]
    return ["train-tokenizer", "--input", *inputs, "--vocab-size", "300", "--output", str(tmp_path / "out/tok.json"),
            *extra]


def _error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"megalm-prep {command}: error: "), err
    return last


def _no_output(tmp_path, command: str) -> None:
    if command == "train-tokenizer":
        assert not os.path.exists(tmp_path / "out/tok.json")
    else:
        assert not glob.glob(str(tmp_path / "out/*.idx")) and not glob.glob(str(tmp_path / "out/*.tmp"))
        manifest = json.load(open(tmp_path / "out/c.manifest.json"))
        assert manifest["complete"] is False  # training refuses it (DESIGN 26)


COMMANDS = ["tokenize", "train-tokenizer"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("writer", ["one_shot", "streamed"])
def test_truncated_zst_is_an_error_naming_the_file(tmp_path, tok, capsys, command, writer):
    data = _jsonl_bytes(TEXTS)
    whole = zstandard.ZstdCompressor().compress(data) if writer == "one_shot" else _zst_streamed(data)
    cut = whole[: len(whole) // 2]
    path = _write(tmp_path / "x.jsonl.zst", cut)
    rc = main(_run(command, [path], tmp_path, tok))
    line = _error_line(capsys, command)
    assert rc == 2, line
    assert f"input {path!r} is truncated (zstd stream ends early after {len(cut)} bytes): re-copy or re-compress it" in line
    _no_output(tmp_path, command)


def test_zst_of_several_frames_reads_every_frame(tmp_path, tok, capsys):
    # pzstd and `cat a.zst b.zst` make multi-frame files: all frames are one input, none is dropped
    parts = [_jsonl_bytes(TEXTS[:70]), _jsonl_bytes(TEXTS[70:])]
    path = _write(tmp_path / "x.jsonl.zst", zstandard.ZstdCompressor().compress(parts[0]) + _zst_streamed(parts[1]))
    assert main(_run("tokenize", [path], tmp_path, tok)) == 0, capsys.readouterr().err
    assert read_docs([str(tmp_path / "out/c")]) == expected_ids(tok, TEXTS)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", ["truncated_gz", "not_gzip", "not_zstd", "corrupt_gz"])
def test_damaged_or_mislabelled_compressed_input(tmp_path, tok, capsys, command, case):
    good = write_jsonl(str(tmp_path / "good.jsonl"), [{"text": t} for t in TEXTS[:5]])
    data = _jsonl_bytes(TEXTS)
    if case == "truncated_gz":
        whole = gzip.compress(data)
        path = _write(tmp_path / "x.jsonl.gz", whole[: len(whole) * 2 // 3])
        want = f"input {path!r} is truncated (gzip stream ends early after {len(whole) * 2 // 3} bytes): re-copy or re-compress it"
    elif case == "not_gzip":
        path = _write(tmp_path / "x.jsonl.gz", data)  # plain JSONL under a .gz name
        want = (f"input {path!r} is not gzip data although its name ends in .gz (it starts with "
                f"{data[:8]!r}): rename it to match its contents, or re-compress it")
    elif case == "not_zstd":
        path = _write(tmp_path / "x.jsonl.zst", gzip.compress(data))
        want = f"input {path!r} is not zstd data although its name ends in .zst"
    else:
        whole = bytearray(gzip.compress(data))
        whole[len(whole) // 2] ^= 0xFF
        path = _write(tmp_path / "x.jsonl.gz", bytes(whole))
        want = f"input {path!r} is corrupt (gzip: "
    rc = main(_run(command, [good, path], tmp_path, tok))
    line = _error_line(capsys, command)
    assert rc == 2 and want in line, line
    _no_output(tmp_path, command)


def test_rerun_after_fixing_a_truncated_input(tmp_path, tok, capsys):
    """A run stopped by a damaged input keeps the shards it finished in a `complete: false` manifest
    that records the error; fixing the input changes its hash, so the re-run starts over and its
    output is the same as a run that never saw the damaged file."""
    whole = gzip.compress(_jsonl_bytes(TEXTS))
    first = write_jsonl(str(tmp_path / "a.jsonl"), [{"text": t} for t in TEXTS * 2])  # > one 256-document batch
    bad = _write(tmp_path / "b.jsonl.gz", whole[: len(whole) // 2])
    argv = ["tokenize", "--input", first, bad, "--tokenizer", tok, "--output-prefix", str(tmp_path / "out/c"),
            "--append-eod", "--shard-size", "3000"]
    assert main(argv) == 2
    line = _error_line(capsys, "tokenize")
    manifest = json.load(open(tmp_path / "out/c.manifest.json"))
    assert manifest["complete"] is False and manifest["error"] == line.split(": error: ", 1)[1]
    assert len(manifest["shards"]) >= 1  # the shards finished before the damaged file stay listed
    assert not glob.glob(str(tmp_path / "out/*.tmp"))

    _write(bad, whole)
    assert main(argv) == 0, capsys.readouterr().err
    fixed = json.load(open(tmp_path / "out/c.manifest.json"))
    assert fixed["complete"] is True and "error" not in fixed and fixed["documents"] == 600
    ref_argv = argv[:]
    ref_argv[ref_argv.index(str(tmp_path / "out/c"))] = str(tmp_path / "ref/c")
    assert main(ref_argv) == 0
    ref = json.load(open(tmp_path / "ref/c.manifest.json"))
    names = [s["name"] for s in fixed["shards"]]
    assert names == [s["name"] for s in ref["shards"]]
    assert file_bytes([str(tmp_path / "out" / n) for n in names]) == file_bytes([str(tmp_path / "ref" / n) for n in names])
    assert read_docs([str(tmp_path / "out" / n) for n in names]) == expected_ids(tok, TEXTS * 3)


@pytest.mark.parametrize("command", COMMANDS)
def test_no_documents_is_an_error_unless_allowed(tmp_path, tok, capsys, command):
    path = write_jsonl(str(tmp_path / "x.jsonl"), [{"body": t, "id": i} for i, t in enumerate(TEXTS[:120])])
    rc = main(_run(command, [path], tmp_path, tok))
    line = _error_line(capsys, command)
    assert rc == 2, line
    assert (f"no documents in {path!r}: 120 records, all skipped (missing_field: 120 — --json-keys text not found; "
            f"the records have keys ['body', 'id'])") in line
    assert "--allow-empty" in line
    _no_output(tmp_path, command)

    assert main(_run(command, [path], tmp_path, tok, "--allow-empty")) == 0, capsys.readouterr().err
    if command == "tokenize":
        manifest = json.load(open(tmp_path / "out/c.manifest.json"))
        assert manifest["complete"] is True and manifest["documents"] == 0 and manifest["skipped"] == {"missing_field": 120}
    else:
        assert os.path.exists(tmp_path / "out/tok.json")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("empty", ["empty.jsonl", "empty.jsonl.gz", "empty.jsonl.zst", "blank_tree"])
def test_empty_inputs_are_an_error(tmp_path, tok, capsys, command, empty):
    if empty == "blank_tree":
        (tmp_path / "tree").mkdir()
        (tmp_path / "tree/a.txt").write_text("  \n")
        (tmp_path / "tree/b.txt").write_text("")
        path = str(tmp_path / "tree")
        want = f"no documents in {str(tmp_path / 'tree/a.txt')!r}, {str(tmp_path / 'tree/b.txt')!r}: 2 records, all skipped (empty: 2)"
    else:
        payload = {"empty.jsonl": b"", "empty.jsonl.gz": gzip.compress(b""),
                   "empty.jsonl.zst": zstandard.ZstdCompressor().compress(b"\n")}[empty]
        path = _write(tmp_path / empty, payload)
        want = f"no documents in {path!r}: it holds no records"
    rc = main(_run(command, [path], tmp_path, tok))
    line = _error_line(capsys, command)
    assert rc == 2 and want in line and "--allow-empty" in line, line
    _no_output(tmp_path, command)
