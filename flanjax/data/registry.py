"""Registers flanjax's collections as seqio Tasks and Mixtures.

Registration is an explicit call with the vocabulary and the input length to
use, never a side effect of importing a module: the same task can be rebuilt
for another vocabulary (say, a pretrained checkpoint's) or length by calling
again. A register function (``train.register_fns``, ``evaluate.register_fns``)
is called as ``fn(vocabulary, input_length=N)``; see ``call_register_fns``.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Callable, Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from flanjax import config as flan_config
from flanjax.data import templates
from flanjax.data import mixtures as mix_lib
from flanjax.data import tasks as task_lib
# Imported here so their gin configurables exist before any config is parsed.
from flanjax.data import sources  # noqa: F401  pylint: disable=unused-import
from flanjax.data.collections import (
    bbh, builtin, flan_cot, gsm8k, mmlu, self_instruct, tfds_tasks, user)
from flanjax.errors import UserError

BUILTIN_PREFIX = builtin.TASK_PREFIX
BUILTIN_MIXTURE = "flanjax_builtin"
EVAL_SPLITS = ("validation", "heldout_templates")


def _builtin_records(family: str, split: str, modes) -> tuple[dict, ...]:
  return builtin.rendered_examples(family, split, modes[0] if split == "train" else modes[1])


def _builtin_dataset_fn(split, shuffle_files, seed=None, *, family, modes):
  del shuffle_files, seed  # the split is one in-memory shard; seqio shuffles it
  records = _builtin_records(family, split, modes)
  return tf.data.Dataset.from_tensor_slices({
      "inputs": [r["inputs"] for r in records],
      "targets": [r["targets"] for r in records],
      "answer": [r["answer"] for r in records],
      # JSON, as flanjax's other tasks carry them: rank classification's candidates, also
      # for prompts that list them without a header (the no_template and dataset_name modes).
      "options": [json.dumps(r["options"], ensure_ascii=False) for r in records],
      "task": [BUILTIN_PREFIX + family] * len(records),
  })


class _BuiltinSource(seqio.FunctionDataSource):
  """A built-in family's splits, rendered in memory: their text is read without tf.data."""

  def __init__(self, family: str, modes: tuple[str, str]):
    super().__init__(functools.partial(_builtin_dataset_fn, family=family, modes=modes),
                     splits=list(builtin.SPLIT_SIZES),
                     num_input_examples=dict(builtin.SPLIT_SIZES))
    self._family, self._modes = family, modes

  def pretokenized_texts(self, split: str) -> list[dict]:
    """Each example's text in source order, as seqio's tokenize keeps it (*_pretokenized)."""
    return [{"inputs_pretokenized": r["inputs"], "targets_pretokenized": r["targets"]}
            for r in _builtin_records(self._family, split, self._modes)]


def _replace(name: str, registry) -> None:
  if name in registry.names():
    registry.remove(name)


@gin.configurable
def register_builtin(vocabulary: seqio.Vocabulary, input_length: int | None = None,
                     modes: tuple[str, str] | None = None) -> list[str]:
  """Registers every built-in family as a Task and the default Mixture.

  input_length is accepted for the register-function signature and unused:
  built-in prompts are rendered without an input budget. modes: (training,
  evaluation) template modes, default gin's templates.template_mode.
  """
  del input_length
  modes = tuple(modes) if modes is not None else templates.template_mode()
  names = []
  for fam in builtin.FAMILIES:
    name = BUILTIN_PREFIX + fam.name
    _replace(name, seqio.TaskRegistry)
    seqio.TaskRegistry.add(
        name,
        source=_BuiltinSource(fam.name, modes),
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=task_lib.output_features(vocabulary),
        postprocess_fn=lambda text, **_: templates.extract_answer(text),
        metric_fns=[task_lib.answer_accuracy],
    )
    names.append(name)
  _replace(BUILTIN_MIXTURE, seqio.MixtureRegistry)
  # Examples-proportional; every family has the same train size.
  seqio.MixtureRegistry.add(BUILTIN_MIXTURE, [(n, 1.0) for n in names])
  return names


