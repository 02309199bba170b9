"""Evaluation: generated answers scored by each task's metrics, rank classification.

  harness.py   tasks -> examples -> generations -> postprocess + metric_fns,
               rank classification over answer options; evaluate_suite, the
               tables (console and markdown) and TensorBoard scalars
  scoring.py   log-likelihood of continuations for both model kinds
  lm_eval_adapter.py   EleutherAI's lm-evaluation-harness over a flanjax checkpoint

This module keeps the training loop's end-of-run report: `evaluate_tasks`
scores greedy answers with each task's metric and sets them beside the
baseline of always giving the train split's most common answer.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Sequence

import numpy as np
import seqio

from flanjax import decoding
from flanjax.data import registry
from flanjax.data.templates import extract_answer
from flanjax.evaluation import harness
from flanjax.models import decoder as decoder_lib


@dataclasses.dataclass
class TaskScore:
  task: str
  split: str
  examples: int
  accuracy: float  # percent: the task's first metric (exact match of the extracted answer)
  baseline: float  # percent, always answering the train split's most common answer
  baseline_answer: str
  samples: list  # a few (input, prediction, target) for the report
  metrics: dict = dataclasses.field(default_factory=dict)  # all the task's metrics


def answer_fn(task: seqio.Task):
  """The task's own answer extraction (its seqio postprocess_fn), else the CoT phrase rule."""
  if task.postprocess_fn is None:
    return extract_answer
  return lambda text: task.postprocess_fn(text, example=None, is_target=False)


def majority_answer(task: seqio.Task, max_examples: int = 2000) -> str:
  ds = task.get_dataset(None, split="train", shuffle=False, num_epochs=1,
                        use_cached=False).take(max_examples)
  post = answer_fn(task)
  counts = collections.Counter(
      post(ex["targets_pretokenized"].decode("utf-8")) for ex in ds.as_numpy_iterator())
  return counts.most_common(1)[0][0] if counts else ""


def _pad(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
  out = np.zeros((len(rows), length), np.int32)
  for i, r in enumerate(rows):
    r = r[:length]
    out[i, :len(r)] = r
  return out


def trim_inputs(ids: np.ndarray, length: int, eos_id: int) -> np.ndarray:
  """At most `length` tokens ending in EOS, as seqio's append_eos_after_trim feeds training."""
  ids = np.asarray(ids, np.int32)
  if len(ids) <= length:
    return ids
  return np.concatenate([ids[:length - 1], [eos_id]]).astype(np.int32)


def prefix_lm_prompts(inputs: Sequence[np.ndarray], input_length: int):
  """Prompts [n, input_length + 1] and their lengths for a prefix-LM decoder.

  A packed prefix-LM row feeds the model [0, inputs..., EOS, targets...] (the
  targets shifted right by one, 0 at the start), with the first len(inputs) + 1
  positions attending both ways; the logits at the inputs' EOS predict the
  first target. So the prompt is 0 followed by the inputs, EOS included.
  """
  rows = [np.concatenate([[0], np.asarray(r, np.int32)]) for r in inputs]
  return _pad(rows, input_length + 1), np.array([len(r) for r in rows], np.int32)


def greedy_fn(model, params, input_length: int, max_decode_len: int, eos_id: int):
  """inputs (id arrays, EOS included, at most input_length) -> [n, max_decode_len] ids.

  The decode function of the model's kind: T5 encodes the inputs, a decoder
  continues the prefix-LM prompt.
  """
  if isinstance(model, decoder_lib.Decoder):
    def run(inputs):
      prompts, lengths = prefix_lm_prompts(inputs, input_length)
      return decoder_lib.greedy(model, params, prompts, lengths, max_len=max_decode_len,
                                eos_id=eos_id, bidirectional_prompt=True)
  else:
    def run(inputs):
      return decoding.greedy(model, params, _pad(inputs, input_length),
                             max_len=max_decode_len, eos_id=eos_id)
  return lambda inputs: np.asarray(run(inputs))


def _kind(model) -> str:
  return "decoder" if isinstance(model, decoder_lib.Decoder) else "t5"


def evaluate_task(model, params, task_name: str, split: str, input_length: int,
                  max_decode_len: int, batch_size: int = 64,
                  max_examples: int | None = None) -> TaskScore:
  """Greedy answers scored by the task's metric; `model` is a t5.T5 or a prefix-LM decoder.Decoder."""
  task = seqio.get_mixture_or_task(task_name)
  vocab = task.output_features["targets"].vocabulary
  kind = _kind(model)
  generator = decoding.Generator(model, params, vocab, input_length,
                                 decoding.DecodeConfig(max_decode_len=max_decode_len),
                                 batch_size=batch_size, prefix_lm=kind == "decoder")
  examples = harness.load_examples(task_name, split, vocab, input_length, max_examples)
  result = harness.evaluate_one(model, params, vocab, kind, kind == "decoder", task_name, split,
                                generator, input_length=input_length, batch_size=batch_size,
                                rank_classification=False, examples=examples)
  baseline_answer = majority_answer(task) if "train" in task.splits else ""
  post = answer_fn(task)
  baseline_hits = sum(post(e.targets) == baseline_answer for e in examples)
  n = max(len(examples), 1)
  samples = [(s["inputs"], s["prediction"], s["target"]) for s in result.samples]
  return TaskScore(task_name, split, result.examples, result.score,
                   100.0 * baseline_hits / n, baseline_answer, samples, result.metrics)


def format_table(scores: Sequence[TaskScore]) -> str:
  rows = [("task", "split", "n", "exact match %", "baseline %", "baseline answer")]
  for s in scores:
    rows.append((s.task, s.split, str(s.examples), f"{s.accuracy:.1f}", f"{s.baseline:.1f}",
                 repr(s.baseline_answer)))
  by_split = collections.defaultdict(list)
  for s in scores:
    by_split[s.split].append(s)
  for split, ss in by_split.items():
    rows.append(("MEAN", split, str(sum(s.examples for s in ss)),
                 f"{np.mean([s.accuracy for s in ss]):.1f}",
                 f"{np.mean([s.baseline for s in ss]):.1f}", ""))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def evaluate_tasks(model, params, task_names: Sequence[str], splits: Sequence[str],
                   input_length: int, max_decode_len: int, batch_size: int = 64,
                   max_examples: int | None = None):
  t0 = time.time()
  scores = []
  for name in task_names:
    task = seqio.get_mixture_or_task(name)
    for split in splits:
      if split in task.splits:
        scores.append(evaluate_task(model, params, name, split, input_length,
                                    max_decode_len, batch_size, max_examples))
  return scores, time.time() - t0


def tasks_of(name: str) -> list[str]:
  obj = registry.get_task_or_mixture(name)
  return [t.name for t in getattr(obj, "tasks", [obj])]
