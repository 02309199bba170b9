"""Model FLOPs utilisation of flanjax's train step on a GPU, bf16 compute.

FLOPs per step are flanjax.training.flops.step_flops, the count the trainer's
console and TensorBoard MFU use (every matmul of forward + backward,
attention included, embedding lookups not). MFU = those FLOPs / step time /
the device's dense bf16 peak (flanjax.training.flops.PEAK_FLOPS, by device_kind).
"""

from __future__ import annotations

import dataclasses
import time

from benchmarks import examples as ex_lib
from benchmarks import stacks
from flanjax.data import packing
from flanjax.training import flops

# The shapes of gin_configs/models/t5_base.gin and t5_large.gin (T5 v1.1), and a
# 1.1B Llama-style decoder (TinyLlama's shape).
T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_heads=12,
               num_encoder_layers=12, num_decoder_layers=12)
T5_LARGE = dict(vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_heads=16,
                num_encoder_layers=24, num_decoder_layers=24)
DECODER_1B = dict(vocab_size=32000, d_model=2048, num_heads=32, num_kv_heads=4, head_dim=64,
                  d_ff=5632, num_layers=22)
SIZES = {
    "t5_base": ("t5", T5_BASE, {"inputs": 512, "targets": 128}, 64),
    "t5_large": ("t5", T5_LARGE, {"inputs": 512, "targets": 128}, 32),
    "decoder_1b": ("decoder", DECODER_1B, {"inputs": 1536, "targets": 512}, 16),
}


def train_flops(cfg, lengths: dict, batch: int) -> float:
  """Training FLOPs of one step on full rows: flanjax.training.flops, the trainer's count."""
  return flops.step_flops(cfg, packing.row_lengths(lengths, stacks.packing_kind(cfg)), batch)


def run(sizes, steps: int, warmup: int, force: bool, log, overrides=None) -> dict:
  """MFU per size on a GPU; {"skipped": "no GPU"} elsewhere (unless `force`, for tests)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flanjax.models import decoder, t5  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  if dev.platform != "gpu" and not force:
    log("MFU: no GPU")
    return {"skipped": "no GPU"}
  peak = flops.device_peak_flops(dev)
  out = {"device": getattr(dev, "device_kind", str(dev)), "peak_flops": peak, "dtype": "bfloat16"}
  for name in sizes:
    fam, shape, lengths, batch = SIZES[name]
    shape, lengths, batch = dict(shape), dict(lengths), batch
    if overrides and name in overrides:
      o = dict(overrides[name])
      lengths = o.pop("lengths", lengths)
      batch = o.pop("batch", batch)
      shape.update(o)
    cls = t5.T5Config if fam == "t5" else decoder.DecoderConfig
    cfg = cls(**shape, dtype="bfloat16")
    res = None
    while batch >= 1 and res is None:
      try:
        res = _measure(cfg, lengths, batch, steps, warmup)
      except Exception as e:  # pylint: disable=broad-except
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
          res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
          break
        log(f"MFU {name}: batch {batch} does not fit; halving")
        batch //= 2
        cfg = dataclasses.replace(cfg, remat=True) if batch < 8 else cfg
    if res is None:
      res = {"error": "does not fit at batch 1"}
    if "seconds_per_step" in res:
      res["mfu"] = round(res["flops_per_step"] / res["seconds_per_step"] / peak, 4) if peak else None
      log(f"MFU {name}: {res['params'] / 1e6:.0f}M params, batch {res['batch']}, "
          f"{res['seconds_per_step'] * 1e3:.0f} ms/step, MFU {res['mfu']}")
    out[name] = res
  return out


def _measure(cfg, lengths, batch, steps, warmup) -> dict:
  fj = stacks.Flanjax(cfg, stacks.AdamW())
  kind = stacks.packing_kind(cfg)
  fixed = ex_lib.fixed_examples(batch, lengths["inputs"], lengths["targets"], 0,
                                min(cfg.vocab_size, 32000))
  rows, _, _ = stacks.pack_rows(fixed, lengths, kind)
  b = stacks.stack_rows(rows, batch)
  t0 = time.perf_counter()
  fj.train([b])
  compile_s = time.perf_counter() - t0
  fj.train([b] * warmup)
  t0 = time.perf_counter()
  fj.train([b] * steps)
  secs = (time.perf_counter() - t0) / steps
  flops = train_flops(cfg, lengths, batch)
  tokens = batch * (lengths["inputs"] + lengths["targets"])
  return {"params": fj.num_params, "batch": batch, "lengths": lengths, "remat": cfg.remat,
          "seconds_per_step": round(secs, 5), "tokens_per_s": round(tokens / secs, 1),
          "flops_per_step": flops, "compile_and_first_step_s": round(compile_s, 2)}
