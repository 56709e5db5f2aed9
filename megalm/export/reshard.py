"""`megalm-reshard`: rewrite a checkpoint for another (tp, pp, dp, ZeRO) layout, so the run can resume
on a differently shaped cluster.

    megalm-reshard --checkpoint RUN_DIR [--step N] --output NEW_RUN_DIR --tp T --pp P
                   [--dp D] [--zero-stage Z] [--weights-only]

then: `python -m megalm.train --config NEW_RUN_DIR/config.yaml --resume auto` on T*P*D processes.

Started plainly, it spawns the T*P*D target ranks on this host; started as those ranks (torchrun
--nproc_per_node, srun -n, mpirun, across nodes), each rank writes its own part, so no host needs
more than its own ranks' share of the model and optimizer state.

How: T*P*D local CPU processes (gloo) each build the target layout's engine, read the source step
tensor by tensor straight from its shard files (`megalm.export.shard_reader`: fp32 master weights and
Adam moments, one full tensor at a time, files unmapped after each), keep their own slice
(`megalm.export.engine_state.apply_checkpoint`) and save through the training code's own atomic
checkpoint writer. Nothing is consolidated: the parent process holds no tensor, and each rank holds
its share of the target layout plus one full tensor (the largest: the embedding), whatever the
model size. The new megalm.json records the new layout, the same step / consumed samples /
data seed (so the data order continues), and where it came from. --weights-only restarts the Adam
moments (and warns: the first steps after resuming then differ from the original run's).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import yaml

from megalm.config import ConfigError
from megalm import rundir
from megalm.config.run import RunConfig, run_config_from_dict
from megalm.training import launch_env
from megalm.training.launch_env import free_port

from .checkpoint_files import CheckpointError, CheckpointRef, list_checkpoints, locate_checkpoint
from .consolidate import FullState
from .shard_reader import ShardReader

SCRATCH = ".reshard-state.pt"  # a FullState handed to the workers (megalm-import's converted weights)
META_KEYS_SET_BY_SAVE = ("format_version", "step", "consumed_samples", "skipped_steps", "saved_at")


def target_config(ref: CheckpointRef, output: str, tp: int, pp: int, dp: Optional[int],
                  zero_stage: Optional[int], launched_world: int = 1) -> tuple[RunConfig, int]:
    """The source run's config at the new layout (validated like a training config); returns it and dp.
    `launched_world` > 1: the tool runs as that many ranks (torchrun/srun/mpirun), which must be the
    target's world."""
    source = ref.run_config()
    layout = ref.meta["layout"]
    data = source.to_dict()  # through the dict form, so the new layout is validated like a training config
    data["parallel"].update(tp=tp, pp=pp, zero_stage=source.parallel.zero_stage if zero_stage is None else zero_stage)
    data["train"]["run_dir"] = os.path.abspath(output)
    cfg = run_config_from_dict(data)  # ConfigError names the field (e.g. ZeRO>=2 with pp>1, heads vs tp)
    if dp is None and launched_world > 1:  # launched as the target world: its size says dp
        dp = launched_world // (tp * pp)
    if dp is None:  # keep the world size when it divides, else the data-parallel size
        world = int(layout.get("world_size") or layout["tp"] * layout["pp"] * layout["dp"])
        dp = world // (tp * pp) if world % (tp * pp) == 0 else int(layout["dp"])
    if dp < 1:
        raise ConfigError(f"--dp: must be >= 1, got {dp}")
    if launched_world > 1 and launched_world != tp * pp * dp:
        raise ConfigError(f"--tp {tp} --pp {pp} --dp {dp}: the target layout has {tp * pp * dp} ranks but this launch "
                          f"started {launched_world} processes; launch megalm-reshard with "
                          f"--nproc_per_node={tp * pp * dp} (or srun -n {tp * pp * dp}), or without a launcher")
    cfg.train.gradient_accumulation_steps(dp)  # the global batch must still split over dp ranks
    return cfg, dp


