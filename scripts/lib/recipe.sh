# Start of a GPU recipe, reproduce_table{1,2,4}.sh (source it, do not run it).
#
# Accepts the recipes' one flag, --dry-run (sets DRY_RUN=1), and sources the
# stage runner, the stage functions and the GPU settings. Sets REPO.

for arg in "$@"; do
  case "${arg}" in
    --dry-run) export DRY_RUN=1 ;;
    *) echo "unknown argument ${arg}; expected --dry-run" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=stages.sh
source "${REPO}/scripts/lib/stages.sh"
# shellcheck source=pipeline.sh
source "${REPO}/scripts/lib/pipeline.sh"
# shellcheck source=gpu.sh
source "${REPO}/scripts/lib/gpu.sh"
