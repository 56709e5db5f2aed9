#!/usr/bin/env bash
# The README's main job, end to end on CPU: set up .venv, build the demo corpus (this Python's standard
# library -> tokenizer + token shards), train a small Llama-style model with tensor parallel 2 x pipeline
# parallel 2 (4 processes), evaluate its checkpoint and print a generated sample.
# Re-running resumes/finishes the same run (runs/demo); delete runs/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== 1/4 data: demo corpus -> data/demo"
megalm-prep demo-corpus --output-dir data/demo

echo "== 2/4 train: configs/run/demo.yaml (tp=2, pp=2, 4 CPU processes)"
torchrun --standalone --nproc_per_node=4 -m megalm.train --config configs/run/demo.yaml --resume auto

echo "== 3/4 evaluate the latest checkpoint on the validation documents"
megalm-eval --checkpoint runs/demo --max-tokens 65536

echo "== 4/4 sample"
megalm-generate --checkpoint runs/demo --prompt "def fibonacci(n):" --max-new-tokens 60 --temperature 0

echo
echo "TensorBoard logs: runs/demo/tensorboard   (tensorboard --logdir runs/demo)"
echo "Checkpoints:      runs/demo/checkpoints   (latest: $(cat runs/demo/checkpoints/latest))"
