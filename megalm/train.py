"""Training entry point: `python -m megalm.train --config RUN.yaml [section.field=value ...]`.

Works unchanged under `deepspeed` (--num_gpus / --hostfile), `torchrun`, `srun` and `mpirun`: the
launcher's variables are mapped onto RANK/WORLD_SIZE/... before torch.distributed starts. Config errors
(bad layout, batch sizes, missing shards) are reported before any process group is created.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from megalm.config import ConfigError
from megalm.config.run import load_run_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megalm-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (configs/run/*.yaml)")
    p.add_argument("--resume", default=None,
                   help="'auto' continues from RUN_DIR/checkpoints/latest when present; or a tag like step_00000100")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.lr=1e-3 parallel.tp=2")
    return p.parse_args(argv)


def quiet_known_warnings() -> None:
    """Silence two warnings that fire every step from inside DeepSpeed and drown the logs:
    its pipeline p2p goes through `broadcast` on gloo, which autograd flags although the gradients are
    right (the layout-equivalence tests check them), and its use of since-renamed collectives."""
    warnings.filterwarnings("ignore", message=r"c10d::broadcast_: an autograd kernel was not registered")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch.distributed.*is deprecated")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_known_warnings()
    try:
        cfg = load_run_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"megalm-train: config error: {e}", file=sys.stderr)
        return 2
    from megalm.training import launch_env

    launch = launch_env.discover()
    launch_env.export(launch)
    try:
        cfg.check_launch(launch.world_size)
    except ConfigError as e:
        print(f"megalm-train: config error: {e}", file=sys.stderr)
        return 2
    from megalm.training.loop import train  # imports torch/deepspeed: only after the cheap checks

    return train(cfg, launch, resume=args.resume)


if __name__ == "__main__":
    sys.exit(main())
