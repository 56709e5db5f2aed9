#!/usr/bin/env bash
# Every GPU check of megalm in one run of at most ~8 minutes on one lent H100/H200, ending in ONE markdown
# table (stdout, and $OUT/gpu_check.md when $OUT is set; the console log is $OUT/gpu_check.log and the
# raw logs, metrics and audits are $OUT/gpu_check_logs.tar.gz). Run from the repository root:
#
#   bash bench/gpu_check.sh                       # exit 0: no FAIL row; 1: some check failed
#
# With the device tool (the host is air-gapped; build the wheelhouse here first: bash scripts/wheelhouse.sh):
#   run(command="bash bench/gpu_check.sh", carry=["wheelhouse"], timeout_s=560)
#
# Checks (each under its own `timeout`, all under one deadline, GPU_CHECK_BUDGET_S=480 s by default; a
# check that fails is a FAIL row with its reason and the next one runs; one that no longer fits is SKIP):
#   install   deepspeed & co. from wheelhouse/ into a --target dir when the host lacks DeepSpeed
#             (scripts/install_offline.sh: --no-index --no-deps, the host's torch untouched)
#   environment  Python, torch, CUDA, device, DeepSpeed (and its prebuilt ops: none), the bf16 peak for MFU
#   data      the demo corpus (this Python's standard library) -> tokenizer + shards, on the host
#   a. ws1    megalm-train at world size 1, 125m shape (vocab 8192, seq 1024, 32 x 1024 tokens/step), bf16,
#             20 steps at ZeRO 0, 1 and 3: loss finite and falling, tokens/s, MFU, peak memory
#   b. 1.3b   bench/gpu.py: the 1.3b config, seq 2048, bf16 (ZeRO-1 at world size 1 = DeepSpeed's bf16
#             optimizer: fp32 master weights and gradient accumulation): tokens/s, MFU against the device's
#             dense bf16 peak (H100 SXM / H200 989 TFLOP/s, H100 PCIe 756), peak memory; plus the plain
#             PyTorch baseline on the same shapes
#   c. gloo   several ranks on the ONE GPU (NCCL refuses two ranks per device, so MEGALM_DIST_BACKEND=gloo,
#             every rank on cuda:LOCAL_RANK % device_count = cuda:0): dp=2 ZeRO-1, tp=2, dp=2 ZeRO-3,
#             tp=2 x pp=2, bf16, through torchrun and bench/gpu_check.py's collective audit. Covers: device
#             placement of batches, model and optimizer state on each rank; every scalar/flag collective
#             megalm issues is on a CUDA tensor (NCCL would refuse a CPU one); validation and checkpoint
#             saving on the GPU. Does NOT cover NCCL itself, its performance, or several GPUs.
#   d. JIT    DS_BUILD_OPS=0 and a fresh TORCH_EXTENSIONS_DIR: no DeepSpeed op may be JIT-built or loaded
#             (FusedAdam & co. compile for minutes; our optimizer is torch AdamW / GuardedAdamW)
#
# Host vs our pins (the lent machines: Python 3.12.3, torch 2.11.0+cu130; we pin torch 2.13.0, Python 3.11
# here). DeepSpeed 0.19.8 needs torch>=2.0.0. What megalm uses is older than torch 2.5 except as noted,
# all present in 2.11: F.scaled_dot_product_attention(enable_gqa=True) (2.5), torch.serialization
# .safe_globals (2.5) with torch.load(weights_only=True) (explicit, so the 2.6 default change does not
# matter), checkpoint(use_reentrant=False, context_fn=...) (2.1), gloo's reduce_scatter_tensor via
# all-reduce (2.3). No torch.distributed.pipelining (pipelines are DeepSpeed's PipelineModule), no
# torch.compile. DeepSpeed uses distutils only in JIT op builders (not reached; Python 3.12 has no
# distutils of its own, setuptools provides it). Host numpy 2.5 / tokenizers 0.23.2 / transformers 5.17
# differ from our pins and are used as they are. Checked on a CPU machine with Python 3.12 + torch 2.11.0
# (+cu130, PyPI's build) + this wheelhouse: 39 tests pass (model, TP, ZeRO-3, HF export, every layout,
# bf16/fp16 precision), and this script's flow runs end to end (GPU_CHECK_QUICK=1: its device rows
# FAIL there, as they must without CUDA).
# Known before any GPU run: DeepSpeed 0.19.8 refuses bf16 with fp32 gradient accumulation at ZeRO-0
# ("unsupported mix of model_dtype and grad_accum_dtype"), so row a. ZeRO-0 fails until the trainer maps
# that case; bench/gpu.py therefore measures at ZeRO-1.
#
# Knobs: GPU_CHECK_BUDGET_S (480), GPU_CHECK_WORK (/tmp/megalm-gpu-check), PYTHON (python3),
# WHEELHOUSE (wheelhouse), GPU_CHECK_QUICK=1 (tiny shapes: a rehearsal of the flow on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}
WORK=${GPU_CHECK_WORK:-/tmp/megalm-gpu-check}
PY=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-$REPO/wheelhouse}
QUICK=${GPU_CHECK_QUICK:-0}
OUTD=${OUT:-}
ROWS=$WORK/rows.jsonl
LOGS=$WORK/logs
rm -rf "$WORK"
mkdir -p "$LOGS" "$WORK/runs" "$WORK/audit"
[ -n "$OUTD" ] && mkdir -p "$OUTD"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # megalm from this working tree, always
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 TORCH_EXTENSIONS_DIR=$WORK/torch_extensions
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
judge() { local cmd=$1; shift; "$PY" "$REPO/bench/gpu_check.py" "$cmd" "$ROWS" "$@"; }

