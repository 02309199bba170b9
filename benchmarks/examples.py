"""The examples both stacks train on: real tokenized FLAN CoT examples, or synthetic ones.

Real: the mixture's training examples as the trainer gets them (templated,
tokenized with a SentencePiece model trained on the mixture's text, trimmed,
EOS appended), drawn by the mixture's rates.

Synthetic (no data needed, for tests): lognormal lengths shaped like
flan_cot's and random token ids.
"""

from __future__ import annotations

import numpy as np

EOS = 1


def mixture_examples(mixture: str, lengths: dict, n: int, seed: int, vocab_size: int):
  """(examples [{'inputs','targets'} int32 arrays], vocabulary size, description).

  Each example is drawn as the mixture draws them (a task by the mixture's
  rate, then one of its training examples) from the tokenized-example cache
  the pipeline reads, and gets seqio's append_eos_after_trim: trimmed to the
  feature length less one, then EOS.
  """
  from flanjax.data import registry, tasks, vocab  # pylint: disable=g-import-not-at-top
  voc = vocab.corpus_vocabulary(mixture, vocab_size=vocab_size)
  # Few-shot prompts drop exemplars until they fit, as in training.
  registry.register_all(voc, input_length=lengths["inputs"])
  mix = registry.get_task_or_mixture(mixture)
  members = getattr(mix, "tasks", [mix])
  rates = np.array([mix.get_rate(t) if hasattr(mix, "get_rate") else 1.0 for t in members],
                   np.float64)
  toks = [tasks.DEFS[t.name].tokenized("train") for t in members]
  rng = np.random.default_rng(seed)
  which = rng.choice(len(members), size=n, p=rates / rates.sum())
  eos = voc.eos_id if voc.eos_id is not None else EOS

  def trimmed(flat, splits, i, length):
    x = np.asarray(flat[splits[i]:splits[i + 1]], np.int32)[:length - 1]
    return np.append(x, np.int32(eos)).astype(np.int32)

  out = []
  for t in which:
    tok = toks[t]
    i = int(rng.integers(len(tok.texts)))
    out.append({"inputs": trimmed(tok.inputs, tok.inputs_splits, i, lengths["inputs"]),
                "targets": trimmed(tok.targets, tok.targets_splits, i, lengths["targets"])})
  return out, voc.vocab_size, f"{mixture} train (vocabulary {voc.vocab_size} pieces)"


def synthetic_examples(lengths: dict, n: int, seed: int, vocab_size: int):
  """flan_cot-like lengths (inputs median ~115, targets ~12, long tails), random ids."""
  rng = np.random.default_rng(seed)
  n_in = np.clip(rng.lognormal(np.log(120), 0.8, n).astype(int), 2, lengths["inputs"])
  n_tg = np.clip(rng.lognormal(np.log(14), 1.0, n).astype(int), 1, lengths["targets"])
  out = []
  for a, b in zip(n_in, n_tg):
    inp = rng.integers(3, vocab_size, a, dtype=np.int32)
    tgt = rng.integers(3, vocab_size, b, dtype=np.int32)
    inp[-1] = tgt[-1] = EOS
    out.append({"inputs": inp, "targets": tgt})
  return out, vocab_size, f"synthetic lognormal lengths ({vocab_size} ids)"


def fixed_examples(n: int, n_in: int, n_tg: int, seed: int, vocab_size: int):
  """n examples of exactly n_in input and n_tg target tokens: every position is real."""
  rng = np.random.default_rng(seed)
  return [{"inputs": rng.integers(3, vocab_size, n_in, dtype=np.int32),
           "targets": rng.integers(3, vocab_size, n_tg, dtype=np.int32)} for _ in range(n)]


def length_summary(examples) -> dict:
  n_in = np.array([len(e["inputs"]) for e in examples])
  n_tg = np.array([len(e["targets"]) for e in examples])
  pct = lambda a: {p: int(np.percentile(a, p)) for p in (50, 90, 99)}  # noqa: E731
  return {"examples": len(examples),
          "inputs": {"mean": round(float(n_in.mean()), 1), "max": int(n_in.max()),
                     "percentiles": pct(n_in)},
          "targets": {"mean": round(float(n_tg.mean()), 1), "max": int(n_tg.max()),
                      "percentiles": pct(n_tg)}}
