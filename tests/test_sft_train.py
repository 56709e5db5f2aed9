"""Training on fine-tuning data: masked (prompt, padding) labels change no gradient, a step's loss is the
mean over every response token of the global batch (computed here by hand), and the loss curve of
TP x PP x DP layouts is the single-process one, as for pre-training (tests/test_train_layouts.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.prep_fixtures import train_tiny_tokenizer
from tests.sft_fixtures import SEQ_LEN, copy_records, prep_sft
from tests.train_fixtures import LAYOUT_STEPS, TINY_RUN, layout_curve

RTOL = 1e-4  # the layout tests' tolerance
BATCH = dict(micro_batch_size=2, global_batch_size=8)  # configs/run/tiny.yaml


@pytest.fixture(scope="module")
def sft_output(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("sft")
    tok = train_tiny_tokenizer(str(folder / "tokenizer.json"))
    prefix = str(folder / "data" / "sft")
    manifest, _ = prep_sft(copy_records(240, seed=4), tok, prefix)
    assert manifest["documents"] == 240 and manifest["skipped"] == {}
    return prefix


def _samples(prefix: str, count: int):
    from megalm.config import DataConfig
    from megalm.data import build_datasets

    train, _, _ = build_datasets(DataConfig(train_paths=[prefix], seq_len=SEQ_LEN, split="100,0,0"), count, 0, 0)
    return [train[i] for i in range(count)]


def _loss_and_grads(model, loss_fn) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def test_masked_labels_change_no_gradient_and_the_loss_is_the_response_tokens_mean(sft_output):
    from megalm.config.model import load_model_config
    from megalm.data import collate_samples, masked_labels
    from megalm.model import GPTModel
    from megalm.parallel.cross_entropy import IGNORE_INDEX

    model = GPTModel(load_model_config("tiny"))
    samples = _samples(sft_output, 4)
    inputs, labels = collate_samples(samples)
    tokens = torch.from_numpy(np.stack([s.tokens for s in samples]))
    targets = torch.from_numpy(np.stack([s.loss_mask[1:] for s in samples])).bool()
    assert 0 < int(targets.sum()) < targets.numel() // 2  # mostly prompt and padding
    assert torch.equal(labels[targets], tokens[:, 1:][targets]) and (labels[~targets] == IGNORE_INDEX).all()

    loss, grads = _loss_and_grads(model, lambda: model.loss(model(inputs), labels))
    # by hand: torch's cross-entropy over the response positions only
    hand, hand_grads = _loss_and_grads(model, lambda: F.cross_entropy(model(inputs)[targets], tokens[:, 1:][targets]))
    assert abs(loss - hand) <= 1e-6 * hand, (loss, hand)
    for g, h in zip(grads, hand_grads):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5 * float(h.abs().max()))  # float summation order

    # The same inputs with labels that differ only at masked positions: identical gradients, bit for bit.
    garbage = tokens[:, 1:].clone()
    noise = torch.randint(1, 400, garbage.shape, generator=torch.Generator().manual_seed(5))
    garbage[~targets] = noise[~targets]
    _, garbage_grads = _loss_and_grads(model, lambda: model.loss(model(inputs), masked_labels(garbage, targets)))
    assert all(torch.equal(g, h) for g, h in zip(grads, garbage_grads))
    # ... which they would not be if those positions were trained on (so the check above can fail)
    _, open_a = _loss_and_grads(model, lambda: model.loss(model(inputs), tokens[:, 1:]))
    _, open_b = _loss_and_grads(model, lambda: model.loss(model(inputs), garbage))
    assert not all(torch.equal(g, h) for g, h in zip(open_a, open_b))


def _step_loss_against_hand(overrides: list[str], warm_steps: int) -> tuple[float, float, float]:
    """On every rank: train `warm_steps` steps, then compare the next step's loss with the mean over all
    target tokens of its global batch (every DP rank's micro-batches, forwarded here without the engine)
    and with the mean of the micro-batch means (what equal weighting of micro-batches would give)."""
    import deepspeed

    from megalm.config.run import load_run_config
    from megalm.data import build_datasets, micro_batches_for_step
    from megalm.parallel.cross_entropy import IGNORE_INDEX
    from megalm.parallel.grid import destroy_process_grid, initialize_process_grid
    from megalm.training.engine import build_engine

    cfg = load_run_config(TINY_RUN, overrides)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    grid = initialize_process_grid(cfg.parallel.tp, cfg.parallel.pp)
    try:
        engine = build_engine(cfg, grid)
        t = cfg.train
        train, _, _ = build_datasets(cfg.data, t.train_steps * t.global_batch_size, 0, 0)
        args = dict(micro_batch_size=t.micro_batch_size, accumulation_steps=t.gradient_accumulation_steps(grid.dp),
                    dp_size=grid.dp)
        for step in range(warm_steps):  # until per-token losses differ enough for the means to part
            engine.train_step(micro_batches_for_step(train, step * t.global_batch_size, dp_rank=grid.dp_rank, **args))
        consumed = warm_steps * t.global_batch_size
        sums, counts = [], []
        with torch.no_grad():
            for rank in range(grid.dp):
                for x, y in micro_batches_for_step(train, consumed, dp_rank=rank, **args):
                    logits = engine.ds.module(x)
                    per_token = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                                reduction="none")
                    sums.append(float(per_token.sum()))
                    counts.append(int((y != IGNORE_INDEX).sum()))
        loss = engine.train_step(micro_batches_for_step(train, consumed, dp_rank=grid.dp_rank, **args))
        return loss, sum(sums) / sum(counts), float(np.mean([s / c for s, c in zip(sums, counts)]))
    finally:
        destroy_process_grid()


def test_step_loss_is_the_mean_over_all_response_tokens_of_the_global_batch(rank_pool, sft_output, tmp_path):
    overrides = [f"data.train_paths=[{sft_output}]", "data.split=100,0,0", f"train.run_dir={tmp_path / 'run'}",
                 "parallel.zero_stage=0"]
    results = rank_pool(2).run(_step_loss_against_hand, overrides, 5, timeout=600)  # dp=2, accumulation 2
    (loss, hand, equal_weights), other = results
    assert other[0] == loss  # both DP ranks report the same step loss
    assert abs(loss - hand) <= 1e-5 * hand, (loss, hand)
    # the micro-batches hold different numbers of response tokens, so weighting them equally is another
    # number, far outside the tolerance above: the check tells the two apart
    assert abs(equal_weights - hand) > 20 * 1e-5 * hand, (equal_weights, hand)


@pytest.fixture(scope="module")
def sft_baseline(rank_pool, sft_output, tmp_path_factory):
    losses = layout_curve(rank_pool, 1, 1, 1, 0, sft_output, str(tmp_path_factory.mktemp("sft_base")),
                          extra=["data.split=100,0,0"])
    assert losses[-1] < losses[0] * 0.8, f"fine-tuning loss does not fall: {losses}"
    return losses


def test_first_step_loss_is_computed_over_response_tokens_only(sft_baseline, sft_output):
    """The trainer's step-1 loss (initial weights) is the hand-computed mean over the response tokens of
    the first global batch: the data path (prep output -> datasets -> micro-batches -> loss) masks prompts."""
    from megalm.config.model import load_model_config
    from megalm.config.run import load_run_config
    from megalm.data import build_datasets, collate_samples
    from megalm.model import GPTModel

    cfg = load_run_config(TINY_RUN, [f"data.train_paths=[{sft_output}]", "data.split=100,0,0"])
    train, _, _ = build_datasets(cfg.data, LAYOUT_STEPS * BATCH["global_batch_size"], 0, 0)
    samples = [train[i] for i in range(BATCH["global_batch_size"])]
    inputs, _ = collate_samples(samples)
    tokens = torch.from_numpy(np.stack([s.tokens for s in samples]))
    targets = torch.from_numpy(np.stack([s.loss_mask[1:] for s in samples])).bool()
    with torch.no_grad():
        logits = GPTModel(load_model_config("tiny"))(inputs)  # the trainer's initial weights (per-name seeds)
        hand = float(F.cross_entropy(logits[targets], tokens[:, 1:][targets]))
        everything = float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
    assert abs(sft_baseline[0] - hand) <= 1e-5 * hand, (sft_baseline[0], hand)
    assert abs(everything - hand) > 1e-3 * hand  # prompts and pads trained on would show


SFT_LAYOUTS = [(1, 2, 2, 1), (2, 1, 2, 1)]  # (tp, pp, dp, zero): pipeline + DP; tensor parallel + DP


@pytest.mark.parametrize("tp,pp,dp,zero", SFT_LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}-z{z}" for t, p, d, z in SFT_LAYOUTS])
def test_sft_layout_matches_single_process(rank_pool, sft_output, sft_baseline, tmp_path, tp, pp, dp, zero):
    losses = layout_curve(rank_pool, tp, pp, dp, zero, sft_output, str(tmp_path / "run"), extra=["data.split=100,0,0"])
    for step, (got, want) in enumerate(zip(losses, sft_baseline), start=1):
        assert abs(got - want) <= RTOL * abs(want), (
            f"step {step}: loss {got!r} vs single process {want!r} (rel {abs(got - want) / abs(want):.2e})\n"
            f"layout curve {losses}\nbaseline     {sft_baseline}")
