#!/usr/bin/env bash
# Run one command as NUM_SHARDS processes, one per GPU, and wait for all.
#
# Usage: bash scripts/lib/run_shards.sh NUM_SHARDS CMD...
# Process i runs CMD --num-shards NUM_SHARDS --shard-id i with
# CUDA_VISIBLE_DEVICES=i; each writes its rows of the datastore at their
# global offsets and the last one to finish writes the manifest. Exits
# non-zero when any shard fails.
set -euo pipefail

num_shards="$1"
shift
pids=()
for ((i = 0; i < num_shards; i++)); do
  CUDA_VISIBLE_DEVICES="${i}" "$@" --num-shards "${num_shards}" --shard-id "${i}" &
  pids+=("$!")
done
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || status=1
done
exit "${status}"
