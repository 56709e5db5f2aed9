"""Training entry point: `python -m megalm.train --config RUN.yaml [section.field=value ...]`.

Works unchanged under `deepspeed` (--num_gpus / --hostfile), `torchrun`, `srun` and `mpirun`: the
launcher's variables are mapped onto RANK/WORLD_SIZE/... before torch.distributed starts. Config errors
(bad layout, batch sizes, missing shards) are reported before any process group is created; those and
the other user errors (megalm/user_errors.py: corrupt shards and checkpoints, a full disk) as one line from
rank 0 and exit status 2 on every rank.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

from megalm.config.run import load_run_config
from megalm.user_errors import EXIT_CODE, TORCH_FREE_USER_ERRORS, message, user_errors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megalm-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (configs/run/*.yaml)")
    p.add_argument("--resume", default=None,
                   help="'auto' continues from RUN_DIR/checkpoints/latest when present; or a tag like step_00000100")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.lr=1e-3 parallel.tp=2")
    # Intermixed: overrides may come after options too (`--resume auto train.lr=1e-4`).
    return p.parse_intermixed_args(argv)


def quiet_known_warnings() -> None:
    """Silence two warnings that fire every step from inside DeepSpeed and drown the logs:
    its pipeline p2p goes through `broadcast` on gloo, which autograd flags although the gradients are
    right (the layout-equivalence tests check them), and its use of since-renamed collectives."""
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch.distributed.*is deprecated")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_known_warnings()
    from megalm.training import launch_env  # torch-free: only maps the launcher's variables

    rank = 0
    try:
        launch = launch_env.discover()
        rank = launch.rank  # before the config, so that only rank 0 reports even a YAML error
        cfg = load_run_config(args.config, args.overrides)
        launch_env.export(launch)
        from megalm.training.resume import check_resume_layout  # torch-free

        check_resume_layout(cfg, launch.world_size, args.resume)  # another dp: can this world continue?
        cfg.check_launch(launch.world_size)  # layout, batch sizes, shard headers: no process group yet
    except TORCH_FREE_USER_ERRORS as e:
        return _report(e, rank)
    from megalm.training.loop import train  # imports torch/deepspeed: only after the cheap checks

    try:
        return train(cfg, launch, resume=args.resume)
    except user_errors() as e:
        # Raised after the process group started (a corrupt checkpoint, a full disk): in the common case
        # every rank raises the same error, since they read the same files, so each tears its group down
        # here and exits without waiting in a collective for peers that are gone.
        _destroy_process_group()
        return _report(e, rank)


# torchrun and `srun --kill-on-bad-exit` kill every rank as soon as one exits non-zero: the other ranks
# (which raised the same error) wait this long, so rank 0 has printed the one report before it is killed.
REPORT_GRACE_S = 5.0


def _report(e: BaseException, rank: int) -> int:
    if rank == 0:
        print(message(e), file=sys.stderr, flush=True)
    else:
        time.sleep(REPORT_GRACE_S)
    return EXIT_CODE


def _destroy_process_group() -> None:
    import torch.distributed as dist

    from megalm.parallel.grid import destroy_process_grid

    if dist.is_available() and dist.is_initialized():
        destroy_process_grid()
        dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
