"""The run directory: every name in it and every rule for reading and changing it, in one place.

Standard library only (no torch, no numpy): the trainer, the export/eval tools, the launcher on a login
node and the launcher's stub trainer all import this module, so they cannot drift apart again (they
had: two step regexes, two prune rules). Layout of RUN_DIR (= train.run_dir):

    .lock                             held by the running trainer's rank 0 (megalm/runlock.py)
    config.yaml                       the resolved run config (rank 0 at start)
    tokenizer.json                    an imported model's tokenizer (`megalm-import`; its data.tokenizer)
    metrics.jsonl                     one JSON line per logged step ({"kind": "train"|"valid", "step", ...})
    heartbeat.json                    rewritten by rank 0 every step: the supervisor's evidence of progress
    tensorboard/                      training scalars
    stacks/rankNNNNN.txt              SIGUSR2 stack dump of each rank (faulthandler)
    restarts.jsonl                    the restart supervisor's events (`megalm-launch run`)
    slurm/job.sbatch, jobs.txt, job-<id>.out, attempts.jsonl, hostfile-<id>   SLURM submission, attempts
    eval/step_NNNNNNNN.json, eval/tensorboard/                     `megalm-eval` results
    eval/tasks_step_NNNNNNNN.json                                  `megalm-eval --tasks` results (lm-eval)
    checkpoints/
        latest                        names the newest complete step directory, replaced atomically
        step_NNNNNNNN/                a complete checkpoint: DeepSpeed's files, rng/rankNNNNN.pt, megalm.json
        step_NNNNNNNN.tmp/            a save in progress (or a dead one: removed at the next trainer start)
        step_NNNNNNNN.deleting/       a prune in progress: already out of the step namespace

Rules: a checkpoint is complete when its directory has a canonical step name (no `.tmp`) and holds
megalm.json, which the trainer writes last, before the rename; `latest` only ever names a complete
checkpoint; pruning renames a checkpoint out of the `step_*` namespace before deleting it, so no
reader ever sees a half-deleted checkpoint, and never deletes what `latest` names.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Iterable, Optional

# ------------------------------------------------------------------------------------------------ names

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer `megalm-import` copies in (its config's data.tokenizer)
METRICS_FILE = "metrics.jsonl"
HEARTBEAT_FILE = "heartbeat.json"
TENSORBOARD_DIR = "tensorboard"
STACKS_DIR = "stacks"
RESTARTS_FILE = "restarts.jsonl"
SLURM_DIR = "slurm"
SLURM_SCRIPT_FILE = "job.sbatch"
SLURM_JOBS_FILE = "jobs.txt"
SLURM_OUTPUT_PATTERN = "job-%j.out"  # sbatch expands %j to the job id
SLURM_ATTEMPTS_FILE = "attempts.jsonl"
SLURM_HOSTFILE_PREFIX = "hostfile-"
EVAL_DIR = "eval"
EVAL_TASKS_PREFIX = "tasks_"  # eval/tasks_step_N.json: task scores, kept apart from the perplexity result
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
META_FILE = "megalm.json"
RNG_DIR = "rng"
TMP_SUFFIX = ".tmp"
DELETING_SUFFIX = ".deleting"
STEP_PREFIX = "step_"
STEP_DIGITS = 8
TAG_EXAMPLE = "step_NNNNNNNN"  # for messages that tell users what to type

# The one step-name rule: exactly the names `tag_for` produces (zero-padded to 8 digits; a step past
# 99,999,999 has more digits and then no leading zero), optionally with the in-progress suffix.
_STEP_ENTRY = re.compile(r"^step_(\d{8}|[1-9]\d{8,})(\.tmp)?$")
_RANK_FILE = re.compile(r"^rank(\d{5}|[1-9]\d{5,})\.txt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the run that tries to load it."""


# ------------------------------------------------------------------------------------ step names

def tag_for(step: int) -> str:
    """The directory name of a complete checkpoint: step_00000012."""
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"a checkpoint step must be a non-negative integer, got {step!r}")
    return f"{STEP_PREFIX}{step:0{STEP_DIGITS}d}"


def tmp_tag_for(step: int) -> str:
    """The directory name of a save in progress: step_00000012.tmp."""
    return tag_for(step) + TMP_SUFFIX


def parse_entry(name: str) -> Optional[tuple[int, bool]]:
    """(step, in_progress) of a name in the checkpoints directory, or None when it is no step entry."""
    m = _STEP_ENTRY.match(name)
    return (int(m.group(1)), m.group(2) is not None) if m else None


def parse_tag(name: str) -> Optional[int]:
    """The step of a complete checkpoint's name (step_00000012 -> 12); None for anything else,
    `.tmp` names included."""
    entry = parse_entry(name)
    return entry[0] if entry and not entry[1] else None


def rank_label(rank: int) -> str:
    """rank00003: how per-rank files are named (rng states, stack dumps)."""
    return f"rank{rank:05d}"


# ------------------------------------------------------------------------------------ paths in RUN_DIR

