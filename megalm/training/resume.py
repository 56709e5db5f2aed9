"""What a resumed run may change, and the LR schedule it continues with (DESIGN decision 33).

Refused: `data.seq_len`, `data.seed` and the tokenizer (its sha256). A checkpoint's consumed_samples
counts samples of one (seq_len, seed, token ids) sample index; with another, "continue after sample N"
names different data, so the run would silently repeat or skip some.
Allowed and recorded in megalm.json `resume_changes` ([{step, field, old, new}], appended across
resumes): the data blend (paths, weights — Megatron allows it too) and the global batch (a batch ramp):
consumed_samples continues and the sample index is rebuilt for the new blend. The schedule fields are
recorded as well, since a new LR changes the run's history as much.
Layout (`check_layout`, before any process group): tp, pp and the ZeRO stage must be the checkpoint's
(another one needs `megalm-reshard`, whose layout-free step any layout resumes); the data-parallel size may change (an elastic restart on fewer or
more nodes, megalm/training/elastic.py) when the global batch still splits over it: the gradient
accumulation changes instead, so every step still consumes the same samples.
LR schedule: always the current config's (Megatron's `--override-opt_param-scheduler`): lr, min_lr,
warm-up and decay apply at the resumed step. DeepSpeed restores the scheduler's base LRs from the
checkpoint, which combined with the new config's factor gave an LR below min_lr (1e-2 over a 3e-3
checkpoint ended at 9e-5); `override_schedule` resets them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megalm.ckpt_files import universal_kinds
from megalm.config.run import RunConfig
from megalm.config.train import TrainConfig
from megalm.rundir import CheckpointError, checkpoint_root, meta_file, read_latest, read_meta

REFUSED_FIELDS = ("data.seq_len", "data.seed")
RECORDED_FIELDS = ("data.train_paths", "data.train_weights", "data.valid_paths", "train.global_batch_size",
                   "train.lr", "train.min_lr", "train.warmup_steps", "train.lr_decay", "train.lr_decay_steps")


@dataclass
class ResumePoint:
    tag: str
    meta: dict  # the checkpoint's megalm.json

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def consumed_samples(self) -> int:
        return int(self.meta["consumed_samples"])


def find_resume_point(run_dir: str, resume: Optional[str]) -> Optional[ResumePoint]:
    """The checkpoint `--resume` names (None: start fresh). `auto` without a `latest` starts fresh; a
    named tag that is not a complete checkpoint is a CheckpointError listing the complete steps."""
    if resume is None:
        return None
    root = checkpoint_root(run_dir)
    tag = read_latest(root) if resume == "auto" else resume
    if tag is None:
        return None
    return ResumePoint(tag, read_meta(root, tag))


FIXED_LAYOUT = ("tp", "pp", "zero_stage")


@dataclass
class ElasticChange:
    """A resume at another data-parallel size: the checkpoint's layout and this run's."""

    old: dict
    new: dict
    old_accumulation: int
    new_accumulation: int


def allowed_world_sizes(cfg: RunConfig) -> list[int]:
    """Every world size this run's layout and global batch can train on (tp*pp*dp with dp dividing
    global_batch_size / micro_batch_size)."""
    t = cfg.train
    per_dp = t.global_batch_size // t.micro_batch_size if t.global_batch_size % t.micro_batch_size == 0 else 0
    model_parallel = cfg.parallel.tp * cfg.parallel.pp
    return [model_parallel * dp for dp in range(1, per_dp + 1) if per_dp % dp == 0]


def check_layout(point: ResumePoint, cfg: RunConfig, world_size: int) -> Optional[ElasticChange]:
    """Before any process group: can `world_size` processes of this config resume `point`? None when the
    layout is the checkpoint's; an ElasticChange when only the data-parallel size differs; otherwise a
    CheckpointError saying what may change and how to convert the rest."""
    old = dict(point.meta.get("layout") or {})
    where = meta_file(point.tag)
    p = cfg.parallel
    new_fixed = {"tp": p.tp, "pp": p.pp, "zero_stage": p.zero_stage}
    universal = bool(universal_kinds(old))  # megalm-reshard's layout-free step: any layout may resume it
    differ = [f"{k}: checkpoint {old.get(k)} vs this run {v}" for k, v in new_fixed.items()
              if old.get(k) != v and not universal]
    if differ:
        raise CheckpointError(
            f"cannot resume {where} with another model-parallel layout ({'; '.join(differ)}): a resume may change "
            f"only the data-parallel size (the number of nodes). Convert the checkpoint first: megalm-reshard "
            f"--checkpoint {cfg.train.run_dir} --output NEW_RUN_DIR --tp {p.tp} --pp {p.pp} --zero-stage "
            f"{p.zero_stage}, then resume NEW_RUN_DIR; or set parallel.tp/pp/zero_stage back to the checkpoint's")
    model_parallel = p.tp * p.pp
    allowed = allowed_world_sizes(cfg)
    t = cfg.train
    dp = world_size // model_parallel
    if world_size % model_parallel or t.global_batch_size % (t.micro_batch_size * dp):
        raise CheckpointError(
            f"cannot resume {where} (saved at dp={old.get('dp')}, world size {old.get('world_size')}) on "
            f"{world_size} processes: train.global_batch_size {t.global_batch_size} must split into "
            f"micro_batch_size {t.micro_batch_size} x dp x gradient accumulation, with dp = world size / (tp*pp "
            f"= {model_parallel}). World sizes that keep the global batch: {allowed}; or change "
            f"train.global_batch_size (recorded as a batch change) or train.micro_batch_size")
    if universal or int(old.get("dp", dp)) == dp:
        return None
    old_dp = int(old["dp"])
    new = {"tp": p.tp, "pp": p.pp, "dp": dp, "zero_stage": p.zero_stage, "world_size": world_size}
    old_batch = ((point.meta.get("config") or {}).get("train") or {})
    old_micro = int(old_batch.get("micro_batch_size", t.micro_batch_size))
    old_global = int(old_batch.get("global_batch_size", t.global_batch_size))
    return ElasticChange(old=old, new=new, old_accumulation=old_global // (old_micro * old_dp),
                         new_accumulation=t.global_batch_size // (t.micro_batch_size * dp))


def check_resume_layout(cfg: RunConfig, world_size: int, resume: Optional[str]) -> Optional[ElasticChange]:
    """`check_layout` for the checkpoint `--resume` names (None when starting fresh)."""
    point = find_resume_point(cfg.train.run_dir, resume)
    return check_layout(point, cfg, world_size) if point is not None else None


def _field(d: dict, dotted: str) -> Any:
    section, name = dotted.split(".")
    return (d.get(section) or {}).get(name)


def resume_changes(point: ResumePoint, cfg: RunConfig, tokenizer_sha256: Optional[str]) -> list[dict]:
    """Every recorded change so far plus this resume's; raises CheckpointError listing all refused
    differences at once, so the user fixes them in one go."""
    old, new = point.meta.get("config") or {}, cfg.to_dict()
    where = meta_file(point.tag)
    refused = [f"{f}: checkpoint {_field(old, f)!r} vs this run {_field(new, f)!r}"
               for f in REFUSED_FIELDS if _field(old, f) != _field(new, f)]
    if point.meta.get("tokenizer_sha256") != tokenizer_sha256:
        refused.append(f"data.tokenizer (sha256): checkpoint {point.meta.get('tokenizer_sha256')!r} vs this run "
                       f"{tokenizer_sha256!r} ({cfg.data.tokenizer!r})")
    if refused:
        raise CheckpointError(
            f"cannot resume {where}: these change what its consumed_samples={point.consumed_samples} mean: "
            + "; ".join(refused) + ". Set them back to the checkpoint's values, or start a new run "
            "(another train.run_dir; with train.init_from=RUN_DIR to start from these weights)")
    changes = list(point.meta.get("resume_changes") or [])
    changes += [{"step": point.step, "field": f, "old": _field(old, f), "new": _field(new, f)}
                for f in RECORDED_FIELDS if _field(old, f) != _field(new, f)]
    return changes


def record_elastic_change(changes: list[dict], point: ResumePoint, change: ElasticChange) -> list[dict]:
    """`changes` plus this resume's data-parallel size and gradient accumulation (megalm.json)."""
    return changes + [{"step": point.step, "field": "layout.dp", "old": change.old.get("dp"), "new": change.new["dp"]},
                      {"step": point.step, "field": "gradient_accumulation_steps", "old": change.old_accumulation,
                       "new": change.new_accumulation}]


def train_samples_needed(point: Optional[ResumePoint], train: TrainConfig) -> int:
    """Samples the training index must cover. Unchanged batch: train_steps x G, exactly what an
    uninterrupted run builds (so resumes stay bitwise exact); after a batch change, also what is left."""
    samples = train.train_steps * train.global_batch_size
    if point is None:
        return samples
    return max(samples, point.consumed_samples + max(0, train.train_steps - point.step) * train.global_batch_size)


def override_schedule(ds_engine: Any, train: TrainConfig) -> None:
    """After DeepSpeed restored the scheduler: base LRs from the current config, and the optimizer's LR
    set for the resumed step now (the scheduler's factor already comes from the current config)."""
    sched = ds_engine.lr_scheduler
    sched.base_lrs = [train.lr for _ in sched.base_lrs]
    lrs = [base * factor(sched.last_epoch) for factor, base in zip(sched.lr_lambdas, sched.base_lrs)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"], group["initial_lr"] = lr, train.lr
    sched._last_lr = lrs  # what get_last_lr() (the logged LR) reports until the next step
