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
#   K, PROBE    neighbours per token and IVF lists probed (default 32)

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

stage_train() {  # stage_train NAME CONFIG [FAIRSEQ_FLAGS...]: flags for this model after TRAIN_EXTRA
  local name="$1" config="$2"
  shift 2
  run_stage "train_${name}" \
    python -m ppkd_fairseq.cli.train "${config}" "${DATA}" \
    --save-dir "${CKPT}/${name}" \
    -- "${TRAIN_EXTRA[@]}" "$@"
}

stage_dump_datastore() {  # stage_dump_datastore STUDENT_NAME [STAGE_NAME]
  local student="$1" stage="${2:-dump_datastore}"
  run_stage "${stage}" \
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

stage_build_index() {  # stage_build_index [STAGE_NAME]
  run_stage "${1:-build_index}" \
    python -m ppkd_fairseq.cli.build_index "${DSTORE}" \
    --overwrite \
    "${INDEX_ARGS[@]}"
}

stage_dump_causal_teacher() {  # stage_dump_causal_teacher TEACHER_NAME MODEL_NAME [STAGE_NAME]
  local name="$1" model="$2" stage="${3:-dump_teacher_$1}"
  run_stage "${stage}" \
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

stage_sweep() {  # stage_sweep SPLIT STUDENT_NAME [STAGE_NAME [OUT_DIR]]: cache the split once, then the grid
  local split="$1" student="$2" stage="${3:-sweep_$1}" out="${4:-${RUN_DIR}/sweep-$1}"
  run_stage "${stage}" \
    python -m ppkd_fairseq.cli.sweep "${DATA}" \
    --path "${CKPT}/${student}/checkpoint_last.pt" \
    --dstore "${DSTORE}" \
    --split "${split}" \
    --k "${K}" \
    --probe "${PROBE:-32}" \
    --out-dir "${out}" \
    --no-progress \
    -- "${EVAL_ARGS[@]}"
}

stage_check_test_eval() {  # stage_check_test_eval LABEL STUDENT_NAME: stock fairseq-eval-lm at a tuned point
  local label="$1" student="$2"
  local best="${RUN_DIR}/sweep-valid/best.json"
  local point=()
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    mapfile -t point < <(python -c 'import json,sys; p=json.load(open(sys.argv[1]))["best"][sys.argv[2]]; print(p["temperature"]); print(p["mu"]); print(p["lambda"]); print(",".join(p["teachers"]) or "none")' "${best}" "${label}")
  else
    point=(T MU LAMBDA TEACHERS)
  fi
  local teachers=()
  [[ "${point[3]}" != none ]] && teachers=(--ppkd-teachers "${point[3]}")
  run_stage "check_test_${label}" \
    fairseq-eval-lm "${DATA}" \
    --user-dir "${USER_DIR}" \
    --task ppkd_language_modeling \
    --path "${CKPT}/${student}/checkpoint_last.pt" \
    --gen-subset test \
    --ppkd-dstore "${DSTORE}" \
    --ppkd-k "${K}" \
    --ppkd-probe "${PROBE:-32}" \
    --ppkd-temperature "${point[0]}" \
    --ppkd-mu "${point[1]}" \
    --ppkd-lambda "${point[2]}" \
    "${teachers[@]}" \
    --ppkd-analysis-out "${RUN_DIR}/check-test-${label}.tsv" \
    --ppkd-summary-out "${RUN_DIR}/check-test-${label}.json" \
    "${EVAL_ARGS[@]}"
}

stage_kd_student() {  # stage_kd_student CONFIG TEACHER TAG [FAIRSEQ_FLAGS...]: the "via KD" student
  # Trains CONFIG (a ppkd_distillation configuration) against TEACHER's
  # states in DSTORE into CKPT/student_kd${TAG}, then builds the student's
  # own datastore and index in RUN_DIR/datastore-kd${TAG} and sweeps its
  # kNN-LM into sweep-{valid,test}-kd${TAG}. TAG keeps several KD students
  # of one run apart (for example "-small", or "" for a single one). That
  # datastore has no teacher, so its sweep tunes the kNN-LM only.
  local config="$1" teacher="$2" tag="$3"
  shift 3
  local name="student_kd${tag//-/_}"
  run_stage "train_${name}" \
    bash "${REPO}/scripts/train_kd.sh" "${config}" "${DATA}" "${CKPT}/${name}" "${DSTORE}" "${teacher}" \
    "${TRAIN_EXTRA[@]}" "$@"
  local main_dstore="${DSTORE}"
  DSTORE="${RUN_DIR}/datastore-kd${tag}"
  stage_dump_datastore "${name}" "dump_datastore_kd${tag//-/_}"
  stage_build_index "build_index_kd${tag//-/_}"
  stage_sweep valid "${name}" "sweep_valid_kd${tag//-/_}" "${RUN_DIR}/sweep-valid-kd${tag}"
  stage_sweep test "${name}" "sweep_test_kd${tag//-/_}" "${RUN_DIR}/sweep-test-kd${tag}"
  DSTORE="${main_dstore}"
}

stage_report() {  # stage_report TITLE CHECK_LABEL [STAGE_NAME [SUFFIX [KD_SUFFIX]]]
  # SUFFIX picks sweep-valid${SUFFIX}, sweep-test${SUFFIX} and results${SUFFIX}.
  # KD_SUFFIX adds the "via KD" rows from sweep-valid${KD_SUFFIX} and
  # sweep-test${KD_SUFFIX}.
  local title="$1" label="$2" stage="${3:-report}" suffix="${4:-}" kd_suffix="${5:-}"
  local checks=() kd=()
  if [[ -f "${RUN_DIR}/check-test-${label}.json" || "${DRY_RUN:-0}" == 1 ]]; then
    checks=(--check-summary "${RUN_DIR}/check-test-${label}.json")
  fi
  if [[ -n "${kd_suffix}" ]]; then
    kd=(--kd-valid-sweep "${RUN_DIR}/sweep-valid${kd_suffix}" --kd-test-cache "${RUN_DIR}/sweep-test${kd_suffix}/cache")
  fi
  run_stage "${stage}" \
    python -m ppkd_fairseq.cli.report \
    --valid-sweep "${RUN_DIR}/sweep-valid${suffix}" \
    --test-cache "${RUN_DIR}/sweep-test${suffix}/cache" \
    --data "${DATA}" \
    --dstore "${DSTORE}" \
    --stages "${RUN_DIR}/stages" \
    "${checks[@]}" \
    "${kd[@]}" \
    --title "${title}" \
    --command "${REPRO_COMMAND:-}" \
    --out-dir "${RUN_DIR}/results${suffix}"
}
