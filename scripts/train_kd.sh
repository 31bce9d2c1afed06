#!/usr/bin/env bash
# Train a causal student with conventional logit distillation (criterion
# ppkd_distillation) from a teacher's states stored in a PP-KD datastore
# that was dumped from the training split. A rerun resumes from
# SAVE_DIR/checkpoint_last.pt, and returns at once when that checkpoint has
# reached the max-update in effect (the configuration's, or a --max-update
# among the FAIRSEQ_FLAGs).
#
# Usage: bash scripts/train_kd.sh CONFIG DATA_BIN SAVE_DIR DSTORE TEACHER [FAIRSEQ_FLAG ...]
#   CONFIG        name in configs/ with criterion ppkd_distillation (for
#                 example wt2_cpu_student_kd) or a YAML path
#   DATA_BIN      data-bin folder written by python -m ppkd_fairseq.cli.prepare_data
#   SAVE_DIR      checkpoint folder
#   DSTORE        datastore folder dumped from DATA_BIN's train split
#   TEACHER       teacher name inside DSTORE (its --ppkd-teacher-name, usually causal)
#   FAIRSEQ_FLAG  extra fairseq-train flags; they come last, so they override
#                 the configuration (for example --kd-alpha 0.3)
# Variables: DRY_RUN=1 prints the fairseq-train command instead of running it.
set -euo pipefail

if [[ $# -lt 5 ]]; then
  echo "usage: $0 CONFIG DATA_BIN SAVE_DIR DSTORE TEACHER [FAIRSEQ_FLAG ...]" >&2
  exit 2
fi
CONFIG="$1"
DATA_BIN="$2"
SAVE_DIR="$3"
DSTORE="$4"
TEACHER="$5"
shift 5
EXPECTED_TASK=language_modeling
EXPECTED_CRITERION=ppkd_distillation

# Check the configuration here, so that a plain student configuration does
# not run without its teacher. A CONFIG that is neither a file nor a name in
# configs/ is left to ppkd_fairseq.cli.train, which lists the names.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config_path="${CONFIG}"
if [[ ! -f "${config_path}" ]]; then
  config_path="${REPO}/configs/${CONFIG}.yaml"
fi
if [[ -f "${config_path}" ]]; then
  # load_config resolves 'extends', so a configuration's base counts too.
  read -r task criterion < <(python -c \
    'import sys; from ppkd_fairseq.cli.train import load_config; c = load_config(sys.argv[1]); print(c["task"], c.get("criterion"))' \
    "${config_path}")
  if [[ "${task}" != "${EXPECTED_TASK}" ]]; then
    echo "error: ${CONFIG} has task ${task}, but $0 trains ${EXPECTED_TASK} students" >&2
    exit 2
  fi
  if [[ "${criterion}" != "${EXPECTED_CRITERION}" ]]; then
    echo "error: ${CONFIG} has criterion ${criterion}, but $0 needs ${EXPECTED_CRITERION}; use a *_kd configuration, or scripts/train_lm.sh to train without a teacher" >&2
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
  --kd-datastore "${DSTORE}" \
  --kd-teacher "${TEACHER}" \
  "$@"
