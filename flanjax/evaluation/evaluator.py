"""Evaluation during and at the end of training: one path for every measure.

An Evaluator is a plain object (gin's `train` builds one from its eval_*
arguments; a Python user builds it directly). Each evaluation measures the
same (task, split) pairs (the task specs: names, mixtures, fnmatch patterns,
'task:split'; default the training mixture's tasks, each with its evaluation
splits, e.g. validation and heldout_templates) two ways:

  - generation: `harness.evaluate_suite`, each task's own metrics (exact match
    for the built-in tasks), TensorBoard eval/<task>/<split>/<metric>;
  - teacher-forced: loss and per-token accuracy (the argmax is the target
    token) on the first `validation_batches` packed batches of each split,
    TensorBoard eval/<task>/<split>/loss and .../token_accuracy (percent), the
    token-weighted means eval/mean/<split>/..., and eval/loss and
    eval/token_accuracy over the validation splits (all splits if none is one).

Periodic evaluations (every_steps) do both; loss-only ones
(validation_every_steps) only the second, with the same tags. Every evaluation
prints its tables, writes its scalars and appends a line to
eval_during_training.jsonl; the end-of-run report adds the majority-answer
baseline as a column and goes to summary.json too.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from flanjax.evaluation import harness
from flanjax.evaluation import report
from flanjax.evaluation import run as eval_run

# The overall validation loss, the default early-stopping metric.
LOSS_TAG = "eval/loss"
ACCURACY_TAG = "eval/token_accuracy"
VALIDATION = "validation"


@dataclasses.dataclass
class SplitLoss:
  """Teacher-forced loss and token accuracy (percent) of one task's split."""
  task: str
  split: str
  loss: float
  token_accuracy: float
  tokens: int  # loss-weighted target tokens measured
  batches: int

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _pooled(losses: Sequence[SplitLoss]) -> tuple[float, float, int]:
  """Token-weighted (loss, token accuracy, tokens) over several splits."""
  tokens = sum(x.tokens for x in losses)
  if not tokens:
    return float("nan"), float("nan"), 0
  return (sum(x.loss * x.tokens for x in losses) / tokens,
          sum(x.token_accuracy * x.tokens for x in losses) / tokens, tokens)


def overall(losses: Sequence[SplitLoss]) -> tuple[float, float, str] | None:
  """(loss, token accuracy, what it pools) for eval/loss: the validation splits, else all."""
  if not losses:
    return None
  val = [x for x in losses if x.split == VALIDATION]
  loss, acc, _ = _pooled(val or losses)
  return loss, acc, ("validation splits" if val else "all splits")


def loss_scalars(losses: Sequence[SplitLoss]) -> dict:
  """The TensorBoard tags of the teacher-forced measures (see the module docstring)."""
  out = {}
  for x in losses:
    out[f"eval/{x.task}/{x.split}/loss"] = x.loss
    out[f"eval/{x.task}/{x.split}/token_accuracy"] = x.token_accuracy
  for split in dict.fromkeys(x.split for x in losses):
    loss, acc, _ = _pooled([x for x in losses if x.split == split])
    out[f"eval/mean/{split}/loss"], out[f"eval/mean/{split}/token_accuracy"] = loss, acc
  both = overall(losses)
  if both is not None:
    out[LOSS_TAG], out[ACCURACY_TAG] = both[0], both[1]
  return out


def format_losses(losses: Sequence[SplitLoss]) -> str:
  """The console table of the teacher-forced measures, with the per-split means."""
  header = ("task", "split", "tokens", "loss", "token acc %")
  rows = [(x.task, x.split, f"{x.tokens:,}", f"{x.loss:.4f}", f"{x.token_accuracy:.1f}")
          for x in losses]
  for split in dict.fromkeys(x.split for x in losses):
    these = [x for x in losses if x.split == split]
    if len(these) > 1:
      loss, acc, tokens = _pooled(these)
      rows.append((f"ALL ({len(these)} tasks)", split, f"{tokens:,}", f"{loss:.4f}",
                   f"{acc:.1f}"))
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


