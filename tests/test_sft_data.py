"""Fine-tuning data: `megalm-prep tokenize --sft` writes padded token shards plus a loss mask that is 0 on
prompt tokens and 1 on response tokens (checked against tokenising the pieces here), counts bad records
by reason, stays deterministic and resumable, and training reads it as IGNORE_INDEX labels."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_prep import sft
from data_prep.cli import main as prep_main
from data_prep.mmidx import Shard, ShardFormatError, ShardWriter
from data_prep.sharding import KILL_HOOK_ENV
from data_prep.shards import ShardPathError, expand_shard_path
from megalm.config import ConfigError, DataConfig
from megalm.data import GPTDataset, build_datasets, micro_batches
from megalm.parallel.cross_entropy import IGNORE_INDEX
from tests.harness import run_command
from tests.prep_fixtures import REPO, file_bytes, prep_cli, read_docs, train_tiny_tokenizer, write_jsonl
from tests.sft_fixtures import SEQ_LEN, copy_records, expected_tokens_and_mask, prep_sft


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def _mask(prefix: str) -> str:
    return prefix + ".loss_mask"


def test_prompt_tokens_are_masked_and_response_tokens_trained(tmp_path, tok):
    records = copy_records(40, seed=1)
    long_response = {"prompt": "repeat: the model\n", "response": " ".join(["data moves through many workers"] * 6)}
    records.append(long_response)
    prefix = str(tmp_path / "out" / "sft")
    manifest, _ = prep_sft(records, tok, prefix)
    tokens, masks = read_docs([prefix]), read_docs([_mask(prefix)])  # the independent MMIDIDX parser
    expected = [expected_tokens_and_mask(tok, r) for r in records]
    assert tokens == [t for t, _ in expected]
    assert masks == [m for _, m in expected]
    # the pieces themselves: prompt positions 0, response + EOD 1, padding 0, every document SEQ_LEN long
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(tok)
    p, r = t.encode(records[0]["prompt"]).ids, t.encode(records[0]["response"]).ids
    assert masks[0] == [0] * len(p) + [1] * (len(r) + 1) + [0] * (SEQ_LEN - len(p) - len(r) - 1)
    assert tokens[0][:len(p) + len(r) + 1] == p + r + [t.token_to_id("<|endoftext|>")]
    assert {len(d) for d in tokens + masks} == {SEQ_LEN}
    # the long record is cut after SEQ_LEN tokens: trained to the end, no EOD room left
    assert masks[-1][-1] == 1 and manifest["sft"]["truncated"] == 1
    targets = manifest["shards"][0]["loss_mask"]["target_tokens"]
    assert manifest["sft"]["target_tokens"] == sum(map(sum, masks)) == targets


def test_messages_train_only_assistant_turns(tmp_path, tok):
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the model"},
                         {"role": "assistant", "content": "reads"}, {"role": "user", "content": "next"},
                         {"role": "assistant", "content": "one"}]}
    prefix = str(tmp_path / "chat")
    manifest, _ = prep_sft([chat], tok, prefix, seq_len=96)
    [ids], [mask] = read_docs([prefix]), read_docs([_mask(prefix)])
    assert (ids, mask) == expected_tokens_and_mask(tok, chat, seq_len=96)
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(tok)
    decoded = t.decode(ids[:mask.index(1) + 80], skip_special_tokens=False).split("<|endoftext|>User:")[0]
    assert decoded == "System:\nbe brief\n\nUser:\nthe model\n\nAssistant:\nreads"  # the documented template
    trained = t.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "reads<|endoftext|>one<|endoftext|>"
    assert manifest["sft"]["template"] == sft.TEMPLATE and manifest["sft"]["template"]["name"] == "megalm-sft-v1"


def test_bad_records_are_skipped_and_counted_by_reason(tmp_path, tok):
    good = {"prompt": "repeat: the\n", "response": "the"}
    records = [
        good,
        {"prompt": "no response"},                                             # missing_field
        {"prompt": "x", "response": 3},                                        # missing_field (not a string)
        {"prompt": "x", "response": "  "},                                     # empty
        {"messages": "hello"},                                                 # missing_field (not a list)
        {"messages": [{"role": "user"}]},                                      # missing_field (no content)
        {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # unknown_role
        {"messages": [{"role": "user", "content": "hi"}]},                     # no_assistant_turn
        {"messages": []},                                                      # no_assistant_turn
        {"prompt": "the model reads tokens " * 12, "response": "one"},        # prompt_too_long
        '{"prompt": "cut',                                                     # malformed_json
        "[1, 2]",                                                              # missing_field (not an object)
        good,
    ]
    prefix = str(tmp_path / "bad")
    manifest, err = prep_sft(records, tok, prefix, report_skips=20)
    assert manifest["skipped"] == {"malformed_json": 1, "missing_field": 5, "empty": 1, "unknown_role": 1,
                                   "no_assistant_turn": 2, "prompt_too_long": 1}
    assert manifest["documents"] == 2 and manifest["records"] == len(records)
    src = prefix + ".input.jsonl"
    assert f"skipped {src}:7: unknown_role: messages[0].role is 'robot'" in err
    assert f"skipped {src}:10: prompt_too_long: " in err and "--seq-len 32 leaves no room for the response" in err
    # --strict stops at the first bad record, naming it
    assert prep_main(["tokenize", "--sft", "--seq-len", "32", "--strict", "--input", src, "--tokenizer", tok,
                      "--output-prefix", str(tmp_path / "strict")]) == 2


def test_manifest_says_sft_and_the_mask_is_never_a_token_shard(tmp_path, tok, capsys):
    prefix = str(tmp_path / "d" / "sft")
    manifest, _ = prep_sft(copy_records(12), tok, prefix)
    assert manifest["complete"] is True
    assert {k: manifest["sft"][k] for k in ("layout", "seq_len", "pad_id")} == \
        {"layout": "padded", "seq_len": SEQ_LEN, "pad_id": manifest["tokenizer"]["eod_id"]}
    assert "one record per document" in manifest["sft"]["packing"]
    assert manifest["shards"][0]["loss_mask"]["name"] == "sft.loss_mask"
    assert expand_shard_path(prefix) == expand_shard_path(str(tmp_path / "d" / "sft*")) == [prefix]
    with pytest.raises(ShardPathError, match="is a loss mask, not token shards"):
        expand_shard_path(_mask(prefix))
    assert prep_main(["inspect", prefix]) == 0
    assert f"fine-tuning data: padded to {SEQ_LEN} tokens per record" in capsys.readouterr().out
    assert prep_main(["merge", "--inputs", prefix, "--output-prefix", str(tmp_path / "m")]) == 2
    assert "fine-tuning data with a loss mask" in capsys.readouterr().err
    # a manifest that lists a mask requires it: without it the prompts would be trained on
    os.unlink(_mask(prefix) + ".bin")
    with pytest.raises(ShardPathError, match="lists shard files that do not exist.*loss_mask.bin"):
        expand_shard_path(prefix)


def test_any_workers_and_a_killed_run_resumed_give_the_same_bytes(tmp_path, tok):
    # a skipped and a truncated record in the first shard, the one the resumed run keeps
    records = [{"prompt": "the model reads tokens " * 12, "response": "x"},
               {"prompt": "p\n", "response": "the model reads tokens " * 12}] + copy_records(60, seed=2)
    source = write_jsonl(str(tmp_path / "in.jsonl"), records)

    def run(prefix: str, *extra: str, env=None):
        return run_command(prep_cli("tokenize", "--sft", "--seq-len", str(SEQ_LEN), "--input", source,
                                    "--tokenizer", tok, "--output-prefix", prefix, "--num-shards", "3",
                                    "--no-progress", *extra), timeout=120, cwd=REPO, env=env)

    def outputs(prefix: str) -> list[bytes]:
        shards = json.load(open(prefix + ".manifest.json"))["shards"]
        names = [os.path.join(os.path.dirname(prefix), s["name"]) for s in shards]
        return file_bytes(names) + file_bytes([_mask(n) for n in names])

    ref = str(tmp_path / "ref" / "s")
    run(ref).check()
    two = str(tmp_path / "two" / "s")
    run(two, "--workers", "2").check()
    assert outputs(two) == outputs(ref)
    killed = str(tmp_path / "killed" / "s")
    assert run(killed, env={KILL_HOOK_ENV: "1"}).returncode == -9
    partial = json.load(open(killed + ".manifest.json"))
    assert partial["complete"] is False and len(partial["shards"]) == 1
    resumed = run(killed).check()
    assert "resume: keeping 1 complete shard(s)" in resumed.output
    assert outputs(killed) == outputs(ref)
    want, got = json.load(open(ref + ".manifest.json")), json.load(open(killed + ".manifest.json"))
    assert got["skipped"] == want["skipped"] == {"prompt_too_long": 1}
    assert got["sft"]["truncated"] == want["sft"]["truncated"] == 1
    assert got["sft"]["target_tokens"] == want["sft"]["target_tokens"]


@pytest.mark.parametrize("args,message", [
    (["--sft"], "--sft needs --seq-len N"),
    (["--seq-len", "32"], "--seq-len 32 applies to --sft only"),
    (["--sft", "--seq-len", "1"], "--seq-len 1: must be >= 2"),
    (["--sft", "--seq-len", "32", "--json-keys", "prompt"], "--json-keys does not apply to --sft"),
])
def test_bad_options_are_refused(tmp_path, tok, capsys, args, message):
    source = write_jsonl(str(tmp_path / "in.jsonl"), copy_records(3))
    rc = prep_main(["tokenize", "--input", source, "--tokenizer", tok, "--output-prefix", str(tmp_path / "o"), *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_non_jsonl_input_is_refused(tmp_path, tok, capsys):
    (tmp_path / "t.txt").write_text("plain text")
    rc = prep_main(["tokenize", "--sft", "--seq-len", "32", "--input", str(tmp_path / "t.txt"), "--tokenizer", tok,
                    "--output-prefix", str(tmp_path / "o")])
    assert rc == 2 and "--sft reads JSONL records" in capsys.readouterr().err


def test_training_samples_are_records_with_ignored_prompt_labels(tmp_path, tok):
    records = copy_records(30, seed=3)
    prefix = str(tmp_path / "sft")
    prep_sft(records, tok, prefix)
    expected = {tuple(ids): mask for ids, mask in (expected_tokens_and_mask(tok, r) for r in records)}
    cfg = DataConfig(train_paths=[prefix], seq_len=SEQ_LEN, split="100,0,0")
    train, _, _ = build_datasets(cfg, 59, 0, 0)  # two epochs' samples: every record at least once
    seen = set()
    for input_ids, labels in micro_batches(train, 1):
        for x, y in zip(input_ids.tolist(), labels.tolist()):
            mask = expected[tuple(x)]  # the inputs are one whole padded record
            want = [tok_id if m else IGNORE_INDEX for tok_id, m in zip(x[1:] + [None], mask[1:] + [0])]
            assert y == want, (x, y, want)
            seen.add(tuple(x))
    assert len(seen) == len(expected)


def test_wrong_seq_len_or_a_foreign_mask_is_refused(tmp_path, tok):
    prefix = str(tmp_path / "sft")
    prep_sft(copy_records(10), tok, prefix)
    with pytest.raises(ConfigError, match=r"data\.seq_len: .* padded to 32 tokens .* data\.seq_len is 64"):
        DataConfig(train_paths=[prefix], seq_len=64).check_files()
    with pytest.raises(ValueError, match="not seq_len=16"):
        GPTDataset(prefix, 16, 8, seed=0, loss_mask=Shard(_mask(prefix)))
    # a mask whose documents do not line up with the tokens is a data error naming the mask
    with ShardWriter(_mask(prefix), np.uint8) as w:
        for _ in range(10):
            w.add_document(np.ones(SEQ_LEN - 1, np.uint8))
    with pytest.raises(ShardFormatError, match="loss_mask.idx: its document lengths differ"):
        sft.open_loss_mask(Shard(prefix))
