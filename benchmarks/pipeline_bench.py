"""The data pipeline: examples/s from raw files to packed batches.

cold: the raw files rendered through the templates and tokenized (what the
  first run of a mixture does; later runs read the result from the cache),
  timed on an empty cache.
warm: `flanjax.data.pipeline.get_dataset` (seqio mixture, shuffle, our packer,
  batching), from the cache to packed numpy batches: time to the first batch,
  then examples/s over the following batches. Examples are counted in the
  batches themselves (segments per row).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from benchmarks import common


def _examples_in(batch: dict) -> int:
  seg = batch["decoder_segment_ids"]
  return int(seg.max(axis=1).sum())


def run(mixture: str, lengths: dict, batch_size: int, batches: int, vocab_size: int,
        cold: bool, seed: int, kind: str, log, windows: int = 5) -> dict:
  from flanjax.data import pipeline, registry, tasks, vocab  # pylint: disable=g-import-not-at-top
  voc = vocab.corpus_vocabulary(mixture, vocab_size=vocab_size)
  registry.register_all(voc, input_length=lengths["inputs"])
  mix = registry.get_task_or_mixture(mixture)
  out = {"mixture": mixture, "batch_rows": batch_size, "kind": kind}
  if cold:
    old = os.environ.get("FLANJAX_CACHE")
    tmp = tempfile.mkdtemp(prefix="flanjax-bench-cache-")
    os.environ["FLANJAX_CACHE"] = tmp
    try:
      t0 = time.perf_counter()
      n = 0
      for task in getattr(mix, "tasks", [mix]):
        if task.name not in tasks.DEFS:
          continue
        n += len(tasks.DEFS[task.name].tokenized("train").texts)
      secs = time.perf_counter() - t0
    finally:
      if old is None:
        os.environ.pop("FLANJAX_CACHE", None)
      else:
        os.environ["FLANJAX_CACHE"] = old
      shutil.rmtree(tmp, ignore_errors=True)
    out["cold"] = {"examples": n, "seconds": round(secs, 2),
                   "examples_per_s": round(n / max(secs, 1e-9), 1),
                   "what": "raw files -> templates -> tokenized (cached for later runs)"}
    log(f"pipeline cold: {n:,} examples rendered and tokenized in {secs:.1f}s")
  t0 = time.perf_counter()
  ds = pipeline.get_dataset(mixture, lengths, "train", batch_size, seed, pack=True, kind=kind)
  it = ds.as_numpy_iterator()
  first = next(it)
  t_first = time.perf_counter() - t0
  # Windows of equal numbers of batches; the figure is the median window's examples/s.
  w = common.Windows()
  n = 0
  per = max(1, batches // windows)
  for _ in range(windows):
    # Examples are counted after the clock (a window's amount is known at its end).
    got = []
    w.time(lambda: got.extend(next(it) for _ in range(per)), 1.0)
    k = sum(_examples_in(b) for b in got)
    w.rates[-1] *= k
    n += k
  fig = w.summary()
  batches, secs = per * windows, sum(w.seconds)
  out["warm"] = {"first_batch_s": round(t_first, 2), "batches": batches, "examples": n,
                 "seconds": round(secs, 3), "examples_per_s": fig["median"],
                 "examples_per_s_min": fig["min"], "examples_per_s_max": fig["max"],
                 "windows": windows, "others_cpu_share": fig.get("others_cpu_share"),
                 "steal_cpu_share": fig.get("steal_cpu_share"),
                 "quiet": fig["quiet"],
                 "rows_per_s": round(batches * batch_size / max(secs, 1e-9), 1),
                 "examples_per_row": round(n / (batches * batch_size), 2),
                 "what": "cache -> seqio mixture -> packer -> batches"}
  del first
  log(f"pipeline warm: {out['warm']['examples_per_s']:,.0f} examples/s "
      f"(first batch after {t_first:.1f}s)")
  return out

