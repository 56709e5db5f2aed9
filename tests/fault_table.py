"""The fault and bad-input table: every case the product is drilled against, and what must happen.

Two kinds of rows:
- `FAULT_CASES`: faults that need a real training run, a signal or a full disk. Each names the tests
  that feed it; `tests/test_fault_table.py` checks they exist, and the suite's summary prints each
  case with the outcome of its tests (conftest.py).
- `DRILL`: bad inputs to a CLI, run directly from this table by `tests/test_fault_drill.py`. Each row
  is the argv, the exit code and a pattern the error must match; no row may print a traceback.

README's "What happens when things go wrong" is this table (`python -m tests.fault_table` prints
it; a test fails when they disagree).
"""
from __future__ import annotations

from dataclasses import dataclass

OUTCOMES = ("clear error", "refused", "recovered")


@dataclass(frozen=True)
class FaultCase:
    fault: str
    outcome: str  # one of OUTCOMES
    expected: str  # what the user sees
    tests: tuple[str, ...]  # "test_file.py::test_function"


@dataclass(frozen=True)
class DrillCase:
    """`cli` is the console script; argv may use {tmp} (a fresh directory holding the bad inputs that
    `setup` names, see test_fault_drill.SETUPS) and {run} (a real 1-process tiny run with steps 2, 4)."""

    name: str
    cli: str
    argv: tuple[str, ...]
    setup: str  # comma-separated keys into test_fault_drill.SETUPS ("" for none)
    outcome: str
    error: str  # regex the error output must match
    exit_code: int = 2


