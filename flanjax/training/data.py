"""The training data as one object: a registered mixture -> packed batches, resumable."""

from __future__ import annotations

import dataclasses
import time
from typing import Mapping

import jax
import numpy as np

from flanjax.data import packing, pipeline
from flanjax.models import kinds as kinds_lib


@dataclasses.dataclass
class TrainData:
  """Packed (or padded) batches of `mixture` laid out for `kind`, this host's rows.

  The stream is deterministic for a seed, so a resumed run skips to its saved
  position and sees the batches an uninterrupted run would have.
  """
  mixture: str
  lengths: Mapping[str, int]
  batch_size: int
  seed: int = 0
  pack: bool = True
  kind: kinds_lib.ModelKind = kinds_lib.ENC_DEC

  def __post_init__(self):
    self.kind = kinds_lib.get(self.kind)
    self.lengths = dict(self.lengths)
    self.stats = packing.PackingStats()
    # Each row counts its examples per task, so a bad batch names its tasks.
    self.task_names = pipeline.task_names(self.mixture, "train")
    self._eval_cache: dict = {}
    # The time the training loop waited for its batches (packer and tf.data run ahead
    # in tf.data's prefetch; a wait here is time the step did not run).
    self.wait_seconds, self.first_wait_seconds, self.batches_taken = 0.0, 0.0, 0

  @property
  def row_lengths(self) -> tuple[int, ...]:
    """Positions of a row per packing dimension ((encoder, decoder) or (decoder,))."""
    return packing.row_lengths(
        pipeline.with_virtual_tokens(self.lengths, len(self.kind.virtual_tokens)),
        self.kind.packing_kind)

  @property
  def row_length(self) -> int:
    """Positions per row: inputs + targets either way (a prefix-LM row holds both)."""
    return sum(self.row_lengths)

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.row_length

  def _dataset(self):
    return pipeline.get_dataset(self.mixture, self.lengths, "train", self.batch_size, self.seed,
                                self.pack, stats=self.stats, kind=self.kind.packing_kind,
                                with_tasks=True,
                                virtual_tokens=self.kind.virtual_tokens)

  def stream(self, position: int = 0) -> pipeline.BatchStream:
    return pipeline.BatchStream(self._dataset, position)

  def take(self, stream) -> tuple[dict, dict, float]:
    """(batch, its examples per task, real tokens over all hosts) of the next batch.

    StopIteration when a finite mixture ends."""
    t0 = time.perf_counter()
    batch = next(stream)
    waited = time.perf_counter() - t0
    if self.batches_taken:
      self.wait_seconds += waited
    else:  # the pipeline's start (reading the cache, filling the shuffle buffer)
      self.first_wait_seconds = waited
    self.batches_taken += 1
    tasks_in_batch = pipeline.batch_tasks(batch, self.task_names)  # this host's rows
    batch.pop(pipeline.TASK_COUNTS, None)
    real = float(pipeline.real_tokens(batch)) * jax.process_count()
    return batch, tasks_in_batch, real

  def eval_batches(self, task: str, split: str, max_batches: int) -> list[dict]:
    """The first `max_batches` batches of a task's split, packed as training packs, in order.

    Drawn once and kept (the same batches at every evaluation; the training
    stream is another pipeline and never sees them). A short last batch is
    filled with rows without loss weight, so it shards evenly; in a
    multi-process run every host gives exactly `max_batches` (empty ones if its
    share ran out), so all take the same number of steps.
    """
    key = (task, split, max_batches)
    if key not in self._eval_cache:
      ds = pipeline.get_dataset(task, self.lengths, split, self.batch_size, self.seed,
                                self.pack, shuffle=False, num_epochs=1,
                                kind=self.kind.packing_kind,
                                virtual_tokens=self.kind.virtual_tokens)
      rows = self.batch_size // jax.process_count()
      empty = {k: np.zeros((rows,) + tuple(v.shape[1:]), v.dtype.as_numpy_dtype)
               for k, v in ds.element_spec.items()}
      batches = [{k: np.concatenate([v, empty[k][:rows - len(v)]]) for k, v in b.items()}
                 for b in ds.take(max_batches).as_numpy_iterator()]
      if jax.process_count() > 1:
        batches += [empty] * (max_batches - len(batches))
      self._eval_cache[key] = batches
    return self._eval_cache[key]

  def packing_summary(self) -> dict:
    """Fill of every row the packer built (a few batches run ahead in prefetch)."""
    st = self.stats
    out = {"non_padding_share": round(st.share(), 4)}
    for key, feature in (("encoder_share", "encoder_input_tokens"),
                         ("decoder_share", "decoder_target_tokens")):
      if feature in st.positions:  # a prefix-LM row is all decoder
        out[key] = round(st.share(feature), 4)
    out["mask_violations"] = st.violations
    out["data_first_batch_seconds"] = round(self.first_wait_seconds, 3)
    out["data_wait_seconds"] = round(self.wait_seconds, 3)  # after the first batch
    out["data_wait_ms_per_batch"] = round(
        1e3 * self.wait_seconds / max(self.batches_taken - 1, 1), 3)
    return out
