"""The training loop: data -> engine steps -> metrics, validation, checkpoints, signals.

Everything a step consumes is a function of (seed, consumed samples), so a run resumed from a
checkpoint at step k sees exactly the batches the uninterrupted run saw from k on (DESIGN decision 8).
"""
from __future__ import annotations

import datetime
import hashlib
import math
import os
import time
from typing import Optional

import deepspeed
import torch
import torch.distributed as dist
import yaml

from megalm import rundir
from megalm.ckpt_files import universal_kinds
from megalm.config.run import RunConfig
from megalm.data import build_datasets, micro_batches_for_step
from megalm.model.flops import flops_per_token
from megalm.parallel.cross_entropy import perplexity
from megalm.parallel.device import any_rank, dist_backend, gather_objects, select_device
from megalm.parallel.grid import destroy_process_grid, initialize_process_grid
from megalm.parallel.init import INIT_STREAM

from . import checkpoint as ckpt
from . import elastic
from . import init_from
from . import resume as resume_rules
from .engine import Engine, build_engine
from .faults import act, nan_at, parse_faults, stop_after
from .launch_env import LaunchEnv
from .metrics import Heartbeat, MetricsLogger, peak_memory_gib
from .signals import StopRequest, stack_file

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)


def file_sha256(path: Optional[str]) -> Optional[str]:
    if not path:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_meta(cfg: RunConfig, engine: Engine, world_size: int) -> dict:
    d = cfg.to_dict()
    return {
        "config": d,
        "model": d["model"],
        "layout": {"tp": engine.grid.tp, "pp": engine.grid.pp, "dp": engine.grid.dp,
                   "zero_stage": cfg.parallel.zero_stage, "world_size": world_size},
        "data_seed": cfg.data.seed,
        "tokenizer_sha256": file_sha256(cfg.data.tokenizer),
        "init_stream": INIT_STREAM,  # the numbers model.init_seed drew at step 0, unless train.init_from (parallel/init.py)
        "deepspeed_version": deepspeed.__version__,
        "torch_version": torch.__version__,
    }


def _global_sample_ids(batches: list[tuple], dp_rank: int) -> list[int]:
    """Collective: the dataset indices of this step's global batch, sorted (each data-parallel rank's
    micro-batches once; TP and pipeline peers read the same ones)."""
    per_rank = gather_objects((dp_rank, [i for b in batches for i in b[2]]))
    return sorted(i for ids in dict(per_rank).values() for i in ids)


def train(cfg: RunConfig, launch: LaunchEnv, resume: Optional[str] = None, stack_dump: bool = True) -> int:
    """Run training to `train.train_steps`; returns the process exit code (0 also after a signal stop,
    2 when another live run holds the run directory: megalm/runlock.py)."""
    import sys  # local: this edit is kept to train()'s head while others change the rest of the file

    from megalm import runlock

    # Bad layout/batch/paths fail before any process group; a resume at another data-parallel size is
    # checked first, so a world its global batch cannot split over is told which world sizes can.
    resume_rules.check_resume_layout(cfg, launch.world_size, resume)
    accum = cfg.check_launch(launch.world_size)
    device = select_device(launch.local_rank)
    deepspeed.init_distributed(dist_backend=dist_backend(), auto_mpi_discovery=False, timeout=PROCESS_GROUP_TIMEOUT,
                               init_method="env://", rank=launch.rank, world_size=launch.world_size)
    rank = dist.get_rank()
    # Before anything is written into the run dir (stack files, config.yaml, metrics.jsonl): a second
    # run there would interleave metrics and race the first one's checkpoints. Rank 0 takes the lock,
    # any_rank tells every rank the outcome (so none hangs in a later collective), and it is released
    # however _train ends (return, signal stop, exception).
    try:
        with runlock.hold(cfg.train.run_dir, rank == 0, any_rank, log=lambda m: print(m, flush=True)):
            return _train(cfg, launch, resume, stack_dump, accum, device, rank)
    except runlock.RunDirInUse as e:
        if rank == 0:
            print(f"megalm-train: {e}", file=sys.stderr, flush=True)
        return 2  # never restarted by `megalm-launch run` (its --no-restart-codes default)


