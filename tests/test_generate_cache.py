"""Issue 12: generation with a KV cache. Greedy output with the cache equals the no-cache path (single and
batched prompts of different lengths, GQA, past max_seq_len), sampling with a seed draws the same tokens
either way, batched rows equal each prompt alone, the cache's logits equal the full forward's, output
equals Hugging Face `generate` on the `megalm-export` of the same checkpoint, and TP=2 under torchrun-like
ranks prints what one process prints."""
from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout

import pytest
import torch

import transformers  # pinned in requirements.txt: a missing install must fail, not skip

# (prompt length, ...) of different lengths, one of 1 token
LENGTHS = (5, 12, 1, 9)


def _model(tied: bool = False, max_seq_len: int = 256):
    from megalm.config.model import load_model_config
    from megalm.model import GPTModel

    cfg = load_model_config("tiny")  # 8 query heads over 4 kv heads (GQA)
    cfg.tie_embeddings, cfg.max_seq_len, cfg.init_std = tied, max_seq_len, 0.1  # peaked logits: no near ties
    assert cfg.kv_heads < cfg.num_heads
    return GPTModel(cfg).eval()


def _prompts(lengths=LENGTHS, vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]  # 1..: 0 is the pad id below


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_greedy_cache_equals_no_cache_single_and_batched(tied):
    from megalm.eval.decode import generate_batch, generate_ids

    model = _model(tied)
    prompts = _prompts()
    cached = generate_batch(model, prompts, 24)
    assert cached == generate_batch(model, prompts, 24, kv_cache=False)
    assert [len(ids) for ids in cached] == [24] * len(prompts)
    # a batched row generates exactly what its prompt generates alone (left padding is invisible)
    assert cached == [generate_ids(model, p, 24) for p in prompts]
    assert len({tuple(ids) for ids in cached}) == len(prompts)  # the rows are not all the same sequence


def test_past_max_seq_len_the_window_slides_as_without_cache():
    from megalm.eval.decode import generate_batch

    model = _model(max_seq_len=16)
    prompts = _prompts((3, 14, 20))  # the last is longer than the context: cut from the left, as before
    assert generate_batch(model, prompts, 12) == generate_batch(model, prompts, 12, kv_cache=False)


def test_sampling_with_a_seed_draws_the_same_tokens_with_and_without_cache():
    from megalm.eval.decode import generate_batch

    model = _model()
    prompts = _prompts()
    kwargs = dict(temperature=0.9, top_k=40, top_p=0.95, seed=7)
    cached = generate_batch(model, prompts, 20, **kwargs)
    assert cached == generate_batch(model, prompts, 20, kv_cache=False, **kwargs)
    assert cached[1] == generate_batch(model, [prompts[1]], 20, **{**kwargs, "seed": 8})[0]  # row i: seed + i
    assert cached != generate_batch(model, prompts, 20, **{**kwargs, "seed": 8})
    assert cached != generate_batch(model, prompts, 20)  # it did sample


def test_stop_token_ends_a_row_only():
    from megalm.eval.decode import generate_batch

    model = _model()
    prompts = _prompts()
    full = generate_batch(model, prompts, 16)
    stop = full[0][3]
    got = generate_batch(model, prompts, 16, stop_id=stop)
    for want, ids in zip(full, got):
        end = want.index(stop) + 1 if stop in want else len(want)
        assert ids == want[:end]
    assert got == generate_batch(model, prompts, 16, stop_id=stop, kv_cache=False)


def test_cached_logits_equal_the_full_forward():
    from megalm.model import KVCache

    model = _model()
    rows = _prompts((7, 3))
    width, steps = 7, 5
    full = torch.tensor([r + [1] * (width + steps - len(r)) for r in rows])  # each row's tokens, unpadded
    cache = KVCache.for_model(model, 2, width + steps)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
    with torch.no_grad():
        got = [model(ids, cache=cache, valid=valid)[:, -1]]
        for _ in range(steps):
            got.append(model(torch.ones(2, 1, dtype=torch.long), cache=cache)[:, -1])
        for r, row in enumerate(rows):
            want = model(full[r:r + 1, : len(row) + steps])[0, len(row) - 1:]
            assert (torch.stack([g[r] for g in got]) - want).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="holds 12 tokens per row and 13 are needed"):
        model(torch.ones(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="pass cache= too"):
        model(ids, valid=valid)


def test_training_forward_ignores_the_cache_code():
    """No cache: the plain causal forward (positions 0..s-1), unchanged for training."""
    from megalm.model.transformer import rotary_cos_sin

    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    emb = torch.outer(torch.arange(40, dtype=torch.float32), inv)
    cos, sin = rotary_cos_sin(torch.arange(40), 8, 10000.0)
    assert torch.equal(cos, torch.cat([emb, emb], -1).cos()) and torch.equal(sin, torch.cat([emb, emb], -1).sin())


@pytest.fixture(scope="module")
def exported(tiny_run_dir, tmp_path_factory):
    from megalm.export.hf import export_hf

    out = str(tmp_path_factory.mktemp("hf") / "tiny")
    export_hf(tiny_run_dir, out)
    return transformers.LlamaForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32).eval()


