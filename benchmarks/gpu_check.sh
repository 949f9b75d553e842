#!/usr/bin/env bash
# GPU check of FSDP2 training and resume (issue 4), under 8 minutes on one CUDA machine:
#   1. bf16 FSDP2 on the cpm-ant-1b preset over every GPU: tokens/s and MFU against the device's
#      dense bf16 peak (a line starting with RESULT), and the time to write its sharded checkpoint;
#   2. the exact-resume test of tests/train/test_fsdp.py on GPU: SIGTERM, then SIGKILL while saving, then
#      resume on fewer ranks — same samples, same losses (to 1e-3: bf16 compute);
#   3. FlexAttention (model/attention.py): its equality tests with CUDA tensors, forward and
#      backward through the compiled kernel, and benchmarks/attention_memory.py's training step at
#      T = 1024, 2048 (peak memory and time, SDPA over the dense bias vs FlexAttention);
#   4. step 1's run again with compiled blocks, then with SDPA instead of FlexAttention (step 1
#      runs `model.parallel.attention: auto`, FlexAttention on CUDA): tokens/s and MFU of each.
# Run from anywhere: bash benchmarks/gpu_check.sh   Environment: PYTHON (default .venv/bin/python or
# python3), OUT (a directory for logs and the run; default a new temporary one), STEPS (default 30),
# MICRO_BATCH (samples per GPU per step, default 16), COMPILE=1 (torch.compile each block),
# FLEX=0 (skip step 3), FLEX_BATCH (samples in step 3's benchmark, default 8), VARIANTS=0 (skip step 4).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-$(mktemp -d)}
STEPS=${STEPS:-30}
MICRO_BATCH=${MICRO_BATCH:-16}
GPUS=$(nvidia-smi -L | wc -l)
mkdir -p "$OUT"
echo "== $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1) x $GPUS; torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'); logs in $OUT"

# 1. Throughput. The data is the demo's (the standard library's docstrings: no download), so the
# vocabulary is the demo tokenizer's 4096 instead of the preset's 30720 (MFU counts the model as built).
cat > "$OUT/1b.yaml" <<YAML
model:
  arch: {preset: cpm-ant-1b}
  parallel: {compile: $([ "${COMPILE:-0}" = 1 ] && echo true || echo false)}
data:
  sources:
    modules: {url: "stdlib://*.py", format: python_docstrings, weight: 0.6}
    packages: {url: "stdlib://[a-r]*/*.py", format: python_docstrings, weight: 0.4}
  tokenizer_vocab_size: 4096
  seq_len: 512
  batch_size: $((MICRO_BATCH * GPUS))
  cache_dir: $OUT/cache
trainer:
  accelerator: gpu
  devices: $GPUS
  strategy: fsdp
  max_steps: $STEPS
  default_root_dir: $OUT/1b
  logger: false
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  callbacks: [{class_path: gpu_probe.Throughput, init_args: {warmup: 10}}]
checkpoint: {every_n_steps: 100000}
registry: {path: null}
YAML
start=$(date +%s)
PYTHONPATH="$REPO:$REPO/benchmarks" "$PY" -m cpm_lightning.cli fit --config "$OUT/1b.yaml" 2>&1 | tee "$OUT/1b.log" | grep -E "RESULT|rror|Traceback" || true
grep -q RESULT "$OUT/1b.log" || { echo "FAILED: no RESULT line; see $OUT/1b.log"; tail -30 "$OUT/1b.log"; exit 1; }
ckpt=$(ls -d "$OUT"/1b/checkpoints/step-*.ckpt)
echo "checkpoint $(basename "$ckpt"): $(du -sh "$ckpt" | cut -f1) in $(ls "$ckpt" | wc -l) files; whole run $(( $(date +%s) - start ))s (tokenizer and shards included)"
"$PY" -m cpm_lightning.cli checkpoint consolidate "$ckpt" "$OUT/1b-model" | tail -1
rm -rf "$OUT/1b" "$OUT/1b-model"  # gigabytes

# 2. Exact resume on GPU (2 ranks when there are 2 GPUs).
CPM_FSDP_TEST_ACCELERATOR=gpu CPM_FSDP_TEST_DEVICES=$(( GPUS >= 2 ? 2 : 1 )) CPM_FSDP_TEST_LOSS_ATOL=1e-3 \
    "$PY" -m pytest -q -p no:cacheprovider tests/train/test_fsdp.py -k test_b_d_e 2>&1 | tee "$OUT/resume.log" | tail -3
# ---- 3. FlexAttention (issue 25 item 1) ------------------------------------------------------
# Three shape families with every mask rule between them (each test compiles its own forward and
# backward; the whole matrix would take minutes, and runs on CPU), then the
# benchmark of training steps: one cpm-ant-1b block, SDPA over the dense bias vs FlexAttention.
if [ "${FLEX:-1}" = 1 ]; then
    CPM_ATTENTION_TEST_DEVICE=cuda PYTHONPATH="$REPO" "$PY" -m pytest -q -p no:cacheprovider tests/model/test_attention.py \
        -k "relative_buckets-segments_context_padding or rotary-packed or gqa-packed or bias_table" \
        2>&1 | tee "$OUT/flex-tests.log" | tail -3
    PYTHONPATH="$REPO" "$PY" benchmarks/attention_memory.py --device cuda --T 1024 2048 --batch "${FLEX_BATCH:-8}" --steps train \
        2>&1 | tee "$OUT/flex-bench.log"
fi
# ---- end of 3 ----------------------------------------------------------------------------------
# ---- 4. Compiled blocks and the SDPA reference (issue 25 items 1, 3) ---------------------------
if [ "${VARIANTS:-1}" = 1 ]; then
    for variant in "--model.parallel.compile=true" "--model.parallel.attention=sdpa"; do
        rm -rf "$OUT/1b"
        echo "-- fit $variant"
        PYTHONPATH="$REPO:$REPO/benchmarks" "$PY" -m cpm_lightning.cli fit --config "$OUT/1b.yaml" $variant 2>&1 \
            | tee "$OUT/1b${variant//[^a-z]/_}.log" | grep -E "RESULT|rror|Traceback" || true
    done
    rm -rf "$OUT/1b"
fi
# ---- end of 4 ----------------------------------------------------------------------------------
echo "== done in $(( $(date +%s) - start ))s"
