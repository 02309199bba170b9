"""Registers flanjax's collections as seqio Tasks and Mixtures.

Registration is an explicit call with the vocabulary to use, never a side
effect of importing a module: the same task can be rebuilt for another
vocabulary (say, a pretrained checkpoint's) by calling again.
"""

from __future__ import annotations

import functools

import gin
import seqio
import tensorflow as tf

from flanjax.data import templates
from flanjax.data.collections import builtin

BUILTIN_PREFIX = "builtin_"
BUILTIN_MIXTURE = "flanjax_builtin"
EVAL_SPLITS = ("validation", "heldout_templates")


def _answer_accuracy(targets, predictions):
  """Exact match of the extracted answers, in percent."""
  if not targets:
    return {"accuracy": 0.0}
  hits = sum(templates.extract_answer(t) == templates.extract_answer(p)
             for t, p in zip(targets, predictions))
  return {"accuracy": 100.0 * hits / len(targets)}


def _builtin_dataset_fn(split, shuffle_files, seed=None, *, family):
  del shuffle_files, seed  # the split is one in-memory shard; seqio shuffles it
  records = builtin.rendered_examples(family, split)
  return tf.data.Dataset.from_tensor_slices({
      "inputs": [r["inputs"] for r in records],
      "targets": [r["targets"] for r in records],
      "answer": [r["answer"] for r in records],
  })


def _replace(name: str, registry) -> None:
  if name in registry.names():
    registry.remove(name)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }


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
        output_features=output_features(vocabulary),
        postprocess_fn=lambda text, **_: templates.extract_answer(text),
        metric_fns=[_answer_accuracy],
    )
    names.append(name)
  _replace(BUILTIN_MIXTURE, seqio.MixtureRegistry)
  # Examples-proportional; every family has the same train size.
  seqio.MixtureRegistry.add(BUILTIN_MIXTURE, [(n, 1.0) for n in names])
  return names


def list_tasks() -> list[str]:
  """Names of every registered seqio Task."""
  return sorted(seqio.TaskRegistry.names())


def get_task_or_mixture(name: str):
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    raise ValueError(
        f"unknown task or mixture {name!r}; registered names: {', '.join(known)}"
    ) from None