def target_meta(ref: CheckpointRef, cfg: RunConfig, dp: int) -> dict:
    meta = {k: v for k, v in ref.meta.items() if k not in META_KEYS_SET_BY_SAVE}
    meta["config"] = cfg.to_dict()
    meta["layout"] = {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "dp": dp,
                      "zero_stage": cfg.parallel.zero_stage, "world_size": cfg.parallel.tp * cfg.parallel.pp * dp}
    meta["resharded_from"] = {"checkpoint": ref.path, "layout": ref.meta["layout"]}
    return meta


def save_resharded(source: dict, cfg: RunConfig, meta: dict, weights_only: bool) -> str:
    """Collective over an initialised default process group of size tp*pp*dp: build the target
    engine, load the source into it and save it as RUN_DIR/checkpoints/step_N. Returns that directory.
    `source`: {"checkpoint": step directory} (read tensor by tensor) or {"state": FullState file}."""
    import deepspeed
    import torch.distributed as dist

    from megalm.parallel.grid import destroy_process_grid, initialize_process_grid
    from megalm.training import checkpoint as ckpt
    from megalm.training.engine import build_engine

    from .engine_state import apply_checkpoint, apply_full_state

    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    grid = initialize_process_grid(cfg.parallel.tp, cfg.parallel.pp)
    try:
        torch.manual_seed(cfg.train.seed)
        engine = build_engine(cfg, grid)
        if "checkpoint" in source:
            ref = locate_checkpoint(source["checkpoint"])
            apply_checkpoint(engine, ShardReader(ref, with_optimizer=not weights_only))
        else:
            state = load_state(source["state"])
            ref = state.ref
            apply_full_state(engine, state, weights_only)
            del state
        src = ref.meta
        train_state = ckpt.TrainState(step=int(src["step"]), consumed_samples=int(src["consumed_samples"]),
                                      skipped_steps=int(src.get("skipped_steps", 0)))
        return ckpt.save_checkpoint(engine.ds, cfg.train.run_dir, train_state, meta, keep_last=10**9)
    finally:
        destroy_process_grid()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(local_rank: int, world: int, port: int, source: dict, cfg_dict: dict, meta: dict,
            weights_only: bool, peaks) -> None:
    """One spawned rank of the target layout (CPU, gloo); reports its peak resident memory on `peaks`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu",
                      CUDA_VISIBLE_DEVICES="")
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=local_rank, world_size=world)
    try:
        save_resharded(source, run_config_from_dict(cfg_dict), meta, weights_only)
    finally:
        dist.destroy_process_group()
    peaks.put((local_rank, peak_rss_bytes()))


def dump_state(state: FullState, path: str) -> None:
    torch.save({"weights": state.weights, "moments": state.moments, "adam_step": state.adam_step,
                "engine_state": state.engine_state, "model": state.ref.meta["model"],
                "root": state.ref.root, "tag": state.ref.tag, "meta": state.ref.meta}, path)


def load_state(path: str) -> FullState:
    from megalm.export.consolidate import model_config_of

    d = torch.load(path, map_location="cpu", weights_only=True)
    ref = CheckpointRef(root=d["root"], tag=d["tag"], meta=d["meta"])
    return FullState(cfg=model_config_of(d["meta"], path), weights=d["weights"], ref=ref, moments=d["moments"],
                     adam_step=d["adam_step"], engine_state=d["engine_state"])


def run_workers(source: dict, cfg: RunConfig, meta: dict, weights_only: bool, world: int) -> list[int]:
    """`world` local CPU ranks (gloo) run `save_resharded` on `source`; returns each rank's peak resident
    bytes. A CheckpointError or ConfigError raised on a rank is raised here with its message."""
    peaks = torch.multiprocessing.get_context("spawn").SimpleQueue()
    try:
        torch.multiprocessing.start_processes(_worker, args=(world, free_port(), source, cfg.to_dict(), meta,
                                                             weights_only, peaks),
                                              nprocs=world, join=True, start_method="spawn")
    except torch.multiprocessing.ProcessRaisedException as e:
        last = str(e).strip().splitlines()[-1]
        for kind in ("CheckpointError", "ConfigError"):
            marker = f"{kind}: "
            if marker in last:
                raise CheckpointError(last.split(marker, 1)[1]) from None
        raise
    by_rank = dict(peaks.get() for _ in range(world))
    return [by_rank[r] for r in range(world)]


def save_with_workers(state: FullState, cfg: RunConfig, meta: dict, weights_only: bool, world: int) -> None:
    """Write `state` as a checkpoint of cfg's layout into cfg.train.run_dir (which must exist): `world`
    local CPU ranks each load it from a scratch file there and run `save_resharded`."""
    scratch = os.path.join(cfg.train.run_dir, SCRATCH)
    dump_state(state, scratch)
    try:
        run_workers({"state": scratch}, cfg, meta, weights_only, world)
    finally:
        os.unlink(scratch)


@dataclass
class Resharded:
    path: str  # the new step directory
    rank_peak_rss: list[int]  # peak resident bytes of each target rank that wrote it


def save_as_launched(source: dict, cfg: RunConfig, meta: dict, weights_only: bool,
                     launch: launch_env.LaunchEnv) -> list[int]:
    """This process is one rank of the target world (torchrun, srun, mpirun, or a caller's process group):
    write its part of the checkpoint; returns every rank's peak resident bytes. Each node then holds only
    its own ranks' shares, so a model larger than one host reshards on the nodes that will train it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        launch_env.export(launch)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the tested path: the state is written from host memory
        dist.init_process_group("gloo")
    os.makedirs(cfg.train.run_dir, exist_ok=True)
    save_resharded(source, cfg, meta, weights_only)
    from megalm.parallel.device import gather_objects

    return [int(p) for p in gather_objects(peak_rss_bytes())]


def reshard(checkpoint: str, output: str, tp: int, pp: int, dp: Optional[int] = None,
            zero_stage: Optional[int] = None, step: Optional[int] = None, weights_only: bool = False) -> Resharded:
    """Convert one checkpoint. In a plain process it spawns the target world's ranks locally; started as
    the target world itself (torchrun/srun/mpirun, or inside a process group) each rank writes its part."""
    import torch.distributed as dist

    launch = launch_env.discover()
    launched = dist.get_world_size() if dist.is_initialized() else launch.world_size
    ref = locate_checkpoint(checkpoint, step)
    cfg, dp = target_config(ref, output, tp, pp, dp, zero_stage, launched)
    if list_checkpoints(output):
        raise CheckpointError(f"{output} already holds checkpoints {list_checkpoints(output)}; write the "
                              f"resharded checkpoint to a new run directory")
    if weights_only:
        warnings.warn("--weights-only: Adam moments and the step count restart from zero at the new layout; "
                      "the loss curve will not continue exactly (expect a short bump while Adam re-warms)")
    ShardReader(ref, with_optimizer=not weights_only)  # refuses unreadable optimizer state before any rank starts
    meta = target_meta(ref, cfg, dp)
    if launched > 1:
        peaks = save_as_launched({"checkpoint": ref.path}, cfg, meta, weights_only, launch)
    else:
        os.makedirs(output, exist_ok=True)
        peaks = run_workers({"checkpoint": ref.path}, cfg, meta, weights_only, world=tp * pp * dp)
    if launched == 1 or dist.get_rank() == 0:
        with open(rundir.config_file(output), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    if launched > 1:
        dist.barrier()  # config.yaml is there on every rank's return
    return Resharded(locate_checkpoint(output, ref.step).path, peaks)


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

    if dist.is_initialized() and dist.get_rank() != 0:
        return 0
    world = locate_checkpoint(done.path).meta["layout"]["world_size"]
    peaks = "/".join(f"{b / 2**30:.2f}" for b in done.rank_peak_rss)
    print(f"wrote {done.path}\npeak resident memory: this process {peak_rss_bytes() / 2**30:.2f} GiB, target ranks "
          f"{peaks} GiB\nresume with: torchrun --nproc_per_node={world} -m megalm.train "
          f"--config {rundir.config_file(args.output)} --resume auto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
