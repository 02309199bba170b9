#!/usr/bin/env bash
# One GPU machine's checks, in order of worth, each under its own time limit so that what
# finished is kept when time runs out:
#   0. attention_impl='auto' (cuDNN) against the reference on packed and prefix-LM decoder
#      rows in bf16: logits and gradients (benchmarks/attention_parity.py, about a minute);
#   1. MFU of flanjax and PyTorch eager on the same GPU, bf16: T5-base, the 1.1B decoder
#      (cuDNN attention), T5-large, then variants (gpu.gin's mfu_sizes; benchmarks/mfu.py);
#   2. the step benchmark at gpu.gin's size (T5 and decoder, flanjax vs PyTorch eager).
# Needs a GPU with jax[cuda], torch (CUDA), transformers, flax, optax, gin-config; seqio and
# TensorFlow are not needed (synthetic examples). Run from the repository's root:
#   bash benchmarks/gpu_run.sh [seconds, default 500]
# Writes attention_parity.json, mfu.json, train_t5.json, train_decoder.json, logs and machine.txt under
# ${OUT:-benchmarks/results/gpu_run}. Wheels in .whl/ (e.g. gin-config) are installed first
# into /tmp/site, for machines that cannot reach a package index.
set -uo pipefail
budget=${1:-500}
out=${OUT:-benchmarks/results/gpu_run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
    --format=csv; uptime; } 2>&1 | tee "$out/machine.txt"
$py - <<'EOF' 2>&1 | tee -a "$out/machine.txt" || exit 1
import importlib.metadata as md
import jax, torch
print({p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "gin-config")})
print("jax devices:", jax.devices(), "torch cuda:", torch.cuda.is_available())
assert jax.devices()[0].platform == "gpu" and torch.cuda.is_available(), "no GPU on one side"
EOF

left() { echo $((budget - SECONDS)); }
bench() {  # name, seconds at most, gin bindings...
  local name=$1 limit=$2; shift 2
  [ "$(left)" -gt 60 ] || { echo "skipped $name: $(left) s left"; return; }
  [ "$limit" -le "$(left)" ] || limit=$(left)
  echo "== $name (at most $limit s)"
  timeout --signal=INT --kill-after=10 "$limit" $py -m benchmarks.run \
    --gin_file=benchmarks/configs/gpu.gin --gin.benchmark.mixture="'synthetic'" "$@" \
    --out="$out/$name.json" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} at ${SECONDS} s"
}
echo "== attention_parity (at most 150 s)"
timeout --signal=INT --kill-after=10 150 $py -m benchmarks.attention_parity \
  --out="$out/attention_parity.json" 2>&1 | tee "$out/attention_parity.log"
echo "== attention_parity: exit ${PIPESTATUS[0]} at ${SECONDS} s"
bench mfu $((budget * 3 / 5)) --gin.benchmark.sections="['mfu']"
bench train_t5 $(( ($(left) - 10) / 2 )) --gin.benchmark.sections="['train']" \
  --gin.benchmark.models="['t5']" --gin.benchmark.torch_compile=False
bench train_decoder $(( $(left) - 10 )) --gin.benchmark.sections="['train']" \
  --gin.benchmark.models="['decoder']" --gin.benchmark.torch_compile=False
nvidia-smi --query-gpu=name,clocks.sm,temperature.gpu,power.draw --format=csv 2>&1 | tee -a "$out/machine.txt"
