# Settings shared by the GPU recipes (source it after pipeline.sh).
#
# The paper's evaluation: k = 1024 neighbours, 32 probes, an IVFPQ index
# with 4096 lists and 64-byte codes trained on 1M sampled keys, and 512
# tokens of context per evaluated token (here 1024-token blocks of which
# the first 512 are context).
K=1024
NUM_SHARDS="${NUM_SHARDS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))' 2>/dev/null || echo 1)}"
TRAIN_EXTRA=()
INDEX_ARGS=(--nlist 4096 --code-size 64 --train-size 1000000 --gpu)
MLM_ARGS=(--stride 7 --max-tokens 65536)
EVAL_ARGS=(
  --tokens-per-sample 1024
  --context-window 512
  --max-tokens 16384
  --fp16
  --no-progress-bar
  --log-format simple
  --log-interval 100
)
