"""`megalm-launch`: SLURM submission, the restart supervisor, run status and checkpoint upkeep.

  megalm-launch slurm submit --config RUN.yaml --nodes N|MIN-MAX --gpus-per-node G [--partition P] [--account A]
        [--time HH:MM:SS] [--constraint C] [--sbatch-extra '#SBATCH ...'] [--launcher srun|deepspeed]
        [--grace S] [--cpu-only] [--env K=V] [--max-restarts K] [--dry-run] [-- section.field=value ...]
  megalm-launch status [JOB] --run-dir DIR [--json]
  megalm-launch run --run-dir DIR [--max-restarts K] [--backoff S] [--hang-timeout S]
        [--same-step-limit K] [--min-nodes N [--node-counts 1,2,4]] -- COMMAND ...
  megalm-launch ckpt list|verify|prune --run-dir DIR [--keep-last N] [--keep-every K]
  megalm-launch hostfile --slots G [--nodelist LIST] [--output FILE]     (used inside jobs)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from megalm import rundir

from . import checkpoints, elastic, hostfile, sbatch, slurm, status
from .supervisor import Supervisor, SupervisorOptions


def _split_dashdash(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megalm-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    sl = sub.add_parser("slurm", help="SLURM jobs").add_subparsers(dest="slurm_cmd", required=True)
    s = sl.add_parser("submit", help="render the sbatch script and submit it (arguments after -- are config overrides)")
    s.add_argument("--config", required=True, help="run config YAML")
    s.add_argument("--nodes", default="1", metavar="N|MIN-MAX",
                   help="node count, or a range: SLURM may start the job on MIN..MAX nodes and it continues on "
                        "the nodes left after a node failure (elastic; the layout must allow MIN and MAX)")
    s.add_argument("--min-nodes", type=int, default=None, help="same as --nodes MIN-N")
    s.add_argument("--gpus-per-node", type=int, default=1, help="also the number of tasks per node (one per GPU)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS")
    s.add_argument("--constraint")
    s.add_argument("--cpus-per-task", type=int)
    s.add_argument("--sbatch-extra", action="append", default=[], metavar="'#SBATCH ...'",
                   help="extra #SBATCH line (repeatable)")
    s.add_argument("--launcher", choices=("srun", "deepspeed"), default="srun",
                   help="srun: one task per GPU; deepspeed: `deepspeed --hostfile --launcher slurm`")
    s.add_argument("--grace", type=int, default=120,
                   help="seconds before the time limit at which SLURM sends USR1 (checkpoint, requeue)")
    s.add_argument("--cpu-only", action="store_true",
                   help="do not request GPUs (CPU clusters); tasks per node stay --gpus-per-node")
    s.add_argument("--job-name")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="export in the job (repeatable)")
    s.add_argument("--entry", help="training script to run instead of `-m megalm.train` (must take the same arguments)")
    s.add_argument("--max-restarts", type=int, default=0,
                   help="> 0: run the step under `megalm-launch run` (restarts inside the allocation)")
    s.add_argument("--hang-timeout", type=float, default=0, help="with --max-restarts: hang detection (seconds)")
    s.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")

    st = sub.add_parser("status", help="SLURM state, restarts, latest checkpoint, last logged step")
    st.add_argument("job", nargs="?", help="job id (default: the last one recorded for the run dir)")
    st.add_argument("--run-dir", required=True)
    st.add_argument("--json", action="store_true")

    r = sub.add_parser("run", help="restart supervisor: run COMMAND (after --), restart it on failure or hang")
    r.add_argument("--run-dir", required=True, help=f"the trainer's train.run_dir ({rundir.HEARTBEAT_FILE}, {rundir.CHECKPOINTS_DIR}/)")
    r.add_argument("--max-restarts", type=int, default=3)
    r.add_argument("--backoff", type=float, default=5.0, help="first restart delay in seconds, doubled each restart")
    r.add_argument("--backoff-max", type=float, default=300.0)
    r.add_argument("--hang-timeout", type=float, default=0.0,
                   help="seconds without heartbeat progress that count as a hang (0: off); must exceed step + save time")
    r.add_argument("--startup-timeout", type=float, default=0.0,
                   help="allowance before an attempt's first heartbeat (default: max(hang-timeout, 600))")
    r.add_argument("--same-step-limit", type=int, default=3,
                   help="stop when this many attempts in a row fail at the same step (0: off)")
    r.add_argument("--kill-grace", type=float, default=10.0, help="seconds between TERM and KILL when killing")
    r.add_argument("--no-restart-codes", default="2", help="comma-separated exit codes never restarted")
    r.add_argument("--no-add-resume", action="store_true", help="do not append `--resume auto` on restarts")
    r.add_argument("--min-nodes", type=int, default=0,
                   help="elastic, inside a SLURM allocation: run the srun command on the job's nodes that are left "
                        "(re-rendering --nodes/--ntasks/--nodelist) while at least this many are; fewer: exit "
                        f"{elastic.EXIT_TOO_FEW_NODES} (the sbatch script requeues the job)")
    r.add_argument("--node-counts", default="", metavar="1,2,4",
                   help="with --min-nodes: the node counts the layout can use (default: any)")
    r.add_argument("--settle-timeout", type=float, default=60.0,
                   help="with --min-nodes: seconds to wait for SLURM to decide about a node that stopped answering")

    c = sub.add_parser("ckpt", help="list, verify or prune checkpoints")
    c.add_argument("action", choices=("list", "verify", "prune"))
    c.add_argument("--run-dir", required=True)
    c.add_argument("--tag", action="append", default=[], help="verify only these tags (default: all complete)")
    c.add_argument("--quick", action="store_true", help="verify: skip the CRC pass over every archive")
    c.add_argument("--keep-last", type=int, default=3)
    c.add_argument("--keep-every", type=int, default=None)
    c.add_argument("--dry-run", action="store_true", help="prune: show what would be deleted")
    c.add_argument("--json", action="store_true")

    h = sub.add_parser("hostfile", help="write a DeepSpeed hostfile for this SLURM allocation")
    h.add_argument("--slots", type=int, required=True)
    h.add_argument("--nodelist", default=None, help="default: $SLURM_JOB_NODELIST")
    h.add_argument("--output", default=None, help="default: stdout")
    return p


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _cmd_submit(args, overrides: list[str]) -> int:
    min_nodes, max_nodes = elastic.parse_node_range(args.nodes, args.min_nodes)
    spec = sbatch.JobSpec(config=args.config, nodes=max_nodes, min_nodes=min_nodes if min_nodes < max_nodes else None,
                          gpus_per_node=args.gpus_per_node,
                          partition=args.partition, account=args.account, time=args.time, constraint=args.constraint,
                          cpus_per_task=args.cpus_per_task, sbatch_extra=args.sbatch_extra, launcher=args.launcher,
                          grace=args.grace, cpu_only=args.cpu_only, job_name=args.job_name, overrides=overrides,
                          env=args.env, entry=args.entry, max_restarts=args.max_restarts,
                          hang_timeout=args.hang_timeout)
    if args.dry_run:
        sys.stdout.write(sbatch.render(spec))
        return 0
    job_id, script = sbatch.submit(spec)
    print(f"submitted job {job_id} (script {script}); follow it with: megalm-launch status {job_id} "
          f"--run-dir {sbatch.run_dir_of(spec.config, overrides, spec.workdir)}")
    return 0


def _cmd_run(args, command: list[str]) -> int:
    if not command:
        print("megalm-launch run: give the command after --, e.g. -- torchrun --nproc-per-node 8 -m megalm.train "
              "--config run.yaml", file=sys.stderr)
        return 2
    codes = tuple(int(c) for c in args.no_restart_codes.split(",") if c.strip())
    counts = _elastic_run_options(args, command)
    opts = SupervisorOptions(min_nodes=args.min_nodes, node_counts=counts, settle_timeout=args.settle_timeout,
                             run_dir=args.run_dir, command=command, max_restarts=args.max_restarts,
                             backoff=args.backoff, backoff_max=args.backoff_max, hang_timeout=args.hang_timeout,
                             startup_timeout=args.startup_timeout, same_step_limit=args.same_step_limit,
                             kill_grace=args.kill_grace, no_restart_codes=codes, add_resume=not args.no_add_resume)
    return Supervisor(opts).run()


def _elastic_run_options(args, command: list[str]) -> tuple[int, ...]:
    """Checks `run --min-nodes/--node-counts` before anything starts; returns the node counts."""
    if args.min_nodes < 0 or (args.node_counts and not args.min_nodes):
        raise elastic.ElasticError(f"--min-nodes must be >= 1 (got {args.min_nodes}); --node-counts needs it")
    if not args.min_nodes:
        return ()
    elastic.tasks_per_node(command)  # the command must be srun ... --ntasks-per-node=G
    if not os.environ.get("SLURM_JOB_ID"):
        raise elastic.ElasticError("--min-nodes: not inside a SLURM allocation (SLURM_JOB_ID is unset); it reads the "
                                   "job's nodes from SLURM: run it in an sbatch script (megalm-launch slurm submit "
                                   "--nodes MIN-MAX writes one) or drop --min-nodes")
    try:
        counts = tuple(sorted({int(c) for c in args.node_counts.split(",") if c.strip()}))
    except ValueError:
        raise elastic.ElasticError(f"--node-counts {args.node_counts!r}: expected comma-separated node counts, "
                                   "e.g. 1,2,4") from None
    if counts and (counts[0] < 1 or not any(c >= args.min_nodes for c in counts)):
        raise elastic.ElasticError(f"--node-counts {args.node_counts}: no count >= --min-nodes {args.min_nodes}")
    return counts


def _cmd_ckpt(args) -> int:
    if args.action == "list":
        entries = checkpoints.list_checkpoints(args.run_dir)
        if args.json:
            print(json.dumps([dict(tag=e.tag, step=e.step, status=e.status, saved_at=e.saved_at,
                                   size_bytes=e.size_bytes, layout=e.layout, latest=e.is_latest) for e in entries]))
            return 0
        if not entries:
            print(f"no checkpoints under {checkpoints.checkpoint_root(args.run_dir)}")
            return 0
        print(f"{'tag':<22} {'step':>9}  {'saved':<19}  {'size':>10}  {'status':<12}  layout")
        for e in entries:
            saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.saved_at)) if e.saved_at else "-"
            tag = e.tag + (" (latest)" if e.is_latest else "")
            print(f"{tag:<22} {e.step:>9}  {saved:<19}  {_human_size(e.size_bytes):>10}  {e.status:<12}  {e.layout_text()}")
        return 0
    if args.action == "verify":
        result = checkpoints.verify(args.run_dir, args.tag or None, quick=args.quick)
        if args.json:
            print(json.dumps(result))
        elif not result:
            print(f"no complete checkpoints under {checkpoints.checkpoint_root(args.run_dir)}")
        else:
            for tag, problems in result.items():
                print(f"{tag}: {'OK' if not problems else 'BAD'}")
                for prob in problems:
                    print(f"  - {prob}")
        bad = any(result.values())
        return 1 if bad or (args.tag and not result) else 0
    try:
        removed = checkpoints.prune(args.run_dir, args.keep_last, args.keep_every, dry_run=args.dry_run)
    except ValueError as e:
        print(f"megalm-launch ckpt prune: {e}", file=sys.stderr)
        return 2
    verb = "would delete" if args.dry_run else "deleted"
    if args.json:
        print(json.dumps({"deleted" if not args.dry_run else "would_delete": [e.tag for e in removed]}))
    else:
        for e in removed:
            print(f"{verb} {e.tag}")
        if not removed:
            print("nothing to prune")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    head, tail = _split_dashdash(argv)
    args = build_parser().parse_args(head)
    try:
        if args.cmd == "slurm":
            return _cmd_submit(args, tail)
        if tail and args.cmd != "run":
            print(f"megalm-launch {args.cmd}: unexpected arguments after --: {tail}", file=sys.stderr)
            return 2
        if args.cmd == "run":
            return _cmd_run(args, tail)
        if args.cmd in ("status", "ckpt") and not os.path.isdir(args.run_dir):
            # A mistyped --run-dir would otherwise read as a run with no checkpoints and no steps.
            what = "exists but is not a directory" if os.path.exists(args.run_dir) else "does not exist"
            print(f"megalm-launch {args.cmd}: run directory {args.run_dir} {what}: check --run-dir (the run's "
                  f"train.run_dir)", file=sys.stderr)
            return 2
        if args.cmd == "status":
            st = status.collect(args.run_dir, args.job)
            print(json.dumps(st) if args.json else status.format_status(st))
            return 0
        if args.cmd == "ckpt":
            return _cmd_ckpt(args)
        if args.cmd == "hostfile":
            nodelist = args.nodelist or os.environ.get("SLURM_JOB_NODELIST")
            if not nodelist:
                print("megalm-launch hostfile: no --nodelist and SLURM_JOB_NODELIST is unset", file=sys.stderr)
                return 2
            if args.output:
                hostfile.write_hostfile(args.output, nodelist, args.slots)
            else:
                sys.stdout.write(hostfile.render_hostfile(hostfile.expand_nodelist(nodelist), args.slots))
            return 0
    except (sbatch.SubmitError, slurm.SlurmError, elastic.ElasticError) as e:
        print(f"megalm-launch: {e}", file=sys.stderr)
        return 2
    return 2
