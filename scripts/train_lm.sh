#!/usr/bin/env bash
# Train a causal language model (a student or the causal teacher) with
# fairseq-train from a configuration in configs/. A rerun resumes from
# SAVE_DIR/checkpoint_last.pt, and returns at once when that checkpoint has
# reached the max-update in effect (the configuration's, or a --max-update
# among the FAIRSEQ_FLAGs).
#
# Usage: bash scripts/train_lm.sh CONFIG DATA_BIN SAVE_DIR [FAIRSEQ_FLAG ...]
#   CONFIG        name in configs/ (for example wt103_student_small) or a YAML path
#   DATA_BIN      data-bin folder written by python -m ppkd_fairseq.cli.prepare_data
#   SAVE_DIR      checkpoint folder
#   FAIRSEQ_FLAG  extra fairseq-train flags; they come last, so they override
#                 the configuration (for example --update-freq 24 on one GPU)
# Variables: DRY_RUN=1 prints the fairseq-train command instead of running it.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 CONFIG DATA_BIN SAVE_DIR [FAIRSEQ_FLAG ...]" >&2
  exit 2
fi
CONFIG="$1"
DATA_BIN="$2"
SAVE_DIR="$3"
shift 3
EXPECTED_TASK=language_modeling

# Check the task here, so that a causal configuration is not trained as a
# masked LM or the other way round. A CONFIG that is neither a file nor a
# name in configs/ is left to ppkd_fairseq.cli.train, which lists the names.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config_path="${CONFIG}"
if [[ ! -f "${config_path}" ]]; then
  config_path="${REPO}/configs/${CONFIG}.yaml"
fi
if [[ -f "${config_path}" ]]; then
  task="$(python -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["task"])' "${config_path}")"
  if [[ "${task}" != "${EXPECTED_TASK}" ]]; then
    echo "error: ${CONFIG} has task ${task}, but $0 trains ${EXPECTED_TASK} models; use scripts/train_mlm.sh instead" >&2
    exit 2
  fi
fi

dry_run=()
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  dry_run=(--dry-run)
fi

python -m ppkd_fairseq.cli.train \
  "${CONFIG}" \
  "${DATA_BIN}" \
  --save-dir "${SAVE_DIR}" \
  "${dry_run[@]}" \
  -- \
  "$@"
