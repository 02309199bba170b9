"""BIG-Bench Hard (Suzgun et al., 2022): 27 evaluation-only tasks, 3-shot CoT and direct.

Files under the data folder: ``bbh/tasks/<task>.json`` (``{"examples": [{"input",
"target"}]}``) and ``bbh/cot-prompts/<task>.txt`` (a canary line, a ``-----``
line, then a task description and three exemplars ``Q: ...\\nA: Let's think step
by step. ... So the answer is X.``).

Two tasks per BBH task, each with the single split "test", eval-only:

  bbh_<task>         the published prompt text verbatim, then
                     ``\\n\\nQ: {input}\\nA: Let's think step by step.``
                     (how the BBH code and its reproductions build it)
  bbh_<task>_direct  the description and the same three questions, each answered
                     only by the X of its "So the answer is X.", then ``Q: {input}\\nA:``

The target of both is the gold answer as written: BBH has no gold rationales,
and the reference is only compared after answer extraction.

Scoring (``extract_answer``): the answer is what follows the last "So the answer
is", up to the end of its sentence (first period followed by a space, a line end
or the end). For multiple-choice tasks "(B) text", "B)", "B" and "B." all read
as "(B)". Everything else is compared exactly as written (case included), after
stripping. A CoT output with no answer phrase counts only if it is literally the
answer; a direct output is read from its first line.

Prompts that do not fit the input budget lose exemplars, first first (the
project's few-shot rule), and this is printed once per task: BBH is specified
as 3-shot, so raise the input length to evaluate it as published.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Callable, Sequence

from flanjax.data import cache, sources
from flanjax.data.tasks import TaskDef
from flanjax.errors import UserError

# Fixed by the benchmark; listed here so task_defs() needs no files (a user's
# machine without the data still registers, and fails only when a task is read).
MULTIPLE_CHOICE = frozenset({
    "date_understanding", "disambiguation_qa", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection",
    "snarks", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
})
FREE_FORM = frozenset({
    "boolean_expressions", "causal_judgement", "dyck_languages", "formal_fallacies",
    "multistep_arithmetic_two", "navigate", "object_counting", "sports_understanding",
    "web_of_lies", "word_sorting",
})
TASKS = tuple(sorted(MULTIPLE_CHOICE | FREE_FORM))

PREFIX = "bbh_"
DIRECT_SUFFIX = "_direct"
SPLIT = "test"
COT_TRIGGER = "Let's think step by step."
ANSWER_PHRASE = "So the answer is"

_SEPARATOR = re.compile(r"^-{5,}[ \t]*$", re.M)
_EXEMPLAR_START = re.compile(r"\n\s*\n(?=Q: )")
_CLOSING = re.compile(r"[ \t]+(.+?)\.\s*")  # what follows the last answer phrase of an exemplar
# "(B) text" | "B) text" | "B" / "B." / "B:" alone.
_OPTION = re.compile(r"\(([A-Z])\)|([A-Z])\)(?=\s|$)|([A-Z])[.:]?$")
_SENTENCE_END = re.compile(r"\.(?=\s|$)")


@dataclasses.dataclass(frozen=True)
class Exemplar:
  question: str  # after "Q: "
  solution: str  # after "A: ": the rationale and its closing "So the answer is X."
  answer: str    # the X
  block: str     # the exemplar's text as published


@dataclasses.dataclass(frozen=True)
class Prompt:
  path: str
  description: str  # may be several paragraphs (snarks), or empty
  exemplars: tuple[Exemplar, ...]
  text: str  # everything after the separator, stripped: the published prompt

  def cot(self, shots: int | None = None) -> str:
    """The CoT prompt: the published text, or the description and the last `shots` exemplars."""
    if shots is None or shots >= len(self.exemplars):
      return self.text
    return self._join([e.block for e in self._last(shots)])

  def direct(self, shots: int | None = None) -> str:
    """The description and the last `shots` (default all) exemplars with their answers only."""
    return self._join([f"Q: {e.question}\nA: {e.answer}" for e in self._last(shots)])

  def _last(self, shots: int | None) -> tuple[Exemplar, ...]:
    return self.exemplars if shots is None else self.exemplars[max(0, len(self.exemplars) - shots):]

  def _join(self, blocks: list[str]) -> str:
    return "\n\n".join(p for p in [self.description] + blocks if p)


def _malformed(path: str, what: str) -> UserError:
  return UserError(f"{path}: malformed BBH prompt file: {what}; expected a canary line, a '-----' "
                   "line, a task description, then exemplars 'Q: ...' / 'A: Let's think step by "
                   "step. ... So the answer is X.' separated by blank lines")


def parse_prompt(path: str) -> Prompt:
  """Parses a cot-prompts file; a missing or malformed file is a UserError naming it."""
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist; BBH needs bbh/cot-prompts/<task>.txt from the "
                    "BIG-Bench-Hard repository under the data folder")
  st = os.stat(path)
  return _parse_prompt(path, st.st_size, st.st_mtime_ns)


@cache.in_process
def _parse_prompt(path: str, size: int, mtime_ns: int) -> Prompt:
  del size, mtime_ns  # cache keys only: an edited file is parsed again
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise _malformed(path, f"bytes that are not UTF-8 at offset {e.start}") from None
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  sep = _SEPARATOR.search(text)
  if sep:
    body = text[sep.end():]
  elif "canary" in text.split("\n", 1)[0].lower():
    raise _malformed(path, "a canary line but no '-----' line after it")
  else:  # a copy with canary and separator already removed
    body = text
  body = body.strip()
  if not body:
    raise _malformed(path, "nothing after the '-----' line")
  parts = _EXEMPLAR_START.split(body)
  if parts[0].startswith("Q: "):
    description, blocks = "", parts
  else:
    description, blocks = parts[0], parts[1:]
  if not blocks:
    raise _malformed(path, "no exemplar (a paragraph starting 'Q: ')")
  exemplars = []
  for n, block in enumerate(blocks, 1):
    q, sep_a, solution = block.partition(f"\nA: {COT_TRIGGER}")
    if sep_a:
      solution = COT_TRIGGER + solution
    else:
      q, sep_a, solution = block.partition("\nA:")
    if not sep_a:
      raise _malformed(path, f"exemplar {n} has no line starting 'A:'")
    idx = solution.rfind(ANSWER_PHRASE)
    m = _CLOSING.fullmatch(solution[idx + len(ANSWER_PHRASE):]) if idx >= 0 else None
    if not m:
      raise _malformed(path, f"exemplar {n} does not end with '{ANSWER_PHRASE} X.'")
    exemplars.append(Exemplar(question=q[len("Q: "):].strip(), solution=solution.strip(),
                              answer=m.group(1).strip(), block=block.strip()))
  return Prompt(path=path, description=description.strip(), exemplars=tuple(exemplars), text=body)


def _check_task(task: str) -> str:
  if task not in MULTIPLE_CHOICE and task not in FREE_FORM:
    raise UserError(f"no BBH task {task!r}; the 27 tasks are {', '.join(TASKS)}")
  return task


def prompt_path(task: str) -> str:
  return sources.data_path("bbh", "cot-prompts", f"{_check_task(task)}.txt")


def examples_path(task: str) -> str:
  return sources.data_path("bbh", "tasks", f"{_check_task(task)}.json")


def prompt(task: str) -> Prompt:
  return parse_prompt(prompt_path(task))


def load(task: str, split: str = SPLIT) -> tuple[dict, ...]:
  """The examples of a task: input, target and answer (= target), in file order."""
  if split != SPLIT:
    raise UserError(f"BBH task {task} has only the split {SPLIT!r}, not {split!r}")
  path = examples_path(task)
  st = os.stat(path)
  return _read_examples(path, st.st_size, st.st_mtime_ns)


@cache.in_process
def _read_examples(path: str, size: int, mtime_ns: int) -> tuple[dict, ...]:
  del size, mtime_ns  # cache keys only
  data = sources.load_json(path, "restore the file from the BIG-Bench-Hard repository")
  if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
    raise UserError(f"{path}: expected an object with an 'examples' list, as in BIG-Bench-Hard")
  reader = sources.Reader(path)
  out = []
  for i, rec in enumerate(data["examples"]):
    where = f"{path} examples[{i}]"
    if not isinstance(rec, dict):
      reader.bad(where, "non-object examples", f"a JSON {type(rec).__name__}, not an object",
                 "make every example an {input, target} object")
      continue
    if not sources.require(reader, where, rec, ("input", "target"), non_empty=("input", "target")):
      continue
    reader.report.kept += 1
    out.append(dict(input=rec["input"], target=rec["target"].strip(), answer=rec["target"].strip()))
  reader.done()
  return tuple(out)


# --- rendering ---------------------------------------------------------------

_WARNED: set[str] = set()


def cot_input(p: Prompt, question: str, shots: int | None = None) -> str:
  return f"{p.cot(shots)}\n\nQ: {question}\nA: {COT_TRIGGER}"


def direct_input(p: Prompt, question: str, shots: int | None = None) -> str:
  head = p.direct(shots)
  return (f"{head}\n\n" if head else "") + f"Q: {question}\nA:"


class _Render:
  """render_fn of a BBH TaskDef; `fingerprint` keys the token cache (bump on change)."""

  def __init__(self, task: str, cot: bool):
    self.task, self.cot = task, cot
    self.name = PREFIX + task + ("" if cot else DIRECT_SUFFIX)
    self.fingerprint = f"bbh/{'cot' if cot else 'direct'}/v1"
    # tasks.cache_key evaluates render_fn.__qualname__ even when a fingerprint is given.
    self.__qualname__ = f"{type(self).__qualname__}[{self.fingerprint}]"

  def __call__(self, example: dict, index: int, split: str,
               fits: Callable[[str], bool] | None,
               input_budget: int | None = None) -> tuple[str, str]:
    """input_budget: the token count `fits` checks against, named in the note."""
    del index, split
    p = prompt(self.task)
    build = cot_input if self.cot else direct_input
    shots = len(p.exemplars)
    text = build(p, example["input"])
    while fits is not None and shots > 0 and not fits(text):
      shots -= 1
      text = build(p, example["input"], shots)
    if shots < len(p.exemplars) and self.name not in _WARNED:
      _WARNED.add(self.name)
      budget = "" if input_budget is None else f" of {input_budget} tokens"
      print(f"data: {self.name}: the {len(p.exemplars)}-shot prompt exceeds the input budget"
            f"{budget} for some examples; those get fewer exemplars (first "
            "dropped first). BBH is specified 3-shot: raise the input length to score it as "
            "published", flush=True)
    return text, example["target"]


# --- scoring -----------------------------------------------------------------

def _split_name(task: str) -> tuple[str, bool]:
  """'bbh_snarks_direct' / 'snarks_direct' / 'bbh_snarks' / 'snarks' -> (BBH task, cot)."""
  cot = not task.endswith(DIRECT_SUFFIX)
  base = task if cot else task[:-len(DIRECT_SUFFIX)]
  if base not in MULTIPLE_CHOICE and base not in FREE_FORM and base.startswith(PREFIX):
    base = base[len(PREFIX):]
  return _check_task(base), cot


def _as_text(text) -> str:
  if isinstance(text, bytes):
    return text.decode("utf-8", errors="replace")
  return text if isinstance(text, str) else ""


def _option(answer: str) -> str:
  m = _OPTION.match(answer)
  if not m:
    return answer  # not an option letter: kept, e.g. the free-text golds some MC tasks have
  return f"({next(g for g in m.groups() if g)})"


def extract_answer(text, task: str) -> str:
  """The answer in a model output (or a reference) of `task`, as BBH scores it.

  `task` is a BBH task ("snarks") or a task name of this module ("bbh_snarks",
  "bbh_snarks_direct"); names ending in "_direct" read direct outputs. Never
  raises on the text: an unusable output gives "" or text that matches nothing.
  """
  base, cot = _split_name(task)
  text = _as_text(text)
  idx = text.rfind(ANSWER_PHRASE)
  if idx < 0 and cot:
    return text.strip()  # no answer phrase: only the bare answer itself can match
  if idx >= 0:
    text = text[idx + len(ANSWER_PHRASE):]
  lines = text.lstrip(" \t:\r\n").splitlines()
  answer = lines[0] if lines else ""
  end = _SENTENCE_END.search(answer)
  if end:
    answer = answer[:end.start()]
  answer = answer.strip()
  return _option(answer) if base in MULTIPLE_CHOICE else answer


def postprocess(text, task: str, example=None, is_target: bool = False) -> str:
  """seqio postprocess_fn (bound to a task with functools.partial)."""
  del example, is_target  # references and outputs are read the same way
  return extract_answer(text, task)


def exact_match(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
  """seqio metric on postprocessed texts: percent equal, an empty prediction never counting."""
  if len(targets) != len(predictions):
    raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
  if not targets:
    return {"exact_match": 0.0}
  hits = sum(bool(p) and p == t for t, p in zip(targets, predictions))
  return {"exact_match": 100.0 * hits / len(targets)}


def _fingerprint(task: str) -> str:
  return sources.fingerprint_paths([examples_path(task), prompt_path(task)])


def task_defs() -> list[TaskDef]:
  """bbh_<task> (3-shot CoT) and bbh_<task>_direct (3-shot answer only) for all 27 tasks."""
  defs = []
  for task in TASKS:
    fp = functools.partial(_fingerprint, task)
    for cot in (True, False):
      render = _Render(task, cot)
      defs.append(TaskDef(
          name=render.name, load=functools.partial(load, task), splits=(SPLIT,), templates=(),
          eval_format="few_shot_cot" if cot else "few_shot", num_shots=3,
          eval_only_splits=("*",), fingerprint=fp, render_fn=render,
          metric_fns=(exact_match,), postprocess_fn=functools.partial(postprocess, task=render.name),
          description=f"BIG-Bench Hard {task}, 3-shot {'chain of thought' if cot else 'answer only'}"))
  return defs
