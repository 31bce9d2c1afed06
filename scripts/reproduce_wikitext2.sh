#!/usr/bin/env bash
# Reproduce the shape of the paper's Tables 1 and 2 on WikiText-2 on a CPU:
# prepare the data, train a small student, a causal teacher and a masked-LM
# teacher, dump the datastore (keys, values, both teachers' states) over the
# training split, build the FAISS index, sweep T, mu and lambda on
# validation, and evaluate the test split with the LM, the kNN-LM and PP-KD.
#
# Usage: WIKITEXT_DIR=../shared/data bash scripts/reproduce_wikitext2.sh [--smoke] [--dry-run]
#   --smoke    the same stages on a small slice of the data, in a few minutes
#   --dry-run  print every command without running it
# Variables: WIKITEXT_DIR (token files; downloaded when unset), RUN_DIR
# (outputs; default runs/wikitext2 or runs/wikitext2-smoke).
# Each stage records RUN_DIR/stages/NAME.json; a rerun skips finished stages.
set -euo pipefail

SMOKE=0
for arg in "$@"; do
  case "${arg}" in
    --smoke) SMOKE=1 ;;
    --dry-run) export DRY_RUN=1 ;;
    *) echo "unknown argument ${arg}; expected --smoke or --dry-run" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/stages.sh
source "${REPO}/scripts/lib/stages.sh"
if [[ "${SMOKE}" == 1 ]]; then
  RUN_DIR="${RUN_DIR:-runs/wikitext2-smoke}"
else
  RUN_DIR="${RUN_DIR:-runs/wikitext2}"
fi
export RUN_DIR
mkdir -p "${RUN_DIR}"
DATA="${RUN_DIR}/data-bin"
CKPT="${RUN_DIR}/checkpoints"

run_stage prepare_data \
  python -m ppkd_fairseq.cli.prepare_data wikitext-2 \
  ${WIKITEXT_DIR:+--source "${WIKITEXT_DIR}"} \
  --destdir "${DATA}"

for model in student teacher mlm_teacher; do
  run_stage "train_${model}" \
    python -m ppkd_fairseq.cli.train "wt2_cpu_${model}" "${DATA}" \
    --save-dir "${CKPT}/${model}"
done
