"""Checkpoint upkeep without torch: list, verify and prune RUN_DIR/checkpoints.

The trainer's protocol (megalm/training/checkpoint.py): a save is written under `step_NNNNNNNN.tmp/`,
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
import shutil
import zipfile
from dataclasses import dataclass, field
from typing import Optional

CKPT_DIRNAME = "checkpoints"
LATEST = "latest"
META = "megalm.json"
TMP_SUFFIX = ".tmp"
_ENTRY = re.compile(r"^step_(\d+)(\.tmp)?$")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIRNAME)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


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

    @property
    def status(self) -> str:
        if self.in_progress:
            return "writing"  # or abandoned; the next trainer start removes it
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
    """The tag `latest` names (not checked), or None."""
    path = os.path.join(checkpoint_root(run_dir), LATEST)
    try:
        with open(path) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def list_checkpoints(run_dir: str) -> list[CheckpointEntry]:
    """Every step entry under RUN_DIR/checkpoints (complete, incomplete, in progress), ascending step."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    latest = read_latest(run_dir)
    entries = []
    for name in os.listdir(root):
        m = _ENTRY.match(name)
        path = os.path.join(root, name)
        if not m or not os.path.isdir(path):
            continue
        in_progress = m.group(2) is not None
        meta_path = os.path.join(path, META)
        complete = not in_progress and os.path.isfile(meta_path)
        entry = CheckpointEntry(tag=name, step=int(m.group(1)), path=path, complete=complete,
                                in_progress=in_progress, size_bytes=_dir_size(path), is_latest=(name == latest))
        if complete:
            try:
                with open(meta_path) as f:
                    entry.meta = json.load(f)
                entry.saved_at = entry.meta.get("saved_at")
                entry.layout = dict(entry.meta.get("layout") or {})
            except (OSError, ValueError) as e:
                entry.meta_error = f"{META} unreadable: {e}"
        entries.append(entry)
    return sorted(entries, key=lambda e: (e.step, e.in_progress))


def latest_complete_step(run_dir: str) -> Optional[int]:
    """Step named by `latest` when that is a complete checkpoint, else None."""
    tag = read_latest(run_dir)
    if tag and os.path.isfile(os.path.join(checkpoint_root(run_dir), tag, META)):
        m = _ENTRY.match(tag)
        return int(m.group(1)) if m else None
    return None


# ----------------------------------------------------------------------------------------------- verify

def expected_rank_files(layout: dict) -> list[str]:
    """File names (relative to the checkpoint directory) that must exist for a layout."""
    tp, pp, dp = int(layout["tp"]), int(layout["pp"]), int(layout["dp"])
    zero, world = int(layout.get("zero_stage", 0)), int(layout["world_size"])
    exact = [f"rng/rank{r:05d}.pt" for r in range(world)]
    if pp == 1 and zero >= 3:
        exact += [f"zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt" for d in range(dp) for t in range(tp)]
    else:  # a pipeline's engine state: one file per (stage, TP rank)
        exact += [f"mp_rank_{m:02d}_model_states.pt" for m in range(tp * pp)]
    return exact


def _zip_problem(path: str, quick: bool) -> Optional[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            if not zf.namelist():
                return "empty archive"
            if not quick:
                bad = zf.testzip()
                if bad is not None:
                    return f"CRC mismatch in member {bad}"
    except zipfile.BadZipFile as e:
        return f"not a readable torch archive ({e})"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None


def verify_entry(entry: CheckpointEntry, quick: bool = False) -> list[str]:
    """Problems with one checkpoint (empty list = good)."""
    if entry.in_progress:
        return ["save in progress (.tmp): not a checkpoint yet"]
    if not entry.complete:
        return [f"no {META}: the save never completed"]
    if entry.meta_error:
        return [entry.meta_error]
    meta = entry.meta or {}
    problems = []
    if meta.get("step") != entry.step:
        problems.append(f"{META} says step {meta.get('step')!r}, directory says {entry.step}")
    if not isinstance(meta.get("consumed_samples"), int):
        problems.append(f"{META}: consumed_samples missing or not an integer")
    layout = meta.get("layout")
    keys = ("tp", "pp", "dp", "world_size")
    if not isinstance(layout, dict) or any(not isinstance(layout.get(k), int) or layout[k] < 1 for k in keys):
        return problems + [f"{META}: layout {layout!r} lacks positive integers tp, pp, dp, world_size"]
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
    if zero >= 1:
        optim = [n for n in names if re.match(r"^(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt$", n)]
        if len(optim) != world:
            problems.append(f"ZeRO-{zero}: {len(optim)} optimizer shard(s) *_optim_states.pt, expected one per "
                            f"rank ({world})")
    if layout["pp"] > 1:
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
    for dirpath, _, files in os.walk(entry.path):
        for n in sorted(files):
            if n.endswith(".pt"):
                path = os.path.join(dirpath, n)
                why = _zip_problem(path, quick)
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
            result.setdefault(LATEST, []).append(f"`latest` names {latest!r}, which is not a complete checkpoint")
    elif entries and any(e.complete for e in entries.values()):
        result.setdefault(LATEST, []).append("complete checkpoints exist but there is no `latest` pointer")
    return result


# ------------------------------------------------------------------------------------------------ prune

def plan_prune(run_dir: str, keep_last: int, keep_every: Optional[int] = None) -> tuple[list[CheckpointEntry], list[CheckpointEntry]]:
    """(keep, delete) among complete checkpoints. Kept: the newest `keep_last`, every step that is a
    multiple of `keep_every`, and whatever `latest` names. `.tmp` saves and incomplete directories are
    neither listed nor ever deleted."""
    if keep_last < 1:
        raise ValueError(f"--keep-last must be >= 1, got {keep_last}")
    if keep_every is not None and keep_every < 1:
        raise ValueError(f"--keep-every must be >= 1, got {keep_every}")
    complete = [e for e in list_checkpoints(run_dir) if e.complete]
    latest = read_latest(run_dir)
    newest = {e.tag for e in complete[-keep_last:]}
    keep, delete = [], []
    for e in complete:
        if e.tag in newest or e.tag == latest or (keep_every and e.step % keep_every == 0):
            keep.append(e)
        else:
            delete.append(e)
    return keep, delete


def prune(run_dir: str, keep_last: int, keep_every: Optional[int] = None, dry_run: bool = False) -> list[CheckpointEntry]:
    _, delete = plan_prune(run_dir, keep_last, keep_every)
    removed = []
    for e in delete:
        if read_latest(run_dir) == e.tag:  # `latest` moved onto it meanwhile (a running job): keep it
            continue
        if not dry_run:
            # Rename out of the `step_*` namespace first, so a reader never sees a half-deleted checkpoint.
            doomed = e.path + ".deleting"
            try:
                os.rename(e.path, doomed)
            except FileNotFoundError:
                continue  # pruned by the trainer meanwhile
            shutil.rmtree(doomed, ignore_errors=True)
        removed.append(e)
    return removed
