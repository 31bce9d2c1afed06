#!/usr/bin/env bash
# Reproduce Table 1 of Jin, Ge and Wei (2022) on WikiText-103 with GPUs: the
# small student (4 layers, 384 wide) as an LM, as a kNN-LM and with PP-KD
# using the Baevski and Auli teacher (16 layers, 1024 wide), plus the
# conventional KD student ("via KD") as an LM and as a kNN-LM.
#
# Usage: bash scripts/reproduce_table1.sh [--dry-run]
# Variables: WIKITEXT_DIR (WikiText-103 token files; downloaded when unset),
# RUN_DIR (default runs/table1), NUM_SHARDS (GPUs for the dumps, default:
# all visible GPUs).
#
# Expected cost, as estimates from the paper's setup on 8 V100-class GPUs:
# teacher training 2-3 days, student training about 1 day, each dump over the
# 103M training tokens a few hours. Disk: keys 103M x 384 x 2 bytes = 79 GB
# for the student, teacher states 103M x 1024 x 2 bytes = 211 GB, the IVFPQ
# index about 7 GB; the paper's datastores take 150 to 450 GB each.
set -euo pipefail

for arg in "$@"; do
  case "${arg}" in
    --dry-run) export DRY_RUN=1 ;;
    *) echo "unknown argument ${arg}; expected --dry-run" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/stages.sh
source "${REPO}/scripts/lib/stages.sh"
# shellcheck source=lib/pipeline.sh
source "${REPO}/scripts/lib/pipeline.sh"
# shellcheck source=lib/gpu.sh
source "${REPO}/scripts/lib/gpu.sh"

RUN_DIR="${RUN_DIR:-runs/table1}"
export RUN_DIR
mkdir -p "${RUN_DIR}"
DATA="${RUN_DIR}/data-bin"
CKPT="${RUN_DIR}/checkpoints"
DSTORE="${RUN_DIR}/datastore"
REPRO_COMMAND="bash scripts/reproduce_table1.sh $*"

run_stage prepare_data \
  python -m ppkd_fairseq.cli.prepare_data wikitext-103 \
  ${WIKITEXT_DIR:+--source "${WIKITEXT_DIR}"} \
  --destdir "${DATA}" \
  --workers 8

stage_train student wt103_student_small
stage_train teacher wt103_teacher
stage_dump_datastore student
stage_build_index
stage_dump_causal_teacher causal teacher
stage_sweep valid student
stage_sweep test student
stage_report "Table 1: WikiText-103, small student" ppkd-causal

# Conventional KD baseline: the student trained against the same teacher
# states, then used as an LM and as a kNN-LM over its own datastore.
run_stage train_student_kd \
  bash "${REPO}/scripts/train_kd.sh" wt103_student_small_kd "${DATA}" "${CKPT}/student_kd" "${DSTORE}" causal
DSTORE="${RUN_DIR}/datastore-kd"
stage_dump_datastore student_kd dump_datastore_kd
stage_build_index build_index_kd
# The KD student's kNN-LM uses no teacher: its sweep reports the LM and kNN-LM rows.
stage_sweep valid student_kd sweep_valid_kd "${RUN_DIR}/sweep-valid-kd"
stage_sweep test student_kd sweep_test_kd "${RUN_DIR}/sweep-test-kd"
stage_report "Table 1: WikiText-103, small student trained with KD" none report_kd -kd
