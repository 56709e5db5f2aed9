"""Task scoring through lm-evaluation-harness (`megalm-eval --tasks`, the `megalm` lm-eval model).

The reference is lm-eval's own `hf` model on the `megalm-export` of the same checkpoint: every
per-request log-likelihood agrees within 1e-4, greedy flags, generations and accuracies are identical
(shipped tasks, empty and over-long contexts, rolling windows); `--all-steps` writes a JSON per step and
TensorBoard points; an unknown task is a one-line error listing the shipped tasks; under torchrun with
--tp 2 (and as 2 data-parallel ranks) the numbers equal the single-process ones. Everything offline."""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests.harness import free_port, run_command
from tests.train_fixtures import TINY_RUN, write_synthetic_shard

import lm_eval  # noqa: F401  (pinned in requirements.txt: a missing install must fail, not skip)
import transformers

LL_ATOL = 1e-4
TASKS = "megalm_larger,megalm_copy"
BATCH = 16
# what the tokenizer learns from: code, plus the words the shipped tasks use, so prompts are multi-byte tokens
TEXTS = (["def main(argv):\n    return 0\n", "import os\nimport sys\n", "for i in range(10):\n    print(i)\n",
          "Which is larger, 37 or 52? Answer: 52\n", "Repeat: a b c -> a b c\n"] * 20)
LONG_TEXT = "".join(f"for i in range({n}):\n    print(i, {n * 7})\n" for n in range(60))  # > max_seq_len tokens


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A 1-process tiny run with the locally trained tokenizer, checkpoints at steps 2 and 4."""
    from data_prep.tokenizer import EOD_TOKEN, save_tokenizer, train_bpe

    tok = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    save_tokenizer(train_bpe(TEXTS, vocab_size=300, special_tokens=[EOD_TOKEN], min_frequency=1), tok)
    shard = write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))
    out = str(tmp_path_factory.mktemp("tasks_run") / "run")
    run_command([sys.executable, "-m", "megalm.train", "--config", TINY_RUN, f"data.train_paths=[{shard}]",
                 f"data.tokenizer={tok}", f"train.run_dir={out}", "train.train_steps=4", "train.save_interval=2"],
                timeout=300, env={"OMP_NUM_THREADS": "1"}, check=True)
    return out


@pytest.fixture(scope="module")
def models(run_dir, tmp_path_factory):
    """(ours on the checkpoint, lm-eval's hf model on its export): the latest step, CPU, fp32."""
    from lm_eval.models.huggingface import HFLM

    from megalm.eval.lm_eval_model import MegalmLM
    from megalm.export.hf import export_hf

    hf_dir = str(tmp_path_factory.mktemp("hf") / "export")
    export_hf(run_dir, hf_dir)
    ours = MegalmLM(checkpoint=run_dir, batch_size=BATCH, device="cpu")
    ref = HFLM(pretrained=hf_dir, batch_size=BATCH, device="cpu", dtype="float32")
    return ours, ref


def _by_doc(results: dict, task: str) -> dict[int, dict]:
    return {s["doc_id"]: s for s in results["samples"][task]}


def _lls(sample: dict) -> list[tuple[float, bool]]:
    """A multiple-choice sample's (log-likelihood, greedy) per choice."""
    return [tuple(r[0]) for r in sample["resps"]]


def test_shipped_tasks_match_lm_eval_hf_model(models):
    from megalm.eval.task_eval import score_tasks, task_metrics
    from megalm.eval.task_files import resolve_tasks

    ours, ref = models
    specs, manager = resolve_tasks(TASKS)
    got = score_tasks(ours, specs, manager, log_samples=True)
    want = score_tasks(ref, specs, manager, log_samples=True)

    larger, larger_ref = _by_doc(got, "megalm_larger"), _by_doc(want, "megalm_larger")
    assert sorted(larger) == sorted(larger_ref) == list(range(100))
    worst = 0.0
    for doc_id, sample in larger.items():
        a, b = _lls(sample), _lls(larger_ref[doc_id])
        assert len(a) == len(b) == 2
        assert [g for _, g in a] == [g for _, g in b], doc_id
        worst = max(worst, *(abs(x - y) for (x, _), (y, _) in zip(a, b)))
    print(f"max |loglikelihood difference| vs lm-eval hf: {worst:.3g}")
    assert worst <= LL_ATOL
    spread = {round(ll, 3) for s in larger.values() for ll, _ in _lls(s)}
    assert len(spread) > 20  # real, varied numbers, not a constant both sides could agree on

    copy, copy_ref = _by_doc(got, "megalm_copy"), _by_doc(want, "megalm_copy")
    assert sorted(copy) == sorted(copy_ref) == list(range(100))
    assert {d: s["resps"] for d, s in copy.items()} == {d: s["resps"] for d, s in copy_ref.items()}
    assert any(s["resps"][0][0] for s in copy.values())  # the model generated text, not only stop tokens

    print(f"metrics (ours == hf): {task_metrics(got)}")
    assert task_metrics(got) == task_metrics(want)
    assert set(task_metrics(got)) == {"megalm_larger", "megalm_copy"}


def test_edge_requests_match_lm_eval_hf_model(models):
    """Empty context (the end-of-text prefix), a context past max_seq_len (cut from the left), a trailing
    space moved into the continuation, a split inside a token (continuation = encode(whole) minus
    encode(context)), and rolling windows over a text longer than max_seq_len."""
    from lm_eval.api.instance import Instance

    ours, ref = models
    assert len(ours.tok_encode(LONG_TEXT)) > 2 * ours.max_length
    # "for i in ra" + "nge(10)": the split falls inside a token of the whole text's encoding
    pairs = [("", "import os"), (LONG_TEXT, "    print(i)"), ("Which is larger, 37 or 52? Answer: ", "52"),
             ("import", " sys\n"), ("for i in ra", "nge(10):")]
    ll = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    a, b = ours.loglikelihood(ll), ref.loglikelihood(ll)
    assert [g for _, g in a] == [g for _, g in b]
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b)) <= LL_ATOL

    texts = [LONG_TEXT, "def main(argv):\n    return 0\n"]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    a, b = ours.loglikelihood_rolling(rolling), ref.loglikelihood_rolling(rolling)
    print(f"rolling log-likelihoods: ours {a}, hf {b}")
    assert max(abs(x - y) for x, y in zip(a, b)) <= LL_ATOL
    assert a[0] < a[1] < 0


