"""Atomic checkpoints: DeepSpeed's shards + megalm.json under RUN_DIR/checkpoints/step_NNNNNNNN.

Save protocol (DESIGN decision 7), on every rank:
  1. DeepSpeed writes its shards under `step_N.tmp/` (every rank its own files), plus our per-rank RNG file;
  2. barrier — every rank's files are complete;
  3. rank 0 fsyncs the files, writes `megalm.json`, renames `step_N.tmp` -> `step_N`, then replaces the
     `latest` pointer atomically (write `latest.tmp`, fsync, rename) and prunes to keep-last-N;
  4. barrier.
A reader (resume, eval, `megalm-launch ckpt`) trusts only directories without `.tmp` that hold
`megalm.json`, and `latest` only ever names such a directory, so a crash at any point leaves the previous
checkpoint loadable.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

CKPT_DIRNAME = "checkpoints"
LATEST = "latest"
META = "megalm.json"
TMP_SUFFIX = ".tmp"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the run that tries to load it."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIRNAME)


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_path(os.path.join(dirpath, name))
        _fsync_path(dirpath)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + TMP_SUFFIX
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(os.path.dirname(path) or ".")


def complete_steps(root: str) -> list[int]:
    """Steps of complete checkpoints (renamed into place, with metadata), ascending."""
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, META)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_latest(root: str) -> Optional[str]:
    """The tag `latest` names, or None. A `latest` naming something incomplete is an error, not a guess."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not os.path.isfile(os.path.join(root, tag, META)):
        raise CheckpointError(f"{path} names {tag!r}, which is not a complete checkpoint (no {META})")
    return tag


def read_meta(root: str, tag: str) -> dict:
    path = os.path.join(root, tag, META)
    if not os.path.isfile(path):
        raise CheckpointError(f"{os.path.join(root, tag)} is not a complete checkpoint (missing {META}); "
                              f"complete steps: {complete_steps(root)}")
    with open(path) as f:
        return json.load(f)


def remove_stale_tmp(root: str) -> None:
    """Rank 0 at start-up: delete half-written `*.tmp` checkpoints left by a run that died mid-save."""
    if os.path.isdir(root):
        for name in os.listdir(root):
            if name.endswith(TMP_SUFFIX):
                path = os.path.join(root, name)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.unlink(path)


def prune(root: str, keep_last: int, protect: tuple[str, ...] = ()) -> list[int]:
    """Delete complete checkpoints beyond the newest `keep_last`, never one named in `protect`."""
    steps = complete_steps(root)
    removed = []
    for step in steps[:-keep_last] if keep_last > 0 else []:
        if tag_for(step) in protect:
            continue
        shutil.rmtree(os.path.join(root, tag_for(step)), ignore_errors=True)
        removed.append(step)
    return removed


def _rng_file(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, "rng", f"rank{rank:05d}.pt")


def save_checkpoint(engine: Any, run_dir: str, state: TrainState, meta: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    root = checkpoint_root(run_dir)
    rank = dist.get_rank()
    tag = tag_for(state.step)
    tmp_tag = tag + TMP_SUFFIX
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(os.path.join(root, tmp_tag), ignore_errors=True)
    dist.barrier()
    engine.save_checkpoint(root, tag=tmp_tag, save_latest=False,
                           client_state={"megalm_step": state.step, "consumed_samples": state.consumed_samples})
    os.makedirs(os.path.dirname(_rng_file(os.path.join(root, tmp_tag), rank)), exist_ok=True)
    torch.save({"torch": torch.get_rng_state()}, _rng_file(os.path.join(root, tmp_tag), rank))
    dist.barrier()
    final = os.path.join(root, tag)
    if rank == 0:
        tmp_dir = os.path.join(root, tmp_tag)
        full_meta = dict(meta, format_version=FORMAT_VERSION, step=state.step,
                         consumed_samples=state.consumed_samples, skipped_steps=state.skipped_steps,
                         saved_at=time.time())
        with open(os.path.join(tmp_dir, META), "w") as f:
            json.dump(full_meta, f, indent=2, sort_keys=True)
        _fsync_tree(tmp_dir)
        if os.path.isdir(final):  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp_dir, final)
        _fsync_path(root)
        _write_atomic(os.path.join(root, LATEST), tag)
        prune(root, keep_last, protect=(tag,))
    dist.barrier()
    return final


def check_compatible(meta: dict, expected: dict, where: str) -> None:
    """Refuse to load a checkpoint saved with another model or layout (until resharding is used)."""
    problems = []
    for key in ("tp", "pp", "dp", "zero_stage"):
        if meta["layout"].get(key) != expected["layout"].get(key):
            problems.append(f"{key}: checkpoint {meta['layout'].get(key)} vs this run {expected['layout'].get(key)}")
    for key, value in expected["model"].items():
        if meta["model"].get(key) != value:
            problems.append(f"model.{key}: checkpoint {meta['model'].get(key)!r} vs this run {value!r}")
    if problems:
        raise CheckpointError(
            f"{where} was saved with a different model or layout and cannot be loaded by this run:\n  "
            + "\n  ".join(problems) + "\nResume with the checkpoint's layout, or convert it with `megalm-reshard`.")


def load_checkpoint(engine: Any, run_dir: str, tag: Optional[str], expected_meta: dict) -> Optional[TrainState]:
    """Collective. Loads `tag` (or `latest` when None); returns None when there is nothing to resume."""
    root = checkpoint_root(run_dir)
    if tag is None:
        tag = read_latest(root)
        if tag is None:
            return None
    meta = read_meta(root, tag)
    check_compatible(meta, expected_meta, os.path.join(root, tag))
    load_path, client = engine.load_checkpoint(root, tag=tag, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {os.path.join(root, tag)}")
    rng = _rng_file(os.path.join(root, tag), dist.get_rank())
    if os.path.isfile(rng):
        torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
    return TrainState(step=meta["step"], consumed_samples=meta["consumed_samples"],
                      skipped_steps=meta.get("skipped_steps", 0))
