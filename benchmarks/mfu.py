"""Model FLOPs utilisation of flanjax's train step beside PyTorch's, on a GPU, bf16 compute.

FLOPs per step are flanjax.training.flops.step_flops, the count the trainer's
console and TensorBoard MFU use (every matmul of forward + backward,
attention included, embedding lookups not). MFU = those FLOPs / step time /
the device's dense bf16 peak (flanjax.training.flops.PEAK_FLOPS, by device_kind).

Both stacks train the same model from the same weights on the same full rows
(every position real, so padding cannot favour either): flanjax's train step
(optax AdamW, bf16 activations over float32 parameters) and transformers' model
with torch.optim.AdamW (fused) under CUDA bf16 autocast, the usual PyTorch
mixed-precision recipe. The same FLOP count divides both times. Each figure is
the median of `windows` windows of `steps` steps, with min and max.
"""

from __future__ import annotations

import dataclasses
import gc
import time

from benchmarks import common
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


def _oom(e: Exception) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower()


def size_config(name: str, overrides=None):
  """(config, lengths, batch) of a named size, bf16 compute, with gin's overrides applied.
  "<size>@<attention_impl>" (e.g. "decoder_1b@dot_product") is the size with that attention."""
  from flanjax.models import decoder, t5  # pylint: disable=g-import-not-at-top
  base, _, impl = name.partition("@")
  fam, shape, lengths, batch = SIZES[base]
  shape, lengths = dict(shape), dict(lengths)
  if impl:
    shape["attention_impl"] = impl
  for key in (base, name) if impl else (name,):  # a variant takes its size's overrides too
    if overrides and key in overrides:
      o = dict(overrides[key])
      lengths = o.pop("lengths", lengths)
      batch = o.pop("batch", batch)
      shape.update(o)
  cls = t5.T5Config if fam == "t5" else decoder.DecoderConfig
  return cls(**shape, dtype="bfloat16"), lengths, batch


def run(sizes, steps: int, warmup: int, force: bool, log, overrides=None, windows: int = 5,
        torch_side: bool = True, on_size=None) -> dict:
  """MFU per size of both stacks on a GPU; {"skipped": "no GPU"} elsewhere (unless `force`,
  for tests). `on_size(out)` is called after each size (a long run saves as it goes)."""
  import jax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  if dev.platform != "gpu" and not force:
    log("MFU: no GPU")
    return {"skipped": "no GPU"}
  peak = flops.device_peak_flops(dev)
  out = {"device": getattr(dev, "device_kind", str(dev)), "peak_flops": peak,
         "dtype": "bfloat16", "jax": jax.__version__}
  for name in sizes:
    cfg, lengths, batch = size_config(name, overrides)
    # PyTorch runs beside the first entry of each size; a later variant ("size@impl") is
    # flanjax alone, set beside that figure.
    base = name.partition("@")[0]
    first = next(n for n in sizes if n.partition("@")[0] == base)
    twin = torch_side and name == first
    res = None
    while batch >= 1 and res is None:
      try:
        res = _measure(cfg, lengths, batch, steps, warmup, windows, twin, log, name)
      except Exception as e:  # pylint: disable=broad-except
        if not _oom(e):
          res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
          log(f"MFU {name}: {res['error']}")
          break
        log(f"MFU {name}: batch {batch} does not fit; halving")
        batch //= 2
        cfg = dataclasses.replace(cfg, remat=True) if batch < 8 else cfg
      finally:
        gc.collect()
    if res is None:
      res = {"error": "does not fit at batch 1"}
    for side in ("flanjax", "torch"):
      r = res.get(side)
      if isinstance(r, dict) and "seconds_per_step" in r:
        r["mfu"] = round(res["flops_per_step"] / r["seconds_per_step"] / peak, 4) if peak else None
    fj, th = res.get("flanjax") or {}, res.get("torch") or {}
    if name != first:
      res["torch_of"] = first  # the entry whose PyTorch figure this one is set beside
      if isinstance(out.get(first), dict) and out[first].get("batch") == res.get("batch"):
        th = out[first].get("torch") or {}
    if fj.get("seconds_per_step") and th.get("seconds_per_step"):
      res["speedup_vs_torch"] = round(th["seconds_per_step"] / fj["seconds_per_step"], 3)
    if "flanjax" in res:  # flanjax's MFU also at the top level, as results carried it before
      res["mfu"] = fj.get("mfu")
    out[name] = res
    if on_size:
      on_size(out)
  return out