def test_registered_model_from_model_args(run_dir, models):
    """lm-eval finds `megalm` by name (and still its own `hf`); model_args pick the step, and a wrong
    key is a one-line error naming the known ones."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from lm_eval.models.huggingface import HFLM

    from megalm.eval.lm_eval_model import MegalmLM
    from megalm.export.checkpoint_files import CheckpointError

    assert get_model("megalm") is MegalmLM and get_model("hf") is HFLM
    step2 = MegalmLM.create_from_arg_string(f"checkpoint={run_dir},step=2,batch_size=4", {"device": "cpu"})
    assert step2.ref.step == 2 and step2.batch_size == 4
    request = [Instance("loglikelihood", {}, ("import", " sys\n"), 0)]
    assert step2.loglikelihood(request) != models[0].loglikelihood(request)
    with pytest.raises(CheckpointError, match="unknown key.*stepp.*known: checkpoint, step"):
        MegalmLM.create_from_arg_string(f"checkpoint={run_dir},stepp=2")


def _tasks_cli(run_dir: str, *extra: str) -> list[str]:
    return ["--checkpoint", run_dir, "--tasks", TASKS, "--limit", "24", "--micro-batch-size", str(BATCH), *extra]


def test_all_steps_writes_json_and_tensorboard_per_step(run_dir, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from megalm import rundir
    from megalm.eval.evaluate import main

    out = str(tmp_path / "all.json")
    assert main(_tasks_cli(run_dir, "--all-steps", "--log-samples", "--output", out)) == 0
    printed = capsys.readouterr().out
    assert "step 2: megalm_larger acc" in printed and "step 4: megalm_larger acc" in printed
    records = json.load(open(out))
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert json.load(open(rundir.eval_tasks_result_file(run_dir, r["step"]))) == r
        assert r["n_samples"] == {"megalm_larger": 24, "megalm_copy": 24}
        # acc is what the recorded log-likelihoods say: the higher-scored choice is the right one
        samples = r["samples"]["megalm_larger"]
        picks = [max(range(2), key=lambda c: s["resps"][c][0][0]) == s["target"] for s in samples]
        assert r["tasks"]["megalm_larger"]["acc"] == pytest.approx(sum(picks) / len(picks))
    step2, step4 = ({s["doc_id"]: s["resps"] for s in r["samples"]["megalm_larger"]} for r in records)
    assert step2 != step4  # each step scored its own weights

    acc = EventAccumulator(rundir.eval_tensorboard_dir(run_dir))
    acc.Reload()
    for tag, task, metric in [("tasks/megalm_larger/acc", "megalm_larger", "acc"),
                              ("tasks/megalm_copy/exact_match", "megalm_copy", "exact_match")]:
        points = acc.Scalars(tag)
        assert [p.step for p in points] == [2, 4]
        assert [p.value for p in points] == pytest.approx([r["tasks"][task][metric] for r in records])
    assert not any("stderr" in t for t in acc.Tags()["scalars"])


def test_task_directory_reads_data_files_relative_to_its_yaml(run_dir, tmp_path, monkeypatch, capsys):
    """A DIR of task YAMLs: every task in it runs, its relative data_files found from another cwd."""
    import shutil

    from megalm.eval.evaluate import main
    from megalm.eval.task_files import SHIPPED_TASKS_DIR

    tasks = tmp_path / "my_tasks"
    (tasks / "data").mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copy(os.path.join(SHIPPED_TASKS_DIR, f"copy_{split}.jsonl"), tasks / "data" / f"{split}.jsonl")
    yaml = open(os.path.join(SHIPPED_TASKS_DIR, "megalm_copy.yaml")).read().replace("task: megalm_copy", "task: my_copy")
    (tasks / "my_copy.yaml").write_text(yaml.replace(": copy_", ": data/"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = str(tmp_path / "dir.json")
    assert main(["--checkpoint", run_dir, "--tasks", str(tasks), "--limit", "4", "--no-tensorboard", "--output", out]) == 0
    (record,) = json.load(open(out))
    assert list(record["tasks"]) == ["my_copy"] and record["n_samples"] == {"my_copy": 4}
    assert "step 4: my_copy exact_match" in capsys.readouterr().out


def test_unknown_task_lists_the_shipped_ones(run_dir, capsys):
    from megalm.eval.evaluate import main

    assert main(["--checkpoint", run_dir, "--tasks", "megalm_larger,no_such_task"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "unknown task no_such_task" in err and "shipped tasks: megalm_copy, megalm_larger" in err


def test_shipped_task_data(tmp_path):
    """The shipped files are what the generator writes; the test split is balanced and unseen; the task
    configs' data_files resolve to the shipped directory from any working directory."""
    from megalm.eval.task_data import write_task_data
    from megalm.eval.task_files import SHIPPED_TASKS_DIR, resolve_tasks

    for path in write_task_data(str(tmp_path)):
        with open(path, "rb") as fresh, open(os.path.join(SHIPPED_TASKS_DIR, os.path.basename(path)), "rb") as shipped:
            assert fresh.read() == shipped.read(), path
    assert sum(os.path.getsize(os.path.join(SHIPPED_TASKS_DIR, f)) for f in os.listdir(SHIPPED_TASKS_DIR)) < 200_000

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in open(os.path.join(SHIPPED_TASKS_DIR, name))]

    train, test = rows("larger_train.jsonl"), rows("larger_test.jsonl")
    assert len(train) == 2000 and len(test) == 100
    assert sum(r["a"] > r["b"] for r in test) == 50  # "always the first choice" scores exactly chance
    assert not {frozenset((r["a"], r["b"])) for r in test} & {frozenset((r["a"], r["b"])) for r in train}
    assert all(r["response"] == f" {max(r['a'], r['b'])}" and r["prompt"].endswith("Answer:") for r in train)
    copy_train, copy_test = rows("copy_train.jsonl"), rows("copy_test.jsonl")
    assert not {r["prompt"] for r in copy_test} & {r["prompt"] for r in copy_train}

    specs, _ = resolve_tasks(TASKS)
    for spec in specs:
        for path in spec["dataset_kwargs"]["data_files"].values():
            assert os.path.isabs(path) and os.path.dirname(path) == SHIPPED_TASKS_DIR and os.path.isfile(path)


