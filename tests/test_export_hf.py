"""Issue 6 acceptance: `megalm-export` writes a LlamaForCausalLM directory that transformers loads offline
with logits equal to ours within 1e-5 (GQA tiny model, tied and untied embeddings, from TP and PP
checkpoints), sharded safetensors with an index, and the run's tokenizer; `megalm-generate` decodes
greedily exactly as transformers does and refuses a tokenizer whose hash does not match the run's."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.train_fixtures import train_on_rank, write_synthetic_shard

import transformers  # pinned in requirements.txt: a missing install must fail, not skip

ATOL = 1e-5
TEXTS = ["def main(argv):\n    return 0\n", "import os\nimport sys\n", "for i in range(10):\n    print(i)\n"] * 20


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from data_prep.tokenizer import EOD_TOKEN, save_tokenizer, train_bpe

    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    save_tokenizer(train_bpe(TEXTS, vocab_size=300, special_tokens=[EOD_TOKEN], min_frequency=1), path)
    return path


# (name, parallel overrides, tied): untied from a TP=2 checkpoint, tied from a PP=2 pipeline checkpoint,
# untied from ZeRO-3 over dp=2 (the weights exist only as partitions), tied from ZeRO-3 x PP=2 (one
# engine per stage, each holding a copy of the tied embedding)
RUNS = [("untied-tp2", ["parallel.tp=2"], False), ("tied-pp2", ["parallel.pp=2", "parallel.zero_stage=1"], True),
        ("untied-z3-dp2", ["parallel.zero_stage=3"], False),
        ("tied-z3-pp2", ["parallel.pp=2", "parallel.zero_stage=3"], True)]


@pytest.fixture(scope="module")
def runs(rank_pool, tmp_path_factory, tokenizer_path):
    shard = write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))
    out = {}
    for name, layout, tied in RUNS:
        run_dir = str(tmp_path_factory.mktemp(name))
        overrides = [f"data.train_paths=[{shard}]", f"data.tokenizer={tokenizer_path}", f"train.run_dir={run_dir}",
                     "train.train_steps=2", f"model.tie_embeddings={str(tied).lower()}", *layout]
        assert rank_pool(2).run(train_on_rank, overrides, timeout=600) == [0, 0]
        out[name] = run_dir
    return out


def _ours(run_dir: str):
    from megalm.eval.model_loading import load_model
    from megalm.export.checkpoint_files import locate_checkpoint

    return load_model(locate_checkpoint(run_dir))


def _hf(path: str):
    return transformers.LlamaForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", [r[0] for r in RUNS])
def test_exported_logits_match(runs, tmp_path, name):
    from megalm.export.hf import main

    out = str(tmp_path / "hf")
    assert main(["--checkpoint", runs[name], "--output", out]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["num_key_value_heads"] == 4 and cfg["num_attention_heads"] == 8  # GQA
    assert cfg["tie_word_embeddings"] is name.startswith("tied")
    hf = _hf(out)
    ours = _ours(runs[name])
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(ids)[..., : ours.cfg.vocab_size]
        got = hf(ids).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= ATOL
    if name.startswith("tied"):
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name,dtype,shard_size", [("untied-tp2", "float32", "5GB"), ("tied-pp2", "bfloat16", "5GB"),
                                                   ("untied-z3-dp2", "float16", "60KB")])
def test_streamed_export_equals_the_consolidated_tensors(runs, tmp_path, name, dtype, shard_size):
    """The streaming export (tensor by tensor from the shard files, headers written first) holds exactly
    what the old way wrote: consolidate the whole model, convert, safetensors' own save_file."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from megalm.export.checkpoint_files import locate_checkpoint
    from megalm.export.consolidate import consolidate
    from megalm.export.hf import DTYPES, export_hf, hf_state_dict

    out = str(tmp_path / "hf")
    files = export_hf(runs[name], out, dtype=dtype, max_shard_size=shard_size)
    state = consolidate(locate_checkpoint(runs[name]))
    old = hf_state_dict(state.weights, state.cfg, DTYPES[dtype])
    save_file(old, str(tmp_path / "old.safetensors"), metadata={"format": "pt"})
    old = load_file(str(tmp_path / "old.safetensors"))
    new = {}
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(out, f), "pt") as st:
                assert st.metadata() == {"format": "pt"}
                new.update({k: st.get_tensor(k) for k in st.keys()})
    assert sorted(new) == sorted(old)
    for k, t in old.items():
        assert new[k].dtype == t.dtype == DTYPES[dtype] and torch.equal(new[k], t), k
    assert (len([f for f in files if f.endswith(".safetensors")]) > 1) is (shard_size == "60KB")


def test_sharded_export_with_index(runs, tmp_path):
    from megalm.export.hf import export_hf
    from megalm.export.safetensors_out import INDEX_FILE

    out = str(tmp_path / "hf")
    files = export_hf(runs["untied-tp2"], out, max_shard_size="100KB")
    index = json.load(open(os.path.join(out, INDEX_FILE)))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(f in files for f in shards)
    assert "model.layers.0.self_attn.k_proj.weight" in index["weight_map"]
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert (_hf(out)(ids).logits - _ours(runs["untied-tp2"])(ids)[..., :512]).abs().max().item() <= ATOL


def test_tokenizer_and_greedy_generation_match_transformers(runs, tmp_path, tokenizer_path, capsys):
    from megalm.eval.generate import main as generate
    from megalm.export.hf import export_hf

    out = str(tmp_path / "hf")
    export_hf(runs["tied-pp2"], out)
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(out, local_files_only=True)
    prompt = "import os\nfor i in"
    assert generate(["--checkpoint", runs["tied-pp2"], "--prompt", prompt, "--max-new-tokens", "8", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["prompt_ids"] == hf_tok(prompt)["input_ids"]
    with torch.no_grad():
        hf_ids = _hf(out).generate(torch.tensor([rec["prompt_ids"]]), max_new_tokens=8, do_sample=False,
                                   pad_token_id=hf_tok.eos_token_id)[0, len(rec["prompt_ids"]):].tolist()
    assert rec["ids"] == hf_ids
    assert rec["text"] == hf_tok.decode(hf_ids)
    # sampling is reproducible from its seed
    args = ["--checkpoint", runs["tied-pp2"], "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "1.0",
            "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--json", "--no-stop"]
    assert generate(args) == 0 and generate(args) == 0
    a, b = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines())
    assert a["ids"] == b["ids"] and len(a["ids"]) == 6


def test_generate_refuses_another_tokenizer(runs, tmp_path, tokenizer_path, capsys):
    from megalm.eval.generate import main as generate

    other = str(tmp_path / "other.json")
    with open(tokenizer_path) as f:
        data = json.load(f)
    data["added_tokens"] = data["added_tokens"][:0]
    with open(other, "w") as f:
        json.dump(data, f)
    assert generate(["--checkpoint", runs["tied-pp2"], "--prompt", "x", "--tokenizer", other]) == 2
    err = capsys.readouterr().err
    assert other in err and "not the tokenizer the model was trained with" in err
