"""Interrupting `megalm-prep tokenize --workers 2` always stops it, promptly and resumably.

The fault drill's hang: SIGINT delivered to the main process only (`timeout -s INT`, `kill PID`), while
the workers were busy, left the main process waiting forever on a lock inside multiprocessing.Pool's
terminate() with zombie workers. Every way of interrupting is exercised several times, at moments
chosen by the output's progress (a shard more than before), because the hang depended on timing:
SIGINT to the main pid, SIGINT to the whole process group (Ctrl-C in a terminal), SIGTERM (scancel,
kill). Each must end the workers and exit 130 (SIGTERM: 143) with `interrupted` and no traceback,
leaving only complete shards; the interrupted runs resume one after another, and the output they end
with is byte-identical to an uninterrupted run's.
"""
from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import time

import pytest

from data_prep.manifest import shard_problem
from data_prep.pipeline import TokenizeOptions, tokenize
from launcher.supervisor import descendants
from tests.harness import signal_tree
from tests.prep_fixtures import REPO, WORDS, file_bytes, prep_cli, train_tiny_tokenizer, write_jsonl

SHARD_SIZE = 20000


@pytest.fixture(scope="module")
def slow_corpus(tmp_path_factory):
    """Long documents (one shard each), so a run lasts a few seconds and results are large (the large
    results in flight were what Pool's terminate() could deadlock on)."""
    root = tmp_path_factory.mktemp("corpus")
    tok = train_tiny_tokenizer(str(root / "tokenizer.json"))
    rng = random.Random(3)
    words = [rng.choice(WORDS[:8]) for _ in range(40000)]  # cheap to encode, so results are written often
    # 480 documents: the fast BPE path encodes 120 in ~0.5 s, and a resumed run with ~30 left then had its
    # workers finish while the main process still wrote shards ("no worker processes" at the signal)
    texts = [f"doc {i}: " + " ".join(words[i * 97 % 40000:] + words[:i * 97 % 40000]) for i in range(480)]
    corpus = write_jsonl(str(root / "long.jsonl"), [{"text": t} for t in texts])
    ref = str(root / "ref/c")
    tokenize(TokenizeOptions(inputs=[corpus], tokenizer=tok, output_prefix=ref, append_eod=True, shard_size=SHARD_SIZE,
                             progress=False))
    return corpus, tok, ref


def _shards(prefix: str) -> list[str]:
    return sorted(glob.glob(glob.escape(prefix) + "_*.idx"))


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited; only its parent can reap it
    except OSError:
        return True


def _interrupt(argv: list[str], prefix: str, how: str) -> tuple[int, str]:
    """Start the command, wait until it has written a shard more than it started with, signal it."""
    before = len(_shards(prefix))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(_shards(prefix)) <= before + 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before it could be interrupted:\n{proc.communicate()[0]}"
        time.sleep(random.uniform(0.0, 0.3))
        workers = list(descendants(proc.pid))
        assert workers, "no worker processes"
        sent = time.monotonic()
        if how == "sigint_main":
            os.kill(proc.pid, signal.SIGINT)
        elif how == "sigint_group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            signal_tree(proc.pid, signal.SIGUSR2)  # faulthandler: every thread's stack
            time.sleep(2)
            signal_tree(proc.pid, signal.SIGKILL)
            raise AssertionError(f"{how}: still running 10 s after the signal; stacks:\n{proc.communicate()[0][-8000:]}")
        assert time.monotonic() - sent < 10
        deadline = time.monotonic() + 5
        while not all(_gone(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(_gone(w) for w in workers), f"{how}: worker processes outlived the command"
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            signal_tree(proc.pid, signal.SIGKILL)
            proc.communicate()


def _check_resumable(prefix: str) -> None:
    """What an interrupted run leaves: a `complete: false` manifest whose shards all verify."""
    manifest = json.load(open(prefix + ".manifest.json"))
    assert manifest["complete"] is False
    base = os.path.dirname(prefix)
    for entry in manifest["shards"]:
        assert shard_problem(os.path.join(base, entry["name"]), entry, manifest["dtype"]) is None, entry


@pytest.mark.parametrize("how,code", [("sigint_main", 130), ("sigint_group", 130), ("sigterm", 143)])
def test_interrupt_ends_the_workers_and_the_run_resumes(tmp_path, slow_corpus, how, code):
    corpus, tok, ref = slow_corpus
    prefix = str(tmp_path / "out/c")
    argv = prep_cli("tokenize", "--input", corpus, "--tokenizer", tok, "--output-prefix", prefix, "--append-eod",
                    "--shard-size", str(SHARD_SIZE), "--workers", "2", "--no-progress")
    tries = 5 if how == "sigint_main" else 2  # the drill's hang needed several tries to show
    for attempt in range(tries):
        rc, out = _interrupt(argv, prefix, how)
        assert rc == code, f"{how} attempt {attempt}: exit {rc}, output:\n{out}"
        last = out.strip().splitlines()[-1]
        assert last == "megalm-prep tokenize: interrupted" + (" (SIGTERM)" if how == "sigterm" else ""), out
        assert "Traceback" not in out, out
        _check_resumable(prefix)
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
    assert "resume: keeping" in done.stdout
    final = json.load(open(prefix + ".manifest.json"))
    reference = json.load(open(ref + ".manifest.json"))
    assert final["complete"] is True and final["shards"] == reference["shards"]
    names = [s["name"] for s in final["shards"]]
    assert file_bytes([os.path.join(tmp_path, "out", n) for n in names]) == \
        file_bytes([os.path.join(os.path.dirname(ref), n) for n in names])
    assert not glob.glob(str(tmp_path / "out/*.tmp"))
