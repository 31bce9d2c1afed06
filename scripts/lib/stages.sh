# Stage runner shared by the reproduction scripts (source it, do not run it).
#
# run_stage NAME CMD...   runs CMD once: it records RUN_DIR/stages/NAME.json
#                         (command, wall seconds, finish time) on success, and
#                         a rerun skips a stage whose record exists. With
#                         DRY_RUN=1 it prints the command instead.
# Needs RUN_DIR. STOP_AFTER=NAME stops the script after that stage.

run_stage() {
  local name="$1"
  shift
  local record="${RUN_DIR}/stages/${name}.json"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '# stage %s\n' "${name}"
    printf '%q ' "$@"
    printf '\n'
    return 0
  fi
  mkdir -p "${RUN_DIR}/stages"
  if [[ -f "${record}" ]]; then
    echo "[stage ${name}] done before; skipping (delete ${record} to redo)"
  else
    echo "[stage ${name}] running: $*"
    local start end
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    python - "${record}" "${name}" "${start}" "${end}" "$@" <<'PY'
import json, os, sys, time
record, name, start, end, *cmd = sys.argv[1:]
tmp = record + ".tmp"
with open(tmp, "w") as f:
    json.dump({"stage": name, "seconds": round(float(end) - float(start), 1),
               "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": cmd}, f, indent=2)
os.replace(tmp, record)
PY
  fi
  if [[ -n "${STOP_AFTER:-}" && "${STOP_AFTER}" == "${name}" ]]; then
    echo "[stage ${name}] STOP_AFTER=${name}; stopping"
    exit 0
  fi
}
