"""The examples both stacks train on: real tokenized FLAN CoT examples, or synthetic ones.

Real: the mixture's training examples exactly as the trainer gets them from
seqio (templated, tokenized with a SentencePiece model trained on the
mixture's text, EOS appended, trimmed to the feature lengths), in the
mixture's shuffled, rate-weighted order.

Synthetic (no data needed, for tests): lognormal lengths shaped like
flan_cot's and random token ids.
"""

from __future__ import annotations

import numpy as np

EOS = 1


def mixture_examples(mixture: str, lengths: dict, n: int, seed: int, vocab_size: int):
  """(examples [{'inputs','targets'} int32 arrays], vocabulary size, description)."""
  import seqio  # pylint: disable=g-import-not-at-top
  from flanjax.data import registry, tasks, vocab  # pylint: disable=g-import-not-at-top
  voc = vocab.corpus_vocabulary(mixture, vocab_size=vocab_size)
  # Few-shot prompts drop exemplars until they fit, as in training.
  tasks.set_input_budget(lengths["inputs"])
  registry.register_all(voc)
  mix = registry.get_task_or_mixture(mixture)
  ds = mix.get_dataset(dict(lengths), split="train", shuffle=True, seed=seed,
                       use_cached=False, shard_info=seqio.ShardInfo(0, 1))
  out = []
  for ex in ds.take(n).as_numpy_iterator():
    out.append({"inputs": np.asarray(ex["inputs"], np.int32),
                "targets": np.asarray(ex["targets"], np.int32)})
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
