"""Log-likelihood of continuations: rank classification and harness adapters.

    loglikelihood(model, params, kind, contexts, continuations)
        -> (sum of log-probabilities [n], whether greedy decoding gives the continuation [n])

Token ids in, as the model reads them (the caller adds EOS, BOS, spaces):

  t5       the encoder reads the context, the decoder is teacher-forced on the
           continuation (shifted right, starting from 0); a task trained with
           seqio's targets ends its continuation in EOS.
  decoder  causal: the row [context + continuation]; the logits at the last
           context token predict the first continuation token, so the context
           must not be empty (give BOS). prefix_lm=True: the row a flanjax
           prefix-LM trains on, [0, context..., continuation...], with the 0
           and the context attending both ways (context = the inputs, EOS
           included); the logits at the context's last token predict the
           first continuation token, exactly as in training.

Requests are sorted by length, cut into batches of `batch_size` rows (the last
padded with empty rows) and padded to a few bucketed lengths, so a whole
evaluation compiles a handful of times. Over-long requests keep their end: the
context loses its first tokens (the continuation is never cut, unless it alone
is longer than the budget; then its first tokens are scored as context).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("t5", "decoder")


def bucket(n: int, minimum: int = 16) -> int:
  """A padded length for n tokens: powers of two up to 1024, then multiples of 512."""
  n = max(int(n), 1)
  if n <= 1024:
    return max(minimum, 1 << (n - 1).bit_length())
  return -(-n // 512) * 512


def _gather(logits, targets, weights):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets
  total = jnp.sum(jnp.where(weights > 0, tok, 0.0), axis=-1)
  return total, jnp.all(greedy | (weights == 0), axis=-1)


@functools.partial(jax.jit, static_argnames=("model",))
def _t5_scores(model, params, encoder_tokens, decoder_inputs, targets, weights):
  # Right padding of the decoder never reaches a real position through the causal mask.
  logits = model.apply({"params": params}, encoder_tokens, decoder_inputs)
  return _gather(logits, targets, weights)


@functools.partial(jax.jit, static_argnames=("model",))
def _decoder_scores(model, params, tokens, causal_attention, targets, weights):
  # Right padding never reaches a real token through the causal mask.
  logits = model.apply({"params": params}, tokens, decoder_causal_attention=causal_attention)
  return _gather(logits, targets, weights)


def _left_trim(ctx: list, cont: list, budget: int):
  """(context, continuation) with at most `budget` tokens in all, the end kept."""
  over = len(ctx) + len(cont) - budget
  if over <= 0:
    return ctx, cont
  if over <= len(ctx):
    return ctx[over:], cont
  # The continuation alone does not fit: its first tokens become context.
  cont = cont[over - len(ctx):]
  return cont[:1], cont[1:]


def _as_list(ids) -> list:
  return [int(x) for x in np.asarray(ids, np.int64).reshape(-1)]


def loglikelihood(model, params, kind: str, contexts: Sequence[Sequence[int]],
                  continuations: Sequence[Sequence[int]], *, prefix_lm: bool = False,
                  batch_size: int = 16, max_length: int | None = None,
                  max_target_length: int | None = None):
  """Sum of log p(continuation | context) per request, and whether it is the greedy one.

  kind: "t5" (a t5.T5) or "decoder" (a decoder.Decoder). max_length: the
  longest decoder row (decoder) or encoder input (t5); max_target_length: the
  longest T5 continuation. Longer requests keep their last tokens (see the
  module docstring). Returns (np.float64 [n], np.bool_ [n]); an empty
  continuation scores 0.0 and True.
  """
  if kind not in KINDS:
    raise ValueError(f"kind {kind!r} is not one of {KINDS}")
  if len(contexts) != len(continuations):
    raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
  n = len(contexts)
  sums = np.zeros([n], np.float64)
  greedy = np.ones([n], bool)
  reqs = []
  for i, (ctx, cont) in enumerate(zip(contexts, continuations)):
    ctx, cont = _as_list(ctx), _as_list(cont)
    if not cont:
      continue
    if kind == "t5":
      if max_target_length is not None and len(cont) > max_target_length:
        cont = cont[:max_target_length]
      if max_length is not None and len(ctx) > max_length:
        ctx = ctx[len(ctx) - max_length:]
      reqs.append((i, ctx, cont, len(ctx), len(cont)))
    else:
      prefix = [0] if prefix_lm else []
      if max_length is not None:
        ctx, cont = _left_trim(ctx, cont, max_length - len(prefix))
      if not prefix and not ctx:
        raise ValueError(f"request {i}: a causal decoder needs a non-empty context to predict "
                         "the first continuation token (give BOS)")
      reqs.append((i, prefix + ctx, cont, 0, len(prefix) + len(ctx) + len(cont) - 1))
  # Longest first: rows of a batch have similar lengths, and the first batch
  # (the largest shapes) fails fast on memory.
  reqs.sort(key=lambda r: (-(r[3] + r[4]), r[0]))
  for start in range(0, len(reqs), batch_size):
    chunk = reqs[start:start + batch_size]
    if kind == "t5":
      le = bucket(max(r[3] for r in chunk))
      ld = bucket(max(r[4] for r in chunk), minimum=8)
      enc = np.zeros((batch_size, le), np.int32)
      dec_in = np.zeros((batch_size, ld), np.int32)
      tgt = np.zeros((batch_size, ld), np.int32)
      w = np.zeros((batch_size, ld), np.int32)
      for j, (_, ctx, cont, _, _) in enumerate(chunk):
        enc[j, :len(ctx)] = ctx
        dec_in[j, 1:len(cont)] = cont[:-1]
        tgt[j, :len(cont)] = cont
        w[j, :len(cont)] = 1
      s, g = _t5_scores(model, params, enc, dec_in, tgt, w)
    else:
      length = bucket(max(r[4] for r in chunk))
      tok = np.zeros((batch_size, length), np.int32)
      causal = np.zeros((batch_size, length), np.int32)
      tgt = np.zeros((batch_size, length), np.int32)
      w = np.zeros((batch_size, length), np.int32)
      for j, (_, ctx, cont, _, _) in enumerate(chunk):
        row = ctx + cont
        tok[j, :len(row) - 1] = row[:-1]
        tgt[j, :len(row) - 1] = row[1:]
        w[j, len(ctx) - 1:len(row) - 1] = 1
        if prefix_lm:
          causal[j, :len(ctx)] = 1
      s, g = _decoder_scores(model, params, tok, causal, tgt, w)
    s, g = np.asarray(s), np.asarray(g)
    for j, r in enumerate(chunk):
      sums[r[0]], greedy[r[0]] = float(s[j]), bool(g[j])
  return sums, greedy