@dataclasses.dataclass
class Evaluation:
  """One evaluation: generation results and teacher-forced losses at a step."""
  step: int
  final: bool
  results: list  # harness.TaskResult per task and split; [] for a loss-only evaluation
  losses: list  # SplitLoss per task and split
  seconds: float = 0.0
  train_loss: float | None = None  # mean training loss since the evaluation before

  @property
  def loss(self) -> float | None:
    both = overall(self.losses)
    return None if both is None else both[0]

  def scalars(self) -> dict:
    """Every tag this evaluation writes to TensorBoard, with its value."""
    out = report.scalars(self.results) if self.results else {}
    out.update(loss_scalars(self.losses))
    return out

  def to_json(self) -> dict:
    rec = {"step": self.step, "seconds": round(self.seconds, 1), "final": self.final,
           "results": [r.to_json() for r in self.results]}
    both = overall(self.losses)
    if both is not None:
      rec.update(loss=both[0], token_accuracy=both[1],
                 losses=[x.to_json() for x in self.losses])
    if self.train_loss is not None:
      rec["train_loss"] = self.train_loss
    return rec

  @classmethod
  def from_json(cls, rec: dict) -> "Evaluation":
    """An evaluation as eval_during_training.jsonl recorded it (a resumed run replays them)."""
    def build(klass, d):
      names = {f.name for f in dataclasses.fields(klass)}
      return klass(**{k: v for k, v in d.items() if k in names})
    return cls(rec["step"], bool(rec.get("final")),
               [build(report.TaskResult, r) for r in rec.get("results", [])],
               [build(SplitLoss, x) for x in rec.get("losses", [])],
               rec.get("seconds", 0.0), rec.get("train_loss"))


