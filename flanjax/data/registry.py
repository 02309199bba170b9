"""Registers flanjax's collections as seqio Tasks and Mixtures.

Registration is an explicit call with the vocabulary to use, never a side
effect of importing a module: the same task can be rebuilt for another
vocabulary (say, a pretrained checkpoint's) by calling again.
"""

from __future__ import annotations

import functools
from typing import Mapping, Sequence

import gin
import seqio
import tensorflow as tf

from flanjax.data import templates
from flanjax.data import mixtures as mix_lib
from flanjax.data import tasks as task_lib
# Imported here so their gin configurables exist before any config is parsed.
from flanjax.data import sources  # noqa: F401  pylint: disable=unused-import
from flanjax.data.collections import (
    bbh, builtin, flan_cot, gsm8k, self_instruct, tfds_tasks, user)
from flanjax.errors import UserError

BUILTIN_PREFIX = "builtin_"
BUILTIN_MIXTURE = "flanjax_builtin"
EVAL_SPLITS = ("validation", "heldout_templates")


def _builtin_dataset_fn(split, shuffle_files, seed=None, *, family):
  del shuffle_files, seed  # the split is one in-memory shard; seqio shuffles it
  records = builtin.rendered_examples(family, split)
  return tf.data.Dataset.from_tensor_slices({
      "inputs": [r["inputs"] for r in records],
      "targets": [r["targets"] for r in records],
      "answer": [r["answer"] for r in records],
      "task": [BUILTIN_PREFIX + family] * len(records),
  })


def _replace(name: str, registry) -> None:
  if name in registry.names():
    registry.remove(name)


@gin.configurable
def register_builtin(vocabulary: seqio.Vocabulary) -> list[str]:
  """Registers every built-in family as a Task and the default Mixture."""
  names = []
  for fam in builtin.FAMILIES:
    name = BUILTIN_PREFIX + fam.name
    _replace(name, seqio.TaskRegistry)
    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            functools.partial(_builtin_dataset_fn, family=fam.name),
            splits=list(builtin.SPLIT_SIZES),
            num_input_examples=dict(builtin.SPLIT_SIZES)),
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
# FLAN caps each task's examples when computing rates so big sets do not drown small ones.
FLAN_COT_CAP = 5000


@gin.configurable
def register_all(vocabulary: seqio.Vocabulary,
                 mixtures: Sequence[Mapping] = ()) -> list[str]:
  """Registers every collection as seqio Tasks, the named mixtures, and the user's.

  Nothing is read here: a task loads its files the first time it is used, so
  registering collections whose data is absent costs nothing and fails only
  if the task is used (with a message naming the missing path).

  `mixtures` (gin) adds the user's own, one dict each: {'name', 'tasks': [names
  or (name, rate)], 'maximum', 'temperature'} for examples-proportional, or
  {'name', 'blend': [(submixture or task, share), ...]} for a FLAN 2022-style blend.
  """
  names = register_builtin(vocabulary)
  defs = flan_cot.task_defs() + gsm8k.task_defs() + self_instruct.task_defs()
  defs += bbh.task_defs() + tfds_tasks.task_defs()
  user_defs, user_mixtures = user.user_data()
  taken = {d.name for d in defs} | set(names)
  for d in user_defs:
    if d.name in taken:
      raise UserError(f"user task name {d.name!r} is already taken by a built-in task; rename it")
  for d in defs + user_defs:
    names.append(task_lib.register(d, vocabulary))
  mix_lib.add_mixture(FLAN_COT_MIXTURE, [d.name for d in flan_cot.task_defs()],
                      maximum=FLAN_COT_CAP)
  # FLAN 2021 capped each training set at 30k examples.
  mix_lib.add_mixture(TFDS_MIXTURE, [d.name for d in tfds_tasks.task_defs()], maximum=30_000)
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