FLAN_COT_MIXTURE = "flan_cot"
BLEND = "flanjax_blend"
TFDS_MIXTURE = "flan2021_tfds"
MMLU_MIXTURE = "mmlu"
MMLU_0SHOT_MIXTURE = "mmlu_0shot"
# FLAN caps each task's examples when computing rates so big sets do not drown small ones.
FLAN_COT_CAP = 5000


@gin.configurable
def register_all(vocabulary: seqio.Vocabulary, mixtures: Sequence[Mapping] = (),
                 input_length: int = task_lib.DEFAULT_INPUT_LENGTH) -> list[str]:
  """Registers every collection as seqio Tasks, the named mixtures, and the user's.

  Nothing is read here: a task loads its files the first time it is used, so
  registering collections whose data is absent costs nothing and fails only
  if the task is used (with a message naming the missing path).

  input_length: the input feature length the tasks' examples are made for
  (few-shot prompts drop exemplars until they fit it); part of each task's
  registration and of its cache key.

  `mixtures` (gin) adds the user's own, one dict each: {'name', 'tasks': [names
  or (name, rate)], 'maximum', 'temperature'} for examples-proportional, or
  {'name', 'blend': [(submixture or task, share), ...]} for a FLAN 2022-style blend.

  Every templated task (the built-in families and the TaskDefs with templates)
  renders in gin's template mode (templates.template_mode: instructions,
  no_template or dataset_name; its eval_mode for the evaluation splits).
  """
  modes = templates.template_mode()
  names = register_builtin(vocabulary, modes=modes)
  defs = flan_cot.task_defs() + gsm8k.task_defs() + self_instruct.task_defs()
  defs += bbh.task_defs() + mmlu.task_defs() + tfds_tasks.task_defs()
  user_defs, user_mixtures = user.user_data()
  taken = {d.name for d in defs} | set(names)
  for d in user_defs:
    if d.name in taken:
      raise UserError(f"user task name {d.name!r} is already taken by a built-in task; rename it")
  for d in defs + user_defs:
    names.append(task_lib.register(d, vocabulary, input_length, modes=modes))
  mix_lib.add_mixture(FLAN_COT_MIXTURE, [d.name for d in flan_cot.task_defs()],
                      maximum=FLAN_COT_CAP)
  # FLAN 2021 capped each training set at 30k examples.
  mix_lib.add_mixture(TFDS_MIXTURE, [d.name for d in tfds_tasks.task_defs()], maximum=30_000)
  # Evaluation-only: `--tasks=mmlu` names the 57 subjects (5-shot), mmlu_0shot the zero-shot ones.
  for mixture, members in ((MMLU_MIXTURE, mmlu.FIVE_SHOT_TASKS),
                           (MMLU_0SHOT_MIXTURE, mmlu.ZERO_SHOT_TASKS)):
    mix_lib.add_mixture(mixture, [(t, 1.0) for t in members], training=False)
  mix_lib.add_blend(BLEND, [(FLAN_COT_MIXTURE, 0.5), (BUILTIN_MIXTURE, 0.3),
                            ("gsm8k", 0.15), ("self_instruct_seed", 0.05)])
  for name, members in user_mixtures.items():
    mix_lib.add_mixture(name, members)
  for spec in mixtures:
    spec = dict(spec)
    if "name" not in spec or ("tasks" in spec) == ("blend" in spec):
      raise UserError(f"register_all.mixtures entry {spec}: needs 'name' and one of "
                      "'tasks' or 'blend'")
    if "blend" in spec:
      mix_lib.add_blend(spec["name"], [tuple(p) for p in spec["blend"]])
    else:
      mix_lib.add_mixture(spec["name"], [t if isinstance(t, str) else tuple(t) for t in spec["tasks"]],
                          maximum=spec.get("maximum"), temperature=spec.get("temperature", 1.0))
  return names


# The gin bindings that define a run's own tasks and mixtures: a training run records them
# (run_info.json "data"), so evaluating its checkpoint needs no copy of its gin.
DATA_BINDINGS = ("user_data.tasks", "user_data.prompt_format", "user_data.chat_template",
                 "register_all.mixtures", "bad_records.policy")