# Kill what a check left behind (torchrun's ranks run in sessions of their own, out of timeout's reach):
# processes whose environment carries this check's tag, by pid.
reap() {
  local tag=$1 p pid
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$pid" = $$ ] && continue
    if { tr '\0' '\n' < "$p/environ"; } 2>/dev/null | grep -qx "GPU_CHECK_TAG=$tag"; then
      kill -9 "$pid" 2>/dev/null && echo "[gpu_check] reaped leftover pid $pid of $tag"
    fi
  done
}

# run_step NAME LIMIT CMD...: run CMD with LIMIT s (cut to the deadline), log to $LOGS/NAME.log.
# Sets RC (124: timed out; 125: skipped, no time left) and LIMIT_USED.
run_step() {
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(( $(left) - 15 ))   # 15 s for the table at the end
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  LIMIT_USED=$limit
  if [ "$limit" -lt 20 ]; then
    RC=125
    return
  fi
  echo "[gpu_check] == $name (limit ${limit}s, $(left)s of the budget left)"
  local t0; t0=$(date +%s)
  GPU_CHECK_TAG=$name timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  RC=$?
  reap "$name"
  echo "[gpu_check]    $name: exit $RC after $(( $(date +%s) - t0 ))s"
  tail -n 3 "$LOGS/$name.log" | sed 's/^/    | /'
}
skipped() { judge row --check "$1" --result "SKIP: no time left in the ${BUDGET}s budget" --covers "${2:-}"; }