def lock_file(run_dir: str) -> str:
    return os.path.join(run_dir, LOCK_FILE)


def config_file(run_dir: str) -> str:
    return os.path.join(run_dir, CONFIG_FILE)


def tokenizer_file(run_dir: str) -> str:
    return os.path.join(run_dir, TOKENIZER_FILE)


def metrics_file(run_dir: str) -> str:
    return os.path.join(run_dir, METRICS_FILE)


def heartbeat_file(run_dir: str) -> str:
    return os.path.join(run_dir, HEARTBEAT_FILE)


def tensorboard_dir(run_dir: str) -> str:
    return os.path.join(run_dir, TENSORBOARD_DIR)


def restarts_file(run_dir: str) -> str:
    return os.path.join(run_dir, RESTARTS_FILE)


def stacks_dir(run_dir: str) -> str:
    return os.path.join(run_dir, STACKS_DIR)


def stack_file(run_dir: str, rank: int) -> str:
    """Where rank `rank` dumps its stacks on SIGUSR2 (one file per rank: shared stderrs interleave)."""
    return os.path.join(stacks_dir(run_dir), rank_label(rank) + ".txt")


def stack_files(run_dir: str) -> list[tuple[int, str]]:
    """(rank, path) of every stack dump file, in rank order; empty when there are none."""
    try:
        names = os.listdir(stacks_dir(run_dir))
    except OSError:
        return []
    found = [(int(m.group(1)), os.path.join(stacks_dir(run_dir), n)) for n in names if (m := _RANK_FILE.match(n))]
    return sorted(found)


def slurm_dir(run_dir: str) -> str:
    return os.path.join(run_dir, SLURM_DIR)


def slurm_script_file(run_dir: str) -> str:
    return os.path.join(slurm_dir(run_dir), SLURM_SCRIPT_FILE)


def slurm_jobs_file(run_dir: str) -> str:
    return os.path.join(slurm_dir(run_dir), SLURM_JOBS_FILE)


def slurm_output_pattern(run_dir: str) -> str:
    return os.path.join(slurm_dir(run_dir), SLURM_OUTPUT_PATTERN)


def slurm_attempts_file(run_dir: str) -> str:
    return os.path.join(slurm_dir(run_dir), SLURM_ATTEMPTS_FILE)


def slurm_hostfile_name(job_id: str) -> str:
    """The DeepSpeed hostfile a job writes into the slurm directory (job_id may be "$SLURM_JOB_ID")."""
    return f"{SLURM_HOSTFILE_PREFIX}{job_id}"


def eval_dir(run_dir: str) -> str:
    return os.path.join(run_dir, EVAL_DIR)


def eval_result_file(run_dir: str, step: int) -> str:
    return os.path.join(eval_dir(run_dir), tag_for(step) + ".json")


def eval_tasks_result_file(run_dir: str, step: int) -> str:
    return os.path.join(eval_dir(run_dir), EVAL_TASKS_PREFIX + tag_for(step) + ".json")


def eval_tensorboard_dir(run_dir: str) -> str:
    return os.path.join(eval_dir(run_dir), TENSORBOARD_DIR)


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS_DIR)


# ---------------------------------------------------------------------- paths in the checkpoints root

def latest_file(root: str) -> str:
    return os.path.join(root, LATEST_FILE)


def meta_file(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, META_FILE)


def rng_relpath(rank: int) -> str:
    """A rank's RNG state file, relative to its checkpoint directory."""
    return os.path.join(RNG_DIR, rank_label(rank) + ".pt")


def rng_file(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, rng_relpath(rank))


def is_complete(root: str, tag: str) -> bool:
    """`tag` is a complete checkpoint under `root`: a canonical step name that holds megalm.json."""
    return parse_tag(tag) is not None and os.path.isfile(meta_file(os.path.join(root, tag)))


def complete_steps(root: str) -> list[int]:
    """Steps of the complete checkpoints under a checkpoints root, ascending."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(step for name in names if (step := parse_tag(name)) is not None and is_complete(root, name))


def read_latest_pointer(root: str) -> Optional[str]:
    """Lenient: what `latest` says, unchecked (None when it is absent or empty). For listing and
    verifying, which report a bad pointer instead of failing on it."""
    try:
        with open(latest_file(root)) as f:
            return f.read().strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_latest(root: str) -> Optional[str]:
    """Strict: the tag `latest` names, or None when there is no `latest`. A pointer to anything but a
    complete checkpoint is a CheckpointError, never a guess: resuming elsewhere would repeat or skip data."""
    path = latest_file(root)
    if not os.path.isfile(path):
        return None
    tag = read_latest_pointer(root)
    if tag is None or not is_complete(root, tag):
        raise CheckpointError(f"{path} names {tag!r}, which is not a complete checkpoint (a {TAG_EXAMPLE} "
                              f"directory with {META_FILE}); complete steps: {complete_steps(root)}. Resume "
                              f"with --resume {TAG_EXAMPLE} of one of them, or rewrite {path}")
    return tag


def latest_complete_step(root: str) -> Optional[int]:
    """Lenient: the step `latest` names when that is a complete checkpoint, else None."""
    tag = read_latest_pointer(root)
    return parse_tag(tag) if tag is not None and is_complete(root, tag) else None


def read_meta(root: str, tag: str) -> dict:
    """A complete checkpoint's megalm.json; a missing one is a CheckpointError listing the complete steps."""
    path = meta_file(os.path.join(root, tag))
    if not os.path.isfile(path):
        raise CheckpointError(f"{os.path.join(root, tag)} is not a complete checkpoint (missing {META_FILE}); "
                              f"complete steps: {complete_steps(root)}")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e}); use another step or restore the file") from None


