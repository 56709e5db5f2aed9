"""Helpers of bench/gpu_check.sh: environment facts, a collective-auditing wrapper of the trainer, and the
judging of each check's output into one row of the final markdown table.

    python bench/gpu_check.py env ROWS                                    # versions, device, peak
    python bench/gpu_check.py audit-train AUDIT_DIR -- TRAIN_ARGS...      # under torchrun: megalm.train,
                                                                          # every collective recorded
    python bench/gpu_check.py train ROWS --check C --run-dir D --steps N --rc RC --log LOG [--covers T]
    python bench/gpu_check.py ranks ROWS --check C --run-dir D --audit-dir A --world W --steps N --rc RC ...
    python bench/gpu_check.py bench ROWS --check C --json J --rc RC --log LOG
    python bench/gpu_check.py jit ROWS --ext-dir E --logs L
    python bench/gpu_check.py row ROWS --check C --result R --figures F [--covers T]
    python bench/gpu_check.py table ROWS [--md PATH] [--title LINE]

ROWS is a JSON-lines file; `table` renders it (and writes PATH). Nothing here imports torch except `env`
and `audit-train`, so judging works even when the environment is broken.
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import json
import math
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- rows and the table
def add_row(rows: str, check: str, result: str, figures: str, covers: str = "") -> None:
    with open(rows, "a") as f:
        f.write(json.dumps({"check": check, "result": result, "figures": figures, "covers": covers}) + "\n")
    print(f"[gpu_check] {check}: {result} -- {figures}", flush=True)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def table(rows: str, md: str | None, title: str = "") -> int:
    lines = ([title, ""] if title else []) + ["| check | result | figures | covers |", "|---|---|---|---|"]
    failed = 0
    if os.path.exists(rows):
        with open(rows) as f:
            for line in f:
                r = json.loads(line)
                failed += r["result"].startswith("FAIL")
                lines.append("| " + " | ".join(_cell(r[k]) for k in ("check", "result", "figures", "covers")) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if md:
        with open(md, "w") as f:
            f.write(text)
    return 1 if failed else 0


def failure_reason(rc: int, log: str | None, limit: str | None) -> str:
    if rc in (124, 137):
        return f"timed out after {limit or '?'} s"
    last = ""
    if log and os.path.exists(log):
        with open(log, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
        errors = [ln for ln in lines if any(k in ln for k in ("Error", "error:", "Exception", "FAILED", "refus"))]
        last = (errors or lines or [""])[-1]
        for prefix in ("[rank0]:", "[rank1]:"):
            last = last.removeprefix(prefix).strip()
    return f"exit {rc}" + (f": {last[:240]}" if last else "")


# ---------------------------------------------------------------- environment
def env(rows: str) -> int:
    import platform

    import torch

    facts = [f"Python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    ok = torch.cuda.is_available()
    name = torch.cuda.get_device_name(0) if ok else "no CUDA device"
    if ok:
        p = torch.cuda.get_device_properties(0)
        facts.append(f"{name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
                     f"{torch.cuda.device_count()} visible)")
        sys.path.insert(0, REPO)
        from bench.gpu import dense_bf16_peak_tflops

        peak = dense_bf16_peak_tflops(name)
        facts.append(f"dense bf16 peak {peak:g} TFLOP/s" if peak else "dense bf16 peak unknown")
        print(f"PEAK={peak or ''}")
        try:
            import subprocess

            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=20).stdout.split()
            if driver:
                facts.append(f"driver {driver[0]}")
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        facts.append(name)
    try:
        import deepspeed
        from deepspeed.git_version_info import installed_ops

        built = sorted(k for k, v in installed_ops.items() if v)
        facts.append(f"DeepSpeed {deepspeed.__version__} (prebuilt ops: {', '.join(built) or 'none'}; "
                     f"accelerator {deepspeed.accelerator.get_accelerator().device_name()})")
    except Exception as e:  # noqa: BLE001 - reported in the table
        ok = False
        facts.append(f"DeepSpeed not importable: {type(e).__name__}: {e}")
    result = "PASS" if ok else "FAIL: " + ("no CUDA device" if not torch.cuda.is_available() else "DeepSpeed")
    add_row(rows, "environment", result, "; ".join(facts), "versions, device, peak used for MFU")
    return 0 if ok else 1


# ---------------------------------------------------------------- metrics of a training run
def read_train_metrics(run_dir: str) -> list[dict]:
    from megalm import rundir

    path = rundir.metrics_file(run_dir)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("kind", "train") == "train"]


def judge_curve(metrics: list[dict], steps: int) -> tuple[list[str], str]:
    """Problems (empty: good) and a figures string: loss first -> final, tokens/s, MFU, peak memory."""
    problems = []
    if not metrics:
        return ["no training metrics logged"], ""
    losses = [m["loss"] for m in metrics]
    if metrics[-1]["step"] != steps:
        problems.append(f"stopped at step {metrics[-1]['step']} of {steps}")
    if not all(math.isfinite(x) for x in losses):
        problems.append(f"non-finite loss at step(s) {[m['step'] for m in metrics if not math.isfinite(m['loss'])]}")
    k = min(3, len(losses) // 2) or 1
    head, tail = statistics.mean(losses[:k]), statistics.mean(losses[-k:])
    if not tail < head:
        problems.append(f"loss not falling (mean of first {k} {head:.3f}, last {k} {tail:.3f})")
    if any(m.get("skipped_steps", 0) for m in metrics[-1:]):
        problems.append(f"{metrics[-1]['skipped_steps']} skipped update(s)")
    steady = metrics[len(metrics) // 4:] if len(metrics) >= 4 else metrics  # the first steps warm up
    tok = statistics.median(m["tokens_per_s"] for m in steady)
    figures = f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {metrics[-1]['step']} steps; {tok:,.0f} tokens/s"
    mfu = [m["mfu"] for m in steady if m.get("mfu") is not None]
    if mfu:
        figures += f" (MFU {100 * statistics.median(mfu):.1f}%)"
    figures += f"; peak memory {max(m.get('peak_mem_gib', 0.0) for m in metrics):.2f} GiB"
    return problems, figures


def judge_train(a) -> int:
    problems, figures = judge_curve(read_train_metrics(a.run_dir), a.steps)
    if a.rc != 0:
        problems.insert(0, failure_reason(a.rc, a.log, a.limit))
    result = "FAIL: " + "; ".join(problems) if problems else "PASS"
    add_row(a.rows, a.check, result, figures or "-", a.covers)
    return 0


# ---------------------------------------------------------------- several ranks on one GPU (gloo)
_AUDITED = ["all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
            "reduce_scatter", "reduce", "all_to_all_single", "all_to_all", "send", "recv", "isend", "irecv",
            "gather", "scatter", "_all_gather_base", "_reduce_scatter_base", "all_reduce_coalesced"]


def _first_tensor(args, kwargs):
    import torch

    for v in list(args) + list(kwargs.values()):
        if torch.is_tensor(v):
            return v
        if isinstance(v, (list, tuple)):
            for w in v:
                if torch.is_tensor(w):
                    return w
                if isinstance(w, (list, tuple)) and w and torch.is_tensor(w[0]):
                    return w[0]
    return None


def _issuer() -> str:
    """Who issued the collective: the innermost frame outside torch, DeepSpeed's comm wrappers and this file
    (by module name: an installed package's path may well contain '/torch/', e.g. /opt/torch/.venv)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if not (frame.f_globals is globals() or module == "torch" or module.startswith(("torch.", "deepspeed.comm"))):
            if module.split(".")[0] in ("megalm", "deepspeed"):
                return module.split(".")[0]
            return "other:" + module
        frame = frame.f_back
    return "unknown"


def audit_train(audit_dir: str, train_args: list[str]) -> int:
    """megalm.train with every torch.distributed collective counted by (issuer, op, tensor device)."""
    sys.path[0] = REPO  # not bench/: its train.py etc. must not shadow anything
    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    counts: collections.Counter = collections.Counter()

    def wrap(name, fn):
        @functools.wraps(fn)
        def audited(*args, **kwargs):
            t = _first_tensor(args, kwargs)
            counts[f"{_issuer()}|{name}|{t.device.type if t is not None else 'none'}"] += 1
            return fn(*args, **kwargs)
        return audited

    for name in _AUDITED:
        for mod in (dist, c10d):
            fn = getattr(mod, name, None)
            if fn is not None:
                setattr(mod, name, wrap(name, fn))
    rank = os.environ.get("RANK", "0")
    code = 1
    try:
        from megalm.train import main

        code = main(train_args)
        return code
    finally:
        from megalm.parallel.device import run_device

        os.makedirs(audit_dir, exist_ok=True)
        try:
            device = str(run_device())
        except Exception as e:  # noqa: BLE001
            device = f"unknown ({e})"
        report = {"global_rank": int(rank), "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "exit": code,
                  "run_device": device, "backend": os.environ.get("MEGALM_DIST_BACKEND", ""),
                  "cuda_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0,
                  "collectives": dict(counts)}
        with open(os.path.join(audit_dir, f"collectives-{int(rank):05d}.json"), "w") as f:
            json.dump(report, f, indent=1)


def judge_ranks(a) -> int:
    problems, figures = judge_curve(read_train_metrics(a.run_dir), a.steps)
    if a.rc != 0:
        problems.insert(0, failure_reason(a.rc, a.log, a.limit))
    reports = []
    for path in sorted(glob.glob(os.path.join(a.audit_dir, "collectives-*.json"))):
        with open(path) as f:
            reports.append(json.load(f))
    reports.sort(key=lambda r: r["global_rank"])
    if len(reports) != a.world:
        problems.append(f"{len(reports)} of {a.world} ranks reported")
    devices = [r["run_device"] for r in reports]
    if any(not d.startswith("cuda") for d in devices):
        problems.append(f"rank devices {devices}")
    by = collections.Counter()
    cpu_megalm = collections.Counter()
    cpu_other = collections.Counter()
    for r in reports:
        for key, n in r["collectives"].items():
            issuer, op, dev = key.split("|")
            by[(issuer.split(":")[0], dev)] += n
            if dev == "cpu":
                (cpu_megalm if issuer == "megalm" else cpu_other)[f"{issuer} {op}"] += n
    if cpu_megalm:
        problems.append("megalm collectives on CPU tensors (NCCL would refuse them): "
                        + ", ".join(f"{k} x{n}" for k, n in cpu_megalm.items()))
    if not by.get(("megalm", "cuda")):
        problems.append("no megalm collective on a CUDA tensor was seen")
    devs = ", ".join(f"rank {r['global_rank']} {r['run_device']} ({r['cuda_peak_gib']:.2f} GiB)" for r in reports)
    coll = ", ".join(f"{who} {n} on {dev}" for (who, dev), n in sorted(by.items()))
    other = ("; CPU-tensor collectives outside megalm: " + ", ".join(f"{k} x{n}" for k, n in cpu_other.items())
             if cpu_other else "")
    figures = f"{devs}; collectives: {coll or 'none seen'}{other}; {figures}"
    result = "FAIL: " + "; ".join(problems) if problems else "PASS"
    add_row(a.rows, a.check, result, figures, a.covers)
    return 0


# ---------------------------------------------------------------- bench/gpu.py and JIT builds
def judge_bench(a) -> int:
    report = None
    if os.path.exists(a.json):
        with open(a.json) as f:
            report = json.load(f)
    runs = report["runs"] if report else []
    for i, r in enumerate(runs):
        mfu = f"MFU {100 * r['mfu']:.1f}% of {report['peak_tflops']:g}" if r.get("mfu") is not None else "MFU: peak unknown"
        figures = (f"{report['device']}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_s'] * 1e3:.0f} ms/step, "
                   f"{r['tflops']:.0f} TFLOP/s, {mfu}; peak memory {r['peak_gib']:.1f} GiB")
        if i > 0:
            figures += f"; ours / this = {runs[0]['tokens_per_s'] / r['tokens_per_s']:.2f}x"
        shape = (f"{report['model']} ({report['params'] / 1e9:.2f} B params) bf16, seq {report['seq_len']}, micro "
                 f"{report['micro_batch']} x global {report['global_batch']}")
        add_row(a.rows, f"{a.check}: {r['name']}", "PASS", figures, shape + ("" if i else f"; {a.covers}"))
    if a.rc != 0:
        add_row(a.rows, a.check, "FAIL: " + failure_reason(a.rc, a.log, a.limit),
                f"{len(runs)} run(s) measured before the failure" if runs else "-", a.covers)
    elif not runs:
        add_row(a.rows, a.check, "FAIL: no figures written", "-", a.covers)
    return 0


def judge_jit(a) -> int:
    built = sorted(os.listdir(a.ext_dir)) if os.path.isdir(a.ext_dir) else []
    marks = ("Building extension module", "Loading extension module", "as PyTorch extensions root")
    hits = []
    for log in sorted(glob.glob(os.path.join(a.logs, "*.log"))):
        with open(log, errors="replace") as f:
            hits += [f"{os.path.basename(log)}: {ln.strip()[:120]}" for ln in f if any(m in ln for m in marks)]
    import importlib.metadata as md

    versions = []
    for dist in ("torch", "deepspeed"):
        try:
            versions.append(f"{dist} {md.version(dist)}")
        except md.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    versions = ", ".join(versions)
    if built or hits:
        add_row(a.rows, "d. DeepSpeed JIT ops", "FAIL: JIT ops were built or loaded",
                f"{versions}; TORCH_EXTENSIONS_DIR holds {built or 'nothing'}"
                + "".join(f"; {h}" for h in hits[:3]), "JIT compiles take minutes: keep them out of timed runs")
    else:
        add_row(a.rows, "d. DeepSpeed JIT ops", "PASS", f"{versions}; no DeepSpeed op JIT-built or loaded during the "
                f"checks (DS_BUILD_OPS=0; TORCH_EXTENSIONS_DIR={a.ext_dir} left empty; no extension messages in "
                "the logs)", "optimizer is torch AdamW / GuardedAdamW, not FusedAdam")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["audit-train"]:
        rest = argv[2:]
        return audit_train(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("env", "train", "ranks", "bench", "jit", "row", "table"):
        p = sub.add_parser(name)
        p.add_argument("rows")
        p.add_argument("--check", default=name)
        p.add_argument("--covers", default="")
        p.add_argument("--rc", type=int, default=0)
        p.add_argument("--log", default=None)
        p.add_argument("--limit", default=None)
        p.add_argument("--run-dir")
        p.add_argument("--audit-dir")
        p.add_argument("--world", type=int, default=1)
        p.add_argument("--steps", type=int, default=0)
        p.add_argument("--json")
        p.add_argument("--ext-dir")
        p.add_argument("--logs")
        p.add_argument("--result")
        p.add_argument("--figures", default="-")
        p.add_argument("--md")
        p.add_argument("--title", default="")
    a = ap.parse_args(argv)
    if a.cmd == "env":
        return env(a.rows)
    if a.cmd == "table":
        return table(a.rows, a.md, a.title)
    if a.cmd == "row":
        add_row(a.rows, a.check, a.result, a.figures, a.covers)
        return 0
    return {"train": judge_train, "ranks": judge_ranks, "bench": judge_bench, "jit": judge_jit}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
