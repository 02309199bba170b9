"""Evaluation of a model on registered seqio tasks: generation, task metrics, rank classification.

For each task and split:

  1. Examples: a flanjax task renders only the examples asked for (few-shot
     prompts drop exemplars, first first, until they fit `input_length`; BBH
     prints when that happens); any other seqio task is read from its dataset
     (`inputs_pretokenized`, `targets_pretokenized`).
  2. Generation with a `decoding.Generator` (greedy, beam or sampling), the
     prompt encoded as the model was trained to read it (T5 and prefix-LM:
     inputs + EOS; a causal LM: BOS + inputs).
  3. Metrics: the task's own `postprocess_fn` on targets (is_target=True) and
     predictions, then every `metric_fn` of the task; each metric it returns
     is reported. A task's score metrics (targets, log-likelihoods) get the
     log-likelihood of each target.
  4. Rank classification, when the examples carry answer options and the
     task's answer is not a chain of thought: the option with the highest
     log-likelihood as the target (sum over its tokens, as FLAN scores it)
     is the prediction. Options come from the example's `options` feature, or
     else from the last option block of the input ("Options:" with "(A) ..."
     lines, "OPTIONS:" with "- ..." lines, or "Choose from: a, b."). If the
     gold answer is an option letter, "(A)".."(R)" are the candidates (BBH),
     else the option texts are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from typing import Callable, Sequence

import numpy as np
import seqio

from flanjax.data import tasks as task_lib
from flanjax.errors import UserError
from flanjax.evaluation import scoring
from flanjax.training import metrics as metrics_lib

EVAL_SPLITS = ("validation", "heldout_templates", "test")
COT_FORMATS = ("cot", "few_shot_cot")


# ---------------------------------------------------------------- examples

@dataclasses.dataclass
class Example:
  inputs: str
  targets: str
  options: list  # answer options, [] if none
  raw: dict  # what postprocess_fn receives as `example`


def task_and_split(spec: str) -> tuple[str, str | None]:
  """'name' or 'name:split'."""
  name, _, split = spec.partition(":")
  return name, (split or None)


def _get_task(name: str) -> seqio.Task:
  from flanjax.data import registry  # pylint: disable=g-import-not-at-top
  obj = registry.get_task_or_mixture(name)
  if not isinstance(obj, seqio.Task):
    raise UserError(f"{name} is a mixture; evaluation takes tasks (list them with "
                    "`python tools/show_task.py --list`)")
  return obj


def expand(names: Sequence[str]) -> list[str]:
  """Task names with mixtures replaced by their tasks (a ':split' suffix is kept)."""
  from flanjax.data import registry  # pylint: disable=g-import-not-at-top
  out = []
  for spec in names:
    name, split = task_and_split(spec)
    obj = registry.get_task_or_mixture(name)
    for t in getattr(obj, "tasks", [obj]):
      out.append(t.name + (f":{split}" if split else ""))
  return out


def default_splits(name: str) -> list[str]:
  """A flanjax task's evaluation-only splits, else the usual evaluation splits it has."""
  task = _get_task(name)
  if name in task_lib.DEFS:
    defn = task_lib.DEFS[name][0]
    if "*" in defn.eval_only_splits:
      return list(defn.splits)
    if defn.eval_only_splits:
      return [s for s in defn.splits if s in defn.eval_only_splits]
  return [s for s in EVAL_SPLITS if s in task.splits]


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return "" if value is None else str(value)


