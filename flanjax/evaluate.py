"""python -m flanjax.evaluate --checkpoint PATH --gin_file=eval/bbh.gin [--gin.X=Y ...]

Runs evaluation tasks on a checkpoint and writes a table (console and
markdown), a JSON file of per-task scores and TensorBoard scalars.

  --checkpoint PATH   a training run (runs/<mixture>/), a converted orbax
                      directory or a Hugging Face directory (or gin evaluate.checkpoint)
  --step N|best       a training run's step, or its best checkpoint (default: the latest)
  --adapter PATH      LoRA adapters over the checkpoint: a LoRA run or a PEFT adapter folder
  --tasks a,b,...     tasks, mixtures, 'task:split' or patterns ('bbh_*'); replaces
                      evaluate.tasks
  --max_examples N    per task and split, for quick runs
  --out DIR           where to write (default <checkpoint>/eval/): <name>.json, .md,
                      .html (a review page of every example) and tensorboard/
  --prompt_format F   wrap prompts in F (default: the run's recorded format, else plain)
  --list_tasks        print the registered task names and exit

Packaged suites: eval/bbh.gin (BIG-Bench Hard, 27 tasks, 3-shot CoT and 3-shot
direct), eval/gsm8k.gin (GSM8K test, CoT, scored on the final number),
eval/bbh_gsm8k.gin (both). Decoding is DecodeConfig's (--gin.DecodeConfig.method=beam).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# Quiet TensorFlow (seqio's input pipeline) before it loads.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from flanjax import config as flan_config  # noqa: E402
from flanjax.data import registry  # noqa: E402
from flanjax.errors import UserError  # noqa: E402
# The API: evaluate (gin-configurable), evaluate_suite (for the training loop), the tables.
from flanjax.evaluation.harness import TaskResult, evaluate_suite, format_results, scalars  # noqa: E402,F401
from flanjax.evaluation.run import LIST_HINT, evaluate, resolve_tasks  # noqa: E402,F401
from flanjax.run_folder import parse_step  # noqa: E402

class _Parser(argparse.ArgumentParser):
  """argparse whose errors are UserErrors: one line, exit 2, like gin's."""

  def error(self, message):
    raise UserError(message)


def _parser() -> argparse.ArgumentParser:
  ap = _Parser(prog="python -m flanjax.evaluate", description=__doc__.split("\n")[0])
  ap.add_argument("--checkpoint", default=None, help="training run, orbax or HF directory")
  ap.add_argument("--step", type=parse_step, default=None,
                  help="a training run's step, or 'best' (its best checkpoint)")
  ap.add_argument("--adapter", default=None, help="LoRA adapters over --checkpoint: a LoRA "
                  "training run (at --step) or a PEFT adapter folder")
  ap.add_argument("--tasks", default=None, help="comma-separated tasks (replaces evaluate.tasks)")
  ap.add_argument("--max_examples", type=flan_config.whole_number(), default=None,
                  help="per task and split")
  ap.add_argument("--out", default=None, help="output directory (default <checkpoint>/eval)")
  ap.add_argument("--list_tasks", action="store_true", help="print the task names and exit")
  ap.add_argument("--prompt_format", default=None, help="wrap prompts in this format (default: "
                  "the one a training run recorded, else plain)")
  return ap


def main(argv=None):
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)
  argv = sys.argv[1:] if argv is None else list(argv)
  prog = "flanjax.evaluate"
  # Our flags here, gin's (--gin_file, --gin.X=Y, ...) to run_main; both fail in one line.
  args, rest = flan_config.guarded(
      lambda: _parser().parse_known_args(argv), prog)

  def run(_):
    if args.list_tasks:
      print("\n".join(registry.list_tasks()))
      return None
    overrides = {k: v for k, v in (("checkpoint", args.checkpoint), ("step", args.step),
                                   ("max_examples", args.max_examples), ("out_dir", args.out),
                                   ("prompt_format", args.prompt_format),
                                   ("adapter", args.adapter))
                 if v is not None}
    if args.tasks is not None:
      overrides["tasks"] = [t for t in args.tasks.split(",") if t.strip()]
    return evaluate(**overrides)

  return flan_config.run_main(run, rest, require_gin_file=False)


if __name__ == "__main__":
  flan_config.as_command(main)
