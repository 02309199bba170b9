"""The default job's command against a PyTorch loop of the same shape: the tokens/s users see.

    python -m benchmarks.command_bench --out benchmarks/results/command_cpu.json

flanjax: the real command, `python -m flanjax.train --gin_file=flan.gin`, run as a process in
a temporary model folder for --flanjax_steps steps (the evaluation at the end switched off;
nothing else about the job changes). Its figure is the trainer's own: the console line
printed every train.log_every_secs (`... steps/s  N tok/s (M real)`), late in the run (the
intervals ending after --skip_steps, the first interval with the compile and the final
partial interval left out), as the median over those intervals with min and max. The data
wait comes from the run's summary.json (`packing.data_wait_seconds`, after the first batch).

PyTorch: transformers' T5ForConditionalGeneration with the run's own model (run_info.json:
d_model, layers, heads, d_ff, gated-GELU, untied output, the vocabulary rounded as flanjax
rounds it; dropout from the gin), transformers' Adafactor with the job's settings (T5's:
factored, no momentum, update clipping at 1, decay 0.8, scaled by parameter RMS) under the
job's learning-rate schedule, the job's z-loss, in eager mode on torch threads = cores.
Batches of the job's padded shape (batch_size rows x inputs + targets tokens, random ids,
every position attended and a label). Its figure: the median of --windows timed windows of
--steps_per_window steps after --warmup steps (common.Windows), with min and max.

tokens/s on both sides counts padded positions (batch x (inputs + targets) a step); the
ratio is flanjax's over PyTorch's. flanjax's packed rows also carry a real-token rate
(non-padding positions), recorded beside it. Each side records the load average before and
after and the share of the CPU other processes took meanwhile; `quiet` is false when the
load at start or either share says the machine was busy (common.QUIET_LOAD / QUIET_OTHERS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import common

# The console line of training/metrics.Progress.
_LINE = re.compile(r"^step\s+(\d+)/(\d+)\s+loss \S+\s+lr \S+\s+([\d.]+) steps/s\s+([\d,]+) tok/s"
                   r" \(([\d,]+) real\)")
SHARED_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir,
                           "shared", "data")
_SHAPE = re.compile(r"^training: (\d+) steps of (\d+) rows x \((\d+) \+ (\d+)\) tokens")


def parse_progress(text: str) -> tuple[list[dict], dict | None]:
  """The console's progress lines [{step, steps_per_s, tokens_per_s, real_tokens_per_s}]
  and the run's shape from its 'training:' line (None if absent)."""
  lines, shape = [], None
  for line in text.splitlines():
    m = _SHAPE.match(line)
    if m:
      shape = {"num_steps": int(m[1]), "batch_size": int(m[2]),
               "lengths": {"inputs": int(m[3]), "targets": int(m[4])}}
    m = _LINE.match(line)
    if m:
      lines.append({"step": int(m[1]), "steps_per_s": float(m[3]),
                    "tokens_per_s": float(m[4].replace(",", "")),
                    "real_tokens_per_s": float(m[5].replace(",", ""))})
  return lines, shape


def late_intervals(lines: list[dict], num_steps: int, skip_steps: int,
                   log_every_secs: float) -> list[dict]:
  """The intervals after warm-up: not the first (it holds the compile and the first
  batch), none ending at or before skip_steps, and not the final one when lines come
  every few seconds (the run's end forces it after a part of an interval)."""
  out = [x for x in lines[1:] if x["step"] > skip_steps]
  if log_every_secs > 0 and out and out[-1]["step"] == num_steps:
    out = out[:-1]
  return out


def _gin_job(gin_args: list[str]) -> dict:
  """What the job's gin binds for the shape and the optimizer (parsed here as the
  command parses it)."""
  import flanjax.train  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from flanjax import config as flan_config  # pylint: disable=g-import-not-at-top
  flan_config.parse_gin(flan_config.parse_args(gin_args), finalize=False)
  bound = flan_config.bound_value

  def value(selector, default):
    v = bound(selector)
    return default if v is None else v

  from flanjax.run_folder import TRAINING_FIELDS  # pylint: disable=g-import-not-at-top
  return {"batch_size": int(value("train.batch_size", 32)),
          "lengths": dict(value("train.task_feature_lengths", {"inputs": 256, "targets": 64})),
          "z_loss": float(value("train.z_loss", 1e-4)),
          "optimizer": str(value("optimizer.name", "adafactor")),
          "schedule": {"name": str(value("schedule.name", "rsqrt")),
                       "peak": float(value("schedule.peak", 0.01)),
                       "warmup_steps": int(value("schedule.warmup_steps", 100))},
          "dropout_rate": float(value("T5Config.dropout_rate", 0.0)),
          "log_every_secs": float(value("train.log_every_secs", 5.0)),
          # The rest of the train step's settings, for the step alone (flanjax_step).
          "step": {"microbatches": int(value("train.microbatches", 1)),
                   "label_smoothing": float(value("train.label_smoothing", 0.0)),
                   "loss_normalizing_factor": value("train.loss_normalizing_factor", None),
                   "output_chunk": int(value("train.output_chunk", 128))},
          # The model's training fields the gin binds (run_info.json's record leaves them
          # out): the command applies them, so the step alone does too.
          "model_training": {f: v for f in TRAINING_FIELDS
                             if (v := bound(f"T5Config.{f}")) is not None}}