def _absolute(spec):
  """A user task spec with its paths made absolute (the record is read from anywhere)."""
  if not isinstance(spec, Mapping):
    return spec
  return {k: (os.path.abspath(v) if k in ("path", "validation_path") and isinstance(v, str)
              else v) for k, v in spec.items()}


def data_record() -> dict:
  """The DATA_BINDINGS gin binds now, as JSON values (paths absolute); those that are
  unbound, empty or not JSON are left out."""
  out = {}
  for selector in DATA_BINDINGS:
    value = flan_config.bound_value(selector, deep=True)
    if value is None or value == () or value == []:
      continue
    if selector == "user_data.tasks":
      value = [_absolute(s) for s in value]
    elif selector == "user_data.chat_template" and os.path.exists(str(value)):
      value = os.path.abspath(value)
    try:
      out[selector] = json.loads(json.dumps(value))
    except (TypeError, ValueError):
      continue  # a gin reference or an object: not something a record can restore
  return out


def bind_recorded_data(record: Mapping) -> list[str]:
  """Binds a run's recorded DATA_BINDINGS that gin leaves unbound now, and registers the
  tasks again if they were registered already. Returns the selectors bound. Tasks and
  mixtures of the command's own (its gin binds either) win: then none is bound, as the
  recorded mixtures name the recorded tasks."""
  if any(flan_config.bound_value(sel) for sel in ("user_data.tasks", "register_all.mixtures")):
    return []
  bound = [sel for sel in DATA_BINDINGS
           if sel in record and flan_config.bound_value(sel) is None]
  if not bound:
    return []
  with gin.unlock_config():
    for sel in bound:
      gin.bind_parameter(sel, record[sel])
  if task_lib.DEFS:
    register_all(seqio.ByteVocabulary())  # names only; evaluation registers with its vocab
  return bound


def _takes_input_length(fn: Callable) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):  # no signature to read (a builtin): called the old way
    return False
  return any(p.name == "input_length" or p.kind is p.VAR_KEYWORD for p in params)


def _fn_name(fn) -> str:
  fn = getattr(fn, "func", fn)  # functools.partial
  return getattr(fn, "__qualname__", None) or repr(fn)


def call_register_fns(register_fns: Sequence[Callable], vocabulary: seqio.Vocabulary,
                      input_length: int) -> None:
  """Calls each register function as ``fn(vocabulary, input_length=input_length)``.

  A function written for the older ``fn(vocabulary)`` is called that way; if it
  registered flanjax tasks (tasks.register) for another input length than
  `input_length`, that is a UserError naming the fix.
  """
  input_length = task_lib.check_input_length(input_length)
  for fn in register_fns:
    if _takes_input_length(fn):
      fn(vocabulary, input_length=input_length)
      continue
    before = dict(task_lib.DEFS)
    fn(vocabulary)
    stale = sorted(n for n, reg in task_lib.DEFS.items()
                   if before.get(n) is not reg and reg.input_length != input_length)
    if stale:
      more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
      raise UserError(
          f"register function {_fn_name(fn)} registered {stale[0]}{more} for "
          f"{task_lib.DEFS[stale[0]].input_length} input tokens, not this run's {input_length}: "
          "register functions are called as fn(vocabulary, input_length=N); add that "
          "parameter and pass it on to tasks.register(defn, vocabulary, input_length)")


def list_tasks() -> list[str]:
  """Names of every registered seqio Task.

  If flanjax's collections are not registered yet, registers them first (with
  a byte vocabulary, which needs no files), so the names can be listed anywhere.
  """
  if not task_lib.DEFS:
    register_all(seqio.ByteVocabulary())
  return sorted(seqio.TaskRegistry.names())


def list_mixtures() -> list[str]:
  list_tasks()
  return sorted(seqio.MixtureRegistry.names())


def get_task_or_mixture(name: str):
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    raise UserError(mix_lib.unknown_name(name)) from None
