"""Writing a universal (layout-free) step: what `megalm-reshard` produces (DESIGN decision 48).

Why: a step DeepSpeed saved holds the model cut for its layout (TP shards, pipeline layers, ZeRO's
flat partitions). Rewriting it as another layout's DeepSpeed files means building that layout's engine,
whose ranks each hold their whole share of the weights and Adam moments (12 bytes a parameter for the
one rank of (1,1,1,0)). A universal step instead holds every parameter's full fp32 weight and moments
under its GPTModel name, one safetensors file per kind (names and rules: `megalm.ckpt_files`), so it
is written by one process, tensor by tensor, in the memory of one tensor, and any layout resumes it:
`megalm.training.elastic.load_universal` fills the engine training builds anyway (the same
`apply_checkpoint` the engine-based reshard used), and `ShardReader` reads it for eval, export,
generation and init_from like any other step. This is Megatron's dist_ckpt / torchtitan's DCP idea
(reshard at load time) and DeepSpeed's universal checkpoint's content (fp32 + exp_avg + exp_avg_sq per
parameter), in safetensors so nothing in it can run code and a truncated copy is found before a load.

The step is published like a training save (`step_N.tmp`, megalm.json last, fsync, rename, `latest`:
`megalm.training.checkpoint.publish_step`), so a crash leaves no half-written step behind.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterator

import torch

from megalm.ckpt_files import UNIVERSAL_STATE_FILE, universal_tensor_file
from megalm.rundir import checkpoint_root, tmp_tag_for
from megalm.training.checkpoint import TrainState, publish_step

from .safetensors_out import TensorSpec, write_safetensors_stream
from .shard_reader import ShardReader

ONE_FILE = 2**62  # every tensor of a kind in one safetensors file, however large the model


def _one_kind(reader: ShardReader, kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter's full tensor of `kind` in fp32, one at a time, the files unmapped after each."""
    for name in reader.names:
        tensor = reader.state(name, (kind,))[kind].to(torch.float32)
        reader.close()
        yield name, tensor
        del tensor


def write_universal(reader: ShardReader, run_dir: str, meta: dict) -> str:
    """Write `reader`'s step (its weights, and its Adam moments, step count, LR schedule and engine
    counters when it was made with_optimizer) as RUN_DIR/checkpoints/step_N with megalm.json `meta`
    (whose layout names the kinds: `universal_layout`). Returns the step directory. One pass over the
    source per kind, so at most one full tensor (and the file pages it was read from) is resident."""
    ref = reader.ref
    root = checkpoint_root(run_dir)
    tmp = os.path.join(root, tmp_tag_for(ref.step))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    specs = [TensorSpec(name, reader.shapes[name], torch.float32) for name in reader.names]
    for kind in reader.kinds:
        write_safetensors_stream(tmp, specs, _one_kind(reader, kind), ONE_FILE, universal_tensor_file(kind))
    torch.save({"adam_step": reader.adam_step() if reader.with_optimizer else None,
                "engine_state": reader.engine_state()}, os.path.join(tmp, UNIVERSAL_STATE_FILE))
    state = TrainState(step=ref.step, consumed_samples=int(ref.meta["consumed_samples"]),
                       skipped_steps=int(ref.meta.get("skipped_steps", 0)))
    return publish_step(root, state, meta, keep_last=10**9)


def universal_layout(kinds: tuple[str, ...], tp: int, pp: int, dp: int, zero_stage: int) -> dict:
    """megalm.json's layout of a universal step made for (tp, pp, dp, zero_stage): any layout loads it."""
    return {"universal": list(kinds), "tp": tp, "pp": pp, "dp": dp, "zero_stage": zero_stage,
            "world_size": tp * pp * dp}
