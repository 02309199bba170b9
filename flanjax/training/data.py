"""The training data as one object: a registered mixture -> packed batches, resumable."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping

import jax

from flanjax.data import packing, pipeline, registry
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

  @property
  def row_length(self) -> int:
    """Positions per row: inputs + targets either way (a prefix-LM row holds both)."""
    return sum(packing.row_lengths(self.lengths, self.kind.packing_kind))

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.row_length

  def _dataset(self):
    return pipeline.get_dataset(self.mixture, self.lengths, "train", self.batch_size, self.seed,
                                self.pack, stats=self.stats, kind=self.kind.packing_kind,
                                with_tasks=True)

  def stream(self, position: int = 0) -> pipeline.BatchStream:
    return pipeline.BatchStream(self._dataset, position)

  def take(self, stream) -> tuple[dict, dict, float]:
    """(batch, its examples per task, real tokens over all hosts) of the next batch.

    StopIteration when a finite mixture ends."""
    batch = next(stream)
    tasks_in_batch = pipeline.batch_tasks(batch, self.task_names)  # this host's rows
    batch.pop(pipeline.TASK_COUNTS, None)
    real = float(pipeline.real_tokens(batch)) * jax.process_count()
    return batch, tasks_in_batch, real

  def validation_batches(self, per_task: int) -> Iterator[dict]:
    """The first `per_task` batches of each task's validation split (full batches only)."""
    task_or_mix = registry.get_task_or_mixture(self.mixture)
    for task in getattr(task_or_mix, "tasks", [task_or_mix]):
      if "validation" not in task.splits:
        continue
      ds = pipeline.get_dataset(task.name, self.lengths, "validation", self.batch_size,
                                self.seed, self.pack, shuffle=False, num_epochs=1,
                                kind=self.kind.packing_kind)
      for batch in ds.take(per_task).as_numpy_iterator():
        if batch["decoder_target_tokens"].shape[0] * jax.process_count() == self.batch_size:
          yield batch  # a short last batch would not shard evenly

  def packing_summary(self) -> dict:
    """Fill of every row the packer built (a few batches run ahead in prefetch)."""
    st = self.stats
    out = {"non_padding_share": round(st.share(), 4)}
    for key, feature in (("encoder_share", "encoder_input_tokens"),
                         ("decoder_share", "decoder_target_tokens")):
      if feature in st.positions:  # a prefix-LM row is all decoder
        out[key] = round(st.share(feature), 4)
    out["mask_violations"] = st.violations
    return out
