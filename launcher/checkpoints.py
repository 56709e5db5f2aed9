"""Checkpoint upkeep without torch: list, verify and prune RUN_DIR/checkpoints.

The names and rules of the run directory (which entries are complete, `latest`, the prune rule) are
megalm/rundir.py's, the same module the trainer uses: a save is written under `step_NNNNNNNN.tmp/`,
`megalm.json` is added last, the directory is renamed to `step_NNNNNNNN/`, then the `latest` pointer
file is replaced atomically. So a complete checkpoint is a `step_*` directory without `.tmp` that holds
`megalm.json`; a `.tmp` directory is a save in progress (or a dead one, removed by the next trainer
start) and is never touched here.

Rank files expected for a layout {tp, pp, dp, zero_stage, world_size}:
  rng/rankNNNNN.pt                                  one per rank (megalm's RNG state)
  mp_rank_MM_model_states.pt                        one per TP rank, and per stage for pipelines (ZeRO < 3)
  zero_pp_rank_D_mp_rank_TT_model_states.pt         one per rank (ZeRO-3: weights are partitioned)
  layer_LL-...model_states.pt                       pipeline layers (pp > 1), each layer index once per TP rank
  [bf16_]zero_pp_rank_D_mp_rank_TT_optim_states.pt  one per rank (ZeRO >= 1)
Every `.pt` is a zip archive (torch's format): "readable" = its central directory parses and, unless
`quick`, every member's CRC matches.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from megalm import rundir, runlock
from megalm.ckpt_files import expected_rank_files, file_problem, pt_files, stage_engine_layout, universal_kinds
from megalm.rundir import LATEST_FILE, META_FILE, checkpoint_root, tag_for

__all__ = ["CheckpointEntry", "checkpoint_root", "latest_complete_step", "list_checkpoints", "plan_prune", "prune",
           "read_latest", "tag_for", "verify", "verify_entry"]


@dataclass
class CheckpointEntry:
    tag: str
    step: int
    path: str
    complete: bool  # renamed into place and holds megalm.json
    in_progress: bool  # a `.tmp` directory
    size_bytes: int
    saved_at: Optional[float] = None
    layout: dict = field(default_factory=dict)
    meta: Optional[dict] = None
    meta_error: Optional[str] = None
    is_latest: bool = False
    writer_alive: Optional[bool] = None  # in-progress entries: does a live run hold RUN_DIR's lock?

    @property
    def status(self) -> str:
        if self.in_progress:
            # A .tmp is a save in progress only while a live run holds the lock; else a dead save that
            # the next trainer start removes (and that nothing may trust meanwhile).
            if self.writer_alive is False:
                return f"abandoned (no live run holds {rundir.lock_file(os.path.dirname(os.path.dirname(self.path)))})"
            return "writing"
        if not self.complete:
            return "incomplete"
        return "complete" if self.meta_error is None else "bad-metadata"

    def layout_text(self) -> str:
        if not self.layout:
            return "-"
        keys = ("tp", "pp", "dp", "zero_stage", "world_size")
        names = {"zero_stage": "zero", "world_size": "world"}
        return " ".join(f"{names.get(k, k)}={self.layout.get(k, '?')}" for k in keys)


def _dir_size(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass  # a file vanished under us (a save or prune in progress)
    return total


def read_latest(run_dir: str) -> Optional[str]:
    """The tag `latest` names (not checked: listing and verify report a bad pointer), or None."""
    return rundir.read_latest_pointer(checkpoint_root(run_dir))


def list_checkpoints(run_dir: str) -> list[CheckpointEntry]:
    """Every step entry under RUN_DIR/checkpoints (complete, incomplete, in progress), ascending step."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    latest = read_latest(run_dir)
    writer_alive = runlock.holder_alive(run_dir)[0]
    entries = []
    for name in os.listdir(root):
        parsed = rundir.parse_entry(name)
        path = os.path.join(root, name)
        if parsed is None or not os.path.isdir(path):
            continue
        step, in_progress = parsed
        meta_path = rundir.meta_file(path)
        complete = not in_progress and rundir.is_complete(root, name)
        entry = CheckpointEntry(tag=name, step=step, path=path, complete=complete,
                                in_progress=in_progress, size_bytes=_dir_size(path), is_latest=(name == latest),
                                writer_alive=writer_alive if in_progress else None)
        if complete:
            try:
                with open(meta_path) as f:
                    entry.meta = json.load(f)
                entry.saved_at = entry.meta.get("saved_at")
                entry.layout = dict(entry.meta.get("layout") or {})
            except (OSError, ValueError) as e:
                entry.meta_error = f"{META_FILE} unreadable: {e}"
        entries.append(entry)
    return sorted(entries, key=lambda e: (e.step, e.in_progress))


def latest_complete_step(run_dir: str) -> Optional[int]:
    """Step named by `latest` when that is a complete checkpoint, else None."""
    return rundir.latest_complete_step(checkpoint_root(run_dir))


# ----------------------------------------------------------------------------------------------- verify