FAULT_CASES = [
    FaultCase("token ids >= `model.vocab_size` in a shard (tp=1 and tp=2)", "refused",
              "before any process group, naming shard and id",
              ("test_data_vocab.py::test_training_refuses_ids_past_the_vocabulary_before_any_process_group",)),
    FaultCase("an id past the vocabulary reaches the embedding anyway", "clear error",
              "`TokenIdError` (async assert on GPU)",
              ("test_data_vocab.py::test_embedding_guard_catches_ids_that_get_through",)),
    FaultCase("bad config / `train.deepspeed_config` key the run config owns", "refused",
              "one `megalm-train: config error:` line, exit 2",
              ("test_train_launch.py::test_bad_config_rejected_before_process_group",
               "test_deepspeed_config.py::test_megalm_train_refuses_a_conflict_before_any_process_group")),
    FaultCase("truncated shard `.bin`, world size 2", "clear error",
              "one `megalm-train: data error:` line, exit 2 on every rank",
              ("test_train_user_errors.py::test_corrupt_shard_is_one_line_at_world_size_2",)),
    FaultCase("truncated checkpoint file on `--resume auto`, world size 2", "clear error",
              "names the file and the complete earlier steps; no silent fall-back",
              ("test_train_user_errors.py::test_truncated_checkpoint_names_file_and_earlier_steps",)),
    FaultCase("disk full during a save (4 MiB tmpfs)", "clear error",
              "`no space left on <path>`; previous checkpoint and `latest` intact",
              ("test_train_user_errors.py::test_disk_full_during_save_names_the_path_and_keeps_previous",)),
    FaultCase("SIGKILL between checkpoints (fp32 and bf16)", "recovered",
              "`--resume auto` reproduces the uninterrupted losses bit for bit",
              ("test_train_resume.py::test_sigkill_between_checkpoints_then_resume_is_exact",)),
    FaultCase("SIGTERM / SIGUSR1 to one rank", "recovered", "checkpoint, exit 0",
              ("test_train_resume.py::test_signal_to_one_rank_checkpoints_and_exits_zero",)),
    FaultCase("resume with another `seq_len`, `data.seed` or tokenizer", "refused", "listing every difference",
              ("test_train_resume_rules.py::test_resume_refuses_seq_len_and_seed_changes_in_one_error",)),
    FaultCase("resume with another data blend or global batch", "recovered",
              "allowed, recorded in `megalm.json` `resume_changes`",
              ("test_train_resume_rules.py::test_resume_allows_and_records_data_and_batch_changes",)),
    FaultCase("resume with a new `train.lr`", "recovered",
              "the current config's schedule at the resumed step, never below `min_lr`",
              ("test_train_resume_rules.py::test_resume_lr_comes_from_the_current_config",)),
    FaultCase("resume at another tp, pp, ZeRO stage or model shape", "refused",
              "listing the differences; names the `megalm-reshard` command",
              ("test_train_faults.py::test_resume_with_other_layout_or_model_is_refused",
               "test_elastic_resume.py::test_model_parallel_change_is_refused_with_the_reshard_command")),
    FaultCase("resume on fewer or more nodes (another data-parallel size)", "recovered",
              "ZeRO partitions re-split on load, per parameter; same curve (1e-4) and samples; recorded in "
              "`megalm.json` and `restarts.jsonl`",
              ("test_elastic_resume.py::test_elastic_resume_continues_curve_and_samples",)),
    FaultCase("resume on a world size the global batch cannot split over", "refused",
              "before any process group; lists the world sizes that keep the global batch",
              ("test_elastic_resume.py::test_impossible_shrink_is_refused_before_the_process_group",)),
    FaultCase("a second run into a live run's directory", "refused",
              "`RUN_DIR/.lock` names host and pid; a dead holder's lock is taken over",
              ("test_runlock.py::test_second_run_into_a_live_runs_directory_is_refused",
               "test_runlock.py::test_dead_holder_on_this_host_is_taken_over_and_released_at_exit",
               "test_runlock.py::test_requeued_slurm_job_takes_over_its_own_lock")),
    FaultCase("`megalm-export` whose tokenizer check fails", "clear error",
              "no partial output; an existing output is replaced only with `--overwrite`, whole",
              ("test_export_atomic.py::test_failed_tokenizer_check_leaves_no_output",
               "test_export_atomic.py::test_existing_output_is_refused_unless_overwrite")),
    FaultCase("a dead save's `step_N.tmp`", "clear error", "listed as abandoned, not \"writing\"",
              ("test_launcher_ckpt.py::test_tmp_is_writing_only_while_a_live_run_holds_the_lock",)),
    FaultCase("damaged checkpoints (missing, truncated, CRC, wrong metadata)", "clear error",
              "`megalm-launch ckpt verify` lists each problem, exit 1",
              ("test_launcher_ckpt.py::test_verify_finds_damage",)),
    FaultCase("`MEGALM_FAULT=nan@S`", "recovered", "poisons the step logged as S; update skipped and counted",
              ("test_train_faults.py::test_nonfinite_step_is_skipped_and_counted",
               "test_train_faults.py::test_nonfinite_skip_under_zero1_and_pipeline")),
    FaultCase("a truncated `.jsonl.zst` / `.gz`, or a file named `.gz` that is not gzip", "clear error",
              "one line naming the file; a re-run after fixing it completes",
              ("test_prep_faults.py::test_truncated_zst_is_an_error_naming_the_file",
               "test_prep_faults.py::test_damaged_or_mislabelled_compressed_input",
               "test_prep_faults.py::test_rerun_after_fixing_a_truncated_input")),
    FaultCase("prep input with no documents (missing key, empty file)", "refused",
              "skip counts by reason, unless `--allow-empty`",
              ("test_prep_faults.py::test_no_documents_is_an_error_unless_allowed",
               "test_prep_faults.py::test_empty_inputs_are_an_error")),
    FaultCase("Ctrl-C / SIGTERM during `megalm-prep tokenize --workers 2` (main pid or group)", "recovered",
              "workers end, exit 130 / 143, the re-run resumes to identical output",
              ("test_prep_interrupt.py::test_interrupt_ends_the_workers_and_the_run_resumes",)),
    FaultCase("a half-written prep output (`complete: false`)", "refused",
              "by training, eval, inspect and merge, naming the manifest",
              ("test_shard_contract.py::test_every_caller_refuses_an_incomplete_output_naming_its_manifest",)),
    FaultCase("rank SIGKILL or hang under `megalm-launch run`", "recovered",
              "stacks per rank, tree killed, restarted from `latest`",
              ("test_launcher_supervisor.py::test_sigkill_of_one_rank_under_torchrun_restarts",
               "test_launcher_supervisor.py::test_hang_is_detected_dumped_and_restarted",
               "test_launcher_real_trainer.py::test_supervisor_restarts_after_sigkill_of_one_rank")),
    FaultCase("SLURM preemption of a running job", "recovered", "requeued, resumed with identical losses",
              ("test_launcher_real_trainer.py::test_slurm_preempted_job_requeues_and_resumes_exactly",)),
    FaultCase("a node of a `slurm submit --nodes 1-2` job dies (slurmd and its processes killed)", "recovered",
              "the step restarts on the node left at dp=1; a later requeue on 2 nodes resumes at dp=2",
              ("test_launcher_elastic.py::test_node_loss_continues_on_the_nodes_left_then_scales_back_up",)),
]

