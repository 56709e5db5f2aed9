"""`megalm-launch run`: keep a training command alive — restart it after failures, detect hangs.

The command (a trainer, or a multi-process launcher such as torchrun, deepspeed or srun) runs in its
own process group. The supervisor:
  * restarts it when it exits non-zero (a dead rank makes the launcher tear down the others and exit
    non-zero; after any exit the supervisor also kills what is left of the command's process group and
    process tree: torchrun starts workers in sessions of their own, and the supervisor is a Linux
    child subreaper, so ranks orphaned by a dead launcher are still found), adding
    `--resume auto` when the command has no `--resume`, with exponential back-off, up to --max-restarts;
  * watches RUN_DIR/heartbeat.json (rewritten by rank 0 every step): when it has not changed for
    --hang-timeout seconds (--startup-timeout before the first beat of an attempt), the group gets
    SIGUSR2 (every rank dumps its stacks to RUN_DIR/stacks/; the supervisor prints them in rank
    order), then TERM, then KILL, and the command restarts;
  * stops with a clear message and exit code 1 when --same-step-limit attempts in a row fail at the
    same step (a deterministic crash would otherwise loop until the time limit);
  * does not restart exit codes listed in --no-restart-codes (default 2: a config error);
  * with --min-nodes N (inside a SLURM allocation started with --no-kill): before each attempt asks SLURM
    which of the job's nodes are left and re-renders the srun command for them (`launcher/elastic.py`);
    fewer than N left: exit 75, on which the sbatch script requeues the job;
  * forwards SIGTERM/SIGUSR1/SIGINT to the command's processes as SIGTERM (the trainer checkpoints and
    exits 0) and then exits with the command's code, without restarting.
Every restart and its reason is a JSON line in RUN_DIR/restarts.jsonl. The attempt number is exported
to the command as MEGALM_RESTART (0 for the first start).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from megalm import rundir

from . import elastic
from .checkpoints import latest_complete_step


@dataclass
class SupervisorOptions:
    run_dir: str
    command: list[str]
    max_restarts: int = 3
    backoff: float = 5.0
    backoff_max: float = 300.0
    hang_timeout: float = 0.0  # 0 = no hang detection
    startup_timeout: float = 0.0  # 0 = max(hang_timeout, 600)
    same_step_limit: int = 3
    kill_grace: float = 10.0
    no_restart_codes: tuple[int, ...] = (2,)
    poll_interval: float = 0.5
    add_resume: bool = True
    min_nodes: int = 0  # > 0: elastic (see launcher/elastic.py); needs SLURM_JOB_ID and an srun command
    node_counts: tuple[int, ...] = ()  # the node counts the layout can use (empty: any)
    settle_timeout: float = 60.0  # how long to wait for SLURM to decide about a node that stopped answering


@dataclass
class Attempt:
    index: int
    exit_code: Optional[int] = None
    reason: str = ""
    step: Optional[int] = None  # heartbeat step when it failed (None: never beat)
    hung: bool = False


def _proc_table() -> dict[int, tuple[int, int]]:
    """{pid: (ppid, start time)} from /proc (Linux); empty where /proc is unavailable."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def descendants(root: int) -> dict[int, int]:
    """{pid: start time} of every process below `root`."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out[child] = table[child][1]
                todo.append(child)
    return out


def _become_subreaper() -> None:
    """Orphans of the command (ranks whose launcher died) are re-parented to us, so we can still find
    and kill them. Linux only; best effort."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def log(msg: str) -> None:
    print(f"[megalm-launch run {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def print_stacks(run_dir: str, since: float) -> int:
    """Print the per-rank stack dumps written since `since` (epoch s), one block per rank in rank order,
    so a hung rank's stack reads top to bottom instead of interleaved with the others'. Returns the count."""
    shown = 0
    for rank, path in rundir.stack_files(run_dir):  # written on SIGUSR2 by megalm/training/signals.py
        try:
            if os.path.getmtime(path) < since - 1.0:
                continue  # an earlier attempt's rank that is no longer part of the job
            with open(path, errors="replace") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text:
            log(f"stacks of {rundir.rank_label(rank)} ({path}):\n{text}")
            shown += 1
    return shown


def read_heartbeat(run_dir: str) -> Optional[dict]:
    try:
        with open(rundir.heartbeat_file(run_dir)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None  # absent, or caught between the trainer's write and rename


def command_for_attempt(command: list[str], attempt: int, add_resume: bool) -> list[str]:
    if attempt == 0 or not add_resume or any(a == "--resume" or a.startswith("--resume=") for a in command):
        return list(command)
    return list(command) + ["--resume", "auto"]


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    def __init__(self, opts: SupervisorOptions):
        self.opts = opts
        self.proc: Optional[subprocess.Popen] = None
        self.stop_signal: Optional[int] = None
        self._tree: dict[int, int] = {}  # pid -> start time of every process the command started

    # -- signals ---------------------------------------------------------------------------------------
    def _forward(self, signum, frame) -> None:
        self.stop_signal = signum
        if self.proc is not None and self.proc.poll() is None:
            # TERM for all three: the trainer treats TERM like USR1 (checkpoint, exit 0), and launchers such
            # as torchrun handle TERM but die of USR1.
            sig = signal.SIGTERM
            log(f"received {signal.Signals(signum).name}: forwarding {signal.Signals(sig).name} to the command; no restart")
            self._signal_group(sig)

    def _signal_group(self, sig: int) -> None:
        """The command's process group plus every process of its tree: launchers such as torchrun start
        their workers in sessions of their own, out of reach of a group signal."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        self._tree.update(descendants(os.getpid()))
        table = _proc_table()
        for pid, started in list(self._tree.items()):
            if pid == self.proc.pid and self.proc.returncode is not None:
                continue
            if table.get(pid, (None, None))[1] != started:  # gone (or the pid was reused): leave it
                self._tree.pop(pid, None)
                continue
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _reap_orphans(self) -> None:
        """Collect the exit status of adopted orphans (we are their subreaper), never the command's."""
        for pid, (ppid, _) in _proc_table().items():
            if ppid == os.getpid() and (self.proc is None or pid != self.proc.pid):
                try:
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass

    def _kill_group(self, grace: float) -> None:
        """TERM then KILL the whole process tree (stragglers included), waiting for the command."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def _kill_leftovers(self, grace: float) -> None:
        """After the command exited: ranks it left behind get TERM, then KILL."""
        self._tree.update(descendants(os.getpid()))
        self._tree.pop(self.proc.pid, None)
        if not self._tree:
            return
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self._reap_orphans()
            if not descendants(os.getpid()):
                break
            time.sleep(0.1)
        self._signal_group(signal.SIGKILL)
        time.sleep(0.1)
        self._reap_orphans()
        self._tree.clear()

    # -- one attempt -----------------------------------------------------------------------------------
    def _run_attempt(self, index: int, plan: Optional[elastic.StepPlan] = None) -> Attempt:
        o = self.opts
        cmd = command_for_attempt(plan.command if plan else o.command, index, o.add_resume)
        env = dict(os.environ, MEGALM_RESTART=str(index))
        if plan is not None and plan.master_addr:
            env["MASTER_ADDR"] = plan.master_addr  # rank 0 runs on the first node that is left
        log(f"attempt {index}: {' '.join(cmd)}")
        before = read_heartbeat(o.run_dir)
        last_seen = before
        last_change = time.monotonic()
        beat_this_attempt = False
        startup = o.startup_timeout or max(o.hang_timeout, 600.0)
        self._tree.clear()
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        attempt = Attempt(index)
        while True:
            try:
                code = self.proc.wait(timeout=o.poll_interval)
                break
            except subprocess.TimeoutExpired:
                pass
            self._tree.update(descendants(self.proc.pid))  # remembered: orphans lose their parent link
            if not o.hang_timeout or self.stop_signal is not None:
                continue
            hb = read_heartbeat(o.run_dir)
            if hb is not None and hb != last_seen:
                last_seen, last_change, beat_this_attempt = hb, time.monotonic(), True
                continue
            limit = o.hang_timeout if beat_this_attempt else startup
            idle = time.monotonic() - last_change
            if idle > limit:
                step = last_seen.get("step") if (beat_this_attempt and last_seen) else None
                what = f"at step {step}" if step is not None else "before the first heartbeat"
                attempt.hung = True
                attempt.reason = f"hang: no heartbeat progress for {idle:.0f}s {what}"
                log(f"{attempt.reason}; dumping stacks (SIGUSR2), then killing the process group")
                dumped_at = time.time()
                self._signal_group(signal.SIGUSR2)
                time.sleep(min(3.0, o.kill_grace))
                if not print_stacks(o.run_dir, dumped_at):
                    log(f"no stack dumps in {rundir.stacks_dir(o.run_dir)} (a trainer other than megalm's "
                        "prints them to its own stderr, if at all)")
                self._kill_group(o.kill_grace)
                code = self.proc.returncode
                break
        # Whatever exited, leave nothing of the tree behind (ranks a launcher failed to reap).
        self._kill_leftovers(o.kill_grace)
        attempt.exit_code = code
        if not attempt.hung:
            attempt.reason = describe_exit(code)
        hb = read_heartbeat(o.run_dir)
        if hb is not None and hb != before:
            attempt.step = hb.get("step")
        else:
            attempt.step = None
        return attempt

    # -- the loop --------------------------------------------------------------------------------------
    def _record(self, event: dict) -> None:
        os.makedirs(self.opts.run_dir, exist_ok=True)
        event = dict(time=time.time(), **event)
        with open(rundir.restarts_file(self.opts.run_dir), "a") as f:
            f.write(json.dumps(event) + "\n")

    def _plan(self, index: int) -> Optional[elastic.StepPlan]:
        o = self.opts
        plan = elastic.plan_step(o.command, os.environ["SLURM_JOB_ID"], o.min_nodes, o.node_counts,
                                 settle_timeout=o.settle_timeout if index else 0.0, overlap=index > 0)
        if plan is None:
            return None
        if len(plan.nodes) < len(plan.left):
            log(f"{len(plan.left)} node(s) left; the layout uses {len(plan.nodes)} (--node-counts "
                f"{','.join(map(str, o.node_counts))}): {','.join(plan.left[len(plan.nodes):])} stay idle")
        elastic.record_step(o.run_dir, dict(event="step", attempt=index, nodes=",".join(plan.nodes),
                                  num_nodes=len(plan.nodes), ntasks=plan.ntasks))
        return plan

    def run(self) -> int:
        o = self.opts
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._forward)
        _become_subreaper()
        failures_at_step: list[Optional[int]] = []
        restarts = 0
        index = 0
        nodes: Optional[list[str]] = None
        while True:
            plan = self._plan(index) if o.min_nodes else None
            if o.min_nodes and plan is None:
                msg = (f"fewer than --min-nodes {o.min_nodes} usable node(s) left in job {os.environ['SLURM_JOB_ID']}; "
                       f"exiting {elastic.EXIT_TOO_FEW_NODES} so that the job is requeued onto enough nodes")
                log(msg)
                self._record(dict(event="too_few_nodes", attempt=index, min_nodes=o.min_nodes, message=msg))
                return elastic.EXIT_TOO_FEW_NODES
            if plan is not None:
                if nodes is not None and plan.nodes != nodes:
                    log(f"attempt {index} runs on {len(plan.nodes)} node(s) instead of {len(nodes)}: {','.join(plan.nodes)}")
                    failures_at_step.clear()  # another world: not the same failure repeating
                nodes = plan.nodes
            attempt = self._run_attempt(index, plan)
            if plan is not None:
                elastic.record_step(o.run_dir, dict(event="step_end", attempt=index, exit_code=attempt.exit_code,
                                          reason=attempt.reason))
            if attempt.exit_code == 0 and not attempt.hung:
                log(f"attempt {index} finished (exit 0)")
                return 0
            if self.stop_signal is not None:
                log(f"stopped by {signal.Signals(self.stop_signal).name}: {attempt.reason}; not restarting")
                code = attempt.exit_code
                return 0 if code == 0 else (code if code and code > 0 else 1)
            # Where it failed: the heartbeat step, or (no beat this attempt) the checkpoint it resumed from.
            step = attempt.step if attempt.step is not None else latest_complete_step(o.run_dir)
            failures_at_step.append(step)
            code = attempt.exit_code if attempt.exit_code is not None else 1
            if not attempt.hung and code in o.no_restart_codes:
                msg = f"{attempt.reason} is not restartable (--no-restart-codes); giving up"
                log(msg)
                self._record(dict(event="gave_up", attempt=index, reason=attempt.reason, step=step, message=msg))
                return code
            same = failures_at_step[-o.same_step_limit:]
            if o.same_step_limit > 0 and len(same) == o.same_step_limit and len(set(same)) == 1:
                msg = (f"giving up: {o.same_step_limit} attempts in a row failed at the same step {step} "
                       f"(last: {attempt.reason}); restarting again would repeat it - fix the cause "
                       f"(see the log above) and resume with --resume auto")
                log(msg)
                self._record(dict(event="gave_up", attempt=index, reason=attempt.reason, step=step, message=msg))
                return 1
            if restarts >= o.max_restarts:
                msg = f"giving up: {attempt.reason} and the restart budget (--max-restarts {o.max_restarts}) is spent"
                log(msg)
                self._record(dict(event="gave_up", attempt=index, reason=attempt.reason, step=step, message=msg))
                return code if code > 0 else 1
            delay = min(o.backoff * (2 ** restarts), o.backoff_max)
            restarts += 1
            self._record(dict(event="restart", attempt=index + 1, restart=restarts, reason=attempt.reason,
                              exit_code=attempt.exit_code, step=step, resume_step=latest_complete_step(o.run_dir),
                              backoff_s=delay))
            log(f"attempt {index} failed at step {step}: {attempt.reason}; restart {restarts}/{o.max_restarts} "
                f"in {delay:.1f}s from checkpoint step {latest_complete_step(o.run_dir)}")
            deadline = time.monotonic() + delay
            while time.monotonic() < deadline and self.stop_signal is None:
                time.sleep(min(0.2, delay))
            if self.stop_signal is not None:
                return 1
            index += 1


def read_restarts(run_dir: str) -> list[dict]:
    path = rundir.restarts_file(run_dir)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out
