"""Scoring several continuations of one context with one pass over the context.

Rank classification scores every option of a question against the same prompt. An
encoder-decoder reads that prompt in its encoder, which is where nearly all the work is
(an MMLU prompt runs to thousands of tokens, an option to two or three): here the
encoder runs once per context and the decoder scores all its options against the same
encoded states, as a batch. The arithmetic of each option is that of a whole forward
pass on (context, option) (`kinds.EncoderDecoder.score_batch`), so the log-likelihoods
are the same. Other kinds read context and option in one row; for them nothing is
shared and `evaluation.scoring` scores the rows one by one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flanjax.models import kinds as kinds_lib


def shares_context(kind) -> bool:
  """Whether `score_groups` encodes a context once for all its continuations."""
  return isinstance(getattr(kind, "inner", kind), kinds_lib.EncoderDecoder)


def score_groups(model, params, groups, batch_size: int):
  """groups: at most batch_size (context, [continuation, ...]) of an encoder-decoder ->
  (log-likelihood sums [len(groups), k], all-greedy [len(groups), k]), k the most
  continuations of a group; a group's missing ones score 0.0 and True.

  Shapes are bucketed (contexts as `kinds.bucket`, options per context to a power of
  two), so a whole evaluation compiles a handful of times."""
  k = kinds_lib.bucket(max(len(conts) for _, conts in groups), minimum=1)
  le = kinds_lib.bucket(max(len(c) for c, _ in groups))
  ld = kinds_lib.bucket(max((len(y) for _, cs in groups for y in cs), default=1), minimum=8)
  enc = np.zeros((batch_size, le), np.int32)
  dec_in = np.zeros((batch_size, k, ld), np.int32)
  tgt = np.zeros((batch_size, k, ld), np.int32)
  w = np.zeros((batch_size, k, ld), np.int32)
  for j, (ctx, conts) in enumerate(groups):
    enc[j, :len(ctx)] = ctx
    for c, cont in enumerate(conts):
      dec_in[j, c, 1:len(cont)] = cont[:-1]
      tgt[j, c, :len(cont)] = cont
      w[j, c, :len(cont)] = 1
  s, g = _t5_group_scores(model, params, enc, dec_in, tgt, w)
  return np.asarray(s)[:len(groups)], np.asarray(g)[:len(groups)]


@functools.partial(jax.jit, static_argnames=("model",))
def _t5_group_scores(model, params, encoder_tokens, decoder_inputs, targets, weights):
  variables = {"params": params}
  encoded = model.apply(variables, encoder_tokens, method=model.encode)
  b, k, ld = decoder_inputs.shape
  # Each option's decoder row reads its context's encoded states, as T5's forward does.
  logits = model.apply(variables, jnp.repeat(encoded, k, axis=0),
                       jnp.repeat(encoder_tokens, k, axis=0),
                       decoder_inputs.reshape(b * k, ld), method=model.decode)
  total, greedy = kinds_lib._gather(logits, targets.reshape(b * k, ld),  # pylint: disable=protected-access
                                    weights.reshape(b * k, ld))
  return total.reshape(b, k), greedy.reshape(b, k)
