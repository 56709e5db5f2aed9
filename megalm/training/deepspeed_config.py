"""The DeepSpeed config dict generated from a RunConfig; `train.deepspeed_config` adds tuning fields on
top, after `megalm.config.deepspeed_overrides` has refused those that contradict the run config."""
from __future__ import annotations

import copy

from megalm.config.deepspeed_overrides import check_deepspeed_overrides
from megalm.config.run import RunConfig
from megalm.config.zero_buckets import zero_bucket_elements
from megalm.model.transformer import TransformerBlock

from .optimizer import uses_guarded_optimizer


# DeepSpeed matches leaf classes by fully qualified name (deepspeed.utils.z3_leaf_module).
ZERO3_GATHER_UNIT = f"{TransformerBlock.__module__}.{TransformerBlock.__qualname__}"


def _deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_deepspeed_config(cfg: RunConfig, dp: int) -> dict:
    t = cfg.train
    accum = t.gradient_accumulation_steps(dp)
    ds: dict = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        # fp32 ZeRO-0: GuardedAdamW clips (and reports the norm); DeepSpeed would clip silently.
        "gradient_clipping": 0.0 if uses_guarded_optimizer(t, cfg.parallel.zero_stage) else t.grad_clip,
        "steps_per_print": 10**9,  # our loop logs; DeepSpeed's own step print is noise
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "checkpoint": {"tag_validation": "FAIL"},
    }
    zero = cfg.parallel.zero_stage
    if zero >= 1:
        # Buckets sized to the model (megalm.config.zero_buckets): DeepSpeed's 5e8-element defaults are
        # allocated whole, ~1.9 GB per rank even for a tiny model.
        bucket = zero_bucket_elements(cfg.model, cfg.parallel.tp)
        ds["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
    if zero >= 2:
        ds["zero_optimization"].update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True)
    if zero == 3:
        # One ZeRO-3 gather unit per TransformerBlock, as torchtitan applies FSDP2 per block: DeepSpeed
        # gathers, releases and reduces a leaf module's parameters together and installs no hooks on its
        # submodules, which cut the per-module Python bookkeeping (ten modules per block) that was the gap
        # to HF + DeepSpeed and to PipelineEngine ZeRO-1 on CPU (DESIGN decision 53, bench/RESULTS.md).
        ds["zero_optimization"]["leaf_module"] = {"classes": [ZERO3_GATHER_UNIT]}
    if zero == 3 and cfg.parallel.pp > 1:
        # ZeRO-3 x PP (one engine per stage, our 1F1B): every parameter partitioned and gathered on use, no
        # prefetch. ZeRO-3's trace-based prefetch assumes one forward then one backward per step, which
        # 1F1B's interleaving breaks (DeepSpeed #6870, #5033; DESIGN decision 49). At pp=1 DeepSpeed's
        # defaults stand (parameters under 1e5 elements kept whole, 5e7-element prefetch): 1.4x faster on
        # 125m than without them (bench/RESULTS.md), bitwise resume unchanged (test_elastic_resume).
        ds["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    if t.precision == "bf16":
        # Under pipeline parallelism gradients must accumulate in fp32 (DESIGN decision 5).
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    elif t.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                      "hysteresis": 2, "min_loss_scale": 1}
    if t.activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    # Checked again here (not only in check_launch): tools and benchmarks build engines directly.
    user = check_deepspeed_overrides(t, cfg.parallel.zero_stage, dp)
    return _deep_merge(ds, user) if user else ds
