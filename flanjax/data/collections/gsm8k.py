"""GSM8K: train for training, test for evaluation only, scored on the final number.

Files: ``gsm8k/train.jsonl`` and ``gsm8k/test.jsonl`` under the data folder,
``{"question", "answer"}`` per line; the answer is a worked rationale with
``<<calc>>`` annotations that ends in ``#### <number>``. The rationale keeps
its text and drops the annotations; the target is the number.
"""

from __future__ import annotations

import hashlib
import os
import re

from flanjax.data import cache, sources, templates
from flanjax.data.tasks import TaskDef

SPLIT_FILES = {"train": "train.jsonl", "test": "test.jsonl"}
_CALC = re.compile(r"<<[^>]*>>")
# Number answers are read and scored in data/templates.py (flan_cot_gsm8k scores so too).
normalize_number = templates.normalize_number
final_number = templates.final_number


def parse(rec: dict) -> dict:
  """A GSM8K record -> question, rationale (no calc annotations), answer (number)."""
  body, _, final = rec["answer"].rpartition("####")
  rationale = _CALC.sub("", body).strip().replace("\n", " ")
  return dict(question=rec["question"].strip(), rationale=rationale,
              answer=normalize_number(final))


@cache.in_process
def load(split: str) -> tuple[dict, ...]:
  reader = sources.Reader(sources.data_path("gsm8k", SPLIT_FILES[split]))
  out = []
  for where, rec in sources.read_jsonl(reader):
    if not sources.require(reader, where, rec, ("question", "answer"), non_empty=("question", "answer")):
      continue
    if "####" not in rec["answer"]:
      reader.bad(where, "answers without '####'", "the answer has no '#### <number>' line",
                 "end the answer with '#### <number>'")
      continue
    ex = parse(rec)
    if not ex["answer"]:
      reader.bad(where, "answers without a number", "no number after '####'",
                 "put the final number after '####'")
      continue
    reader.report.kept += 1
    out.append(ex)
  reader.done()
  if split == "train":
    # FLAN CoT's gsm8k set is GSM8K's train set: the questions it holds out for its
    # validation split are held out here too, so a blend of both never trains on them.
    held = flan_cot_validation_questions()
    out = [ex for ex in out if _key(ex["question"]) not in held]
  return tuple(out)


def _key(question: str) -> str:
  return " ".join(question.split())


def flan_cot_validation_questions() -> frozenset:
  """The questions of flan_cot_gsm8k's validation split (none when its file is absent)."""
  from flanjax.data.collections import flan_cot  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(sources.data_dir(), "flan_cot", "gsm8k_train.tsv")):
    return frozenset()
  return frozenset(_key(r["question"]) for r in flan_cot.validation_rows("gsm8k"))


accuracy = templates.number_accuracy
score_text = templates.score_number
_postprocess = score_text


def _held_fp() -> str:
  return hashlib.sha256("\n".join(sorted(flan_cot_validation_questions())).encode()).hexdigest()[:12]


def task_defs() -> list[TaskDef]:
  fp = lambda: sources.fingerprint_paths(  # noqa: E731
      [sources.data_path("gsm8k", f) for f in SPLIT_FILES.values()]) + f"/held:{_held_fp()}"
  common = dict(load=load, splits=("train", "test"), templates="math_word", num_shots=3,
                eval_only_splits=("test",), fingerprint=fp, metric_fns=(accuracy,),
                postprocess_fn=_postprocess)
  return [
      TaskDef(name="gsm8k", train_formats=("cot", "few_shot_cot"), eval_format="cot",
              description="GSM8K, rationale then the final number", **common),
      TaskDef(name="gsm8k_direct", train_formats=("zero_shot", "few_shot"),
              eval_format="zero_shot", description="GSM8K, the final number only", **common),
  ]
