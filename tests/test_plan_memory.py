"""The planner's memory model against measured peak tensor memory of real training steps on CPU.

Measured: the c10 CPU allocator's accounting through the profiler (megalm/plan/measure.py), i.e. the
peak bytes of live tensor storage over model build + 1-2 training steps, per rank. Predicted:
megalm/plan/memory.py with the CPU hardware profile (fp32, no reserve, no fragmentation margin).
Tiny model (0.2 M parameters, seq 256 so activations matter) and the 125m shape (134 M parameters;
seq 64, parameter/optimizer state dominated: it checks the ZeRO buffer terms). Each case runs in fresh
processes. The tiny ZeRO cases ran at seq 32 until the buckets were sized to the model: their whole peak
was then ~6 MiB, and the tracker's run-to-run spread under ZeRO-3 (5.8-7.5 MiB measured for the same
case, see the caveat below) was larger than the tolerance.

Measurement caveat (not a model error): the profiler does not see frees made on gloo's worker threads,
which sometimes drop the last reference to a communicated tensor. Under TP the tracked bytes therefore
drift upward by ~1 MiB per micro-batch and from run to run, while the live tensors (counted through
gc) stay constant over 20 steps. The tiny TP cases are measured over a single step, before the drift
matters; 125m at tp=2 over two (1 MiB is nothing there, and ZeRO-0's peak is reached in the second step)."""
from __future__ import annotations

import pytest

from megalm.config.model import load_model_config
from megalm.plan.layouts import Layout
from megalm.plan.measure import measure_training_peak
from megalm.plan.memory import Hardware, estimate_memory
from tests.harness import RankPool
from tests.train_fixtures import TINY_RUN

TOLERANCE = 0.15

CASES = [  # (model, seq, micro, global, tp, pp, dp, zero, activation checkpointing, steps measured)
    ("tiny", 256, 4, 8, 1, 1, 1, 0, False, 2),
    ("tiny", 256, 4, 8, 1, 2, 1, 0, False, 2),
    ("tiny", 256, 4, 8, 1, 1, 1, 0, True, 2),
    ("tiny", 256, 4, 4, 2, 1, 1, 0, False, 1),
    ("tiny", 256, 4, 4, 4, 1, 1, 0, False, 1),
    ("tiny", 256, 4, 8, 2, 2, 1, 0, False, 1),
    ("tiny", 256, 4, 8, 1, 1, 2, 1, False, 2),
    ("tiny", 256, 4, 8, 1, 1, 2, 3, False, 2),
    ("125m", 64, 1, 2, 1, 1, 1, 0, False, 2),
    ("125m", 64, 1, 2, 2, 1, 1, 0, False, 2),  # 2 steps: ZeRO-0's all-reduce copy meets the Adam state
    ("125m", 64, 1, 2, 1, 1, 2, 3, False, 2),
]
# ZeRO-2/3 x PP (one DeepSpeedEngine per stage, issue 11), with `parallel.pipeline_reshard` for ZeRO-3. The
# 125m pair is the memory must-show: (1,2,2,3) against (1,2,2,1), whose PipelineEngine terms the
# (1,2,2,2) case shares (bench/RESULTS.md has all four).
PIPELINE_CASES = [
    ("tiny", 256, 4, 16, 1, 2, 2, 3, False, 2, "per_microbatch"),
    ("125m", 64, 1, 4, 1, 2, 2, 3, False, 2, "per_step"),
    ("125m", 64, 1, 4, 1, 2, 2, 2, False, 2, "per_step"),
]
# parallel.grad_reduction=per_step (full gradients held across the step's micro-batches): ZeRO-3 at pp=1
# and ZeRO-2 x PP, 2 micro-batches per step
GRAD_REDUCTION_CASES = [
    ("tiny", 256, 4, 16, 1, 1, 2, 3, False, 2, "per_step", "per_step"),
    ("tiny", 256, 4, 16, 1, 2, 2, 2, False, 2, "per_step", "per_step"),
]
CASES = ([(*c, "per_step", "per_microbatch") for c in CASES] + [(*c, "per_microbatch") for c in PIPELINE_CASES]
         + GRAD_REDUCTION_CASES)


def _case_id(c) -> str:
    mode = ("-mbgather" if c[10] == "per_microbatch" else "") + ("-stepreduce" if c[11] == "per_step" else "")
    return f"{c[0]}-s{c[1]}-tp{c[4]}-pp{c[5]}-dp{c[6]}-z{c[7]}{mode}{'-ac' if c[8] else ''}"


@pytest.mark.parametrize("model,seq,mb,gb,tp,pp,dp,zero,ac,steps,reshard,reduction", CASES,
                         ids=[_case_id(c) for c in CASES])
def test_predicted_peak_within_15_percent_of_measured(model, seq, mb, gb, tp, pp, dp, zero, ac, steps, reshard,
                                                      reduction):
    overrides = [f"model={model}", f"data.seq_len={seq}", f"train.micro_batch_size={mb}",
                 f"train.global_batch_size={gb}", f"parallel.tp={tp}", f"parallel.pp={pp}",
                 f"parallel.zero_stage={zero}", f"train.activation_checkpointing={str(ac).lower()}",
                 f"parallel.pipeline_reshard={reshard}", f"parallel.grad_reduction={reduction}"]
    # A fresh pool, not the session's shared `rank_pool`: state left by earlier tests (DeepSpeed buffers, freed
    # tensors allocated before the tracker started) would shift what the tracker sees.
    with RankPool(tp * pp * dp) as pool:
        results = pool.run(measure_training_peak, TINY_RUN, overrides, steps, timeout=300)
    measured = max(r["peak_bytes"] for r in results)
    predicted = estimate_memory(load_model_config(model), Layout(tp, pp, dp, zero, mb, ac, reshard, reduction), seq, gb,
                                Hardware.cpu()).total
    err = predicted / measured - 1
    print(f"memory tp{tp} pp{pp} dp{dp} z{zero} {reshard} reduce {reduction}{' ac' if ac else ''} {model} seq {seq}: predicted "
          f"{predicted / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB ({err:+.1%})")
    assert abs(err) <= TOLERANCE, f"predicted {predicted / 2**20:.1f} MiB vs measured {measured / 2**20:.1f} MiB ({err:+.1%})"
