"""Mixture -> packed, loss-masked numpy batches, one shard per host, resumable.

The position in the stream is the number of batches consumed: the stream is
deterministic for a seed, so a resumed run skips exactly that many batches and
then sees the same batches an uninterrupted run would.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
import seqio
import tensorflow as tf

from flanjax.data import packing, registry
from flanjax.data import tasks as task_lib
from flanjax.errors import UserError

ENC_DEC_FEATURES = (
    "encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
    "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
    "decoder_segment_ids", "decoder_positions")


def check_lengths(lengths: Mapping[str, int], kind: str = "enc_dec") -> dict[str, int]:
  """task_feature_lengths as {feature: positive int}; anything else is a UserError."""
  need = packing.input_features(kind)
  if not isinstance(lengths, Mapping):
    raise UserError(f"train.task_feature_lengths must be a dict like {{'inputs': 256, "
                    f"'targets': 64}}, not {lengths!r}")
  missing = [k for k in need if k not in lengths]
  if missing:
    raise UserError(f"train.task_feature_lengths {dict(lengths)} has no {', '.join(missing)}; "
                    f"give {' and '.join(need)}, e.g. {{'inputs': 256, 'targets': 64}}")
  out = {}
  for k, v in lengths.items():
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise UserError(f"train.task_feature_lengths[{k!r}] = {v!r}: a length is a number of "
                      "tokens, a whole number of at least 1")
    out[k] = v
  return out


@dataclasses.dataclass
class LengthReport:
  """How many examples did not fit the feature lengths (and were truncated)."""
  examples: int = 0
  truncated: dict = dataclasses.field(default_factory=dict)  # feature -> count
  longest: dict = dataclasses.field(default_factory=dict)  # feature -> tokens
  shortest: dict = dataclasses.field(default_factory=dict)  # feature -> tokens
  p90: dict = dataclasses.field(default_factory=dict)  # feature -> 90th percentile

  def fits_none(self, lengths: Mapping[str, int]) -> list[str]:
    """Features whose length is below every example's: nothing would be seen whole."""
    return [k for k in sorted(self.shortest) if self.shortest[k] > lengths[k]]

  def check_some_fit(self, lengths: Mapping[str, int], name: str) -> None:
    """Raises a UserError naming the feature when no example fits it at all."""
    bad = self.fits_none(lengths)
    if not bad:
      return
    suggest = dict(lengths)
    for k in bad:
      suggest[k] = int(math.ceil(self.p90[k] / 16) * 16)  # 90% of examples fit
    parts = [f"{k}={lengths[k]} is shorter than every example (shortest {self.shortest[k]}, "
             f"longest {self.longest[k]} tokens with EOS)" for k in bad]
    raise UserError(f"{name!r}: train.task_feature_lengths {'; '.join(parts)}, so every "
                    "example would be truncated; raise it, e.g. "
                    f"--gin.train.task_feature_lengths=\"{suggest}\"")

  def summary(self, lengths: Mapping[str, int]) -> str:
    parts = []
    for k, n in sorted(self.truncated.items()):
      parts.append(f"{k}: {n} of {self.examples} longer than {lengths[k]} tokens "
                   f"(longest {self.longest.get(k)}), truncated")
    return "; ".join(parts) if parts else (
        f"all {self.examples} examples fit {dict(lengths)}")


# Neither changes an example's text nor adds or drops examples.
_TEXT_KEEPING = (seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim,
                 task_lib.keep_target_end)


def texts_in_memory(task: seqio.Task, split: str,
                    max_examples: int | None = None) -> list[dict] | None:
  """The {'inputs_pretokenized', 'targets_pretokenized'} texts of a task's split in the
  order its unshuffled dataset gives them, read from memory where flanjax holds them (the
  built-in families, tasks registered through flanjax.data.tasks) instead of a pass through
  tf.data (seconds per task); None for any other task or preprocessing."""
  read = getattr(task.source, "pretokenized_texts", None)
  if read is None or not all(getattr(p, "func", p) in _TEXT_KEEPING for p in task.preprocessors):
    return None
  texts = read(split)
  return list(texts[:max_examples] if max_examples else texts)


def _lengths_by_encoding(task, split: str, feats: list[str],
                         max_examples: int | None) -> tuple[int, dict] | None:
  """(examples, {feature: token lengths, EOS included}) of a task that only tokenizes its
  source's text and appends EOS (the built-in families), by encoding the text in Python;
  None for any other task."""
  if list(task.preprocessors) != [seqio.preprocessors.tokenize,
                                  seqio.preprocessors.append_eos_after_trim] or task.source is None:
    return None
  texts, count = collections.defaultdict(list), 0
  held = texts_in_memory(task, split, max_examples)
  if held is not None:
    count = len(held)
    for k in feats:
      texts[k] = [t[f"{k}_pretokenized"] for t in held]
  else:
    ds = task.source.get_dataset(split=split, shuffle=False)
    if max_examples:
      ds = ds.take(max_examples)
    for ex in ds.as_numpy_iterator():
      count += 1
      for k in feats:
        if not isinstance(ex.get(k), bytes):
          return None  # pre-tokenized or absent: the general path measures it
        texts[k].append(ex[k].decode("utf-8"))
  out = {}
  for k in feats:
    feature = task.output_features[k]
    eos = 1 if feature.add_eos else 0
    out[k] = np.asarray([len(feature.vocabulary.encode(t)) + eos for t in texts[k]], np.int64)
  return count, out


