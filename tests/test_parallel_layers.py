"""Tensor-parallel building blocks on 4 ranks, each against its dense definition, forward and backward:
the comm autograd functions, Column/Row/VocabParallel layers, vocab-parallel cross-entropy, RNG streams."""
import pytest

TPS = (2, 4)


def _close(a, b, tol=1e-5):
    scale = b.abs().max().clamp(min=1e-12)
    err = float((a - b).abs().max() / scale)
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def _comm_functions(tp):
    import torch

    from megalm.parallel import (copy_to_tp_region, destroy_process_grid, gather_from_tp_region,
                                 initialize_process_grid, reduce_from_tp_region, scatter_to_tp_region)

    grid = initialize_process_grid(tp, 1)
    try:
        g, r = grid.tp_group, grid.tp_rank
        shared = torch.Generator().manual_seed(7 + grid.dp_rank)  # identical within a TP group
        x_full = torch.randn(3, 4 * tp, generator=shared)
        per_rank = [torch.randn(3, 4 * tp, generator=shared) for _ in range(tp)]  # rank i's tensor: per_rank[i]

        # copy: identity forward; backward sums every rank's gradient
        x = x_full.clone().requires_grad_()
        y = copy_to_tp_region(x, g)
        assert torch.equal(y, x_full)
        y.backward(per_rank[r])
        _close(x.grad, sum(per_rank))

        # reduce: sum forward; backward identity
        x = per_rank[r].clone().requires_grad_()
        y = reduce_from_tp_region(x, g)
        _close(y, sum(per_rank))
        y.backward(x_full)
        assert torch.equal(x.grad, x_full)
        assert torch.equal(x, per_rank[r])  # the input was not reduced in place

        # scatter: own last-dim chunk forward; backward gathers every rank's chunk gradient
        x = x_full.clone().requires_grad_()
        y = scatter_to_tp_region(x, g)
        assert torch.equal(y, x_full.chunk(tp, -1)[r])
        grads = [p[:, :4] for p in per_rank]
        y.backward(grads[r])
        assert torch.equal(x.grad, torch.cat(grads, -1))

        # gather: concatenation forward; backward keeps own chunk
        chunks = [p[:, :4] for p in per_rank]
        x = chunks[r].clone().requires_grad_()
        y = gather_from_tp_region(x, g)
        assert torch.equal(y, torch.cat(chunks, -1))
        y.backward(x_full)
        assert torch.equal(x.grad, x_full.chunk(tp, -1)[r])

        # group=None is "no tensor parallelism": identity both ways
        for fn in (copy_to_tp_region, reduce_from_tp_region, scatter_to_tp_region, gather_from_tp_region):
            assert fn(x_full, None) is x_full
    finally:
        destroy_process_grid()
    return True


@pytest.mark.parametrize("tp", TPS)
def test_comm_functions_forward_backward(rank_pool, tp):
    assert rank_pool(4).run(_comm_functions, tp) == [True] * 4


def _layers(tp):
    import torch

    from megalm.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, destroy_process_grid,
                                 gather_along_dim, initialize_process_grid)

    grid = initialize_process_grid(tp, 1)
    try:
        g, r = grid.tp_group, grid.tp_rank
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(2, 5, 16, generator=gen)
        upstream = torch.randn(2, 5, 24, generator=gen)

        def check(ref_layer, layer, inp, shard_input, dim, gathered_output):
            xr = inp.clone().requires_grad_()
            yr = ref_layer(xr)
            yr.backward(upstream[..., : yr.shape[-1]])
            xs = (inp.chunk(tp, -1)[r] if shard_input else inp).clone().requires_grad_()
            ys = layer(xs)
            _close(gather_along_dim(ys.detach(), -1, g) if not gathered_output else ys.detach(), yr.detach())
            ys.backward(upstream[..., : yr.shape[-1]].chunk(tp, -1)[r] if not gathered_output else
                        upstream[..., : yr.shape[-1]])
            _close(gather_along_dim(xs.grad, -1, g) if shard_input else xs.grad, xr.grad)
            _close(gather_along_dim(layer.weight.grad, dim, g), ref_layer.weight.grad)

        for gather_output in (False, True):
            kw = dict(init_key="col", seed=11, init_std=0.1)
            check(ColumnParallelLinear(16, 24, gather_output=gather_output, **kw),
                  ColumnParallelLinear(16, 24, gather_output=gather_output, tp_group=g, **kw),
                  x, False, 0, gather_output)
        for input_is_parallel in (True, False):
            kw = dict(init_key="row", seed=11, init_std=0.1, input_is_parallel=input_is_parallel)
            check(RowParallelLinear(16, 24, **kw), RowParallelLinear(16, 24, tp_group=g, **kw),
                  x, input_is_parallel, 1, True)

        # embedding: ids from the whole (real) vocabulary; padding rows are zero
        kw = dict(num_embeddings=100, init_std=0.1, init_key="emb", seed=5)
        ref, emb = VocabParallelEmbedding(128, 24, **kw), VocabParallelEmbedding(128, 24, tp_group=g, **kw)
        assert torch.equal(gather_along_dim(emb.weight.detach(), 0, g), ref.weight.detach())
        assert ref.weight[100:].abs().sum() == 0
        ids = torch.randint(0, 100, (2, 5), generator=gen)
        yr, ys = ref(ids), emb(ids)
        _close(ys.detach(), yr.detach())
        yr.backward(upstream)
        ys.backward(upstream)
        _close(gather_along_dim(emb.weight.grad, 0, g), ref.weight.grad)
    finally:
        destroy_process_grid()
    return True