# ------------------------------------------------------------------ flanjax

def run_command(gin_args: list[str], steps: int, skip_steps: int, log_every_secs: float,
                timeout: float, log) -> tuple[dict, object]:
  """Runs the training command in a temporary folder (removed after); (its figure, the
  model config its run_info.json records)."""
  run_dir = tempfile.mkdtemp(prefix="command_bench_")
  model_dir = os.path.join(run_dir, "run")
  argv = [*gin_args, f"--gin.train.num_steps={steps}", f"--gin.train.model_dir={model_dir}",
          "--gin.train.eval_at_end=False"]
  cmd = [sys.executable, "-m", "flanjax.train", *argv]
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  if os.path.isdir(SHARED_DATA):  # the real data beside the repo, unless one is set
    env.setdefault("FLANJAX_DATA_DIR", SHARED_DATA)
  log(f"flanjax: {' '.join(['python', '-m', 'flanjax.train', *argv])}")
  load_before = common.load()
  a = common._cpu_ticks()  # pylint: disable=protected-access
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired as e:
    raise SystemExit(f"command_bench: the training command ran past {timeout:.0f} s; lower "
                     "--flanjax_steps or raise --timeout") from e
  secs = time.perf_counter() - t0
  b = common._cpu_ticks()  # pylint: disable=protected-access
  if proc.returncode != 0:
    raise SystemExit(f"command_bench: the training command failed (exit {proc.returncode}): "
                     + (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1])
  lines, shape = parse_progress(proc.stdout)
  late = late_intervals(lines, steps, skip_steps, log_every_secs)
  if len(late) < 5:
    raise SystemExit(f"command_bench: {len(late)} console intervals after step {skip_steps} "
                     f"of {len(lines)} printed; fewer than 5: raise --flanjax_steps")
  with open(os.path.join(model_dir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  from flanjax.models import loading  # pylint: disable=g-import-not-at-top
  cfg = loading.config_from_file(os.path.join(model_dir, "run_info.json"))  # the run's model
  shutil.rmtree(run_dir, ignore_errors=True)  # its checkpoints are of no further use
  packing = summary["packing"]
  tok = common.spread([x["tokens_per_s"] for x in late])
  per_step = shape["batch_size"] * sum(shape["lengths"].values())
  # steps/s from the console's tokens/s (printed to 2 decimals only): tokens / step is exact.
  sps = common.spread([x["tokens_per_s"] / per_step for x in late])
  wait_ms = packing["data_wait_ms_per_batch"]
  fig = {
      "command": ["python", "-m", "flanjax.train", *argv],
      "tokens_per_s": tok["median"], "tokens_per_s_min": tok["min"],
      "tokens_per_s_max": tok["max"],
      "real_tokens_per_s": common.spread([x["real_tokens_per_s"] for x in late])["median"],
      "steps_per_s": sps["median"], "steps_per_s_min": sps["min"],
      "steps_per_s_max": sps["max"],
      "windows": len(late), "window_rates": [x["tokens_per_s"] for x in late],
      "window_end_steps": [x["step"] for x in late], "log_every_secs": log_every_secs,
      "console_lines": len(lines), "steps": summary["step"], "skip_steps": skip_steps,
      "non_padding_share": packing["non_padding_share"],
      "train_seconds": summary["train_seconds"], "command_seconds": round(secs, 1),
      "data_wait_seconds": packing["data_wait_seconds"],
      "data_wait_ms_per_batch": wait_ms,
      # The loader's wait per batch against a late step's time.
      "data_wait_share_of_step": round(wait_ms / 1e3 * sps["median"], 4),
      "data_wait_share_of_train_seconds": round(
          packing["data_wait_seconds"] / max(summary["train_seconds"], 1e-9), 4),
      "shape": shape, "load_before": load_before, "load_after": common.load(),
  }
  if a and b and b[1] > a[1]:
    fig["others_cpu_share"] = round(common._others_share(a, b), 3)  # pylint: disable=protected-access
    fig["steal_cpu_share"] = round(common._steal_share(a, b), 3)  # pylint: disable=protected-access
  fig["quiet"] = common.quiet(fig)
  return fig, cfg


# ------------------------------------------------------------------ PyTorch

def _rsqrt_factor(sched: dict):
  """flanjax's schedule (training/optimizers.schedule) as a factor of the peak, per step."""
  warm = max(int(sched["warmup_steps"]), 0)
  if sched["name"] == "constant":
    return lambda s: 1.0 if warm == 0 else min(1.0, (s + 1.0) / warm)
  if sched["name"] != "rsqrt":
    raise SystemExit(f"command_bench: schedule {sched['name']!r} is not mirrored here; "
                     "the default job's is rsqrt")
  return lambda s: ((1.0 if warm == 0 else min(1.0, (s + 1.0) / warm))
                    * math.sqrt(max(warm, 1) / max(s + 1.0, max(warm, 1))))


def torch_loop(cfg, job: dict, warmup: int, windows: int, steps_per_window: int, seed: int,
               log) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.optimization import Adafactor  # pylint: disable=g-import-not-at-top
  from benchmarks import stacks  # pylint: disable=g-import-not-at-top
  from flanjax.models import hf  # pylint: disable=g-import-not-at-top
  threads = stacks.torch_threads()
  torch.manual_seed(seed)
  transformers.logging.set_verbosity_error()
  hf_cfg = dict(hf.t5_config_to_hf(cfg), dropout_rate=job["dropout_rate"])
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_cfg))
  if not cfg.tie_word_embeddings and model.lm_head.weight is model.shared.weight:
    # transformers 5 ties T5's output to the embedding whatever the config says; the
    # default job's is untied (T5 v1.1), so the output matrix gets its own parameter.
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
  model.train()
  num_params = sum(p.numel() for p in model.parameters())
  if job["optimizer"] != "adafactor":
    raise SystemExit(f"command_bench: optimizer {job['optimizer']!r} is not mirrored here; "
                     "the default job's is adafactor")
  # T5's Adafactor as training/optimizers.optimizer() sets optax's: no momentum, update
  # clipping at 1, second-moment decay 0.8 (transformers writes it -0.8), scaled by the
  # parameter's RMS; the learning rate is the job's schedule, not Adafactor's own.
  opt = Adafactor(model.parameters(), lr=job["schedule"]["peak"], eps=(1e-30, 1e-3),
                  clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=0.0,
                  scale_parameter=True, relative_step=False, warmup_init=False)
  sched = torch.optim.lr_scheduler.LambdaLR(opt, _rsqrt_factor(job["schedule"]))
  bsz, li, lt = job["batch_size"], job["lengths"]["inputs"], job["lengths"]["targets"]
  rng = np.random.default_rng(seed)
  hi = cfg.vocab_size
  batches = [{"input_ids": torch.from_numpy(rng.integers(3, hi, (bsz, li))),
              "attention_mask": torch.ones(bsz, li, dtype=torch.long),
              "labels": torch.from_numpy(rng.integers(3, hi, (bsz, lt)))} for _ in range(4)]
  z_loss = job["z_loss"]
  step_no = [0]

  def steps(n):
    loss = None
    for _ in range(n):
      out = model(**batches[step_no[0] % len(batches)])
      loss = out.loss
      if z_loss:  # the job's z-loss on the output's log-normaliser (mean over positions)
        loss = loss + z_loss * torch.logsumexp(out.logits, -1).pow(2).mean()
      loss.backward()
      opt.step()
      sched.step()
      opt.zero_grad(set_to_none=True)
      step_no[0] += 1
    return float(loss.detach())

  log(f"torch: T5ForConditionalGeneration, {num_params / 1e6:.3f}M parameters, {threads} "
      f"threads; {warmup} warm-up steps, {windows} windows of {steps_per_window}")
  return {"model": "transformers.T5ForConditionalGeneration", "num_params": num_params,
          "attn_implementation": getattr(model.config, "_attn_implementation", None),
          "optimizer": "transformers.optimization.Adafactor (scale_parameter, relative_step "
                       "off, beta1 None, decay_rate -0.8, clip_threshold 1) + LambdaLR "
                       f"({job['schedule']['name']})",
          "mode": "eager", "device": "cpu", "dtype": "float32", "threads": threads,
          **_timed(steps, bsz * (li + lt), warmup, windows, steps_per_window)}


