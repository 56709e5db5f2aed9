"""ZeRO-3 construction: every module initialises its own parameters in its own __init__, so under
deepspeed.zero.Init (partitioned over the DP group) the gathered parameters equal a plain build's TP
shards. 4 ranks: tp=2 x dp=2."""


def _zero3_build():
    import torch

    import deepspeed
    from megalm.config import load_model_config
    from megalm.model import GPTModel
    from megalm.parallel import destroy_process_grid, initialize_process_grid

    grid = initialize_process_grid(2, 1)
    try:
        cfg = load_model_config("tiny")
        plain = dict(GPTModel(cfg, grid).named_parameters())
        ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        with deepspeed.zero.Init(data_parallel_group=grid.dp_group, dtype=torch.float32,
                                 config_dict_or_path=ds_config):
            model = GPTModel(cfg, grid)
        mismatched = []
        for name, p in model.named_parameters():
            assert hasattr(p, "ds_id") and p.numel() == 0, f"{name} was not partitioned at construction"
            with deepspeed.zero.GatheredParameters([p]):
                if not torch.equal(p.data, plain[name].data):
                    mismatched.append(name)
        return mismatched
    finally:
        destroy_process_grid()


def test_zero3_init_partitions_at_construction_with_same_weights(rank_pool):
    assert rank_pool(4).run(_zero3_build, timeout=180) == [[]] * 4
