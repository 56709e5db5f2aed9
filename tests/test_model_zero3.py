"""ZeRO-3 construction: every module initialises its own parameters in its own __init__, so under
deepspeed.zero.Init (partitioned over the DP group) the gathered parameters equal a plain build's TP
shards, in the dtype `train.precision` asks for. 4 ranks: tp=2 x dp=2.

The build goes through the trainer's own DeepSpeed config and no `dtype=` argument: DeepSpeed 0.19.8
turns an explicit dtype into bf16 on CPUs whose accelerator reports no fp16 (megalm/training/precision.py),
so a test that passes `dtype=torch.float32` checks the machine, not the product."""
import pytest


def _zero3_build(precision: str, zero_init_dtype):
    import torch

    import deepspeed
    from megalm.config.run import load_run_config
    from megalm.model import GPTModel
    from megalm.parallel import destroy_process_grid, initialize_process_grid
    from megalm.training.deepspeed_config import build_deepspeed_config
    from megalm.training.precision import PrecisionError, check_parameter_dtypes, parameter_dtype
    from tests.train_fixtures import TINY_RUN

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # the pool's group, for DeepSpeed
    grid = initialize_process_grid(2, 1)
    try:
        cfg = load_run_config(TINY_RUN, ["parallel.tp=2", "parallel.zero_stage=3", f"train.precision={precision}",
                                         "data.train_paths=[unused]"])
        plain = dict(GPTModel(cfg.model, grid).named_parameters())
        kwargs = {} if zero_init_dtype is None else {"dtype": getattr(torch, zero_init_dtype)}
        with deepspeed.zero.Init(data_parallel_group=grid.dp_group, mpu=grid.mpu,
                                 config_dict_or_path=build_deepspeed_config(cfg, grid.dp), **kwargs):
            model = GPTModel(cfg.model, grid)
        try:
            check_parameter_dtypes(model, precision)
            error = None
        except PrecisionError as e:
            error = str(e)
        mismatched, dtypes = [], set()
        for name, p in model.named_parameters():
            assert hasattr(p, "ds_id") and p.numel() == 0, f"{name} was not partitioned at construction"
            with deepspeed.zero.GatheredParameters([p]):
                dtypes.add(str(p.dtype))
                want = plain[name].data.to(parameter_dtype(precision))
                if error is None and not torch.equal(p.data, want):
                    mismatched.append(name)
        return mismatched, sorted(dtypes), error
    finally:
        destroy_process_grid()


@pytest.mark.parametrize("precision,dtype", [("fp32", "torch.float32"), ("bf16", "torch.bfloat16")])
def test_zero3_init_partitions_at_construction_with_same_weights(rank_pool, precision, dtype):
    results = rank_pool(4).run(_zero3_build, precision, None, timeout=180)
    assert results == [([], [dtype], None)] * 4, results


def test_zero3_dtype_check_names_parameter_and_both_dtypes(rank_pool):
    """An explicit zero.Init dtype that disagrees with train.precision is caught at construction."""
    results = rank_pool(4).run(_zero3_build, "fp32", "bfloat16", timeout=180)
    for _, dtypes, error in results:
        assert dtypes == ["torch.bfloat16"]
        assert error is not None, "check_parameter_dtypes accepted bfloat16 parameters for train.precision=fp32"
        assert "train.precision=fp32" in error and "torch.float32" in error and "torch.bfloat16" in error
        assert "embedding.weight" in error and "zero.Init" in error, error
