"""Evaluation during and at the end of training: one path, `harness.evaluate_suite`.

An Evaluator is a plain object (gin's `train` builds one from its eval_*
arguments; a Python user builds it directly). Periodic evaluations and the
end-of-run report take the same task specs (names, mixtures, fnmatch patterns,
'task:split'), print the same table, write the same TensorBoard tags
(eval/<task>/<split>/<metric>) and append to eval_during_training.jsonl; the
end-of-run report adds the majority-answer baseline as a column.
Validation loss (teacher-forced, on the mixture's validation splits) is here
too.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from flanjax.evaluation import harness
from flanjax.evaluation import run as eval_run


@dataclasses.dataclass
class Evaluator:
  """What to evaluate during and after training, and how often.

  tasks: task specs; empty means the training mixture's tasks. splits: None
  gives each task's evaluation splits (harness.default_splits).
  """
  tasks: Sequence[str] = ()
  splits: Sequence[str] | None = None
  input_length: int = 256
  max_decode_len: int = 64
  max_examples: int | None = None
  batch_size: int = 64
  rank_classification: bool = False
  every_steps: int = 0
  at_end: bool = True
  validation_every_steps: int = 0
  validation_batches: int = 4
  log: Callable[[str], None] = lambda line: print(line, flush=True)

  def task_names(self, mixture: str) -> list[str]:
    """The specs resolved to registered names (an unknown one is a one-line UserError)."""
    return eval_run.resolve_tasks(list(self.tasks) if self.tasks else [mixture])

  def due(self, step: int, num_steps: int) -> bool:
    """A periodic evaluation at this step (the last step's is the end-of-run report)."""
    return bool(self.every_steps) and step % self.every_steps == 0 and (
        step < num_steps or not self.at_end)

  def validation_due(self, step: int) -> bool:
    return bool(self.validation_every_steps) and step % self.validation_every_steps == 0

  def evaluate(self, model, kind, params, vocab, mixture: str, step: int, writer, run,
               final: bool = False) -> list[harness.TaskResult] | None:
    """Runs the suite, prints its table, writes TensorBoard scalars and the JSONL line."""
    if jax.process_count() > 1:
      # Decoding runs on one host's inputs; across hosts it would need every process in
      # each step. Evaluate the checkpoint in a single process instead.
      self.log(f"note: evaluation at step {step} is skipped in a multi-process run; run "
               "python -m flanjax.evaluate on the checkpoint")
      return None
    from flanjax import decoding  # pylint: disable=g-import-not-at-top
    t0 = time.time()
    results = harness.evaluate_suite(
        model, params, vocab, kind, self.task_names(mixture), splits=self.splits,
        input_length=self.input_length,
        decode=decoding.DecodeConfig(max_decode_len=self.max_decode_len),
        batch_size=self.batch_size, max_examples=self.max_examples,
        rank_classification=self.rank_classification, baseline=final, writer=writer,
        step=step, progress_every_secs=30.0, num_samples=3 if final else 0, log=self.log)
    secs = time.time() - t0
    what = ("score: each task's metric (exact match of the answer for the built-in tasks); "
            "baseline: always the train split's most common answer" if final else
            "score: each task's metric")
    head = f"evaluation at step {step}" if final else f"step {step}: evaluation"
    self.log(f"{head} ({secs:.0f}s, greedy decoding; {what})\n"
             f"{harness.format_results(results)}\n")
    run.append_eval({"step": step, "seconds": round(secs, 1), "final": final,
                     "results": [r.to_json() for r in results]})
    return results

  def summary(self, results: Sequence[harness.TaskResult]) -> dict:
    """The end-of-run report's part of summary.json."""
    out = {"eval": [r.to_json() for r in results]}
    for split in dict.fromkeys(r.split for r in results):
      rs = [r for r in results if r.split == split]
      out[f"mean_score_{split}"] = float(np.mean([r.score for r in rs]))
      # The names of the first report (built-in tasks: the score is answer accuracy).
      out[f"mean_accuracy_{split}"] = out[f"mean_score_{split}"]
      bases = [r.baseline for r in rs if r.baseline is not None]
      if bases:
        out[f"mean_baseline_{split}"] = float(np.mean(bases))
    return out

  def validation_loss(self, eval_step, params, data, mesh) -> float | None:
    """Teacher-forced loss over the first `validation_batches` batches of every task of
    the mixture that has a validation split; None if none has."""
    from flanjax.training import partitioning  # pylint: disable=g-import-not-at-top
    total, weight = 0.0, 0.0
    for batch in data.validation_batches(self.validation_batches):
      s, w = eval_step(params, partitioning.global_batch(batch, mesh))
      total, weight = total + float(s), weight + float(w)
    return total / weight if weight else None
