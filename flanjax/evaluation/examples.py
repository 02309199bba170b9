"""Evaluation examples: a task's split as (inputs, targets, options), and answer options.

A flanjax task renders only the examples asked for (few-shot prompts drop
exemplars, first first, until they fit `input_length`; BBH prints when that
happens); any other seqio task is read from its dataset
(`inputs_pretokenized`, `targets_pretokenized`). Options come from the
example's `options` feature, or else from the last option block of the input
("Options:" with "(A) ..." lines, "OPTIONS:" with "- ..." lines, or "Choose
from: a, b."). If the gold answer is an option letter, "(A)".."(R)" are the
candidates (BBH), else the option texts are.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Sequence

import numpy as np
import seqio

from flanjax.data import tasks as task_lib
from flanjax.errors import UserError

EVAL_SPLITS = ("validation", "heldout_templates", "test")


@dataclasses.dataclass
class Example:
  inputs: str
  targets: str
  options: list  # answer options, [] if none
  raw: dict  # what postprocess_fn receives as `example`


def task_and_split(spec: str) -> tuple[str, str | None]:
  """'name' or 'name:split'."""
  name, _, split = spec.partition(":")
  return name, (split or None)


def get_task(name: str) -> seqio.Task:
  from flanjax.data import registry  # pylint: disable=g-import-not-at-top
  obj = registry.get_task_or_mixture(name)
  if not isinstance(obj, seqio.Task):
    raise UserError(f"{name} is a mixture; evaluation takes tasks (list them with "
                    "`python tools/show_task.py --list`)")
  return obj


def expand(names: Sequence[str]) -> list[str]:
  """Task names with mixtures replaced by their tasks (a ':split' suffix is kept)."""
  from flanjax.data import registry  # pylint: disable=g-import-not-at-top
  out = []
  for spec in names:
    name, split = task_and_split(spec)
    obj = registry.get_task_or_mixture(name)
    for t in getattr(obj, "tasks", [obj]):
      out.append(t.name + (f":{split}" if split else ""))
  return out


def default_splits(name: str) -> list[str]:
  """A flanjax task's evaluation-only splits, else the usual evaluation splits it has."""
  task = get_task(name)
  if name in task_lib.DEFS:
    defn = task_lib.DEFS[name][0]
    if "*" in defn.eval_only_splits:
      return list(defn.splits)
    if defn.eval_only_splits:
      return [s for s in defn.splits if s in defn.eval_only_splits]
  return [s for s in EVAL_SPLITS if s in task.splits]


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return "" if value is None else str(value)


def load_examples(name: str, split: str, vocab, input_length: int,
                  max_examples: int | None = None) -> list[Example]:
  task = get_task(name)
  if split not in task.splits:
    raise UserError(f"task {name} has no split {split!r}; it has {', '.join(task.splits)}")
  if name in task_lib.DEFS:
    defn = task_lib.DEFS[name][0]
    fits = lambda text: len(vocab.encode(text)) + 1 <= input_length  # noqa: E731
    # input_budget is named in the "exemplars dropped" notes.
    records = task_lib.render_split(defn, split, fits, limit=max_examples,
                                    input_budget=input_length)
    out = []
    for r in records:
      raw = {"inputs_pretokenized": r["inputs"].encode("utf-8"),
             "targets_pretokenized": r["targets"].encode("utf-8"),
             "answer": r["answer"].encode("utf-8"), "options": list(r["options"])}
      if "references" in r:
        raw["references"] = list(r["references"])
      out.append(Example(r["inputs"], r["targets"], list(r["options"]), raw))
    return out
  ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1, use_cached=False)
  if max_examples:
    ds = ds.take(max_examples)
  out = []
  for ex in ds.as_numpy_iterator():
    inputs = ex.get("inputs_pretokenized")
    if inputs is None and "inputs" in ex:
      inputs = task.output_features["inputs"].vocabulary.decode(ex["inputs"].tolist())
    targets = ex.get("targets_pretokenized")
    if targets is None:
      targets = task.output_features["targets"].vocabulary.decode(ex["targets"].tolist())
    options = ex.get("options")
    if isinstance(options, bytes):
      try:
        options = json.loads(options.decode("utf-8"))
      except json.JSONDecodeError:
        options = None
    elif isinstance(options, np.ndarray):
      options = [_text(o) for o in options.tolist()]
    out.append(Example(_text(inputs), _text(targets), list(options or []), ex))
  return out



_LETTER_LINE = re.compile(r"^\(([A-Z])\)\s?(.*)$")
_DASH_LINE = re.compile(r"^- (.*)$")
_INLINE = re.compile(r"^Choose from: (.*)\.$", re.M)
_LETTER_ANSWER = re.compile(r"^\(([A-Z])\)$")


def parse_options(text: str) -> list[tuple[str | None, str]]:
  """The last option block of a prompt: [(letter or None, option text)], [] if none."""
  best, best_at = [], -1
  for header, pattern, lettered in (("Options:", _LETTER_LINE, True),
                                    ("OPTIONS:", _DASH_LINE, False)):
    at = text.rfind(header + "\n")
    if at < 0 or at < best_at:
      continue
    opts = []
    for line in text[at + len(header) + 1:].split("\n"):
      m = pattern.match(line.strip())
      if not m:
        break
      opts.append((m.group(1), m.group(2).strip()) if lettered else (None, m.group(1).strip()))
    if opts:
      best, best_at = opts, at
  inline = list(_INLINE.finditer(text))
  if inline and inline[-1].start() > best_at:
    best = [(None, o.strip()) for o in inline[-1].group(1).split(", ") if o.strip()]
  return best


def rank_candidates(example: Example, gold: str) -> tuple[list[str], int] | None:
  """(candidate answers, index of the gold one or -1), or None if there are no options.

  gold: the postprocessed target. A gold that is an option's text makes the
  texts the candidates; otherwise the letters of a lettered list are ("(B)").
  """
  parsed = parse_options(example.inputs)
  if example.options:
    texts, letters = [str(o) for o in example.options], None
    if parsed and len(parsed) == len(texts) and all(p[0] for p in parsed):
      letters = [p[0] for p in parsed]
  elif parsed:
    texts = [p[1] for p in parsed]
    letters = [p[0] for p in parsed] if all(p[0] for p in parsed) else None
  else:
    return None
  gold = gold.strip()
  if gold in texts and not _LETTER_ANSWER.match(gold):
    return texts, texts.index(gold)  # the target is the option's text (FLAN's templates)
  if letters:  # the target is a letter (BBH), or no option at all: scored as a miss
    cands = [f"({c})" for c in letters]
    return cands, (cands.index(gold) if gold in cands else -1)
  return texts, -1
