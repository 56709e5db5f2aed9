"""What `train.precision` means for tensors, and the check that ZeRO-3 construction honoured it.

Why the check exists: `deepspeed.zero.Init` casts every parameter it partitions, and DeepSpeed 0.19.8
picks that dtype with `dtype or torch.float16 if accel.is_fp16_supported() else torch.bfloat16 if
accel.is_bf16_supported else torch.float32` (`InsertPostInitMethodToModuleSubClasses._set_dtype`). The
conditional binds looser than `or`, so an explicit `dtype=torch.float32` on a CPU whose accelerator
reports no fp16 (AMD EPYC with avx512_bf16) silently becomes bfloat16. The trainer passes the DeepSpeed
config instead of `dtype`, which takes the config's precision, and then checks the result here, so no
future change of either side can train in a dtype nobody asked for.
"""
from __future__ import annotations

import torch

PARAMETER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(RuntimeError):
    """Parameters do not have the dtype that `train.precision` asks for."""


def parameter_dtype(precision: str) -> torch.dtype:
    """The dtype DeepSpeed keeps the model's (ZeRO-3: partitioned) parameters in for `precision`."""
    return PARAMETER_DTYPES[precision]


def check_parameter_dtypes(model: torch.nn.Module, precision: str) -> None:
    """Raise PrecisionError naming the first parameters whose dtype (or ZeRO-3 partition's) is wrong."""
    want = parameter_dtype(precision)
    wrong = []
    for name, p in model.named_parameters():
        partition = getattr(p, "ds_tensor", None)
        got = partition.dtype if partition is not None else p.dtype
        if got != want:
            wrong.append(f"{name}: {got}")
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else "")
        raise PrecisionError(
            f"train.precision={precision} asks for {want} parameters, but after construction under "
            f"deepspeed.zero.Init {len(wrong)} parameter(s) have another dtype: {shown}. Cause: zero.Init was "
            f"given a dtype (or a config) that disagrees with train.precision; DeepSpeed 0.19.8 turns an "
            f"explicit dtype into bf16/fp16 on accelerators that report no fp16. Build under zero.Init with "
            f"the run's DeepSpeed config and no `dtype=` argument.")
