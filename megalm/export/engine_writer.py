"""Writing a checkpoint at a layout through that layout's own DeepSpeed engine: how `megalm-import`
saves its step 0 (DESIGN decision 42).

T*P*D local CPU processes (gloo) each build the target layout's engine (`build_engine`, exactly what
training at that layout builds), load a layout-free FullState into it (`engine_state.apply_full_state`)
and save it through training's own atomic checkpoint writer, so DeepSpeed writes its own formats.
`megalm-reshard` does not come here any more: it writes a universal step (`megalm.export.universal`),
which needs no engine and no rank holding its share of the model.
"""
from __future__ import annotations

import os
import resource

import torch

from megalm.config.run import RunConfig, run_config_from_dict
from megalm.training.launch_env import free_port

from .checkpoint_files import CheckpointError, CheckpointRef
from .consolidate import FullState

SCRATCH = ".import-state.pt"  # the FullState handed to the workers (megalm-import's converted weights)


def save_in_engine(state_file: str, cfg: RunConfig, meta: dict, weights_only: bool) -> str:
    """Collective over an initialised default process group of size tp*pp*dp: build the target
    engine, load the FullState saved at `state_file` into it and save it as RUN_DIR/checkpoints/step_N.
    Returns that directory."""
    import deepspeed
    import torch.distributed as dist

    from megalm.parallel.grid import destroy_process_grid, initialize_process_grid
    from megalm.training import checkpoint as ckpt
    from megalm.training.engine import build_engine

    from .engine_state import apply_full_state

    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    grid = initialize_process_grid(cfg.parallel.tp, cfg.parallel.pp)
    try:
        torch.manual_seed(cfg.train.seed)
        engine = build_engine(cfg, grid)
        state = load_state(state_file)
        src = state.ref.meta
        apply_full_state(engine, state, weights_only)
        del state
        train_state = ckpt.TrainState(step=int(src["step"]), consumed_samples=int(src["consumed_samples"]),
                                      skipped_steps=int(src.get("skipped_steps", 0)))
        written = ckpt.save_checkpoint(engine.ds, cfg.train.run_dir, train_state, meta, keep_last=10**9)
        engine.close()
        return written
    finally:
        destroy_process_grid()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(local_rank: int, world: int, port: int, state_file: str, cfg_dict: dict, meta: dict,
            weights_only: bool, peaks) -> None:
    """One spawned rank of the target layout (CPU, gloo); reports its peak resident memory on `peaks`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank),
                      LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu",
                      CUDA_VISIBLE_DEVICES="")
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=local_rank, world_size=world)
    try:
        save_in_engine(state_file, run_config_from_dict(cfg_dict), meta, weights_only)
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


def run_workers(state_file: str, cfg: RunConfig, meta: dict, weights_only: bool, world: int) -> list[int]:
    """`world` local CPU ranks (gloo) run `save_in_engine` on `state_file`; returns each rank's peak
    resident bytes. A CheckpointError or ConfigError raised on a rank is raised here with its message."""
    peaks = torch.multiprocessing.get_context("spawn").SimpleQueue()
    try:
        torch.multiprocessing.start_processes(_worker, args=(world, free_port(), state_file, cfg.to_dict(), meta,
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
    local CPU ranks each load it from a scratch file there and run `save_in_engine`."""
    scratch = os.path.join(cfg.train.run_dir, SCRATCH)
    dump_state(state, scratch)
    try:
        run_workers(scratch, cfg, meta, weights_only, world)
    finally:
        os.unlink(scratch)