@dataclasses.dataclass
class Evaluator:
  """What to evaluate during and after training, and how often.

  tasks: task specs; empty means the training mixture's tasks. splits: None
  gives each task's evaluation splits (harness.default_splits).
  validation_batches: packed batches per task split for the teacher-forced
  measures (0: none). validation_every_steps: loss-only evaluations between.
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

  def __post_init__(self):
    self._plans: dict = {}

  def task_names(self, mixture: str) -> list[str]:
    """The specs resolved to registered names (an unknown one is a one-line UserError)."""
    return eval_run.resolve_tasks(list(self.tasks) if self.tasks else [mixture])

  def pairs(self, mixture: str) -> list[tuple[str, str]]:
    """The (task, split) pairs measured, as the generation harness plans them."""
    if mixture not in self._plans:
      self._plans[mixture] = harness.plan(self.task_names(mixture), self.splits, log=self.log)
    return self._plans[mixture]

  def due(self, step: int, num_steps: int) -> bool:
    """A periodic evaluation at this step (the last step's is the end-of-run report)."""
    return bool(self.every_steps) and step % self.every_steps == 0 and (
        step < num_steps or not self.at_end)

  def validation_due(self, step: int, num_steps: int | None = None) -> bool:
    """A loss-only evaluation at this step (the last step's is in the end-of-run report)."""
    return (bool(self.validation_every_steps) and bool(self.validation_batches)
            and step % self.validation_every_steps == 0
            and (num_steps is None or step < num_steps or not self.at_end))

  def evaluate(self, model, kind, params, vocab, mixture: str, step: int, writer, run,
               final: bool = False, *, probe: Callable | None = None, generate: bool = True,
               train_loss: float | None = None) -> Evaluation | None:
    """Runs the evaluation, prints its tables, writes TensorBoard scalars and the JSONL line.

    probe(params, task, split, max_batches) -> (sums of loss, weight and correct
    tokens, batches): the teacher-forced measures (the trainer's jitted eval
    step over TrainData.eval_batches); None skips them. generate=False: a
    loss-only evaluation. None when nothing was measured.
    """
    t0 = time.time()
    results = self._generate(model, kind, params, vocab, mixture, step, writer,
                             final) if generate else []
    losses = self.teacher_forced(probe, params, mixture) if probe else []
    if not results and not losses:
      return None
    ev = Evaluation(step, final, results, losses, time.time() - t0, train_loss)
    if losses:
      writer.scalars(step, loss_scalars(losses))
    self._print(ev, generate)
    run.append_eval(ev.to_json())
    return ev

  def _generate(self, model, kind, params, vocab, mixture, step, writer, final) -> list:
    if jax.process_count() > 1:
      # Decoding runs on one host's inputs; across hosts it would need every process in
      # each step. Evaluate the checkpoint in a single process instead.
      self.log(f"note: generation at step {step} is skipped in a multi-process run; run "
               "python -m flanjax.evaluate on the checkpoint")
      return []
    from flanjax import decoding  # pylint: disable=g-import-not-at-top
    return harness.evaluate_suite(
        model, params, vocab, kind, self.task_names(mixture), splits=self.splits,
        input_length=self.input_length,
        decode=decoding.DecodeConfig(max_decode_len=self.max_decode_len),
        batch_size=self.batch_size, max_examples=self.max_examples,
        rank_classification=self.rank_classification, baseline=final, writer=writer,
        step=step, progress_every_secs=30.0, num_samples=3 if final else 0, log=self.log)

  def _print(self, ev: Evaluation, generate: bool) -> None:
    both = overall(ev.losses)
    # Progress lines start with "step"; the end-of-run report's lines do not.
    at = f"evaluation at step {ev.step}" if ev.final else f"step {ev.step}"
    line = (f"{at}: validation loss {both[0]:.4f}, token accuracy {both[1]:.1f}% "
            f"({LOSS_TAG}: {both[2]}, {len(ev.losses)} task splits, teacher-forced)"
            if both else "")
    if not generate:
      self.log(line)
      return
    what = ("score: each task's metric (exact match of the answer for the built-in tasks); "
            "baseline: always the train split's most common answer" if ev.final else
            "score: each task's metric")
    head = f"evaluation at step {ev.step}" if ev.final else f"step {ev.step}: evaluation"
    parts = [f"{head} ({ev.seconds:.0f}s, greedy decoding; {what})"]
    if ev.results:
      parts.append(harness.format_results(ev.results))
    if ev.losses:
      parts += [f"teacher-forced loss and token accuracy (the first {self.validation_batches} "
                "packed batches of each split)", format_losses(ev.losses), line]
    self.log("\n".join(parts) + "\n")

  def teacher_forced(self, probe: Callable, params, mixture: str) -> list[SplitLoss]:
    """The loss and token accuracy of every (task, split) pair (those with no target
    token in their first batches are left out)."""
    if not self.validation_batches:
      return []
    out = []
    for task, split in self.pairs(mixture):
      sums, batches = probe(params, task, split, self.validation_batches)
      loss_sum, weight, correct = (float(v) for v in sums)
      if weight > 0:
        out.append(SplitLoss(task, split, loss_sum / weight, 100.0 * correct / weight,
                             int(round(weight)), batches))
    return out

  def recorded(self, run, up_to_step: int) -> list[Evaluation]:
    """The evaluations `run` recorded up to a step (a resumed run replays them)."""
    return [Evaluation.from_json(r) for r in run.read_evals() if r["step"] <= up_to_step]

  def summary(self, ev: Evaluation) -> dict:
    """The end-of-run report's part of summary.json."""
    results = ev.results
    out = {"eval": [r.to_json() for r in results]}
    for split in dict.fromkeys(r.split for r in results):
      rs = [r for r in results if r.split == split]
      out[f"mean_score_{split}"] = float(np.mean([r.score for r in rs]))
      # The names of the first report (built-in tasks: the score is answer accuracy).
      out[f"mean_accuracy_{split}"] = out[f"mean_score_{split}"]
      bases = [r.baseline for r in rs if r.baseline is not None]
      if bases:
        out[f"mean_baseline_{split}"] = float(np.mean(bases))
    both = overall(ev.losses)
    if both is not None:
      out.update(validation_loss=both[0], validation_token_accuracy=both[1],
                 eval_losses=[x.to_json() for x in ev.losses])
    return out