def load_examples(name: str, split: str, vocab, input_length: int,
                  max_examples: int | None = None) -> list[Example]:
  task = _get_task(name)
  if split not in task.splits:
    raise UserError(f"task {name} has no split {split!r}; it has {', '.join(task.splits)}")
  if name in task_lib.DEFS:
    defn = task_lib.DEFS[name][0]
    fits = lambda text: len(vocab.encode(text)) + 1 <= input_length  # noqa: E731
    old = task_lib.input_budget()
    task_lib.set_input_budget(input_length)  # named in the "exemplars dropped" notes
    try:
      records = task_lib.render_split(defn, split, fits, limit=max_examples)
    finally:
      task_lib.set_input_budget(old)
    out = []
    for r in records:
      raw = {"inputs_pretokenized": r["inputs"].encode("utf-8"),
             "targets_pretokenized": r["targets"].encode("utf-8"),
             "answer": r["answer"].encode("utf-8"), "options": list(r["options"])}
      out.append(Example(r["inputs"], r["targets"], list(r["options"]), raw))
    return out
  ds = task.get_dataset(None, split=split, shuffle=False, num_epochs=1, use_cached=False)
  if max_examples:
    ds = ds.take(max_examples)
  out = []
  for ex in ds.as_numpy_iterator():
    inputs = ex.get("inputs_pretokenized")
    if inputs is None and "inputs" in ex:
      inputs = task.output_features["inputs"].vocabulary.decode(ex["inputs"].tolist())
    targets = ex.get("targets_pretokenized")
    if targets is None:
      targets = task.output_features["targets"].vocabulary.decode(ex["targets"].tolist())
    options = ex.get("options")
    if isinstance(options, bytes):
      try:
        options = json.loads(options.decode("utf-8"))
      except json.JSONDecodeError:
        options = None
    elif isinstance(options, np.ndarray):
      options = [_text(o) for o in options.tolist()]
    out.append(Example(_text(inputs), _text(targets), list(options or []), ex))
  return out


# ---------------------------------------------------------------- options

_LETTER_LINE = re.compile(r"^\(([A-Z])\)\s?(.*)$")
_DASH_LINE = re.compile(r"^- (.*)$")
_INLINE = re.compile(r"^Choose from: (.*)\.$", re.M)
_LETTER_ANSWER = re.compile(r"^\(([A-Z])\)$")


def parse_options(text: str) -> list[tuple[str | None, str]]:
  """The last option block of a prompt: [(letter or None, option text)], [] if none."""
  best, best_at = [], -1
  for header, pattern, lettered in (("Options:", _LETTER_LINE, True),
                                    ("OPTIONS:", _DASH_LINE, False)):
    at = text.rfind(header + "\n")
    if at < 0 or at < best_at:
      continue
    opts = []
    for line in text[at + len(header) + 1:].split("\n"):
      m = pattern.match(line.strip())
      if not m:
        break
      opts.append((m.group(1), m.group(2).strip()) if lettered else (None, m.group(1).strip()))
    if opts:
      best, best_at = opts, at
  inline = list(_INLINE.finditer(text))
  if inline and inline[-1].start() > best_at:
    best = [(None, o.strip()) for o in inline[-1].group(1).split(", ") if o.strip()]
  return best


def rank_candidates(example: Example, gold: str) -> tuple[list[str], int] | None:
  """(candidate answers, index of the gold one or -1), or None if there are no options.

  gold: the postprocessed target. A gold that is an option's text makes the
  texts the candidates; otherwise the letters of a lettered list are ("(B)").
  """
  parsed = parse_options(example.inputs)
  if example.options:
    texts, letters = [str(o) for o in example.options], None
    if parsed and len(parsed) == len(texts) and all(p[0] for p in parsed):
      letters = [p[0] for p in parsed]
  elif parsed:
    texts = [p[1] for p in parsed]
    letters = [p[0] for p in parsed] if all(p[0] for p in parsed) else None
  else:
    return None
  gold = gold.strip()
  if gold in texts and not _LETTER_ANSWER.match(gold):
    return texts, texts.index(gold)  # the target is the option's text (FLAN's templates)
  if letters:  # the target is a letter (BBH), or no option at all: scored as a miss
    cands = [f"({c})" for c in letters]
    return cands, (cands.index(gold) if gold in cands else -1)
  return texts, -1


# ---------------------------------------------------------------- results

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

  @property
  def score(self) -> float:
    return float(self.metrics.get(self.primary, float("nan")))

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
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


def _metric_values(out) -> dict:
  vals = {}
  for k, v in dict(out).items():
    try:
      vals[k] = float(v)
    except (TypeError, ValueError):
      pass  # a non-scalar metric (a histogram, a table): not in the report
  return vals


def _postprocess(task: seqio.Task, text: str, example: dict, is_target: bool):
  try:
    return task.postprocess_fn(text, example=example, is_target=is_target)
  except TypeError:
    return task.postprocess_fn(text)


