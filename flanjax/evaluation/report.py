"""Evaluation results and their reports: console and markdown tables, TensorBoard scalars."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Sequence

import numpy as np

from flanjax.data.collections import mmlu
from flanjax.training import metrics as metrics_lib


@dataclasses.dataclass
class TaskResult:
  task: str
  split: str
  examples: int
  metrics: dict  # every metric the task's metric_fns returned (percent where they say)
  primary: str  # the metric shown first: the first one the task reports
  rank_classification: float | None = None  # percent; None: no options
  rank_examples: int = 0
  truncated: int = 0  # prompts longer than input_length, cut
  seconds: float = 0.0
  samples: list = dataclasses.field(default_factory=list)
  baseline: float | None = None  # percent, always giving the train split's most common answer
  baseline_answer: str | None = None
  # Examples kept for the review page (not in the JSON report): see harness._kept.
  examples_kept: list = dataclasses.field(default_factory=list, repr=False)

  @property
  def score(self) -> float:
    return float(self.metrics.get(self.primary, float("nan")))

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("examples_kept")
    d["score"] = self.score
    return d


class Progress:
  """'eval  412/6511 examples  3.1 ex/s  ETA 32:45  (bbh_snarks)' every few seconds."""

  def __init__(self, total: int, every_secs: float = 10.0, log: Callable = print):
    self.total, self.every_secs, self.log = total, every_secs, log
    self.done = 0
    self._shown = -1
    self.t0 = self._last = time.time()

  def update(self, n: int, what: str, force: bool = False):
    self.done += n
    now = time.time()
    if self.every_secs is None or self._shown == self.done or (
        not force and now - self._last < self.every_secs):
      return
    self._last, self._shown = now, self.done
    rate = self.done / max(now - self.t0, 1e-9)
    eta = (self.total - self.done) / max(rate, 1e-9)
    self.log(f"eval {self.done:>6}/{self.total} examples  {rate:.2f} ex/s  "
             f"ETA {metrics_lib.format_duration(eta)}  ({what})")


@dataclasses.dataclass(frozen=True)
class Group:
  """A summary row: the mean of its tasks' scores, or (by_examples) the mean over all their
  examples, each task weighted by its example count (MMLU's categories and overall score)."""
  name: str
  by_examples: bool = False


def _groups(r: TaskResult) -> list[Group]:
  """The summary groups a task's result counts in (besides "all")."""
  if r.task.startswith("bbh_"):
    return [Group("BBH direct" if r.task.endswith("_direct") else "BBH CoT")]
  return [Group(name, by_examples=True) for name in mmlu.summary_groups(r.task)]


def _mean(values, weights, by_examples: bool):
  pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
  if not pairs:
    return None
  if by_examples:
    total = sum(w for _, w in pairs)
    return float(sum(v * w for v, w in pairs) / total) if total else None
  return float(np.mean([v for v, _ in pairs]))


def summary_rows(results: Sequence[TaskResult]) -> list[dict]:
  """Means of the headline score (and rank classification) per group and split.

  Groups: BBH CoT / direct (means over tasks), MMLU and its four categories (means
  over examples, as the MMLU paper and lm-evaluation-harness report them), and
  "all" (the mean over tasks, when there are two or more).
  """
  out = []
  groups: dict = {}
  for r in results:
    for g in _groups(r):
      groups.setdefault((g, r.split), []).append(r)
  for r in results:
    groups.setdefault((Group("all"), r.split), []).append(r)
  for (g, split), rs in groups.items():
    if g.name == "all" and len(rs) < 2:
      continue
    by = g.by_examples
    out.append(dict(
        group=g.name, split=split, tasks=len(rs), examples=sum(r.examples for r in rs),
        mean_over="examples" if by else "tasks",
        score=_mean([r.score for r in rs], [r.examples for r in rs], by),
        rank_classification=_mean([r.rank_classification for r in rs],
                                  [r.rank_examples for r in rs], by),
        baseline=_mean([r.baseline for r in rs], [r.examples for r in rs], by)))
  return out


def _table_rows(results: Sequence[TaskResult]):
  with_base = any(r.baseline is not None for r in results)
  header = ("task", "split", "n", "metric", "score", "rank cls %") + (
      ("baseline %",) if with_base else ()) + ("other metrics", "s")
  pct = lambda v: "-" if v is None or math.isnan(v) else f"{v:.1f}"  # noqa: E731
  rows = []
  for r in results:
    other = ", ".join(f"{k} {v:.2f}" for k, v in r.metrics.items() if k != r.primary)
    shown = r.baseline_answer or ""
    if len(shown) > 40:  # a long answer (an open-ended task's) would widen the whole table
      shown = shown[:37] + "..."
    base = (pct(r.baseline) + (f" ({shown!r})" if r.baseline_answer else ""),)
    rows.append((r.task, r.split, str(r.examples), r.primary or "-", pct(r.score),
                 pct(r.rank_classification)) + (base if with_base else ()) +
                (other or "", f"{r.seconds:.0f}"))
  for s in summary_rows(results):
    name = "MEAN" if s["group"] == "all" else f"MEAN {s['group']}"
    tasks = f"{s['tasks']} task{'s' if s['tasks'] != 1 else ''}" + (
        ", over examples" if s["mean_over"] == "examples" else "")
    rows.append((f"{name} ({tasks})", s["split"], str(s["examples"]), "", pct(s["score"]),
                 pct(s["rank_classification"])) + ((pct(s["baseline"]),) if with_base else ())
                + ("", ""))
  return header, rows


def format_results(results: Sequence[TaskResult], markdown: bool = False) -> str:
  """A table of every task's score: aligned text for the console, or markdown."""
  header, rows = _table_rows(results)
  if markdown:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def scalars(results: Sequence[TaskResult]) -> dict:
  """TensorBoard scalars: eval/<task>/<split>/<metric>, and the means."""
  out = {}
  for r in results:
    for k, v in r.metrics.items():
      out[f"eval/{r.task}/{r.split}/{k}"] = v
    if r.rank_classification is not None:
      out[f"eval/{r.task}/{r.split}/rank_classification"] = r.rank_classification
    if r.baseline is not None:
      out[f"eval/{r.task}/{r.split}/baseline"] = r.baseline
  for s in summary_rows(results):
    key = "mean" if s["group"] == "all" else "mean_" + s["group"].lower().replace(" ", "_")
    out[f"eval/{key}/{s['split']}/score"] = s["score"]
    if s["rank_classification"] is not None:
      out[f"eval/{key}/{s['split']}/rank_classification"] = s["rank_classification"]
  # A split of one task has no MEAN row, but its tag is there all the same (early stopping
  # on eval/mean/<split>/score then works for one task, e.g. a user's own data, too).
  for r in results:
    if sum(x.split == r.split for x in results) == 1:
      out[f"eval/mean/{r.split}/score"] = r.score
      if r.rank_classification is not None:
        out[f"eval/mean/{r.split}/rank_classification"] = r.rank_classification
  return out