def _measure(cfg, lengths, batch, steps, warmup, windows, torch_side, log, name) -> dict:
  kind = stacks.packing_kind(cfg)
  fixed = ex_lib.fixed_examples(batch, lengths["inputs"], lengths["targets"], 0,
                                min(cfg.vocab_size, 32000))
  rows, _, _ = stacks.pack_rows(fixed, lengths, kind)
  b = stacks.stack_rows(rows, batch)
  tokens = batch * (lengths["inputs"] + lengths["targets"])
  res = {"batch": batch, "lengths": lengths, "remat": cfg.remat,
         "attention_impl": cfg.attention_impl, "flops_per_step": train_flops(cfg, lengths, batch)}
  if cfg.attention_impl == "auto":
    length = lengths["inputs"] if stacks.family(cfg) == "t5" else sum(lengths.values())
    res["attention_runs"] = stacks.auto_attention(cfg, batch, length)

  fj = stacks.Flanjax(cfg, stacks.AdamW())
  res["params"] = fj.num_params
  if torch_side:
    # PyTorch first, from the initial weights, then its cache emptied: JAX's allocator keeps
    # what it grew to, so PyTorch run second would get what is left (it ran out of memory
    # so at the 1.1B decoder's batch on an H200).
    res["torch"] = _measure_torch(cfg, fj.params(), fixed, tokens, steps, warmup, windows,
                                  log, name)
  t0 = time.perf_counter()
  # The first step's loss is on the initial weights (no z-loss here): the parity figure,
  # without compiling an evaluation step too (minutes of a GPU lease at these sizes).
  fj_loss0 = fj.train([b])
  compile_s = time.perf_counter() - t0
  fj.train([b] * warmup)
  fig, ms = _windows(lambda: fj.train([b] * steps), steps, windows, tokens)
  res["flanjax"] = {"device": fj.device, "dtype": fj.dtype, "loss_before": round(fj_loss0, 5),
                    "compile_and_first_step_s": round(compile_s, 2), **fig}
  th_loss0 = (res.get("torch") or {}).get("loss_before")
  log(f"MFU {name}: flanjax {fj.num_params / 1e6:.0f}M params, batch {batch}, {ms}; "
      f"initial loss {fj_loss0:.4f}" + ("" if th_loss0 is None else f" (PyTorch {th_loss0:.4f})"))
  return res


def _windows(step_fn, steps: int, windows: int, tokens: int):
  """Both stacks' timing: `windows` calls of step_fn (`steps` steps each) -> the figure's
  fields and its ms a step as "median [fastest-slowest]"."""
  w = common.Windows()
  for _ in range(windows):
    w.time(step_fn, steps)
  s = w.summary()
  fig = {"steps_per_s": s, "seconds_per_step": round(1 / s["median"], 5),
         "tokens_per_s": round(tokens * s["median"], 1)}
  return fig, f"{1e3 / s['median']:.1f} ms/step [{1e3 / s['max']:.1f}-{1e3 / s['min']:.1f}]"


def _measure_torch(cfg, params, fixed, tokens, steps, warmup, windows, log, name) -> dict:
  """transformers' twin on the same weights and rows: its figure, or its error."""
  import torch  # pylint: disable=g-import-not-at-top
  th = None
  try:
    th = stacks.Torch(cfg, params, stacks.AdamW())
    del params
    tb = th.batch(fixed)
    assert th.counts(tb) == (tokens, tokens)
    th_loss0 = th.loss(tb)
    t0 = time.perf_counter()
    th.train([tb] * (1 + warmup))
    first_s = time.perf_counter() - t0
    fig, ms = _windows(lambda: th.train([tb] * steps), steps, windows, tokens)
    out = {"device": th.device, "dtype": th.dtype, "torch": torch.__version__,
           "attn_implementation": th.attn_implementation,
           "optimizer": f"torch.optim.AdamW ({th.optimizer_impl})",
           "loss_before": round(th_loss0, 5), "warmup_s": round(first_s, 2), **fig}
    log(f"MFU {name}: PyTorch eager {ms}")
  except Exception as e:  # pylint: disable=broad-except
    out = {"error": (f"out of memory at batch {len(fixed)}" if _oom(e)
                     else f"{type(e).__name__}: {str(e)[:300]}")}
    log(f"MFU {name}: PyTorch {out['error']}")
  finally:
    del th
    gc.collect()
    if torch.cuda.is_available():
      torch.cuda.empty_cache()
  return out