TOKENIZE = ("tokenize", "--input", "{tmp}/a.jsonl", "--tokenizer", "{tmp}/tokenizer.json",
            "--output-prefix", "{tmp}/out/c")
TRAIN = ("--config", "{tmp}/run.yaml")

DRILL = [
    DrillCase("prep: input does not exist", "megalm-prep",
              ("tokenize", "--input", "{tmp}/nope.jsonl", "--tokenizer", "{tmp}/tokenizer.json",
               "--output-prefix", "{tmp}/out/c"), "jsonl", "clear error", r"input '.*nope\.jsonl' does not exist"),
    DrillCase("prep: tokenizer file does not exist", "megalm-prep",
              ("tokenize", "--input", "{tmp}/a.jsonl", "--tokenizer", "{tmp}/nope.json", "--output-prefix",
               "{tmp}/out/c"), "jsonl", "clear error", r"tokenizer file '.*nope\.json' does not exist"),
    DrillCase("prep: tokenizer file is not JSON", "megalm-prep", TOKENIZE, "jsonl,bad_tokenizer", "clear error",
              r"does not load as a Hugging Face tokenizer\.json"),
    DrillCase("prep: input directory is empty", "megalm-prep",
              ("tokenize", "--input", "{tmp}/empty_dir", "--tokenizer", "{tmp}/tokenizer.json",
               "--output-prefix", "{tmp}/out/c"), "empty_dir", "clear error", r"contains no files"),
    DrillCase("prep: random bytes named .jsonl", "megalm-prep",
              ("train-tokenizer", "--input", "{tmp}/random.jsonl", "--vocab-size", "300", "--output",
               "{tmp}/tok.json"), "random_jsonl", "refused", r"no documents in .*all skipped \(non_utf8"),
    DrillCase("prep: --vocab-size 0", "megalm-prep",
              ("train-tokenizer", "--input", "{tmp}/a.jsonl", "--vocab-size", "0", "--output", "{tmp}/tok.json"),
              "jsonl", "refused", r"--vocab-size 0 is too small"),
    DrillCase("prep: inspect a path that is no shard", "megalm-prep", ("inspect", "{tmp}/a.jsonl"), "jsonl",
              "clear error", r"no shards found for prefix"),
    DrillCase("prep: shard index with a foreign magic", "megalm-prep", ("inspect", "{tmp}/bad"), "bad_magic_shard",
              "clear error", r"bad\.idx: not an MMIDIDX index"),
    DrillCase("prep: --sft without --seq-len", "megalm-prep", (*TOKENIZE, "--sft"), "jsonl", "refused",
              r"--sft needs --seq-len N"),
    DrillCase("train: config file does not exist", "megalm-train", ("--config", "{tmp}/nope.yaml"), "",
              "refused", r"config error: config file '.*nope\.yaml' does not exist"),
    DrillCase("train: config is not valid YAML", "megalm-train", TRAIN, "bad_yaml",
              "refused", r"config error: config file '.*run\.yaml' is not valid YAML"),
    DrillCase("train: mistyped key", "megalm-train", (*TRAIN, "train.trian_steps=3"), "config", "refused",
              r"train\.trian_steps: unknown field; did you mean 'train_steps'\?"),
    DrillCase("train: tp does not divide the heads", "megalm-train", (*TRAIN, "parallel.tp=3"), "config",
              "refused", r"model\.num_heads: 8 query heads cannot be split over tensor_parallel=3"),
    DrillCase("train: a value of the wrong type", "megalm-train", (*TRAIN, "train.micro_batch_size=abc"),
              "config", "refused", r"train\.micro_batch_size: expected an integer, got 'abc'"),
    DrillCase("train: --resume of a step that does not exist", "megalm-train",
              (*TRAIN, "train.run_dir={run}", "--resume", "step_00000009"), "config", "refused",
              r"step_00000009 is not a complete checkpoint .*complete steps: \[2, 4\]"),
    DrillCase("train: --resume auto with a deleted checkpoint file", "megalm-train",
              (*TRAIN, "train.run_dir={tmp}/run", "--resume", "auto"), "config,run_missing_file", "clear error",
              r"checkpoint file .*step_00000004/mp_rank_00_model_states\.pt: missing .*complete earlier steps: \[2\]"),
    DrillCase("train: a shard with a foreign magic", "megalm-train", (*TRAIN, "data.train_paths=[{tmp}/bad]"),
              "config,bad_magic_shard", "clear error", r"data error: .*bad\.idx: not an MMIDIDX index"),
    DrillCase("train: train.init_from that does not exist", "megalm-train", (*TRAIN, "train.init_from={tmp}/nope"),
              "config", "refused", r"train\.init_from: .*nope does not exist"),
    DrillCase("import: a directory without config.json", "megalm-import",
              ("--hf", "{tmp}/empty_dir", "--output", "{tmp}/imported"), "empty_dir", "clear error", r"no config\.json"),
    DrillCase("import: a model with rope_scaling", "megalm-import",
              ("--hf", "{tmp}/hf", "--output", "{tmp}/imported"), "hf_rope_scaling", "refused", r"rope_scaling"),
    DrillCase("eval: mistyped checkpoint path", "megalm-eval", ("--checkpoint", "{run}x"), "", "clear error",
              r"no such run directory or checkpoint"),
    DrillCase("eval: a step that was never saved", "megalm-eval", ("--checkpoint", "{run}", "--step", "3"), "",
              "clear error", r"no complete checkpoint for step 3; available steps: 2, 4"),
    DrillCase("eval: --tp without the processes", "megalm-eval", ("--checkpoint", "{run}", "--tp", "2"), "",
              "refused", r"--tp 2 needs 2 processes: run under torchrun"),
    DrillCase("eval: more pipeline stages than layers", "megalm-eval", ("--checkpoint", "{run}", "--pp", "5"), "",
              "refused", r"--tp 1 --pp 5: .*num_layers"),
    DrillCase("eval: tp that does not divide the heads", "megalm-eval", ("--checkpoint", "{run}", "--tp", "3"), "",
              "refused", r"--tp 3 --pp 1: .*num_heads"),
    DrillCase("generate: text prompt, run without a tokenizer", "megalm-generate",
              ("--checkpoint", "{run}", "--prompt", "hi"), "", "refused", r"the run has no data\.tokenizer"),
    DrillCase("generate: prompt ids past the vocabulary", "megalm-generate",
              ("--checkpoint", "{run}", "--prompt-ids", "1 2 99999"), "", "refused",
              r"prompt ids \[99999\] are outside the model's vocabulary"),
    DrillCase("export: the output already exists", "megalm-export", ("--checkpoint", "{run}", "--output", "{run}"),
              "", "refused", r"already exists: pass --overwrite"),
    DrillCase("export: a bad --max-shard-size", "megalm-export",
              ("--checkpoint", "{run}", "--output", "{tmp}/hf", "--max-shard-size", "12XB"), "", "refused",
              r"--max-shard-size: '12XB' is not a size"),
    DrillCase("reshard: tp that does not divide the heads", "megalm-reshard",
              ("--checkpoint", "{run}", "--output", "{tmp}/rs", "--tp", "3", "--pp", "1"), "", "refused",
              r"cannot be split over tensor_parallel=3"),
    DrillCase("reshard: into a run directory that holds checkpoints", "megalm-reshard",
              ("--checkpoint", "{run}", "--output", "{run}", "--tp", "1", "--pp", "1"), "", "refused",
              r"already holds checkpoints \[2, 4\]"),
    DrillCase("launch: status of a mistyped run directory", "megalm-launch", ("status", "--run-dir", "{run}x"), "",
              "clear error", r"run directory .* does not exist: check --run-dir"),
    DrillCase("launch: ckpt list of a file", "megalm-launch", ("ckpt", "list", "--run-dir", "{tmp}/a.jsonl"),
              "jsonl", "clear error", r"exists but is not a directory"),
    DrillCase("launch: ckpt prune --keep-last 0", "megalm-launch",
              ("ckpt", "prune", "--run-dir", "{run}", "--keep-last", "0"), "", "refused",
              r"--keep-last must be >= 1"),
    DrillCase("launch: slurm submit --min-nodes larger than --nodes", "megalm-launch",
              ("slurm", "submit", "--config", "{tmp}/run.yaml", "--nodes", "2", "--min-nodes", "3", "--dry-run"),
              "config", "refused", r"--min-nodes 3 is larger than --nodes 2"),
    DrillCase("launch: slurm submit with a node range the layout cannot use", "megalm-launch",
              ("slurm", "submit", "--config", "{tmp}/run.yaml", "--nodes", "1-3", "--dry-run"), "config", "refused",
              r"--nodes 1-3: the layout cannot run on 3 node\(s\) .*Node counts it can use: 1, 2, 4;"),
    DrillCase("launch: run --min-nodes of a command that is not srun", "megalm-launch",
              ("run", "--run-dir", "{tmp}/r", "--min-nodes", "1", "--", "torchrun", "-m", "megalm.train"), "",
              "refused", r"--min-nodes re-renders the srun command .* but the command has no srun"),
    DrillCase("plan: unknown model", "megalm-plan", ("--model", "nope", "--gpus", "8"), "", "refused",
              r"unknown model 'nope'; known: .*70b"),
]


def readme_section() -> str:
    """The markdown README carries under "What happens when things go wrong"."""
    lines = ["| case | outcome | test |", "| --- | --- | --- |"]
    for case in FAULT_CASES:
        files = sorted({t.split("::")[0] for t in case.tests}, key=[t.split("::")[0] for t in case.tests].index)
        lines.append(f"| {case.fault} | {case.outcome}: {case.expected} | {', '.join(f'`{f}`' for f in files)} |")
    lines += ["", "Bad inputs to each command, run directly from the table by `tests/test_fault_drill.py` "
              "(exit 2, one line, no traceback):", "", "| command | bad input | outcome: the error says |",
              "| --- | --- | --- |"]
    for row in DRILL:
        what = row.name.split(": ", 1)[1]
        pattern = row.error.replace("\\", "").replace("|", "\\|")
        lines.append(f"| `{row.cli}` | {what} | {row.outcome}: `{pattern}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(readme_section(), end="")
