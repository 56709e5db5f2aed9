"""How many elements DeepSpeed's ZeRO communication buckets hold: one rule, used by the DeepSpeed config
the trainer generates (`megalm.training.deepspeed_config`) and by the planner's memory model
(`megalm.plan.memory`), so the plan predicts the buffers the run allocates.

DeepSpeed's defaults (reduce_bucket_size and allgather_bucket_size, 5e8 elements)
are allocated whole: a ZeRO-1 run of a 0.2 M-parameter model held a 1.9 GB fp32 reduce bucket per rank.
A bucket never needs more elements than the gradients it reduces, so ours is the smaller of DeepSpeed's
default and the parameters of one tensor-parallel shard of the model (an upper bound for any pipeline
stage, and never below the largest parameter, which a bucket must hold whole). Models past 5e8
parameters per TP shard get DeepSpeed's defaults unchanged; `train.deepspeed_config` may still set any
of these keys (the planner then still assumes this rule).
"""
from __future__ import annotations

import math

from .model import ModelConfig

DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size / allgather_bucket_size default


def zero_bucket_elements(model: ModelConfig, tp: int) -> int:
    """reduce/allgather bucket elements for a model split over `tp` tensor-parallel ranks."""
    return max(1, min(DEEPSPEED_BUCKET, math.ceil(model.num_parameters() / tp)))