def _timed(steps, per_step: int, warmup: int, windows: int, steps_per_window: int) -> dict:
  """A loop's figure, as the step alone and PyTorch's are taken: steps(warmup), then
  `windows` windows of steps(steps_per_window); padded tokens/s and steps/s
  (median, min, max), each window's rate, the load and the others' CPU share."""
  steps(warmup)
  w = common.Windows()
  for _ in range(windows):
    w.time(lambda: steps(steps_per_window), per_step * steps_per_window)
  fig = w.summary()
  return {"tokens_per_s": fig["median"], "tokens_per_s_min": fig["min"],
          "tokens_per_s_max": fig["max"],
          "steps_per_s": round(fig["median"] / per_step, 4),
          "steps_per_s_min": round(fig["min"] / per_step, 4),
          "steps_per_s_max": round(fig["max"] / per_step, 4),
          "windows": fig["windows"], "window_rates": fig["window_rates"],
          "steps_per_window": steps_per_window, "warmup_steps": warmup,
          "load_before": fig["load_before"], "load_after": fig["load_after"],
          "others_cpu_share": fig.get("others_cpu_share"), "quiet": fig["quiet"]}


# ------------------------------------------------------------------ the step alone

def flanjax_step(cfg, job: dict, warmup: int, windows: int, steps_per_window: int, seed: int,
                 log) -> dict:
  """The command's own train step (the trainer's, with the job's optimizer, schedule and
  z-loss) on rows of the job's shape, every position real as in PyTorch's batches, timed
  as the PyTorch loop is: what the command would reach if nothing but the step ran."""
  from benchmarks import examples as ex_lib, stacks  # pylint: disable=g-import-not-at-top
  from flanjax.training import optimizers  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(cfg, **job.get("model_training", {}))
  lr_fn = optimizers.schedule(**job["schedule"])
  tx, _ = optimizers.optimizer(name=job["optimizer"], learning_rate=lr_fn)
  fj = stacks.Flanjax(cfg, None, seed=seed, tx=tx, lr_fn=lr_fn, z_loss=job["z_loss"],
                      dropout=cfg.dropout_rate > 0, **job.get("step", {}))
  bsz, li, lt = job["batch_size"], job["lengths"]["inputs"], job["lengths"]["targets"]
  rows, _, _ = stacks.pack_rows(ex_lib.fixed_examples(bsz * 4, li, lt, seed, cfg.vocab_size),
                                job["lengths"], stacks.packing_kind(cfg))
  batches = [stacks.stack_rows(rows[i * bsz:(i + 1) * bsz], bsz) for i in range(4)]
  log(f"flanjax step alone: {fj.num_params / 1e6:.3f}M parameters; {warmup} warm-up steps, "
      f"{windows} windows of {steps_per_window}")
  step_no = [0]

  def steps(n):
    bs = [batches[(step_no[0] + i) % len(batches)] for i in range(n)]
    step_no[0] += n
    return fj.train(bs)

  from flanjax.run_folder import TRAINING_FIELDS  # pylint: disable=g-import-not-at-top
  return {"what": "the trainer's train step alone, in this process, on full rows",
          "model_training": {f: getattr(cfg, f) for f in TRAINING_FIELDS},
          "step_settings": {"z_loss": job["z_loss"], **job.get("step", {})},
          "num_params": fj.num_params, "device": fj.device, "dtype": fj.dtype,
          # At least one warm-up call: the first compiles.
          **_timed(steps, bsz * (li + lt), max(warmup, 1), windows, steps_per_window)}


