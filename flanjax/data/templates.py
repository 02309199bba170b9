"""Instruction templates as data, and the FLAN formats that render them.

A template is a pair of patterns over an example's fields (``str.format`` style).
The *format* decides how the pattern is used:

  zero_shot          the pattern alone; ``{options}`` renders as nothing
  zero_shot_options  the answer options rendered as a list
  few_shot           k solved exemplars (same template) before the question
  few_shot_options   the same, with options
  cot                target is the rationale, then the answer
  few_shot_cot       k exemplars with rationales, then the question

The *template mode* decides how much of a template the model sees (the FLAN
paper's ablation of instructions, its section 4.3); targets never change:

  instructions   the template's wording (the default)
  no_template    the raw input fields only, options as a plain list, one per line
  dataset_name   the task's name in brackets, then the raw inputs

One gin binding sets it for training (``template_mode.mode = 'no_template'``);
evaluation splits have their own (``template_mode.eval_mode``, default
'instructions': as in the paper, a model trained without instructions is
still evaluated with them, since without a template a held-out task does not
say what to do).
"""

from __future__ import annotations

import dataclasses
import re
import string
from typing import Mapping, Sequence

import gin

from flanjax.errors import UserError

FORMATS = (
    "zero_shot",
    "zero_shot_options",
    "few_shot",
    "few_shot_options",
    "cot",
    "few_shot_cot",
)

# The answer of a chain-of-thought target always follows this phrase, so the
# answer can be extracted the same way for every CoT task.
COT_ANSWER_PREFIX = "So the answer is"

OPTION_LAYOUTS = {
    "dash": lambda opts: "OPTIONS:\n" + "\n".join(f"- {o}" for o in opts),
    "letters": lambda opts: "Options:\n" + "\n".join(
        f"({string.ascii_uppercase[i]}) {o}" for i, o in enumerate(opts)),
    "inline": lambda opts: "Choose from: " + ", ".join(opts) + ".",
}


MODES = ("instructions", "no_template", "dataset_name")
INSTRUCTIONS = "instructions"


def check_mode(mode: str, what: str = "template_mode.mode") -> str:
  if mode not in MODES:
    raise UserError(f"{what}={mode!r} is not a template mode; use one of {', '.join(MODES)}")
  return mode


@gin.configurable
def template_mode(mode: str = INSTRUCTIONS, eval_mode: str = INSTRUCTIONS) -> tuple[str, str]:
  """(training mode, evaluation mode) as gin binds them; see the module docstring."""
  return check_mode(mode), check_mode(eval_mode, "template_mode.eval_mode")


@dataclasses.dataclass(frozen=True)
class Template:
  """One wording of a task: an input pattern and a target pattern."""
  inputs: str
  targets: str = "{answer}"
  # Target for chain-of-thought formats: rationale, then the answer.
  cot_targets: str = "{rationale} " + COT_ANSWER_PREFIX + " {answer}."

  def fields(self) -> set[str]:
    names = set()
    for pattern in (self.inputs, self.targets):
      names |= {f for _, f, _, _ in string.Formatter().parse(pattern) if f}
    return names


def render_options(options: Sequence[str], layout: str = "dash") -> str:
  if layout not in OPTION_LAYOUTS:
    raise ValueError(
        f"unknown options layout {layout!r}; choose one of {sorted(OPTION_LAYOUTS)}")
  return OPTION_LAYOUTS[layout](list(options))


def _drop_empty_lines(pattern: str, values: Mapping[str, object]) -> str:
  """Drops pattern lines whose every field is empty ("Input: {input}" with no input)."""
  keep = []
  for line in pattern.split("\n"):
    names = [f for _, f, _, _ in string.Formatter().parse(line) if f]
    if names and all(f in values and values[f] in ("", None, []) for f in names):
      continue
    keep.append(line)
  return "\n".join(keep)


def _fill(pattern: str, example: Mapping[str, object], options_text: str) -> str:
  values = dict(example)
  values["options"] = options_text
  pattern = _drop_empty_lines(pattern, values)
  try:
    text = pattern.format(**values)
  except KeyError as e:
    raise KeyError(
        f"template {pattern!r} needs field {e.args[0]!r}, which the example lacks "
        f"(it has {sorted(example)})") from None
  # A template that places {options} on its own line leaves a blank line when
  # options are off; collapse it so the input has no dangling whitespace.
  return re.sub(r"\n{3,}", "\n\n", text).strip()


def input_fields(templates: Sequence[Template]) -> tuple[str, ...]:
  """The fields the input patterns name (options aside), in order of first appearance:
  the raw inputs of the no_template and dataset_name modes."""
  out = []
  for t in templates:
    for _, f, _, _ in string.Formatter().parse(t.inputs):
      if f and f != "options" and f not in out:
        out.append(f)
  return tuple(out)


