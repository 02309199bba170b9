"""Mixture -> packed, loss-masked numpy batches, one shard per host, resumable.

The position in the stream is the number of batches consumed: the stream is
deterministic for a seed, so a resumed run skips exactly that many batches and
then sees the same batches an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Iterator, Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from flanjax.data import packing, registry

ENC_DEC_FEATURES = (
    "encoder_input_tokens", "encoder_segment_ids", "encoder_positions",
    "decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights",
    "decoder_segment_ids", "decoder_positions")


@dataclasses.dataclass
class LengthReport:
  """How many examples did not fit the feature lengths (and were truncated)."""
  examples: int = 0
  truncated: dict = dataclasses.field(default_factory=dict)  # feature -> count
  longest: dict = dataclasses.field(default_factory=dict)  # feature -> tokens

  def summary(self, lengths: Mapping[str, int]) -> str:
    parts = []
    for k, n in sorted(self.truncated.items()):
      parts.append(f"{k}: {n} of {self.examples} longer than {lengths[k]} tokens "
                   f"(longest {self.longest.get(k)}), truncated")
    return "; ".join(parts) if parts else (
        f"all {self.examples} examples fit {dict(lengths)}")


def length_report(name: str, split: str, lengths: Mapping[str, int],
                  max_examples: int | None = None) -> LengthReport:
  """Counts examples longer than the feature lengths (EOS included)."""
  task_or_mix = registry.get_task_or_mixture(name)
  tasks = getattr(task_or_mix, "tasks", [task_or_mix])
  rep = LengthReport()
  from flanjax.data import tasks as task_lib  # pylint: disable=g-import-not-at-top
  for task in tasks:
    if split not in task.splits:
      continue
    if task.name in task_lib.DEFS:  # token lengths are in the cache: no pass over the data
      defn, vocab = task_lib.DEFS[task.name]
      tok = task_lib.tokenized_split(defn, split, vocab)
      for k in lengths:
        if k not in task.output_features:
          continue
        n = tok.lengths(k)[:max_examples] + 1  # EOS
        if not len(n):
          continue
        rep.longest[k] = max(rep.longest.get(k, 0), int(n.max()))
        over = int((n > lengths[k]).sum())
        if over:
          rep.truncated[k] = rep.truncated.get(k, 0) + over
      rep.examples += len(tok.texts[:max_examples])
      continue
    ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1,
                          use_cached=False)
    if max_examples:
      ds = ds.take(max_examples)
    feats = [k for k in lengths if k in task.output_features]
    ds = ds.map(lambda ex: {k: tf.size(ex[k]) for k in feats},
                num_parallel_calls=tf.data.AUTOTUNE)
    for ex in ds.as_numpy_iterator():
      rep.examples += 1
      for k in feats:
        n = int(ex[k])
        rep.longest[k] = max(rep.longest.get(k, 0), n)
        if n > lengths[k]:
          rep.truncated[k] = rep.truncated.get(k, 0) + 1
  return rep


def shard_info() -> seqio.ShardInfo:
  return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())


def get_dataset(name: str, lengths: Mapping[str, int], split: str = "train",
                batch_size: int = 16, seed: int = 0, pack: bool = True,
                shuffle: bool = True, num_epochs: int | None = None,
                shard: seqio.ShardInfo | None = None,
                stats: packing.PackingStats | None = None,
                kind: str = "enc_dec") -> tf.data.Dataset:
  """Packed (or padded) batches of this host's share of the batch.

  kind: 'enc_dec' (T5's features), 'prefix_lm' (a decoder-only model: each
  example is its inputs then its targets in one row of inputs + targets
  positions, loss on the targets only) or 'decoder' (targets only).
  """
  task_or_mix = registry.get_task_or_mixture(name)
  shard = shard or shard_info()
  if batch_size % shard.num_shards:
    raise ValueError(f"batch size {batch_size} does not divide over {shard.num_shards} hosts")
  ds = task_or_mix.get_dataset(
      dict(lengths), split=split, shuffle=shuffle, seed=seed, num_epochs=num_epochs,
      shard_info=shard, use_cached=False)
  # Our best-fit packer: seqio's feature names and per-example values, fewer
  # padding positions; `stats` counts fill and loss-mask violations.
  # EOS only matters for the stats' check that each example ends in a weighted EOS.
  eos_id = task_or_mix.output_features["targets"].vocabulary.eos_id
  ds = packing.pack_dataset(ds, lengths, kind=kind, pack=pack, stats=stats,
                            eos_id=packing.EOS_ID if eos_id is None else eos_id)
  ds = ds.batch(batch_size // shard.num_shards, drop_remainder=num_epochs is None)
  return ds.prefetch(tf.data.AUTOTUNE)


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
