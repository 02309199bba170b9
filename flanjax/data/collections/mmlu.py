"""MMLU (Hendrycks et al., 2021): 57 subjects, evaluation only, multiple choice over A-D.

Files under the data folder: ``mmlu/dev/<subject>_dev.csv`` (5 questions each: the
exemplars) and ``mmlu/test/<subject>_test.csv`` (14,042 questions in all), header
``question,choice0,choice1,choice2,choice3,answer``, ``answer`` the index 0-3 of the
correct choice.

Two tasks per subject, each with the single split "test", evaluation only:

  mmlu_<subject>        5-shot: the 5 dev questions, in file order, answered
  mmlu_0shot_<subject>  the same header and the question alone

The prompt is the original paper's and lm-evaluation-harness's (its ``mmlu``
tasks: ``doc_to_text``, the ``first_n`` few-shot sampler over ``dev``, target
delimiter " ", few-shot delimiter "\\n\\n"), byte for byte::

  The following are multiple choice questions (with answers) about abstract algebra.

  <question>
  A. <choice 0>
  B. <choice 1>
  C. <choice 2>
  D. <choice 3>
  Answer: B

  ... (5 exemplars) ...

  <question>
  A. ...
  D. <choice 3>
  Answer:

Questions are stripped, choices kept as written (as lm-eval's template does).
The target is the letter ("B"); the options feature is ["A", "B", "C", "D"], so
rank classification scores the four letters after "Answer:" as lm-eval's
continuation " B" (no EOS after it, whatever the model kind: ``scores_like_lm_eval``)
and picks the most likely: MMLU's accuracy.
A generated answer is read as its first letter A-D (``extract_letter``).

A 5-shot prompt that does not fit the input budget loses exemplars, first
first (the project's few-shot rule, printed once per task); the longest one
(high_school_european_history) is about 14,500 characters.

``CATEGORIES`` maps each subject to the paper's four groups (STEM, humanities,
social sciences, other), as lm-evaluation-harness's mmlu groups do; the report
(``summary_groups``) gives each group's accuracy over its examples.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from typing import Callable, Sequence

from flanjax.data import cache, sources
from flanjax.data.tasks import TaskDef
from flanjax.errors import UserError

STEM, HUMANITIES, SOCIAL_SCIENCES, OTHER = "stem", "humanities", "social_sciences", "other"
# The four groups of the MMLU paper, as lm-evaluation-harness tags its subjects.
CATEGORY_NAMES = {STEM: "STEM", HUMANITIES: "humanities", SOCIAL_SCIENCES: "social sciences",
                  OTHER: "other"}
CATEGORIES = {
    "abstract_algebra": STEM,
    "anatomy": STEM,
    "astronomy": STEM,
    "business_ethics": OTHER,
    "clinical_knowledge": OTHER,
    "college_biology": STEM,
    "college_chemistry": STEM,
    "college_computer_science": STEM,
    "college_mathematics": STEM,
    "college_medicine": OTHER,
    "college_physics": STEM,
    "computer_security": STEM,
    "conceptual_physics": STEM,
    "econometrics": SOCIAL_SCIENCES,
    "electrical_engineering": STEM,
    "elementary_mathematics": STEM,
    "formal_logic": HUMANITIES,
    "global_facts": OTHER,
    "high_school_biology": STEM,
    "high_school_chemistry": STEM,
    "high_school_computer_science": STEM,
    "high_school_european_history": HUMANITIES,
    "high_school_geography": SOCIAL_SCIENCES,
    "high_school_government_and_politics": SOCIAL_SCIENCES,
    "high_school_macroeconomics": SOCIAL_SCIENCES,
    "high_school_mathematics": STEM,
    "high_school_microeconomics": SOCIAL_SCIENCES,
    "high_school_physics": STEM,
    "high_school_psychology": SOCIAL_SCIENCES,
    "high_school_statistics": STEM,
    "high_school_us_history": HUMANITIES,
    "high_school_world_history": HUMANITIES,
    "human_aging": OTHER,
    "human_sexuality": SOCIAL_SCIENCES,
    "international_law": HUMANITIES,
    "jurisprudence": HUMANITIES,
    "logical_fallacies": HUMANITIES,
    "machine_learning": STEM,
    "management": OTHER,
    "marketing": OTHER,
    "medical_genetics": OTHER,
    "miscellaneous": OTHER,
    "moral_disputes": HUMANITIES,
    "moral_scenarios": HUMANITIES,
    "nutrition": OTHER,
    "philosophy": HUMANITIES,
    "prehistory": HUMANITIES,
    "professional_accounting": OTHER,
    "professional_law": HUMANITIES,
    "professional_medicine": OTHER,
    "professional_psychology": SOCIAL_SCIENCES,
    "public_relations": SOCIAL_SCIENCES,
    "security_studies": SOCIAL_SCIENCES,
    "sociology": SOCIAL_SCIENCES,
    "us_foreign_policy": SOCIAL_SCIENCES,
    "virology": OTHER,
    "world_religions": HUMANITIES,
}
SUBJECTS = tuple(sorted(CATEGORIES))

PREFIX = "mmlu_"
ZERO_SHOT_PREFIX = "mmlu_0shot_"
SPLIT = "test"
EXEMPLAR_SPLIT = "dev"
NUM_SHOTS = 5
LETTERS = ("A", "B", "C", "D")
COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
# The suite's groups in the report: all subjects, then each category.
GROUP = "MMLU"
ZERO_SHOT_GROUP = "MMLU 0-shot"

_LETTER = re.compile(r"\b([ABCD])\b")


def header(subject: str) -> str:
  """The description line lm-eval and the paper start every prompt with."""
  return (f"The following are multiple choice questions (with answers) about "
          f"{subject.replace('_', ' ')}.\n\n")


def question_block(example: dict) -> str:
  """lm-eval's doc_to_text: the stripped question, the lettered choices, 'Answer:'."""
  lines = [example["question"].strip()]
  lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, example["choices"])]
  return "\n".join(lines) + "\nAnswer:"


