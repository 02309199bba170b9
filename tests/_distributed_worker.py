"""flanjax.train with its batches recorded, or replayed (used by tests/test_distributed.py).

    python tests/_distributed_worker.py RECORD_DIR [REPLAY_DIR ...] -- [flanjax.train args]

`pipeline.BatchStream.__next__`, the iterator of this process's rows of each
batch, is wrapped:
  * every batch it hands to the trainer is saved whole to RECORD_DIR/<position>.npz
    (position: batches taken so far, 1 for the first), before the batch is used, so a
    process that fails (as_command ends it with os._exit) still leaves what it loaded;
  * with REPLAY_DIRs, the batch is not read from the pipeline but is the
    concatenation, row-wise and in the order given, of REPLAY_DIR/<position>.npz: a
    one-process run fed exactly the global batch several processes loaded between
    them. A position missing from any REPLAY_DIR ends the data (StopIteration).
"""

import os
import sys

import numpy as np


def main() -> None:
  split = sys.argv.index("--")
  record_dir, replay_dirs = sys.argv[1], sys.argv[2:split]
  argv = sys.argv[split + 1:]
  from flanjax import config, train  # pylint: disable=g-import-not-at-top
  from flanjax.data import pipeline  # pylint: disable=g-import-not-at-top

  os.makedirs(record_dir, exist_ok=True)
  original = pipeline.BatchStream.__next__

  def replayed(self):
    paths = [os.path.join(d, f"{self.position + 1}.npz") for d in replay_dirs]
    if not all(os.path.exists(p) for p in paths):
      raise StopIteration
    parts = []
    for p in paths:
      with np.load(p) as f:
        parts.append({k: f[k] for k in f.files})
    self.position += 1
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}

  def recording_next(self):
    batch = replayed(self) if replay_dirs else original(self)
    path = os.path.join(record_dir, f"{self.position}.npz")
    np.savez(f"{path}.tmp.npz", **batch)
    os.replace(f"{path}.tmp.npz", path)
    return batch

  pipeline.BatchStream.__next__ = recording_next
  config.as_command(train.main, argv)


if __name__ == "__main__":
  main()
