"""Evaluation of a model on registered seqio tasks: generation, task metrics, rank classification.

For each task and split:

  1. Examples (`evaluation.examples`): rendered or read from the task's dataset.
  2. Generation with a `decoding.Generator` (greedy, beam or sampling), the
     prompt encoded by the model kind as the model was trained to read it
     (T5 and prefix-LM: inputs + EOS; a causal LM: BOS + inputs).
  3. Metrics: the task's own `postprocess_fn` on targets (is_target=True) and
     predictions, then every `metric_fn` of the task; each metric it returns
     is reported. A task's score metrics (targets, log-likelihoods) get the
     log-likelihood of each target.
  4. Rank classification, when the examples carry answer options and the
     task's answer is not a chain of thought: the option with the highest
     log-likelihood as the target (sum over its tokens, as FLAN scores it)
     is the prediction.
  5. Baseline (optional): always giving the train split's most common answer.

Training (during and at the end of a run) and `python -m flanjax.evaluate`
both go through `evaluate_suite`.
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import time
import weakref
from typing import Callable, Sequence

import numpy as np
import seqio

from flanjax.data import pipeline
from flanjax.data import templates as tmpl
from flanjax.data import tasks as task_lib
from flanjax.data.collections import mmlu
from flanjax.errors import UserError
from flanjax.evaluation import scoring
from flanjax.evaluation.examples import (  # noqa: F401  (re-exported)
    EVAL_SPLITS, Example, default_splits, expand, get_task, load_examples, parse_options,
    rank_candidates, task_and_split)
from flanjax.evaluation.report import (  # noqa: F401  (re-exported)
    Progress, TaskResult, format_results, scalars, summary_rows)
from flanjax.models import kinds as kinds_lib

COT_FORMATS = ("cot", "few_shot_cot")


def _metric_values(out) -> dict:
  vals = {}
  for k, v in dict(out).items():
    try:
      vals[k] = float(v)
    except (TypeError, ValueError):
      pass  # a non-scalar metric (a histogram, a table): not in the report
  return vals


def _seqio_kwargs(fn, **available) -> dict:
  """Those of `available` (seqio's `example`, `is_target`) that fn's signature accepts by
  keyword; all of them for **kwargs or an unreadable signature (seqio passes both)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return available
  if any(p.kind is p.VAR_KEYWORD for p in params.values()):
    return available
  by_kw = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
  return {k: v for k, v in available.items() if k in params and params[k].kind in by_kw}


def postprocess(task: seqio.Task, text: str, example: dict | None, is_target: bool):
  """The task's postprocess_fn on `text` (decided by its signature, so a TypeError raised
  inside it is never mistaken for a signature mismatch)."""
  fn = task.postprocess_fn
  if fn is None:
    return text
  return fn(text, **_seqio_kwargs(fn, example=example, is_target=is_target))


def answer_fn(task: seqio.Task):
  """The task's own answer extraction (its postprocess_fn) on a target text."""
  return lambda text: postprocess(task, text, None, True)


# task -> {max_examples: answer}: every split of a task shares its train split's answer, and
# reading 2,000 train examples through seqio costs seconds a call. Weak keys: a task registered
# again (new data under the same name) is a new object and is counted afresh.
_MAJORITY = weakref.WeakKeyDictionary()


def majority_answer(task: seqio.Task, max_examples: int = 2000) -> str | None:
  """The train split's most common (postprocessed) answer; None without a train split."""
  if "train" not in task.splits:
    return None
  cached = _MAJORITY.setdefault(task, {})
  if max_examples not in cached:
    cached[max_examples] = _count_majority(task, max_examples)
  return cached[max_examples]


def _count_majority(task: seqio.Task, max_examples: int) -> str:
  held = pipeline.texts_in_memory(task, "train", max_examples)
  if held is not None:  # the same texts in the same order, without tf.data
    targets = (t["targets_pretokenized"] for t in held)
  else:
    targets = (ex["targets_pretokenized"].decode("utf-8") for ex in _train_dataset(task).take(
        max_examples).as_numpy_iterator())
  post = answer_fn(task)
  counts = collections.Counter(str(post(t)) for t in targets)
  return counts.most_common(1)[0][0] if counts else ""


def _train_dataset(task: seqio.Task):
  return task.get_dataset(None, split="train", shuffle=False, num_epochs=1, use_cached=False)


def _baseline(task, targets_pp) -> tuple[float | None, str | None]:
  answer = majority_answer(task)
  if answer is None:
    return None, None
  hits = sum(str(t) == answer for t in targets_pp)
  return 100.0 * hits / max(len(targets_pp), 1), answer


def evaluate_one(model, params, vocab, kind, name: str, split: str, generator, *,
                 input_length: int, batch_size: int = 16, max_examples: int | None = None,
                 rank_classification: bool = True, baseline: bool = False,
                 num_samples: int = 3, progress: Progress | None = None,
                 examples: list[Example] | None = None, keep_examples: int = 0,
                 cut: Callable[[str], str] | None = None, generate: bool = True) -> TaskResult:
  """One task and split: generation + the task's metrics, rank classification, baseline.

  keep_examples: how many examples (prompt, output, answers, right or wrong) the result
  keeps for the review page; cut: applied to each generation (a prompt format's end of turn).
  generate=False: where rank classification applies, its chosen option is the prediction."""
  kind = kinds_lib.get(kind)
  t0 = time.time()
  task = get_task(name)
  if examples is None:
    examples = load_examples(name, split, vocab, input_length, max_examples)
  before = generator.truncated
  # Tokenized once: generation and rank classification read the same prompts.
  prompts = [kind.prompt_ids(vocab, e.inputs) for e in examples]
  golds = [postprocess(task, e.targets, e.raw, True) for e in examples]
  rank_on = rank_classification and _rank_applies(name)
  generate = generate or not rank_on  # a task without options is always generated
  predictions, ranked = [], None
  chunk = max(batch_size, 1) * 4
  for start in range(0, len(examples), chunk):
    part = slice(start, start + chunk)
    if generate:
      ids = generator.generate_ids([np.asarray(p, np.int32) for p in prompts[part]])
      predictions.extend((cut or str)(vocab.decode(x)) for x in ids)
    if rank_on:  # chunk by chunk, so that progress and ETA count it
      ranked = _merge_ranked(ranked, rank_classify(
          model, params, vocab, kind, examples[part], golds[part], batch_size=batch_size,
          input_length=input_length, continuation_eos=not mmlu.scores_like_lm_eval(name),
          prompts=prompts[part]))
    if progress:
      progress.update(len(examples[part]), f"{name}/{split}")
  truncated = generator.truncated - before
  if not generate:
    predictions = ["" if c is None else opts[c]
                   for c, opts in zip(ranked["choices"], ranked["candidates"])]
  metrics, primary, targets_pp, preds_pp = score_predictions(task, examples, predictions)
  if task.score_metric_fns and examples:
    cont = [kind.continuation_ids(vocab, e.targets, e.inputs) for e in examples]
    ll, _ = scoring.loglikelihood(model, params, kind, prompts, cont, batch_size=batch_size,
                                  max_length=kind.score_length(input_length))
    for fn in task.score_metric_fns:
      vals = _metric_values(fn(targets_pp, list(ll)))
      primary = primary or next(iter(vals), None)
      metrics.update(vals)
  rank, rank_n = (ranked["accuracy"], ranked["examples"]) if ranked else (None, 0)
  base, base_answer = _baseline(task, targets_pp) if baseline else (None, None)
  samples = [dict(inputs=e.inputs[-600:], prediction=p, target=e.targets, answer=pp,
                  gold=t) for e, p, pp, t in list(zip(examples, predictions, preds_pp,
                                                      targets_pp))[:num_samples]]
  return TaskResult(task=name, split=split, examples=len(examples), metrics=metrics,
                    primary=primary or "", rank_classification=rank, rank_examples=rank_n,
                    truncated=truncated, seconds=round(time.time() - t0, 2),
                    samples=[{k: _jsonable(v) for k, v in s.items()} for s in samples],
                    baseline=base, baseline_answer=base_answer,
                    examples_kept=_kept(examples, predictions, preds_pp, targets_pp, ranked,
                                        keep_examples))


def _kept(examples, predictions, preds_pp, targets_pp, ranked, n: int) -> list[dict]:
  """The first n examples as the review page shows them; right: the extracted answer equals
  the gold one (as exact-match metrics count it)."""
  out = []
  for i, (e, p, pp, t) in enumerate(list(zip(examples, predictions, preds_pp, targets_pp))[:n]):
    row = dict(inputs=e.inputs, prediction=p, target=e.targets, answer=_jsonable(pp),
               gold=_jsonable(t),
               correct=any(str(pp).strip() == str(r).strip() for r in tmpl.references(t)))
    if ranked is not None and ranked["choices"][i] is not None:
      choice, gold = ranked["choices"][i], ranked["gold"][i]
      row.update(rank_choice=ranked["candidates"][i][choice], rank_correct=choice == gold)
    out.append(row)
  return out


def _merge_ranked(a: dict | None, b: dict) -> dict:
  """Two rank_classify results over consecutive examples as one."""
  if a is None:
    return b
  out = {k: a[k] + b[k] for k in ("choices", "gold", "candidates", "scores")}
  n = a["examples"] + b["examples"]
  hits = sum(1 for c, g in zip(out["choices"], out["gold"]) if c is not None and c == g)
  return dict(out, examples=n, accuracy=100.0 * hits / n if n else None)


def _jsonable(v):
  return v if isinstance(v, (str, int, float, bool, type(None))) else str(v)


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
  targets_pp = [postprocess(task, e.targets, e.raw, True) for e in examples]
  preds_pp = [postprocess(task, p, e.raw, False) for p, e in zip(predictions, examples)]
  metrics, primary = {}, None
  for fn in task.predict_metric_fns:
    vals = _metric_values(fn(targets_pp, preds_pp))
    primary = primary or next(iter(vals), None)
    metrics.update(vals)
  return metrics, primary, targets_pp, preds_pp


def rank_classify(model, params, vocab, kind, examples: Sequence[Example],
                  golds: Sequence[str], *, batch_size: int = 16, input_length: int = 2048,
                  continuation_eos: bool = True, prompts: Sequence[list] | None = None) -> dict:
  """Picks the option of highest log-likelihood for every example that has options.

  continuation_eos=False: an option is scored without the EOS the model kind closes a
  target with (lm-evaluation-harness's continuations: MMLU). prompts: the examples'
  `kind.prompt_ids`, when the caller has them. An encoder-decoder reads each prompt once
  for all its options (`scoring.loglikelihood_groups`).

  golds: the postprocessed targets. Returns {"accuracy": percent or None,
  "examples": how many had options, "choices": [index or None per example],
  "gold": [index, -1 (gold not an option) or None per example],
  "candidates": [list or None per example], "scores": [log-likelihoods or None per
  example]}.
  """
  kind = kinds_lib.get(kind)
  ctxs, conts, owners = [], [], []
  cands_of, gold_of = [None] * len(examples), [None] * len(examples)
  for i, (e, g) in enumerate(zip(examples, golds)):
    found = rank_candidates(e, str(g))
    if found is None:
      continue
    cands_of[i], gold_of[i] = found
    ctxs.append(prompts[i] if prompts is not None else kind.prompt_ids(vocab, e.inputs))
    conts.append([option_ids(kind, vocab, c, e.inputs, continuation_eos) for c in found[0]])
    owners.append(i)
  choices, scores = [None] * len(examples), [None] * len(examples)
  if not owners:
    return dict(accuracy=None, examples=0, choices=choices, gold=gold_of, candidates=cands_of,
                scores=scores)
  ll, _ = scoring.loglikelihood_groups(model, params, kind, ctxs, conts, batch_size=batch_size,
                                       max_length=kind.score_length(input_length))
  for o, v in zip(owners, ll):
    scores[o] = [float(x) for x in v]
    choices[o] = int(np.argmax(v))  # the first of equal scores wins
  n = len(owners)
  hits = sum(1 for c, g in zip(choices, gold_of) if c is not None and g is not None and c == g)
  return dict(accuracy=100.0 * hits / n, examples=n, choices=choices, gold=gold_of,
              candidates=cands_of, scores=scores)


def _formatted(name: str, examples: list[Example], fmt) -> list[Example]:
  """Examples whose prompts fmt wraps (not those of user data, rendered in their format)."""
  from flanjax.data.collections import user  # pylint: disable=g-import-not-at-top
  if fmt is None or user.prompt_format_of(name) is not None:
    return examples
  return [dataclasses.replace(e, inputs=fmt.wrap(e.inputs)) for e in examples]


def option_ids(kind, vocab, option: str, context: str, eos: bool = True) -> list[int]:
  """An option's ids as rank classification scores it: the kind's continuation, without
  its closing EOS when eos=False (what lm_eval scores)."""
  ids = list(kind.continuation_ids(vocab, option, context))
  if not eos and len(ids) > 1 and ids[-1] == vocab.eos_id:
    ids = ids[:-1]
  return ids


def plan(task_names: Sequence[str], splits: Sequence[str] | None = None,
         log: Callable[[str], None] = print) -> list[tuple[str, str]]:
  """(task, split) pairs of task specs: tasks, mixtures (their tasks) or 'task:split'."""
  out = []
  for spec in expand(task_names):
    name, split = task_and_split(spec)
    task_splits = [split] if split else (list(splits) if splits else default_splits(name))
    have = get_task(name).splits
    if split and split not in have:
      raise UserError(f"task {name} has no split {split!r}; it has {', '.join(have)}")
    task_splits = [s for s in task_splits if s in have]
    if not task_splits:
      log(f"eval: {name} has none of the splits {', '.join(splits or EVAL_SPLITS)}; skipped")
    out += [(name, s) for s in task_splits]
  return out


def evaluate_suite(model, params, vocab, kind, task_names: Sequence[str],
                   *, splits: Sequence[str] | None = None, input_length: int = 2048,
                   decode=None, batch_size: int = 16, max_examples: int | None = None,
                   rank_classification: bool = True, baseline: bool = False, writer=None,
                   step: int | None = None, progress_every_secs: float | None = 10.0,
                   generate: bool = True,
                   num_samples: int = 3, log: Callable[[str], None] = print,
                   keep_examples: int = 0, prompt_format=None) -> list[TaskResult]:
  """Evaluates `model` on tasks registered with `vocab`; one TaskResult per task and split.

  kind: the model's `kinds.ModelKind` (or its name: 'enc_dec', 'prefix_lm' for
  a flanjax-trained decoder, 'decoder' for a causal LM such as an imported
  Llama). task_names: tasks, mixtures (their tasks) or "task:split". splits:
  for every task (those it lacks are skipped); default each task's
  evaluation-only splits, else its validation / heldout_templates / test
  splits. decode: a decoding.DecodeConfig (default greedy, 256 new tokens).
  baseline: add the majority-answer baseline of each task with a train split.
  writer (a metrics.SummaryWriter) and step: the scores as TensorBoard
  scalars, eval/<task>/<split>/<metric>. keep_examples: examples each result keeps for
  the review page. prompt_format (a data.chat.PromptFormat): wraps the prompts of tasks
  not already rendered in a format (user data is) as infer wraps a prompt, and cuts
  generations at its end of turn. generate=False: a task rank classification applies to
  answers with its best-scored option instead of a generation (lm_eval's MMLU protocol).
  """
  from flanjax import decoding  # pylint: disable=g-import-not-at-top
  kind = kinds_lib.get(kind)
  decode = decode or decoding.DecodeConfig.with_default_length(256)
  loaded = [(name, split, _formatted(name, load_examples(name, split, vocab, input_length,
                                                        max_examples), prompt_format))
            for name, split in plan(task_names, splits, log)]
  for name, split, ex in loaded:
    if not ex:  # a score over no examples would read as a measured 0.0
      log(f"eval: {name}/{split} has no examples, not scored (a held-out share too small "
          "for a small file holds none out: raise validation_share or give a validation file)")
  loaded = [(name, split, ex) for name, split, ex in loaded if ex]
  if not loaded:
    return []
  total = sum(len(ex) for *_, ex in loaded)
  generator = decoding.Generator(model, params, vocab, input_length, decode,
                                 batch_size=batch_size, kind=kind)
  progress = Progress(total, progress_every_secs, log)
  how = f"{decode.method} decoding (at most {decode.max_decode_len} new tokens)"
  if not generate:  # MMLU's way: options ranked, nothing generated for them
    how = f"rank classification where a task has options, else {how}"
  log(f"eval: {len(loaded)} task splits, {total} examples, {how}, inputs up to "
      f"{input_length} tokens")
  results = []
  for name, split, examples in loaded:
    r = evaluate_one(model, params, vocab, kind, name, split, generator,
                     input_length=input_length, batch_size=batch_size,
                     rank_classification=rank_classification, baseline=baseline,
                     num_samples=num_samples, progress=progress, examples=examples,
                     generate=generate,
                     keep_examples=keep_examples, cut=prompt_format and prompt_format.cut)
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