def exemplar_block(example: dict) -> str:
  return f"{question_block(example)} {example['answer']}\n\n"


def prompt(subject: str, example: dict, exemplars: Sequence[dict]) -> str:
  return header(subject) + "".join(exemplar_block(e) for e in exemplars) + question_block(example)


def _check_subject(subject: str) -> str:
  if subject not in CATEGORIES:
    raise UserError(f"no MMLU subject {subject!r}; the 57 subjects are {', '.join(SUBJECTS)}")
  return subject


def csv_path(subject: str, split: str) -> str:
  return sources.data_path("mmlu", split, f"{_check_subject(subject)}_{split}.csv")


def load(subject: str, split: str = SPLIT) -> tuple[dict, ...]:
  """A subject's questions, in file order: question, choices, answer (letter), options."""
  if split not in (SPLIT, EXEMPLAR_SPLIT):
    raise UserError(f"MMLU task {PREFIX}{subject} has only the split {SPLIT!r}, not {split!r}")
  path = csv_path(subject, split)
  st = os.stat(path)
  return _read(path, st.st_size, st.st_mtime_ns)


@cache.in_process
def _read(path: str, size: int, mtime_ns: int) -> tuple[dict, ...]:
  del size, mtime_ns  # cache keys only: an edited file is read again
  reader = sources.Reader(path)
  sources.check_file(path)
  out = []
  try:
    with open(path, encoding="utf-8", newline="") as f:
      rows = csv.reader(f)
      head = next(rows, None)
      if head is None or tuple(h.strip() for h in head) != COLUMNS:
        raise UserError(f"{path}:1: header {head} is not {','.join(COLUMNS)}; MMLU files have "
                        "that header and one question per row")
      for n, row in enumerate(rows, 2):
        where = f"{path}:{n}"
        if len(row) != len(COLUMNS):
          reader.bad(where, "rows with the wrong number of fields",
                     f"{len(row)} fields, expected {len(COLUMNS)} ({', '.join(COLUMNS)})",
                     "fix or remove that row")
          continue
        rec = dict(zip(COLUMNS, row))
        if not rec["question"].strip():
          reader.bad(where, "rows with an empty question", "the question is empty",
                     "fix or remove that row")
          continue
        if rec["answer"].strip() not in ("0", "1", "2", "3"):
          reader.bad(where, "rows whose answer is not 0-3",
                     f"answer {rec['answer']!r} is not the index 0-3 of a choice",
                     "write the correct choice's index, 0-3")
          continue
        reader.report.kept += 1
        out.append(dict(question=rec["question"],
                        choices=[rec[f"choice{i}"] for i in range(4)],
                        answer=LETTERS[int(rec["answer"])], options=list(LETTERS)))
  except UnicodeDecodeError as e:
    raise UserError(f"{path}: bytes that are not UTF-8 at offset {e.start}; "
                    "re-encode the file as UTF-8") from None
  reader.done()
  return tuple(out)


# --- rendering ---------------------------------------------------------------

_WARNED: set[str] = set()


