"""How much each stack's train step moves with the host's memory bandwidth.

    python -m benchmarks.bandwidth_step --model=t5 --out=benchmarks/results/bw_t5.json

On a virtual machine other tenants share the host's memory bandwidth, and neither
/proc/stat nor the load average sees them. This alternates, in one process, a chunk of
flanjax steps and a chunk of PyTorch steps (with --probe, the copy probe
copy_bandwidth after each), `--chunks` times, at the benchmark's size (benchmarks/configs/cpu.gin, rows of
exactly inputs + targets tokens); then, per stack, the median of each chunk's first step
(the first after the other stack's chunk) against that of the chunks' other steps and,
with --probe, the correlation of its step time with the probe's reading after it and its
median step time in the chunks whose reading was at or above the median reading against
those below.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


_COPY = []  # the probe's two buffers, made once


def copy_bandwidth(mib: int = 64, reps: int = 3) -> float:
  """GB/s (read + write) of numpy copying `mib` MiB, the best of `reps`: the memory
  bandwidth this machine had just then (other virtual machines on the host share it unseen).
  Not run between the benchmark's timed windows: with it after each window, flanjax's next
  windows ran slower (benchmarks/README.md, Method)."""
  if not _COPY or _COPY[0].nbytes != mib << 20:
    _COPY[:] = [np.ones(mib << 17), np.empty(mib << 17)]
  src, dst = _COPY
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - t0)
  return 2 * src.nbytes / best / 1e9 if best > 0 else float("nan")  # nan: a stopped clock


def _split_by_bandwidth(ms, gbps) -> dict:
  ms, gbps = np.asarray(ms), np.asarray(gbps)
  cut = float(np.median(gbps))
  hi, lo = ms[gbps >= cut], ms[gbps < cut]
  out = {"corr_step_ms_vs_gbps": round(float(np.corrcoef(ms, gbps)[0, 1]), 3),
         "median_gbps": round(cut, 1),
         "step_ms_median": round(float(np.median(ms)), 1),
         "step_ms_min": round(float(ms.min()), 1), "step_ms_max": round(float(ms.max()), 1)}
  if len(hi) and len(lo):
    out["step_ms_at_high_gbps"] = round(float(np.median(hi)), 1)
    out["step_ms_at_low_gbps"] = round(float(np.median(lo)), 1)
  return out


def _first_and_rest(each) -> dict:
  """Medians of each chunk's first step (the first after the other stack's chunk) and of
  the chunks' other steps."""
  return {"first_step_ms": round(float(np.median([c[0] for c in each])), 1),
          "other_steps_ms": round(float(np.median([x for c in each for x in c[1:]])), 1)}


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.bandwidth_step")
  ap.add_argument("--model", default="t5", choices=["decoder", "t5"])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--inputs", type=int, default=512)
  ap.add_argument("--targets", type=int, default=128)
  ap.add_argument("--steps", type=int, default=5, help="steps per chunk")
  ap.add_argument("--chunks", type=int, default=20)
  ap.add_argument("--probe", action="store_true",
                  help="run the copy probe after each chunk (it slowed flanjax's next steps)")
  ap.add_argument("--out")
  a = ap.parse_args(argv)
  from benchmarks import common, profile_step, stacks  # pylint: disable=g-import-not-at-top
  threads = stacks.torch_threads()
  load_before = common.load()
  cfg, lengths, fixed, batch = profile_step.full_rows(a.model, a.batch, a.inputs, a.targets)
  fj = stacks.Flanjax(cfg, stacks.AdamW())
  th = stacks.Torch(cfg, fj.params(), stacks.AdamW())
  th_batch = th.batch(fixed)
  for _ in range(3):
    fj.train([batch])
    th.train([th_batch])
  rows = {"flanjax": ([], [], []), "torch_eager": ([], [], [])}
  runs = {"flanjax": lambda: fj.train([batch]), "torch_eager": lambda: th.train([th_batch])}
  t_start = time.perf_counter()
  for c in range(a.chunks):
    for name, run in runs.items():
      each = []
      for _ in range(a.steps):  # each step timed (both stacks wait for their step's loss)
        t0 = time.perf_counter()
        run()
        each.append((time.perf_counter() - t0) * 1e3)
      gbps = copy_bandwidth() if a.probe else float("nan")
      rows[name][0].append(round(sum(each) / a.steps, 1))
      rows[name][1].append(round(gbps, 1))
      rows[name][2].append([round(x, 1) for x in each])
    print(f"chunk {c + 1}/{a.chunks}: " + "  ".join(
        f"{n} {rows[n][0][-1]:.0f} ms/step at {rows[n][1][-1]:.1f} GB/s" for n in runs),
        file=sys.stderr, flush=True)
  res = {"command": "python -m benchmarks.bandwidth_step " + " ".join(argv or sys.argv[1:]),
         "commit": common.commit(), "machine": common.machine(threads), "model": a.model,
         "batch": a.batch, "lengths": lengths, "steps_per_chunk": a.steps, "chunks": a.chunks,
         "seconds": round(time.perf_counter() - t_start, 1), "load_before": load_before,
         "load_after": common.load()}
  for name, (ms, gbps, each) in rows.items():
    res[name] = {"step_ms": ms, "each_step_ms": each, **_first_and_rest(each)}
    if a.probe:
      res[name].update(gbps_after=gbps, **_split_by_bandwidth(ms, gbps))
    r = res[name]
    probe = (f"; correlation with the probe {r['corr_step_ms_vs_gbps']}, "
             f"{r.get('step_ms_at_high_gbps')} ms at >= {r['median_gbps']} GB/s, "
             f"{r.get('step_ms_at_low_gbps')} ms below") if a.probe else ""
    print(f"{name}: chunks of {min(ms):.0f}-{max(ms):.0f} ms a step; a chunk's first step "
          f"{r['first_step_ms']} ms, the others {r['other_steps_ms']} ms (medians){probe}")
  res["quiet"] = common.quiet_start(load_before)
  common.write_json(a.out, res)
  return 0


if __name__ == "__main__":
  sys.exit(main())
