"""The training command's start with and without its compilation cache.

    python -m benchmarks.startup_bench --out=benchmarks/results/startup.json

Runs the default job (`flan.gin`, a few steps, a short evaluation at the end) as a new
process in alternating rounds: **cold**, with an empty compilation-cache folder (every
program compiled), then **warm**, a fresh run folder over the folder the cold run just
filled (a resumed or repeated run of the same shapes). It times each process from its
start to its first step line and to its end. The vocabulary and the tokenized data are
cached by a run before the rounds, so only compiling differs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import common


def _one(gin_args: list[str], model_dir: str, cache_dir: str, timeout: float) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["FLANJAX_COMPILATION_CACHE"] = cache_dir
  cmd = [sys.executable, "-u", "-m", "flanjax.train", *gin_args,
         f"--gin.train.model_dir={model_dir}"]
  start = time.perf_counter()
  first_step = None
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                          env=env)
  try:
    for line in proc.stdout:
      if first_step is None and line.startswith("step "):
        first_step = time.perf_counter() - start
    code = proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
  total = time.perf_counter() - start
  if code != 0 or first_step is None:
    raise SystemExit(f"startup_bench: {' '.join(cmd)} exited {code} "
                     f"({'no step line' if first_step is None else 'failed'})")
  return {"first_step_s": round(first_step, 2), "total_s": round(total, 2)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--gin_file", default="flan.gin")
  ap.add_argument("--gin", action="append", default=[], metavar="SELECTOR=VALUE",
                  help="extra binding for the job, e.g. train.batch_size=8")
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--eval_examples", type=int, default=8,
                  help="examples per task split in the evaluation at the end (its decode "
                       "programs are compiled, or read from the cache, like the step's)")
  ap.add_argument("--rounds", type=int, default=3, help="cold + warm pairs")
  ap.add_argument("--timeout", type=float, default=900)
  ap.add_argument("--out", default=None, help="JSON file for the results")
  args = ap.parse_args(argv)
  gin_args = [f"--gin_file={args.gin_file}", f"--gin.train.num_steps={args.steps}",
              f"--gin.train.eval_max_examples={args.eval_examples}",
              *(f"--gin.{b}" for b in args.gin)]
  load_start = common.load()
  runs = {"cold": [], "warm": []}
  with tempfile.TemporaryDirectory(prefix="startup_bench_") as work:
    # Vocabulary and tokenized data into the user's data cache; programs into a folder of
    # its own, not read again.
    _one(gin_args, os.path.join(work, "prime"), os.path.join(work, "xla_prime"), args.timeout)
    for r in range(args.rounds):
      cache = os.path.join(work, f"xla{r}")
      for kind in ("cold", "warm"):
        res = _one(gin_args, os.path.join(work, f"run{r}_{kind}"), cache, args.timeout)
        runs[kind].append(res)
        print(f"round {r + 1}/{args.rounds} {kind}: first step at {res['first_step_s']:.1f} s, "
              f"done at {res['total_s']:.1f} s", flush=True)
      shutil.rmtree(cache, ignore_errors=True)
  summary = {kind: {field: {**common.spread([r[field] for r in rs], 2),
                            "values": [r[field] for r in rs]}
                     for field in ("first_step_s", "total_s")}
             for kind, rs in runs.items()}
  result = {
      "what": "the training command's start: process start to its first step line and to "
              "its end, with an empty compilation cache (cold) and with the one the cold run "
              "just wrote (warm), alternating rounds; vocabulary and data cached before",
      "command": "python -m benchmarks.startup_bench " + " ".join(
          argv if argv is not None else sys.argv[1:]),
      "job": gin_args, "commit": common.commit(), "cpu": common.cpu_model(),
      "cores": common.usable_cores(), "load_start": load_start, "load_end": common.load(),
      "runs": runs, "summary": summary,
  }
  result["quiet"] = bool(common.quiet_start(load_start))
  common.write_json(args.out, result)
  for kind in ("cold", "warm"):
    s = summary[kind]
    print(f"{kind}: first step {s['first_step_s']['median']:.1f} s "
          f"[{s['first_step_s']['min']:.1f}-{s['first_step_s']['max']:.1f}], "
          f"end {s['total_s']['median']:.1f} s [{s['total_s']['min']:.1f}-"
          f"{s['total_s']['max']:.1f}]")
  print(f"load average {load_start} at start, {result['load_end']} at end"
        + ("" if result["quiet"] else "; WARNING: the machine was not quiet"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