def _prompt_ids(vocab, text: str, kind: str, prefix_lm: bool) -> list[int]:
  ids = [int(i) for i in vocab.encode(text)]
  if kind == "decoder" and not prefix_lm:
    bos = _bos_id(vocab)  # a causal LM continues BOS + text (or the text alone)
    if bos is not None:
      return [bos] + ids
    return ids or [vocab.eos_id]
  return ids + [vocab.eos_id]


def _bos_id(vocab):
  try:
    bos = vocab.bos_id
  except (NotImplementedError, AttributeError):
    return None
  return bos if isinstance(bos, int) and bos >= 0 else None


def _continuation_ids(vocab, text: str, kind: str, prefix_lm: bool, context: str) -> list[int]:
  """A target as the model scores it: its tokens and EOS (T5, prefix-LM), or ' text' (causal)."""
  if kind == "decoder" and not prefix_lm:
    sep = "" if not context or context[-1].isspace() else " "
    return [int(i) for i in vocab.encode(sep + text)]
  return [int(i) for i in vocab.encode(text)] + [vocab.eos_id]


def evaluate_one(model, params, vocab, kind: str, prefix_lm: bool, name: str, split: str,
                 generator, *, input_length: int, batch_size: int = 16,
                 max_examples: int | None = None, rank_classification: bool = True,
                 num_samples: int = 3, progress: Progress | None = None,
                 examples: list[Example] | None = None) -> TaskResult:
  """One task and split: generation + the task's metrics, and rank classification."""
  t0 = time.time()
  task = _get_task(name)
  if examples is None:
    examples = load_examples(name, split, vocab, input_length, max_examples)
  before = generator.truncated
  predictions = []
  chunk = max(batch_size, 1) * 4
  for start in range(0, len(examples), chunk):
    part = examples[start:start + chunk]
    ids = generator.generate_ids([np.asarray(_prompt_ids(vocab, e.inputs, kind, prefix_lm),
                                             np.int32) for e in part])
    predictions.extend(vocab.decode(x) for x in ids)
    if progress:
      progress.update(len(part), f"{name}/{split}")
  truncated = generator.truncated - before
  metrics, primary, targets_pp, preds_pp = score_predictions(task, examples, predictions)
  if task.score_metric_fns and examples:
    ctx = [_prompt_ids(vocab, e.inputs, kind, prefix_lm) for e in examples]
    cont = [_continuation_ids(vocab, e.targets, kind, prefix_lm, e.inputs) for e in examples]
    ll, _ = scoring.loglikelihood(model, params, kind, ctx, cont, prefix_lm=prefix_lm,
                                  batch_size=batch_size, max_length=_ll_length(kind, input_length))
    for fn in task.score_metric_fns:
      vals = _metric_values(fn(targets_pp, list(ll)))
      primary = primary or next(iter(vals), None)
      metrics.update(vals)
  rank, rank_n = None, 0
  if rank_classification and _rank_applies(name):
    ranked = rank_classify(model, params, vocab, kind, prefix_lm, examples, targets_pp,
                           batch_size=batch_size, input_length=input_length)
    rank, rank_n = ranked["accuracy"], ranked["examples"]
  samples = [dict(inputs=e.inputs[-600:], prediction=p, target=e.targets, answer=pp,
                  gold=t) for e, p, pp, t in list(zip(examples, predictions, preds_pp,
                                                      targets_pp))[:num_samples]]
  return TaskResult(task=name, split=split, examples=len(examples), metrics=metrics,
                    primary=primary or "", rank_classification=rank, rank_examples=rank_n,
                    truncated=truncated, seconds=round(time.time() - t0, 2),
                    samples=[{k: _jsonable(v) for k, v in s.items()} for s in samples])


def _jsonable(v):
  return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


def _ll_length(kind: str, input_length: int) -> int:
  return input_length if kind == "t5" else input_length + 1024


def _rank_applies(name: str) -> bool:
  """Not for a task whose answer is a chain of thought: options alone are not its target."""
  if name in task_lib.DEFS:
    return task_lib.DEFS[name][0].eval_format not in COT_FORMATS
  return True