def raw_inputs(example: Mapping[str, object], fields: Sequence[str],
               options: Sequence[str] | None) -> str:
  """The example's input fields, one per line, then its options one per line: no
  instruction words, no option header."""
  parts = [str(example[f]).strip() for f in fields if example.get(f) not in ("", None, [])]
  parts += [str(o) for o in options or ()]
  return "\n".join(p for p in parts if p)


def render(template: Template,
           example: Mapping[str, object],
           fmt: str,
           exemplars: Sequence[Mapping[str, object]] = (),
           options_layout: str = "dash",
           mode: str = INSTRUCTIONS,
           task_name: str = "",
           fields: Sequence[str] | None = None) -> tuple[str, str]:
  """Renders one example in one format; returns (inputs, targets).

  mode: the template mode (module docstring); no_template and dataset_name
  read `fields` (default: those `template` names) and dataset_name `task_name`.
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
  check_mode(mode, "mode")
  with_options = fmt.endswith("options")
  cot = fmt in ("cot", "few_shot_cot")
  few_shot = fmt.startswith("few_shot")
  if fields is None:
    fields = input_fields([template])

  def one(ex):
    opts = ex.get("options") if with_options else None
    if mode == INSTRUCTIONS:
      options_text = render_options(opts, options_layout) if opts else ""
      inputs = _fill(template.inputs, ex, options_text)
      if opts and "{options}" not in template.inputs:
        inputs = f"{inputs}\n\n{options_text}"
    else:
      inputs = raw_inputs(ex, fields, opts)
    targets = _fill(template.cot_targets if cot else template.targets, ex, "")
    return inputs, targets

  inputs, targets = one(example)
  if few_shot and exemplars:
    shots = ["{}\n{}".format(*one(ex)) for ex in exemplars]
    inputs = "\n\n".join(shots + [inputs])
  if mode == "dataset_name":
    inputs = f"[{task_name}]\n{inputs}"
  return inputs, targets


class Answers(str):
  """A target's first right answer, as a str (what tables and baselines show), carrying all
  of them in `references` for metrics that score against any (NIv2's outputs)."""
  references: tuple = ()

  def __new__(cls, references):
    self = super().__new__(cls, references[0])
    self.references = tuple(references)
    return self


_PUNCTUATION = frozenset(string.punctuation)


def normalize_text(text: str) -> list[str]:
  """SQuAD's answer normalization: lower case, no punctuation or articles, split on space."""
  text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
  return re.sub(r"\b(a|an|the)\b", " ", text).split()


def references(target) -> tuple:
  """Every right answer of a postprocessed target (one, unless it is an `Answers`)."""
  return getattr(target, "references", None) or (target,)


def extract_answer(text: str) -> str:
  """The answer of a prediction or target: what follows the CoT phrase, if any."""
  idx = text.rfind(COT_ANSWER_PREFIX)
  if idx >= 0:
    text = text[idx + len(COT_ANSWER_PREFIX):]
  return text.strip().rstrip(".").strip()


# ---------------------------------------------------------------- number answers

# A number, with commas only as thousands separators (groups of three digits):
# "1,234" is one number, "3,4" two.
_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# The end of the answer's sentence: a full stop before a space or the end, or a line break
# ('1,200.50' keeps its decimal point).
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")


def normalize_number(text: str, first: bool = False) -> str:
  """'$1,200.00' -> '1200': the last number of `text` (the first with `first`); '' if it
  holds no number."""
  m = _NUMBER.findall(text)
  if not m:
    return ""
  s = m[0 if first else -1].replace("$", "").replace(",", "")
  if "." in s:
    s = s.rstrip("0").rstrip(".")
  return s


def final_number(text: str) -> str:
  """The answer number of a math target (GSM8K's) or a model's output.

  After the last '####' if there is one (the reference format), else after the last CoT
  answer phrase: the last number of the sentence it starts ('So the answer is 18. That is 2
  more than 16.' -> 18; a list '3,4.' -> 4), else the first number after it; else the last
  number in the text. '' if there is none.
  """
  if "####" in text:
    return normalize_number(text.split("####")[-1], first=True)
  idx = text.rfind(COT_ANSWER_PREFIX)
  if idx >= 0:
    tail = text[idx + len(COT_ANSWER_PREFIX):]
    sentence = _SENTENCE_END.split(tail, maxsplit=1)[0]
    found = normalize_number(sentence) or normalize_number(tail, first=True)
    if found:
      return found
  return normalize_number(text)


def number_accuracy(targets, predictions):
  """Exact match of the final numbers, in percent (a prediction with none scores 0)."""
  if not targets:
    return {"accuracy": 0.0}
  hits = sum(bool(p) and t == p for t, p in zip(targets, predictions))
  return {"accuracy": 100.0 * hits / len(targets)}


def score_number(text, **_):
  """What is scored of a target or a generation: its final number (a postprocess_fn)."""
  return final_number(text)