# ------------------------------------------------------------------------------------ durable writes

def fsync_path(path: str) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    """fsync every file and directory under `root`."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def write_atomic(path: str, text: str, fsync: bool = True) -> None:
    """Replace a small file so a reader sees the old or the new content, never a mix. With `fsync`
    (default) the content and the rename survive a power loss; the per-step heartbeat passes False,
    since it is evidence of liveness, not state, and an fsync per step is slow on shared filesystems."""
    tmp = path + TMP_SUFFIX
    with open(tmp, "w") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_path(os.path.dirname(path) or ".")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def remove_stale_tmp(root: str) -> list[str]:
    """At trainer start (rank 0, before any save): remove saves that died mid-write (`step_*.tmp`), a
    `latest.tmp` left by a crash inside `write_atomic`, and prunes that died mid-delete (`*.deleting`).
    Returns the names removed. Nothing else in the root is touched."""
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return []
    stale = [n for n in names if (parse_entry(n) or (0, False))[1] or n == LATEST_FILE + TMP_SUFFIX
             or (n.endswith(DELETING_SUFFIX) and n.startswith(STEP_PREFIX))]
    for name in stale:
        _remove(os.path.join(root, name))
    return sorted(stale)


# ------------------------------------------------------------------------------------- publish, prune

def _move_aside(path: str) -> str:
    """Rename a step directory to `<name>.deleting` (atomically out of the step namespace); returns
    the new path. A leftover of an earlier, interrupted deletion under that name is removed first."""
    aside = path + DELETING_SUFFIX
    _remove(aside)
    os.rename(path, aside)
    return aside


def publish_checkpoint(root: str, step: int) -> str:
    """Make a finished save visible: rename `step_N.tmp` (its files and megalm.json written and
    fsynced by the caller) to `step_N`, fsync the root, then point `latest` at it. Re-saving a step
    that exists (a stop signal right after a periodic save) moves the old directory aside first and
    deletes it last, so the tag is missing only between two renames. Returns the final directory."""
    tmp, final = os.path.join(root, tmp_tag_for(step)), os.path.join(root, tag_for(step))
    if not os.path.isfile(meta_file(tmp)):
        raise CheckpointError(f"{tmp}: cannot publish a save without {META_FILE} (it is written last, "
                              f"after every rank's files)")
    aside = _move_aside(final) if os.path.isdir(final) else None
    os.replace(tmp, final)
    fsync_path(root)
    write_atomic(latest_file(root), tag_for(step))
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final

def plan_prune(root: str, keep_last: int, keep_every: Optional[int] = None,
               protect: Iterable[str] = ()) -> tuple[list[int], list[int]]:
    """(kept, doomed) steps among the complete checkpoints. Kept: the newest `keep_last`, every step
    that is a multiple of `keep_every`, the one `latest` names and any tag in `protect`. Saves in
    progress and incomplete directories are never candidates."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is always kept), got {keep_last}")
    if keep_every is not None and keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    steps = complete_steps(root)
    keep_tags = set(protect) | {read_latest_pointer(root)}
    newest = set(steps[-keep_last:])
    kept, doomed = [], []
    for step in steps:
        if step in newest or tag_for(step) in keep_tags or (keep_every and step % keep_every == 0):
            kept.append(step)
        else:
            doomed.append(step)
    return kept, doomed


def prune(root: str, keep_last: int, keep_every: Optional[int] = None, protect: Iterable[str] = (),
          dry_run: bool = False) -> list[int]:
    """Delete the complete checkpoints `plan_prune` dooms; returns their steps. Each is first renamed
    to `step_N.deleting` (out of the `step_*` namespace, atomically), then deleted, so a reader never
    sees a half-deleted checkpoint. Safe to run while a trainer saves (the trainer prunes after each
    save; `megalm-launch ckpt prune` may run at the same time): `latest` is re-read before each deletion."""
    protect = tuple(protect)
    _, doomed = plan_prune(root, keep_last, keep_every, protect)
    removed = []
    for step in doomed:
        tag = tag_for(step)
        if read_latest_pointer(root) == tag:  # `latest` moved onto it meanwhile: keep it
            continue
        if not dry_run:
            try:
                aside = _move_aside(os.path.join(root, tag))
            except FileNotFoundError:
                continue  # pruned by someone else meanwhile
            shutil.rmtree(aside, ignore_errors=True)
        removed.append(step)
    return removed