def score_predictions(task: seqio.Task, examples: Sequence[Example], predictions: Sequence[str]):
  """The task's postprocess_fn and predict metric_fns on texts.

  Returns (metrics, primary metric name or None, postprocessed targets,
  postprocessed predictions).
  """
  targets_pp = [_postprocess(task, e.targets, e.raw, True) for e in examples]
  preds_pp = [_postprocess(task, p, e.raw, False) for p, e in zip(predictions, examples)]
  metrics, primary = {}, None
  for fn in task.predict_metric_fns:
    vals = _metric_values(fn(targets_pp, preds_pp))
    primary = primary or next(iter(vals), None)
    metrics.update(vals)
  return metrics, primary, targets_pp, preds_pp


def rank_classify(model, params, vocab, kind: str, prefix_lm: bool, examples: Sequence[Example],
                  golds: Sequence[str], *, batch_size: int = 16, input_length: int = 2048) -> dict:
  """Picks the option of highest log-likelihood for every example that has options.

  golds: the postprocessed targets. Returns {"accuracy": percent or None,
  "examples": how many had options, "choices": [index or None per example],
  "gold": [index, -1 (gold not an option) or None per example],
  "candidates": [list or None per example]}.
  """
  flat_ctx, flat_cont, owners = [], [], []
  cands_of, gold_of = [None] * len(examples), [None] * len(examples)
  for i, (e, g) in enumerate(zip(examples, golds)):
    found = rank_candidates(e, str(g))
    if found is None:
      continue
    cands_of[i], gold_of[i] = found
    ctx = _prompt_ids(vocab, e.inputs, kind, prefix_lm)
    for c in found[0]:
      flat_ctx.append(ctx)
      flat_cont.append(_continuation_ids(vocab, c, kind, prefix_lm, e.inputs))
      owners.append(i)
  choices = [None] * len(examples)
  n = sum(c is not None for c in cands_of)
  if not n:
    return dict(accuracy=None, examples=0, choices=choices, gold=gold_of, candidates=cands_of)
  ll, _ = scoring.loglikelihood(model, params, kind, flat_ctx, flat_cont, prefix_lm=prefix_lm,
                                batch_size=batch_size, max_length=_ll_length(kind, input_length))
  best = {}
  pos = {}
  for o, v in zip(owners, ll):
    k = pos.get(o, 0)
    if o not in best or v > best[o][0]:  # the first of equal scores wins
      best[o] = (v, k)
    pos[o] = k + 1
  for o, (_, k) in best.items():
    choices[o] = k
  hits = sum(1 for c, g in zip(choices, gold_of) if c is not None and g is not None and c == g)
  return dict(accuracy=100.0 * hits / n, examples=n, choices=choices, gold=gold_of,
              candidates=cands_of)


# ---------------------------------------------------------------- reports

def _group(r: TaskResult) -> str:
  if r.task.startswith("bbh_"):
    return "BBH direct" if r.task.endswith("_direct") else "BBH CoT"
  return ""


def summary_rows(results: Sequence[TaskResult]) -> list[dict]:
  """Means of the headline score (and rank classification) per BBH variant and per split."""
  out = []
  groups: dict = {}
  for r in results:
    g = _group(r)
    if g:
      groups.setdefault((g, r.split), []).append(r)
  for r in results:
    groups.setdefault(("all", r.split), []).append(r)
  for (g, split), rs in groups.items():
    if g == "all" and len(rs) < 2:
      continue
    ranks = [r.rank_classification for r in rs if r.rank_classification is not None]
    out.append(dict(group=g, split=split, tasks=len(rs), examples=sum(r.examples for r in rs),
                    score=float(np.mean([r.score for r in rs])),
                    rank_classification=float(np.mean(ranks)) if ranks else None))
  return out


