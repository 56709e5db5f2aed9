"""Sharded initialisation (megalm/parallel/init.py): the full weights assembled from any layout equal the
tp=1 weights for the same seed, bit for bit, and each rank draws only its share.

On 4 ranks (tiny config, 8 query heads over 4 kv heads): tp x pp in {1,2,4} x {1,2,4} through a real
DeepSpeed PipelineModule (only its stage's layers are built), and ZeRO-3 at tp=1 dp=4 and tp=2 dp=2
(gathered partitions). Draws are counted at `Tensor.normal_`: a TP shard must draw exactly its own
numbers (padding rows none), so reverting to full-tensor draws, or to another drawing call, fails here."""
import dataclasses

import pytest
import torch

from megalm.parallel.init import ShardInit, tile_shape, tp_shard_init

LAYOUTS = [(1, 1, False, 512), (2, 1, False, 512), (4, 1, False, 512), (1, 2, False, 512), (2, 2, True, 300),
           (1, 4, False, 500)]  # (tp, pp, tied, vocab)
VOCAB_PARAMS = ("embedding.weight", "output.weight")


class _CountDraws:
    """Counts the numbers drawn through Tensor.normal_ (every init draw) while active."""

    def __enter__(self):
        self.drawn, self._orig = 0, torch.Tensor.normal_

        def counting(t, *args, **kwargs):
            self.drawn += t.numel()
            return self._orig(t, *args, **kwargs)

        torch.Tensor.normal_ = counting
        return self

    def __exit__(self, *exc):
        torch.Tensor.normal_ = self._orig


def _tiny(tied: bool, vocab: int):
    from megalm.config import load_model_config

    return dataclasses.replace(load_model_config("tiny"), tie_embeddings=tied, vocab_size=vocab)


def _reference(cfg) -> dict:
    """The tp=1 weights (built before any process grid exists: no tensor parallelism, no draws counted)."""
    from megalm.model import GPTModel

    return {name: p.detach() for name, p in GPTModel(cfg).named_parameters()}


def _compare_full(cfg, ref, named, gather) -> tuple[list[str], int]:
    """(names whose assembled full weight differs from the tp=1 build `ref`, real (non-padding) numbers held)."""
    bad, real = [], 0
    for name, p in named:
        w = gather(p, name)
        if name in VOCAB_PARAMS:  # padding rows (their count depends on tp) are zero
            if w[cfg.vocab_size:].abs().sum() != 0:
                bad.append(f"{name} padding")
            w = w[:cfg.vocab_size]
        if not torch.equal(w, ref[name][:w.shape[0]]):
            bad.append(name)
    for name, p in named:
        if p.dim() == 2:  # the drawn weights (norms are ones)
            start = getattr(p, "_vocab_start", None)
            rows = p.shape[0] if start is None else max(0, min(p.shape[0], cfg.vocab_size - start))
            real += rows * p.shape[1]
    return bad, real


def _pipeline_layout(tp: int, pp: int, tied: bool, vocab: int):
    import deepspeed
    from deepspeed.pipe import PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megalm.model import EmbeddingLayer, OutputLayer, gpt_parameter_names, pipeline_layer_specs, tp_partition_dim
    from megalm.parallel import destroy_process_grid, gather_along_dim, initialize_process_grid

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = _tiny(tied, vocab)
    ref = _reference(cfg)
    grid = initialize_process_grid(tp, pp)
    try:
        topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=grid.dp)
        with _CountDraws() as count:
            stage = PipelineModule(layers=pipeline_layer_specs(cfg), topology=topology,
                                   partition_method="type:TransformerBlock")
        for m in stage.modules():
            if isinstance(m, (EmbeddingLayer, OutputLayer)):
                m.weight._vocab_start = m.vocab_start
        names = gpt_parameter_names(stage)
        named = [(names[id(p)], p) for p in stage.parameters()]

        def gather(p, name):
            dim = tp_partition_dim(name)
            return p.detach() if dim is None else gather_along_dim(p.detach(), dim, grid.tp_group)

        bad, real = _compare_full(cfg, ref, named, gather)
        return bad, count.drawn, real, len(named)
    finally:
        destroy_process_grid()


@pytest.mark.parametrize("tp,pp,tied,vocab", LAYOUTS)
def test_every_tp_pp_layout_assembles_the_tp1_weights_drawing_only_its_share(rank_pool, tp, pp, tied, vocab):
    results = rank_pool(4).run(_pipeline_layout, tp, pp, tied, vocab, timeout=180)
    for rank, (bad, drawn, real, n_params) in enumerate(results):
        assert n_params > 0
        assert not bad, f"rank {rank}: full weights differ from the tp=1 build: {bad}"
        assert drawn == real, f"rank {rank} drew {drawn} numbers, but holds {real} (its share)"


