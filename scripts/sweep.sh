#!/usr/bin/env bash
# Sweep T, mu and lambda of the kNN-LM and PP-KD on the validation split of a
# finished datastore (reproduce_wikitext2.sh builds one). The sweep caches
# each token's neighbours and teacher log-probabilities once and evaluates
# the grid from the cache. It writes grid.csv, best.json, heatmaps and the
# fairseq-eval-lm commands for the test split at the best points.
#
# Usage: bash scripts/sweep.sh [SWEEP_OPTION ...]
#   SWEEP_OPTION  extra options of python -m ppkd_fairseq.cli.sweep, for
#                 example --temperatures 1:20:1 or --force-cache
# Variables (defaults follow reproduce_wikitext2.sh's layout):
#   RUN_DIR   run folder (default: runs/wikitext2)
#   DATA      data-bin (default: RUN_DIR/data-bin)
#   STUDENT   student checkpoint (default: RUN_DIR/checkpoints/student/checkpoint_last.pt)
#   DSTORE    datastore with index and teachers (default: RUN_DIR/datastore)
#   SPLIT     split to sweep on (default: valid)
#   OUT_DIR   sweep outputs and cache (default: RUN_DIR/sweep-SPLIT)
#   K         neighbours per token (default: 1024)
#   PROBE     IVF lists probed (default: 8, the full WikiText-2 run's 8 of
#             its 1024 lists; the paper probes 32 of 4096)
#   TEACHERS  comma-separated teachers (default: every teacher in DSTORE)
#   EVAL_FLAGS  fairseq-eval-lm flags separated by spaces, in place of EVAL_ARGS below
# A rerun with the same inputs reuses OUT_DIR/cache and only redoes the grid.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="${RUN_DIR:-runs/wikitext2}"
DATA="${DATA:-${RUN_DIR}/data-bin}"
STUDENT="${STUDENT:-${RUN_DIR}/checkpoints/student/checkpoint_last.pt}"
DSTORE="${DSTORE:-${RUN_DIR}/datastore}"
SPLIT="${SPLIT:-valid}"
OUT_DIR="${OUT_DIR:-${RUN_DIR}/sweep-${SPLIT}}"
K="${K:-1024}"
PROBE="${PROBE:-8}"
TEACHERS="${TEACHERS:-}"
# fairseq-eval-lm flags of the cache pass, copied into the test commands.
# Every evaluated token gets at least 128 tokens of left context.
EVAL_ARGS=(
  --tokens-per-sample 256
  --context-window 128
  --max-tokens 8192
  --cpu
  --no-progress-bar
  --log-format simple
  --log-interval 100
)
if [[ -n "${EVAL_FLAGS:-}" ]]; then
  read -r -a EVAL_ARGS <<< "${EVAL_FLAGS}"
fi

TEACHER_ARGS=()
if [[ -n "${TEACHERS}" ]]; then
  TEACHER_ARGS=(--teachers "${TEACHERS}")
fi

export PYTHONPATH="${REPO}${PYTHONPATH:+:${PYTHONPATH}}"
python -m ppkd_fairseq.cli.sweep "${DATA}" \
  --path "${STUDENT}" \
  --dstore "${DSTORE}" \
  --out-dir "${OUT_DIR}" \
  --split "${SPLIT}" \
  --k "${K}" \
  --probe "${PROBE}" \
  "${TEACHER_ARGS[@]}" \
  "$@" \
  -- \
  "${EVAL_ARGS[@]}"
