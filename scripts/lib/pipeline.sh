# The stages of a PP-KD reproduction, shared by reproduce_wikitext2.sh and
# the GPU recipes reproduce_table{1,2,4}.sh (source it after stages.sh).
#
# Each function runs one stage through run_stage, so a rerun skips it and
# DRY_RUN=1 prints it. They read these variables:
#   DATA        fairseq data-bin (one dict.txt for every model)
#   CKPT        checkpoint root; model NAME trains into CKPT/NAME
#   DSTORE      datastore folder
#   EVAL_ARGS   array of fairseq-eval-lm flags (context, batch size, --cpu)
#   TRAIN_EXTRA array of extra fairseq-train flags (may be empty)
#   INDEX_ARGS  array of build_index flags
#   MLM_ARGS    array of add-masked-teacher flags
#   NUM_SHARDS  processes (one per GPU) sharing each dump; 1 runs one process

USER_DIR="${REPO}/ppkd_fairseq"
NUM_SHARDS="${NUM_SHARDS:-1}"

# shards CMD...: CMD itself, or NUM_SHARDS copies of it with their shard ids.
shards() {
  if [[ "${NUM_SHARDS}" -gt 1 ]]; then
    bash "${REPO}/scripts/lib/run_shards.sh" "${NUM_SHARDS}" "$@"
  else
    "$@"
  fi
}

stage_train() {  # stage_train NAME CONFIG
  local name="$1" config="$2"
  run_stage "train_${name}" \
    python -m ppkd_fairseq.cli.train "${config}" "${DATA}" \
    --save-dir "${CKPT}/${name}" \
    -- "${TRAIN_EXTRA[@]}"
}

stage_dump_datastore() {  # stage_dump_datastore STUDENT_NAME
  local student="$1"
  run_stage dump_datastore \
    shards fairseq-eval-lm "${DATA}" \
    --user-dir "${USER_DIR}" \
    --task ppkd_language_modeling \
    --path "${CKPT}/${student}/checkpoint_last.pt" \
    --gen-subset train \
    --ppkd-mode dump \
    --ppkd-dstore "${DSTORE}" \
    --ppkd-overwrite \
    "${EVAL_ARGS[@]}"
}

stage_build_index() {
  run_stage build_index \
    python -m ppkd_fairseq.cli.build_index "${DSTORE}" \
    --overwrite \
    "${INDEX_ARGS[@]}"
}

stage_dump_causal_teacher() {  # stage_dump_causal_teacher TEACHER_NAME MODEL_NAME
  local name="$1" model="$2"
  run_stage "dump_teacher_${name}" \
    shards fairseq-eval-lm "${DATA}" \
    --user-dir "${USER_DIR}" \
    --task ppkd_language_modeling \
    --path "${CKPT}/${model}/checkpoint_last.pt" \
    --gen-subset train \
    --ppkd-mode dump_teacher \
    --ppkd-dstore "${DSTORE}" \
    --ppkd-teacher-name "${name}" \
    "${EVAL_ARGS[@]}"
}

stage_dump_masked_teacher() {  # stage_dump_masked_teacher TEACHER_NAME MODEL_NAME
  local name="$1" model="$2"
  run_stage "dump_teacher_${name}" \
    shards python -m ppkd_fairseq.cli.datastore add-masked-teacher "${DSTORE}" \
    --checkpoint "${CKPT}/${model}/checkpoint_last.pt" \
    --data "${DATA}" \
    --split train \
    --name "${name}" \
    "${MLM_ARGS[@]}"
}
