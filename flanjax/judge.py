"""A checkpoint as judge of open-ended answers: pairwise preference and MT-Bench grades.

  python -m flanjax.judge pairwise --judge JUDGE --a A.jsonl --b B.jsonl --out DIR
  python -m flanjax.judge pairwise --judge JUDGE --a A.jsonl --b alpaca_eval --out DIR
  python -m flanjax.judge grade --judge JUDGE --answers mt_bench_answers.jsonl --out DIR

--judge: a training run, a converted orbax checkpoint or a Hugging Face folder. Its
prompt format is the one a training run recorded (prompt_format.json), else plain;
--prompt_format overrides. --mode generate (the judge writes "Verdict: A" / "Score: 7",
read from its reply) or loglik (the most likely verdict line, by log-likelihood).

Answers come from `python -m flanjax.infer --checkpoint M --input alpaca_eval --output
A.jsonl` (or mt_bench, lima, vicuna, koala, sinstruct, wizardlm): records with
`instruction` and `output` (`prompt` and `generation` are read too). --b alpaca_eval
is AlpacaEval's reference answers (text-davinci-003). MT-Bench's math, reasoning and
coding questions are graded with the reference answers of its reference file.

Writes DIR/pairwise.json (or grade.json: the summary), .jsonl (every verdict with the
judge's raw reply) and .html (a page to read them by eye).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from flanjax import config as flan_config  # noqa: E402
from flanjax import decoding  # noqa: E402
from flanjax.data import chat, sources  # noqa: E402
from flanjax.errors import UserError  # noqa: E402
from flanjax.evaluation import judge as judge_lib  # noqa: E402
from flanjax.evaluation import open_prompts  # noqa: E402


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(message)


def _parser() -> argparse.ArgumentParser:
  ap = _Parser(prog="python -m flanjax.judge", description=__doc__.split("\n")[0],
               formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog="\n".join(__doc__.split("\n")[2:]))
  sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)
  common = _Parser(add_help=False)
  common.add_argument("--judge", required=True, help="the judge: run, orbax or HF folder")
  common.add_argument("--step", help="a training run's step, or 'best'")
  common.add_argument("--mode", choices=judge_lib.MODES, default="generate")
  common.add_argument("--prompt_format", choices=chat.NAMES,
                      help="default: the judge run's recorded format, else plain")
  common.add_argument("--out", required=True, help="folder for the .json, .jsonl and .html")
  common.add_argument("--batch_size", type=flan_config.whole_number(), default=8)
  common.add_argument("--max_input_length", type=flan_config.whole_number(), default=2048)
  common.add_argument("--max_decode_len", type=flan_config.whole_number(), default=32)
  common.add_argument("--max_answer_chars", type=flan_config.whole_number(), default=6000,
                      help="longer answers are cut (marked [...]) so the prompt's end fits")
  common.add_argument("--max_items", type=flan_config.whole_number(),
                      help="judge only the first N")
  pw = sub.add_parser("pairwise", parents=[common], help="A against B, both orders")
  pw.add_argument("--a", required=True, help="answers file (instruction, output), or alpaca_eval")
  pw.add_argument("--b", required=True, help="answers file, or alpaca_eval (its references)")
  pw.add_argument("--resamples", type=flan_config.whole_number(), default=10000,
                  help="bootstrap resamples")
  pw.add_argument("--seed", type=int, default=0, help="bootstrap seed")
  gr = sub.add_parser("grade", parents=[common], help="MT-Bench style grades 1-10")
  gr.add_argument("--answers", required=True, help="infer's answers to mt_bench")
  gr.add_argument("--references", default="mt_bench",
                  help="reference answers file (default: mt_bench's GPT-4 references); "
                  "'none' for none")
  return ap


def _load_judge(args) -> judge_lib.Judge:
  from flanjax import infer  # pylint: disable=g-import-not-at-top
  from flanjax.models import loading  # pylint: disable=g-import-not-at-top
  if not os.path.exists(args.judge):
    raise UserError(f"judge checkpoint {args.judge} does not exist")
  fmt = infer.prompt_format(args.judge, args.prompt_format)  # the run's recorded format
  step = int(args.step) if args.step and args.step.isdigit() else args.step
  t0 = time.time()
  loaded = loading.load(args.judge, step=step)
  print(f"judge: {loaded.source} ({loaded.kind.name}), {args.mode} verdicts in the "
        f"{fmt.name} prompt format; loaded in {time.time() - t0:.0f}s", flush=True)
  cfg = decoding.DecodeConfig(**{**decoding.DecodeConfig().__dict__,
                                 "max_decode_len": args.max_decode_len})
  return judge_lib.Judge(loaded, fmt, args.mode, cfg, batch_size=args.batch_size,
                         max_input_length=args.max_input_length)


def _answers(spec: str, side: str) -> tuple[str, list]:
  """A side's name and answers: a file, or alpaca_eval's reference answers (either side)."""
  if spec == "alpaca_eval" or open_prompts.set_name(spec) == "alpaca_eval":
    path = open_prompts.set_path(spec)
    return "alpaca_eval (text-davinci-003)", judge_lib.read_answers(path, side)
  return spec, judge_lib.read_answers(spec, side)


def _write(out_dir: str, name: str, summary: dict, records: list, page) -> None:
  from flanjax.evaluation import review  # pylint: disable=g-import-not-at-top
  try:
    os.makedirs(out_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--out {out_dir} cannot be created ({e.strerror})") from None
  path = os.path.join(out_dir, name)
  judge_lib.write_jsonl(path + ".jsonl", records)
  with open(path + ".json.tmp", "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1, ensure_ascii=False)
  os.replace(path + ".json.tmp", path + ".json")
  review.write_page(path + ".html", page(summary, records))
  print(f"judge: wrote {path}.json, {path}.jsonl and {path}.html", flush=True)


def run(argv) -> int:
  from flanjax.evaluation import review  # pylint: disable=g-import-not-at-top
  args = _parser().parse_args(argv)
  t0 = time.time()
  if args.command == "pairwise":
    a_name, a = _answers(args.a, "a")
    b_name, b = _answers(args.b, "b")
    pairs = judge_lib.make_pairs(a, b, a_name, b_name, limit=args.max_items or None)
    judge = _load_judge(args)
    records, summary = judge_lib.pairwise(
        judge, pairs, names=(a_name, b_name), resamples=args.resamples, seed=args.seed,
        max_answer_chars=args.max_answer_chars)
    text = judge_lib.format_pairwise(summary)
    page = review.pairwise_page
  else:
    answers = judge_lib.read_graded_answers(args.answers)[:args.max_items or None]
    refs = None if args.references == "none" else (
        sources.data_path("mt_bench", "reference_answer_gpt4.jsonl")
        if args.references == "mt_bench" else args.references)
    judge = _load_judge(args)
    records, summary = judge_lib.grade(judge, answers, judge_lib.read_references(refs),
                                       max_answer_chars=args.max_answer_chars)
    summary["answers"] = os.path.abspath(args.answers)
    text = judge_lib.format_grade(summary)
    page = review.grade_page
  summary.update(judge=judge.loaded.source, prompt_format=judge.fmt.name,
                 seconds=round(time.time() - t0, 1))
  print(text, flush=True)
  _write(args.out, args.command, summary, records, page)
  return 0


def main(argv=None):
  flan_config.run_gin_command(run, "flanjax.judge", argv)


if __name__ == "__main__":
  flan_config.as_command(main)