def _lengths_by_pass(task, split: str, feats: list[str], max_examples: int | None):
  """(examples, {feature: token lengths}) of any task, from its preprocessed dataset."""
  ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1, use_cached=False)
  if max_examples:
    ds = ds.take(max_examples)
  ds = ds.map(lambda ex: {k: tf.size(ex[k]) for k in feats}, num_parallel_calls=tf.data.AUTOTUNE)
  found, count = collections.defaultdict(list), 0
  for ex in ds.as_numpy_iterator():
    count += 1
    for k in feats:
      found[k].append(int(ex[k]))
  return count, {k: np.asarray(found[k], np.int64) for k in feats}


def length_report(name: str, split: str, lengths: Mapping[str, int],
                  max_examples: int | None = None) -> LengthReport:
  """Counts examples longer than the feature lengths (EOS included)."""
  task_or_mix = registry.get_task_or_mixture(name)
  tasks = getattr(task_or_mix, "tasks", [task_or_mix])
  rep = LengthReport()
  seen = collections.defaultdict(list)  # feature -> arrays of lengths
  for task in tasks:
    if split not in task.splits:
      continue
    feats = [k for k in lengths if k in task.output_features]
    if task.name in task_lib.DEFS:  # token lengths are in the cache: no pass over the data
      tok = task_lib.DEFS[task.name].tokenized(split)
      found = (len(tok.texts[:max_examples]),
               {k: tok.lengths(k)[:max_examples] + 1 for k in feats})  # + EOS
    else:  # built-in families by encoding their text: seconds less than the tf.data pass
      found = (_lengths_by_encoding(task, split, feats, max_examples)
               or _lengths_by_pass(task, split, feats, max_examples))
    rep.examples += found[0]
    for k, n in found[1].items():
      if len(n):
        seen[k].append(n)
        rep.longest[k] = max(rep.longest.get(k, 0), int(n.max()))
        over = int((n > lengths[k]).sum())
        if over:
          rep.truncated[k] = rep.truncated.get(k, 0) + over
  for k, arrays in seen.items():
    n = np.concatenate(arrays)
    rep.shortest[k] = int(n.min())
    rep.p90[k] = int(np.percentile(n, 90))
  return rep


def shard_info() -> seqio.ShardInfo:
  return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


TASK_COUNTS = "task_counts"


def task_names(name: str, split: str = "train") -> list[str] | None:
  """The leaf tasks of `name` that have `split`, in the order of a batch's task_counts.

  None if some task does not carry a "task" feature (one registered outside
  flanjax), so its rows cannot say which task they came from.
  """
  task_or_mix = registry.get_task_or_mixture(name)
  leaves = [t for t in getattr(task_or_mix, "tasks", [task_or_mix]) if split in t.splits]
  if not all(t.name in task_lib.DEFS or t.name.startswith(registry.BUILTIN_PREFIX)
             for t in leaves):
    return None
  return sorted(t.name for t in leaves)


