"""Where a train step's time goes, flanjax vs PyTorch, at the benchmark's size.

    python -m benchmarks.profile_step                      # the decoder of cpu.gin
    python -m benchmarks.profile_step --model=t5 --out=/tmp/p.json

Phases (each the median of `--reps` timed calls, after a warm-up): the forward
pass with the loss, forward + backward, and the whole step (with AdamW); the
optimizer's cost is the step less forward + backward. Ops: the top of
torch.profiler's table (self CPU time) and of JAX's profiler trace (XLA's
per-op events, summed by name), both over `--reps` whole steps. Prints both
and writes JSON (with the load average before and after: figures from a busy
machine are labelled so).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _median_time(fn, reps: int) -> float:
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _configs(model: str):
  """The model of benchmarks/configs/cpu.gin, vocabulary 8,064 (8,000 pieces rounded up)."""
  import gin  # pylint: disable=g-import-not-at-top
  from flanjax.models import decoder, t5  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  gin.parse_config_file(os.path.join(os.path.dirname(__file__), "configs", "cpu.gin"),
                        skip_unknown=True)
  cfg = (t5.T5Config if model == "t5" else decoder.DecoderConfig)()
  gin.clear_config()
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(cfg, vocab_size=8064)


def full_rows(model: str, batch_size: int, inputs: int, targets: int):
  """(config, lengths, examples, flanjax batch): rows of exactly inputs + targets tokens."""
  from benchmarks import examples as ex_lib, stacks  # pylint: disable=g-import-not-at-top
  cfg = _configs(model)
  lengths = {"inputs": inputs, "targets": targets}
  fixed = ex_lib.fixed_examples(batch_size, inputs, targets, 0, cfg.vocab_size)
  rows, _, _ = stacks.pack_rows(fixed, lengths, stacks.packing_kind(cfg))
  return cfg, lengths, fixed, stacks.stack_rows(rows, batch_size)


def flanjax_phases(cfg, batch, reps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import stacks  # pylint: disable=g-import-not-at-top
  from flanjax.training import losses  # pylint: disable=g-import-not-at-top
  fj = stacks.Flanjax(cfg, stacks.AdamW())
  from flanjax.models import kinds  # pylint: disable=g-import-not-at-top
  inputs = kinds.for_module(fj.model).model_inputs

  def loss_fn(params, b):  # the train step's loss: the output layer inside it
    hidden, head = fj.model.apply({"params": params}, **inputs(b), return_hidden=True)
    total, aux = losses.output_cross_entropy(
        hidden, head, b["decoder_target_tokens"], b["decoder_loss_weights"],
        transposed=fj.model.config.tie_word_embeddings)
    return total / aux["weight_sum"]

  fwd = jax.jit(loss_fn)
  grad = jax.jit(jax.value_and_grad(loss_fn))
  with fj._ctx():  # pylint: disable=protected-access
    params = fj.state["params"]
    out = {"forward_s": _median_time(lambda: jax.block_until_ready(fwd(params, batch)), reps),
           "forward_backward_s": _median_time(
               lambda: jax.block_until_ready(grad(params, batch)), reps)}
  out["step_s"] = _median_time(lambda: fj.train([batch]), reps)
  out["optimizer_and_rest_s"] = out["step_s"] - out["forward_backward_s"]
  return out, fj


def flanjax_ops(fj, batch, reps: int, top: int) -> list[dict]:
  """XLA's per-op events of `reps` steps from JAX's profiler trace, summed by name."""
  import jax  # pylint: disable=g-import-not-at-top
  tmp = tempfile.mkdtemp(prefix="jaxprof-")
  fj.train([batch])
  with jax.profiler.trace(tmp, create_perfetto_trace=True):
    fj.train([batch] * reps)
  files = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    return [{"error": f"no perfetto trace under {tmp}"}]
  with gzip.open(files[0], "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  tot = collections.Counter()
  n = collections.Counter()
  for e in events:
    # XLA's ops (fusions, dots, copies); not Python frames or the runtime's own spans.
    if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(_NOT_OPS):
      tot[e["name"]] += e["dur"]
      n[e["name"]] += 1
  return _rows(tot, n, reps, top)


_NOT_OPS = ("$", "ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "ExecuteHelper",
            "PjRt", "TfrtCpu", "Thunk", "XlaModule", "jit_")


def _rows(tot, n, reps, top) -> list[dict]:
  """Top ops by time, then the same time summed by op kind (the name less its .N suffix)."""
  total = sum(tot.values()) or 1
  rows = [{"op": k, "ms_per_step": round(v / 1e3 / reps, 3), "calls_per_step": n[k] / reps,
           "share": round(v / total, 4)} for k, v in tot.most_common(top)]
  kinds = collections.Counter()
  for k, v in tot.items():
    kinds[re.sub(r"\.\d+$", "", k)] += v
  rows += [{"op": f"[kind] {k}", "ms_per_step": round(v / 1e3 / reps, 3),
            "share": round(v / total, 4)} for k, v in kinds.most_common(top)]
  return rows


def torch_phases(cfg, fj, fixed, reps: int):
  from benchmarks import stacks  # pylint: disable=g-import-not-at-top
  th = stacks.Torch(cfg, fj.params(), stacks.AdamW())
  th_batch = th.batch(fixed)
  torch = th.torch
  b = th.to_device(th_batch)

  def fwd():
    with torch.no_grad():
      return float(th.model(**b).loss)

  def fwd_bwd():
    loss = th.model(**b).loss
    loss.backward()
    th.model.zero_grad(set_to_none=True)
    return float(loss.detach())

  out = {"forward_s": _median_time(fwd, reps), "forward_backward_s": _median_time(fwd_bwd, reps),
         "step_s": _median_time(lambda: th.train([th_batch]), reps)}
  out["optimizer_and_rest_s"] = out["step_s"] - out["forward_backward_s"]
  return out, th, th_batch


def torch_ops(th, th_batch, reps: int, top: int) -> list[dict]:
  from torch import profiler  # pylint: disable=g-import-not-at-top
  th.train([th_batch])
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    th.train([th_batch] * reps)
  tot, n = collections.Counter(), collections.Counter()
  for e in prof.key_averages():
    tot[e.key] += e.self_cpu_time_total
    n[e.key] += e.count
  return _rows(tot, n, reps, top)[:top]  # an aten op is its own kind


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_step")
  ap.add_argument("--model", default="decoder", choices=["decoder", "t5"])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--inputs", type=int, default=512)
  ap.add_argument("--targets", type=int, default=128)
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--top", type=int, default=15)
  ap.add_argument("--out")
  a = ap.parse_args(argv)
  from benchmarks import common, stacks  # pylint: disable=g-import-not-at-top
  threads = stacks.torch_threads()
  load_before = common.load()
  cfg, lengths, fixed, batch = full_rows(a.model, a.batch, a.inputs, a.targets)
  fj_phases, fj = flanjax_phases(cfg, batch, a.reps)
  th_phases, th, th_batch = torch_phases(cfg, fj, fixed, a.reps)
  res = {"command": "python -m benchmarks.profile_step " + " ".join(argv or sys.argv[1:]),
         "commit": common.commit(), "machine": common.machine(threads), "model": a.model,
         "batch": a.batch, "lengths": lengths, "torch_threads": threads,
         "load_before": load_before,
         "flanjax": {"phases": fj_phases, "ops": flanjax_ops(fj, batch, a.reps, a.top)},
         "torch": {"phases": th_phases, "ops": torch_ops(th, th_batch, a.reps, a.top)},
         "load_after": common.load()}
  res["quiet"] = common.quiet_start(load_before)  # after: our own threads are in the load
  for side in ("flanjax", "torch"):
    print(f"== {side}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in
                                       res[side]["phases"].items()))
    for o in res[side]["ops"]:
      print(f"  {o.get('ms_per_step', 0):9.2f} ms {100 * o.get('share', 0):5.1f}%  "
            f"x{o.get('calls_per_step', 0):<6g} {o.get('op', o.get('error'))[:90]}")
  print(f"load average {load_before} before, {res['load_after']} after"
        + ("" if res["quiet"] else "  (NOT quiet: loaded figures)"))
  common.write_json(a.out, res)
  return 0


if __name__ == "__main__":
  sys.exit(main())
