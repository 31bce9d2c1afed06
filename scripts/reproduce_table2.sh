#!/usr/bin/env bash
# Reproduce Table 2 of Jin, Ge and Wei (2022) on WikiText-103 with GPUs:
# PP-KD with a causal teacher, a masked-LM teacher and both averaged (the
# mixed teacher), all attached to one datastore of the small student.
#
# Usage: bash scripts/reproduce_table2.sh [--dry-run]
# Variables: WIKITEXT_DIR, RUN_DIR (default runs/table2; point it at a
# finished runs/table1 to reuse its models and datastore), NUM_SHARDS.
#
# Expected cost beyond Table 1, as estimates: masked-LM teacher training
# 2-3 days on 8 GPUs; its strided pass over 103M tokens is about 9 forward
# tokens per token; its states add 211 GB (103M x 1024 x float16).
set -euo pipefail

# shellcheck source=lib/recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/recipe.sh" "$@"

RUN_DIR="${RUN_DIR:-runs/table2}"
export RUN_DIR
mkdir -p "${RUN_DIR}"
DATA="${RUN_DIR}/data-bin"
CKPT="${RUN_DIR}/checkpoints"
DSTORE="${RUN_DIR}/datastore"
REPRO_COMMAND="bash scripts/reproduce_table2.sh $*"

run_stage prepare_data \
  python -m ppkd_fairseq.cli.prepare_data wikitext-103 \
  ${WIKITEXT_DIR:+--source "${WIKITEXT_DIR}"} \
  --destdir "${DATA}" \
  --workers 8

stage_train student wt103_student_small
stage_train teacher wt103_teacher
stage_train mlm_teacher wt103_mlm_teacher
stage_dump_datastore student
stage_build_index
stage_dump_causal_teacher causal teacher
stage_dump_masked_teacher masked mlm_teacher
stage_sweep valid student
stage_sweep test student
stage_report "Table 2: WikiText-103, causal, masked and mixed teachers" ppkd-causal+masked
