"""Atomic checkpoints: DeepSpeed's shards + megalm.json under RUN_DIR/checkpoints/step_NNNNNNNN.

Save protocol (DESIGN decision 7), on every rank:
  1. DeepSpeed writes its shards under `step_N.tmp/` (every rank its own files), plus our per-rank RNG file;
  2. barrier — every rank's files are complete;
  3. rank 0 writes `megalm.json`, fsyncs the files, renames `step_N.tmp` -> `step_N`, then replaces the
     `latest` pointer atomically (`rundir.publish_checkpoint`) and prunes to keep-last-N (`rundir.prune`:
     renamed out of the `step_*` namespace, then deleted);
  4. barrier.
A reader (resume, eval, `megalm-launch ckpt`) trusts only directories without `.tmp` that hold
`megalm.json`, and `latest` only ever names such a directory, so a crash at any point leaves the previous
checkpoint loadable. The names and these rules are defined once, in megalm/rundir.py.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

# Every name and rule of the run directory lives in megalm/rundir.py (shared with the torch-free
# launcher); re-exported here for the trainer's callers.
from megalm.ckpt_files import first_problem, universal_kinds
from megalm.parallel.device import broadcast_object, gather_objects
from megalm.rundir import (CheckpointError, checkpoint_root, complete_steps, meta_file, parse_tag, prune,
                           publish_checkpoint, read_latest, read_meta, remove_stale_tmp, rng_file, tag_for, tmp_tag_for)
from megalm.rundir import fsync_tree as _fsync_tree  # a module global: fault drills patch it

__all__ = ["CheckpointError", "TrainState", "check_compatible", "checkpoint_root", "complete_steps",
           "load_checkpoint", "prune", "read_latest", "read_meta", "remove_stale_tmp", "save_checkpoint", "tag_for"]

FORMAT_VERSION = 1


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def save_checkpoint(engine: Any, run_dir: str, state: TrainState, meta: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = checkpoint_root(run_dir)
    rank = dist.get_rank()
    tmp_tag = tmp_tag_for(state.step)
    tmp_dir = os.path.join(root, tmp_tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    dist.barrier()
    try:
        engine.save_checkpoint(root, tag=tmp_tag, save_latest=False,
                               client_state={"megalm_step": state.step, "consumed_samples": state.consumed_samples})
        os.makedirs(os.path.dirname(rng_file(tmp_dir, rank)), exist_ok=True)
        torch.save({"torch": torch.get_rng_state()}, rng_file(tmp_dir, rank))
        failure = None
    except (OSError, RuntimeError) as e:
        failure = e
    # Instead of a barrier: every rank learns whether any rank's write failed, so none waits forever
    # for a peer that raised (a full disk often hits only the ranks that write the large shards).
    failures = gather_objects(_save_failure(failure, root, state.step))
    _raise_first(failures, failure, root, tmp_dir)
    final = os.path.join(root, tag_for(state.step))
    failure = None
    if rank == 0:
        try:
            publish_step(root, state, meta, keep_last)
        except OSError as e:
            failure = e
    published = [broadcast_object(_save_failure(failure, root, state.step), src=0)]  # also the closing barrier
    _raise_first(published, failure, root, tmp_dir)
    return final


def publish_step(root: str, state: TrainState, meta: dict, keep_last: int) -> str:
    """Steps 3 of the save protocol, in one process: `step_N.tmp` under `root` holds every file of the
    step; write its megalm.json (`meta` plus the step's counters), fsync, rename it to `step_N`, point
    `latest` at it and prune to `keep_last`. Returns the step directory. (megalm-reshard's universal
    steps are published through here too.)"""
    tmp_dir = os.path.join(root, tmp_tag_for(state.step))
    full_meta = dict(meta, format_version=FORMAT_VERSION, step=state.step, consumed_samples=state.consumed_samples,
                     skipped_steps=state.skipped_steps, saved_at=time.time())
    with open(meta_file(tmp_dir), "w") as f:
        json.dump(full_meta, f, indent=2, sort_keys=True)
    _fsync_tree(tmp_dir)
    publish_checkpoint(root, state.step)
    prune(root, keep_last, protect=(tag_for(state.step),))
    return os.path.join(root, tag_for(state.step))


def _disk_full(e: BaseException, root: str) -> bool:
    """A full disk shows up as OSError ENOSPC from Python writes, but torch.save reports it as a
    RuntimeError (`basic_ios::clear: iostream error`, `unexpected pos`) with no errno or path, so for
    those the free space left in the checkpoint directory tells a full disk apart from other failures."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    free = _free_bytes(root)
    return free is not None and free < _DISK_FULL_BYTES


_DISK_FULL_BYTES = 64 * 2**20  # less free than this after a failed write: the disk filled up


def _free_bytes(path: str) -> Optional[int]:
    while path and not os.path.isdir(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def _save_failure(e: Optional[BaseException], root: str, step: int) -> Optional[str]:
    """The user-facing message for a failed checkpoint write (None when nothing failed)."""
    if e is None:
        return None
    if _disk_full(e, root):
        previous = complete_steps(root)
        kept = f"the previous checkpoint {tag_for(previous[-1])} is intact" if previous else "no earlier checkpoint exists"
        free = _free_bytes(root)
        free_text = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return (f"no space left on {root} ({free_text}) while saving step {step}: {kept}; free space there "
                f"(e.g. lower train.keep_last, `megalm-launch ckpt prune`) or move train.run_dir, then resume")
    if isinstance(e, OSError):
        return f"cannot write checkpoint step {step} under {root}: {e}; check that the directory is writable"
    return f"saving checkpoint step {step} under {root} failed on a rank ({type(e).__name__}: {e})"


def _raise_first(messages: list, own: Optional[BaseException], root: str, tmp_dir: str) -> None:
    """Raise on every rank when any rank's write failed, with the same message. A failure that is
    neither a full disk nor an OSError may be a bug: it keeps its traceback on the rank that had it."""
    first = next((m for m in messages if m is not None), None)
    if first is None:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # give the space back; the earlier step stays as it was
    if own is not None and not isinstance(own, OSError) and not _disk_full(own, root):
        raise own
    raise CheckpointError(first)


def check_compatible(meta: dict, expected: dict, where: str, elastic: bool = False) -> None:
    """Refuse to load a checkpoint saved with another model or layout (`elastic`: the data-parallel size
    may differ, megalm/training/elastic.py; anything else needs `megalm-reshard`)."""
    problems = []
    layout_keys = ("tp", "pp", "zero_stage") + (() if elastic else ("dp",))
    if universal_kinds(meta["layout"]):  # megalm-reshard's layout-free step: any layout loads it (elastic.py)
        layout_keys = () if elastic else ("universal",)
    for key in layout_keys:
        if meta["layout"].get(key) != expected["layout"].get(key):
            problems.append(f"{key}: checkpoint {meta['layout'].get(key)} vs this run {expected['layout'].get(key)}")
    for key, value in expected["model"].items():
        if meta["model"].get(key) != value:
            problems.append(f"model.{key}: checkpoint {meta['model'].get(key)!r} vs this run {value!r}")
    if problems:
        raise CheckpointError(
            f"{where} was saved with a different model or layout and cannot be loaded by this run:\n  "
            + "\n  ".join(problems) + "\nResume with the checkpoint's layout, or convert it with `megalm-reshard`.")


def load_checkpoint(engine: Any, run_dir: str, tag: Optional[str], expected_meta: dict,
                    load_at_new_dp: Optional[Callable[[str, dict], None]] = None) -> Optional[TrainState]:
    """Collective. Loads `tag` (or `latest` when None); returns None when there is nothing to resume.
    `load_at_new_dp(step_dir, saved_layout)`: how to load a step saved at another data-parallel size, or a
    universal (layout-free) step (megalm/training/elastic.py); without it such a step is refused."""
    root = checkpoint_root(run_dir)
    if tag is None:
        tag = read_latest(root)
        if tag is None:
            return None
    meta = read_meta(root, tag)
    check_compatible(meta, expected_meta, os.path.join(root, tag), elastic=load_at_new_dp is not None)
    universal = bool(universal_kinds(meta["layout"]))
    dp_changed = universal or meta["layout"].get("dp") != expected_meta["layout"].get("dp")
    # Rank 0 checks every .pt of the step and all ranks raise the same error: a truncated file seen by
    # one rank only (its optimizer shard) would otherwise leave its peers waiting in a collective.
    problem = [broadcast_object(first_problem(os.path.join(root, tag), meta["layout"], quick=True)
                                if dist.get_rank() == 0 else None)]
    if problem[0] is not None:
        raise unreadable_checkpoint(root, tag, *problem[0])
    try:
        if dp_changed and load_at_new_dp is not None and (universal or int(meta["layout"].get("zero_stage", 0)) > 0):
            load_at_new_dp(os.path.join(root, tag), meta["layout"])
            load_path = root
        else:  # the saved layout, or ZeRO-0 (nothing is partitioned over DP: DeepSpeed reads it at any dp)
            load_path, client = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
    except RuntimeError:  # torch's "PytorchStreamReader failed ...": find and name the file (CRCs too)
        found = first_problem(os.path.join(root, tag), meta["layout"], quick=False)
        if found is None:
            raise
        raise unreadable_checkpoint(root, tag, *found) from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(root, tag)}")
    rng = rng_file(os.path.join(root, tag), dist.get_rank())
    if os.path.isfile(rng) and not dp_changed:  # after a dp change rank N is not the saved rank N
        torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
    return TrainState(step=meta["step"], consumed_samples=meta["consumed_samples"],
                      skipped_steps=meta.get("skipped_steps", 0))


def unreadable_checkpoint(root: str, tag: str, path: str, why: str) -> CheckpointError:
    """The error for a damaged step, pointing at the intact earlier steps. `--resume auto` never falls
    back to one by itself: resuming earlier repeats training the user may not want to pay for twice."""
    step = parse_tag(tag)
    earlier = [s for s in complete_steps(root) if step is None or s < step]
    bad_dir = os.path.join(root, tag)
    if earlier:
        fix = (f"complete earlier steps: {earlier}; resume one with --resume {tag_for(earlier[-1])} "
               f"or delete the bad step {bad_dir}")
    else:
        fix = f"no complete earlier step; restore the file, or delete {bad_dir} and start the run over"
    return CheckpointError(f"checkpoint file {path}: {why}: {fix}")
