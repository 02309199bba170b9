"""Prints a task's examples as the model will see them.

  python tools/show_task.py flan_cot_gsm8k -n 3
  python tools/show_task.py gsm8k --split test --format few_shot_cot
  python tools/show_task.py flan_cot_gsm8k --mode no_template
  python tools/show_task.py --list

Renders with the task's own templates and formats (or the --format given),
then shows the token counts under the vocabulary (the built-in one unless
--spm names a SentencePiece model).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flanjax.config import run_plain_main  # noqa: E402
from flanjax.errors import UserError  # noqa: E402


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="show_task", description=__doc__.split("\n")[0])
  ap.add_argument("name", nargs="?", help="a registered task (see --list)")
  ap.add_argument("-n", type=int, default=3, help="how many examples (default 3)")
  ap.add_argument("--split", default="train")
  ap.add_argument("--format", default=None, help="override the format, e.g. few_shot_cot")
  ap.add_argument("--mode", default=None,
                  help="template mode: instructions, no_template or dataset_name (default: gin's)")
  ap.add_argument("--spm", default=None, help="a SentencePiece .model for token counts")
  ap.add_argument("--input_length", type=int, default=1024,
                  help="input budget for few-shot prompts (default 1024)")
  ap.add_argument("--list", action="store_true", help="list the registered tasks and mixtures")
  ap.add_argument("--gin_file", action="append", default=[],
                  help="gin files that define user tasks (user_data.tasks)")
  args = ap.parse_args(argv)

  import gin  # pylint: disable=g-import-not-at-top
  from flanjax import config  # pylint: disable=g-import-not-at-top
  from flanjax.data import registry, tasks, templates, vocab  # pylint: disable=g-import-not-at-top
  if args.gin_file:
    config.parse_gin(config.parse_args([f"--gin_file={f}" for f in args.gin_file]))
  if args.list:
    registry.list_tasks()
    for name in registry.list_tasks():
      defn = tasks.DEFS[name].defn if name in tasks.DEFS else None
      about = defn.description if defn else "built-in generated task"
      print(f"{name:48s} {about}")
    print("\nmixtures: " + ", ".join(registry.list_mixtures()))
    return 0
  if not args.name:
    raise UserError("give a task name (see --list)")
  if args.mode:
    templates.check_mode(args.mode, "--mode")
    gin.bind_parameter("template_mode.mode", args.mode)
    gin.bind_parameter("template_mode.eval_mode", args.mode)
  if args.format and args.format not in templates.FORMATS:
    raise UserError(f"unknown --format {args.format!r}; choose one of {templates.FORMATS}")
  v = vocab.sentencepiece_vocabulary(args.spm) if args.spm else vocab.builtin_vocabulary(1000)
  registry.register_all(v, input_length=args.input_length)
  if args.name not in tasks.DEFS:
    if args.name.startswith(registry.BUILTIN_PREFIX):
      from flanjax.data.collections import builtin  # pylint: disable=g-import-not-at-top
      if args.split not in builtin.SPLIT_SIZES:
        raise UserError(f"{args.name} has no split {args.split!r}; its splits are "
                        f"{', '.join(builtin.SPLIT_SIZES)}")
      recs = builtin.rendered_examples(args.name[len(registry.BUILTIN_PREFIX):], args.split,
                                       args.mode)[:args.n]
    else:
      registry.get_task_or_mixture(args.name)  # the unknown-name error, with the known names
      raise UserError(f"{args.name} is a mixture; show one of its tasks")
  else:
    defn = tasks.DEFS[args.name].defn
    fits = lambda text: len(v.encode(text)) + 1 <= args.input_length  # noqa: E731
    recs = tasks.render_split(defn, args.split, fits, limit=args.n, fmt=args.format,
                              input_budget=args.input_length)
  bar = "=" * 78
  for i, r in enumerate(recs):
    n_in, n_out = len(v.encode(r["inputs"])) + 1, len(v.encode(r["targets"])) + 1
    print(f"{bar}\n{args.name} / {args.split} #{i}  format={r['format']}  "
          f"template={r['template']}  tokens: inputs {n_in}, targets {n_out}\n{bar}")
    print("--- inputs ---")
    print(r["inputs"])
    print("--- targets ---")
    print(r["targets"])
    print()
  return 0


if __name__ == "__main__":
  run_plain_main(main, "show_task")