def get_dataset(name: str, lengths: Mapping[str, int], split: str = "train",
                batch_size: int = 16, seed: int = 0, pack: bool = True,
                shuffle: bool = True, num_epochs: int | None = None,
                shard: seqio.ShardInfo | None = None,
                stats: packing.PackingStats | None = None,
                kind: str = "enc_dec", with_tasks: bool = False,
                virtual_tokens: Sequence[int] = ()) -> tf.data.Dataset:
  """Packed (or padded) batches of this host's share of the batch.

  kind: 'enc_dec' (T5's features), 'prefix_lm' (a decoder-only model: each
  example is its inputs then its targets in one row of inputs + targets
  positions, loss on the targets only), 'causal' (as prefix_lm, read left to right
  as transformers trains a causal LM: BOS + inputs + targets, no EOS between) or
  'decoder' (targets only).

  with_tasks: each row also carries `task_counts`, its number of examples from
  each task of `task_names(name, split)` (when that is not None), so a bad
  batch can be traced to its tasks. The rows themselves are the same.

  virtual_tokens: ids put before each example's inputs (prompt tuning's soft prompt) once
  the task has cut them to lengths["inputs"]; rows hold lengths["inputs"] + their number.
  """
  task_or_mix = registry.get_task_or_mixture(name)
  shard = shard or shard_info()
  if batch_size % shard.num_shards:
    raise ValueError(f"batch size {batch_size} does not divide over {shard.num_shards} hosts")
  names = task_names(name, split) if with_tasks else None
  extra = {"passthrough_features": ["task"]} if names and isinstance(task_or_mix, seqio.Mixture) \
      else {}
  ds = task_or_mix.get_dataset(
      dict(lengths), split=split, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
      shard_info=shard, use_cached=False, **extra)
  if virtual_tokens:
    ds, lengths = _with_virtual_tokens(ds, lengths, kind, virtual_tokens)
  # Our best-fit packer: seqio's feature names and per-example values, fewer
  # padding positions; `stats` counts fill and loss-mask violations.
  # EOS only matters for the stats' check that each example ends in a weighted EOS.
  eos_id = task_or_mix.output_features["targets"].vocabulary.eos_id
  eos_id = packing.EOS_ID if eos_id is None else eos_id
  # A causal row starts with BOS where the tokenizer adds one (after a soft prompt).
  bos = dict(bos_id=causal_bos(task_or_mix.output_features["targets"].vocabulary),
             virtual=len(virtual_tokens)) if kind == "causal" else {}
  if names:
    ds = _pack_with_tasks(ds, lengths, kind, pack, stats, eos_id, names, **bos)
  else:
    ds = packing.pack_dataset(ds, lengths, kind=kind, pack=pack, stats=stats, eos_id=eos_id,
                              **bos)
  ds = ds.batch(batch_size // shard.num_shards, drop_remainder=num_epochs is None)
  return ds.prefetch(tf.data.AUTOTUNE)


def with_virtual_tokens(lengths: Mapping[str, int], n: int) -> dict:
  """The row lengths that hold n virtual tokens before inputs of lengths["inputs"]."""
  return {**lengths, "inputs": int(lengths["inputs"]) + n} if n else dict(lengths)


def _with_virtual_tokens(ds, lengths, kind, ids):
  if "inputs" not in packing.input_features(kind):
    raise UserError(f"a soft prompt goes before the inputs; rows of kind {kind!r} have none")
  prefix = tf.constant(list(ids), tf.int32)
  ds = ds.map(lambda ex: {**ex, "inputs": tf.concat([tf.cast(prefix, ex["inputs"].dtype),
                                                     ex["inputs"]], 0)})
  return ds, with_virtual_tokens(lengths, len(ids))


def causal_bos(vocab) -> int | None:
  """The BOS a causal LM's text starts with: the vocabulary's, where its tokenizer adds one
  (kinds.CausalDecoder.prompt_ids reads prompts so)."""
  from flanjax.models import kinds  # pylint: disable=g-import-not-at-top
  return kinds.bos_id(vocab) if kinds.adds_bos(vocab) else None


def _pack_with_tasks(ds, lengths, kind, pack, stats, eos_id, names: Sequence[str],
                     **causal):
  """packing.pack_dataset's rows, each with its examples counted per task (TASK_COUNTS)."""
  keys = packing.input_features(kind)
  index = {n.encode(): i for i, n in enumerate(names)}
  src = ds.map(lambda ex: {**{k: ex[k] for k in keys}, "task": ex["task"]})
  signature = {k: tf.TensorSpec((n,), tf.int32)
               for k, n in packing.model_lengths(lengths, kind, pack).items()}
  signature[TASK_COUNTS] = tf.TensorSpec((len(names),), tf.int32)

  def rows():
    # record=True lists each emitted row's example indices, in emission order.
    packer = packing.Packer(lengths, kind, pack=pack, stats=stats, eos_id=eos_id, record=True,
                            **causal)
    task_of = {}  # example index -> task index, while the example waits in an open row

    def counted(out):
      for row in out:
        counts = np.zeros(len(names), np.int32)
        for i in packer.record.pop(0):
          counts[task_of.pop(i)] += 1
        row[TASK_COUNTS] = counts
        yield row

    for i, ex in enumerate(packing.numpy_examples(src)):
      task_of[i] = index[ex.pop("task")]
      yield from counted(packer.add(ex))
    yield from counted(packer.flush())

  return tf.data.Dataset.from_generator(rows, output_signature=signature)


def batch_tasks(batch: Mapping[str, np.ndarray], names: Sequence[str] | None) -> dict[str, int]:
  """Task name -> examples in a batch with TASK_COUNTS (empty without them)."""
  if not names or TASK_COUNTS not in batch:
    return {}
  total = np.asarray(batch[TASK_COUNTS]).reshape(-1, len(names)).sum(0)
  return {n: int(c) for n, c in zip(names, total) if c}


class BatchStream:
  """An iterator of numpy batches whose position can be saved and restored."""

  def __init__(self, make_dataset, position: int = 0):
    self._make = make_dataset
    self.position = 0
    self._it = None
    self.restore(position)

  def restore(self, position: int):
    ds = self._make()
    if position:
      logging.info("Data: skipping %d batches to resume", position)
      ds = ds.skip(position)
    self._it = ds.as_numpy_iterator()
    self.position = position

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    self.position += 1
    return batch


TOKEN_FEATURES = ("encoder_input_tokens", "decoder_target_tokens")


def real_tokens(batch: Mapping[str, np.ndarray]) -> int:
  """Positions that hold real (non-padding) tokens, encoder and decoder together."""
  return sum(int(np.count_nonzero(batch[k])) for k in TOKEN_FEATURES if k in batch)


def non_padding_share(batch: Mapping[str, np.ndarray]) -> float:
  """Share of positions that hold real tokens, encoder and decoder together."""
  total = sum(batch[k].size for k in TOKEN_FEATURES if k in batch)
  return real_tokens(batch) / max(total, 1)
