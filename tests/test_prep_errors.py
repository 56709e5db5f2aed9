"""Bad records are skipped and counted (or stop --strict runs); bad arguments fail before any work."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.cli import main
from tests.harness import run_command
from tests.prep_fixtures import REPO, expected_ids, prep_cli, read_docs, train_tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture
def bad_inputs(tmp_path):
    jsonl = write_jsonl(str(tmp_path / "bad.jsonl"), [
        {"text": "good one"},                 # 1
        '{"text": "unterminated"',            # 2 malformed_json
        {"title": "no text field"},           # 3 missing_field
        b'{"text": "caf\xe9"}',               # 4 non_utf8
        {"text": ""},                         # 5 empty
        {"text": 5},                          # 6 missing_field (not a string)
        "[1, 2]",                             # 7 missing_field (not an object)
        {"text": "good two"},                 # 8
        "   ",                                # 9 blank: not a record
    ])
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_bytes(b"line one\nline two\nbad \xff byte\n")  # non_utf8 on line 3
    (tree / "b.txt").write_bytes(b" \n\t\n")                            # empty
    (tree / "c.txt").write_text("good three")
    pq.write_table(pa.table({"text": ["good four", None, "  "]}), str(tmp_path / "p.parquet"))
    return [jsonl, str(tree), str(tmp_path / "p.parquet")]


def test_bad_records_are_skipped_counted_and_named(tmp_path, tok, bad_inputs, capsys):
    prefix = str(tmp_path / "out/c")
    rc = main(["tokenize", "--input", *bad_inputs, "--tokenizer", tok, "--output-prefix", prefix, "--append-eod"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    manifest = json.load(open(prefix + ".manifest.json"))
    assert manifest["skipped"] == {"malformed_json": 1, "missing_field": 4, "non_utf8": 2, "empty": 3}
    assert manifest["documents"] == 4 and manifest["records"] == 14
    assert read_docs([prefix]) == expected_ids(tok, ["good one", "good two", "good three", "good four"])
    jsonl = bad_inputs[0]
    err = cap.err.splitlines()
    assert err[:5] == [
        f"skipped {jsonl}:2: malformed_json: invalid JSON: Expecting ',' delimiter: line 1 column 24 (char 23)",
        f"skipped {jsonl}:3: missing_field: no field 'text'",
        f"skipped {jsonl}:4: non_utf8: byte 0xe9 at column 14 is not UTF-8",
        f"skipped {jsonl}:5: empty: field 'text' is empty",
        f"skipped {jsonl}:6: missing_field: field 'text' is int, not a string",
    ]
    assert err[5] == "(further skipped records are counted, not listed)" and len(err) == 6
    assert "10 skipped (malformed_json=1, missing_field=4, non_utf8=2, empty=3)" in cap.out


@pytest.mark.parametrize("inputs,where", [
    (lambda b: b[:1], "bad.jsonl:2: malformed json: invalid JSON"),
    (lambda b: b[1:2], "a.txt:3: non utf8: byte 0xff at offset 22 is not UTF-8"),
    (lambda b: b[2:], "p.parquet:row 2: missing field: column 'text' is null"),
])
def test_strict_stops_at_the_first_bad_record(tmp_path, tok, bad_inputs, capsys, inputs, where):
    prefix = str(tmp_path / "out/c")
    rc = main(["tokenize", "--input", *inputs(bad_inputs), "--tokenizer", tok, "--output-prefix", prefix, "--strict"])
    err = capsys.readouterr().err
    assert rc == 2 and where in err and "(--strict)" in err and err.startswith("megalm-prep tokenize: error: ")
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    assert not [f for f in os.listdir(tmp_path / "out") if f.endswith(".tmp")]


def test_fail_fast_messages(tmp_path, tok, capsys):
    src = write_jsonl(str(tmp_path / "a.jsonl"), [{"text": "hello"}])
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not a tokenizer")
    no_eod = tmp_path / "noeod.json"
    spec = json.load(open(tok))
    spec["added_tokens"] = []
    del spec["model"]["vocab"]["<|endoftext|>"]
    no_eod.write_text(json.dumps(spec))
    (tmp_path / "afile").write_text("x")
    base = ["tokenize", "--tokenizer", tok, "--output-prefix", str(tmp_path / "out/c")]
    cases = [
        (["tokenize", "--input", src, str(tmp_path / "missing.jsonl"), "--tokenizer", tok, "--output-prefix", str(tmp_path / "o/c")],
         f"input '{tmp_path}/missing.jsonl' does not exist"),
        (base + ["--input", str(tmp_path / "*.parquet")], f"input glob '{tmp_path}/*.parquet' matches no files"),
        (base + ["--input", str(tmp_path), "--glob", "*.rs"], f"input directory '{tmp_path}': no files match --glob '*.rs'"),
        (["tokenize", "--input", src, "--tokenizer", str(garbage), "--output-prefix", str(tmp_path / "o/c")],
         f"tokenizer file '{garbage}' does not load as a Hugging Face tokenizer.json"),
        (["tokenize", "--input", src, "--tokenizer", str(tmp_path / "nope.json"), "--output-prefix", str(tmp_path / "o/c")],
         f"tokenizer file '{tmp_path}/nope.json' does not exist"),
        (["tokenize", "--input", src, "--tokenizer", str(no_eod), "--output-prefix", str(tmp_path / "o/c"), "--append-eod"],
         "has no end-of-document token '<|endoftext|>' for --append-eod"),
        (["tokenize", "--input", src, "--tokenizer", tok, "--output-prefix", str(tmp_path / "afile/sub/c")],
         f"output directory '{tmp_path}/afile/sub' is not writable: Not a directory"),
        (base + ["--input", src, "--json-keys", "text", "title"], "--json-keys text title: give one key"),
        (base + ["--input", src, "--workers", "0"], "--workers 0: must be >= 1"),
    ]
    for argv, message in cases:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert message in err, (message, err)
        assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "out"), argv  # no work was done
    with pytest.raises(SystemExit) as exc:
        main(base + ["--input", src, "--shard-size", "5", "--num-shards", "2"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_cli_subprocess_exit_codes_and_train_tokenizer(tmp_path):
    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    for i in range(30):
        (tree / "pkg" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + len('naïve')\n" * (i + 1))
    (tree / "ignored.md").write_text("# not python")
    out = str(tmp_path / "tok.json")
    r = run_command(prep_cli("train-tokenizer", "--input", str(tree), "--glob", "*.py", "--vocab-size", "300",
                             "--special-tokens", "<pad>", "--output", out), timeout=120, cwd=REPO).check()
    assert "trained on 30 documents" in r.output and "vocab 300" in r.output
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(out)
    assert t.get_vocab_size() == 300 and t.token_to_id("<pad>") == 0 and t.token_to_id("<|endoftext|>") == 1
    sample = "def g(y):\n    return 'ünïcode ✓'\n"
    assert t.decode(t.encode(sample).ids) == sample
    r = run_command(prep_cli("tokenize", "--input", str(tmp_path / "missing"), "--tokenizer", out,
                             "--output-prefix", str(tmp_path / "o/c")), timeout=120, cwd=REPO)
    assert r.returncode == 2 and "megalm-prep tokenize: error: input" in r.output and "Traceback" not in r.output
    r = run_command(prep_cli("tokenize", "--input", str(tree), "--glob", "*.py", "--tokenizer", out, "--append-eod",
                             "--output-prefix", str(tmp_path / "o/c"), "--workers", "2", "--num-shards", "2"),
                    timeout=120, cwd=REPO).check()
    assert "30 documents" in r.output and "2 shard(s)" in r.output
    r = run_command(prep_cli("tokenize", "--help"), timeout=60, cwd=REPO).check()
    assert "PREFIX_00000.bin/.idx" in r.output and "--shard-size" in r.output