def _table_rows(results: Sequence[TaskResult]):
  header = ("task", "split", "n", "metric", "score", "rank cls %", "other metrics", "s")
  rows = []
  for r in results:
    other = ", ".join(f"{k} {v:.2f}" for k, v in r.metrics.items() if k != r.primary)
    rows.append((r.task, r.split, str(r.examples), r.primary or "-",
                 "-" if math.isnan(r.score) else f"{r.score:.1f}",
                 "-" if r.rank_classification is None else f"{r.rank_classification:.1f}",
                 other or "", f"{r.seconds:.0f}"))
  for s in summary_rows(results):
    name = "MEAN" if s["group"] == "all" else f"MEAN {s['group']}"
    rows.append((f"{name} ({s['tasks']} task{'s' if s['tasks'] != 1 else ''})", s["split"], str(s["examples"]), "",
                 f"{s['score']:.1f}",
                 "-" if s["rank_classification"] is None else f"{s['rank_classification']:.1f}",
                 "", ""))
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
  for s in summary_rows(results):
    key = "mean" if s["group"] == "all" else "mean_" + s["group"].lower().replace(" ", "_")
    out[f"eval/{key}/{s['split']}/score"] = s["score"]
    if s["rank_classification"] is not None:
      out[f"eval/{key}/{s['split']}/rank_classification"] = s["rank_classification"]
  return out


# ---------------------------------------------------------------- the suite

def evaluate_suite(model, params, vocab, kind: str, prefix_lm: bool, task_names: Sequence[str],
                   *, splits: Sequence[str] | None = None, input_length: int = 2048,
                   decode=None, batch_size: int = 16, max_examples: int | None = None,
                   rank_classification: bool = True, writer=None, step: int | None = None,
                   progress_every_secs: float | None = 10.0, num_samples: int = 3,
                   log: Callable[[str], None] = print) -> list[TaskResult]:
  """Evaluates `model` on tasks registered with `vocab`; one TaskResult per task and split.

  kind: "t5" or "decoder"; prefix_lm: a flanjax-trained decoder (True) or a
  causal LM such as an imported Llama (False). task_names: tasks, mixtures
  (their tasks) or "task:split". splits: for every task (those it lacks are
  skipped); default each task's evaluation-only splits, else its validation /
  heldout_templates / test splits. decode: a decoding.DecodeConfig (default
  greedy, 256 new tokens). writer (a metrics.SummaryWriter) and step: the
  scores as TensorBoard scalars, eval/<task>/<split>/<metric>.
  """
  from flanjax import decoding  # pylint: disable=g-import-not-at-top
  if kind not in scoring.KINDS:
    raise UserError(f"model kind {kind!r} is not one of {', '.join(scoring.KINDS)}")
  decode = decode or decoding.DecodeConfig(max_decode_len=256)
  prefix_lm = bool(prefix_lm) and kind == "decoder"
  plan = []
  for spec in expand(task_names):
    name, split = task_and_split(spec)
    task_splits = [split] if split else (list(splits) if splits else default_splits(name))
    have = _get_task(name).splits
    if split and split not in have:
      raise UserError(f"task {name} has no split {split!r}; it has {', '.join(have)}")
    task_splits = [s for s in task_splits if s in have]
    if not task_splits:
      log(f"eval: {name} has none of the splits {', '.join(splits or EVAL_SPLITS)}; skipped")
    plan += [(name, s) for s in task_splits]
  loaded = []
  for name, split in plan:
    loaded.append((name, split, load_examples(name, split, vocab, input_length, max_examples)))
  total = sum(len(ex) for *_, ex in loaded)
  generator = decoding.Generator(model, params, vocab, input_length, decode,
                                 batch_size=batch_size, prefix_lm=prefix_lm)
  progress = Progress(total, progress_every_secs, log)
  log(f"eval: {len(loaded)} task splits, {total} examples, {decode.method} decoding "
      f"(at most {decode.max_decode_len} new tokens), inputs up to {input_length} tokens")
  results = []
  for name, split, examples in loaded:
    r = evaluate_one(model, params, vocab, kind, prefix_lm, name, split, generator,
                     input_length=input_length, batch_size=batch_size,
                     rank_classification=rank_classification, num_samples=num_samples,
                     progress=progress, examples=examples)
    if r.truncated:
      log(f"eval: {name}/{split}: {r.truncated} of {r.examples} prompts are longer than "
          f"{input_length} tokens and were cut; raise the input length")
    results.append(r)
  if total:
    progress.update(0, "done", force=True)
  if writer is not None:
    writer.scalars(step or 0, scalars(results))
    writer.text(step or 0, "eval/table", format_results(results, markdown=True))
    writer.flush()
  return results