@pytest.mark.parametrize("tp", TPS)
def test_parallel_layers_match_dense(rank_pool, tp):
    assert rank_pool(4).run(_layers, tp) == [True] * 4


def _cross_entropy(tp):
    import torch
    import torch.nn.functional as F

    from megalm.parallel import destroy_process_grid, initialize_process_grid, vocab_parallel_cross_entropy

    grid = initialize_process_grid(tp, 1)
    try:
        g, r = grid.tp_group, grid.tp_rank
        gen = torch.Generator().manual_seed(4)
        vocab, padded = 250, 256  # padding columns hold -inf, as the model's output layer makes them
        logits = torch.randn(3, 7, padded, generator=gen) * 3
        logits[..., vocab:] = float("-inf")
        labels = torch.randint(0, vocab, (3, 7), generator=gen)
        labels[0, :4] = -100
        labels[2, 6] = -100
        labels[1, 0] = vocab - 1  # a target in the last shard
        upstream = torch.rand(3, 7, generator=gen)

        full = logits.clone().requires_grad_()
        ref = F.cross_entropy(full.view(-1, padded), labels.view(-1), reduction="none", ignore_index=-100).view(3, 7)
        ref.backward(upstream)

        shard = logits.chunk(tp, -1)[r].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(shard, labels, ignore_index=-100, tp_group=g)
        _close(loss.detach(), ref.detach())
        assert float(loss[0, :4].abs().sum()) == 0.0
        loss.backward(upstream)
        _close(shard.grad, full.grad.chunk(tp, -1)[r])
        # mean over non-ignored tokens, like F.cross_entropy's default reduction
        mean = vocab_parallel_cross_entropy(logits.chunk(tp, -1)[r], labels, tp_group=g).sum() / (labels != -100).sum()
        _close(mean, F.cross_entropy(logits.view(-1, padded), labels.view(-1)))
    finally:
        destroy_process_grid()
    return True


@pytest.mark.parametrize("tp", (1, 2, 4))
def test_vocab_parallel_cross_entropy_matches_torch(rank_pool, tp):
    assert rank_pool(4).run(_cross_entropy, tp) == [True] * 4


def _rng_streams():
    import torch
    import torch.distributed as dist

    from megalm.parallel import destroy_process_grid, get_rng_tracker, initialize_process_grid, model_parallel_seed

    grid = initialize_process_grid(2, 1)
    try:
        model_parallel_seed(42, grid.tp_rank, grid.pp_rank)
        tracker = get_rng_tracker()
        outside = torch.rand(8)
        with tracker.fork():
            inside = torch.rand(8)
            mask = torch.nn.functional.dropout(torch.ones(64), 0.5)
        with tracker.fork():
            inside_again = torch.rand(8)
        after = torch.rand(8)
        # the default stream did not move while forked: it continues as if the forks never happened
        model_parallel_seed(42, grid.tp_rank, grid.pp_rank)
        expected = torch.rand(16)
        assert torch.equal(torch.cat([outside, after]), expected)
        assert not torch.equal(inside, inside_again)  # the forked stream advances between forks
        both = [torch.zeros(8 + 8 + 64) for _ in range(2)]
        dist.all_gather(both, torch.cat([outside, inside, mask]), group=grid.tp_group)
        same_outside = torch.equal(both[0][:8], both[1][:8])
        same_inside = torch.equal(both[0][8:16], both[1][8:16]) or torch.equal(both[0][16:], both[1][16:])
        return same_outside, same_inside
    finally:
        destroy_process_grid()


def test_rng_streams_shared_outside_distinct_inside_tp(rank_pool):
    for same_outside, same_inside in rank_pool(2).run(_rng_streams):
        assert same_outside and not same_inside