# ------------------------------------------------------------------ report

def table(result: dict) -> str:
  fj, th = result["flanjax"], result["torch"]

  def row(name, f):
    return (f"| {name} | {f['tokens_per_s']:,.0f} [{f['tokens_per_s_min']:,.0f}-"
            f"{f['tokens_per_s_max']:,.0f}] | {f['steps_per_s']:.3f} | {f['windows']} | "
            f"{f['load_before'][0] if f['load_before'] else '?'} -> "
            f"{f['load_after'][0] if f['load_after'] else '?'} | "
            f"{f.get('others_cpu_share', '?')} |")

  lines = ["| default job, padded tokens/s | median [min-max] | steps/s | windows | "
           "load (1 min) | others' CPU |", "|---|---|---|---|---|---|",
           row("flanjax command (console)", fj)]
  if result.get("flanjax_step"):
    lines.append(row("flanjax step alone (full rows, in-process)", result["flanjax_step"]))
  lines += [row("PyTorch loop (eager)", th), "",
           f"flanjax / PyTorch: {result['ratio']:.2f}x; flanjax real tokens/s "
           f"{fj['real_tokens_per_s']:,.0f} (non-padding share {fj['non_padding_share']:.3f}); "
           f"data wait {fj['data_wait_ms_per_batch']:.1f} ms/batch "
           f"({100 * fj['data_wait_share_of_step']:.1f}% of a late step)"]
  if result.get("flanjax_step"):
    lines.append(f"flanjax step alone / PyTorch: {result['step_ratio']:.2f}x; the command "
                 f"reaches {100 * result['command_of_step']:.0f}% of its step alone (the rest: "
                 "data pipeline, host work and the steps' warm-up sharing the cores)")
  if not result["quiet"]:
    lines.append("WARNING: the machine was not quiet; these figures are not for the README")
  return "\n".join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--gin_file", default="flan.gin", help="the job's gin file")
  ap.add_argument("--gin", action="append", default=[], metavar="SELECTOR=VALUE",
                  help="extra binding for the job (both sides), e.g. train.batch_size=8")
  ap.add_argument("--flanjax_steps", type=int, default=120,
                  help="steps the command trains (late intervals need several log lines)")
  ap.add_argument("--skip_steps", type=int, default=10,
                  help="console intervals ending at or before this step are warm-up")
  ap.add_argument("--warmup", type=int, default=3, help="PyTorch warm-up steps")
  ap.add_argument("--windows", type=int, default=5, help="PyTorch timed windows")
  ap.add_argument("--steps_per_window", type=int, default=4)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--timeout", type=float, default=900, help="seconds for the command")
  ap.add_argument("--out", default=None, help="JSON file for the results")
  ap.add_argument("--quiet", action="store_true", help="no progress lines")
  args = ap.parse_args(argv)
  log = common.Log(args.quiet)
  load_start = common.load()
  gin_args = [f"--gin_file={args.gin_file}", *(f"--gin.{b}" for b in args.gin)]
  job = _gin_job(gin_args)
  fj, cfg = run_command(gin_args, args.flanjax_steps, args.skip_steps,
                             job["log_every_secs"], args.timeout, log)
  if fj["shape"] != {"num_steps": args.flanjax_steps, "batch_size": job["batch_size"],
                     "lengths": job["lengths"]}:
    raise SystemExit(f"command_bench: the command trained {fj['shape']}, the gin says "
                     f"{job['batch_size']} rows x {job['lengths']}")
  log(f"flanjax: {fj['tokens_per_s']:,.0f} tok/s [{fj['tokens_per_s_min']:,.0f}-"
      f"{fj['tokens_per_s_max']:,.0f}] over {fj['windows']} console intervals")
  from flanjax.models import loading  # pylint: disable=g-import-not-at-top
  step = flanjax_step(cfg, job, args.warmup, args.windows, args.steps_per_window, args.seed,
                      log)
  log(f"flanjax step alone: {step['tokens_per_s']:,.0f} tok/s [{step['tokens_per_s_min']:,.0f}-"
      f"{step['tokens_per_s_max']:,.0f}]")
  th = torch_loop(cfg, job, args.warmup, args.windows, args.steps_per_window, args.seed, log)
  log(f"torch: {th['tokens_per_s']:,.0f} tok/s [{th['tokens_per_s_min']:,.0f}-"
      f"{th['tokens_per_s_max']:,.0f}]")
  result = {
      "what": "the default job's command (console tokens/s, late intervals) against a "
              "PyTorch loop of the same model, optimizer and padded batch shape",
      "command": "python -m benchmarks.command_bench " + " ".join(
          argv if argv is not None else sys.argv[1:]),
      "commit": common.commit(), "machine": common.machine(th["threads"]),
      "load_start": load_start, "load_end": common.load(),
      "job": {**job, "model": loading.config_to_json(cfg),
              "tokens_per_step": job["batch_size"] * sum(job["lengths"].values())},
      "flanjax": fj, "flanjax_step": step, "torch": th,
      "ratio": round(fj["tokens_per_s"] / th["tokens_per_s"], 3),
      "step_ratio": round(step["tokens_per_s"] / th["tokens_per_s"], 3),
      "command_of_step": round(fj["tokens_per_s"] / step["tokens_per_s"], 3),
      "ratio_min_max": [round(fj["tokens_per_s_min"] / th["tokens_per_s_max"], 3),
                        round(fj["tokens_per_s_max"] / th["tokens_per_s_min"], 3)],
  }
  result["quiet"] = bool(common.quiet_start(load_start) and fj["quiet"] and step["quiet"]
                         and th["quiet"])
  common.write_json(args.out, result)
  print(table(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
