"""`megalm-reshard`: rewrite a checkpoint for another (tp, pp, dp, ZeRO) layout, so the run can resume
on a differently shaped cluster.

    megalm-reshard --checkpoint RUN_DIR [--step N] --output NEW_RUN_DIR --tp T --pp P
                   [--dp D] [--zero-stage Z] [--weights-only]

then: `python -m megalm.train --config NEW_RUN_DIR/config.yaml --resume auto` on T*P*D processes.

What it writes is a universal step (`megalm.export.universal`, DESIGN decision 48): every parameter's
full fp32 weight and Adam moments in safetensors files, plus the step count, LR schedule and counters.
One process reads the source step tensor by tensor straight from its shard files
(`megalm.export.shard_reader`: fp32 master weights and moments, files unmapped after each) and
appends each tensor to its file, so its memory is one tensor's worth whatever the model size, and no
engine is built. The first resume at the target layout fills its engine from it
(`megalm.training.elastic.load_universal`); any other layout may resume it too, and eval, export,
generation and init_from read it like any step. Its config.yaml and megalm.json carry the target
layout (validated here like a training config), the same step / consumed samples / data seed (so the
data order continues) and where it came from. --weights-only restarts the Adam moments (and warns: the
first steps after resuming then differ from the original run's). Started under torchrun/srun/mpirun,
rank 0 writes and the others wait (without --dp, the launched world is the target's).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import yaml

from megalm import rundir
from megalm.config import ConfigError
from megalm.config.run import RunConfig, run_config_from_dict
from megalm.training import launch_env

from .checkpoint_files import CheckpointError, CheckpointRef, list_checkpoints, locate_checkpoint
from .engine_writer import peak_rss_bytes
from .shard_reader import ShardReader
from .universal import universal_layout, write_universal

META_KEYS_SET_BY_SAVE = ("format_version", "step", "consumed_samples", "skipped_steps", "saved_at")


def target_config(ref: CheckpointRef, output: str, tp: int, pp: int, dp: Optional[int],
                  zero_stage: Optional[int], launched_world: int = 1) -> tuple[RunConfig, int]:
    """The source run's config at the new layout (validated like a training config); returns it and dp.
    `launched_world` > 1: the tool runs as that many ranks (torchrun/srun/mpirun); without --dp, that
    world is the target's."""
    source = ref.run_config()
    layout = ref.meta["layout"]
    data = source.to_dict()  # through the dict form, so the new layout is validated like a training config
    data["parallel"].update(tp=tp, pp=pp, zero_stage=source.parallel.zero_stage if zero_stage is None else zero_stage)
    data["train"]["run_dir"] = os.path.abspath(output)
    cfg = run_config_from_dict(data)  # ConfigError names the field (e.g. ZeRO>=2 with pp>1, heads vs tp)
    if dp is None and launched_world > 1 and launched_world % (tp * pp) == 0:  # launched as the target world
        dp = launched_world // (tp * pp)
    if dp is None:  # keep the world size when it divides, else the data-parallel size
        world = int(layout.get("world_size") or layout["tp"] * layout["pp"] * layout["dp"])
        dp = world // (tp * pp) if world % (tp * pp) == 0 else int(layout["dp"])
    if dp < 1:
        raise ConfigError(f"--dp: must be >= 1, got {dp}")
    cfg.train.gradient_accumulation_steps(dp)  # the global batch must still split over dp ranks
    return cfg, dp


def target_meta(ref: CheckpointRef, cfg: RunConfig, dp: int, kinds: tuple[str, ...]) -> dict:
    """megalm.json of the universal step: the source's fields, the target config and a universal layout."""
    meta = {k: v for k, v in ref.meta.items() if k not in META_KEYS_SET_BY_SAVE}
    meta["config"] = cfg.to_dict()
    meta["layout"] = universal_layout(kinds, cfg.parallel.tp, cfg.parallel.pp, dp, cfg.parallel.zero_stage)
    meta["resharded_from"] = {"checkpoint": ref.path, "layout": ref.meta["layout"]}
    return meta


@dataclass
class Resharded:
    path: str  # the new step directory
    peak_rss: int  # peak resident bytes of the process that wrote it


def reshard(checkpoint: str, output: str, tp: int, pp: int, dp: Optional[int] = None,
            zero_stage: Optional[int] = None, step: Optional[int] = None, weights_only: bool = False) -> Resharded:
    """Convert one checkpoint into a universal step made for (tp, pp, dp, zero_stage), in this process.
    Started as several ranks (torchrun/srun/mpirun, or inside a process group), rank 0 writes it and the
    others wait for it: one process streams the whole model, so no rank needs its share of it."""
    import torch.distributed as dist

    launch = launch_env.discover()
    launched = dist.get_world_size() if dist.is_initialized() else launch.world_size
    rank = dist.get_rank() if dist.is_initialized() else launch.rank
    ref = locate_checkpoint(checkpoint, step)
    cfg, dp = target_config(ref, output, tp, pp, dp, zero_stage, launched)
    if list_checkpoints(output):
        raise CheckpointError(f"{output} already holds checkpoints {list_checkpoints(output)}; write the "
                              f"resharded checkpoint to a new run directory")
    if weights_only:
        warnings.warn("--weights-only: Adam moments and the step count restart from zero at the new layout; "
                      "the loss curve will not continue exactly (expect a short bump while Adam re-warms)")
    reader = ShardReader(ref, with_optimizer=not weights_only)  # refuses unreadable optimizer state first
    if rank == 0:
        os.makedirs(output, exist_ok=True)
        write_universal(reader, output, target_meta(ref, cfg, dp, reader.kinds))
        rundir.write_atomic(rundir.config_file(output), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if dist.is_initialized():
        dist.barrier()  # the step and config.yaml are there on every rank's return
    elif rank != 0:
        return Resharded("", peak_rss_bytes())  # launched without a process group: rank 0 alone writes
    return Resharded(locate_checkpoint(output, ref.step).path, peak_rss_bytes())


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="megalm-reshard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="source RUN_DIR (or RUN_DIR/checkpoints/step_N)")
    p.add_argument("--step", type=int, default=None, help="source step (default: latest)")
    p.add_argument("--output", required=True, help="new run directory for the resharded checkpoint")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--pp", type=int, required=True)
    p.add_argument("--dp", type=int, default=None, help="default: keep the world size")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=None, help="default: the source's")
    p.add_argument("--weights-only", action="store_true", help="restart the optimizer state (with a warning)")
    args = p.parse_args(argv)
    try:
        done = reshard(args.checkpoint, args.output, args.tp, args.pp, args.dp, args.zero_stage, args.step,
                       args.weights_only)
    except (CheckpointError, ConfigError) as e:
        print(f"megalm-reshard: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if not done.path or (dist.is_initialized() and dist.get_rank() != 0):
        return 0  # a launched rank other than 0: rank 0 wrote and reports it
    layout = locate_checkpoint(done.path).meta["layout"]
    print(f"wrote {done.path} (universal: any layout resumes it)\npeak resident memory: {done.peak_rss / 2**30:.2f} "
          f"GiB\nresume with: torchrun --nproc_per_node={layout['world_size']} -m megalm.train "
          f"--config {rundir.config_file(args.output)} --resume auto")
    return 0

if __name__ == "__main__":
    sys.exit(main())
