#!/bin/bash
# Peak RSS of the BBH CoT 3-shot evaluation (3,072-token prompts, batch 16) with the blockwise
# and the reference attention, same checkpoint, same examples (issue 18).
#   benchmarks/bbh_attention_rss.sh CHECKPOINT [MAX_EXAMPLES] [OUT_DIR]
set -euo pipefail
ckpt=${1:?give a checkpoint (a training run folder)}
n=${2:-16}
out=${3:-docs/results/bbh_attention_rss}
data=${FLANJAX_DATA_DIR:-$(dirname "$0")/../../shared/data}
tasks=$(ls "$data/bbh/cot-prompts" | sed 's/\.txt$//; s/^/bbh_/' | paste -sd, -)
mkdir -p "$out"
for impl in blockwise reference; do
  /usr/bin/time -v -o "$out/$impl.time" python -m flanjax.evaluate --checkpoint "$ckpt" \
    --gin_file=eval/bbh.gin --tasks="$tasks" --max_examples="$n" --out "$out/$impl" \
    --gin.evaluate.attention_impl="'$impl'"
  grep "Maximum resident" "$out/$impl.time"
done