def verify_entry(entry: CheckpointEntry, quick: bool = False) -> list[str]:
    """Problems with one checkpoint (empty list = good)."""
    if entry.in_progress:
        return [f"save in progress ({rundir.TMP_SUFFIX}): not a checkpoint yet"]
    if not entry.complete:
        return [f"no {META_FILE}: the save never completed"]
    if entry.meta_error:
        return [entry.meta_error]
    meta = entry.meta or {}
    problems = []
    if meta.get("step") != entry.step:
        problems.append(f"{META_FILE} says step {meta.get('step')!r}, directory says {entry.step}")
    if not isinstance(meta.get("consumed_samples"), int):
        problems.append(f"{META_FILE}: consumed_samples missing or not an integer")
    layout = meta.get("layout")
    keys = ("tp", "pp", "dp", "world_size")
    if not isinstance(layout, dict) or any(not isinstance(layout.get(k), int) or layout[k] < 1 for k in keys):
        return problems + [f"{META_FILE}: layout {layout!r} lacks positive integers tp, pp, dp, world_size"]
    if layout["tp"] * layout["pp"] * layout["dp"] != layout["world_size"]:
        problems.append(f"layout tp x pp x dp = {layout['tp']} x {layout['pp']} x {layout['dp']} "
                        f"!= world_size {layout['world_size']}")
        return problems
    exact = expected_rank_files(layout)
    for rel in exact:
        if not os.path.isfile(os.path.join(entry.path, rel)):
            problems.append(f"missing {rel}")
    names = os.listdir(entry.path)
    zero, world, tp = int(layout.get("zero_stage", 0)), layout["world_size"], layout["tp"]
    if universal_kinds(layout):  # layout-free: no DeepSpeed files, whatever layout it was made for
        zero, layout = 0, dict(layout, pp=1)
    if zero >= 1:
        optim = [n for n in names if re.match(r"^(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$", n)]
        if len(optim) != world:
            problems.append(f"ZeRO-{zero}: {len(optim)} optimizer shard(s) *_optim_states.pt, expected one per "
                            f"rank ({world})")
    # ZeRO-2/3 x PP trains one DeepSpeedEngine per stage: pp=1's files once per model-parallel rank, no
    # per-layer files (expected_rank_files lists them exactly)
    if layout["pp"] > 1 and not stage_engine_layout(layout["pp"], zero):
        layers: dict[str, int] = {}
        for n in names:
            m = re.match(r"^layer_(\d+)-.*model_states\.pt$", n)
            if m:
                layers[m.group(1)] = layers.get(m.group(1), 0) + 1
        if not layers:
            problems.append(f"pipeline (pp={layout['pp']}): no layer_*-model_states.pt files")
        else:
            idx = sorted(int(k) for k in layers)
            gaps = sorted(set(range(idx[0], idx[-1] + 1)) - set(idx))
            if gaps:
                problems.append(f"pipeline layer files missing for layer indices {gaps}")
            short = sorted(k for k, c in layers.items() if c != tp)
            if short:
                problems.append(f"layer(s) {short} do not have one file per TP rank ({tp})")
    for path in pt_files(entry.path):
        why = file_problem(path, quick)
        if why:
            problems.append(f"{os.path.relpath(path, entry.path)}: {why}")
    return problems


def verify(run_dir: str, tags: Optional[list[str]] = None, quick: bool = False) -> dict[str, list[str]]:
    """{tag: problems} for the given tags (default: every complete checkpoint), plus a `latest` check."""
    entries = {e.tag: e for e in list_checkpoints(run_dir)}
    result: dict[str, list[str]] = {}
    wanted = tags if tags else [t for t, e in entries.items() if e.complete]
    for tag in wanted:
        entry = entries.get(tag)
        result[tag] = ["no such checkpoint"] if entry is None else verify_entry(entry, quick)
    latest = read_latest(run_dir)
    if latest is not None:
        entry = entries.get(latest)
        if entry is None or not entry.complete:
            result.setdefault(LATEST_FILE, []).append(f"`{LATEST_FILE}` names {latest!r}, which is not a complete checkpoint")
    elif entries and any(e.complete for e in entries.values()):
        result.setdefault(LATEST_FILE, []).append(f"complete checkpoints exist but there is no `{LATEST_FILE}` pointer")
    return result


# ------------------------------------------------------------------------------------------------ prune

def plan_prune(run_dir: str, keep_last: int, keep_every: Optional[int] = None) -> tuple[list[CheckpointEntry], list[CheckpointEntry]]:
    """(keep, delete) among complete checkpoints, by the one prune rule (`megalm.rundir.plan_prune`):
    kept are the newest `keep_last`, every step that is a multiple of `keep_every`, and whatever
    `latest` names. `.tmp` saves and incomplete directories are neither listed nor ever deleted."""
    try:
        kept, _ = rundir.plan_prune(checkpoint_root(run_dir), keep_last, keep_every)
    except ValueError as e:  # name the command-line flags
        raise ValueError(str(e).replace("keep_last", "--keep-last").replace("keep_every", "--keep-every")) from None
    complete = [e for e in list_checkpoints(run_dir) if e.complete]
    return [e for e in complete if e.step in kept], [e for e in complete if e.step not in kept]


def prune(run_dir: str, keep_last: int, keep_every: Optional[int] = None, dry_run: bool = False) -> list[CheckpointEntry]:
    """Delete what `plan_prune` dooms (renamed out of the `step_*` namespace first, `latest` re-read
    before each deletion: safe next to a running trainer). Returns the entries deleted."""
    plan_prune(run_dir, keep_last, keep_every)  # refuses bad flags, naming them
    by_step = {e.step: e for e in list_checkpoints(run_dir) if e.complete}
    removed = rundir.prune(checkpoint_root(run_dir), keep_last, keep_every, dry_run=dry_run)
    return [by_step[step] for step in removed if step in by_step]