def _zero3_layout(tp: int):
    import deepspeed

    from megalm.config.run import load_run_config
    from megalm.model import GPTModel, tp_partition_dim
    from megalm.parallel import destroy_process_grid, gather_along_dim, initialize_process_grid
    from megalm.training.deepspeed_config import build_deepspeed_config
    from tests.train_fixtures import TINY_RUN

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = load_run_config(TINY_RUN, [f"parallel.tp={tp}", "parallel.zero_stage=3", "train.precision=fp32",
                                     "data.train_paths=[unused]"])
    ref = _reference(cfg.model)
    grid = initialize_process_grid(tp, 1)
    try:
        with _CountDraws() as count:
            with deepspeed.zero.Init(data_parallel_group=grid.dp_group, mpu=grid.mpu,
                                     config_dict_or_path=build_deepspeed_config(cfg, grid.dp)):
                model = GPTModel(cfg.model, grid)
        named = list(model.named_parameters())
        shard = sum(p.ds_numel for _, p in named if len(p.ds_shape) == 2)
        pending = [n for n, p in named if hasattr(p, "megalm_pending_init")]

        def gather(p, name):
            with deepspeed.zero.GatheredParameters([p]):
                w = p.detach().clone()
            dim = tp_partition_dim(name)
            return w if dim is None else gather_along_dim(w, dim, grid.tp_group)

        for m in model.modules():
            if hasattr(m, "vocab_start") and hasattr(m, "weight"):
                m.weight._vocab_start = m.vocab_start
        bad, _ = _compare_full(cfg.model, ref, named, gather)
        return bad, pending, count.drawn, shard
    finally:
        destroy_process_grid()


@pytest.mark.parametrize("tp", [1, 2])
def test_zero3_partitions_assemble_the_tp1_weights_drawing_only_their_tiles(rank_pool, tp):
    for rank, (bad, pending, drawn, shard) in enumerate(rank_pool(4).run(_zero3_layout, tp, timeout=180)):
        assert not bad, f"rank {rank}: gathered ZeRO-3 weights differ from the tp=1 build: {bad}"
        assert not pending, f"rank {rank}: deferred init never filled: {pending}"
        # only the tiles overlapping the partition: on the tiny shape a tile is up to a quarter of a
        # weight, so a 1/dp partition draws more than 1/dp, but far less than its TP shard
        assert 0 < drawn < 0.75 * shard, (rank, drawn, shard)


# ---------------------------------------------------------------- single process: the tile grid itself
def _assemble(init: ShardInit) -> torch.Tensor:
    return init.rows(0, init.shape[0])


@pytest.mark.parametrize("full,dim,unit", [((3072, 1024), 0, 192), ((1024, 2816), 1, 176), ((500, 64), 0, 128),
                                           ((64, 96), 1, None), ((300, 64), 0, None)])
def test_shards_and_flat_partitions_tile_the_full_weight(full, dim, unit):
    """Any TP split (vocabulary padding included) and any ZeRO-like flat split of a shard give back the
    tp=1 tensor exactly, also where a shard boundary cuts a tile (unit=None)."""
    ref = _assemble(tp_shard_init("w", 7, 0.02, full, full, dim, 0, 1, unit))
    assert 0.015 < float(ref.std()) < 0.025
    for world in (2, 4):
        padded = list(full)
        if full[0] % 128 and dim == 0:
            padded[0] = 128 * world * -(-full[0] // (128 * world))
        if padded[dim] % world:
            continue
        shards = [tp_shard_init("w", 7, 0.02, full, padded, dim, r, world, unit) for r in range(world)]
        whole = torch.cat([_assemble(s) for s in shards], dim)
        assert torch.equal(whole[:full[0]], ref) and not whole[full[0]:].any()
        last = _assemble(shards[-1]).view(-1)
        for dp in (3, 4):
            size = -(-last.numel() // dp)
            parts = [shards[-1].flat(i * size, min(last.numel(), (i + 1) * size)) for i in range(dp)]
            assert torch.equal(torch.cat(parts), last)


def test_tiles_never_straddle_a_legal_tp_shard_on_the_shipped_shapes():
    """With the model's tp_unit, every TP boundary of every shipped shape falls on a tile boundary, so
    a shard draws exactly its own numbers (checked on the grid, without drawing 70B numbers)."""
    import math

    from megalm.config import load_model_config
    from megalm.config.model import MODEL_CONFIG_DIR, VOCAB_PAD_MULTIPLE
    from megalm.model.transformer import tp_unit

    for path in sorted(MODEL_CONFIG_DIR.glob("*.yaml")):
        cfg = load_model_config(path.stem)
        g = math.gcd(cfg.num_heads, cfg.kv_heads, cfg.ffn_size)
        h, qkv, f = cfg.hidden_size, (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim, cfg.ffn_size
        o = cfg.num_heads * cfg.head_dim
        weights = [((qkv, h), 0, tp_unit(qkv, cfg)), ((h, o), 1, tp_unit(o, cfg)), ((f, h), 0, tp_unit(f, cfg)),
                   ((h, f), 1, tp_unit(f, cfg)), ((cfg.vocab_size, h), 0, VOCAB_PAD_MULTIPLE)]
        for shape, dim, unit in weights:
            tile = tile_shape(shape, dim, unit)
            assert tile[0] * tile[1] <= max(1 << 16, shape[1 - dim]), (path.stem, shape, tile)
            for tp in (d for d in range(1, g + 1) if g % d == 0):
                size = (cfg.padded_vocab_size(tp) if shape[0] == cfg.vocab_size else shape[dim]) // tp
                assert size % tile[dim] == 0, (path.stem, shape, tp, tile)
