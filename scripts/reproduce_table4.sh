#!/usr/bin/env bash
# Reproduce the student-size and corpus comparison of Jin, Ge and Wei (2022)
# with GPUs: for each student size (small, mid, large, DistilGPT-2- and
# GPT-2-small-shaped), the LM, the kNN-LM, PP-KD with the causal teacher,
# and the same student trained with KD as an LM and as a kNN-LM (the
# paper's "(KD)" rows), on WikiText-103 or on a raw-text corpus such as
# BookCorpus (split 90/5/5 by document).
#
# Usage: bash scripts/reproduce_table4.sh [--dry-run]
# Variables: CORPUS (wikitext-103, default, or text), TEXT_SOURCE (folder of
# .txt documents when CORPUS=text), WIKITEXT_DIR, RUN_DIR (default
# runs/table4-CORPUS), STUDENTS (default "small mid large distilgpt2
# gpt2small"), NUM_SHARDS.
#
# Expected cost, as estimates: each student trains 1-3 days on 8 GPUs and
# its datastore takes 103M x d x 2 bytes (79 GB at d = 384, 158 GB at 768);
# the teacher is trained once and its states are dumped once per student
# datastore (211 GB each). Each KD student trains slower than its
# from-scratch twin, since its loss scores the full vocabulary for every
# token, and adds a datastore of its own keys of the same size.
set -euo pipefail

# shellcheck source=lib/recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/recipe.sh" "$@"

CORPUS="${CORPUS:-wikitext-103}"
RUN_DIR="${RUN_DIR:-runs/table4-${CORPUS}}"
export RUN_DIR
mkdir -p "${RUN_DIR}"
DATA="${RUN_DIR}/data-bin"
CKPT="${RUN_DIR}/checkpoints"
REPRO_COMMAND="bash scripts/reproduce_table4.sh $*"
read -r -a students <<< "${STUDENTS:-small mid large distilgpt2 gpt2small}"

if [[ "${CORPUS}" == text ]]; then
  run_stage prepare_data \
    python -m ppkd_fairseq.cli.prepare_data text \
    --source "${TEXT_SOURCE:?set TEXT_SOURCE to the corpus folder}" \
    --destdir "${DATA}" \
    --workers 8
else
  run_stage prepare_data \
    python -m ppkd_fairseq.cli.prepare_data "${CORPUS}" \
    ${WIKITEXT_DIR:+--source "${WIKITEXT_DIR}"} \
    --destdir "${DATA}" \
    --workers 8
fi
stage_train teacher wt103_teacher

for size in "${students[@]}"; do
  student="student_${size}"
  DSTORE="${RUN_DIR}/datastore-${size}"
  stage_train "${student}" "wt103_student_${size}"
  stage_dump_datastore "${student}" "dump_datastore_${size}"
  stage_build_index "build_index_${size}"
  stage_dump_causal_teacher causal teacher "dump_teacher_causal_${size}"
  stage_sweep valid "${student}" "sweep_valid_${size}" "${RUN_DIR}/sweep-valid-${size}"
  stage_sweep test "${student}" "sweep_test_${size}" "${RUN_DIR}/sweep-test-${size}"
  # The same student trained with KD from the same teacher states, then
  # used as an LM and as a kNN-LM over its own datastore: the "(KD)" rows.
  stage_kd_student "wt103_student_${size}_kd" causal "-${size}"
  stage_report "Student ${size} on ${CORPUS}" none "report_${size}" "-${size}" "-kd-${size}"
done