def _cli(argv: list[str]) -> tuple[int, str]:
    from megalm.eval.generate import main

    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _prompt_args(prompts: list[list[int]]) -> list[str]:
    return [a for p in prompts for a in ("--prompt-ids", " ".join(map(str, p)))]


def test_cache_output_equals_hf_generate_on_the_export(tiny_run_dir, exported):
    prompts = _prompts((6, 11, 2), vocab=48)  # ids the tiny run trained on
    code, out = _cli(["--checkpoint", tiny_run_dir, *_prompt_args(prompts), "--max-new-tokens", "16", "--json"])
    assert code == 0
    recs = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt_ids"] for r in recs] == prompts and all(len(r["ids"]) == 16 for r in recs)
    with torch.no_grad():
        for p, rec in zip(prompts, recs):  # one prompt at a time
            want = exported.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                     max_new_tokens=16, do_sample=False, pad_token_id=0)
            assert rec["ids"] == want[0, len(p):].tolist()
        # HF's own batching: left padding with an attention mask
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        batched = exported.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert [r["ids"] for r in recs] == batched[:, width:].tolist()
    code, out_no_cache = _cli(["--checkpoint", tiny_run_dir, *_prompt_args(prompts), "--max-new-tokens", "16",
                               "--json", "--no-kv-cache"])
    assert code == 0 and out_no_cache == out


def test_prompts_file_and_its_errors(tiny_run_dir, tmp_path, capsys):
    good = tmp_path / "prompts.jsonl"
    good.write_text('{"prompt_ids": [3, 4, 5]}\n\n{"prompt_ids": [7]}\n')
    code, out = _cli(["--checkpoint", tiny_run_dir, "--prompts-file", str(good), "--max-new-tokens", "4"])
    assert code == 0 and len(out.splitlines()) == 2
    code, ids_out = _cli(["--checkpoint", tiny_run_dir, "--prompt-ids", "3 4 5", "--prompt-ids", "7",
                          "--max-new-tokens", "4"])
    assert code == 0 and ids_out == out
    for text, error in [('{"prompt_ids": [1, "x"]}\n', r'prompts\.jsonl:1: expected \{"prompt": "text"\}'),
                        ("not json\n", r"prompts\.jsonl:1: not JSON"),
                        ("\n", "no prompts"),
                        ('{"prompt": "hi"}\n', "the run has no data.tokenizer")]:
        bad = tmp_path / "prompts.jsonl"
        bad.write_text(text)
        capsys.readouterr()
        assert _cli(["--checkpoint", tiny_run_dir, "--prompts-file", str(bad)])[0] == 2
        err = capsys.readouterr().err
        assert err.startswith("megalm-generate: ") and re.search(error, err), err
    assert _cli(["--checkpoint", tiny_run_dir, "--prompt-ids", "1 2", "--tp", "2"])[0] == 2
    assert "--tp 2 needs 2 processes: run under torchrun" in capsys.readouterr().err


def _generate_on_rank(argv: list[str]) -> str:
    """On every rank of a 2-rank pool: a tp=2 grid, then the CLI as torchrun would run it."""
    from megalm.parallel.grid import destroy_process_grid, initialize_process_grid

    initialize_process_grid(2, 1)
    try:
        code, out = _cli(argv)
        assert code == 0
        return out
    finally:
        destroy_process_grid()


def test_tp2_prints_what_one_process_prints(rank_pool, tiny_run_dir):
    prompts = _prompts((6, 11, 2), vocab=48)
    for extra in ([], ["--temperature", "0.8", "--top-k", "20", "--seed", "3"]):
        argv = ["--checkpoint", tiny_run_dir, *_prompt_args(prompts), "--max-new-tokens", "12", "--json",
                "--device", "cpu", *extra]
        code, single = _cli(argv)
        assert code == 0
        outs = rank_pool(2).run(_generate_on_rank, argv, timeout=120)
        assert outs == [single, ""]  # a tp=1 checkpoint loaded at tp=2; only rank 0 prints