def _train(cfg: RunConfig, launch: LaunchEnv, resume: Optional[str], stack_dump: bool, accum: int,
           device: torch.device, rank: int) -> int:
    t = cfg.train
    stop = StopRequest()
    stop.install(stack_file(t.run_dir, rank) if stack_dump else None)
    faults = parse_faults()
    grid = initialize_process_grid(cfg.parallel.tp, cfg.parallel.pp)
    os.makedirs(t.run_dir, exist_ok=True)
    if rank == 0:
        ckpt.remove_stale_tmp(ckpt.checkpoint_root(t.run_dir))
        with open(rundir.config_file(t.run_dir), "w") as f:
            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    dist.barrier()

    torch.manual_seed(t.seed)
    samples_per_step = t.global_batch_size
    # The resume rules (megalm/training/resume.py) are checked before the datasets and the engine are
    # built: a refused change fails fast, and an allowed batch change needs a longer sample index.
    point = resume_rules.find_resume_point(t.run_dir, resume)
    changes = resume_rules.resume_changes(point, cfg, file_sha256(cfg.data.tokenizer)) if point else []
    elastic_change = resume_rules.check_layout(point, cfg, launch.world_size) if point else None
    if elastic_change is not None:
        changes = resume_rules.record_elastic_change(changes, point, elastic_change)
    source = init_from.prepare(cfg, point, file_sha256(cfg.data.tokenizer))  # only when starting fresh
    train_ds, valid_ds, _ = build_datasets(cfg.data, train_samples=resume_rules.train_samples_needed(point, t),
                                           valid_samples=t.eval_iters * samples_per_step if t.eval_interval else 0,
                                           test_samples=0)
    engine = build_engine(cfg, grid, device)
    meta = checkpoint_meta(cfg, engine, launch.world_size)
    init_from.record(meta, source, point)
    state = ckpt.TrainState()
    if point is not None:
        meta["resume_changes"] = changes
        state = ckpt.load_checkpoint(engine.ds, t.run_dir, point.tag, meta,
                                     load_at_new_dp=lambda step_dir, saved: elastic.load_at_new_dp(engine, step_dir, saved))
        resume_rules.override_schedule(engine.ds, t)  # the schedule is the current config's
        if rank == 0:
            print(f"resumed from step {state.step} ({state.consumed_samples} samples consumed)", flush=True)
            if universal_kinds(point.meta.get("layout")):
                print(f"loaded megalm-reshard's universal step into (tp, pp, dp, zero) = ({grid.tp}, {grid.pp}, "
                      f"{grid.dp}, {cfg.parallel.zero_stage}); the next save is this layout's", flush=True)
        if elastic_change is not None:
            elastic.record_elastic_resume(t.run_dir, state.step, elastic_change.old, elastic_change.new,
                                          elastic_change.old_accumulation, elastic_change.new_accumulation)
            if rank == 0:
                print(f"elastic resume: data-parallel size {elastic_change.old.get('dp')} -> "
                      f"{elastic_change.new['dp']}, gradient accumulation {elastic_change.old_accumulation} -> "
                      f"{elastic_change.new_accumulation} (global batch {t.global_batch_size} kept)", flush=True)
    elif source is not None:
        init_from.load_weights(engine, source, cfg)

    logger = MetricsLogger(t.run_dir, enabled=rank == 0, tensorboard=t.tensorboard)
    heartbeat = Heartbeat(t.run_dir, enabled=rank == 0)
    tokens_per_step = samples_per_step * cfg.data.seq_len
    flops_step = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
    batch_args = dict(micro_batch_size=t.micro_batch_size, accumulation_steps=accum,
                      dp_rank=grid.dp_rank, dp_size=grid.dp)
    consecutive_bad = 0
    interval_start, interval_steps = time.perf_counter(), 0
    exit_code = 0

    start_step = state.step

    def save() -> None:
        ckpt.save_checkpoint(engine.ds, t.run_dir, state, meta, t.keep_last)

    while state.step < t.train_steps:
        act(faults, state.step, rank)
        heartbeat.beat(state.step)
        batches = micro_batches_for_step(train_ds, consumed_samples=state.consumed_samples,
                                         with_indices=t.log_sample_ids, **batch_args)
        if t.log_sample_ids:
            logger.record(state.step + 1, "samples", {"sample_ids": _global_sample_ids(batches, grid.dp_rank)})
            batches = [b[:2] for b in batches]
        loss = engine.train_step(batches, poison=nan_at(faults, state.step + 1))  # logged as step + 1
        grad_norm = engine.grad_norm()
        state.step += 1
        state.consumed_samples += samples_per_step
        interval_steps += 1
        if math.isfinite(loss) and engine.last_update_skipped:
            # fp16 loss scaling: DeepSpeed found inf/nan gradients, lowered the scale and skipped the
            # update (and the LR step). Expected while the scale settles; counted, not a divergence.
            state.skipped_steps += 1
            if rank == 0:
                print(f"step {state.step}: gradient overflow at loss scale; update skipped, scale lowered "
                      f"({state.skipped_steps} skipped in total)", flush=True)
        elif math.isfinite(loss) and math.isfinite(grad_norm):
            consecutive_bad = 0
        else:
            state.skipped_steps += 1
            consecutive_bad += 1
            if rank == 0:
                print(f"step {state.step}: non-finite loss {loss} / grad norm {grad_norm}; update skipped "
                      f"({consecutive_bad} in a row, {state.skipped_steps} in total)", flush=True)
            if consecutive_bad >= t.max_consecutive_nonfinite:
                if rank == 0:
                    print(f"stopping: {consecutive_bad} non-finite steps in a row "
                          f"(train.max_consecutive_nonfinite={t.max_consecutive_nonfinite})", flush=True)
                exit_code = 3
                break
        if state.step % t.log_interval == 0 or state.step == t.train_steps:
            elapsed = time.perf_counter() - interval_start
            step_time = elapsed / interval_steps
            tflops = flops_step / step_time / launch.world_size / 1e12
            values = {"loss": loss, "lr": engine.lr(), "grad_norm": grad_norm, "step_time_s": step_time,
                      "tokens_per_s": tokens_per_step / step_time, "tflops_per_device": tflops,
                      "consumed_samples": state.consumed_samples, "skipped_steps": state.skipped_steps,
                      "peak_mem_gib": peak_memory_gib()}
            if t.peak_tflops:
                values["mfu"] = tflops / t.peak_tflops
            logger.log(state.step, values)
            interval_start, interval_steps = time.perf_counter(), 0
        if valid_ds is not None and t.eval_interval and state.step % t.eval_interval == 0:
            vloss = sum(engine.eval_step(micro_batches_for_step(valid_ds, consumed_samples=i * samples_per_step,
                                                                **batch_args))
                        for i in range(t.eval_iters)) / t.eval_iters
            logger.log(state.step, {"loss": vloss, "ppl": perplexity(vloss)}, prefix="valid")
        if any_rank(stop.requested or stop_after(faults, state.step)):
            save()
            if rank == 0:
                print(f"stop signal received: checkpoint at step {state.step} written, exiting", flush=True)
            break
        if t.save_interval and state.step % t.save_interval == 0:
            save()
    else:
        if t.save_at_end and state.step > start_step and (not t.save_interval or state.step % t.save_interval != 0):
            save()
    heartbeat.beat(state.step)
    logger.close()
    dist.barrier()
    engine.close()
    destroy_process_grid()
    return exit_code