@pytest.fixture(scope="module")
def single_process_result(run_dir, tmp_path_factory) -> dict:
    """`megalm-eval --tasks` of the latest step in one process, with every request's responses."""
    out = str(tmp_path_factory.mktemp("single") / "single.json")
    run_command([sys.executable, "-m", "megalm.eval.evaluate", *_tasks_cli(run_dir, "--log-samples", "--no-tensorboard"),
                 "--output", out], timeout=300, env={"OMP_NUM_THREADS": "1"}, check=True)
    (record,) = json.load(open(out))
    return record


@pytest.mark.parametrize("tp", [2, 1], ids=["tp2", "dp2"])
def test_torchrun_matches_single_process(run_dir, single_process_result, tmp_path, tp):
    """2 ranks as one TP group, or as 2 data-parallel ranks splitting the requests: same numbers as one
    process, and one report (rank 0's), not one per rank."""
    multi = str(tmp_path / "multi.json")
    common = _tasks_cli(run_dir, "--log-samples", "--no-tensorboard")
    result = run_command([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                          f"--master_port={free_port()}", "-m", "megalm.eval.evaluate", *common, "--tp", str(tp),
                          "--output", multi], timeout=400, env={"OMP_NUM_THREADS": "1"}, check=True)
    assert result.output.count("step 4: megalm_larger acc") == 1, result.output[-3000:]
    assert result.output.count("megalm loglikelihood: 100%") == 1  # rank 1 shows no progress bars
    a, (b,) = single_process_result, json.load(open(multi))
    assert a["tasks"] == b["tasks"]
    for task in ("megalm_larger", "megalm_copy"):
        sa = {s["doc_id"]: s["resps"] for s in a["samples"][task]}
        sb = {s["doc_id"]: s["resps"] for s in b["samples"][task]}
        assert sorted(sa) == sorted(sb) == list(range(24))
        for doc_id, resps in sa.items():
            if task == "megalm_copy":
                assert resps == sb[doc_id]
            else:
                assert [r[0][1] for r in resps] == [r[0][1] for r in sb[doc_id]]
                assert max(abs(x[0][0] - y[0][0]) for x, y in zip(resps, sb[doc_id])) <= LL_ATOL
