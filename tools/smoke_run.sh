#!/usr/bin/env bash
# CPU smoke run: the whole pipeline (train -> average -> GPTQ -> int6+zstd -> roundtrip + sliding eval) on a
# tiny model and a dataset built from the Python standard library's docstrings. No GPU, no download.
# Step-based (no wall-clock cap) and single-threaded, so the same seed prints the same numbers on any machine
# load; any variable set in the environment overrides the smoke defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE_DIR=${SMOKE_DIR:-data/smoke}
python3 tools/smoke_data.py "$SMOKE_DIR" >/dev/null
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export DATA_PATH=${DATA_PATH:-$SMOKE_DIR} TOKENIZER_PATH=${TOKENIZER_PATH:-$SMOKE_DIR/smoke_1024_bpe.model}
export RUN_ID=${RUN_ID:-smoke} OUTPUT_DIR=${OUTPUT_DIR:-$SMOKE_DIR/out} LOG_DIR=${LOG_DIR:-$SMOKE_DIR/logs}
export NUM_LAYERS=${NUM_LAYERS:-4} MODEL_DIM=${MODEL_DIM:-128} NUM_HEADS=${NUM_HEADS:-4} NUM_KV_HEADS=${NUM_KV_HEADS:-2}
export MLP_MULT=${MLP_MULT:-2} ROPE_DIMS=${ROPE_DIMS:-16} BIGRAM_BUCKETS=${BIGRAM_BUCKETS:-512}
export BIGRAM_DIM=${BIGRAM_DIM:-32} TRAIN_SEQ_LEN=${TRAIN_SEQ_LEN:-128} TRAIN_BATCH_TOKENS=${TRAIN_BATCH_TOKENS:-4096}
export GRAD_ACCUM_STEPS=${GRAD_ACCUM_STEPS:-1} ITERATIONS=${ITERATIONS:-120} WARMUP_STEPS=${WARMUP_STEPS:-2}
export MAX_WALLCLOCK_SECONDS=${MAX_WALLCLOCK_SECONDS:-0} TRAIN_LOG_EVERY=${TRAIN_LOG_EVERY:-20}
export EVAL_STRIDE=${EVAL_STRIDE:-32}
export MUON_MOMENTUM_WARMUP_STEPS=${MUON_MOMENTUM_WARMUP_STEPS:-50} GPTQ_CALIB_BATCHES=${GPTQ_CALIB_BATCHES:-4}
export MATRIX_LR=${MATRIX_LR:-0.04} EMA_DECAY=${EMA_DECAY:-0.95}
exec python3 train_gpt.py