main() {
  echo "[gpu_check] megalm GPU check: repo $REPO, work $WORK, budget ${BUDGET}s, python $(command -v "$PY")"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | sed 's/^/[gpu_check] nvidia-smi: /'

  # ---------------------------------------------------------------- install
  if "$PY" -c "import deepspeed" > /dev/null 2>&1; then
    judge row --check install --result PASS --figures "the host has DeepSpeed $("$PY" -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null); nothing installed"
  elif [ -d "$WHEELHOUSE" ]; then
    run_step install 120 env PYTHON="$PY" bash "$REPO/scripts/install_offline.sh" "$WHEELHOUSE" --target "$WORK/site"
    export PYTHONPATH="$REPO:$WORK/site${PYTHONPATH#$REPO}" PATH="$WORK/site/bin:$PATH"
    if [ "$RC" = 0 ]; then
      judge row --check install --result PASS --figures "$(grep -c '^  install ' "$LOGS/install.log") wheel(s) from $(basename "$WHEELHOUSE")/ into $WORK/site: $(grep '^  install ' "$LOGS/install.log" | sed 's/^  install //' | cut -d- -f1-2 | paste -sd, - | sed 's/,/, /g')" --covers "scripts/install_offline.sh: --no-index --no-deps, host torch untouched"
    else
      judge row --check install --result "FAIL: $(grep -m1 PROBLEM "$LOGS/install.log" || echo "exit $RC")" --figures "see install.log"
    fi
  else
    judge row --check install --result "FAIL: DeepSpeed missing and no wheelhouse at $WHEELHOUSE" --figures "build it with scripts/wheelhouse.sh and carry it"
  fi

  # ---------------------------------------------------------------- environment
  run_step environment 60 "$PY" "$REPO/bench/gpu_check.py" env "$ROWS"
  grep -q '"check": "environment"' "$ROWS" 2>/dev/null ||
    judge row --check environment --result "FAIL: exit $RC: $(tail -n 1 "$LOGS/environment.log")" --figures "see environment.log"
  PEAK=$(sed -n 's/^PEAK=//p' "$LOGS/environment.log" | tail -1)
  PEAK_OVERRIDE=(); [ -n "$PEAK" ] && PEAK_OVERRIDE=("train.peak_tflops=$PEAK")

  # ---------------------------------------------------------------- data
  DATA=$WORK/data
  run_step data 120 "$PY" -m data_prep.cli demo-corpus --output-dir "$DATA" --workers 8
  if [ "$RC" = 0 ] && [ -f "$DATA/stdlib.idx" ]; then
    judge row --check data --result PASS --figures "demo corpus: $(du -m "$DATA/stdlib.bin" | cut -f1) MB of tokens, vocab 8192" --covers "megalm-prep on the host"
  else
    judge row --check data --result "FAIL: exit $RC" --figures "see data.log (every training check needs it)"
  fi
  DATA_OV=("data.train_paths=[$DATA/stdlib]" "data.tokenizer=$DATA/tokenizer.json")

  # ---------------------------------------------------------------- a. world size 1, ZeRO 0/1/3
  if [ "$QUICK" = 1 ]; then MODEL="{base: tiny, vocab_size: 8192}"; SEQ=64; MB=2; GB=4; else
    MODEL="{base: 125m, vocab_size: 8192, max_seq_len: 1024}"; SEQ=1024; MB=8; GB=32; fi
  cat > "$WORK/ws1.yaml" <<EOF
# bench/gpu_check.sh, check a: the 125m shape on the demo corpus (its tokenizer has 8192 tokens)
model: $MODEL
parallel: {tp: 1, pp: 1, zero_stage: 0}
data: {train_paths: [$DATA/stdlib], tokenizer: $DATA/tokenizer.json, split: "98,2,0", seq_len: $SEQ, seed: 1234}
train: {micro_batch_size: $MB, global_batch_size: $GB, train_steps: 20, lr: 6.0e-4, min_lr: 6.0e-5,
        warmup_steps: 5, weight_decay: 0.1, grad_clip: 1.0, precision: bf16, log_interval: 1,
        eval_interval: 0, save_interval: 0, save_at_end: false, tensorboard: false, run_dir: $WORK/runs/ws1}
EOF
  # bf16 needs ZeRO>=1 (RunConfig refuses it at ZeRO-0: DeepSpeed's bf16 optimizer is its ZeRO-1 path),
  # so the ZeRO-0 row checks the fp32 path on the GPU.
  for zp in 0:fp32 1:bf16 3:bf16; do
    z=${zp%%:*}; prec=${zp#*:}
    name=ws1-zero$z
    run_step "$name" 120 "$PY" -m megalm.train --config "$WORK/ws1.yaml" parallel.zero_stage=$z \
      train.precision=$prec train.run_dir="$WORK/runs/$name" "${PEAK_OVERRIDE[@]}"
    if [ "$RC" = 125 ]; then skipped "a. ws1 ZeRO-$z"; continue; fi
    judge train --check "a. ws1 ZeRO-$z" --run-dir "$WORK/runs/$name" --steps 20 --rc "$RC" \
      --log "$LOGS/$name.log" --limit "$LIMIT_USED" \
      --covers "megalm-train, 1 GPU, $prec, $( [ "$QUICK" = 1 ] && echo tiny || echo 125m) seq $SEQ, $GB x $SEQ tokens/step"
  done

  # ---------------------------------------------------------------- b. 1.3b, seq 2048
  if [ "$QUICK" = 1 ]; then BENCH=(--model tiny --seq-len 64 --micro-batch 2 --global-batch 4 --steps 2 --warmup 1)
  else BENCH=(--steps 8 --warmup 3); fi
  [ "$(left)" -lt 330 ] && BENCH+=(--no-plain)   # keep time for the multi-rank checks
  run_step bench-1.3b 240 "$PY" -m bench.gpu "${BENCH[@]}" --zero-stage 1 --json "$WORK/bench.json"
  if [ "$RC" = 125 ]; then skipped "b. 1.3b"; else
    judge bench --check "b. 1.3b" --json "$WORK/bench.json" --rc "$RC" --log "$LOGS/bench-1.3b.log" \
      --limit "$LIMIT_USED" --covers "bench/gpu.py, world size 1, ZeRO-1 (bf16 optimizer), SDPA"
  fi

  # ---------------------------------------------------------------- c. several ranks on one GPU, gloo
  local layouts=("dp2-zero1 2 parallel.tp=1 parallel.pp=1 parallel.zero_stage=1"
                 "tp2 2 parallel.tp=2 parallel.pp=1 parallel.zero_stage=1"
                 "dp2-zero3 2 parallel.tp=1 parallel.pp=1 parallel.zero_stage=3"
                 "tp2-pp2 4 parallel.tp=2 parallel.pp=2 parallel.zero_stage=1")
  local spec
  for spec in "${layouts[@]}"; do
    read -r name world layout <<< "$spec"
    run_step "gloo-$name" 100 env MEGALM_DIST_BACKEND=gloo "$PY" -m torch.distributed.run --standalone \
      --nproc_per_node "$world" "$REPO/bench/gpu_check.py" audit-train "$WORK/audit/$name" -- \
      --config "$REPO/configs/run/demo.yaml" $layout "${DATA_OV[@]}" train.precision=bf16 \
      train.train_steps=20 train.warmup_steps=5 train.log_interval=1 train.eval_interval=10 train.eval_iters=2 \
      train.save_interval=0 train.save_at_end=true train.keep_last=1 train.tensorboard=false \
      train.run_dir="$WORK/runs/gloo-$name"
    if [ "$RC" = 125 ]; then skipped "c. gloo $name"; continue; fi
    judge ranks --check "c. $world ranks on 1 GPU, gloo, $name" --run-dir "$WORK/runs/gloo-$name" \
      --audit-dir "$WORK/audit/$name" --world "$world" --steps 20 --rc "$RC" --log "$LOGS/gloo-$name.log" \
      --limit "$LIMIT_USED" --covers "demo model, bf16, 20 steps + validation + checkpoint save; device placement of batches and scalar/flag collectives (not NCCL)"
  done

  # ---------------------------------------------------------------- d. versions and JIT
  judge jit --ext-dir "$TORCH_EXTENSIONS_DIR" --logs "$LOGS"

  echo
  local commit="no git metadata"
  if git rev-parse --short HEAD > /dev/null 2>&1; then
    commit="commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' + working tree changes')"
  fi
  echo
  judge table --title "## megalm GPU check ($(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - START )) s, $commit)" \
    ${OUTD:+--md "$OUTD/gpu_check.md"}
  local status=$?
  if [ -n "$OUTD" ]; then
    for d in "$WORK"/runs/*/; do cp "$d/metrics.jsonl" "$LOGS/$(basename "$d").metrics.jsonl" 2>/dev/null; done
    cp -r "$WORK/audit" "$ROWS" "$WORK"/*.json "$WORK"/*.yaml "$LOGS/" 2>/dev/null
    tar -czf "$OUTD/gpu_check_logs.tar.gz" -C "$WORK" logs
  fi
  return $status
}

if [ -n "$OUTD" ]; then
  main 2>&1 | tee "$OUTD/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
main
