"""GPTModel under tensor parallelism on 4 ranks: tp in {1, 2, 4} equals the unsplit model (weights at
init, gathered logits, loss, every parameter's gathered gradient), untied with vocabulary padding and
tied. The tiny config has 8 query heads over 4 kv heads, so GQA is split across TP ranks."""
import pytest

VOCAB_PARAMS = ("embedding.weight", "output.weight")  # rows: padded vocabulary
CASES = [(1, False, 500), (2, False, 500), (4, False, 500), (2, True, 512), (4, True, 300)]  # (tp, tied, vocab)


def _rel(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _tp_matches_reference(tp, tied, vocab):
    import dataclasses

    import torch

    from megalm.config import load_model_config
    from megalm.model import GPTModel, tp_partition_dim
    from megalm.parallel import destroy_process_grid, gather_along_dim, initialize_process_grid

    cfg = dataclasses.replace(load_model_config("tiny"), vocab_size=vocab, tie_embeddings=tied)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 24), generator=gen)
    labels = torch.randint(0, vocab, (2, 24), generator=gen)
    labels[0, :5] = -100
    labels[1, -1] = vocab - 1

    ref = GPTModel(cfg)  # built before the grid exists: no tensor parallelism
    ref_logits = ref(ids)
    ref_loss = ref.loss(ref_logits, labels)
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())

    grid = initialize_process_grid(tp, 1)
    try:
        model = GPTModel(cfg)  # picks up the grid's TP group
        errors = {}
        init_mismatch = []
        full = {}
        for name, p in model.named_parameters():
            dim = tp_partition_dim(name)
            assert p.partition_dim == dim, name
            full[name] = (p, dim)
            w = gather_along_dim(p.detach(), dim, grid.tp_group) if dim is not None else p.detach()
            if name in VOCAB_PARAMS:  # padding (its size depends on tp) is zero; real rows must match
                assert w[vocab:].abs().sum() == 0
                w = w[:vocab]
            if not torch.equal(w, ref_params[name].detach()[: w.shape[0]]):
                init_mismatch.append(name)
        assert set(full) == set(ref_params)

        logits = model(ids)
        assert logits.shape == (2, 24, cfg.padded_vocab_size(tp) // tp)
        gathered = gather_along_dim(logits.detach(), -1, grid.tp_group)
        assert torch.isneginf(gathered[..., vocab:]).all()  # padding is never predicted
        errors["logits"] = _rel(gathered[..., :vocab], ref_logits.detach()[..., :vocab])
        loss = model.loss(logits, labels)
        errors["loss"] = _rel(loss.detach().view(1), ref_loss.detach().view(1))
        loss.backward()
        for name, (p, dim) in full.items():
            grad = gather_along_dim(p.grad, dim, grid.tp_group) if dim is not None else p.grad
            ref_grad = ref_params[name].grad
            if name in VOCAB_PARAMS:
                grad, ref_grad = grad[:vocab], ref_grad[:vocab]
            errors[f"grad {name}"] = _rel(grad, ref_grad)
        return init_mismatch, errors
    finally:
        destroy_process_grid()


@pytest.mark.parametrize("tp,tied,vocab", CASES)
def test_tensor_parallel_model_equals_unsplit(rank_pool, tp, tied, vocab):
    for rank, (init_mismatch, errors) in enumerate(rank_pool(4).run(_tp_matches_reference, tp, tied, vocab)):
        assert not init_mismatch, f"rank {rank}: full weights differ from tp=1 init: {init_mismatch}"
        bad = {k: v for k, v in errors.items() if v > 1e-5}
        assert not bad, f"rank {rank}: relative errors above 1e-5: {bad}"
        assert len(errors) > 20  # every parameter's gradient was compared
