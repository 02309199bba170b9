"""The FLAN Collection's chain-of-thought sets, with CoT and direct-answer variants.

Files: ``flan_cot/<set>_train.tsv`` under the data folder, three tab-separated
fields per row (question, answer, rationale; newlines written as ``\\n``).
Each set becomes two tasks: ``flan_cot_<set>`` (target: rationale, then "So
the answer is X.") and ``flan_cot_<set>_direct`` (target: the answer). A stable
2% of each set (at most 200 rows) is held out as the validation split.
"""

from __future__ import annotations

import functools

from flanjax.data import cache, sources, templates
from flanjax.data.tasks import TaskDef

SETS = ("aqua", "creak", "ecqa", "gsm8k", "qasc", "sensemaking", "strategyqa")
COLUMNS = ("question", "answer", "rationale")
VALIDATION_SHARE = 0.02
MAX_VALIDATION = 200
PREFIX = "flan_cot_"


def path_of(name: str) -> str:
  return sources.data_path("flan_cot", f"{name}_train.tsv")


@cache.in_process
def _rows(name: str) -> tuple[dict, ...]:
  reader = sources.Reader(path_of(name))
  out = []
  for where, rec in sources.read_tsv(reader, COLUMNS):
    if sources.require(reader, where, rec, COLUMNS, non_empty=("question", "answer")):
      reader.report.kept += 1
      out.append(rec)
  reader.done()
  return tuple(out)


# Sets whose options are not part of the problem: AQuA holds one problem several times with
# other option lists (and the same rationale). Elsewhere the options are the question
# (sensemaking's two sentences), so the whole text is the problem.
PROBLEM_BEFORE_OPTIONS = ("aqua",)


def problem(name: str, question: str) -> str:
  """What two rows of set `name` must differ in to be two problems: splits keep a problem
  on one side, and few-shot exemplars never show the problem asked."""
  if name in PROBLEM_BEFORE_OPTIONS:
    for marker in ("\\nOptions:", "\nOptions:"):
      if marker in question:
        return question[:question.index(marker)]
  return question


def _validation_index(name: str, rows) -> list[int]:
  held = [sources.holdout(problem(name, r["question"]), VALIDATION_SHARE) for r in rows]
  return [i for i, h in enumerate(held) if h][:MAX_VALIDATION]


def validation_rows(name: str) -> list[dict]:
  """The rows of a set's validation split (gsm8k's train split holds them out too)."""
  rows = _rows(name)
  return [rows[i] for i in _validation_index(name, rows)]


def _split(name: str, split: str) -> list[dict]:
  rows = _rows(name)
  val_idx = _validation_index(name, rows)
  val = set(val_idx)
  if split == "validation":
    return [rows[i] for i in val_idx]
  return [r for i, r in enumerate(rows) if i not in val]


def task_defs() -> list[TaskDef]:
  defs = []
  for name in SETS:
    # GSM8K's answers are numbers: scored as the gsm8k task scores them ('1,200' is 1200).
    scoring = dict(metric_fns=(templates.number_accuracy,),
                   postprocess_fn=templates.score_number) if name == "gsm8k" else {}
    common = dict(load=functools.partial(_split, name), splits=("train", "validation"),
                  **scoring,
                  templates="cot_qa", num_shots=3,
                  key=lambda ex, n=name: problem(n, ex["question"]),
                  fingerprint=lambda n=name: sources.fingerprint_paths([path_of(n)]) + (
                      "/problem" if n in PROBLEM_BEFORE_OPTIONS else ""))
    defs.append(TaskDef(name=PREFIX + name, train_formats=("cot", "few_shot_cot"),
                        eval_format="cot", description=f"FLAN CoT {name}, rationale then answer",
                        **common))
    defs.append(TaskDef(name=PREFIX + name + "_direct", train_formats=("zero_shot", "few_shot"),
                        eval_format="zero_shot", description=f"FLAN CoT {name}, answer only",
                        **common))
  return defs