class _Render:
  """render_fn of an MMLU TaskDef; `fingerprint` keys the token cache (bump on change)."""

  def __init__(self, subject: str, shots: int):
    self.subject, self.shots = subject, shots
    self.name = (PREFIX if shots else ZERO_SHOT_PREFIX) + subject
    self.fingerprint = f"mmlu/{shots}shot/v1"
    # tasks.cache_key evaluates render_fn.__qualname__ even when a fingerprint is given.
    self.__qualname__ = f"{type(self).__qualname__}[{self.fingerprint}]"

  def __call__(self, example: dict, index: int, split: str,
               fits: Callable[[str], bool] | None,
               input_budget: int | None = None) -> tuple[str, str]:
    del index, split
    exemplars = list(load(self.subject, EXEMPLAR_SPLIT)[:self.shots]) if self.shots else []
    want = len(exemplars)
    text = prompt(self.subject, example, exemplars)
    while fits is not None and exemplars and not fits(text):
      exemplars = exemplars[1:]
      text = prompt(self.subject, example, exemplars)
    if len(exemplars) < want and self.name not in _WARNED:
      _WARNED.add(self.name)
      budget = "" if input_budget is None else f" of {input_budget} tokens"
      print(f"data: {self.name}: the {want}-shot prompt exceeds the input budget{budget} for "
            "some examples; those get fewer exemplars (first dropped first). MMLU is "
            f"specified {want}-shot: raise the input length to score it as published",
            flush=True)
    return text, example["answer"]


# --- scoring -----------------------------------------------------------------

def extract_letter(text) -> str:
  """The answer letter of an output (or a target): its first standalone A-D, else ''."""
  if isinstance(text, bytes):
    text = text.decode("utf-8", errors="replace")
  if not isinstance(text, str):
    return ""
  m = _LETTER.search(text.strip().splitlines()[0] if text.strip() else "")
  return m.group(1) if m else ""


def postprocess(text, example=None, is_target: bool = False) -> str:
  """seqio postprocess_fn."""
  del example, is_target
  return extract_letter(text)


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """Percent of generated answers whose letter is the gold one (an empty one never counts)."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  if not targets:
    return {"accuracy": 0.0}
  hits = sum(bool(p) and p == t for t, p in zip(targets, predictions))
  return {"accuracy": 100.0 * hits / len(targets)}


def subject_of(task: str) -> tuple[str, int] | None:
  """'mmlu_anatomy' -> ('anatomy', 5); 'mmlu_0shot_anatomy' -> ('anatomy', 0); else None."""
  for prefix, shots in ((ZERO_SHOT_PREFIX, 0), (PREFIX, NUM_SHOTS)):
    if task.startswith(prefix) and task[len(prefix):] in CATEGORIES:
      return task[len(prefix):], shots
  return None


def scores_like_lm_eval(task: str) -> bool:
  """Whether rank classification scores this task's letters as lm-evaluation-harness does:
  " A" alone, no EOS after it, for every model kind (its seq2seq path encodes the
  continuation without special tokens). True for the MMLU tasks, so their
  log-likelihoods are lm_eval's for T5 and prefix-LM checkpoints too; other tasks score
  an option as training wrote a target (its tokens, then EOS)."""
  return subject_of(task) is not None


def summary_groups(task: str) -> list[str]:
  """The report groups of a task: the suite ('MMLU' / 'MMLU 0-shot') and its category."""
  found = subject_of(task)
  if found is None:
    return []
  subject, shots = found
  group = GROUP if shots else ZERO_SHOT_GROUP
  return [group, f"{group} {CATEGORY_NAMES[CATEGORIES[subject]]}"]


def _fingerprint(subject: str) -> str:
  return sources.fingerprint_paths([csv_path(subject, SPLIT), csv_path(subject, EXEMPLAR_SPLIT)])


def task_defs() -> list[TaskDef]:
  """mmlu_<subject> (5-shot) and mmlu_0shot_<subject> (zero-shot) for all 57 subjects."""
  defs = []
  for subject in SUBJECTS:
    fp = functools.partial(_fingerprint, subject)
    for shots in (NUM_SHOTS, 0):
      render = _Render(subject, shots)
      defs.append(TaskDef(
          name=render.name, load=functools.partial(load, subject), splits=(SPLIT,),
          templates=(), eval_format="few_shot_options" if shots else "zero_shot_options",
          num_shots=shots, exemplar_split=EXEMPLAR_SPLIT, eval_only_splits=("*",),
          fingerprint=fp, render_fn=render, metric_fns=(accuracy,), postprocess_fn=postprocess,
          description=f"MMLU {subject.replace('_', ' ')}, {shots}-shot, letters A-D"))
  return defs


FIVE_SHOT_TASKS = tuple(PREFIX + s for s in SUBJECTS)
ZERO_SHOT_TASKS = tuple(ZERO_SHOT_PREFIX + s for s in SUBJECTS)
